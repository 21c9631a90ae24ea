"""The xformer Transformers (encoder, decoder, encoder-decoder) as Gluon ``HybridBlock``s
(Apache MXNet 1.9.1).

The Gluon twin of ``xformer_torch.modules`` (where the block diagram is) and
``xformer_tensorflow.modules``: the same classes in the same order, with the same constructor
and call parameters (``tests/test_twins.py``) and attribute paths, so the files diff block by
block (the pattern of Sockeye's ``layers.py`` / ``layers_pt.py``). The blocks follow GluonNLP's
``BERTEncoder`` / ``MultiHeadAttentionCell``: children made inside ``with self.name_scope():``,
``hybrid_forward(self, F, ...)`` so that the same code runs imperatively and, after
``hybridize()``, as one cached graph; Gluon passes a block's own parameters to
``hybrid_forward`` as keyword arguments (``position_table``, ``weight``), and child blocks are
called positionally.

Gluon specifics:

* masks are built with ``F.contrib.arange_like`` so they hybridize; a tied LM head multiplies
  by the token table's own ``Parameter`` (``var()`` in the graph, ``data()`` imperatively), so
  the table's gradient sums the lookup and the head;
* cached (incremental) decoding (``past_key_values`` / ``use_cache``, Hugging Face's legacy
  layout, ``H_kv`` heads per cached tensor) runs imperatively (:func:`imperative`) even in a
  hybridized model, whose graph is kept for full-sequence calls; positions (learned, sinusoidal
  and rotary) are taken with ``F.take`` at ``F.contrib.arange_like(x, start=past_length)``, so
  a hybridized graph has ``past_length = 0`` and an imperative cached call a Python int;
* every ``nn.Dense`` has ``flatten=False`` (the Gluon default flattens ``(B, T, D)`` to
  ``(B, T * D)``) and its weight is ``(out_features, in_features)``, the canonical layout;
* norms (:func:`_norm`, ``spec.norm``): :class:`LayerNorm` is Gluon's, with
  ``epsilon=spec.norm_eps`` (never the Gluon default ``1e-5``), composed from ``F.mean`` /
  ``F.sqrt`` in float64 because the fused operator takes ``eps`` as a C++ ``float``, and in
  float32 inside ``autograd.record`` from ``FullyConnected`` products and ``L2Normalization``
  (:meth:`LayerNorm.gemm_form`: the fused operator's backward is slow), so a hybridized block
  keeps one cached graph per autograd state (:func:`_call_graph_of_state`); with no
  norm bias (``spec.has_bias("norm")``) its ``beta`` stays a frozen zero (``grad_req="null"``)
  and is no canonical parameter; :class:`RMSNorm` is composed (``F.rsqrt``; MXNet 1.9.1 has no
  RMSNorm operator); both multiply by ``spec.norm_scale_offset + weight`` (Gemma);
* rotary embeddings (:class:`RotaryEmbedding`) hold ``xformer.spec.rotary_table`` as
  ``Constant`` s in the compute dtype, as the sinusoidal table; grouped-query attention repeats
  each key/value head with ``F.repeat`` (Hugging Face ``repeat_kv``) after the cache;
* every dropout is a :class:`Dropout` (Gluon's, plus the framework-neutral dropout stream of
  ``xformer.training.dropout_masks``: :func:`use_dropout_masks` hands each site its mask for a
  training step, which then runs imperatively; the attention probabilities reach their dropout
  as ``(B, H, T, S)``, the site's shape);
* in float64 GELU is composed from ``F.erf`` / ``F.tanh``: ``LeakyReLU(act_type="gelu")`` is off
  by ~3e-7 there (docs/design.md §5), and ``erf``'s gradient is recomputed
  (:func:`erf_exact_grad`): MXNet's own is off by 3e-8; in float32 exact GELU is that fused
  operator (float32-grade, and one pass instead of MXNet's slow ``erf``); SiLU is
  ``x * F.sigmoid(x)``;
* the dtype is explicit everywhere: ``Dense`` and ``Embedding`` get ``dtype=``, ``LayerNorm``
  (which has no ``dtype`` argument) is ``cast``, ``RMSNorm``'s weight is made in the dtype, the
  sinusoidal and rotary tables are ``Constant`` s of the compute dtype, the attention mask is
  cast to it.

Canonical names are the Gluon attribute paths (``block._collect_params_with_prefix()``), with
LayerNorm ``gamma`` / ``beta`` read as ``weight`` / ``bias`` (RMSNorm's parameter is already
``weight``): see :func:`canonical_parameters`.

Example::

    >>> import numpy as np, mxnet as mx
    >>> from xformer import ModelSpec
    >>> from xformer_mxnet.modules import EncoderModel
    >>> model = EncoderModel(ModelSpec.preset("tiny"), dtype="float64")
    >>> model.initialize(mx.init.Normal(0.02))
    >>> ids = mx.nd.array(np.array([[5, 6, 7]]), dtype="int64")
    >>> hidden, pooled = model(ids)                     # (1, 3, 64), (1, 64)
"""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np

# MXNet 1.9.1 uses np.bool, gone in numpy >= 1.24 (docs/design.md §5)
with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    if not hasattr(np, "bool"):
        np.bool = np.bool_

import mxnet as mx  # noqa: E402
from mxnet.gluon import HybridBlock, nn  # noqa: E402
from mxnet.gluon.parameter import Constant  # noqa: E402

from xformer.errors import InputError  # noqa: E402
from xformer.spec import ModelSpec, sinusoidal_table  # noqa: E402

__all__ = ["erf_exact_grad", "gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS", "LayerNorm",
           "RMSNorm", "RotaryEmbedding", "Embeddings", "MultiHeadAttention", "FeedForward",
           "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
           "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel",
           "causal_allowed", "allowed_bias", "imperative", "cache_length", "reorder_cache",
           "canonical_parameters", "Dropout", "use_dropout_masks"]


# ---------------------------------------------------------------------- activations
def erf_exact_grad(F, x):
    """``F.erf(x)``, with the gradient ``2 / sqrt(pi) * exp(-x^2)`` computed in ``x``'s dtype.

    MXNet 1.9.1's ``erf`` backward uses a float32 ``2 / sqrt(pi)``: its float64 gradient is off
    by 3.0e-8 relative. Here the value is ``F.erf(x)`` exactly (the added term is ``0 * slope``)
    and autograd sees only the ``(x - BlockGrad(x)) * slope`` path.
    """
    slope = F.BlockGrad((2.0 / math.sqrt(math.pi)) * F.exp(-F.square(x)))
    return F.BlockGrad(F.erf(x)) + (x - F.BlockGrad(x)) * slope


def gelu(F, x, exact_grad: bool = False):
    """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))`` (Hendrycks & Gimpel 2016).

    ``F`` is ``mx.nd`` or ``mx.sym``; any shape, the dtype of ``x``. ``exact_grad`` (float64
    models): composed from :func:`erf_exact_grad`, since the fused ``LeakyReLU(act_type="gelu")``
    is off by ~3e-7 in float64. Otherwise (float32 models) that fused operator: float32-grade
    (6.7e-8 of the largest value, 2.5e-7 for the gradient, docs/pitfalls.md) and one pass over
    the ``(B, T, d_ff)`` activation, where MXNet's ``erf`` alone took 11.5 ms against 0.47 ms
    (issue #11's profile).
    """
    if not exact_grad:
        return F.LeakyReLU(x, act_type="gelu")
    erf = erf_exact_grad(F, x / math.sqrt(2.0))
    return 0.5 * x * (1.0 + erf)


def gelu_tanh(F, x, exact_grad: bool = False):
    """Tanh GELU ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016;
    GPT-2's ``gelu_new``), from ``F.tanh`` (whose gradient is exact: ``exact_grad`` is unused);
    any shape, the dtype of ``x``."""
    return 0.5 * x * (1.0 + F.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(F, x, exact_grad: bool = False):
    """``max(x, 0)`` (``F.relu``); ``exact_grad`` is unused."""
    return F.relu(x)


def silu(F, x, exact_grad: bool = False):
    """SiLU / swish ``x * sigmoid(x)`` (Elfwing et al. 2018; Hugging Face ``SiLUActivation``,
    the activation of Llama's gated FFN), from ``F.sigmoid`` (whose gradient ``s (1 - s)`` is
    computed in ``x``'s dtype: ``exact_grad`` is unused); any shape, the dtype of ``x``."""
    return x * F.sigmoid(x)


#: ``spec.activation`` -> function ``(F, x, exact_grad)``.
ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}


# ---------------------------------------------------------------------- helpers
def _dense(units: int, in_units: int, use_bias: bool, dtype: str) -> nn.Dense:
    """``nn.Dense`` on the last axis (``flatten=False``), weight ``(units, in_units)``."""
    return nn.Dense(units, in_units=in_units, use_bias=use_bias, flatten=False, dtype=dtype)


def _norm(spec: ModelSpec, dtype: str) -> HybridBlock:
    """The norm of ``spec.norm``: :class:`LayerNorm` or :class:`RMSNorm`, ``(B, T, D)`` ->
    ``(B, T, D)`` in ``dtype``."""
    return (RMSNorm if spec.norm == "rmsnorm" else LayerNorm)(spec, dtype)


def _residual(x, sublayer, norm, dropout, norm_first: bool):
    """Residual wrapper of every sub-layer (attention, FFN) of :class:`EncoderLayer` and
    :class:`DecoderLayer`; ``x`` an NDArray or a Symbol. Pre-LN (``norm_first``):
    ``x + dropout(sublayer(norm(x)))``; post-LN: ``norm(x + dropout(sublayer(x)))``."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def _sequential(make, n: int) -> nn.HybridSequential:
    """``n`` blocks ``make()`` in an ``nn.HybridSequential`` (made in its name scope), so the
    attribute paths are ``layers.0``, ``layers.1``, ..."""
    blocks = nn.HybridSequential()
    with blocks.name_scope():
        for _ in range(n):
            blocks.add(make())
    return blocks


def causal_allowed(F, queries, keys, past_length: int = 0):
    """``(T, S)`` 0/1 in ``queries``' dtype: query ``i`` (absolute position ``past_length + i``)
    may attend to key ``j`` iff ``j <= past_length + i``. ``queries`` ``(B, T, ...)`` and
    ``keys`` ``(B, S, ...)`` give only the lengths (``F.contrib.arange_like``, so the same code
    runs in a hybridized graph, where ``past_length`` is 0)."""
    q_pos = F.contrib.arange_like(queries, axis=1, start=past_length)            # (T,)
    k_pos = F.contrib.arange_like(keys, axis=1)                                  # (S,)
    return F.broadcast_lesser_equal(F.reshape(k_pos, shape=(1, -1)),
                                    F.reshape(q_pos, shape=(-1, 1)))


def allowed_bias(allowed, mask_value: float):
    """``(1 - allowed) * finfo(dtype).min``: ONE additive bias from a 0/1 mask that is already
    the product of padding and causality (docs/design.md §3; two ``finfo.min`` biases would add up
    to ``-inf``). ``mask_value`` is ``float(finfo(dtype).min)``."""
    return (1.0 - allowed) * mask_value


@contextlib.contextmanager
def imperative(block: HybridBlock):
    """Run ``block`` (and every child) imperatively inside the ``with``, hybridized or not.

    Cached decoding changes shapes every step and takes nested Python arguments
    (``past_key_values``), so it runs imperatively; this switches Gluon's per-block ``_active``
    flag off and back on without clearing the cached graphs, so a hybridized model keeps its
    graph for later full-sequence calls (``hybridize(active=False)`` would throw it away).
    """
    saved = []

    def off(b):
        if isinstance(b, HybridBlock):
            saved.append((b, b._active))
            b._active = False

    block.apply(off)
    try:
        yield block
    finally:
        for b, active in saved:
            b._active = active


def cache_length(past_key_values) -> int:
    """Positions in a ``past_key_values`` cache (0 for ``None``): the length of its keys."""
    return 0 if not past_key_values else int(past_key_values[0][0].shape[2])


def reorder_cache(past_key_values, beam_idx):
    """``past_key_values`` with the batch rows gathered by ``beam_idx`` ``(N,)`` (an NDArray of
    integers): beam search keeps, duplicates and drops hypotheses (Hugging Face's
    ``_reorder_cache``)."""
    return tuple(tuple(mx.nd.take(t, beam_idx, axis=0) for t in layer)
                 for layer in past_key_values)


# ---------------------------------------------------------------------- one graph per state
# Gluon keeps a single cached graph per hybridized block, traced at its first call. xformer's
# blocks keep one per autograd state: the graph traced inside ``autograd.record`` (what
# ``backward()`` differentiates) and the one traced outside it (inference), because a block may
# lower differently for a backward pass (:class:`LayerNorm` in float32); the models also key
# their graphs by which inputs are ``None`` (``_structure``, see :class:`_SpecModel`). So
# alternating training and evaluation, or ``input_ids`` and ``inputs_embeds``, retraces
# nothing. Clearing the cache (``hybridize()``, a new child) clears every graph; each graph
# holds its own buffers (``static_alloc``). The blocks take these two functions as their
# ``_call_cached_op`` / ``_clear_cached_op`` (MXNet 1.9.1 is final, so these Gluon internals
# stay as they are).
_CACHE = ("_cached_graph", "_cached_op", "_cached_op_args", "_in_format", "_out_format")


def _call_graph_of_state(self, *args):
    key = (self.__dict__.get("_structure"), mx.autograd.is_recording())
    current = self.__dict__.get("_graph_key")
    if current is not None and current != key:
        graphs = self.__dict__.setdefault("_graphs", {})
        graphs[current] = tuple(getattr(self, a) for a in _CACHE)
        for name, value in zip(_CACHE, graphs.pop(key, ((), None, [], None, None))):
            setattr(self, name, value)  # none yet for this key: traced below
    self.__dict__["_graph_key"] = key
    return HybridBlock._call_cached_op(self, *args)


def _clear_graphs(self):
    HybridBlock._clear_cached_op(self)
    self.__dict__.pop("_graphs", None)
    self.__dict__.pop("_graph_key", None)


class _SpecLayer(HybridBlock):
    """A block configured by a :class:`~xformer.ModelSpec` (kept as ``.spec``)."""

    _call_cached_op, _clear_cached_op = _call_graph_of_state, _clear_graphs

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec


# ---------------------------------------------------------------------- norms and rotary
class LayerNorm(nn.LayerNorm):
    """LayerNorm (Ba et al. 2016) over the last axis: Gluon's ``nn.LayerNorm`` (same ``gamma``
    / ``beta`` parameters, canonical ``weight`` / ``bias``) with ``epsilon=spec.norm_eps``,
    ``center=spec.has_bias("norm")`` and the model dtype:
    ``(x - mean) / sqrt(var + eps) * (offset + gamma) + beta``, biased variance,
    ``offset = spec.norm_scale_offset`` (1 for Gemma, whose stored weight is the scale minus 1:
    Hugging Face ``GemmaRMSNorm``; ``gamma`` then starts at zeros).

    In float64 the formula is composed from ``F.mean`` / ``F.sqrt`` in the reference's op
    order, because MXNet 1.9.1's fused ``LayerNorm`` operator is not float64 end to end: its
    ``eps`` is a C++ ``float`` (``eps=1e-5`` becomes ``1e-5 - 2.5e-14``: ~1e-13 relative error
    in the output, ~7e-10 with ``eps=0.1``) and it computes the variance in one pass (1.9e-13 for
    inputs with mean 1000). float32 uses the fused operator, except inside ``autograd.record``
    (a pass that will be differentiated), where it is :meth:`gemm_form`: MXNet's
    ``_backward_LayerNorm`` (generic broadcast reductions) takes ~5 ms on ``(8, 128, 256)``,
    about a fifth of an encoder layer's training step, against ~2.5 ms forward + backward for
    that composition; the two differ by float32 rounding (docs/pitfalls.md). Without a norm bias
    ``beta`` stays a frozen zero (``grad_req="null"``), as Gluon makes it. Hybridized on its
    own, it keeps one graph per autograd state (:func:`_call_graph_of_state`), as every
    xformer block does.

    Args:
        spec: uses ``d_model, norm_eps, norm_scale_offset, bias, norm``.
        dtype: ``"float32"`` or ``"float64"`` (Gluon's LayerNorm has none: the block is
            ``cast``).

    Call ``(x)``: ``(B, T, D)`` (any leading axes) -> the same shape, ``dtype``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        offset = spec.norm_scale_offset
        super().__init__(axis=-1, epsilon=spec.norm_eps, center=spec.has_bias("norm"),
                         scale=True, gamma_initializer="zeros" if offset else "ones",
                         in_channels=spec.d_model, **kwargs)
        self.spec = spec
        self.cast(dtype)  # Gluon's LayerNorm has no dtype argument
        self._offset = offset
        self._composed = np.dtype(dtype) == np.float64

    _call_cached_op, _clear_cached_op = _call_graph_of_state, _clear_graphs

    def hybrid_forward(self, F, x, gamma, beta):
        if self._offset:
            gamma = gamma + self._offset
        if not self._composed:
            if mx.autograd.is_recording():
                return self.gemm_form(F, x, gamma, beta)
            return super().hybrid_forward(F, x, gamma, beta)
        centered = F.broadcast_sub(x, F.mean(x, axis=-1, keepdims=True))
        var = F.mean(F.square(centered), axis=-1, keepdims=True)
        y = F.broadcast_mul(F.broadcast_div(centered, F.sqrt(var + self._epsilon)), gamma)
        return F.broadcast_add(y, beta)  # a frozen zero when not center, as the fused op does

    def gemm_form(self, F, x, gamma, beta):
        """The float32 LayerNorm that a backward pass differentiates: every reduction and
        broadcast is a ``FullyConnected`` product, whose backward is a product too, and the
        normalization is ``L2Normalization``, whose backward is one fused kernel.

        ``mean = x @ (1/D)``, ``centered = x - mean @ 1ᵀ``, ``centered / sqrt(mean(centered²) +
        eps) = sqrt(D) · L2Normalization(centered, eps=D·eps)`` (which divides by
        ``sqrt(sum(centered²) + eps)``), then ``· 1 @ (sqrt(D)·gamma)ᵀ + 1 @ betaᵀ``: the
        formula of the fused operator (two-pass moments, biased variance); the broadcasts of
        ``gamma`` and ``beta`` as outer products make their gradients (column sums) products
        as well. Every ``FullyConnected`` has ``flatten=False``: any leading axes.

        Call ``(x, gamma, beta)``: ``x`` ``(..., D)`` float32, ``gamma``/``beta`` ``(D,)``
        (``gamma`` already offset) -> ``(..., D)`` float32.
        """
        d = self.spec.d_model
        mean = F.FullyConnected(x, F.full(shape=(1, d), val=1.0 / d), no_bias=True,
                                num_hidden=1, flatten=False)                     # (..., 1)
        centered = x - F.FullyConnected(mean, F.ones(shape=(d, 1)), no_bias=True, num_hidden=d,
                                        flatten=False)                          # (..., D)
        normed = F.L2Normalization(F.reshape(centered, shape=(-1, d)), eps=d * self._epsilon,
                                   mode="instance")                              # (N, D)
        ones = F.ones_like(mean)                                                 # (..., 1)

        def rows(v):  # (D,) -> (..., D), every row v: an outer product
            return F.FullyConnected(ones, F.reshape(v, shape=(d, 1)), no_bias=True,
                                    num_hidden=d, flatten=False)

        y = F.reshape_like(normed, x) * rows(gamma * math.sqrt(d))
        return y + rows(beta)  # a frozen zero when not center, as the fused op adds it


class RMSNorm(_SpecLayer):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4; Hugging Face ``LlamaRMSNorm``, and
    ``GemmaRMSNorm`` with the offset) over the last axis, composed in the model dtype
    (MXNet 1.9.1 has no RMSNorm operator):
    ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``, ``offset = spec.norm_scale_offset``.

    One parameter ``weight`` ``(D,)`` (canonical ``...weight``), initialised to ones, or to
    zeros when ``norm_scale_offset`` is 1 (``spec.parameters()``); no bias.

    Args:
        spec: uses ``d_model, norm_eps, norm_scale_offset``.
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(x)``: ``(B, T, D)`` (any leading axes) -> the same shape, ``dtype``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        self._epsilon, self._offset = spec.norm_eps, spec.norm_scale_offset
        with self.name_scope():
            self.weight = self.params.get("weight", shape=(spec.d_model,), dtype=dtype,
                                          init="zeros" if self._offset else "ones")

    def hybrid_forward(self, F, x, weight=None):
        scale = weight + self._offset if self._offset else weight
        mean_square = F.mean(F.square(x), axis=-1, keepdims=True)
        return F.broadcast_mul(F.broadcast_mul(x, F.rsqrt(mean_square + self._epsilon)), scale)


class RotaryEmbedding(_SpecLayer):
    """Rotary position embedding (RoFormer, Su et al. 2021 eq. 34; Hugging Face
    ``apply_rotary_pos_emb``, GPT-NeoX's partial rotation): the first ``rotary_dim``
    dimensions of every head turn pairwise by the angles of position ``p``,
    ``(a, b) -> (a cos - b sin, b cos + a sin)``; pairs ``(i, i + rotary_dim / 2)`` with
    ``rope_style="half"`` (Llama's ``rotate_half``) or ``(2i, 2i + 1)`` with ``"interleaved"``
    (the paper's, GPT-J); the other ``d_head - rotary_dim`` dimensions pass through
    (``xformer.reference.rotate``).

    The angles are ``spec.rotary_tables()`` (``xformer.spec.rotary_table``: ``rope_theta``,
    ``rope_scaling``), computed once
    in float64 and held as the non-trainable ``Constant`` s ``cos`` / ``sin``
    ``(max_len, rotary_dim / 2)`` in the compute dtype (as ``Embeddings.position_table``), so
    every backend rotates by bit-identical constants; rows are taken with ``F.take`` at
    ``F.contrib.arange_like`` positions, so the block hybridizes.

    Args:
        spec: uses ``max_len, d_head, rotary_dim (rotary_fraction), rope_theta, rope_style``.
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(x, past_length=0)``: ``x`` ``(B, heads, T, d_head)`` (queries or keys) at positions
    ``past_length .. past_length + T - 1``; ``past_length`` a Python int (imperative calls
    only: a hybridized graph has ``past_length = 0``). Returns the same shape and dtype,
    differentiable w.r.t. ``x``. Positions past ``max_len`` are the caller's to refuse
    (``F.take`` would clip them).
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        self._dim, self._style = spec.rotary_dim, spec.rope_style
        cos, sin = (t.astype(dtype) for t in spec.rotary_tables())
        with self.name_scope():
            self.cos = self.params.get_constant("cos", mx.nd.array(cos, dtype=dtype))
            self.sin = self.params.get_constant("sin", mx.nd.array(sin, dtype=dtype))

    def hybrid_forward(self, F, x, past_length=0, cos=None, sin=None):
        r, half = self._dim, self._dim // 2
        positions = F.contrib.arange_like(x, axis=2, start=past_length)  # (T,) past .. past+T-1
        # (T, r/2) -> (1, 1, T, r/2): MXNet's broadcast ops need operands of the same rank
        cos, sin = (F.expand_dims(F.expand_dims(F.take(t, positions), axis=0), axis=0)
                    for t in (cos, sin))
        rot = F.slice_axis(x, axis=-1, begin=0, end=r)                     # (B, H, T, r)
        if self._style == "half":
            a = F.slice_axis(rot, axis=-1, begin=0, end=half)
            b = F.slice_axis(rot, axis=-1, begin=half, end=r)
        else:  # (B, H, T, r/2, 2): pair i is (2i, 2i + 1)
            rot = F.reshape(rot, shape=(0, 0, 0, -4, -1, 2))
            a = F.slice_axis(rot, axis=-1, begin=0, end=1)
            b = F.slice_axis(rot, axis=-1, begin=1, end=2)
            cos, sin = F.expand_dims(cos, axis=-1), F.expand_dims(sin, axis=-1)
        out = F.concat(F.broadcast_mul(a, cos) - F.broadcast_mul(b, sin),
                       F.broadcast_mul(b, cos) + F.broadcast_mul(a, sin), dim=-1)
        if self._style != "half":
            out = F.reshape(out, shape=(0, 0, 0, -3))                      # (B, H, T, r)
        if r == self.spec.d_head:
            return out
        return F.concat(out, F.slice_axis(x, axis=-1, begin=r, end=None), dim=-1)


# ---------------------------------------------------------------------- blocks
class Embeddings(_SpecLayer):
    """Token + position (+ segment) embeddings, then the norm (BERT, Devlin et al. 2019 §3.2)
    and dropout.

    ``x = word_embeddings[input_ids] * s + positions[:T] (+ token_type_embeddings[ids])``, with
    ``s = sqrt(d_model)`` if ``spec.embed_scale`` (Vaswani 2017 §3.4) else 1; positions are the
    learned table ``position_embeddings`` or the fixed ``sinusoidal_table`` (Vaswani 2017 §3.5),
    held as a non-trainable ``Constant`` ``position_table`` in the compute dtype; with
    ``positional="rope"`` nothing is added here (the attention rotates queries and keys,
    :class:`RotaryEmbedding`).

    Args:
        spec: the model; uses ``vocab_size, d_model, max_len, positional, type_vocab_size,
            embedding_norm, embed_scale, dropout`` and the norm's fields (:func:`_norm`).
        word_embeddings: own a token table; ``False`` for the target side of an
            encoder-decoder with ``share_embeddings`` (it is then called with
            ``inputs_embeds`` looked up in the source side's table).
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(input_ids, token_type_ids=None, inputs_embeds=None, past_length=0)``:
    ``input_ids`` ``(B, T)`` integers, or ``None`` with ``inputs_embeds`` ``(B, T, D)``
    (already scaled, ``dtype``); ``token_type_ids`` ``(B, T)`` integers or ``None`` (all
    zeros); ``past_length`` (a Python int, imperative calls only) the positions already in a
    key/value cache: positions then run from ``past_length``. Returns ``(B, T, D)``.
    Token ids out of range are clipped by MXNet's ``Embedding`` (check them first:
    ``xformer.backend.check_inputs``). Raises ``InputError`` for ``token_type_ids`` without
    segment embeddings, or for no ``inputs_embeds`` without a token table.
    """

    def __init__(self, spec: ModelSpec, word_embeddings: bool = True, dtype: str = "float32",
                 **kwargs):
        super().__init__(spec, **kwargs)
        self._has_table = word_embeddings
        d = spec.d_model
        with self.name_scope():
            if word_embeddings:
                self.word_embeddings = nn.Embedding(spec.vocab_size, d, dtype=dtype)
            if spec.positional == "learned":
                self.position_embeddings = nn.Embedding(spec.max_len, d, dtype=dtype)
            elif spec.positional == "sinusoidal":
                table = sinusoidal_table(spec.max_len, d).astype(dtype)
                self.position_table = self.params.get_constant(
                    "position_table", mx.nd.array(table, dtype=dtype))
            if spec.type_vocab_size:
                self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, d, dtype=dtype)
            if spec.embedding_norm:
                self.norm = _norm(spec, dtype)
            self.dropout = Dropout(spec.dropout)

    def embed_tokens(self, input_ids):
        """``word_embeddings[input_ids]`` times ``sqrt(d_model)`` if ``embed_scale``: what the
        model's ``inputs_embeds`` stands for. ``(B, T)`` ints -> ``(B, T, D)``."""
        x = self.word_embeddings(input_ids)
        return x * math.sqrt(self.spec.d_model) if self.spec.embed_scale else x

    def hybrid_forward(self, F, input_ids, token_type_ids=None, inputs_embeds=None,
                       past_length=0, position_table=None):
        if inputs_embeds is None and not self._has_table:
            raise InputError("these embeddings have no token table (share_embeddings): give "
                             "inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions = F.contrib.arange_like(x, axis=1, start=past_length)  # (T,) past .. past+T-1
        if self.spec.positional == "learned":
            pos = self.position_embeddings(positions)                    # (T, D)
            x = F.broadcast_add(x, F.expand_dims(pos, axis=0))
        elif self.spec.positional == "sinusoidal":
            pos = F.take(position_table, positions)
            x = F.broadcast_add(x, F.expand_dims(pos, axis=0))
        if self.spec.type_vocab_size:
            if token_type_ids is None:  # all segment 0: one (T, D) block, broadcast over B
                tt = self.token_type_embeddings(F.zeros_like(positions))
                x = F.broadcast_add(x, F.expand_dims(tt, axis=0))
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        if self.spec.embedding_norm:
            x = self.norm(x)
        return self.dropout(x)


class MultiHeadAttention(_SpecLayer):
    """Multi-head attention (Vaswani 2017 §3.2.2; scaling and mask as Hugging Face
    ``BertSelfAttention``; layout as GluonNLP's ``DotProductAttentionCell``, heads folded into
    the batch for ``F.batch_dot``), with grouped-query attention (Ainslie et al. 2023) and
    rotary positions (Su et al. 2021). Self-attention by default; cross-attention (queries from
    ``x``, keys and values from ``key_value_states``) when built with ``cross_attention=True``.

    ``softmax(Q K^T / sqrt(d_head) + attention_bias) V``, then ``out_proj``; ``attention_bias``
    is additive and finite (:func:`allowed_bias`). Dropout on the attention probabilities
    (training only). ``H = n_heads`` query heads and ``H_kv = spec.kv_heads`` key/value heads
    of ``d_head`` each: query head ``h`` reads key/value head ``h // (H / H_kv)`` (each key/value
    head is repeated ``H / H_kv`` times consecutively with ``F.repeat``, Hugging Face
    ``repeat_kv``; not at all when ``H_kv == H``). In self-attention with
    ``positional="rope"`` the new queries and keys are rotated (:class:`RotaryEmbedding`) at
    their absolute positions ``past .. past + T - 1`` before the keys join the cache, so the
    cache holds rotated keys with ``H_kv`` heads.

    Args:
        spec: uses ``d_model, n_heads, n_kv_heads, head_dim, dropout``, the bias switches
            (``spec.has_bias("qkv")``, ``spec.has_bias("out_proj")``) and, for
            self-attention, ``positional`` and the rotary fields.
        cross_attention: cached keys/values (``past_key_value``) are the projected encoder
            output, reused as they are; self-attention appends the new keys/values to them.
            Cross-attention is never rotated.
        dtype: ``"float32"`` or ``"float64"``.

    Children ``q_proj`` (``D -> H d_head``), ``k_proj`` / ``v_proj`` (``D -> H_kv d_head``),
    ``out_proj`` (``H d_head -> D``): ``nn.Dense(flatten=False)``; ``rotary``: a
    :class:`RotaryEmbedding` (self-attention with ``positional="rope"``) or ``None``.

    Call ``(x, attention_bias=None, key_value_states=None, past_key_value=None,
    use_cache=False)``: ``x`` ``(B, T, D)``; ``attention_bias`` broadcastable to
    ``(B, H, T, S)`` (``(B, 1, 1, S)`` key padding, ``(B or 1, 1, T, past + T)`` causal) or
    ``None``; ``key_value_states`` ``(B, S, D)`` (cross-attention); ``past_key_value``
    ``(k, v)`` each ``(B, H_kv, S_past, d_head)`` or ``None`` (imperative calls only). Returns
    ``(B, T, D)``, or ``((B, T, D), (k, v))`` with ``use_cache`` (the keys/values to cache,
    ``(B, H_kv, S, d_head)``).
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype: str = "float32",
                 **kwargs):
        super().__init__(spec, **kwargs)
        self._heads, self._kv_heads, self._d_head = spec.n_heads, spec.kv_heads, spec.d_head
        self.cross_attention = cross_attention
        d, qkv = spec.d_model, spec.has_bias("qkv")
        inner, kv = spec.n_heads * spec.d_head, spec.kv_heads * spec.d_head
        with self.name_scope():
            self.q_proj = _dense(inner, d, qkv, dtype)
            self.k_proj = _dense(kv, d, qkv, dtype)
            self.v_proj = _dense(kv, d, qkv, dtype)
            self.out_proj = _dense(d, inner, spec.has_bias("out_proj"), dtype)
            self.rotary = (RotaryEmbedding(spec, dtype=dtype)
                           if spec.positional == "rope" and not cross_attention else None)
            self.dropout = Dropout(spec.dropout)

    @staticmethod
    def _split_heads(F, x, heads: int):
        # (B, T, heads * dh) -> (B, T, heads, dh) -> (B, heads, T, dh)
        return F.transpose(F.reshape(x, shape=(0, 0, heads, -1)), axes=(0, 2, 1, 3))

    @staticmethod
    def _fold(F, x):
        # (B, H, T, dh) -> (B * H, T, dh), the layout of batch_dot
        return F.reshape(x, shape=(-1, 0, 0), reverse=True)

    def _keys_values(self, F, x, key_value_states, past_key_value, past: int):
        """``(k, v)`` ``(B, H_kv, S, dh)``: the cached encoder projections (cross-attention with
        a cache), or this call's projections (keys rotated at ``past ..``), after the cached
        ones in self-attention."""
        if self.cross_attention and past_key_value is not None:  # projected once
            return past_key_value
        source = key_value_states if self.cross_attention else x
        if source is None:
            raise ValueError("cross-attention needs key_value_states or a cached "
                             "past_key_value")
        k, v = (self._split_heads(F, proj(source), self._kv_heads)
                for proj in (self.k_proj, self.v_proj))
        if self.rotary is not None:
            k = self.rotary(k, past)
        if past_key_value is None:
            return k, v
        return tuple(F.concat(old, new, dim=2) for old, new in zip(past_key_value, (k, v)))

    def hybrid_forward(self, F, x, attention_bias=None, key_value_states=None,
                       past_key_value=None, use_cache=False):
        # positions already cached (a Python int: cached calls run imperatively)
        past = 0 if past_key_value is None else int(past_key_value[0].shape[2])
        q = self._split_heads(F, self.q_proj(x), self._heads)
        if self.rotary is not None:
            q = self.rotary(q, past)
        k, v = self._keys_values(F, x, key_value_states, past_key_value, past)
        keys, values = k, v
        if self._kv_heads != self._heads:  # (B, H_kv, S, dh) -> (B, H, S, dh)
            group = self._heads // self._kv_heads
            keys, values = (F.repeat(t, repeats=group, axis=1) for t in (k, v))
        # Q / sqrt(d_head) before the product (GluonNLP's order): a pass over (B, H, T, d_head)
        # instead of over the (B, H, T, S) scores; the same numbers up to rounding
        q = q / math.sqrt(self._d_head)
        scores = F.batch_dot(self._fold(F, q), self._fold(F, keys), transpose_b=True)
        if attention_bias is not None:
            scores = F.reshape(scores, shape=(-1, self._heads, 0, 0), reverse=True)
            scores = F.broadcast_add(scores, attention_bias)                     # (B, H, T, S)
            scores = F.reshape(scores, shape=(-1, 0, 0), reverse=True)
        probs = F.softmax(scores, axis=-1)                                      # (B*H, T, S)
        # dropout sees the site's shape (B, H, T, S) (xformer.training.dropout_sites), so a
        # stream mask multiplies it as it is; Gluon's own dropout is elementwise either way
        probs = self.dropout(F.reshape(probs, shape=(-1, self._heads, 0, 0), reverse=True))
        probs = F.reshape(probs, shape=(-1, 0, 0), reverse=True)
        ctx = F.batch_dot(probs, self._fold(F, values))                         # (B*H, T, dh)
        ctx = F.reshape(ctx, shape=(-1, self._heads, 0, 0), reverse=True)       # (B, H, T, dh)
        ctx = F.reshape(F.transpose(ctx, axes=(0, 2, 1, 3)), shape=(0, 0, -1))  # (B, T, H dh)
        out = self.out_proj(ctx)
        return (out, (k, v)) if use_cache else out


class Dropout(nn.Dropout):
    """Gluon's ``nn.Dropout`` that can be handed the mask to apply instead of drawing its own:
    the framework-neutral dropout stream of :func:`xformer.training.dropout_masks`, so that a
    training step computes the same numbers on every backend (issue #10; the twin of
    ``xformer_torch.modules.Dropout``).

    With ``mask`` set (an NDArray, see :func:`use_dropout_masks`) the call is ``x * mask``: the
    mask already holds ``keep / (1 - p)`` in the model dtype (inverted dropout, as
    ``F.Dropout`` scales), so nothing is drawn and nothing rescaled, in train and predict mode
    alike (a mask is only given during a training step). With ``mask`` ``None`` (the default)
    it is exactly ``nn.Dropout(rate)``: ``F.Dropout`` draws in ``autograd.train_mode`` and is
    the identity otherwise, imperatively and in a hybridized graph.

    A mask is an NDArray, and a hybridized graph cannot take an NDArray attribute as an input
    (tracing would have to freeze it, and the next call would silently reuse it): a masked
    call must run imperatively, which :func:`use_dropout_masks` arranges (:func:`imperative`,
    the cached graph is kept). Called with ``F`` = ``mx.sym`` while a mask is set, the block
    raises rather than bake the mask in; but a graph already traced does not call
    ``hybrid_forward`` at all, so a mask set directly on a hybridized block would be ignored:
    give masks through :func:`use_dropout_masks`, never by hand to a hybridized model.

    Args:
        rate: the drop probability ``p`` in ``[0, 1)`` (``nn.Dropout``'s ``rate``; the spec's
            ``dropout``).

    Call ``(x)``: any shape, returned in its shape and dtype; ``mask`` exactly ``x``'s shape
    (the site's shape, :func:`xformer.training.dropout_sites`; the attention probabilities
    reach it as ``(B, H, T, S)``) and dtype.

    Raises:
        InputError: a mask whose shape is not ``x``'s (a broadcast would silently reuse it).
        RuntimeError: a mask set while the block runs as a hybridized graph.
    """

    #: The scaled keep mask of the current call, or ``None`` (draw natively).
    mask = None

    def hybrid_forward(self, F, x):
        mask = self.mask
        if mask is None:
            if self._rate == 0:  # nn.Dropout would copy (F.identity): a pass for nothing
                return x
            return super().hybrid_forward(F, x)
        if not isinstance(x, mx.nd.NDArray):
            raise RuntimeError("a Dropout with a stream mask must run imperatively (inside "
                               "use_dropout_masks / imperative): a hybridized graph would "
                               "freeze the mask")
        if mask.shape != x.shape:
            raise InputError(f"dropout mask of shape {tuple(mask.shape)} for an input of shape "
                             f"{tuple(x.shape)}; give the site's exact shape")
        return x * mask


def _named_blocks(block, prefix: str = ""):
    """``(attribute path, block)`` of every descendant of ``block`` (Gluon's registered
    children; ``nn.HybridSequential`` names them ``"0"``, ``"1"``, ...)."""
    for name, child in block._children.items():
        path = f"{prefix}{name}"
        yield path, child
        yield from _named_blocks(child, f"{path}.")


@contextlib.contextmanager
def use_dropout_masks(model: HybridBlock, masks):
    """``with use_dropout_masks(model, masks):`` every :class:`Dropout` named in ``masks`` (its
    attribute path in ``model``, the canonical site name: ``embeddings.dropout``,
    ``decoder.layers.0.self_attn.dropout``, ...; :func:`xformer.training.dropout_sites`)
    multiplies by its mask instead of drawing, and ``model`` runs imperatively
    (:func:`imperative`: a hybridized model keeps its cached graph for later calls, but the
    masked calls cannot go through it, see :class:`Dropout`). On exit (also on error) every
    mask is cleared, and the blocks draw natively and run hybridized again. ``masks`` ``None``
    or empty: nothing changes (a hybridized model stays hybridized).

    Autograd keeps the mask arrays it multiplied by, so ``backward()`` may run after the
    ``with`` block.

    Args:
        model: an :class:`EncoderModel`, :class:`DecoderModel` or :class:`EncoderDecoderModel`
            (any block whose dropout blocks are :class:`Dropout`).
        masks: ``{site: NDArray}`` in the model's dtype and context, each of its site's shape.
    Raises:
        InputError: a site that is not a :class:`Dropout` of ``model`` (a wiring bug, so it is
            loud rather than a silent native draw).
    """
    if not masks:
        yield model
        return
    blocks = dict(_named_blocks(model))
    chosen = []
    for site, mask in masks.items():
        block = blocks.get(site)
        if not isinstance(block, Dropout):
            raise InputError(f"dropout site {site!r} is not a Dropout block of the model")
        chosen.append((block, mask))
    try:
        for block, mask in chosen:
            block.mask = mask
        with imperative(model):
            yield model
    finally:
        for block, _ in chosen:
            block.mask = None


class FeedForward(_SpecLayer):
    """Position-wise feed-forward network (Vaswani 2017 §3.3):
    ``linear2(dropout(act(linear1(x))))``, ``act`` = ``spec.activation``, biases iff
    ``spec.has_bias("mlp")``.

    Children ``linear1`` (``d_model -> d_ff``) and ``linear2`` (``d_ff -> d_model``).
    Call ``(x)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        self._act = ACTIVATIONS[spec.activation]
        self._exact_grad = np.dtype(dtype) == np.float64
        bias = spec.has_bias("mlp")
        with self.name_scope():
            self.linear1 = _dense(spec.d_ff, spec.d_model, bias, dtype)
            self.linear2 = _dense(spec.d_model, spec.d_ff, bias, dtype)
            self.dropout = Dropout(spec.dropout)

    def hybrid_forward(self, F, x):
        hidden = self._act(F, self.linear1(x), exact_grad=self._exact_grad)
        return self.linear2(self.dropout(hidden))


class GatedFeedForward(_SpecLayer):
    """Gated feed-forward network (GLU variants, Shazeer 2020; Hugging Face ``LlamaMLP``,
    SwiGLU with ``activation="silu"``, GeGLU with ``"gelu_tanh"``):
    ``down_proj(dropout(act(gate_proj(x)) * up_proj(x)))``, ``act`` = ``spec.activation``,
    biases iff ``spec.has_bias("mlp")``. Used when ``spec.ffn == "glu"``.

    Children ``gate_proj`` and ``up_proj`` (``d_model -> d_ff``), ``down_proj``
    (``d_ff -> d_model``). Call ``(x)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        self._act = ACTIVATIONS[spec.activation]
        self._exact_grad = np.dtype(dtype) == np.float64
        bias = spec.has_bias("mlp")
        with self.name_scope():
            self.gate_proj = _dense(spec.d_ff, spec.d_model, bias, dtype)
            self.up_proj = _dense(spec.d_ff, spec.d_model, bias, dtype)
            self.down_proj = _dense(spec.d_model, spec.d_ff, bias, dtype)
            self.dropout = Dropout(spec.dropout)

    def hybrid_forward(self, F, x):
        gate = self._act(F, self.gate_proj(x), exact_grad=self._exact_grad)
        return self.down_proj(self.dropout(gate * self.up_proj(x)))


class EncoderLayer(_SpecLayer):
    """One encoder layer: self-attention and feed-forward sub-layers, each through
    :func:`_residual` (post-LN as Vaswani 2017 §3.1 and BERT, pre-LN as GPT-2 and Xiong et al.
    2020), or both from the same input with ``spec.parallel_residual`` (GPT-J, GPT-NeoX
    ``use_parallel_residual``): ``x + dropout1(attn(norm1(x))) + dropout2(ffn(norm2(x)))``.

    Children ``self_attn`` (:class:`MultiHeadAttention`), ``norm1``, ``ffn``
    (:class:`FeedForward`, or :class:`GatedFeedForward` with ``spec.ffn="glu"``), ``norm2``
    (:func:`_norm`: ``spec.norm``), ``dropout1`` / ``dropout2`` (on the residual branches).
    Call ``(x, attention_bias=None)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        self._pre, self._parallel = spec.norm_position == "pre", spec.parallel_residual
        with self.name_scope():
            self.self_attn = MultiHeadAttention(spec, dtype=dtype)
            self.norm1 = _norm(spec, dtype)
            self.ffn = (GatedFeedForward(spec, dtype=dtype) if spec.ffn == "glu" else
                        FeedForward(spec, dtype=dtype))
            self.norm2 = _norm(spec, dtype)
            self.dropout1 = Dropout(spec.dropout)
            self.dropout2 = Dropout(spec.dropout)

    def hybrid_forward(self, F, x, attention_bias=None):
        if self._parallel:
            return (x + self.dropout1(self.self_attn(self.norm1(x), attention_bias))
                    + self.dropout2(self.ffn(self.norm2(x))))
        x = _residual(x, lambda y: self.self_attn(y, attention_bias), self.norm1,
                      self.dropout1, self._pre)
        return _residual(x, self.ffn, self.norm2, self.dropout2, self._pre)


class Encoder(_SpecLayer):
    """``n_layers`` :class:`EncoderLayer` s in ``layers`` (an ``nn.HybridSequential``, so the
    paths are ``layers.0``, ``layers.1``, ...), then ``final_norm`` if ``spec.final_norm``.

    Call ``(x, attention_bias=None)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        with self.name_scope():
            self.layers = _sequential(lambda: EncoderLayer(spec, dtype=dtype), spec.n_layers)
            if spec.final_norm:
                self.final_norm = _norm(spec, dtype)

    def hybrid_forward(self, F, x, attention_bias=None):
        for layer in self.layers:
            x = layer(x, attention_bias)
        return self.final_norm(x) if self.spec.final_norm else x


class Pooler(_SpecLayer):
    """BERT's pooler (Devlin et al. 2019; HF ``BertPooler``): ``tanh(dense(x[:, 0]))``.

    Call ``(x)``: ``(B, T, D)`` -> ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        with self.name_scope():
            self.dense = _dense(spec.d_model, spec.d_model, spec.bias, dtype)

    def hybrid_forward(self, F, x):
        first = F.reshape(F.slice_axis(x, axis=1, begin=0, end=1), shape=(0, -1))  # (B, D)
        return F.tanh(self.dense(first))


class _SpecModel(HybridBlock):
    """What the three top-level models share: ``.spec``, ``.dtype``, the ``embeddings`` (the
    source side's), the key-padding bias, the length check and the graph-structure bookkeeping
    of hybridized calls.

    A hybridized Gluon block traces its graph for one argument structure (which inputs are
    ``None``); these models keep one graph per structure (e.g. ``input_ids`` and
    ``inputs_embeds``) and autograd state (:func:`_call_graph_of_state`), each traced at its
    first call.
    """

    spec: ModelSpec
    #: The ``spec.architecture`` the model needs (``None``: not checked).
    _architecture: str | None = None
    _call_cached_op, _clear_cached_op = _call_graph_of_state, _clear_graphs

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        if self._architecture and spec.architecture != self._architecture:
            raise ValueError(f"{type(self).__name__} needs architecture="
                             f"{self._architecture!r}, got {spec.architecture!r}")
        super().__init__(**kwargs)
        self.spec, self.dtype = spec, np.dtype(dtype).name
        self._mask_value = float(np.finfo(self.dtype).min)
        with self.name_scope():  # every model's first child: the (source) embeddings
            self.embeddings = Embeddings(spec, dtype=self.dtype)

    def _check_length(self, x, past: int = 0) -> None:
        if isinstance(x, mx.nd.NDArray) and past + x.shape[1] > self.spec.max_len:
            what = (f"sequence length {x.shape[1]}" if not past else
                    f"{past} cached + {x.shape[1]} new positions")
            raise InputError(f"{what} is longer than max_len={self.spec.max_len}; shorten the "
                             f"input (xformer does not truncate silently)")

    def _run(self, args, cached: bool = False):
        """Run ``hybrid_forward``: through the hybridized graph of the ``None`` structure of
        ``args`` (Gluon traces one graph per argument structure) or, for cached decoding,
        imperatively."""
        if cached:
            with imperative(self):
                return super().__call__(*args)
        self.__dict__["_structure"] = tuple(a is None for a in args)
        return super().__call__(*args)

    def key_padding_bias(self, F, attention_mask=None):
        """``(B, 1, 1, S)`` key-padding bias (encoder self-attention, cross-attention) of a
        ``(B, S)`` 0/1 mask, in the compute dtype: the dtype's most negative *finite* number
        where masked, never ``-inf`` (docs/design.md §3); ``None`` for ``None``."""
        if attention_mask is None:
            return None
        mask = F.cast(attention_mask, dtype=self.dtype)
        return allowed_bias(F.reshape(mask, shape=(0, 1, 1, -1)), self._mask_value)


class EncoderModel(_SpecModel):
    """The BERT-like encoder of a :class:`~xformer.spec.ModelSpec`: :class:`Embeddings`,
    :class:`Encoder` and, with ``head="pooler"``, :class:`Pooler`.

    Args:
        spec: the model (``spec.architecture == "encoder"``).
        dtype: ``"float32"`` or ``"float64"`` for every parameter, constant and activation.

    Call (Hugging Face argument names; keywords accepted, unlike plain Gluon blocks)::

        model(input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None)

    * ``input_ids`` ``(B, T)`` integers in ``[0, vocab_size)``, or ``inputs_embeds``
      ``(B, T, D)`` in ``dtype``: the token embeddings *after* ``embed_scale``;
    * ``attention_mask`` ``(B, T)``, 1 = attend, 0 = padding; ``None`` = all ones;
    * ``token_type_ids`` ``(B, T)`` integers; ``None`` = all zeros (only with
      ``type_vocab_size > 0``).

    Returns ``last_hidden_state`` ``(B, T, D)``, or the tuple ``(last_hidden_state,
    pooler_output (B, D))`` with ``head="pooler"`` (a tuple, as GluonNLP's ``BERTModel``, so the
    block hybridizes). Dropout is active only in ``autograd.train_mode()``.

    Raises:
        InputError: neither or both of ``input_ids`` and ``inputs_embeds``; a sequence longer
            than ``spec.max_len`` (checked when called on NDArrays, whose length is known).
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, dtype, **kwargs)
        with self.name_scope():
            self.encoder = Encoder(spec, dtype=self.dtype)
            if spec.head == "pooler":
                self.pooler = Pooler(spec, dtype=self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None,
                 inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        self._check_length(input_ids if input_ids is not None else inputs_embeds)
        return self._run((input_ids, attention_mask, token_type_ids, inputs_embeds))

    def embed_tokens(self, input_ids):
        """``inputs_embeds`` for ``input_ids`` (the scaled token embeddings)."""
        return self.embeddings.embed_tokens(input_ids)

    def hybrid_forward(self, F, input_ids, attention_mask=None, token_type_ids=None,
                       inputs_embeds=None):
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        x = self.encoder(x, self.key_padding_bias(F, attention_mask))
        return (x, self.pooler(x)) if self.spec.head == "pooler" else x


# ---------------------------------------------------------------------- decoders
class DecoderLayer(_SpecLayer):
    """One decoder layer: causal self-attention (``self_attn``, ``norm1``), cross-attention over
    the encoder output (``cross_attn``, ``norm2``; encoder-decoders only) and the feed-forward
    network (``ffn``, ``norm2``, or ``norm3`` after cross-attention), each sub-layer through
    :func:`_residual` as in :class:`EncoderLayer` (``nn.TransformerDecoderLayer``'s names), or,
    with ``spec.parallel_residual`` (decoders only, no cross-attention; GPT-NeoX),
    ``x + dropout1(attn(norm1(x))) + dropout2(ffn(norm2(x)))``. ``ffn`` is a
    :class:`GatedFeedForward` with ``spec.ffn="glu"``; the norms follow ``spec.norm``.

    Args:
        spec: as :class:`EncoderLayer`.
        cross_attention: with a cross-attention sub-layer (the decoder of an encoder-decoder).
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(x, attention_bias=None, encoder_hidden_states=None, encoder_attention_bias=None,
    past_key_value=None, use_cache=False)``: ``x`` ``(B, T, D)``; ``attention_bias``
    ``(B or 1, 1, T, past + T)`` (causal and padding, :func:`allowed_bias`);
    ``encoder_hidden_states`` ``(B, S, D)`` and ``encoder_attention_bias`` ``(B, 1, 1, S)``
    (cross-attention); ``past_key_value`` ``(k, v)`` or ``(k, v, cross_k, cross_v)``, each
    ``(B, H_kv, past, d_head)`` (imperative calls only; self-attention keys already rotated).
    Returns ``(B, T, D)``, or ``((B, T, D), present)`` with ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype: str = "float32",
                 **kwargs):
        super().__init__(spec, **kwargs)
        self._pre, self._parallel = spec.norm_position == "pre", spec.parallel_residual
        self.cross_attention = cross_attention
        with self.name_scope():
            self.self_attn = MultiHeadAttention(spec, dtype=dtype)
            self.norm1 = _norm(spec, dtype)
            if cross_attention:
                self.cross_attn = MultiHeadAttention(spec, cross_attention=True, dtype=dtype)
                self.norm2 = _norm(spec, dtype)
            self.ffn = (GatedFeedForward(spec, dtype=dtype) if spec.ffn == "glu" else
                        FeedForward(spec, dtype=dtype))
            if cross_attention:
                self.norm3 = _norm(spec, dtype)
            else:
                self.norm2 = _norm(spec, dtype)
            self.dropout1 = Dropout(spec.dropout)
            self.dropout2 = Dropout(spec.dropout)
            self.dropout3 = Dropout(spec.dropout)

    def hybrid_forward(self, F, x, attention_bias=None, encoder_hidden_states=None,
                       encoder_attention_bias=None, past_key_value=None, use_cache=False):
        past = tuple(past_key_value or ())
        present = []

        def attention(block, bias, states, cached):
            def sublayer(y):
                y, kv = block(y, bias, states, cached or None, True)
                present.extend(kv)
                return y
            return sublayer

        self_attention = attention(self.self_attn, attention_bias, None, past[:2])
        if self._parallel:  # no cross-attention (the spec refuses it for encoder-decoders)
            x = (x + self.dropout1(self_attention(self.norm1(x)))
                 + self.dropout2(self.ffn(self.norm2(x))))
            return (x, tuple(present)) if use_cache else x
        x = _residual(x, self_attention, self.norm1, self.dropout1, self._pre)
        if not self.cross_attention:
            x = _residual(x, self.ffn, self.norm2, self.dropout2, self._pre)
        else:
            x = _residual(x, attention(self.cross_attn, encoder_attention_bias,
                                       encoder_hidden_states, past[2:]),
                          self.norm2, self.dropout2, self._pre)
            x = _residual(x, self.ffn, self.norm3, self.dropout3, self._pre)
        return (x, tuple(present)) if use_cache else x


class Decoder(_SpecLayer):
    """``spec.decoder_layers`` :class:`DecoderLayer` s in ``layers`` (``layers.0``, ...), then
    ``final_norm`` if ``spec.final_norm``.

    Call ``(x, attention_bias=None, encoder_hidden_states=None, encoder_attention_bias=None,
    past_key_values=None, use_cache=False)`` as :class:`DecoderLayer`, ``past_key_values`` one
    entry per layer. Returns ``(B, T, D)``, or ``((B, T, D), past_key_values)`` with
    ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype: str = "float32",
                 **kwargs):
        super().__init__(spec, **kwargs)
        with self.name_scope():
            self.layers = _sequential(
                lambda: DecoderLayer(spec, cross_attention=cross_attention, dtype=dtype),
                spec.decoder_layers)
            if spec.final_norm:
                self.final_norm = _norm(spec, dtype)

    def hybrid_forward(self, F, x, attention_bias=None, encoder_hidden_states=None,
                       encoder_attention_bias=None, past_key_values=None, use_cache=False):
        presents = []
        for i, layer in enumerate(self.layers):
            past = None if past_key_values is None else past_key_values[i]
            x, present = layer(x, attention_bias, encoder_hidden_states, encoder_attention_bias,
                               past, True)
            presents.append(present)
        if self.spec.final_norm:
            x = self.final_norm(x)
        return (x, tuple(presents)) if use_cache else x


class LMHead(_SpecLayer):
    """Language-model head (GPT-2's ``lm_head``): ``logits = x W^T``, no bias, no scale
    (``F.FullyConnected(no_bias=True)``, the op of ``nn.Dense``).

    Args:
        spec: uses ``vocab_size, d_model``.
        tied: hold no parameter: the caller passes the (target-side) token table as
            ``tied_weight`` (``tie_embeddings``), so the tied table is one Gluon ``Parameter``
            whose gradient sums both uses.
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(x, tied_weight=None)``: ``(B, T, D)`` -> ``(B, T, vocab_size)`` (Gluon adds the
    untied head's own ``weight``).
    """

    def __init__(self, spec: ModelSpec, tied: bool = False, dtype: str = "float32", **kwargs):
        super().__init__(spec, **kwargs)
        if not tied:
            with self.name_scope():
                self.weight = self.params.get("weight", shape=(spec.vocab_size, spec.d_model),
                                              dtype=dtype, init=mx.init.Normal(0.02))

    def hybrid_forward(self, F, x, tied_weight=None, weight=None):
        w = weight if tied_weight is None else tied_weight
        return F.FullyConnected(x, w, no_bias=True, num_hidden=self.spec.vocab_size,
                                flatten=False)


class _CausalModel(_SpecModel):
    """What :class:`DecoderModel` and :class:`EncoderDecoderModel` share: the causal
    self-attention bias, the LM head over the target side's token table and
    the packing of the outputs."""

    def self_attention_bias(self, F, x, attention_mask=None, past_length: int = 0):
        """Causal self-attention bias ``(B or 1, 1, T, past + T)``: padding (``attention_mask``
        ``(B, past + T)``, 1 = attend) times causality, then one :func:`allowed_bias`."""
        mask = None if attention_mask is None else F.cast(attention_mask, dtype=self.dtype)
        allowed = causal_allowed(F, x, x if mask is None else mask, past_length)  # (T, S)
        allowed = F.expand_dims(F.expand_dims(allowed, axis=0), axis=0)  # (1, 1, T, S)
        if mask is not None:
            allowed = F.broadcast_mul(F.reshape(mask, shape=(0, 1, 1, -1)), allowed)
        return allowed_bias(allowed, self._mask_value)

    def target_word_embeddings(self) -> Embeddings:
        """The :class:`Embeddings` whose token table the target side looks up and a tied LM
        head multiplies by."""
        return self.embeddings

    def _outputs(self, F, outputs: list, presents, use_cache: bool):
        """``outputs`` (``last_hidden_state`` first), then ``logits`` with ``head="lm"`` and
        ``past_key_values`` with ``use_cache``: a tuple, or the one output alone."""
        if self.spec.head == "lm":
            x, tied = outputs[0], None
            if self.spec.tie_embeddings:  # the same Parameter as the token lookup
                param = self.target_word_embeddings().word_embeddings.weight
                tied = param.var() if isinstance(x, mx.sym.Symbol) else param.data(x.context)
            outputs.append(self.lm_head(x, tied))
        if use_cache:
            outputs.append(presents)
        return tuple(outputs) if len(outputs) > 1 else outputs[0]


class DecoderModel(_CausalModel):
    """The whole decoder (GPT-like): :class:`Embeddings` -> :class:`Decoder` (causal
    self-attention) -> (:class:`LMHead`), called with Hugging Face's argument names.

    Canonical names are the Gluon attribute paths (:func:`canonical_parameters`); a tied LM
    head adds no parameter: it multiplies by ``embeddings.word_embeddings.weight``.

    Args:
        spec: the model (``spec.architecture == "decoder"``).
        dtype: ``"float32"`` or ``"float64"``.

    Call (keywords accepted)::

        model(input_ids=None, attention_mask=None, inputs_embeds=None,
              past_key_values=None, use_cache=False)

    * ``input_ids`` ``(B, T)`` or ``inputs_embeds`` ``(B, T, D)`` (already scaled);
    * ``attention_mask`` ``(B, past + T)``, 1 = attend, 0 = padding; ``None`` = all ones;
    * ``past_key_values``: what a previous call with ``use_cache=True`` returned (per layer
      ``(k, v)`` ``(B, H_kv, past, d_head)``); positions then start at ``past``;
    * ``use_cache``: also return the new ``past_key_values`` (``past + T`` long).

    Returns, as a tuple (a single NDArray when it is one), the outputs of
    ``spec.output_names()``: ``last_hidden_state`` ``(B, T, D)``, ``logits``
    ``(B, T, vocab_size)`` with ``head="lm"``, then ``past_key_values`` with ``use_cache``.
    Full-sequence calls run through the hybridized graph when the block is hybridized; calls
    with ``past_key_values`` or ``use_cache`` run imperatively (:func:`imperative`), and the
    hybridized graph is kept.

    Raises:
        InputError: neither or both of ``input_ids`` / ``inputs_embeds``; ``past + T >
            max_len``.

    Example::

        >>> model = DecoderModel(ModelSpec.preset("gpt2-tiny"), dtype="float64")
        >>> model.initialize(mx.init.Normal(0.02))
        >>> hidden, logits, cache = model(input_ids=mx.nd.array([[1, 2, 3]]), use_cache=True)
        >>> hidden, logits, cache = model(input_ids=mx.nd.array([[4]]), past_key_values=cache,
        ...                               use_cache=True)
        >>> logits.shape
        (1, 1, 1000)
    """

    _architecture = "decoder"

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, dtype, **kwargs)
        with self.name_scope():
            self.decoder = Decoder(spec, dtype=self.dtype)
            if spec.head == "lm":
                self.lm_head = LMHead(spec, tied=spec.tie_embeddings, dtype=self.dtype)

    def embed_tokens(self, input_ids):
        """``inputs_embeds`` for ``input_ids`` (the scaled token embeddings)."""
        return self.embeddings.embed_tokens(input_ids)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                 past_key_values=None, use_cache=False):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        x = input_ids if input_ids is not None else inputs_embeds
        past = cache_length(past_key_values)
        self._check_length(x, past)
        cached = past_key_values is not None or bool(use_cache)
        if cached and attention_mask is None:
            attention_mask = mx.nd.ones((x.shape[0], past + x.shape[1]), ctx=x.context,
                                        dtype=self.dtype)
        args = (input_ids, attention_mask, inputs_embeds)
        return self._run(args + (past_key_values, bool(use_cache)) if cached else args, cached)

    def hybrid_forward(self, F, input_ids, attention_mask=None, inputs_embeds=None,
                       past_key_values=None, use_cache=False):
        past = cache_length(past_key_values)
        x = self.embeddings(input_ids, None, inputs_embeds, past)
        bias = self.self_attention_bias(F, x, attention_mask, past)
        x, presents = self.decoder(x, bias, None, None, past_key_values, True)
        return self._outputs(F, [x], presents, use_cache)


class EncoderDecoderModel(_CausalModel):
    """The encoder-decoder (Vaswani 2017): source :class:`Embeddings` (``embeddings``) ->
    :class:`Encoder`; target :class:`Embeddings` (``decoder_embeddings``) -> :class:`Decoder`
    (causal self-attention, cross-attention over the encoder output) -> (:class:`LMHead`).

    With ``share_embeddings`` the target side looks up ``embeddings.word_embeddings`` (and
    ``decoder_embeddings`` has no token table); a tied LM head multiplies by the target side's
    table and adds no parameter.

    Args:
        spec: the model (``spec.architecture == "encoder-decoder"``).
        dtype: ``"float32"`` or ``"float64"``.

    Call (keywords accepted)::

        model(input_ids=None, attention_mask=None, inputs_embeds=None,
              decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None,
              encoder_outputs=None, past_key_values=None, use_cache=False)

    * the source: ``input_ids`` / ``inputs_embeds`` and ``attention_mask`` as
      :class:`EncoderModel` (the mask is also the cross-attention's key padding);
    * the target: ``decoder_input_ids`` / ``decoder_inputs_embeds`` and
      ``decoder_attention_mask`` ``(B, past + T)`` as :class:`DecoderModel`;
    * ``encoder_outputs`` ``(B, S, D)``: an encoder output to reuse instead of running the
      encoder;
    * ``past_key_values``: per decoder layer ``(k, v, cross_k, cross_v)``; with it the encoder
      is not needed (the cross keys/values are cached), but ``attention_mask`` (the source's)
      still is if the source has padding; ``use_cache``: also return them.

    Returns, as a tuple: ``last_hidden_state`` ``(B, T, D)`` (the decoder's),
    ``encoder_last_hidden_state`` ``(B, S, D)`` (``None`` in a cached step that neither ran the
    encoder nor got ``encoder_outputs``), ``logits`` with ``head="lm"``, then
    ``past_key_values`` with ``use_cache``. Hybridized and cached calls as
    :class:`DecoderModel`.

    Raises:
        InputError: neither or both of ids / embeddings on a side; a sequence over ``max_len``.
    """

    _architecture = "encoder-decoder"

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(spec, dtype, **kwargs)
        with self.name_scope():
            self.decoder_embeddings = Embeddings(spec, word_embeddings=not spec.share_embeddings,
                                                 dtype=self.dtype)
            self.encoder = Encoder(spec, dtype=self.dtype)
            self.decoder = Decoder(spec, cross_attention=True, dtype=self.dtype)
            if spec.head == "lm":
                self.lm_head = LMHead(spec, tied=spec.tie_embeddings, dtype=self.dtype)

    def target_word_embeddings(self) -> Embeddings:
        return self.embeddings if self.spec.share_embeddings else self.decoder_embeddings

    def embed_tokens(self, input_ids):
        """Source ``inputs_embeds`` for ``input_ids``."""
        return self.embeddings.embed_tokens(input_ids)

    def embed_decoder_tokens(self, decoder_input_ids):
        """Target ``decoder_inputs_embeds`` for ``decoder_input_ids``."""
        return self.target_word_embeddings().embed_tokens(decoder_input_ids)

    def __call__(self, input_ids=None, attention_mask=None, inputs_embeds=None,
                 decoder_input_ids=None, decoder_attention_mask=None,
                 decoder_inputs_embeds=None, encoder_outputs=None, past_key_values=None,
                 use_cache=False):
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise InputError("give exactly one of decoder_input_ids (B, T) and "
                             "decoder_inputs_embeds (B, T, D)")
        cached_cross = bool(past_key_values) and len(past_key_values[0]) == 4
        if encoder_outputs is not None or cached_cross:
            input_ids = inputs_embeds = None  # the encoder does not run
        elif (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, S) and inputs_embeds (B, S, D)")
        else:
            self._check_length(input_ids if input_ids is not None else inputs_embeds)
        y = decoder_input_ids if decoder_input_ids is not None else decoder_inputs_embeds
        past = cache_length(past_key_values)
        self._check_length(y, past)
        cached = past_key_values is not None or bool(use_cache)
        if cached and decoder_attention_mask is None:
            decoder_attention_mask = mx.nd.ones((y.shape[0], past + y.shape[1]),
                                                ctx=y.context, dtype=self.dtype)
        args = (input_ids, attention_mask, inputs_embeds, decoder_input_ids,
                decoder_attention_mask, decoder_inputs_embeds, encoder_outputs)
        return self._run(args + (past_key_values, bool(use_cache)) if cached else args, cached)

    def hybrid_forward(self, F, input_ids, attention_mask=None, inputs_embeds=None,
                       decoder_input_ids=None, decoder_attention_mask=None,
                       decoder_inputs_embeds=None, encoder_outputs=None, past_key_values=None,
                       use_cache=False):
        source_bias = self.key_padding_bias(F, attention_mask)
        memory = encoder_outputs
        if memory is None and (input_ids is not None or inputs_embeds is not None):
            memory = self.encoder(self.embeddings(input_ids, None, inputs_embeds), source_bias)
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.embed_decoder_tokens(decoder_input_ids)
        past = cache_length(past_key_values)
        y = self.decoder_embeddings(None, None, decoder_inputs_embeds, past)
        bias = self.self_attention_bias(F, y, decoder_attention_mask, past)
        y, presents = self.decoder(y, bias, memory, source_bias, past_key_values, True)
        return self._outputs(F, [y, memory], presents, use_cache)


def canonical_parameters(model: EncoderModel) -> dict:
    """``{canonical name: gluon.Parameter}`` of a model, in ``spec.parameters()`` order.

    Names are the attribute paths of ``model._collect_params_with_prefix()`` with LayerNorm
    ``gamma`` / ``beta`` renamed ``weight`` / ``bias`` (RMSNorm's ``weight``, the FFN's
    ``gate_proj`` / ``up_proj`` / ``down_proj`` are named as they are); ``Constant`` s (the
    sinusoidal table, the rotary ``cos`` / ``sin``) and, without a norm bias
    (``spec.has_bias("norm")``), LayerNorm's frozen zero ``beta`` are left out.

    Raises:
        RuntimeError: the model's parameter names or shapes do not match ``spec.parameters()``
            (a bug).
    """
    found = {}
    for path, param in model._collect_params_with_prefix().items():
        if isinstance(param, Constant):
            continue
        head, _, leaf = path.rpartition(".")
        if leaf in ("gamma", "beta"):
            if leaf == "beta" and not model.spec.has_bias("norm"):
                continue
            path = f"{head}.{'weight' if leaf == 'gamma' else 'bias'}"
        found[path] = param
    expected = model.spec.parameter_shapes()
    if set(found) != set(expected):
        raise RuntimeError(f"Gluon parameters {sorted(set(found) - set(expected))} are not "
                           f"canonical; missing {sorted(set(expected) - set(found))}")
    wrong = {n: (found[n].shape, s) for n, s in expected.items() if found[n].shape != tuple(s)}
    if wrong:
        raise RuntimeError(f"Gluon parameter shapes (found, canonical) differ: {wrong}")
    return {name: found[name] for name in expected}
