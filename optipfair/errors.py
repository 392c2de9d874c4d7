"""The one exception type for bad input: callers (the CLI, the pipeline) print its message as is."""


class OptiPFairError(ValueError):
    """A user-facing error: the message says what is wrong and what to change."""
