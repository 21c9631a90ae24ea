"""Running a case on (backend, mode) targets and a reference, and the verdict: :class:`Target`,
:func:`run_target`, :func:`run_case` and its :class:`Report`."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..backend import available_backends, get_backend, is_installed, timed
from .case import TOLERANCES, Case, RunResult
from .compare import Diff, compare_runs, json_number
from .references import run_reference


@dataclass(frozen=True)
class Target:
    """A (backend, mode) pair; ``label`` is ``"backend/mode"``."""

    backend: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.mode}"

    @classmethod
    def parse(cls, text: str) -> "Target":
        backend, _, mode = text.partition("/")
        be = get_backend(backend)
        return cls(be.name, be.check_mode(mode or None))


def default_targets(backends: Iterable[str] | None = None, all_modes: bool = False
                    ) -> list[Target]:
    """Every default mode (or every mode) of each named backend (default: every installed)."""
    names = list(backends) if backends else [b for b in available_backends() if is_installed(b)]
    out = []
    for name in names:
        be = get_backend(name)
        out += [Target(be.name, m) for m in (be.modes if all_modes else be.default_modes)]
    return out


def run_target(case: Case, target: Target, repeats: int = 0) -> RunResult:
    """Build ``case.spec`` on ``target``, load the weights, and run forward and forward+backward.

    ``repeats > 0`` also times each call (median of ``repeats`` after one warm-up call).
    """
    be = get_backend(target.backend)
    model = be.build(case.spec, case.dtype)
    be.set_weights(model, case.weights)
    if repeats > 0:
        outputs, fwd = timed(be.forward, model, case.inputs, mode=target.mode, repeats=repeats)
        (_, grads), step = timed(be.forward_backward, model, case.inputs, case.cotangents,
                                 mode=target.mode, repeats=repeats)
    else:
        outputs = be.forward(model, case.inputs, mode=target.mode)
        _, grads = be.forward_backward(model, case.inputs, case.cotangents, mode=target.mode)
        fwd = step = float("nan")
    return RunResult(target.label, outputs, grads, fwd, step)


@dataclass
class Report:
    """Results of one case: every run, every pairwise and reference diff, and the verdict."""

    case: Case
    runs: list[RunResult]
    reference: RunResult | None
    diffs: list[Diff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def failures(self) -> list[Diff]:
        return [d for d in self.diffs if not d.ok]

    def worst(self, a: str | None = None, b: str | None = None, kind: str | None = None
              ) -> Diff | None:
        """The largest ``max_rel / tol`` among diffs that involve ``a`` (and ``b``) and whose
        tensor starts with ``kind`` (``"output"`` / ``"grad"``); NaN counts as worst."""
        sel = [d for d in self.diffs
               if (a is None or a in (d.a, d.b)) and (b is None or b in (d.a, d.b))
               and (kind is None or d.tensor.startswith(kind))]
        if not sel:
            return None
        return max(sel, key=lambda d: math.inf if math.isnan(d.max_rel) else d.max_rel / d.tol)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name, "dtype": self.case.dtype, "spec": self.case.spec.to_dict(),
            "ok": self.ok,
            "tolerance": vars(TOLERANCES[self.case.dtype]),
            "reference": self.reference.label if self.reference else None,
            "reference_run": ({"forward_ms": _ms(self.reference.forward_s),
                               "forward_backward_ms": _ms(self.reference.step_s)}
                              if self.reference else None),
            "runs": [{"label": r.label, "forward_ms": _ms(r.forward_s),
                      "forward_backward_ms": _ms(r.step_s)} for r in self.runs],
            "diffs": [{"a": d.a, "b": d.b, "tensor": d.tensor, "max_abs": json_number(d.max_abs),
                       "max_rel": json_number(d.max_rel), "tol": d.tol, "where": list(d.where),
                       "ok": d.ok} for d in self.diffs],
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)


def run_case(case: Case, targets: Sequence[Target], reference: str | None = "numpy",
             repeats: int = 0, progress: Callable[[str], None] | None = None) -> Report:
    """Run ``case`` on every target and on ``reference`` (``None`` for none); compare every
    pair of targets and every target against the reference. ``progress(label)`` is called
    after each run (for a progress bar)."""
    tol = TOLERANCES[case.dtype]
    runs = []
    for t in targets:
        runs.append(run_target(case, t, repeats))
        if progress:
            progress(t.label)
    ref = run_reference(case, reference, repeats) if reference else None
    if ref is not None and progress:
        progress(ref.label)
    diffs: list[Diff] = []
    for a, b in itertools.combinations(runs, 2):
        diffs += compare_runs(a, b, tol)
    if ref is not None:
        for r in runs:
            diffs += compare_runs(r, ref, tol)
    return Report(case, runs, ref, diffs)
