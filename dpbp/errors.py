"""The exceptions a run ends with; the CLI maps each to its exit status and one line."""


class ConfigError(Exception):
    """A user error (bad config value, missing dataset, ...).

    The message is one sentence that says what to change; the CLI prints it without a traceback
    and exits with status 2.
    """


class Divergence(RuntimeError):
    """Training produced a non-finite loss or gradient: the run stops and keeps its last good
    checkpoint (trainer.on_nonfinite=stop). `tick`: where it happened."""

    def __init__(self, message: str, tick: int | None = None) -> None:
        super().__init__(message)
        self.tick = tick


class CheckpointError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission); the previous one is intact."""


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run, at a tick every process agreed on, after writing a
    checkpoint there (unless trainer.checkpoint=false). The CLI exits with 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum


class Stopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a process at once, where there was nothing to save yet (the
    pre-flight checks, a worker's start-up): raised by the signal handler itself. A
    KeyboardInterrupt, so that code cleaning up after Ctrl-C cleans up after it too. `phase`:
    where it landed (a lifecycle.Phase)."""

    def __init__(self, signum: int, phase: object = None) -> None:
        super().__init__(signum)
        self.signum, self.phase = signum, phase
