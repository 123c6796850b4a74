"""How stale a delayed gradient is, per module: the distance between the weights a forward used
and the weights its gradient is applied to, relative to the weights' norm, averaged over every
backward of the first EPOCHS epochs (lr schedule as in training; local executor).

    python scripts/weight_gap.py EPOCHS OVERRIDE ...     e.g.
    python scripts/weight_gap.py 5 algo=fdg gpus=4 algo.weight_prediction=true

Prints one line per module (the last has no delay): the mean relative gap. With weight
prediction the forward's weights are the extrapolated ones: a smaller gap means the
extrapolation landed closer to where the weights really went.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from dpbp.build import WorkerContext
from dpbp.config import from_dict, validate
from dpbp.lr import lr_at
from dpbp.tick import TickRunner


def main(epochs: int, overrides: list[str]) -> None:
    with initialize_config_module(config_module="dpbp.conf", version_base="1.3"):
        d = OmegaConf.to_container(compose("train", overrides=["executor=local", *overrides]),
                                   resolve=True)
    cfg = from_dict(d)
    validate(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        runner = TickRunner(cfg, Path(tmp), WorkerContext())
        gaps: dict[int, list[float]] = {s.index: [] for s in runner.stages}
        for s in runner.stages:
            def backward(batch, grad, s=s, orig=s.backward):
                used = s.pending[batch].weights
                if used is not None and used is not s.params:
                    num = sum(float((used[n].detach() - p.detach()).pow(2).sum())
                              for n, p in s.params.items())
                    den = sum(float(p.detach().pow(2).sum()) for p in s.params.values())
                    gaps[s.index].append((num / den) ** 0.5)
                return orig(batch, grad)
            s.backward = backward
        runner.end(runner.steps * epochs)
        for e in range(epochs):
            runner.set_lr(lr_at(cfg, e))
            runner.run(e * runner.steps, (e + 1) * runner.steps)
    for k, g in gaps.items():
        mean = sum(g) / len(g) if g else 0.0
        print(f"module {k + 1}: mean relative gap {mean:.3e} over {len(g)} backwards")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(int(sys.argv[1]), sys.argv[2:])
