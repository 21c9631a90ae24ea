"""A framework-free numpy statement of one training step: the oracle of issue #10.

What :mod:`xformer.reference` is to the forward pass, this module is to training: every
objective, learning-rate schedule, optimizer update, clipping and accumulation rule that the
backends implement with their own machinery (``torch.optim``, ``keras.optimizers``, Gluon
``Trainer``) is written here once, in numpy, with the exact semantics of the upstream code it
follows, so that per-backend training can be compared against it tensor by tensor. It imports
no framework (tests/test_layering.py); tests/test_training_reference.py checks it against
``torch.optim``, ``torch.nn.functional.cross_entropy`` and ``transformers``.

Semantics, and the source each follows:

* objectives (Hugging Face ``transformers/loss/loss_utils.py``): cross-entropy averaged over the
  positions whose label is not ``-100`` (``ignore_index``); causal LM shifts (position ``t``
  predicts label ``t + 1``, ``ForCausalLMLoss``), seq2seq does not (the decoder input is the
  labels shifted right, ``shift_tokens_right``), masked LM scores only the positions
  :func:`mask_tokens` selected (BERT's 80/10/10 rule, ``DataCollatorForLanguageModeling``).
  Each loss has a ``*_grad``: ``d loss / d logits``, ``(softmax - onehot) / N`` at scored
  positions, ``0`` elsewhere. Everything is computed in the logits' dtype (Hugging Face upcasts
  the logits to float32 first; here the caller chooses the dtype).
* schedules (``transformers.optimization``): ``lr(step) = base_lr * factor(step)`` as
  ``torch.optim.lr_scheduler.LambdaLR`` applies it; optimizer step ``k`` (0-based) uses
  ``lr_at(k)`` (the scheduler is stepped after the optimizer), so with a warm-up the first
  update has learning rate ``0``.
* optimizers (``torch/optim/sgd.py``, ``adam.py``, single-tensor path): :class:`SGD`,
  :class:`Adam` (L2 weight decay added to the gradient), :class:`AdamW` (decoupled decay).
* :func:`clip_grad_norm` (``torch.nn.utils.clip_grad_norm_``) and :func:`accumulate`
  (Hugging Face ``Trainer``: each micro-batch loss divided by the number of micro-batches).

Parameters, gradients and optimizer state are ``{canonical name: np.ndarray}`` dicts, so they
compare across backends by name. Bad arguments raise :class:`xformer.errors.InputError` with one
line that names the argument.
"""

from __future__ import annotations

import math
import numbers
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError, truncate

#: The label value the objectives skip (Hugging Face / ``torch.nn.CrossEntropyLoss`` default).
IGNORE_INDEX = -100
#: Names accepted by :func:`lr_at`.
SCHEDULES = ("constant", "linear", "cosine")
#: ``clip_grad_norm_``'s guard against division by zero (``torch/nn/utils/clip_grad.py``).
CLIP_EPS = 1e-6


# --------------------------------------------------------------------------- argument checks

def _real(name: str, value: Any, *, minimum: float = 0.0, below: float | None = None,
          strict: bool = False) -> float:
    """``value`` as a finite Python float ``>= minimum`` (``> minimum`` if ``strict``) and
    ``< below``; :class:`InputError` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InputError(f"{name} must be a real number, got {truncate(value)}")
    out = float(value)
    low_ok = out > minimum if strict else out >= minimum
    if not math.isfinite(out) or not low_ok or (below is not None and not out < below):
        rng = f"{'>' if strict else '>='} {minimum:g}" + (f" and < {below:g}" if below else "")
        raise InputError(f"{name} must be a finite number {rng}, got {truncate(value)}")
    return out


def _count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as a Python int ``>= minimum``; :class:`InputError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"{name} must be an integer, got {truncate(value)}")
    if int(value) < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {int(value)}")
    return int(value)


def _int_array(name: str, value: Any, ndim: int | None = 2) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "iu":
        raise InputError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise InputError(f"{name} must have {ndim} dimensions (batch, time), got shape "
                         f"{arr.shape}")
    return arr


def _logits_labels(logits: Any, labels: Any, ignore_index: int) -> tuple[np.ndarray, np.ndarray]:
    """Checked ``(logits (B, T, V) float, labels (B, T) int64)``."""
    x = np.asarray(logits)
    if x.dtype.kind != "f":
        raise InputError(f"logits must be a floating-point array, got dtype {x.dtype}")
    if x.ndim != 3 or x.shape[-1] < 1:
        raise InputError(f"logits must have shape (batch, time, vocab), got {x.shape}")
    y = _int_array("labels", labels).astype(np.int64, copy=False)
    if y.shape != x.shape[:2]:
        raise InputError(f"labels must have shape {x.shape[:2]} (the logits' batch, time), got "
                         f"{y.shape}")
    vocab = x.shape[-1]
    bad = (y != ignore_index) & ((y < 0) | (y >= vocab))
    if bad.any():
        first = int(y[bad].flat[0])
        raise InputError(f"labels must lie in [0, {vocab}) or be {ignore_index}; got {first} "
                         f"({int(bad.sum())} out of range)")
    return x, y


# --------------------------------------------------------------------------- objectives

def _log_softmax_parts(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(x - max, log sum exp(x - max))``: the stable log-sum-exp, in ``x``'s dtype."""
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted, np.log(np.exp(shifted).sum(axis=-1))


def _cross_entropy(x: np.ndarray, y: np.ndarray, ignore_index: int) -> np.floating:
    """Mean of ``logsumexp(x[i]) - x[i, y[i]]`` over positions with ``y != ignore_index``
    (``torch.nn.functional.cross_entropy(reduction="mean", ignore_index=...)``); ``nan`` when
    no position is scored (``0 / 0``, as torch gives)."""
    t = x.dtype.type
    keep = y != ignore_index
    shifted, lse = _log_softmax_parts(x)
    picked = np.take_along_axis(shifted, np.where(keep, y, 0)[..., None], axis=-1)[..., 0]
    total = (lse - picked)[keep].sum(dtype=x.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        return t(total / t(keep.sum()))


def _cross_entropy_grad(x: np.ndarray, y: np.ndarray, ignore_index: int) -> np.ndarray:
    """``d _cross_entropy / d x``: ``(softmax(x) - onehot(y)) / N`` at the ``N`` scored
    positions, ``0`` at ignored ones (all zeros when none is scored)."""
    t = x.dtype.type
    keep = y != ignore_index
    shifted, lse = _log_softmax_parts(x)
    grad = np.exp(shifted - lse[..., None])
    idx = np.nonzero(keep)
    grad[idx + (y[idx],)] -= t(1)
    count = int(keep.sum())
    grad *= (keep / t(max(count, 1))).astype(x.dtype)[..., None]
    return grad


def causal_lm_loss(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> np.floating:
    """Causal language-modelling loss: ``logits[:, t]`` predicts ``labels[:, t + 1]``.

    Hugging Face ``ForCausalLMLoss`` (``transformers/loss/loss_utils.py``; the older inline
    ``GPT2LMHeadModel`` code): ``cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index)``
    with reduction ``mean`` over the positions whose shifted label is not ``ignore_index``; the
    last position predicts nothing. Stable log-sum-exp, computed in the logits' dtype (Hugging
    Face upcasts to float32 first: ``logits.float()``, which *lowers* float64 logits).

    Args:
        logits: ``(B, T, V)`` float array (float32 or float64).
        labels: ``(B, T)`` integer array, the input ids with ``ignore_index`` at positions not
            to score (:func:`labels_from_inputs`); values in ``[0, V)`` or ``ignore_index``.
        ignore_index: the label value to skip.
    Returns:
        a numpy scalar of the logits' dtype; ``nan`` when no position is scored (as torch).
    Raises:
        InputError: non-float logits, wrong shapes, non-integer or out-of-vocabulary labels.
    """
    x, y = _logits_labels(logits, labels, ignore_index)
    return _cross_entropy(x[:, :-1], y[:, 1:], ignore_index)


def causal_lm_loss_grad(logits: Any, labels: Any,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``d causal_lm_loss / d logits``: ``(B, T, V)`` in the logits' dtype; row ``t < T - 1`` is
    ``(softmax(logits[:, t]) - onehot(labels[:, t + 1])) / N`` where scored (``N`` scored
    positions), ``0`` where ignored and at ``t = T - 1``. Raises as :func:`causal_lm_loss`.
    All positions ignored gives zeros (the loss is ``nan``; torch's backward gives zeros too)."""
    x, y = _logits_labels(logits, labels, ignore_index)
    grad = np.zeros_like(x)
    grad[:, :-1] = _cross_entropy_grad(x[:, :-1], y[:, 1:], ignore_index)
    return grad


def labels_from_inputs(input_ids: Any, attention_mask: Any = None,
                       ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Causal-LM labels: the ``input_ids`` with ``ignore_index`` where ``attention_mask == 0``
    (padding is never scored; Hugging Face ``DataCollatorForLanguageModeling(mlm=False)`` does
    it by pad id, which also hides a real token equal to the pad id: the mask does not).

    Args:
        input_ids: ``(B, T)`` integer array. attention_mask: ``(B, T)`` 0/1 array, or ``None``
            (everything is a token).
    Returns:
        ``(B, T)`` int64, a new array (the shift happens in :func:`causal_lm_loss`).
    Raises:
        InputError: non-integer ids, or a mask of another shape or with values other than 0/1.
    """
    ids = _int_array("input_ids", input_ids)
    labels = ids.astype(np.int64, copy=True)
    if attention_mask is not None:
        mask = np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise InputError(f"attention_mask must have the shape of input_ids {ids.shape}, got "
                             f"{mask.shape}")
        if mask.dtype.kind not in "biuf" or not np.isin(mask, (0, 1)).all():
            raise InputError("attention_mask must hold only 0 and 1")
        labels[mask == 0] = ignore_index
    return labels


def shift_tokens_right(labels: Any, decoder_start_token_id: int, pad_token_id: int) -> np.ndarray:
    """Teacher-forcing decoder inputs: ``labels`` shifted one position right, the start token
    first, and ``-100`` replaced by ``pad_token_id`` (Hugging Face
    ``transformers.models.bart.modeling_bart.shift_tokens_right``).

    Args:
        labels: ``(B, T)`` integer array (``-100`` allowed). decoder_start_token_id,
            pad_token_id: non-negative ints.
    Returns:
        ``(B, T)`` int64 ``decoder_input_ids``.
    Raises:
        InputError: non-integer labels or token ids.
    """
    y = _int_array("labels", labels)
    start = _count("decoder_start_token_id", decoder_start_token_id)
    pad = _count("pad_token_id", pad_token_id)
    out = np.zeros(y.shape, dtype=np.int64)
    out[:, 1:] = y[:, :-1]
    out[:, 0] = start
    out[out == IGNORE_INDEX] = pad
    return out


def seq2seq_lm_loss(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> np.floating:
    """Teacher-forced encoder-decoder loss: ``logits[:, t]`` (the decoder fed
    ``shift_tokens_right(labels)``) predicts ``labels[:, t]``; no shift here. Mean cross-entropy
    over labels ``!= ignore_index`` (Hugging Face ``BartForConditionalGeneration`` /
    ``T5ForConditionalGeneration``: ``CrossEntropyLoss()(logits.view(-1, V), labels.view(-1))``).

    Args / Returns / Raises: as :func:`causal_lm_loss` (``logits`` ``(B, T, V)``, ``labels``
    ``(B, T)``, a scalar of the logits' dtype).
    """
    x, y = _logits_labels(logits, labels, ignore_index)
    return _cross_entropy(x, y, ignore_index)


def seq2seq_lm_loss_grad(logits: Any, labels: Any,
                         ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``d seq2seq_lm_loss / d logits``, ``(B, T, V)`` in the logits' dtype:
    ``(softmax - onehot(labels)) / N`` at scored positions, ``0`` elsewhere."""
    x, y = _logits_labels(logits, labels, ignore_index)
    return _cross_entropy_grad(x, y, ignore_index)


def mask_tokens(input_ids: Any, vocab_size: int, mask_token_id: int, rng_seed: int,
                mlm_probability: float = 0.15, *,
                special_tokens_mask: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masked-LM corruption (Devlin et al. 2019 §3.1, "80/10/10"), with the semantics of
    Hugging Face ``DataCollatorForLanguageModeling.torch_mask_tokens``, drawn from a seeded numpy
    ``Generator`` so that every backend trains on the same masks.

    Each position not in ``special_tokens_mask`` is selected with probability
    ``mlm_probability``; a selected position becomes ``mask_token_id`` with probability 0.8,
    else a uniformly random id in ``[0, vocab_size)`` with probability 0.5 (0.1 overall; the
    random id may equal the original), else stays unchanged. Labels are the original ids at
    selected positions and ``-100`` elsewhere. The draws, in this order and always of the full
    shape (so the stream depends on the shape only): ``rng = np.random.default_rng(rng_seed)``;
    ``selected = rng.random(shape) < mlm_probability``; ``replaced = rng.random(shape) < 0.8``;
    ``randomised = rng.random(shape) < 0.5``; ``words = rng.integers(0, vocab_size, shape)``.

    Args:
        input_ids: ``(B, T)`` integer array, values in ``[0, vocab_size)``.
        vocab_size: ``V >= 1``. mask_token_id: in ``[0, V)``. rng_seed: a non-negative int.
        mlm_probability: in ``[0, 1]``.
        special_tokens_mask: ``(B, T)`` bool array or ``None``; ``True`` positions (``[CLS]``,
            ``[SEP]``, padding) are never selected, as the collator's special-tokens mask.
    Returns:
        ``(masked_input_ids, labels)``, both ``(B, T)`` int64, new arrays.
    Raises:
        InputError: any argument out of its range, or ids outside the vocabulary.
    """
    vocab = _count("vocab_size", vocab_size, 1)
    mask_id = _count("mask_token_id", mask_token_id)
    if mask_id >= vocab:
        raise InputError(f"mask_token_id must be < vocab_size {vocab}, got {mask_id}")
    seed = _count("rng_seed", rng_seed)
    prob = _real("mlm_probability", mlm_probability)
    if prob > 1.0:
        raise InputError(f"mlm_probability must be in [0, 1], got {prob:g}")
    ids = _int_array("input_ids", input_ids).astype(np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise InputError(f"input_ids must lie in [0, {vocab}), got values in "
                         f"[{ids.min()}, {ids.max()}]")
    rng = np.random.default_rng(seed)
    selected = rng.random(ids.shape) < prob
    if special_tokens_mask is not None:
        special = np.asarray(special_tokens_mask)
        if special.shape != ids.shape or special.dtype.kind not in "biu":
            raise InputError(f"special_tokens_mask must be a bool array of shape {ids.shape}, "
                             f"got {special.dtype} {special.shape}")
        selected &= ~special.astype(bool)
    replaced = (rng.random(ids.shape) < 0.8) & selected
    randomised = (rng.random(ids.shape) < 0.5) & selected & ~replaced
    words = rng.integers(0, vocab, ids.shape, dtype=np.int64)
    labels = np.where(selected, ids, IGNORE_INDEX)
    masked = ids.copy()
    masked[replaced] = mask_id
    masked[randomised] = words[randomised]
    return masked, labels


def masked_lm_loss(logits: Any, labels: Any, ignore_index: int = IGNORE_INDEX) -> np.floating:
    """Masked-LM loss: mean cross-entropy of ``logits[:, t]`` against ``labels[:, t]`` over the
    positions :func:`mask_tokens` selected (labels ``!= ignore_index``); no shift (Hugging Face
    ``ForMaskedLMLoss`` / ``BertForMaskedLM``). Args / Returns / Raises: as
    :func:`seq2seq_lm_loss`."""
    x, y = _logits_labels(logits, labels, ignore_index)
    return _cross_entropy(x, y, ignore_index)


def masked_lm_loss_grad(logits: Any, labels: Any,
                        ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """``d masked_lm_loss / d logits``, ``(B, T, V)`` in the logits' dtype (as
    :func:`seq2seq_lm_loss_grad`)."""
    x, y = _logits_labels(logits, labels, ignore_index)
    return _cross_entropy_grad(x, y, ignore_index)


# --------------------------------------------------------------------------- schedules

def lr_factor(step: int, schedule: str = "constant", warmup_steps: int = 0,
              total_steps: int | None = None, num_cycles: float = 0.5) -> float:
    """The multiplier of the base learning rate at scheduler step ``step`` (Python float).

    ``transformers.optimization``: during warm-up (``step < warmup_steps``) all three give
    ``step / max(1, warmup_steps)``; then ``"constant"`` gives ``1``
    (``get_constant_schedule_with_warmup``), ``"linear"`` gives
    ``max(0, (total - step) / max(1, total - warmup))`` (``get_linear_schedule_with_warmup``),
    ``"cosine"`` gives ``max(0, 0.5 (1 + cos(pi * num_cycles * 2 * progress)))`` with
    ``progress = (step - warmup) / max(1, total - warmup)`` (``get_cosine_schedule_with_warmup``;
    past ``total_steps`` it rises again, as upstream). Raises as :func:`lr_at`.
    """
    if not isinstance(schedule, str) or schedule not in SCHEDULES:
        raise InputError(f"schedule must be one of {', '.join(SCHEDULES)}, got "
                         f"{truncate(schedule)}")
    step = _count("step", step)
    warmup = _count("warmup_steps", warmup_steps)
    if schedule != "constant" and total_steps is None:
        raise InputError(f"total_steps is required by the {schedule} schedule")
    if total_steps is not None:
        total = _count("total_steps", total_steps, 1)
        if warmup > total:
            raise InputError(f"warmup_steps must be <= total_steps {total}, got {warmup}")
    cycles = _real("num_cycles", num_cycles)
    if step < warmup:
        return float(step) / float(max(1, warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    progress = float(step - warmup) / float(max(1, total - warmup))
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * float(cycles) * 2.0 * progress)))


def lr_at(step: int, base_lr: float, schedule: str = "constant", warmup_steps: int = 0,
          total_steps: int | None = None, num_cycles: float = 0.5) -> float:
    """The learning rate of scheduler step ``step``: ``base_lr * lr_factor(...)``, exactly as
    ``torch.optim.lr_scheduler.LambdaLR.get_lr`` multiplies it.

    A Hugging Face loop calls ``optimizer.step()`` and then ``scheduler.step()``, so optimizer
    step ``k`` (0-based) uses ``lr_at(k, ...)``: the scheduler's constructor already set the
    step-0 rate, which is ``0`` when ``warmup_steps > 0`` (the first update does nothing but
    fill the optimizer state).

    Args:
        step: scheduler step, ``>= 0``. base_lr: finite, ``>= 0``.
        schedule: ``"constant"``, ``"linear"`` or ``"cosine"`` (:func:`lr_factor`).
        warmup_steps: ``>= 0`` and ``<= total_steps``. total_steps: ``>= 1``; required by
            ``"linear"`` and ``"cosine"``. num_cycles: cosine periods (0.5: one half-wave).
    Returns:
        a Python float.
    Raises:
        InputError: a negative or non-finite learning rate, an unknown schedule, a negative
            step, ``warmup_steps > total_steps``, a missing ``total_steps``.
    """
    lr = _real("lr", base_lr)
    return lr * lr_factor(step, schedule, warmup_steps, total_steps, num_cycles)


# --------------------------------------------------------------------------- optimizers

def no_decay_bias_and_norm(name: str) -> bool:
    """``True`` for the parameters BERT (and Hugging Face ``Trainer.get_decay_parameter_names``)
    exclude from weight decay: biases and every parameter of a norm layer, by canonical name
    (``*.bias``, ``*norm*.weight``: ``embeddings.norm.weight``, ``decoder.final_norm.weight``,
    ``encoder.layers.0.norm1.weight``)."""
    parts = name.split(".")
    return parts[-1] == "bias" or (len(parts) > 1 and "norm" in parts[-2])


def _float_dict(label: str, value: Any) -> dict[str, np.ndarray | None]:
    if not isinstance(value, Mapping):
        raise InputError(f"{label} must be a mapping of parameter name to array, got "
                         f"{type(value).__name__}")
    out = {}
    for name, arr in value.items():
        if arr is None:
            out[name] = None
            continue
        a = np.asarray(arr)
        if a.dtype.kind != "f":
            raise InputError(f"{label}[{name!r}] must be a floating-point array, got {a.dtype}")
        out[name] = a
    return out


def _check_pair(params: Any, grads: Any) -> tuple[dict, dict]:
    """Checked ``(params, grads)``: ``grads`` names a subset of ``params``, same shape and
    dtype each; a missing or ``None`` gradient means "no update" (torch skips ``grad is None``).
    """
    p = _float_dict("params", params)
    g = _float_dict("grads", grads)
    extra = [n for n in g if n not in p]
    if extra:
        raise InputError(f"grads has {len(extra)} names that params lacks, e.g. {extra[0]!r}")
    for name, grad in g.items():
        if grad is None:
            continue
        if p[name] is None:
            raise InputError(f"params[{name!r}] is None but has a gradient")
        if grad.shape != p[name].shape or grad.dtype != p[name].dtype:
            raise InputError(f"grads[{name!r}] must match its parameter {p[name].dtype} "
                             f"{p[name].shape}, got {grad.dtype} {grad.shape}")
    return p, g


class Optimizer:
    """Shared parts of :class:`SGD`, :class:`Adam`, :class:`AdamW`: the base learning rate,
    the weight decay and which names it skips, and ``state`` (``{name: {...}}``, filled on a
    name's first update, as ``torch.optim.Optimizer.state``).

    Args:
        lr: base learning rate, finite ``>= 0`` (``step`` may override it per step).
        weight_decay: finite ``>= 0``.
        no_decay: ``None`` (decay everything) or a predicate ``name -> bool``; ``True`` names
            get weight decay 0 (a torch param group with ``weight_decay=0``), e.g.
            :func:`no_decay_bias_and_norm`.
    Raises:
        InputError: an argument out of range.
    """

    name = ""

    def __init__(self, lr: float, weight_decay: float = 0.0,
                 no_decay: Callable[[str], bool] | None = None) -> None:
        self.lr = _real("lr", lr)
        self.weight_decay = _real("weight_decay", weight_decay)
        if no_decay is not None and not callable(no_decay):
            raise InputError(f"no_decay must be a predicate on parameter names or None, got "
                             f"{truncate(no_decay)}")
        self.no_decay = no_decay
        self.state: dict[str, dict[str, Any]] = {}

    def decay_of(self, name: str) -> float:
        """The weight decay applied to parameter ``name``."""
        return 0.0 if self.no_decay is not None and self.no_decay(name) else self.weight_decay

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray | None],
             lr: float | None = None) -> dict[str, np.ndarray]:
        """One update. ``params`` / ``grads``: ``{name: float array}``, same shape and dtype per
        name (``grads`` may omit names or give ``None``: those parameters are not updated and
        their state is untouched). ``lr``: this step's rate (:func:`lr_at`), default the base
        rate. Returns new arrays (inputs are not modified; unchanged ones are copies) and
        advances ``state``. Raises :class:`InputError` on mismatched names, shapes, dtypes or a
        negative ``lr``."""
        p, g = _check_pair(params, grads)
        rate = self.lr if lr is None else _real("lr", lr)
        out = {}
        for name, value in p.items():
            grad = g.get(name)
            if value is None or grad is None:
                out[name] = None if value is None else value.copy()
                continue
            out[name] = self._update(name, value.copy(), grad, rate, self.decay_of(name))
        return out

    def _update(self, name: str, p: np.ndarray, g: np.ndarray, lr: float,
                wd: float) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class SGD(Optimizer):
    """Stochastic gradient descent with momentum, ``torch.optim.SGD`` (``torch/optim/sgd.py``,
    ``_single_tensor_sgd``, dampening 0, not maximising)::

        g = grad + wd * p                              (L2, coupled)
        buf = g (first step), else buf = momentum * buf + g
        g = g + momentum * buf  (nesterov)  or  g = buf  (momentum != 0)
        p = p - lr * g

    ``state[name] = {"momentum_buffer": buf}`` (``None`` when ``momentum == 0``, as torch).

    Raises:
        InputError: negative ``lr``, ``momentum`` or ``weight_decay``; ``nesterov`` without
            momentum (torch raises too).
    """

    name = "sgd"

    def __init__(self, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0, no_decay: Callable[[str], bool] | None = None):
        super().__init__(lr, weight_decay, no_decay)
        self.momentum = _real("momentum", momentum)
        self.nesterov = bool(nesterov)
        if self.nesterov and self.momentum == 0:
            raise InputError("nesterov requires momentum > 0 (dampening is 0)")

    def _update(self, name, p, g, lr, wd):
        if wd != 0:
            g = g + wd * p
        entry = self.state.setdefault(name, {"momentum_buffer": None})
        if self.momentum != 0:
            buf = entry["momentum_buffer"]
            buf = g.copy() if buf is None else self.momentum * buf + g
            entry["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p - lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015, Algorithm 1) as ``torch.optim.Adam`` computes it
    (``torch/optim/adam.py``, ``_single_tensor_adam``, no amsgrad)::

        g = grad + wd * p                              (L2 added to the gradient)
        t += 1
        m = beta1 m + (1 - beta1) g;   v = beta2 v + (1 - beta2) g^2
        p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    ``eps`` is added *after* the bias correction of ``v`` (the paper's ``eps`` on
    ``sqrt(v_hat)``; Keras's ``epsilon`` is on the uncorrected ``sqrt(v)``: the "epsilon hat" of
    the paper's §2). ``state[name] = {"exp_avg": m, "exp_avg_sq": v, "step": t}`` (``t`` an int;
    torch keeps a float tensor).

    Args:
        lr: base rate (default 1e-3). betas: ``(beta1, beta2)``, each in ``[0, 1)``.
        eps: ``>= 0``. weight_decay, no_decay: as :class:`Optimizer`.
    Raises:
        InputError: an argument out of range.
    """

    name = "adam"
    decoupled = False

    def __init__(self, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 no_decay: Callable[[str], bool] | None = None):
        super().__init__(lr, weight_decay, no_decay)
        if not isinstance(betas, Sequence) or len(betas) != 2:
            raise InputError(f"betas must be a pair (beta1, beta2), got {truncate(betas)}")
        self.betas = (_real("betas[0]", betas[0], below=1.0),
                      _real("betas[1]", betas[1], below=1.0))
        self.eps = _real("eps", eps)

    def _update(self, name, p, g, lr, wd):
        beta1, beta2 = self.betas
        if wd != 0:
            if self.decoupled:
                p = p * (1 - lr * wd)
            else:
                g = g + wd * p
        entry = self.state.get(name)
        if entry is None:
            entry = self.state[name] = {"exp_avg": np.zeros_like(p),
                                        "exp_avg_sq": np.zeros_like(p), "step": 0}
        entry["step"] += 1
        t = entry["step"]
        entry["exp_avg"] = m = beta1 * entry["exp_avg"] + (1 - beta1) * g
        entry["exp_avg_sq"] = v = beta2 * entry["exp_avg_sq"] + (1 - beta2) * (g * g)
        step_size = lr / (1 - beta1 ** t)
        denom = np.sqrt(v) / (1 - beta2 ** t) ** 0.5 + self.eps
        return p - step_size * (m / denom)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019, Algorithm 2) as ``torch.optim.AdamW``: decoupled weight
    decay ``p = p * (1 - lr * wd)`` first (``lr`` the scheduled rate, as torch: not
    ``lr * wd / base_lr``), then the :class:`Adam` update with the undecayed gradient. Default
    ``weight_decay`` 0.01 (torch's); every parameter decays unless ``no_decay`` says otherwise
    (:func:`no_decay_bias_and_norm` for BERT's choice). Args / Raises: as :class:`Adam`."""

    name = "adamw"
    decoupled = True

    def __init__(self, lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 no_decay: Callable[[str], bool] | None = None):
        super().__init__(lr, betas, eps, weight_decay, no_decay)


#: ``{name: class}`` for :func:`make_optimizer` and the ``--optimizer`` flag.
OPTIMIZERS: dict[str, type[Optimizer]] = {"sgd": SGD, "adam": Adam, "adamw": AdamW}


def make_optimizer(name: str, lr: float, **options: Any) -> Optimizer:
    """The optimizer called ``name`` (``"sgd"``, ``"adam"``, ``"adamw"``) with base rate ``lr``
    and its keyword ``options``. Raises :class:`InputError` for an unknown name or option."""
    if not isinstance(name, str) or name not in OPTIMIZERS:
        raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                         f"{truncate(name)}")
    try:
        return OPTIMIZERS[name](lr, **options)
    except TypeError as exc:  # an option the class does not take
        raise InputError(f"optimizer {name}: {exc}".splitlines()[0]) from None


# --------------------------------------------------------------------------- clip, accumulate

def clip_grad_norm(grads: Mapping[str, np.ndarray | None],
                   max_norm: float) -> tuple[dict[str, np.ndarray | None], np.floating]:
    """Clip by global L2 norm, ``torch.nn.utils.clip_grad_norm_`` (``norm_type=2``,
    ``torch/nn/utils/clip_grad.py``): ``total = ||(||g_1||, ..., ||g_n||)||`` (the norm of the
    per-tensor norms), ``coef = min(max_norm / (total + 1e-6), 1)``, every gradient multiplied
    by ``coef`` (also when it is 1). Non-finite norms are not an error (torch's default).

    Args:
        grads: ``{name: float array or None}`` (``None`` entries are skipped and kept).
        max_norm: finite, ``> 0``.
    Returns:
        ``(clipped, total_norm)``: new arrays of the same dtypes, and the norm *before*
        clipping as a numpy scalar of the gradients' (promoted) dtype (0 when there are none).
    Raises:
        InputError: ``max_norm`` not a positive finite number, or a non-float gradient.
    """
    limit = _real("max_norm", max_norm, strict=True)
    g = _float_dict("grads", grads)
    present = [a for a in g.values() if a is not None]
    dtype = np.result_type(*present) if present else np.dtype(np.float32)
    t = dtype.type
    norms = np.array([np.sqrt(np.sum(a * a, dtype=a.dtype)) for a in present], dtype=dtype)
    total = t(np.sqrt(np.sum(norms * norms, dtype=dtype)))
    with np.errstate(invalid="ignore", divide="ignore"):
        coef = t(min(t(t(limit) / (total + t(CLIP_EPS))), t(1.0)))
    out = {n: None if a is None else a * a.dtype.type(coef) for n, a in g.items()}
    return out, total


def accumulate(micro_grads: Sequence[Mapping[str, np.ndarray | None]]) -> dict[str, np.ndarray]:
    """The gradient of the mean of ``K`` micro-batch losses, as Hugging Face ``Trainer`` builds
    it with ``gradient_accumulation_steps = K``: each micro-batch loss is divided by ``K`` before
    its backward pass, and the backward passes add into ``.grad`` in order::

        grad = g_1 / K + g_2 / K + ... + g_K / K

    Each ``g_i`` is the gradient of that micro-batch's own mean loss, so micro-batches weigh
    equally whatever their token counts (Trainer's ``num_items_in_batch`` path, a token-weighted
    mean, is a different rule).

    Args:
        micro_grads: ``K >= 1`` dicts ``{name: float array or None}``, the same names, shapes
            and dtypes in each; a ``None`` contributes nothing (all ``None``: ``None``).
    Returns:
        ``{name: array}``, new arrays.
    Raises:
        InputError: an empty list, or dicts that disagree on names, shapes or dtypes.
    """
    if isinstance(micro_grads, Mapping) or not isinstance(micro_grads, Sequence) \
            or not micro_grads:
        raise InputError("micro_grads must be a non-empty list of gradient dicts")
    dicts = [_float_dict(f"micro_grads[{i}]", d) for i, d in enumerate(micro_grads)]
    names = list(dicts[0])
    k = len(dicts)
    out: dict[str, np.ndarray | None] = {}
    for i, d in enumerate(dicts):
        if set(d) != set(names):
            raise InputError(f"micro_grads[{i}] must have the names of micro_grads[0] "
                             f"({len(names)} names), got {len(d)} names")
        for name in names:
            g = d[name]
            if g is None:
                out.setdefault(name, None)
                continue
            prev = out.get(name)
            if prev is not None and (prev.shape != g.shape or prev.dtype != g.dtype):
                raise InputError(f"micro_grads[{i}][{name!r}] must be {prev.dtype} {prev.shape} "
                                 f"as before, got {g.dtype} {g.shape}")
            part = g / g.dtype.type(k)
            out[name] = part if prev is None else prev + part
    return out


# --------------------------------------------------------------------------- training runs

#: What the model computes in a training step, by architecture (``head="lm"`` only):
#: ``"causal_lm"`` for decoders (:func:`causal_lm_loss`), ``"seq2seq_lm"`` for
#: encoder-decoders (:func:`seq2seq_lm_loss`).
OBJECTIVES = {"decoder": "causal_lm", "encoder-decoder": "seq2seq_lm"}
#: ``TrainConfig.dropout``: ``"native"`` (each framework's own dropout, the default of
#: ``xformer train``), ``"stream"`` (the framework-neutral masks of :func:`dropout_masks`, what
#: conformance runs use) or ``"off"`` (no dropout whatever ``spec.dropout``).
DROPOUT_MODES = ("native", "stream", "off")


def objective(spec: Any) -> str:
    """The training objective of ``spec`` (:data:`OBJECTIVES`).

    Raises:
        InputError: ``head != "lm"`` (nothing to predict), or an encoder (the spec has no
            masked-LM head yet).
    """
    if spec.head != "lm" or spec.architecture not in OBJECTIVES:
        raise InputError(f"training needs a decoder or an encoder-decoder with head='lm' "
                         f"(a language-model objective); this spec is "
                         f"architecture={spec.architecture!r} with head={spec.head!r}")
    return OBJECTIVES[spec.architecture]


@dataclass(frozen=True)
class TrainConfig:
    """Every choice of a training run that changes its numbers, validated once.

    Attributes:
        optimizer: ``"sgd"``, ``"adam"`` or ``"adamw"`` (:data:`OPTIMIZERS`, torch.optim
            semantics on every backend).
        lr: base learning rate, finite ``>= 0``.
        betas, eps: Adam / AdamW (``torch.optim`` defaults).
        momentum, nesterov: SGD.
        weight_decay: ``None`` = the optimizer's default (AdamW 0.01, else 0); SGD and Adam add
            it to the gradient (L2), AdamW decays the weights (decoupled).
        no_decay_bias_and_norm: exclude biases and norm weights from weight decay
            (:func:`no_decay_bias_and_norm`, BERT's choice); default: every parameter decays.
        clip_grad_norm: clip by global L2 norm before the update (:func:`clip_grad_norm`), or
            ``None``.
        schedule, warmup_steps, total_steps: :func:`lr_at`; ``total_steps`` ``None`` = the
            number of steps of the run.
        batch_size: rows per micro-batch, ``>= 1``.
        grad_accum: micro-batches per optimizer step, ``>= 1`` (:func:`accumulate`).
        dropout: :data:`DROPOUT_MODES`.
        seed: seeds the dropout stream (:func:`dropout_masks`).

    Raises:
        InputError: any value out of range, with the field named.
    """

    optimizer: str = "adamw"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float | None = None
    no_decay_bias_and_norm: bool = False
    clip_grad_norm: float | None = None
    schedule: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    dropout: str = "native"
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.optimizer, str) or self.optimizer not in OPTIMIZERS:
            raise InputError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got "
                             f"{truncate(self.optimizer)}")
        if not isinstance(self.dropout, str) or self.dropout not in DROPOUT_MODES:
            raise InputError(f"dropout must be one of {', '.join(DROPOUT_MODES)}, got "
                             f"{truncate(self.dropout)}")
        object.__setattr__(self, "betas", tuple(self.betas) if isinstance(
            self.betas, Sequence) and not isinstance(self.betas, str) else self.betas)
        if self.clip_grad_norm is not None:
            _real("clip_grad_norm", self.clip_grad_norm, strict=True)
        _count("batch_size", self.batch_size, 1)
        _count("grad_accum", self.grad_accum, 1)
        _count("seed", self.seed)
        _count("warmup_steps", self.warmup_steps)
        if self.total_steps is not None:
            _count("total_steps", self.total_steps, 1)
        self.numpy_optimizer()  # the optimizer's own checks (lr, betas, eps, momentum, ...)
        self.lr_at(0, self.total_steps or max(1, self.warmup_steps))

    @property
    def decay(self) -> float:
        """The weight decay in effect (the optimizer's default for ``None``)."""
        if self.weight_decay is not None:
            return float(self.weight_decay)
        return 0.01 if self.optimizer == "adamw" else 0.0

    def options(self) -> dict[str, Any]:
        """Keyword options of the numpy optimizer (:func:`make_optimizer`)."""
        opts: dict[str, Any] = {"weight_decay": self.decay}
        if self.no_decay_bias_and_norm:
            opts["no_decay"] = no_decay_bias_and_norm
        if self.optimizer == "sgd":
            opts.update(momentum=self.momentum, nesterov=self.nesterov)
        else:
            opts.update(betas=self.betas, eps=self.eps)
        return opts

    def numpy_optimizer(self) -> Optimizer:
        """The numpy oracle of this run's optimizer (:class:`SGD`, :class:`Adam`,
        :class:`AdamW`)."""
        return make_optimizer(self.optimizer, self.lr, **self.options())

    def lr_at(self, step: int, steps: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based) in a run of ``steps``
        steps (:func:`lr_at`)."""
        total = self.total_steps or steps
        warmup = self.warmup_steps
        if total is not None and warmup > total:
            raise InputError(f"warmup_steps must be <= the total steps {total}, got {warmup}")
        return lr_at(step, self.lr, self.schedule, warmup,
                     None if self.schedule == "constant" and self.total_steps is None
                     else total)

    def decays(self, name: str) -> bool:
        """Whether parameter ``name`` gets weight decay (a positive decay, not excluded)."""
        return self.decay > 0 and not (self.no_decay_bias_and_norm
                                       and no_decay_bias_and_norm(name))

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-able values (``betas`` a list)."""
        out = dict(self.__dict__)
        out["betas"] = list(self.betas)
        return out


def check_data(spec: Any, data: Any) -> dict[str, np.ndarray]:
    """Validate training data for ``spec`` before any work is done.

    Args:
        data: a decoder's ``(N, T)`` integer token rows; an encoder-decoder's mapping (an
            ``.npz``) with ``source`` ``(N, S)`` and ``target`` ``(N, T)`` rows.
    Returns:
        ``{"input_ids": (N, T)}`` or ``{"source": (N, S), "target": (N, T)}``, int64.
    Raises:
        InputError: not integers, not 2-D, no rows, rows longer than ``max_len``, a decoder
            row shorter than 2 tokens (nothing to predict), a token id outside
            ``[0, vocab_size)``, source and target with different row counts, an
            encoder-decoder without ``bos_token_id`` (its decoder start token).
    """
    kind = objective(spec)
    if kind == "seq2seq_lm":
        if not isinstance(data, Mapping) or set(data) != {"source", "target"}:
            got = sorted(data) if isinstance(data, Mapping) else type(data).__name__
            raise InputError(f"an encoder-decoder trains on a .npz with exactly the arrays "
                             f"'source' (N, S) and 'target' (N, T), got {got}")
        if spec.bos_token_id is None:
            raise InputError("an encoder-decoder needs spec field bos_token_id (the decoder "
                             "start token) to train")
        rows = {k: _token_rows(spec, k, data[k], 1) for k in ("source", "target")}
        if len(rows["source"]) != len(rows["target"]):
            raise InputError(f"source has {len(rows['source'])} rows but target has "
                             f"{len(rows['target'])}; give one target row per source row")
        return rows
    if isinstance(data, Mapping):
        raise InputError(f"a decoder trains on one .npy array of token rows (N, T), got a "
                         f"mapping with {sorted(data)}")
    return {"input_ids": _token_rows(spec, "data", data, 2)}


def _token_rows(spec: Any, label: str, value: Any, shortest: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{label} must be an integer array of token ids (N, T), got "
                         f"{arr.dtype}")
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise InputError(f"{label} must be a non-empty 2-D array of token rows (N, T), got "
                         f"shape {arr.shape}")
    if arr.shape[1] < shortest:
        raise InputError(f"{label} rows have {arr.shape[1]} tokens; give at least {shortest}")
    if arr.shape[1] > spec.max_len:
        raise InputError(f"{label} rows have {arr.shape[1]} tokens, more than max_len="
                         f"{spec.max_len}; shorten them (xformer does not truncate silently)")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= spec.vocab_size:
        bad = hi if hi >= spec.vocab_size else lo
        where = tuple(int(i) for i in np.argwhere(arr == bad)[0])
        raise InputError(f"{label} holds token id {bad} at row {where[0]}, column {where[1]}, "
                         f"outside [0, vocab_size={spec.vocab_size})")
    return arr.astype(np.int64)


def micro_batches(spec: Any, rows: Mapping[str, np.ndarray], config: TrainConfig,
                  step: int) -> list[dict[str, np.ndarray]]:
    """The ``config.grad_accum`` micro-batches of optimizer step ``step``: rows taken in order
    from :func:`check_data`'s arrays, ``batch_size`` each, wrapping around at the end.

    Each is the model's inputs plus ``"labels"`` ``(B, T)`` int64: a decoder's
    ``{"input_ids", "attention_mask", "labels"}`` (labels = the ids; the loss shifts), an
    encoder-decoder's ``{"input_ids": source, "attention_mask", "decoder_input_ids":
    shift_tokens_right(target, bos_token_id, 0), "decoder_attention_mask", "labels": target}``.
    Masks are all ones (token rows carry no padding).
    """
    n = len(next(iter(rows.values())))
    out = []
    for micro in range(config.grad_accum):
        start = (step * config.grad_accum + micro) * config.batch_size
        idx = np.arange(start, start + config.batch_size) % n
        if "input_ids" in rows:
            ids = rows["input_ids"][idx]
            out.append({"input_ids": ids, "attention_mask": np.ones(ids.shape, np.int64),
                        "labels": ids.copy()})
        else:
            src, tgt = rows["source"][idx], rows["target"][idx]
            out.append({"input_ids": src, "attention_mask": np.ones(src.shape, np.int64),
                        "decoder_input_ids": shift_tokens_right(tgt, spec.bos_token_id, 0),
                        "decoder_attention_mask": np.ones(tgt.shape, np.int64),
                        "labels": tgt.copy()})
    return out


def dropout_sites(spec: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    """``{site: mask shape}`` of every dropout of ``spec`` in one training forward pass over
    ``inputs``: the sites are the canonical module paths of the dropout layers, the same
    attribute names on every backend (docs/training.md)::

        embeddings.dropout, decoder_embeddings.dropout       (B, T, D) after the embeddings
        <stack>.layers.<i>.self_attn.dropout                  (B, H, T, T) attention probs
        decoder.layers.<i>.cross_attn.dropout                 (B, H, T, S)
        <stack>.layers.<i>.ffn.dropout                        (B, T, d_ff) the FFN's inner
        <stack>.layers.<i>.dropout1 / dropout2 (/ dropout3)   (B, T, D) residual branches

    Empty when ``spec.dropout == 0``."""
    if not spec.dropout:
        return {}
    d, h, f = spec.d_model, spec.n_heads, spec.d_ff
    enc_dec = spec.architecture == "encoder-decoder"
    stacks = []
    if spec.architecture == "decoder":
        b, t = np.shape(inputs["input_ids"])
        stacks.append(("embeddings", "decoder", spec.n_layers, t, None))
    else:
        b, s = np.shape(inputs["input_ids"])
        stacks.append(("embeddings", "encoder", spec.n_layers, s, None))
        if enc_dec:
            t = np.shape(inputs["decoder_input_ids"])[1]
            stacks.append(("decoder_embeddings", "decoder",
                           spec.n_decoder_layers or spec.n_layers, t, s))
    sites: dict[str, tuple[int, ...]] = {}
    for emb, stack, layers, t, s in stacks:
        sites[f"{emb}.dropout"] = (b, t, d)
        for i in range(layers):
            pre = f"{stack}.layers.{i}"
            sites[f"{pre}.self_attn.dropout"] = (b, h, t, t)
            if s is not None:
                sites[f"{pre}.cross_attn.dropout"] = (b, h, t, s)
            sites[f"{pre}.ffn.dropout"] = (b, t, f)
            for k in range(1, 4 if s is not None else 3):
                sites[f"{pre}.dropout{k}"] = (b, t, d)
    return sites


def dropout_masks(spec: Any, inputs: Mapping[str, np.ndarray], seed: int, step: int,
                  micro: int, dtype: str) -> dict[str, np.ndarray]:
    """The framework-neutral dropout stream: ``{site: scaled keep mask}`` for every site of
    :func:`dropout_sites`, each ``keep / (1 - p)`` in ``dtype`` with ``keep = u >= p``, ``u``
    uniform ``[0, 1)`` from ``numpy.random.default_rng([seed, step, micro, crc32(site)])``
    (PCG64). A backend multiplies the site's input by its mask instead of drawing its own
    (inverted dropout, as every framework's). Keyed by site name, not call order, so the masks
    do not depend on how a framework orders its calls."""
    p = float(spec.dropout)
    out = {}
    for site, shape in dropout_sites(spec, inputs).items():
        rng = np.random.default_rng([seed, step, micro, zlib.crc32(site.encode())])
        keep = rng.random(shape) >= p
        out[site] = (keep * (1.0 / (1.0 - p))).astype(dtype)
    return out


@dataclass(frozen=True)
class StepLog:
    """One optimizer step of a run: ``step`` (0-based), the mean micro-batch ``loss`` (before
    the update), the learning rate ``lr`` used and the global gradient norm ``grad_norm``
    before clipping."""

    step: int
    loss: float
    lr: float
    grad_norm: float


def train(backend: Any, model: Any, data: Any, config: TrainConfig, steps: int,
          mode: str | None = None, callback: Callable[[StepLog], None] | None = None
          ) -> list[StepLog]:
    """Train ``model`` in place for ``steps`` optimizer steps on ``backend``.

    Args:
        backend: an :class:`xformer.backend.Backend`. model: its native model.
        data: :func:`check_data`'s input (checked here, before any step).
        config: the run. steps: ``>= 1``. mode: the backend's execution mode.
        callback: called with each :class:`StepLog` (progress bars, JSON lines).
    Returns:
        the step logs. The optimizer (``model``'s trainer) is created here and dropped.
    Raises:
        InputError: bad data, config or steps (before any step runs).
    """
    steps = _count("steps", steps, 1)
    rows = check_data(model.spec, data)
    trainer = backend.make_trainer(model, config, steps)  # checks the config against steps
    logs = []
    for step in range(steps):
        log = backend.train_step(model, trainer, micro_batches(model.spec, rows, config, step),
                                 step, mode)
        logs.append(log)
        if callback is not None:
            callback(log)
    return logs


def oracle_train(backend: Any, model: Any, data: Any, config: TrainConfig, steps: int,
                 mode: str | None = None) -> tuple[dict[str, np.ndarray], list[StepLog],
                                                   Optimizer]:
    """The same run as :func:`train` with none of the backend's training machinery: each
    micro-batch's gradient comes from ``backend.forward_backward`` with the cotangent ``d
    loss / d logits`` of this module's numpy objective, and :func:`accumulate`,
    :func:`clip_grad_norm` and the numpy optimizer do the rest, the weights written back with
    ``set_weights`` after every step. Dropout is off (``forward_backward`` runs without it).

    Returns:
        ``(final weights, step logs, the numpy optimizer)`` (its ``state`` holds the
        optimizer state); ``model`` ends with the final weights.
    """
    steps = _count("steps", steps, 1)
    spec = model.spec
    rows = check_data(spec, data)
    kind = objective(spec)
    loss_fn, grad_fn = ((causal_lm_loss, causal_lm_loss_grad) if kind == "causal_lm"
                        else (seq2seq_lm_loss, seq2seq_lm_loss_grad))
    opt = config.numpy_optimizer()
    weights = backend.get_weights(model)
    logs = []
    for step in range(steps):
        grads, losses = [], []
        for batch in micro_batches(spec, rows, config, step):
            labels = batch.pop("labels")
            out = backend.forward(model, batch, mode)
            logits = out["logits"]
            cots = {k: np.zeros_like(v) for k, v in out.items()}
            cots["logits"] = grad_fn(logits, labels)
            losses.append(loss_fn(logits, labels))
            _, g = backend.forward_backward(model, batch, cots, mode)
            grads.append({n: g[n] for n in weights})
        grad = accumulate(grads)
        dtype = next(iter(weights.values())).dtype
        norm = np.sqrt(sum(np.sum(a * a, dtype=a.dtype) for a in grad.values()))
        if config.clip_grad_norm is not None:
            grad, norm = clip_grad_norm(grad, config.clip_grad_norm)
        lr = config.lr_at(step, steps)
        weights = opt.step(weights, grad, lr=lr)
        backend.set_weights(model, weights)
        logs.append(StepLog(step, float(np.mean(np.array(losses, dtype))), lr, float(norm)))
    return weights, logs, opt


def load_data(path: Any) -> Any:
    """Training data from a file: a ``.npy`` array of token rows, or a ``.npz`` (an
    encoder-decoder's ``source`` and ``target``), read without pickles
    (``numpy.load(allow_pickle=False)``). :func:`check_data` checks the contents.

    Raises:
        InputError: another suffix, an empty, truncated or corrupt file, an object (pickled)
            array. OSError: a missing or unreadable file (the CLI's one line).
    """
    import os
    import zipfile

    name = os.fspath(path)
    suffix = os.path.splitext(name)[1].lower()
    if suffix not in (".npy", ".npz"):
        raise InputError(f"--data {truncate(name, 200)} must be a .npy array of token rows or "
                         f"a .npz with source and target (np.save / np.savez)")
    if os.path.isdir(name):
        raise InputError(f"--data {truncate(name, 200)} is a directory; give a .npy or .npz "
                         f"file")
    try:
        with open(name, "rb") as f:
            loaded = np.load(f, allow_pickle=False)
            if suffix == ".npz":
                if not isinstance(loaded, np.lib.npyio.NpzFile):
                    raise ValueError("not a .npz archive")
                return {k: loaded[k] for k in loaded.files}
            if not isinstance(loaded, np.ndarray):
                raise ValueError("not a .npy array")
            return loaded
    except (ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"--data {truncate(name, 200)} is not a valid {suffix} file "
                         f"({truncate(detail, 120)}); write it with "
                         f"{'np.save' if suffix == '.npy' else 'np.savez'} from an integer "
                         f"array") from None

