"""The one base class of errors a user can fix: the CLI prints them as one line."""


class AlexnetError(Exception):
    """Bad input or configuration; `str()` is a complete one-line explanation."""
