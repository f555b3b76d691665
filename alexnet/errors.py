"""The one base class of errors a user can fix: the CLI prints them as one line."""


class AlexnetError(Exception):
    """Bad input or configuration; `str()` is a complete one-line explanation."""


class Interrupted(Exception):
    """A stop was requested (SIGTERM); the run saved its checkpoint and can continue."""
