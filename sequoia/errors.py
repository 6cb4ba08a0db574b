"""Typed errors for user mistakes.

Library code raises a :class:`SequoiaError` subclass with a one-line message that says what is
wrong and how to fix it; the CLI prints that line and exits non-zero, never a traceback.
"""

from __future__ import annotations


class SequoiaError(Exception):
    """Base class of every error caused by bad input rather than by a bug."""


class TreeError(SequoiaError):
    """A tree (parents, growmap, choices, tree file) is malformed."""


class AcceptanceError(SequoiaError):
    """An acceptance vector or acceptance file is malformed."""


class FileFormatError(SequoiaError):
    """A file is missing, unreadable, or not of the expected `format`."""


class ModelError(SequoiaError):
    """A model or tokenizer cannot be loaded or does not fit the request."""


class ConfigError(SequoiaError):
    """An option value is out of range or options contradict each other."""
