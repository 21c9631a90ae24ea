"""Training conformance: the same optimizer steps on every (backend, mode) target, in lockstep,
compared after every step (issue #10; docs/training.md).

Every target builds the spec, loads the same canonical weights and gets the same micro-batches
(:func:`xformer.training.micro_batches`); with ``spec.dropout > 0`` every target consumes the
same framework-neutral dropout stream (:func:`xformer.training.dropout_masks`). After each
optimizer step the parameters and the optimizer state of every target are compared with the
first target's (the baseline), tensor by tensor, with :func:`~xformer.conformance.compare
.diff_tensors`' measure (``max|a - b| / max(max|a|, max|b|)``); a key projection's bias, whose
gradient is zero in exact arithmetic (:data:`~xformer.conformance.compare.ZERO_GRADIENTS`), and
its optimizer state are measured against the largest magnitude of the attention block's
projection weights (resp. their state), so its rounding noise, amplified by Adam's
normalisation, does not read as a divergence. The targets run in lockstep, so memory holds one
model per target and the first diverging step and tensor are known as soon as they happen.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..backend import get_backend
from ..training import StepLog, TrainConfig, _count, check_data, micro_batches, objective
from .compare import diff_tensors, json_number, zero_gradient_scale
from .run import Target

#: ``{dtype: (loss, parameters and optimizer state)}`` relative bounds between targets after
#: every step (issue #10: float64 1e-10 for the parameters after 10 steps; float32 1e-5 for
#: every step's loss and 1e-4 for the parameters).
TRAIN_TOLERANCES = {"float64": (1e-10, 1e-10), "float32": (1e-5, 1e-4)}


@dataclass
class StepRow:
    """One step of a training comparison: each target's loss and learning rate, and the worst
    relative error against the baseline of the loss, the parameters and the optimizer state
    (after the step), with the tensor and target where the worst parameter or state error is."""

    step: int
    losses: dict[str, float]
    lr: float
    loss_error: float
    param_error: float
    state_error: float
    worst: str
    worst_target: str
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "losses": {k: json_number(v) for k, v in self.losses.items()},
                "lr": self.lr, "loss_error": json_number(self.loss_error),
                "param_error": json_number(self.param_error),
                "state_error": json_number(self.state_error), "worst": self.worst,
                "worst_target": self.worst_target, "ok": self.ok}


@dataclass
class TrainReport:
    """A training comparison: the run's settings, one :class:`StepRow` per step, the verdict
    and the first divergence (``None`` when every step stayed within tolerance)."""

    name: str
    dtype: str
    targets: list[str]
    config: TrainConfig
    steps: int
    tolerance: tuple[float, float]
    rows: list[StepRow] = field(default_factory=list)
    #: ``{target label: (per-step losses, final weights)}`` (not in :meth:`to_dict`).
    final: dict[str, tuple[list[float], dict[str, np.ndarray]]] = field(
        default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def first_divergence(self) -> StepRow | None:
        return next((r for r in self.rows if not r.ok), None)

    def to_dict(self) -> dict[str, Any]:
        first = self.first_divergence
        return {"name": self.name, "dtype": self.dtype, "targets": self.targets,
                "config": self.config.to_dict(), "steps": self.steps,
                "tolerance": {"loss": self.tolerance[0], "parameters": self.tolerance[1]},
                "ok": self.ok, "rows": [r.to_dict() for r in self.rows],
                "first_divergence": None if first is None else {
                    "step": first.step, "tensor": first.worst, "target": first.worst_target}}


def _worst(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> tuple[float, str]:
    """``(worst relative error, its tensor)`` over the names of ``a`` (``b`` must have them)."""
    worst, where = 0.0, ""
    for name in a:
        if name not in b:
            return float("nan"), f"{name} (missing)"
        d = diff_tensors("a", "b", name, a[name], b[name], 0.0, zero_gradient_scale(name, a, b))
        err = d.max_rel
        if not err <= worst:  # NaN wins
            worst, where = err, name
            if np.isnan(err):
                break
    return worst, where


def run_training(spec: Any, weights: Mapping[str, np.ndarray], data: Any, config: TrainConfig,
                 steps: int, targets: Sequence[Target], dtype: str = "float64",
                 name: str = "", progress: Callable[[int], None] | None = None
                 ) -> TrainReport:
    """Train ``spec`` from ``weights`` for ``steps`` optimizer steps on every target in
    lockstep and compare each step with the first target.

    Args:
        data: :func:`xformer.training.check_data`'s input. config: the run (its ``dropout``
            becomes ``"stream"`` when ``spec.dropout > 0``: native dropout cannot agree).
        targets: at least one; the first is the baseline.
        progress: called with each finished step.
    Raises:
        InputError: bad data, config or steps, a spec without a training objective.
    """
    objective(spec)
    steps = _count("steps", steps, 1)
    rows_data = check_data(spec, data)
    if spec.dropout and config.dropout != "stream":
        config = dataclasses.replace(config, dropout="stream")
    config.lr_at(0, steps)
    tol_loss, tol_param = TRAIN_TOLERANCES[dtype]
    runs = []
    for t in targets:
        be = get_backend(t.backend)
        model = be.build(spec, dtype)
        be.set_weights(model, weights)
        runs.append((t, be, model, be.make_trainer(model, config, steps)))
    report = TrainReport(name, dtype, [t.label for t in targets], config, steps,
                         (tol_loss, tol_param))
    for step in range(steps):
        micro = micro_batches(spec, rows_data, config, step)
        logs: dict[str, StepLog] = {}
        params, states = {}, {}
        for t, be, model, trainer in runs:
            logs[t.label] = be.train_step(model, trainer, micro, step, t.mode)
            params[t.label] = be.get_weights(model)
            states[t.label] = be.optimizer_state(model, trainer)
        base = targets[0].label
        base_loss = logs[base].loss
        errors = {"loss": 0.0, "param": 0.0, "state": 0.0}
        worst, worst_ratio = ("", ""), -1.0
        for label in report.targets[1:]:
            le = abs(logs[label].loss - base_loss) / max(abs(base_loss), 1e-300)
            pe, pw = _worst(params[base], params[label])
            if set(states[label]) != set(states[base]):
                se, sw = float("nan"), "optimizer state names differ"
            else:
                se, sw = _worst(states[base], states[label])
            for kind, err, tensor, tol in (("loss", le, "loss", tol_loss),
                                           ("param", pe, pw, tol_param),
                                           ("state", se, sw, tol_param)):
                if not err <= errors[kind]:
                    errors[kind] = err
                ratio = np.inf if np.isnan(err) else err / tol
                if ratio > worst_ratio:
                    worst, worst_ratio = (tensor, label), ratio
        loss_err, param_err, state_err = errors["loss"], errors["param"], errors["state"]
        ok = bool(loss_err <= tol_loss and param_err <= tol_param and state_err <= tol_param)
        worst, worst_target = worst
        report.rows.append(StepRow(step, {k: v.loss for k, v in logs.items()},
                                   logs[base].lr, loss_err, param_err, state_err, worst,
                                   worst_target, ok))
        if progress is not None:
            progress(step)
    for t, be, model, _ in runs:
        report.final[t.label] = ([r.losses[t.label] for r in report.rows],
                                 be.get_weights(model))
    return report


def random_token_rows(spec: Any, rows: int, length: int, seed: int = 0) -> Any:
    """Seeded random training data for ``spec``: ``(rows, length)`` int64 token rows for a
    decoder, ``{"source", "target"}`` for an encoder-decoder (both ``(rows, length)``)."""
    rng = np.random.default_rng(seed)
    length = min(length, spec.max_len)
    draw = lambda: rng.integers(0, spec.vocab_size, (rows, length), dtype=np.int64)  # noqa: E731
    if spec.architecture == "encoder-decoder":
        return {"source": draw(), "target": draw()}
    return draw()
