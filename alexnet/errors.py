"""The errors a user can fix, which the CLI prints as one line: ours (`AlexnetError`),
and the operating system's refusals (an `OSError` with an errno: a read-only folder, no
space left, a name too long), which the user fixes, not the code."""


class AlexnetError(Exception):
    """Bad input or configuration; `str()` is a complete one-line explanation."""


class Interrupted(Exception):
    """A stop was requested (SIGTERM); the run saved its checkpoint and can continue."""


def is_user_error(error: BaseException) -> bool:
    """Ours, or the operating system's refusal. Not an OSError without an errno (a bare
    TimeoutError, a library's closed connection): its traceback is the story."""
    return isinstance(error, AlexnetError) or (
        isinstance(error, OSError) and error.errno is not None
    )


def user_line(error: BaseException) -> str:
    """The one line of a user error: ours as written, the system's as 'PATH: reason'."""
    if isinstance(error, OSError) and error.strerror:
        where = " -> ".join(str(p) for p in (error.filename, error.filename2) if p is not None)
        return f"{where}: {error.strerror}" if where else error.strerror
    if isinstance(error, AlexnetError):
        return one_line(error)
    return f"{type(error).__name__}: {one_line(error)}"


def one_line(error: BaseException, first_only: bool = False) -> str:
    """An exception's message on one line (some libraries' span several; `first_only`
    keeps only the first), or its type when it has none."""
    lines = str(error).strip().splitlines()
    text = lines[0] if first_only and lines else " ".join(lines)
    return " ".join(text.split()) or type(error).__name__
