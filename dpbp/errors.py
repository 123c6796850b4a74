"""The one exception type for bad input: the CLI prints its message and exits with status 2."""


class Divergence(RuntimeError):
    """Training produced a non-finite loss: the run stops and keeps its last good checkpoint."""


class ConfigError(Exception):
    """A user error (bad config value, missing dataset, ...).

    The message is one sentence that says what to change; the CLI prints it without a traceback
    and exits with status 2.
    """
