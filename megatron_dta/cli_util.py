"""Shared command-line behaviour: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import sys


class UserError(ValueError):
    """Bad input or configuration; its message says what to change."""


@contextlib.contextmanager
def user_errors():
    """Print ValueError/FileNotFoundError messages (user input problems) without a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
