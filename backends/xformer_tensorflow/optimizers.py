"""Keras optimizers with ``torch.optim`` semantics: the native training machinery of the
TensorFlow backend (issue #10; the oracle is :mod:`xformer.training`).

:func:`make_optimizer` builds a ``keras.optimizers`` optimizer for a
:class:`~xformer.training.TrainConfig`, its learning rate a :class:`Schedule` (a
``keras.optimizers.schedules.LearningRateSchedule``), and :func:`clip_grad_norm` clips by global
norm. Keras' own optimizers differ from ``torch.optim`` in five ways; each is corrected here by a
subclass that overrides ``update_step`` (the hook every Keras optimizer implements; AdamW also
``_apply_weight_decay``) and nothing else of the update loop (``apply``, ``iterations``,
``exclude_from_weight_decay`` stay Keras'). Sizes measured in float64 over 10 steps of
gradients ~1e-3 on a (64, 32) variable, as ``max|native - torch|`` over the size of torch's
whole update (``tests/test_train_tensorflow.py``, ``test_native_keras_differs_...``); the
corrected subclasses: 0 to 1e-12.

* **Adam's epsilon** (``keras/src/optimizers/adam.py``, ``Adam.update_step``): Keras computes
  ``p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)``, eps on the *uncorrected*
  ``sqrt(v)`` (the paper's "epsilon hat", §2); torch (``torch/optim/adam.py``,
  ``_single_tensor_adam``) adds eps after the bias correction, ``m_hat / (sqrt(v_hat) + eps)``.
  Keras' eps is thus ``1 / sqrt(1 - b2^t)`` times larger (31.6x at step 1 with b2 = 0.999):
  5.4e-2 with eps 1e-8 (the elements with the smallest gradients move least; with gradients
  ~1 it is 1.2e-4). Keras' default ``epsilon`` is also 1e-7, not torch's 1e-8 (the config's
  is passed).
* **weight_decay** is *decoupled* on every Keras optimizer (``BaseOptimizer._apply_weight_decay``:
  ``p -= p * wd * lr`` before the update); ``torch.optim.SGD`` / ``Adam`` add ``wd * p`` to the
  gradient (L2). :class:`SGD` and :class:`Adam` turn the decoupled step off and add the L2 term
  in ``update_step`` (still honouring ``exclude_from_weight_decay``): Keras' Adam with
  ``weight_decay=0.01`` is 1.75 (175 %) off torch's Adam. :class:`AdamW` keeps a decoupled
  step, torch's ``p * (1 - lr * wd)`` with the scheduled ``lr``.
* **SGD momentum** (``keras/src/optimizers/sgd.py``): Keras keeps a velocity
  ``v = mu v - lr g`` and adds it (nesterov: ``p += mu v - lr g``); torch keeps
  ``buf = mu buf + g`` and subtracts ``lr * buf`` (nesterov: ``lr * (g + mu buf)``). They agree
  while ``lr`` is constant and differ as soon as it changes: under a linear warm-up of 2 steps
  the first step's rate 0 is baked into Keras' velocity: 0.62 off (nesterov 0.52). The
  corrected :class:`SGD` stores torch's ``buf`` (``momentum_buffer``).
* **the learning rate's dtype**: a float ``learning_rate`` becomes a ``floatx()`` (float32)
  Keras variable, cast to the variable dtype in ``update_step``: a float64 model trains at
  ``float32(lr)``: 6.4e-8 off with lr 0.05. :class:`Schedule` computes the rate in float64
  from the int64 ``iterations`` (also for ``"constant"``).
* **the hyperparameters' dtype**: Keras writes ``ops.cast(self.beta_1, variable.dtype)``
  (also ``momentum``, and ``tf.cast(self.weight_decay, ...)`` in the TensorFlow
  ``_apply_weight_decay``), which converts the Python float to float32 first: a float64 model
  gets ``float64(float32(0.999))``. Keras' Adam with eps 0 (only this difference left) is
  6.6e-6 off. The subclasses convert straight to the variable dtype (:func:`_const`).

Also: Keras' ``m += (g - m)(1 - b1)`` is torch's ``exp_avg.lerp_(g, 1 - b1)``; the subclasses
write torch's ``b1 m + (1 - b1) g`` / ``b2 v + (1 - b2) g^2`` as :mod:`xformer.training` does.
The optimizer state reads back in torch's names with :func:`torch_state`.

Data-parallel (issue #12): under a ``tf.distribute`` strategy Keras' TensorFlow optimizer
(``keras/src/backend/tensorflow/optimizer.py``, ``TFOptimizer._backend_update_step``) sums the
gradients over the replicas itself, inside ``apply`` and so *after* any clipping: torch's global
norm needs the reduced gradients first. ``make_optimizer(..., reduced_gradients=True)`` makes
``apply`` take gradients that the caller has already all-reduced (and clipped) and skips that
second sum (:class:`_PreReduced`); ``apply`` then runs in the replica context, where the
assignments to the mirrored variables (aggregation ``"none"``, Keras' default) update this
replica's copy with the same value on every worker.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import keras
from keras import ops

from xformer.training import CLIP_EPS, SCHEDULES

__all__ = ["Schedule", "SGD", "Adam", "AdamW", "make_optimizer", "clip_grad_norm",
           "global_norm", "torch_state"]

_PACKAGE = "xformer"


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Schedule(keras.optimizers.schedules.LearningRateSchedule):
    """The ``transformers.optimization`` schedules with warm-up, as a Keras
    ``LearningRateSchedule``: ``lr(step) = base_lr * factor(step)``
    (:func:`xformer.training.lr_factor`): ``step / max(1, warmup)`` during the warm-up, then
    ``1`` (``"constant"``, ``get_constant_schedule_with_warmup``),
    ``max(0, (total - step) / max(1, total - warmup))`` (``"linear"``,
    ``get_linear_schedule_with_warmup``) or ``max(0, 0.5 (1 + cos(2 pi num_cycles progress)))``
    (``"cosine"``, ``get_cosine_schedule_with_warmup``).

    Keras calls it with the optimizer's ``iterations`` (int64, the number of updates done), so
    update ``k`` (0-based) uses ``lr(k)``: torch's ``LambdaLR`` stepped after the optimizer.
    Computed in ``dtype`` (float64 by default, whatever the model: integer arithmetic first,
    then the same operations in the same order as the Python float code), so a float64 model
    gets its rate without a float32 rounding; ``update_step`` casts it to the variable dtype.

    Args:
        base_lr: finite ``>= 0``. schedule: ``"constant"``, ``"linear"`` or ``"cosine"``.
        warmup_steps: ``>= 0``. total_steps: ``>= 1``, required unless ``"constant"``.
        num_cycles: cosine periods (0.5: one half-wave). dtype: of the returned rate.
    Raises:
        ValueError: an unknown schedule or a missing ``total_steps`` (a
            :class:`~xformer.training.TrainConfig` has checked them already).
    """

    def __init__(self, base_lr: float, schedule: str = "constant", warmup_steps: int = 0,
                 total_steps: int | None = None, num_cycles: float = 0.5,
                 dtype: str = "float64"):
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if schedule != "constant" and total_steps is None:
            raise ValueError(f"the {schedule} schedule needs total_steps")
        self.base_lr, self.schedule = float(base_lr), schedule
        self.warmup_steps, self.total_steps = int(warmup_steps), total_steps
        self.num_cycles, self.dtype = float(num_cycles), dtype

    def __call__(self, step):
        dt = self.dtype
        step = ops.cast(step, "int64")
        warmup = self.warmup_steps
        f = lambda v: ops.convert_to_tensor(v, dtype=dt)  # noqa: E731
        if self.schedule == "constant":
            after = f(1.0)
        else:
            total = self.total_steps
            span = f(float(max(1, total - warmup)))
            if self.schedule == "linear":
                after = ops.maximum(f(0.0), ops.cast(total - step, dt) / span)
            else:
                progress = ops.cast(step - warmup, dt) / span
                angle = f(math.pi * self.num_cycles * 2.0) * progress
                after = ops.maximum(f(0.0), f(0.5) * (f(1.0) + ops.cos(angle)))
        if warmup > 0:
            during = ops.cast(step, dt) / f(float(max(1, warmup)))
            after = ops.where(step < warmup, during, after)
        return f(self.base_lr) * after

    def get_config(self):
        return {"base_lr": self.base_lr, "schedule": self.schedule,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "num_cycles": self.num_cycles, "dtype": self.dtype}


def _const(value, dtype):
    """A Python number as a tensor of ``dtype`` directly. Not ``ops.cast(value, dtype)``, what
    Keras' own optimizers write: that converts to ``floatx()`` (float32) first, so a float64
    model would get ``float64(float32(0.9))`` as its momentum (module docstring)."""
    return ops.convert_to_tensor(value, dtype=dtype)


class _PreReduced:
    """Mixin: with ``reduced_gradients`` true, ``apply`` in a ``tf.distribute`` replica
    context takes gradients already summed over the replicas (the xformer data-parallel step
    all-reduces, then clips by the global norm), so Keras' own all-reduce
    (``TFOptimizer._all_reduce_sum_gradients``) passes them through instead of summing them a
    second time. False (the default): Keras' behaviour, unchanged."""

    #: Whether the gradients given to ``apply`` are already reduced over the replicas.
    reduced_gradients = False

    def _all_reduce_sum_gradients(self, grads_and_vars):
        if self.reduced_gradients:
            return list(grads_and_vars)
        return super()._all_reduce_sum_gradients(grads_and_vars)


class _L2:
    """Mixin: ``weight_decay`` is torch's L2 term ``g + wd * p`` in ``update_step``, not Keras'
    decoupled step (``_apply_weight_decay`` does nothing); ``exclude_from_weight_decay`` still
    selects the variables without it."""

    def _apply_weight_decay(self, variables):
        return None

    def _l2(self, gradient, variable):
        if self.weight_decay and self._use_weight_decay(variable):
            return gradient + _const(self.weight_decay, variable.dtype) * variable
        return gradient


@keras.saving.register_keras_serializable(package=_PACKAGE)
class SGD(_PreReduced, _L2, keras.optimizers.SGD):
    """``keras.optimizers.SGD`` with ``torch.optim.SGD`` semantics (``torch/optim/sgd.py``,
    ``_single_tensor_sgd``, dampening 0)::

        g = grad + wd * p                         (L2, unless excluded)
        buf = mu * buf + g                        (buf starts at 0: the first step gives g)
        p = p - lr * (g + mu * buf)  (nesterov)   or   p = p - lr * buf

    Keras' own SGD stores the velocity ``mu v - lr g`` instead, which is wrong when ``lr``
    changes between steps (module docstring). The ``"momentum"`` variables hold torch's
    ``momentum_buffer``. Args: as ``keras.optimizers.SGD``; ``weight_decay`` is L2.
    """

    def update_step(self, gradient, variable, learning_rate):
        lr = ops.cast(learning_rate, variable.dtype)
        g = self._l2(ops.cast(gradient, variable.dtype), variable)
        if self.momentum != 0:
            mu = _const(self.momentum, variable.dtype)
            buf = self.momentums[self._get_variable_index(variable)]
            self.assign(buf, mu * buf + g)
            g = g + mu * buf if self.nesterov else ops.convert_to_tensor(buf)
        self.assign_sub(variable, lr * g)

    def torch_state(self, variable) -> dict[str, Any]:
        """``{"momentum_buffer": tensor}`` of ``variable`` (``{}`` without momentum)."""
        if self.momentum == 0:
            return {}
        return {"momentum_buffer": self.momentums[self._get_variable_index(variable)]}


class _TorchAdam:
    """Mixin: Adam's update as ``torch.optim.Adam`` computes it (``_single_tensor_adam``)::

        t = iterations + 1
        m = b1 m + (1 - b1) g;   v = b2 v + (1 - b2) g^2
        p = p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    (eps after the bias correction). ``_momentums`` / ``_velocities`` (Keras' ``"momentum"`` /
    ``"velocity"`` variables) hold ``exp_avg`` / ``exp_avg_sq``."""

    def _adam(self, g, variable, learning_rate):
        dt = variable.dtype
        c = lambda v: _const(v, dt)  # noqa: E731
        lr = ops.cast(learning_rate, dt)
        t = ops.cast(self.iterations + 1, dt)
        b1, b2 = c(self.beta_1), c(self.beta_2)
        i = self._get_variable_index(variable)
        m, v = self._momentums[i], self._velocities[i]
        self.assign(m, b1 * m + (c(1.0) - b1) * g)
        self.assign(v, b2 * v + (c(1.0) - b2) * (g * g))
        step_size = lr / (c(1.0) - ops.power(b1, t))
        denom = ops.sqrt(v) / ops.sqrt(c(1.0) - ops.power(b2, t)) + c(self.epsilon)
        self.assign_sub(variable, step_size * (m / denom))

    def torch_state(self, variable) -> dict[str, Any]:
        """``{"exp_avg": m, "exp_avg_sq": v}`` of ``variable``."""
        i = self._get_variable_index(variable)
        return {"exp_avg": self._momentums[i], "exp_avg_sq": self._velocities[i]}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Adam(_PreReduced, _L2, _TorchAdam, keras.optimizers.Adam):
    """``keras.optimizers.Adam`` with ``torch.optim.Adam`` semantics: eps after the bias
    correction and ``weight_decay`` as L2 on the gradient (module docstring; no amsgrad).
    Args: as ``keras.optimizers.Adam``."""

    def update_step(self, gradient, variable, learning_rate):
        g = self._l2(ops.cast(gradient, variable.dtype), variable)
        self._adam(g, variable, learning_rate)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class AdamW(_PreReduced, _TorchAdam, keras.optimizers.AdamW):
    """``keras.optimizers.AdamW`` with ``torch.optim.AdamW`` semantics: Keras' decoupled decay
    ``p -= p * wd * lr`` (the scheduled ``lr``, before the update, skipping
    ``exclude_from_weight_decay``'s variables) as torch's ``p *= 1 - lr * wd``, then the Adam
    update with eps after the bias correction. Args: as ``keras.optimizers.AdamW``."""

    def _apply_weight_decay(self, variables):
        """``p = p * (1 - lr * wd)`` (``torch/optim/adamw.py``) for every variable not in
        ``exclude_from_weight_decay``, ``wd`` in the variable dtype (Keras' own step casts it
        through float32)."""
        if not self.weight_decay:
            return
        for variable in variables:
            if self._use_weight_decay(variable):
                dt = variable.dtype
                lr = ops.cast(self.learning_rate, dt)
                self.assign(variable, variable * (_const(1.0, dt) - lr * _const(
                    self.weight_decay, dt)))

    def update_step(self, gradient, variable, learning_rate):
        self._adam(ops.cast(gradient, variable.dtype), variable, learning_rate)


def make_optimizer(config: Any, steps: int, variables: Mapping[str, Any],
                   dtype: str = "float64", reduced_gradients: bool = False
                   ) -> keras.optimizers.Optimizer:
    """The Keras optimizer of a training run, built on ``variables``.

    Args:
        config: a checked :class:`~xformer.training.TrainConfig` (``optimizer``, ``lr``,
            ``betas``, ``eps``, ``momentum``, ``nesterov``, ``weight_decay``,
            ``no_decay_bias_and_norm``, the schedule).
        steps: the run's optimizer steps (the schedule's ``total_steps`` unless the config
            sets it).
        variables: ``{canonical name: keras.Variable}`` in canonical order (the optimizer
            state is created in this order); names with ``config.decays(name)`` false are
            passed to ``exclude_from_weight_decay``.
        dtype: the model dtype; the schedule computes in float64 either way.
        reduced_gradients: data-parallel: ``apply`` gets gradients already summed over the
            replicas, Keras does not sum them again (:class:`_PreReduced`). Create the
            optimizer under the strategy's ``scope()`` then (its state is mirrored).
    Returns:
        a built :class:`SGD`, :class:`Adam` or :class:`AdamW` whose ``learning_rate`` is a
        :class:`Schedule`. No clipping option is set: clip with :func:`clip_grad_norm` first.
    """
    total = config.total_steps or steps
    schedule = Schedule(config.lr, config.schedule, config.warmup_steps,
                        None if config.schedule == "constant" and config.total_steps is None
                        else total, dtype="float64")
    decay = config.decay
    if config.optimizer == "sgd":
        opt = SGD(learning_rate=schedule, momentum=float(config.momentum),
                  nesterov=bool(config.nesterov), weight_decay=decay or None)
    else:
        cls = Adam if config.optimizer == "adam" else AdamW
        kwargs = {"weight_decay": decay} if cls is AdamW else {"weight_decay": decay or None}
        opt = cls(learning_rate=schedule, beta_1=float(config.betas[0]),
                  beta_2=float(config.betas[1]), epsilon=float(config.eps), **kwargs)
    opt.reduced_gradients = bool(reduced_gradients)
    excluded = [var for name, var in variables.items() if not config.decays(name)]
    opt.exclude_from_weight_decay(var_list=excluded)
    opt.build(list(variables.values()))
    return opt


def global_norm(grads: Sequence[Any]):
    """``||(||g_1||, ..., ||g_n||)||``, the norm of the per-tensor L2 norms
    (``torch.nn.utils.clip_grad_norm_``'s ``total_norm`` with ``norm_type=2``), a scalar tensor
    in the gradients' dtype."""
    norms = ops.stack([ops.sqrt(ops.sum(g * g)) for g in grads])
    return ops.sqrt(ops.sum(norms * norms))


def clip_grad_norm(grads: Sequence[Any], max_norm: float):
    """Clip by global norm with ``torch.nn.utils.clip_grad_norm_`` semantics
    (``torch/nn/utils/clip_grad.py``): ``coef = min(max_norm / (total + 1e-6), 1)``, every
    gradient multiplied by ``coef`` (also when it is 1). Unlike ``tf.clip_by_global_norm`` /
    Keras' ``global_clipnorm`` (``g * max_norm / max(total, max_norm)``) there is the ``1e-6``
    and the product happens always.

    Args:
        grads: dense gradient tensors of one dtype. max_norm: ``> 0``.
    Returns:
        ``(clipped list, total norm before clipping)``.
    """
    total = global_norm(grads)
    dt = total.dtype
    coef = ops.minimum(ops.convert_to_tensor(max_norm, dt) / (total + ops.convert_to_tensor(
        CLIP_EPS, dt)), ops.convert_to_tensor(1.0, dt))
    return [g * coef for g in grads], total


def torch_state(optimizer: Any, variable: Any) -> dict[str, Any]:
    """The optimizer state of ``variable`` in ``torch.optim``'s names (``exp_avg``,
    ``exp_avg_sq``, ``momentum_buffer``), Keras tensors in the variable's layout."""
    return optimizer.torch_state(variable)
