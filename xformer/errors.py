"""The one family of errors xformer raises for bad input.

Every error names the problem and the fix in one line; the CLI prints ``xformer: error: <message>``
and exits with status 2. Catch :class:`XformerError` to handle them all.
"""

from __future__ import annotations


class XformerError(Exception):
    """Base class: bad input that the user can fix. The message is one line."""


class SpecError(XformerError, ValueError):
    """A malformed ``ModelSpec``: names the field, the value and the allowed range."""


class CheckpointError(XformerError):
    """A checkpoint that does not match its spec: lists missing, extra and mis-shaped tensors."""


class BackendError(XformerError):
    """An unknown backend or mode, or a backend whose framework is not installed."""


class InputError(XformerError, ValueError):
    """Bad model inputs: wrong shape or dtype, sequence longer than ``max_len``, token id out of
    range."""
