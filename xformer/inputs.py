"""Array checks shared by the Backend contract (:func:`xformer.backend.check_inputs`) and
generation (:func:`xformer.generation.generate`): what numpy cannot make one rectangular array
of, integer arrays, and 0/1 attention masks, each refused with one :class:`InputError` that
names the input, the value and the fix.

Layering: numpy and :mod:`xformer.errors` only, so that :mod:`xformer.backend` and
:mod:`xformer.generation` (which the backend imports) can both use it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, truncate


def as_array(value: Any, name: str, shape_hint: str) -> np.ndarray:
    """``np.asarray(value)``, or :class:`InputError` for what numpy cannot make one rectangular
    array of (ragged lists, objects), naming ``name`` and its expected shape."""
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError, OverflowError):
        pad = "; pad the rows and mark the padding in attention_mask" if "ids" in name else ""
        raise InputError(f"{name} must be a rectangular array of shape {shape_hint}, got a "
                         f"ragged {type(value).__name__} (rows of unequal length{pad})"
                         ) from None
    if arr.dtype == object:
        flat = arr.ravel()
        huge = [v for v in flat if isinstance(v, int) and not isinstance(v, bool)]
        if huge and len(huge) == flat.size:
            bad = max(huge, key=abs)
            raise InputError(f"{name}: value {truncate(bad, 40)} does not fit in int64; give "
                             f"values in range (token ids in [0, vocab_size))")
        raise InputError(f"{name} must be a rectangular numeric array of shape {shape_hint} "
                         f"(rows of equal length), got an object array "
                         f"{truncate(value, 60)}")
    return arr


def check_int_array(value: Any, name: str, shape_hint: str) -> np.ndarray:
    """An integer array (any numpy integer dtype or Python ints); floats, bools and strings are
    refused with an :class:`InputError` that names the dtype and the fix."""
    arr = as_array(value, name, shape_hint)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        hint = (" (cast exact integers with .astype(np.int64))"
                if np.issubdtype(arr.dtype, np.floating) else "")
        raise InputError(f"{name} must be an integer array of shape {shape_hint}, got "
                         f"{arr.dtype} {arr.shape}{hint}")
    return arr


def check_mask(value: Any, name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """An attention mask of ``shape``: every value exactly 0 (padding) or 1 (attend), bools or
    any real dtype; returned in ``dtype``.

    Raises:
        InputError: ragged or non-numeric, a wrong shape, or a value other than 0/1 (2, -1,
            NaN, inf), naming the first such value and where it is.
    """
    mask = as_array(value, name, str(shape))
    if not (mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.integer)
            or np.issubdtype(mask.dtype, np.floating)):
        raise InputError(f"{name} must hold 0/1 (or booleans), got {mask.dtype}")
    if mask.shape != shape:
        raise InputError(f"{name} must have shape (B, T) = {shape}, got {mask.shape}")
    bad = np.argwhere((mask != 0) & (mask != 1))
    if bad.size:
        where = tuple(int(i) for i in bad[0])
        raise InputError(f"{name} must hold only 0 (padding) and 1 (attend), got "
                         f"{mask[where]!r} at {where} ({len(bad)} such value"
                         f"{'s' if len(bad) != 1 else ''})")
    return mask.astype(dtype)
