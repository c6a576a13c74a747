"""Errors that are the user's to fix: the command line turns them into a message and exit code 2."""


class UserError(Exception):
    """Bad input (config, data path, file contents) detected before or while starting a run."""


class ConfigError(UserError):
    """One or more config problems, each already prefixed with its dotted key path."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid config ({len(self.problems)} problem(s)):\n{lines}")


class DataError(UserError):
    """A data source that cannot be read or holds no documents; the message names the path."""


class RunFailed(Exception):
    """The run cannot go on; the message says why, where, and what to do (exit code 1, one line)."""


class TrainingDiverged(RunFailed):
    """A step's loss or gradients were not finite and the non-finite policy says stop."""


class CheckpointSaveFailed(RunFailed):
    """A checkpoint could not be written (a full disk, a lost mount); the last complete one stays."""
