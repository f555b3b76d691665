"""The one base class of errors a user can fix: the CLI prints them as one line."""


class AlexnetError(Exception):
    """Bad input or configuration; `str()` is a complete one-line explanation."""


class Interrupted(Exception):
    """A stop was requested (SIGTERM); the run saved its checkpoint and can continue."""


def one_line(error: BaseException, first_only: bool = False) -> str:
    """An exception's message on one line (some libraries' span several; `first_only`
    keeps only the first), or its type when it has none."""
    lines = str(error).strip().splitlines()
    text = lines[0] if first_only and lines else " ".join(lines)
    return " ".join(text.split()) or type(error).__name__
