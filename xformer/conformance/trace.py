"""Divergence localisation (``xformer diff``): trace two runs node by node and find the first
node where they differ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..backend import get_backend
from ..spec import ModelSpec
from ..weights import check_weights
from .case import TOLERANCES, Case
from .compare import diff_tensors, json_number


@dataclass(frozen=True)
class NodeDiff:
    """The difference at one node between two traced runs (``direction``: ``forward`` is the
    node's output, ``backward`` the gradient flowing into it)."""

    name: str
    kind: str
    direction: str
    max_abs: float
    max_rel: float
    tol: float
    where: tuple[int, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "direction": self.direction,
                "max_abs": json_number(self.max_abs), "max_rel": json_number(self.max_rel),
                "tol": self.tol, "ok": self.ok, "where": list(self.where), "note": self.note}


@dataclass
class NodeTrace:
    """One traced run: node outputs and the gradients flowing into them."""

    label: str
    spec: ModelSpec
    forward: dict[str, np.ndarray]
    backward: dict[str, np.ndarray]


def trace_run(spec: ModelSpec, weights: Mapping[str, np.ndarray], case: Case, backend: str
              ) -> NodeTrace:
    """Build ``spec`` on ``backend`` with ``weights`` (cast to ``case.dtype``) and trace
    ``case``'s inputs and cotangents through it (:meth:`Backend.trace`)."""
    be = get_backend(backend)
    model = be.build(spec, case.dtype)
    be.set_weights(model, {k: np.asarray(v).astype(case.dtype) for k, v in
                           check_weights(spec, weights).items()})
    fwd, bwd = be.trace(model, case.inputs, case.cotangents)
    return NodeTrace(be.name, spec, fwd, bwd)


def diff_traces(a: NodeTrace, b: NodeTrace, dtype: str) -> list[NodeDiff]:
    """Per node, in side ``a``'s execution order: forward rows, then backward rows in reverse
    execution order (the order backpropagation visits them). A node only one side has, or a
    shape mismatch, is a row with ``max_rel = nan`` (not ok) and a note."""
    tol = TOLERANCES[dtype]
    kinds = dict(a.spec.nodes())
    kinds.update({n: k for n, k in b.spec.nodes() if n not in kinds})
    order = [n for n, _ in a.spec.nodes()] + [n for n, _ in b.spec.nodes()
                                                if n not in dict(a.spec.nodes())]
    rows = []
    for direction, names, t in (("forward", order, tol.output),
                                ("backward", order[::-1], tol.grad)):
        sa, sb = getattr(a, direction), getattr(b, direction)
        for name in names:
            if name not in sa or name not in sb:
                side = a.label if name in sa else b.label
                rows.append(NodeDiff(name, kinds[name], direction, math.nan, math.nan, t,
                                     note=f"only in {side}"))
                continue
            d = diff_tensors(a.label, b.label, name, sa[name], sb[name], t)
            note = "" if d.tensor == name else d.tensor[len(name):].strip()
            rows.append(NodeDiff(name, kinds[name], direction, d.max_abs, d.max_rel, t,
                                 d.where, note))
    return rows


def first_divergence(rows: Sequence[NodeDiff]) -> NodeDiff | None:
    """The first row past its tolerance (forward rows come first), or ``None``."""
    return next((r for r in rows if not r.ok), None)
