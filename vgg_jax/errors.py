"""User errors: bad input (config, data, checkpoint, weights) whose message names the problem and the fix.

Entry points print them as one line and exit with status 2 (``vgg_jax.cli``); docs/training.md#errors
"""


class UserError(ValueError):
    """Bad input from the user; the message says what is wrong and what to do."""


class ConfigError(UserError):
    """A config value is out of range, of the wrong type, or inconsistent with another."""


class CheckpointError(UserError):
    """A checkpoint is missing, damaged, or does not fit the run or model asked for."""


class TrainingDiverged(UserError):
    """The loss or the gradient became non-finite; the message says which checkpoint a rerun resumes from."""
