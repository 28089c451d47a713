"""User-facing errors.

A `TetherError` means the user can fix the problem (bad config, bad data, missing file). The CLI
prints its message without a traceback and exits with status 2 (config) or 1 (everything else).
"""


class TetherError(Exception):
    """Something the user can fix; the message says what and how."""

    exit_code = 1


class ConfigError(TetherError):
    """An unknown field, a wrong type, or a value out of range."""

    exit_code = 2


class DataError(TetherError):
    """Malformed, empty or incomplete input data."""


class TrainingError(TetherError):
    """Training cannot go on (for example the loss became NaN)."""


class Interrupted(TetherError):
    """SIGINT or SIGTERM arrived; a checkpoint was saved and the run can be resumed."""

    exit_code = 130
