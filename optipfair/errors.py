"""The exception types for bad input: callers (the CLI, the pipeline) print their message as is."""


class OptiPFairError(ValueError):
    """A user-facing error: the message says what is wrong and what to change."""


class OptionError(OptiPFairError):
    """A bad pruning option: `field` names it, `problem` says what to change.

    Each surface names the field its own way (`pruning_percentage` in Python and params.yaml,
    `--pruning-percentage` on the command line); the problem reads the same everywhere.
    """

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem
