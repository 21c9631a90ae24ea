"""Comparing two runs tensor by tensor.

Error measure, for tensors ``a`` and ``b`` of one name: ``max_abs = max |a - b|`` and
``max_rel = max_abs / max(max |a|, max |b|)`` (relative to the tensor's largest magnitude, so
that elements near zero do not dominate; the message also gives where the worst element is).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from .case import RunResult, Tolerance


@dataclass(frozen=True)
class Diff:
    """The difference of one tensor between two runs.

    ``tensor`` is ``"output:<name>"`` or ``"grad:<name>"``; ``where`` the index of the largest
    absolute difference.
    """

    a: str
    b: str
    tensor: str
    max_abs: float
    max_rel: float
    tol: float
    where: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)  # False for NaN

    def message(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        return (f"{status} {self.tensor}: {self.a} vs {self.b} max abs {self.max_abs:.3e}, "
                f"max rel {self.max_rel:.3e} (tol {self.tol:.0e}) at {list(self.where)}")


def diff_tensors(a_label: str, b_label: str, tensor: str, a: np.ndarray, b: np.ndarray,
                 tol: float, scale: float | None = None) -> Diff:
    """Compare two arrays (NaN anywhere or a shape mismatch gives ``max_rel = nan``, not ok).

    ``max_rel = max|a - b| / scale``, ``scale`` defaulting to ``max(max|a|, max|b|)``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return Diff(a_label, b_label, f"{tensor} (shapes {a.shape} vs {b.shape})", math.nan,
                    math.nan, tol)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = np.argwhere(~(np.isfinite(a) & np.isfinite(b)))[0]
        return Diff(a_label, b_label, f"{tensor} (non-finite)", math.nan, math.nan, tol,
                    tuple(int(i) for i in bad))
    if a.size == 0:
        return Diff(a_label, b_label, tensor, 0.0, 0.0, tol)
    d = np.abs(a - b)
    idx = np.unravel_index(int(np.argmax(d)), d.shape)
    max_abs = float(d[idx])
    if scale is None:
        scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Diff(a_label, b_label, tensor, max_abs, max_rel, tol, tuple(int(i) for i in idx))


#: Gradients that are zero in exact arithmetic: a key projection's bias adds ``q_i . b_k`` to
#: every logit of row ``i``, which softmax ignores. What backends return there is rounding noise
#: with no magnitude of its own, so its error is measured against the largest gradient of the
#: attention block's projection weights (and so checks that the noise is that small).
ZERO_GRADIENTS = re.compile(r"^(?P<block>.+\.(self|cross)_attn)\.k_proj\.bias$")


def zero_gradient_scale(name: str, *tensors: Mapping[str, np.ndarray]) -> float | None:
    """The scale that :data:`ZERO_GRADIENTS` tensors are measured against: for a key
    projection's bias (``…self_attn.k_proj.bias``, its gradient, or an optimizer state of it,
    ``…k_proj.bias:exp_avg``), the largest magnitude of the same tensor of its attention block's
    ``q_proj`` / ``k_proj`` / ``v_proj`` / ``out_proj`` weights over the dicts ``tensors``;
    ``None`` for every other name (measured against its own magnitude)."""
    base, sep, key = name.partition(":")
    m = ZERO_GRADIENTS.match(base)
    if not m:
        return None
    sib = [f"{m['block']}.{p}.weight{sep}{key}" for p in ("q_proj", "k_proj", "v_proj",
                                                          "out_proj")]
    found = [float(np.abs(t[n]).max()) for t in tensors for n in sib if n in t]
    return max(found) if found else None


def compare_runs(a: RunResult, b: RunResult, tol: Tolerance) -> list[Diff]:
    """Every output and every gradient the two runs share, in canonical order."""
    diffs = [diff_tensors(a.label, b.label, f"output:{k}", a.outputs[k], b.outputs[k],
                          tol.output) for k in a.outputs if k in b.outputs]
    for k in a.grads:
        if k in b.grads:
            diffs.append(diff_tensors(a.label, b.label, f"grad:{k}", a.grads[k], b.grads[k],
                                      tol.grad, zero_gradient_scale(k, a.grads, b.grads)))
    return diffs


def json_number(x: float) -> float | None:
    """``x``, or ``None`` for NaN (JSON has no NaN)."""
    return None if math.isnan(x) else x
