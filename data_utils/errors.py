"""The one exception type for problems the user must fix."""


class UserError(Exception):
    """Input the user has to fix (a path, a file's content, a key or a value), said in one line
    that names it. The CLI prints it and exits 2; any other exception is a bug."""


class UsageError(UserError):
    """Options that do not go together, or an output path ctscan refuses to write to."""


class RunFolderError(UserError):
    """A run folder that cannot serve the command: already taken, not a ctscan run, unfinished,
    or made from another split of the data."""


def first_line(e: BaseException) -> str:
    """`Type: message` of an exception from a library, cut to its first line: torch and PyYAML
    explain at length, and a UserError quoting them must stay one line."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
