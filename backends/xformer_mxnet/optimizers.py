"""MXNet's own training machinery with ``torch.optim`` semantics: ``mx.optimizer.Optimizer``
subclasses driven by a ``gluon.Trainer``, an ``mx.lr_scheduler.LRScheduler`` for the schedule,
and global-norm clipping (issue #10; the twin of ``xformer_torch.optimizers`` and
``xformer_tensorflow.optimizers``; the oracle is :mod:`xformer.training`).

:func:`make_optimizer` builds, for a :class:`xformer.training.TrainConfig`, a ``gluon.Trainer``
over the model's canonical ``Parameter`` s with one of the optimizers below and a
:class:`Schedule`. The training step (``xformer_mxnet.backend``) sums the micro-batch gradients,
calls ``trainer.allreduce_grads()`` (a no-op without a kvstore; in a data-parallel run the
``dist_sync`` kvstore's sum over the workers), clips with :func:`clip_grad_norm` and calls
``trainer.update(1)``: Gluon's recipe for clipping the reduced gradients.

What MXNet 1.9.1's own optimizers (``python/mxnet/optimizer/optimizer.py``) do, and why each is
replaced here (sizes measured in ``tests/test_train_mxnet.py``):

* ``mx.optimizer.SGD`` (``sgd_mom_update``) keeps the velocity ``mom = momentum * mom -
  lr * g`` and adds it to the weight: the learning rate is folded into the buffer, so under a
  schedule an old step's rate keeps acting (torch: ``buf = momentum * buf + g``, ``p -= lr *
  buf`` with today's rate), and with a warm-up the first step (rate 0) leaves an empty buffer
  where torch keeps ``g``. Over 4 steps of linear warm-up (rates 0, 1/4, 2/4, 3/4 of 0.1,
  momentum 0.9) the weights differ by 0.59 of the total update (``max|a - b| / max|b - p0|``).
  ``mx.optimizer.NAG`` (``nag_mom_update``) keeps an unscaled buffer for Nesterov momentum;
  :class:`SGD` covers both.
* ``mx.optimizer.Adam`` (``adam_update``) folds the bias corrections into the rate,
  ``lr * sqrt(1 - beta2^t) / (1 - beta1^t)``, and adds ``epsilon`` to the *uncorrected*
  ``sqrt(v)``: torch adds ``eps`` to ``sqrt(v) / sqrt(1 - beta2^t)``, so MXNet's ``epsilon``
  acts as torch's ``eps / sqrt(1 - beta2^t)`` (31.6 times torch's on step 1 with
  ``beta2=0.999``). With gradients of the size of ``eps`` (both 1e-3) its first update is ~10x
  smaller than torch's (off by 0.91 of torch's update); passing ``epsilon = eps * sqrt(1 -
  beta2^t)`` each step corrects the formula (then off by 4.6e-6 of an update: the operator's
  float32 parameters, below). Its ``wd`` is L2 added to the gradient, as torch's ``Adam``.
* MXNet 1.x has no AdamW optimizer; ``mx.nd.contrib.adamw_update`` decays by ``eta * wd``
  (not ``lr * wd``), applies no bias correction and puts ``epsilon`` on the uncorrected
  ``sqrt(v)``.
* Every fused ``*_update`` operator (``sgd_update``, ``sgd_mom_update``, ``nag_mom_update``,
  ``adam_update``) takes ``lr``, ``wd``, ``momentum``, ``epsilon`` as C++ ``float``: in a
  float64 model the rate is rounded to float32, 1.7e-9 relative error in one ``sgd_update``
  step (lr 1/30). So :class:`SGD`, :class:`Adam` and :class:`AdamW` update with plain
  ``mx.nd`` arithmetic in the weight's dtype (MXNet's scalar operators take a C++
  ``double``): float64 models train in float64 end to end, rate, eps and state included.
* ``gluon.Trainer.step(batch_size)`` / ``update(batch_size)`` set ``rescale_grad = 1 /
  batch_size``: the step calls ``update(1)`` with the mean loss (``rescale_grad`` exactly 1).
* ``Optimizer.set_wd_mult`` zeroes the decay of every parameter whose name does not end in
  ``_weight`` / ``_gamma`` when ``param_idx2name`` is given; a ``gluon.Trainer`` passes
  ``param_dict`` instead, whose ``Parameter.wd_mult`` (default 1) wins, so every parameter
  decays. :func:`make_optimizer` sets each ``wd_mult`` explicitly (0 only for the names
  ``config.decays`` excludes), so no earlier setting leaks into a run.
* ``gluon.utils.clip_global_norm`` divides by ``total + 1e-8`` (torch: ``1e-6``; the factors
  differ by ``~1e-6 / total`` relative, 2e-4 at a norm of 5e-3) and fails on float64 arrays
  (it concatenates a float32 ``ones(1)``): :func:`clip_grad_norm` follows
  ``torch.nn.utils.clip_grad_norm_`` in the gradients' dtype.
* ``Optimizer.num_update`` is 1 on the first update (``_update_count`` runs before
  ``_get_lr``): :class:`Schedule` gives update ``n`` the rate of optimizer step ``n - 1``, as a
  Hugging Face loop steps its ``LambdaLR`` after the optimizer.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from xformer import training

from .modules import mx

__all__ = ["Schedule", "SGD", "Adam", "AdamW", "make_optimizer", "clip_grad_norm",
           "global_norm"]


def _register(klass):
    """``mx.optimizer.register`` under ``"xformer_<class name>"``: MXNet keys its registry by the
    lower-cased class name, and ``SGD`` / ``Adam`` would replace MXNet's own ``"sgd"`` /
    ``"adam"`` for every ``mx.optimizer.create`` in the process (with a warning)."""
    mx.optimizer.Optimizer.opt_registry[f"xformer_{klass.__name__.lower()}"] = klass
    return klass


class Schedule(mx.lr_scheduler.LRScheduler):
    """The learning-rate schedules of ``transformers.optimization`` (``constant``, ``linear``,
    ``cosine``, each with linear warm-up: :func:`xformer.training.lr_factor`) as an MXNet
    ``LRScheduler``, what an ``Optimizer`` calls with its ``num_update``.

    ``num_update`` counts updates from 1 (``Optimizer._update_count`` runs before the rate is
    read), so update ``n`` gets ``base_lr * lr_factor(n - 1)``: optimizer step ``k`` (0-based)
    uses the rate of scheduler step ``k``, as ``torch.optim.lr_scheduler.LambdaLR`` stepped
    after the optimizer (the first warm-up update has rate 0). ``num_update`` 0 (before any
    update, e.g. ``Trainer.learning_rate``) reads step 0. The product ``base_lr * factor`` is
    the one of :func:`xformer.training.lr_at`, bit for bit. MXNet's own schedulers
    (``FactorScheduler``, ``PolyScheduler``, ``CosineScheduler``) warm up from
    ``warmup_begin_lr`` over ``num_update`` and decay to ``final_lr`` over
    ``max_update - warmup_steps``: a different indexing, hence this subclass.

    Args:
        base_lr: finite ``>= 0`` (``Optimizer`` overwrites it with its ``learning_rate`` if
            given one). schedule: ``"constant"``, ``"linear"``, ``"cosine"``.
        warmup_steps: ``>= 0``. total_steps: the run's length (``None`` only for ``constant``).
    Raises:
        InputError: as :func:`xformer.training.lr_factor` (checked once here).
    """

    def __init__(self, base_lr: float, schedule: str = "constant", warmup_steps: int = 0,
                 total_steps: int | None = None):
        training.lr_at(0, base_lr, schedule, warmup_steps, total_steps)  # the checks
        super().__init__(base_lr=float(base_lr))
        self.schedule, self.total_steps = schedule, total_steps
        self.warmup = int(warmup_steps)  # LRScheduler's own warmup_steps stays 0 (unused)

    @classmethod
    def from_config(cls, config: Any, steps: int) -> "Schedule":
        """The schedule of ``config`` in a run of ``steps`` optimizer steps
        (:meth:`xformer.training.TrainConfig.lr_at`)."""
        total = config.total_steps or steps
        return cls(config.lr, config.schedule, config.warmup_steps,
                   None if config.schedule == "constant" and config.total_steps is None
                   else total)

    def __call__(self, num_update: int) -> float:
        step = max(int(num_update) - 1, 0)
        return self.base_lr * training.lr_factor(step, self.schedule, self.warmup,
                                                 self.total_steps)


def _gradient(opt: mx.optimizer.Optimizer, grad):
    """``grad * rescale_grad``, clipped elementwise to ``clip_gradient`` if set (the
    ``Optimizer`` contract; ``gluon.Trainer.update(1)`` leaves ``rescale_grad`` at 1)."""
    g = grad * opt.rescale_grad
    if opt.clip_gradient is not None:
        g = mx.nd.clip(g, -opt.clip_gradient, opt.clip_gradient)
    return g


@_register
class SGD(mx.optimizer.Optimizer):
    """Stochastic gradient descent with momentum, ``torch.optim.SGD``'s update
    (``torch/optim/sgd.py``, ``_single_tensor_sgd``, dampening 0) as an MXNet optimizer::

        g = grad + wd * w                         (L2, coupled; wd = Optimizer.wd * wd_mult)
        buf = momentum * buf + g                  (buf starts at zeros: the first is g)
        g = g + momentum * buf  (nesterov)   or   g = buf  (momentum > 0)
        w = w - lr * g                            (lr: this update's scheduled rate)

    ``buf`` is torch's ``momentum_buffer`` (the state, ``None`` without momentum): the rate is
    applied when it is used, so a schedule changes only the current step (``mx.optimizer.SGD``
    keeps ``-lr * buf``). Plain ``mx.nd`` arithmetic in the weight's dtype (the fused operators
    round ``lr`` to float32). Dense weights only.

    Args:
        momentum: ``>= 0``. nesterov: Nesterov momentum (``mx.optimizer.NAG``'s update).
        **kwargs: ``mx.optimizer.Optimizer``'s (``learning_rate``, ``lr_scheduler``, ``wd``,
            ``rescale_grad``, ``clip_gradient``).
    Raises:
        ValueError: ``nesterov`` without momentum (torch raises too).
    """

    def __init__(self, momentum: float = 0.0, nesterov: bool = False, **kwargs):
        super().__init__(**kwargs)
        if nesterov and momentum <= 0:
            raise ValueError("nesterov requires momentum > 0 (dampening is 0)")
        self.momentum, self.nesterov = float(momentum), bool(nesterov)

    def create_state(self, index, weight):
        if self.momentum == 0.0:
            return None
        return mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype)

    def update(self, index, weight, grad, state):
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        g = _gradient(self, grad)
        if wd != 0:
            g = g + wd * weight
        if state is not None:
            state[:] = self.momentum * state + g
            g = g + self.momentum * state if self.nesterov else state
        weight[:] = weight - lr * g


@_register
class Adam(mx.optimizer.Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) as ``torch.optim.Adam`` computes it
    (``torch/optim/adam.py``, ``_single_tensor_adam``, no amsgrad), as an MXNet optimizer::

        g = grad + wd * w                         (L2 added to the gradient)
        t = this weight's update count            (Optimizer._index_update_count, from 1)
        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + epsilon)

    ``epsilon`` is added *after* the bias correction of ``sqrt(v)`` (torch's ``eps``;
    ``mx.optimizer.Adam`` adds it before, which is torch's ``eps * sqrt(1 - beta2^t)``). The
    state is ``(m, v)``, torch's ``exp_avg`` / ``exp_avg_sq``. :class:`AdamW` decays decoupled
    instead. Plain ``mx.nd`` arithmetic in the weight's dtype, in the oracle's operation order
    (``xformer.training.Adam``). Dense weights only.

    Args:
        learning_rate, beta1, beta2, epsilon: ``mx.optimizer.Adam``'s names and defaults.
        **kwargs: ``mx.optimizer.Optimizer``'s (``lr_scheduler``, ``wd``, ...).
    """

    #: Decoupled weight decay (:class:`AdamW`) instead of L2.
    decoupled = False

    def __init__(self, learning_rate: float = 0.001, beta1: float = 0.9, beta2: float = 0.999,
                 epsilon: float = 1e-8, **kwargs):
        super().__init__(learning_rate=learning_rate, **kwargs)
        self.beta1, self.beta2, self.epsilon = float(beta1), float(beta2), float(epsilon)

    def create_state(self, index, weight):
        return (mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype),   # m: exp_avg
                mx.nd.zeros(weight.shape, weight.context, dtype=weight.dtype))   # v: exp_avg_sq

    def update(self, index, weight, grad, state):
        self._update_count(index)
        lr, wd = self._get_lr(index), self._get_wd(index)
        t = self._index_update_count[index]
        beta1, beta2 = self.beta1, self.beta2
        g = _gradient(self, grad)
        if wd != 0:
            if self.decoupled:
                weight[:] = weight * (1 - lr * wd)
            else:
                g = g + wd * weight
        mean, var = state
        mean[:] = beta1 * mean + (1 - beta1) * g
        var[:] = beta2 * var + (1 - beta2) * (g * g)
        step_size = lr / (1 - beta1 ** t)
        denom = mx.nd.sqrt(var) / (1 - beta2 ** t) ** 0.5 + self.epsilon
        weight[:] = weight - step_size * (mean / denom)


@_register
class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) as ``torch.optim.AdamW``: decoupled decay
    ``w = w * (1 - lr * wd)`` first, ``lr`` this update's scheduled rate (torch's; not
    ``mx.nd.contrib.adamw_update``'s ``eta * wd``), then :class:`Adam`'s update with the
    undecayed gradient. MXNet 1.x has no AdamW optimizer. Args: as :class:`Adam`."""

    decoupled = True


#: ``TrainConfig.optimizer`` -> the optimizer class.
OPTIMIZERS = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(params: Mapping[str, Any], config: Any, steps: int,
                   kvstore: Any = None) -> mx.gluon.Trainer:
    """A ``gluon.Trainer`` over ``params`` with the optimizer and schedule of ``config``.

    Every parameter decays (``Parameter.wd_mult = 1``) except the names ``config.decays``
    excludes (``no_decay_bias_and_norm``: ``wd_mult = 0``, a torch param group with
    ``weight_decay=0``); the optimizer's ``wd`` is ``config.decay``.

    The optimizer always runs in this process (``update_on_kvstore=False``): without a kvstore
    (one context) the Trainer's updater applies it directly; with a ``dist_sync`` kvstore
    (data-parallel, :meth:`xformer_mxnet.backend.MXNetBackend._init_distributed`),
    ``trainer.allreduce_grads()`` replaces every gradient by its sum over the workers
    (``kvstore.pushpull``, parameter ``i`` under key ``i``; the first call broadcasts rank 0's
    weights) and every worker then updates its own copy with the same reduced gradient.
    ``update_on_kvstore=True`` would run the optimizer on the server, which would have to
    unpickle these classes (``KVStoreServer._controller``) and would apply the update before
    this process can clip the reduced gradients (``gluon/trainer.py``:
    ``allreduce_grads`` / ``update`` refuse it).

    Args:
        params: ``{canonical name: gluon.Parameter}``
            (:func:`xformer_mxnet.modules.canonical_parameters`; a tied table is one entry).
        config: a checked :class:`xformer.training.TrainConfig`.
        steps: the run's optimizer steps (the schedule's total unless ``config.total_steps``).
        kvstore: ``None`` (one process) or the run's ``dist_sync`` ``mx.kv.KVStore``.
    Returns:
        the ``gluon.Trainer``; its ``optimizer`` is :class:`SGD`, :class:`Adam` or
        :class:`AdamW` with a :class:`Schedule`. After a mean loss's backward pass:
        ``trainer.allreduce_grads()``, clipping, ``trainer.update(1)``.
    Raises:
        InputError: a config whose schedule does not fit ``steps``.
    """
    for name, param in params.items():
        param.wd_mult = 1.0 if config.decays(name) else 0.0
    schedule = Schedule.from_config(config, steps)
    common = dict(lr_scheduler=schedule, wd=config.decay, rescale_grad=1.0)
    if config.optimizer == "sgd":
        opt = SGD(momentum=config.momentum, nesterov=config.nesterov, **common)
    else:
        beta1, beta2 = config.betas
        opt = OPTIMIZERS[config.optimizer](learning_rate=None, beta1=beta1, beta2=beta2,
                                           epsilon=config.eps, **common)
    return mx.gluon.Trainer(list(params.values()), opt, kvstore=kvstore,
                            update_on_kvstore=False)


def global_norm(arrays: Sequence[Any]) -> float:
    """``||(||g_1||, ..., ||g_n||)||``: the L2 norm of the per-array L2 norms, computed with
    ``mx.nd.norm`` in the arrays' dtype (``torch.nn.utils.clip_grad_norm_``'s total, norm type
    2). A Python float; 0 for no arrays."""
    if not arrays:
        return 0.0
    norms = [mx.nd.norm(a).reshape((1,)) for a in arrays]
    return float(mx.nd.norm(mx.nd.concat(*norms, dim=0)).asscalar())


def clip_grad_norm(arrays: Sequence[Any], max_norm: float) -> float:
    """Clip gradients in place by their global L2 norm, ``torch.nn.utils.clip_grad_norm_``
    (``torch/nn/utils/clip_grad.py``): ``coef = min(max_norm / (total + 1e-6), 1)`` and every
    array multiplied by ``coef``, also when it is 1 (exact no-op). ``gluon.utils.
    clip_global_norm`` uses ``1e-8`` instead of ``1e-6``.

    Args:
        arrays: the gradient NDArrays (``param.grad()``), modified in place.
        max_norm: finite, ``> 0``.
    Returns:
        the total norm *before* clipping (:func:`global_norm`), a Python float.
    Raises:
        InputError: ``max_norm`` not a positive finite number.
    """
    limit = training._real("max_norm", max_norm, strict=True)
    total = global_norm(arrays)
    with np.errstate(divide="ignore", invalid="ignore"):
        coef = min(limit / (total + training.CLIP_EPS), 1.0)
    for a in arrays:
        a *= coef
    return total
