"""dpbp: decoupled parallel backprop (BP, DDG, Features Replay, FDG) as an experiment runner."""

__version__ = "0.1.0"
