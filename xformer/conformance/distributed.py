"""Data-parallel training against single-process training (issue #12): ``xformer compare
--train-steps N --nproc W``.

For every backend/mode target, :func:`run_distributed` runs ``xformer train --nproc W`` (the
framework's own engine, :mod:`xformer.distributed`) on the same starting checkpoint, data and
:class:`~xformer.training.TrainConfig` as the single-process run of
:func:`xformer.conformance.training.run_training`, and measures, with that module's error
measure and tolerances:

* each step's loss against the same target's single-process loss;
* the final parameters against the same target's single-process parameters;
* the final parameters against the first target's ``W``-worker run (backends agree when
  distributed too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import InputError
from ..training import TrainConfig
from .compare import json_number
from .training import TRAIN_TOLERANCES, _worst


@dataclass
class DistributedRow:
    """One target's ``W``-worker run: its engine, per-step losses, and the worst relative errors
    (with the tensor) against its single-process run and against the first target's ``W``-worker
    run."""

    target: str
    engine: str
    losses: list[float]
    loss_error: float
    param_error: float
    param_worst: str
    cross_error: float
    cross_worst: str
    seconds: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "engine": self.engine, "losses": self.losses,
                "loss_error": json_number(self.loss_error),
                "param_error": json_number(self.param_error), "param_worst": self.param_worst,
                "cross_error": json_number(self.cross_error), "cross_worst": self.cross_worst,
                "seconds": self.seconds, "ok": self.ok}


@dataclass
class DistributedReport:
    """Every target's ``nproc``-worker run against single-process training, one dtype."""

    dtype: str
    nproc: int
    steps: int
    tolerance: tuple[float, float]
    rows: list[DistributedRow] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "nproc": self.nproc, "steps": self.steps,
                "tolerance": {"loss": self.tolerance[0], "parameters": self.tolerance[1]},
                "ok": self.ok, "rows": [r.to_dict() for r in self.rows]}


def config_argv(config: TrainConfig) -> list[str]:
    """The ``xformer train`` options that give ``config`` (every field that has a flag;
    ``total_steps`` has none and must be ``None``)."""
    if config.total_steps is not None:
        raise InputError("a data-parallel comparison runs xformer train, which has no "
                         "total_steps option; leave total_steps unset")
    argv = ["--optimizer", config.optimizer, "--lr", repr(config.lr),
            "--betas", f"{config.betas[0]!r},{config.betas[1]!r}", "--eps", repr(config.eps),
            "--momentum", repr(config.momentum), "--weight-decay", repr(config.decay),
            "--schedule", config.schedule, "--warmup-steps", str(config.warmup_steps),
            "--batch-size", str(config.batch_size), "--grad-accum", str(config.grad_accum),
            "--dropout", config.dropout, "--seed", str(config.seed)]
    if config.nesterov:
        argv.append("--nesterov")
    if config.no_decay_bias_and_norm:
        argv.append("--no-decay-bias-norm")
    if config.clip_grad_norm is not None:
        argv += ["--clip-grad-norm", repr(config.clip_grad_norm)]
    return argv


def run_distributed(spec: Any, weights: Mapping[str, np.ndarray], data: Any,
                    config: TrainConfig, steps: int, targets: Sequence[Any], dtype: str,
                    nproc: int, single: Mapping[str, tuple[list[float], dict]],
                    progress: Callable[[str], None] | None = None) -> DistributedReport:
    """Run every target with ``nproc`` workers and compare (module docstring).

    Args:
        single: ``{target label: (per-step losses, final weights)}`` of the single-process
            run on the same inputs (:func:`xformer.conformance.training.run_training`).
        progress: called with each target's label when its run is done.
    Raises:
        InputError: a worker failed (its line), or a bad config (:func:`config_argv`).
    """
    import time

    from ..weights import load_weights, save_pretrained

    tol_loss, tol_param = TRAIN_TOLERANCES[dtype]
    report = DistributedReport(dtype, nproc, steps, (tol_loss, tol_param))
    base: dict[str, np.ndarray] | None = None
    with tempfile.TemporaryDirectory(prefix="xformer-dp-") as tmp:
        root = Path(tmp)
        save_pretrained(root / "start", spec, {k: np.asarray(v, dtype) for k, v in
                                               weights.items()})
        if isinstance(data, Mapping):
            np.savez(root / "data.npz", **data)
            data_path = root / "data.npz"
        else:
            np.save(root / "data.npy", np.asarray(data))
            data_path = root / "data.npy"
        for target in targets:
            out = root / f"out-{target.backend}-{target.mode}"
            argv = [sys.executable, "-m", "xformer", "train", "--model", str(root / "start"),
                    "--data", str(data_path), "--backend", target.backend, "--mode",
                    target.mode, "--steps", str(steps), "--dtype", dtype, "--nproc", str(nproc),
                    "--out", str(out), "--json", *config_argv(config)]
            start = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                lines = done.stderr.strip().splitlines() or ["(no output)"]
                raise InputError(f"{target.label} with {nproc} workers failed: {lines[-1]}")
            doc = json.loads(done.stdout)
            final = load_weights(out / "model.safetensors", spec)[1]
            losses = [s["loss"] for s in doc["steps"]]
            one_losses, one_final = single[target.label]
            loss_err = max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(losses, one_losses))
            param_err, param_worst = _worst(one_final, final)
            if base is None:
                base, cross_err, cross_worst = final, 0.0, ""
            else:
                cross_err, cross_worst = _worst(base, final)
            ok = bool(loss_err <= tol_loss and param_err <= tol_param
                      and cross_err <= tol_param)
            report.rows.append(DistributedRow(target.label, doc["engine"], losses, loss_err,
                                              param_err, param_worst, cross_err, cross_worst,
                                              round(seconds, 2), ok))
            if progress is not None:
                progress(target.label)
    return report
