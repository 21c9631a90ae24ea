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


#: Longest echo of a user value in an error message (:func:`truncate`).
ECHO_LIMIT = 80


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of ``error``'s message (its type name when the message is empty), cut to
    ``limit`` characters: how a framework's or a user's exception is quoted inside one xformer
    error line."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:limit]


def truncate(value: object, limit: int = ECHO_LIMIT) -> str:
    """The ``repr`` of a user value to echo in an error message, cut to ``limit`` characters
    plus ``"…(N chars)"`` (``N`` the length of the full repr), so a message stays one short
    line whatever the value.

    The repr is built with :mod:`reprlib` (at most 3 levels, 12 items each), so a huge or
    deeply shared value (a YAML alias bomb: 9**9 elements in 500 bytes) costs microseconds;
    an integer too long for ``repr`` (Python's 4300-digit limit) is shown by its digit count.

    Args:
        value: any object. limit: characters kept (``>= 1``).
    Returns:
        ``str`` of at most ``limit`` characters, or ``limit`` + ``"…(N chars)"``.
    """
    import reprlib

    if isinstance(value, int) and not isinstance(value, bool):
        digits = len(str(abs(value))) if value.bit_length() < 14000 else None
        if digits is None or digits > limit:
            approx = digits or int(value.bit_length() * 0.30103) + 1
            return f"<an integer of {'' if digits else '~'}{approx} digits>"
    if isinstance(value, (str, bytes, int, float, type(None))):
        text = repr(value)
    else:
        r = reprlib.Repr()
        r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 3, 12, 12, 12, 12
        r.maxstring, r.maxother, r.maxlong = limit, limit, limit
        try:
            text = r.repr(value)
        except Exception:  # a hostile __repr__: name the type only
            text = f"<{type(value).__name__}>"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} chars)"
