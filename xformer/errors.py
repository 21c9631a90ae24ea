"""The one family of errors xformer raises for bad input.

Every error names the problem and the fix in one line; the CLI prints ``xformer: error: <message>``
and exits with status 2. Catch :class:`XformerError` to handle them all.
"""

from __future__ import annotations

from typing import Sequence


class XformerError(Exception):
    """Base class: bad input that the user can fix. The message is one line."""


class SpecError(XformerError, ValueError):
    """A malformed ``ModelSpec``: names the field, the value and the allowed range."""


class CheckpointError(XformerError):
    """A checkpoint that does not match its spec: counts the missing, extra and mis-shaped
    tensors and names the first few of each kind.

    Attributes:
        details: every problem, one line per tensor (``"missing: encoder.layers.0..."``), when
            the message summarises a list; empty otherwise. ``xformer --verbose`` prints them.
    """

    def __init__(self, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = list(details)


class BackendError(XformerError):
    """An unknown backend or mode, or a backend whose framework is not installed."""


class InputError(XformerError, ValueError):
    """Bad model inputs: wrong shape or dtype, sequence longer than ``max_len``, token id out of
    range."""
