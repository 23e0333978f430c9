"""The one exception type for problems the user can fix (bad file, bad flag)."""


class UserError(Exception):
    """A user-facing error: printed as one line by each CLI, exit code 2, no traceback."""
