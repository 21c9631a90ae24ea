"""The PyTorch backend's training machinery: ``torch.optim`` itself, its ``LambdaLR`` schedule
and ``torch.nn.utils.clip_grad_norm_``, set up from an :class:`xformer.training.TrainConfig`.

One of three files of the same name (``xformer_tensorflow/optimizers.py``,
``xformer_mxnet/optimizers.py``) that build each framework's *own* optimizer for a run and
correct it where its semantics differ from ``torch.optim``'s, the contract of issue #10 written
out in numpy in :mod:`xformer.training` (:class:`~xformer.training.SGD`,
:class:`~xformer.training.Adam`, :class:`~xformer.training.AdamW`,
:func:`~xformer.training.lr_at`, :func:`~xformer.training.clip_grad_norm`).

What the native optimizer does, and what differs from the contract: **nothing**, here the
native optimizer *is* the contract, so there is no corrected ``SGD`` / ``Adam`` / ``AdamW``
subclass in this file:

* ``torch.optim.SGD(momentum, nesterov, dampening=0, weight_decay)`` (``torch/optim/sgd.py``):
  L2 decay added to the gradient, ``buf = momentum * buf + g`` (the buffer holds the gradient
  sum, not ``-lr * buf`` as Keras / MXNet keep it, so a scheduled ``lr`` applies to the whole
  step), ``g + momentum * buf`` with Nesterov.
* ``torch.optim.Adam`` (``torch/optim/adam.py``): L2 decay added to the gradient, ``eps`` after
  the bias correction of ``sqrt(v)``; ``torch.optim.AdamW``: the same with the decoupled decay
  ``p *= 1 - lr * wd`` first, at the scheduled ``lr``.
* every parameter decays unless ``config.no_decay_bias_and_norm`` puts biases and norm weights
  (:func:`xformer.training.no_decay_bias_and_norm` on the canonical name, which *is* the
  ``named_parameters`` name here) in a second param group with ``weight_decay=0``: torch has no
  naming rule of its own that skips parameters.
* the schedule is ``LambdaLR`` with :func:`xformer.training.lr_factor`, stepped *after*
  ``optimizer.step()`` (Hugging Face ``Trainer``): its constructor sets step 0's rate, so
  optimizer step ``k`` uses ``lr_at(k)``. Stepping it before the optimizer (a common slip,
  which torch warns about) uses ``lr_at(k + 1)`` at every step: with a 2-step warm-up the first
  update runs at ``lr / 2`` instead of 0 and the second at ``lr`` instead of ``lr / 2``
  (tests/test_train_torch.py measures it).
* the ``lr`` of a param group is a Python float and torch's optimizers do their scalar
  arithmetic (bias corrections, ``lr / (1 - beta1^t)``) in Python floats and the state in the
  parameters' dtype, so a float64 model trains in float64 end to end (the ``step`` counter is a
  float32 tensor holding an exact integer).

What remains is rounding: torch's single-tensor kernels order a few operations differently from
the numpy oracle (``exp_avg.lerp_(g, 1 - beta1)`` for ``beta1 m + (1 - beta1) g``,
``addcdiv_``). Measured after 10 float64 steps against :func:`xformer.training.oracle_train`
(gpt2-tiny, llama-tiny, vaswani-tiny; every optimizer x schedule; clipping, accumulation 2):
SGD parameters within 2e-15 relative; Adam / AdamW within 5e-12, most of it in ``k_proj.bias``
(see below) and, with a constant 1e-2 rate from the first step, up to 5e-11 in weights whose
gradients are near ``eps`` (``g / (sqrt(v) + eps)`` is most sensitive there); per-step losses
within 1e-15. tests/test_train_torch.py asserts 1e-10. The default
``foreach=None`` picks the single-tensor loop for CPU tensors and the multi-tensor (``foreach``)
kernels on CUDA, the same formulas batched (bit-identical to the loop in float64 on CPU,
measured; the ``fused`` kernels differ by ~3e-17 relative and are not used).

Two properties of the contract itself show in the tests, not torch deviations. Adam's
normalisation turns the ~1e-19 rounding noise of ``k_proj.bias``'s gradient (0 in exact
arithmetic: the softmax cancels a key bias) into updates ``lr * noise / (|noise| + eps)``, so
that tensor differs by ~1e-12 of its attention block's weights. And ``Adam`` with L2 decay on
such a parameter is unstable: while ``|wd * p| << eps`` each step multiplies ``p`` by about
``lr * wd / eps`` (1e4 at ``lr=1e-2, wd=0.01, eps=1e-8``), so ~1e-19 gradient rounding grows to steps of size
``lr`` whose signs any two implementations choose differently.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from xformer.errors import InputError
from xformer.training import TrainConfig, lr_factor

__all__ = ["make_optimizer", "make_schedule", "clip_grad_norm", "global_norm", "param_groups",
           "TorchTrainer", "make_trainer"]


def param_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], config: TrainConfig
                 ) -> list[dict[str, Any]]:
    """``torch.optim`` param groups for ``config``: one group with ``weight_decay =
    config.decay``, plus, when ``config.no_decay_bias_and_norm``, a group with
    ``weight_decay=0.0`` holding the parameters :meth:`TrainConfig.decays` excludes (Hugging Face
    ``Trainer.create_optimizer``'s two groups). The params are given as ``(name, parameter)``
    pairs, so torch keeps the canonical names in each group's ``"param_names"`` (and in the
    optimizer's ``state_dict``). Empty groups are left out.

    Args:
        named_parameters: ``model.named_parameters()`` (canonical names, a tied table once).
        config: the run.
    Raises:
        InputError: no parameters.
    """
    decayed: list[tuple[str, nn.Parameter]] = []
    kept: list[tuple[str, nn.Parameter]] = []
    for name, p in named_parameters:
        (decayed if config.decays(name) or config.decay == 0 else kept).append((name, p))
    groups = [{"params": part, "weight_decay": wd}
              for part, wd in ((decayed, config.decay), (kept, 0.0)) if part]
    if not groups:
        raise InputError("the model has no parameters to train")
    return groups


def make_optimizer(named_parameters: Iterable[tuple[str, nn.Parameter]],
                   config: TrainConfig) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of ``config``: ``SGD(lr, momentum, nesterov,
    dampening=0)``, ``Adam(lr, betas, eps)`` or ``AdamW(lr, betas, eps)``, weight decay per
    :func:`param_groups`. Its semantics are the contract (:mod:`xformer.training`); nothing is
    corrected.

    Args:
        named_parameters: ``model.named_parameters()``.
        config: a checked :class:`~xformer.training.TrainConfig`.
    Returns:
        the optimizer; every group's ``lr`` is ``config.lr`` until a schedule sets it.
    """
    groups = param_groups(named_parameters, config)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, dampening=0.0,
                               nesterov=config.nesterov)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps)


def _total(config: TrainConfig, steps: int) -> int | None:
    """The ``total_steps`` :meth:`TrainConfig.lr_at` passes to :func:`lr_factor`."""
    if config.schedule == "constant" and config.total_steps is None:
        return None
    return config.total_steps or steps


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig,
                  steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR(optimizer, lr_factor)`` for ``config``'s schedule in a run of ``steps``
    optimizer steps (``transformers.optimization.get_{constant,linear,cosine}_schedule_with_
    warmup`` build the same ``LambdaLR``). The constructor sets step 0's rate; call
    ``scheduler.step()`` after each ``optimizer.step()``, so that optimizer step ``k`` uses
    ``config.lr_at(k, steps)`` exactly (``base_lr * factor``, one float multiplication, as
    :func:`xformer.training.lr_at`).

    Raises:
        InputError: ``warmup_steps`` beyond the run (:meth:`TrainConfig.lr_at`).
    """
    config.lr_at(0, steps)
    factor = functools.partial(lr_factor, schedule=config.schedule,
                               warmup_steps=config.warmup_steps,
                               total_steps=_total(config, steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def global_norm(grads: Iterable[Tensor]) -> Tensor:
    """The global L2 norm of ``grads`` as ``clip_grad_norm_`` computes it (the norm of the
    per-tensor norms; ``torch.nn.utils.get_total_norm``), a 0-d tensor of their dtype; 0 for
    none."""
    grads = [g for g in grads if g is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=False)


def clip_grad_norm(parameters: Iterable[Tensor], max_norm: float | None) -> Tensor:
    """Clip the ``.grad`` of ``parameters`` in place by their global L2 norm,
    ``torch.nn.utils.clip_grad_norm_`` (``torch/nn/utils/clip_grad.py``): ``coef = max_norm /
    (total + 1e-6)`` clamped to 1, every gradient multiplied by it, also when it is 1 (as
    :func:`xformer.training.clip_grad_norm`). ``max_norm`` ``None``: nothing is clipped.

    Args:
        parameters: tensors whose ``.grad`` to clip (``None`` grads are skipped).
        max_norm: ``> 0`` or ``None``.
    Returns:
        the global norm *before* clipping, a 0-d tensor in the gradients' dtype.
    """
    params = [p for p in parameters if p.grad is not None]
    if max_norm is None:
        return global_norm(p.grad for p in params)
    return torch.nn.utils.clip_grad_norm_(params, float(max_norm), norm_type=2.0,
                                          foreach=False)


@dataclass
class TorchTrainer:
    """The native machinery of one run: the optimizer, its schedule, and the clip threshold
    (``None``: no clipping). What :meth:`TorchBackend._make_trainer` returns."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    clip: float | None
    #: ``DistributedDataParallel`` around the model in a data-parallel run, else ``None``.
    ddp: Any = None

    @property
    def lr(self) -> float:
        """The rate the next ``optimizer.step()`` uses (every group has the same)."""
        return float(self.optimizer.param_groups[0]["lr"])

    def state(self) -> dict[str, Tensor]:
        """``{"<canonical name>:<key>": tensor}`` for ``exp_avg``, ``exp_avg_sq`` and
        ``momentum_buffer`` (the tensors themselves, canonical layout = torch's)."""
        out = {}
        for group in self.optimizer.param_groups:
            for name, p in zip(group["param_names"], group["params"]):
                entry = self.optimizer.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq", "momentum_buffer"):
                    if entry.get(key) is not None:
                        out[f"{name}:{key}"] = entry[key]
        return out


def make_trainer(model: nn.Module, config: TrainConfig, steps: int) -> TorchTrainer:
    """:func:`make_optimizer` over ``model.named_parameters()`` and :func:`make_schedule`."""
    optimizer = make_optimizer(model.named_parameters(), config)
    return TorchTrainer(optimizer, make_schedule(optimizer, config, steps), config.clip_grad_norm)
