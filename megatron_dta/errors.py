"""The project's user errors: mistakes in what a user gave us (config, files, checkpoints, machine).

Everything raised for bad user input derives from ``UserError``; the CLI and the tools catch only
that (``cli_util.user_errors``) and print its message as one line, so any other exception is a bug
and keeps its traceback. ``UserError`` subclasses ``ValueError`` so callers that caught
``ValueError`` before keep working. Internal invariants stay ``assert`` or plain ``ValueError``.
Subclasses with more structure live beside what they validate: ``rollouts.RolloutFormatError``
(file, line, field) and ``attention.AttentionBackendUnavailable``.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or configuration; the message says where and what to change."""


class ConfigError(UserError):
    """A bad configuration value; the message names the key (and, once loaded, the source) and the fix."""


class CheckpointError(UserError):
    """A checkpoint that is missing or does not fit the run (HF directory or training checkpoint)."""
