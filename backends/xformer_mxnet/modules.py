"""The encoder as Gluon ``HybridBlock``s (Apache MXNet 1.9.1), twin of ``xformer_torch.modules``.

Same class names, same order, same attribute paths as the other two backends, so a reader can
diff the files block by block (the pattern of Sockeye's ``layers.py`` / ``layers_pt.py``). The
blocks follow GluonNLP's ``BERTEncoder`` / ``MultiHeadAttentionCell``: children made inside
``with self.name_scope():``, ``hybrid_forward(self, F, ...)`` so that the same code runs
imperatively and, after ``hybridize()``, as one cached graph.

Numerics are those of ``xformer.reference`` (DESIGN.md §3), op for op:

* every ``nn.Dense`` has ``flatten=False`` (the Gluon default flattens ``(B, T, D)`` to
  ``(B, T * D)``) and its weight is ``(out_features, in_features)``, the canonical layout;
* :class:`LayerNorm` is Gluon's ``nn.LayerNorm(epsilon=spec.norm_eps)`` (never the Gluon
  default ``1e-5``), composed from ``F.mean`` / ``F.sqrt`` in float64 because the fused
  operator takes ``eps`` as a C++ ``float``; with ``spec.bias=False`` its ``beta`` stays a
  frozen zero (``grad_req="null"``) and is no canonical parameter;
* GELU is composed from ``F.erf`` / ``F.tanh``: ``LeakyReLU(act_type="gelu")`` is off by ~3e-7
  even in float64 (DESIGN.md §5); in float64 ``erf``'s gradient is recomputed
  (:func:`erf_exact_grad`): MXNet's own is off by 3e-8;
* the dtype is explicit everywhere: ``Dense`` and ``Embedding`` get ``dtype=``, ``LayerNorm``
  (which has no ``dtype`` argument) is ``cast``, the sinusoidal table is a ``Constant`` of the
  compute dtype, the attention mask is cast to it.

Canonical names are the Gluon attribute paths (``block._collect_params_with_prefix()``), with
LayerNorm ``gamma`` / ``beta`` read as ``weight`` / ``bias``: see :func:`canonical_parameters`.

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

import math
import warnings

import numpy as np

with warnings.catch_warnings():  # MXNet 1.9.1 uses np.bool, gone in numpy >= 1.24 (DESIGN.md §5)
    warnings.simplefilter("ignore", FutureWarning)
    if not hasattr(np, "bool"):
        np.bool = np.bool_

import mxnet as mx  # noqa: E402
from mxnet.gluon import HybridBlock, nn  # noqa: E402
from mxnet.gluon.parameter import Constant  # noqa: E402

from xformer.errors import InputError  # noqa: E402
from xformer.spec import ModelSpec, sinusoidal_table  # noqa: E402

__all__ = ["erf_exact_grad", "gelu", "gelu_tanh", "relu", "LayerNorm", "Embeddings",
           "MultiHeadAttention", "FeedForward", "EncoderLayer", "Encoder", "Pooler",
           "EncoderModel", "canonical_parameters"]


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
    """Exact GELU ``0.5 x (1 + erf(x / sqrt 2))`` (Hendrycks & Gimpel 2016), from ``F.erf``.

    ``F`` is ``mx.nd`` or ``mx.sym``; any shape, the dtype of ``x``. Not
    ``LeakyReLU(act_type="gelu")``, which is off by ~3e-7 in float64. ``exact_grad``: use
    :func:`erf_exact_grad` (float64 models do; it costs three more elementwise ops).
    """
    erf = erf_exact_grad(F, x / math.sqrt(2.0)) if exact_grad else F.erf(x / math.sqrt(2.0))
    return 0.5 * x * (1.0 + erf)


def gelu_tanh(F, x, exact_grad: bool = False):
    """Tanh GELU ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016;
    GPT-2's ``gelu_new``), from ``F.tanh`` (whose gradient is exact: ``exact_grad`` is unused);
    any shape, the dtype of ``x``."""
    return 0.5 * x * (1.0 + F.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(F, x, exact_grad: bool = False):
    """``max(x, 0)`` (``F.relu``); ``exact_grad`` is unused."""
    return F.relu(x)


_ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def _dense(spec: ModelSpec, units: int, in_units: int, dtype: str) -> nn.Dense:
    return nn.Dense(units, in_units=in_units, use_bias=spec.bias, flatten=False, dtype=dtype)


class LayerNorm(nn.LayerNorm):
    """Gluon's ``nn.LayerNorm`` (same ``gamma`` / ``beta`` parameters) over the last axis, with
    ``epsilon=spec.norm_eps``, ``center=spec.bias`` and the model dtype; Ba et al. 2016:
    ``(x - mean) / sqrt(var + eps) * gamma + beta``, biased variance.

    In float64 the formula is composed from ``F.mean`` / ``F.sqrt`` in the reference's op
    order, because MXNet 1.9.1's fused ``LayerNorm`` operator is not float64 end to end: its
    ``eps`` is a C++ ``float`` (``eps=1e-5`` becomes ``1e-5 - 2.5e-14``: ~1e-13 relative error
    in the output, ~7e-10 with ``eps=0.1``) and it computes the variance in one pass (1.9e-13 for
    inputs with mean 1000). float32 uses the fused operator. ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(axis=-1, epsilon=spec.norm_eps, center=spec.bias, scale=True,
                         in_channels=spec.d_model, **kwargs)
        self.cast(dtype)  # Gluon's LayerNorm has no dtype argument
        self._composed = np.dtype(dtype) == np.float64

    def hybrid_forward(self, F, data, gamma, beta):
        if not self._composed:
            return super().hybrid_forward(F, data, gamma, beta)
        centered = F.broadcast_sub(data, F.mean(data, axis=-1, keepdims=True))
        var = F.mean(F.square(centered), axis=-1, keepdims=True)
        y = F.broadcast_mul(F.broadcast_div(centered, F.sqrt(var + self._epsilon)), gamma)
        return F.broadcast_add(y, beta)  # a frozen zero when not center, as the fused op does


# ---------------------------------------------------------------------- blocks
class Embeddings(HybridBlock):
    """Token + position (+ segment) embeddings, then LayerNorm (BERT, Devlin et al. 2019 §3.2)
    and dropout.

    ``x = word_embeddings[input_ids] * s + positions[:T] (+ token_type_embeddings[ids])``, with
    ``s = sqrt(d_model)`` if ``spec.embed_scale`` (Vaswani 2017 §3.4) else 1; positions are the
    learned table ``position_embeddings`` or the fixed ``sinusoidal_table`` (Vaswani 2017 §3.5),
    held as a non-trainable ``Constant`` ``position_table`` in the compute dtype.

    Args:
        spec: the model; uses ``vocab_size, d_model, max_len, positional, type_vocab_size,
            embedding_norm, embed_scale, norm_eps, bias, dropout``.
        dtype: ``"float32"`` or ``"float64"``.

    Call ``(input_ids, token_type_ids=None, inputs_embeds=None)``: ``input_ids`` ``(B, T)``
    integers, or ``None`` with ``inputs_embeds`` ``(B, T, D)`` (already scaled, ``dtype``);
    ``token_type_ids`` ``(B, T)`` integers or ``None`` (all zeros). Returns ``(B, T, D)``.
    Token ids out of range are clipped by MXNet's ``Embedding`` (check them first:
    ``xformer.backend.check_inputs``).
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self._spec = spec
        d = spec.d_model
        with self.name_scope():
            self.word_embeddings = nn.Embedding(spec.vocab_size, d, dtype=dtype)
            if spec.positional == "learned":
                self.position_embeddings = nn.Embedding(spec.max_len, d, dtype=dtype)
            else:
                table = sinusoidal_table(spec.max_len, d).astype(dtype)
                self.position_table = self.params.get_constant(
                    "position_table", mx.nd.array(table, dtype=dtype))
            if spec.type_vocab_size:
                self.token_type_embeddings = nn.Embedding(spec.type_vocab_size, d, dtype=dtype)
            if spec.embedding_norm:
                self.norm = LayerNorm(spec, dtype)
            self.dropout = nn.Dropout(spec.dropout)

    def embed_tokens(self, input_ids):
        """``word_embeddings[input_ids]`` times ``sqrt(d_model)`` if ``embed_scale``: what the
        model's ``inputs_embeds`` stands for. ``(B, T)`` ints -> ``(B, T, D)``."""
        x = self.word_embeddings(input_ids)
        return x * math.sqrt(self._spec.d_model) if self._spec.embed_scale else x

    def hybrid_forward(self, F, input_ids, token_type_ids=None, inputs_embeds=None,
                       position_table=None):
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        positions = F.contrib.arange_like(x, axis=1)                     # (T,)
        if self._spec.positional == "learned":
            pos = self.position_embeddings(positions)                    # (T, D)
        else:
            pos = F.take(position_table, positions)
        x = F.broadcast_add(x, F.expand_dims(pos, axis=0))
        if self._spec.type_vocab_size:
            if token_type_ids is None:  # all segment 0: one (T, D) block, broadcast over B
                tt = self.token_type_embeddings(F.zeros_like(positions))
                x = F.broadcast_add(x, F.expand_dims(tt, axis=0))
            else:
                x = x + self.token_type_embeddings(token_type_ids)
        if self._spec.embedding_norm:
            x = self.norm(x)
        return self.dropout(x)


class MultiHeadAttention(HybridBlock):
    """Multi-head self-attention (Vaswani 2017 §3.2.2; scaling and mask as Hugging Face
    ``BertSelfAttention``; layout as GluonNLP's ``DotProductAttentionCell``).

    ``softmax(Q K^T / sqrt(d_head) + mask_bias) V``, heads split as ``(B, T, H, d_head)``, then
    ``out_proj``. ``mask_bias`` is ``(1 - attention_mask) * finfo(dtype).min`` shaped
    ``(B, 1, 1, T)`` (see :meth:`EncoderModel.mask_bias`): finite, so a fully padded row gives
    uniform attention, never NaN. Dropout on the attention probabilities (training only).

    Children ``q_proj, k_proj, v_proj, out_proj``: ``nn.Dense(d_model, flatten=False)``.

    Call ``(x, mask_bias=None)``: ``x`` ``(B, T, D)``; ``mask_bias`` ``(B, 1, 1, T)`` or ``None``
    (no padding). Returns ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self._heads, self._d_head = spec.n_heads, spec.d_head
        d = spec.d_model
        with self.name_scope():
            self.q_proj = _dense(spec, d, d, dtype)
            self.k_proj = _dense(spec, d, d, dtype)
            self.v_proj = _dense(spec, d, d, dtype)
            self.out_proj = _dense(spec, d, d, dtype)
            self.dropout = nn.Dropout(spec.dropout)

    def _split_heads(self, F, x):
        # (B, T, D) -> (B, T, H, dh) -> (B, H, T, dh) -> (B * H, T, dh)
        x = F.transpose(F.reshape(x, shape=(0, 0, self._heads, -1)), axes=(0, 2, 1, 3))
        return F.reshape(x, shape=(-1, 0, 0), reverse=True)

    def hybrid_forward(self, F, x, mask_bias=None):
        q, k, v = (self._split_heads(F, proj(x)) for proj in (self.q_proj, self.k_proj,
                                                              self.v_proj))
        scores = F.batch_dot(q, k, transpose_b=True) / math.sqrt(self._d_head)  # (B*H, T, T)
        if mask_bias is not None:
            scores = F.reshape(scores, shape=(-1, self._heads, 0, 0), reverse=True)
            scores = F.broadcast_add(scores, mask_bias)                          # (B, H, T, T)
            scores = F.reshape(scores, shape=(-1, 0, 0), reverse=True)
        probs = self.dropout(F.softmax(scores, axis=-1))
        ctx = F.batch_dot(probs, v)                                             # (B*H, T, dh)
        ctx = F.reshape(ctx, shape=(-1, self._heads, 0, 0), reverse=True)       # (B, H, T, dh)
        ctx = F.reshape(F.transpose(ctx, axes=(0, 2, 1, 3)), shape=(0, 0, -1))  # (B, T, D)
        return self.out_proj(ctx)


class FeedForward(HybridBlock):
    """Position-wise feed-forward network (Vaswani 2017 §3.3):
    ``linear2(dropout(act(linear1(x))))``, ``act`` = ``spec.activation``.

    Children ``linear1`` (``d_model -> d_ff``) and ``linear2`` (``d_ff -> d_model``).
    Call ``(x)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self._act = _ACTIVATIONS[spec.activation]
        self._exact_grad = np.dtype(dtype) == np.float64
        with self.name_scope():
            self.linear1 = _dense(spec, spec.d_ff, spec.d_model, dtype)
            self.linear2 = _dense(spec, spec.d_model, spec.d_ff, dtype)
            self.dropout = nn.Dropout(spec.dropout)

    def hybrid_forward(self, F, x):
        hidden = self._act(F, self.linear1(x), exact_grad=self._exact_grad)
        return self.linear2(self.dropout(hidden))


class EncoderLayer(HybridBlock):
    """One encoder layer: self-attention and feed-forward sub-layers with residuals.

    post-LN (Vaswani 2017 §3.1, BERT): ``x = norm1(x + drop(attn(x)))``,
    ``x = norm2(x + drop(ffn(x)))``; pre-LN (GPT-2, Xiong et al. 2020):
    ``x = x + drop(attn(norm1(x)))``, ``x = x + drop(ffn(norm2(x)))``.

    Children ``self_attn`` (:class:`MultiHeadAttention`), ``norm1``, ``ffn``
    (:class:`FeedForward`), ``norm2``. Call ``(x, mask_bias=None)``: ``(B, T, D)`` ->
    ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self._pre = spec.norm_position == "pre"
        with self.name_scope():
            self.self_attn = MultiHeadAttention(spec, dtype)
            self.norm1 = LayerNorm(spec, dtype)
            self.ffn = FeedForward(spec, dtype)
            self.norm2 = LayerNorm(spec, dtype)
            self.dropout1 = nn.Dropout(spec.dropout)
            self.dropout2 = nn.Dropout(spec.dropout)

    def hybrid_forward(self, F, x, mask_bias=None):
        if self._pre:
            x = x + self.dropout1(self.self_attn(self.norm1(x), mask_bias))
            return x + self.dropout2(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout1(self.self_attn(x, mask_bias)))
        return self.norm2(x + self.dropout2(self.ffn(x)))


class Encoder(HybridBlock):
    """``n_layers`` :class:`EncoderLayer` s in ``layers`` (an ``nn.HybridSequential``, so the
    paths are ``layers.0``, ``layers.1``, ...), then ``final_norm`` if ``spec.final_norm``.

    Call ``(x, mask_bias=None)``: ``(B, T, D)`` -> ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self._final_norm = spec.final_norm
        with self.name_scope():
            self.layers = nn.HybridSequential()
            with self.layers.name_scope():
                for _ in range(spec.n_layers):
                    self.layers.add(EncoderLayer(spec, dtype))
            if spec.final_norm:
                self.final_norm = LayerNorm(spec, dtype)

    def hybrid_forward(self, F, x, mask_bias=None):
        for layer in self.layers:
            x = layer(x, mask_bias)
        return self.final_norm(x) if self._final_norm else x


class Pooler(HybridBlock):
    """BERT's pooler (Devlin et al. 2019; HF ``BertPooler``): ``tanh(dense(x[:, 0]))``.

    Call ``(x)``: ``(B, T, D)`` -> ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        with self.name_scope():
            self.dense = _dense(spec, spec.d_model, spec.d_model, dtype)

    def hybrid_forward(self, F, x):
        first = F.reshape(F.slice_axis(x, axis=1, begin=0, end=1), shape=(0, -1))  # (B, D)
        return F.tanh(self.dense(first))


class EncoderModel(HybridBlock):
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

    A hybridized Gluon block traces its graph for one argument structure (which inputs are
    ``None``); this one retraces when that structure changes (e.g. ``input_ids`` then
    ``inputs_embeds``), so keep it fixed in a loop for speed.
    """

    def __init__(self, spec: ModelSpec, dtype: str = "float32", **kwargs):
        super().__init__(**kwargs)
        self.spec, self.dtype = spec, np.dtype(dtype).name
        self._mask_value = float(np.finfo(self.dtype).min)
        self._structure = None  # which of the inputs the cached graph was traced with
        with self.name_scope():
            self.embeddings = Embeddings(spec, self.dtype)
            self.encoder = Encoder(spec, self.dtype)
            if spec.head == "pooler":
                self.pooler = Pooler(spec, self.dtype)

    def __call__(self, input_ids=None, attention_mask=None, token_type_ids=None,
                 inputs_embeds=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        x = input_ids if input_ids is not None else inputs_embeds
        if isinstance(x, mx.nd.NDArray) and x.shape[1] > self.spec.max_len:
            raise InputError(f"sequence length {x.shape[1]} is longer than "
                             f"max_len={self.spec.max_len}; shorten the input (xformer does "
                             f"not truncate silently)")
        args = (input_ids, attention_mask, token_type_ids, inputs_embeds)
        structure = tuple(a is None for a in args)
        if structure != self._structure:  # Gluon traces one graph per argument structure
            self._clear_cached_op()
            self._structure = structure
        return super().__call__(*args)

    def mask_bias(self, F, attention_mask):
        """``(1 - attention_mask) * finfo(dtype).min`` as ``(B, 1, 1, T)`` in the compute dtype:
        the dtype's most negative *finite* number, never ``-inf`` (DESIGN.md §3)."""
        mask = F.cast(attention_mask, dtype=self.dtype)
        return F.reshape((1.0 - mask) * self._mask_value, shape=(0, 1, 1, -1))

    def hybrid_forward(self, F, input_ids, attention_mask=None, token_type_ids=None,
                       inputs_embeds=None):
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        bias = None if attention_mask is None else self.mask_bias(F, attention_mask)
        x = self.encoder(x, bias)
        if self.spec.head == "pooler":
            return x, self.pooler(x)
        return x


def canonical_parameters(model: EncoderModel) -> dict:
    """``{canonical name: gluon.Parameter}`` of a model, in ``spec.parameters()`` order.

    Names are the attribute paths of ``model._collect_params_with_prefix()`` with LayerNorm
    ``gamma`` / ``beta`` renamed ``weight`` / ``bias``; ``Constant`` s (the sinusoidal table)
    and, with ``spec.bias=False``, LayerNorm's frozen zero ``beta`` are left out.

    Raises:
        RuntimeError: the model's parameters do not match ``spec.parameters()`` (a bug).
    """
    found = {}
    for path, param in model._collect_params_with_prefix().items():
        if isinstance(param, Constant):
            continue
        head, _, leaf = path.rpartition(".")
        if leaf in ("gamma", "beta"):
            if leaf == "beta" and not model.spec.bias:
                continue
            path = f"{head}.{'weight' if leaf == 'gamma' else 'bias'}"
        found[path] = param
    expected = model.spec.parameter_shapes()
    if set(found) != set(expected):
        raise RuntimeError(f"Gluon parameters {sorted(set(found) - set(expected))} are not "
                           f"canonical; missing {sorted(set(expected) - set(found))}")
    return {name: found[name] for name in expected}
