"""The one exception type for problems the user must fix."""


class UserError(Exception):
    """Input the user has to fix (a path, a file's content, a key or a value), said in one line
    that names it. The CLI prints it and exits 2; any other exception is a bug."""
