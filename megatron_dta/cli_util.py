"""Shared command-line behaviour: user errors become one line on stderr and exit code 2."""

from __future__ import annotations

import contextlib
import sys

from megatron_dta.errors import UserError


@contextlib.contextmanager
def user_errors():
    """Print a ``UserError`` as one line and exit 2; any other exception is a bug and propagates
    with its traceback (so it cannot pass for a user mistake)."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
