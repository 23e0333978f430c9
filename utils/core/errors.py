"""The one exception type for problems the user can fix (bad file, bad flag), and how a CLI reports it."""
from __future__ import annotations

import sys

EXIT_CODE = 2  # what every CLI of the project exits with after a UserError


class UserError(Exception):
    """A user-facing error: printed as one line by each CLI, exit code 2, no traceback."""


class ReportedError(UserError):
    """A UserError whose one line a child process of the project (a shipped download script) already printed."""


def report(e: UserError) -> int:
    """Print `e` as the CLI's one 'ERROR:' line, unless a child printed it already; returns the exit code."""
    if not isinstance(e, ReportedError):
        print(f"ERROR: {e}", file=sys.stderr)
    return EXIT_CODE
