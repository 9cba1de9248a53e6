"""The errors a run raises: each message is one line that says what to do."""


class RunError(ValueError):
    """A run cannot start or resume as asked (bad config, foreign checkpoint, ...)."""


class DivergedError(RunError):
    """The loss or the weights stopped being finite (a learning rate too high, say)."""


class RunDirError(RunError):
    """The run directory cannot be used: args are (path, what is wrong), so that the command
    line can say which option gave the path."""

    def __str__(self):
        return f"{self.args[0]}: {self.args[1]}"
