"""Keras 3 layers of the xformer Transformers: encoder, decoder, encoder-decoder (TensorFlow
backend).

The Keras twin of ``xformer_torch/modules.py`` (where the block diagram is) and
``xformer_mxnet/modules.py``: the same classes in the same order, with the same constructor and
call parameters (``tests/test_twins.py``) and the same attribute names, computing
:mod:`xformer.reference` (docs/design.md §3). Every layer takes a :class:`~xformer.ModelSpec`, is
registered with ``keras.saving`` and round-trips through ``get_config`` / ``from_config``.

Every norm is a :class:`LayerNorm` or an :class:`RMSNorm` (``spec.norm``), every feed-forward
network a :class:`FeedForward` or a :class:`GatedFeedForward` (``spec.ffn``), and self-attention
owns a :class:`RotaryEmbedding` when ``spec.positional == "rope"``.

Attribute paths mirror the canonical parameter names of :meth:`xformer.ModelSpec.parameters`:
``model.encoder.layers[0].self_attn.q_proj.kernel`` holds
``encoder.layers.0.self_attn.q_proj.weight`` transposed (a Keras ``Dense`` kernel is
``(in, out)``, the canonical layout ``(out, in)``); ``Embedding.embeddings`` is ``weight``;
:class:`LayerNorm` (a ``keras.layers.LayerNormalization``) ``gamma`` / ``beta`` are ``weight`` /
``bias``; :class:`RMSNorm` ``weight`` is ``weight``. Constants (the sinusoidal and rotary tables)
are numpy arrays cast once to the compute dtype, never Keras variables.

Keras specifics (docs/design.md §5): every sub-layer gets ``dtype`` explicitly (a Keras parent's
dtype does not reach sub-layers created without one); :class:`LayerNorm` gets
``epsilon=spec.norm_eps`` (the Keras default is 1e-3); GELU and SiLU are composed from
``ops.erf`` / ``ops.tanh`` / ``ops.sigmoid`` with constants in the input dtype (``tf.nn.gelu`` is
off by ~5e-9 in float64 and ``keras.ops.gelu`` defaults to the tanh form), except exact GELU in
float32, the fused ``ops.gelu(x, approximate=False)`` (float32-grade); ``training`` switches
dropout; the key/value cache is a plain tuple of tensors, per decoder layer ``(k, v)`` of
``(B, H_kv, T_past, d_head)`` (``H_kv = spec.kv_heads`` key/value heads, not their repeated
copies; the keys already rotated with ``positional="rope"``), plus ``(cross_k, cross_v)``
``(B, H_kv, S, d_head)`` for an encoder-decoder, so cached decoding also runs inside
``tf.function``, where :func:`past_length` may be a traced scalar.

Example::

    >>> import numpy as np
    >>> from xformer import ModelSpec
    >>> from xformer_tensorflow.modules import EncoderModel
    >>> model = EncoderModel(ModelSpec.preset("tiny"), dtype="float64")
    >>> out = model(input_ids=np.array([[1, 2, 3]]), attention_mask=np.array([[1, 1, 0]]))
    >>> tuple(out["last_hidden_state"].shape), tuple(out["pooler_output"].shape)
    ((1, 3, 64), (1, 64))
"""

from __future__ import annotations

import contextlib

import functools
import math

import keras
import numpy as np
from keras import ops

from xformer.errors import InputError, SpecError
from xformer.spec import ModelSpec, sinusoidal_table

__all__ = ["gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS", "LayerNorm", "RMSNorm",
           "RotaryEmbedding", "Embeddings", "MultiHeadAttention", "Dropout", "FeedForward",
           "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
           "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel",
           "causal_allowed", "allowed_bias", "past_length", "use_dropout_masks"]

_PACKAGE = "xformer"


# ---------------------------------------------------------------------- activations
def gelu(x):
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt(2)))`` (Hendrycks & Gimpel 2016). float64: composed,
    constants in ``x.dtype`` (``tf.nn.gelu`` loses ~5e-9 there); float32: the fused
    ``keras.ops.gelu(x, approximate=False)`` (its default is the tanh form), float32-grade: 2.7e-8
    of the largest value, 1.5e-7 for the gradient (docs/pitfalls.md; issue #11)."""
    x = ops.convert_to_tensor(x)
    if x.dtype == "float32":
        return ops.gelu(x, approximate=False)
    c = lambda v: ops.convert_to_tensor(v, dtype=x.dtype)  # noqa: E731
    return c(0.5) * x * (c(1.0) + ops.erf(x / c(math.sqrt(2.0))))


def gelu_tanh(x):
    """Tanh-approximated GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``
    (Hendrycks & Gimpel 2016; GPT-2's ``gelu_new``), constants in ``x.dtype``."""
    c = lambda v: ops.convert_to_tensor(v, dtype=x.dtype)  # noqa: E731
    inner = c(math.sqrt(2.0 / math.pi)) * (x + c(0.044715) * x * x * x)
    return c(0.5) * x * (c(1.0) + ops.tanh(inner))


def relu(x):
    """``max(x, 0)``."""
    return ops.relu(x)


def silu(x):
    """SiLU (swish), ``x * sigmoid(x)`` (Elfwing et al. 2018; Hugging Face ``ACT2FN["silu"]``),
    composed from ``ops.sigmoid``."""
    return x * ops.sigmoid(x)


#: ``spec.activation`` -> function.
ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}


# ---------------------------------------------------------------------- helpers
def _norm(spec: ModelSpec, dtype, name: str) -> LayerNorm | RMSNorm:
    """The norm that ``spec.norm`` names: a :class:`LayerNorm` or an :class:`RMSNorm`."""
    cls = RMSNorm if spec.norm == "rmsnorm" else LayerNorm
    return cls(spec, dtype=dtype, name=name)


def _dense(spec: ModelSpec, units: int, dtype, name: str, part: str | None = None,
           **kwargs) -> keras.layers.Dense:
    """A ``keras.layers.Dense`` with a bias iff ``spec.has_bias(part)`` (``"qkv"``,
    ``"out_proj"``, ``"mlp"``), or iff ``spec.bias`` when ``part`` is ``None`` (the pooler)."""
    use_bias = spec.bias if part is None else spec.has_bias(part)
    return keras.layers.Dense(units, use_bias=use_bias, dtype=dtype, name=name, **kwargs)


def _residual(x, sublayer, norm, dropout, norm_first: bool):
    """A residual sub-layer (attention or FFN) with its norm ``norm`` and ``dropout`` (a
    :class:`Dropout` with ``training`` bound): pre-LN ``x + dropout(sublayer(norm(x)))``
    when ``norm_first``, else post-LN ``norm(x + dropout(sublayer(x)))``."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def _build_stack(stack: "_SpecLayer") -> None:
    """Build an :class:`Encoder` or :class:`Decoder`: each of ``stack.layers``, then its
    ``final_norm`` (when there is one), for ``(B, T, D)`` inputs."""
    shape = (None, None, stack.spec.d_model)
    for layer in [*stack.layers, stack.final_norm]:
        if layer is not None:
            layer.build(shape)


def causal_allowed(t_q, t_k, dtype):
    """``(t_q, t_k)`` 0/1 in ``dtype``: query ``i`` (absolute position ``t_k - t_q + i``, so
    cached positions count) may attend to key ``j`` iff ``j <= t_k - t_q + i``
    (:func:`xformer.reference.causal_allowed`). ``t_q``/``t_k`` may be traced scalars."""
    keys = ops.arange(t_k, dtype="int32")[None, :]
    queries = ops.arange(t_q, dtype="int32")[:, None] + (t_k - t_q)
    return ops.cast(ops.less_equal(keys, queries), dtype)


def allowed_bias(allowed, dtype):
    """The additive attention bias ``(1 - allowed) * finfo(dtype).min`` of a 0/1 ``allowed``
    mask (any shape, cast to ``dtype``), made once per model call from the product of padding
    and causality: the most negative *finite* value, never ``-inf``."""
    allowed = ops.cast(allowed, dtype)
    neg = ops.convert_to_tensor(np.finfo(dtype).min, dtype=dtype)
    return (ops.convert_to_tensor(1.0, dtype=dtype) - allowed) * neg


def past_length(past_key_values):
    """Positions already in a key/value cache (``past_key_values[0][0]`` is ``(B, H_kv, T_past,
    d_head)``): a Python int when the shape is static, else a scalar tensor; 0 without a
    cache."""
    if not past_key_values:
        return 0
    return _cached_positions(past_key_values[0][0])


def _cached_positions(k):
    """``T_past`` of one cached key tensor ``(B, H_kv, T_past, d_head)``: a Python int when the
    shape is static, else a scalar tensor."""
    return k.shape[2] if k.shape[2] is not None else ops.shape(k)[2]


class _SpecLayer(keras.layers.Layer):
    """A layer configured by a :class:`~xformer.spec.ModelSpec` (serialised as a dict)."""

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)

    def get_config(self):
        return {**super().get_config(), "spec": self.spec.to_dict()}

    def compute_output_shape(self, input_shape):
        return input_shape


# ---------------------------------------------------------------------- norms and positions
@keras.saving.register_keras_serializable(package=_PACKAGE)
class LayerNorm(keras.layers.LayerNormalization):
    """Layer normalisation over the last axis (Ba et al. 2016): Keras' own
    ``LayerNormalization`` configured by the spec,
    ``(x - mean) / sqrt(var + eps) * (offset + gamma) + beta`` with the biased variance,
    ``eps = spec.norm_eps`` (never Keras' default 1e-3), ``beta`` iff ``spec.has_bias("norm")``
    and ``offset = spec.norm_scale_offset`` (1.0: Gemma's ``1 + weight``).

    ``gamma`` / ``beta`` are the canonical ``weight`` / ``bias``; ``gamma`` starts at ones, or at
    zeros with an offset of 1 (:meth:`~xformer.spec.ModelSpec.parameters`). With offset 0 the
    layer is exactly ``LayerNormalization``; otherwise it calls the same
    ``keras.ops.layer_normalization`` with ``offset + gamma``.

    Args:
        spec: the model spec (``norm_eps``, ``bias``, ``norm``, ``norm_scale_offset``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(..., D)``.

    Returns:
        ``(..., D)`` in the layer dtype.

    Example::

        >>> norm = LayerNorm(ModelSpec(d_model=8, n_heads=2), dtype="float64")
        >>> y = norm(np.arange(16.0).reshape(2, 8)).numpy()
        >>> np.allclose(y.mean(-1), 0), [w.name for w in norm.weights]
        (True, ['gamma', 'beta'])
    """

    def __init__(self, spec: ModelSpec, *, dtype=None, **kwargs):
        spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        super().__init__(epsilon=spec.norm_eps, center=spec.has_bias("norm"), scale=True,
                         gamma_initializer="zeros" if spec.norm_scale_offset else "ones",
                         dtype=dtype, **kwargs)
        self.spec = spec

    def call(self, x):
        if not self.spec.norm_scale_offset:
            return super().call(x)
        offset = ops.convert_to_tensor(self.spec.norm_scale_offset, dtype=self.gamma.dtype)
        y = ops.layer_normalization(x, offset + self.gamma, self.beta, self.axis, self.epsilon)
        return ops.cast(y, self.compute_dtype)

    def get_config(self):
        # The base layer's config (name, dtype, trainable) and the spec: every
        # LayerNormalization argument follows from the spec.
        return {**keras.layers.Layer.get_config(self), "spec": self.spec.to_dict()}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RMSNorm(_SpecLayer):
    """Root-mean-square normalisation over the last axis (Zhang & Sennrich 2019, eq. 4; Hugging
    Face ``LlamaRMSNorm``, and ``GemmaRMSNorm`` with the offset):
    ``x * rsqrt(mean(x^2) + eps) * (offset + weight)``, ``eps = spec.norm_eps``,
    ``offset = spec.norm_scale_offset``; no centring and no bias. Computed in the layer dtype by
    ``keras.ops.rms_normalization`` (what ``keras.layers.RMSNormalization`` calls).

    Holds one variable, ``weight`` ``(D,)`` (the canonical ``weight``), initialised to ones, or
    to zeros with an offset of 1 (:meth:`~xformer.spec.ModelSpec.parameters`).

    Args:
        spec: the model spec (``d_model``, ``norm_eps``, ``norm_scale_offset``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(..., D)``.

    Returns:
        ``(..., D)`` in the layer dtype.

    Example::

        >>> norm = RMSNorm(ModelSpec(d_model=8, n_heads=2, norm="rmsnorm"), dtype="float64")
        >>> y = norm(np.full((2, 8), 3.0)).numpy()
        >>> np.allclose(y, 1.0, atol=1e-9), tuple(norm.weight.shape)
        (True, (8,))
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        self.weight = None

    def build(self, input_shape=None):
        if self.weight is None:
            self.weight = self.add_weight(
                shape=(self.spec.d_model,), name="weight",
                initializer="zeros" if self.spec.norm_scale_offset else "ones")

    def call(self, x):
        scale = self.weight
        if self.spec.norm_scale_offset:
            scale = ops.convert_to_tensor(self.spec.norm_scale_offset,
                                          dtype=self.compute_dtype) + scale
        return ops.rms_normalization(x, scale=scale, axis=-1, epsilon=self.spec.norm_eps)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RotaryEmbedding(_SpecLayer):
    """Rotary position embedding of queries or keys (Su et al. 2021, RoFormer eq. 34; Hugging
    Face ``LlamaRotaryEmbedding`` / ``apply_rotary_pos_emb``; GPT-NeoX ``rotary_pct``):
    :func:`xformer.reference.rotate`.

    The first ``r = spec.rotary_dim`` dimensions of every head turn pairwise by the angles
    ``p * theta^(-2i / r)`` of the token's absolute position ``p`` (``theta = spec.rope_theta``):
    ``(a, b) -> (a cos - b sin, b cos + a sin)``, pair ``i`` being ``(i, i + r / 2)`` with
    ``spec.rope_style == "half"`` (GPT-NeoX, Llama's ``rotate_half``) or ``(2i, 2i + 1)`` with
    ``"interleaved"`` (GPT-J, RoFormer); the other ``d_head - r`` dimensions pass through.

    ``cos`` / ``sin`` are :func:`xformer.spec.rotary_table` ``(max_len, r / 2)`` (float64 numpy,
    the same numbers on every backend) cast once to the compute dtype and held as constant
    tensors, not Keras variables (a ``tf.function`` captures them rather than copying them into
    its graph).

    Args:
        spec: a spec with ``positional="rope"`` (``max_len``, ``d_head``, ``rope_theta``,
            ``rope_style``, ``rotary_fraction``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, heads, T, d_head)`` queries (``n_heads``) or keys (``kv_heads``).
        past_length: positions already cached: ``x``'s positions are ``past_length ..
            past_length + T - 1`` (``past_length + T <= max_len``, checked by
            :class:`Embeddings`). An int or a scalar tensor.

    Returns:
        ``(B, heads, T, d_head)`` in the layer dtype.

    Raises:
        SpecError: ``spec.positional`` is not ``"rope"``.

    Example::

        >>> spec = ModelSpec(architecture="decoder", d_model=8, n_heads=2, head="lm",
        ...                  positional="rope")
        >>> rope = RotaryEmbedding(spec, dtype="float64")
        >>> tuple(rope(np.ones((1, 2, 3, 4)), past_length=5).shape)
        (1, 2, 3, 4)
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec = self.spec
        if spec.positional != "rope":
            raise SpecError(f"RotaryEmbedding needs positional='rope', got "
                            f"{spec.positional!r}")
        self.cos, self.sin = (ops.convert_to_tensor(table.astype(self.compute_dtype))
                              for table in spec.rotary_tables())

    def call(self, x, past_length=0):
        r = self.spec.rotary_dim
        cos, sin = (ops.slice(table, (past_length, 0), (ops.shape(x)[2], r // 2))
                    for table in (self.cos, self.sin))  # (T, r / 2): broadcast over B, heads
        if self.spec.rope_style == "half":
            a, b = x[..., : r // 2], x[..., r // 2: r]
            rotated = ops.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
        else:
            a, b = x[..., 0:r:2], x[..., 1:r:2]
            rotated = ops.reshape(ops.stack([a * cos - b * sin, b * cos + a * sin], axis=-1),
                                  (*ops.shape(x)[:-1], r))
        if r == self.spec.d_head:
            return rotated
        return ops.concatenate([rotated, x[..., r:]], axis=-1)


# ---------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package=_PACKAGE)
class Embeddings(_SpecLayer):
    """Token + position (+ segment) embeddings, then a norm (BERT, Devlin et al. 2019 §3;
    Hugging Face ``BertEmbeddings``) and dropout.

    ``x = word_embeddings[input_ids] * (sqrt(D) if embed_scale)`` (Vaswani 2017 §3.4), or
    ``inputs_embeds``; ``+ positions[:T]`` (learned table, or the fixed sinusoidal table of
    Vaswani 2017 §3.5 held as a non-trainable constant; nothing with ``positional="rope"``,
    whose positions enter in self-attention, :class:`RotaryEmbedding`); ``+
    token_type_embeddings[token_type_ids]`` when ``type_vocab_size > 0``; ``norm``
    (:class:`LayerNorm` or :class:`RMSNorm`) when ``embedding_norm``.

    Args:
        spec: the model spec.
        word_embeddings: whether to own a token table; ``False`` for the target side of an
            encoder-decoder with ``share_embeddings``, which looks up the source side's table
            (passed to :meth:`embed_tokens` as ``weight``; the layer then takes
            ``inputs_embeds`` only).
        dtype: ``"float32"`` or ``"float64"`` (or a ``keras.DTypePolicy``); ``None``: Keras'
            global policy.
        **kwargs: base layer arguments (``name``, ``trainable``).

    Call args:
        input_ids: ``(B, T)`` integer token ids, or ``None`` with ``inputs_embeds``.
        token_type_ids: ``(B, T)`` integers; ``None`` means all zeros.
        inputs_embeds: ``(B, T, D)`` already scaled token embeddings, in the layer dtype.
        past_length: positions already decoded (cached decoding): the positions of these
            tokens are ``past_length .. past_length + T - 1``. An int or a scalar tensor.
        training: dropout on when true.

    Returns:
        ``(B, T, D)`` in the layer dtype.

    Raises:
        InputError: ``past_length + T > spec.max_len`` (when both are known while tracing);
            neither or both of ``input_ids`` / ``inputs_embeds``; ``token_type_ids`` without
            segment embeddings.

    Example::

        >>> emb = Embeddings(ModelSpec.preset("tiny"), dtype="float64")
        >>> tuple(emb(input_ids=np.zeros((2, 5), "int64")).shape)
        (2, 5, 64)
    """

    def __init__(self, spec: ModelSpec, word_embeddings: bool = True, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.has_word_embeddings = bool(word_embeddings)
        self.word_embeddings = (keras.layers.Embedding(spec.vocab_size, spec.d_model,
                                                       dtype=dtype, name="word_embeddings")
                                if word_embeddings else None)
        self.position_embeddings = None
        if spec.positional == "learned":
            self.position_embeddings = keras.layers.Embedding(
                spec.max_len, spec.d_model, dtype=dtype, name="position_embeddings")
        self.token_type_embeddings = None
        if spec.type_vocab_size:
            self.token_type_embeddings = keras.layers.Embedding(
                spec.type_vocab_size, spec.d_model, dtype=dtype, name="token_type_embeddings")
        self.norm = _norm(spec, dtype, "norm") if spec.embedding_norm else None
        self.dropout = Dropout(spec.dropout, dtype=dtype, name="dropout")
        # Not a weight: the same float64 table on every backend, cast once to the compute dtype.
        self._sinusoidal = (sinusoidal_table(spec.max_len, spec.d_model)
                            .astype(self.compute_dtype) if spec.positional == "sinusoidal"
                            else None)

    def build(self, input_shape=None):
        if self.word_embeddings is not None:
            self.word_embeddings.build()
        if self.position_embeddings is not None:
            self.position_embeddings.build()
        if self.token_type_embeddings is not None:
            self.token_type_embeddings.build()
        if self.norm is not None:
            self.norm.build((None, None, self.spec.d_model))

    def embed_tokens(self, input_ids, weight=None):
        """``word_embeddings[input_ids]``, times ``sqrt(D)`` when ``embed_scale``: the tensor
        that ``inputs_embeds`` stands for. ``(B, T)`` ints -> ``(B, T, D)``. ``weight``: a
        shared ``(vocab_size, D)`` table to look up instead of this layer's own
        (``share_embeddings``)."""
        if weight is None:
            if self.word_embeddings is None:
                raise InputError(f"{self.name} shares the source token table: look tokens up "
                                 f"with embed_tokens(input_ids, weight=table)")
            x = self.word_embeddings(input_ids)
        else:
            x = ops.take(weight, input_ids, axis=0)  # what keras.layers.Embedding computes
        if self.spec.embed_scale:
            x = x * ops.convert_to_tensor(math.sqrt(self.spec.d_model), dtype=self.compute_dtype)
        return x

    def call(self, input_ids=None, token_type_ids=None, inputs_embeds=None, past_length=0,
             training=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        if t is not None and isinstance(past_length, int) and (
                past_length + t > self.spec.max_len):
            what = (f"sequence length {t}" if not past_length
                    else f"{past_length} cached + {t} new positions")
            raise InputError(f"{what} is longer than max_len={self.spec.max_len}; "
                             f"shorten the input (xformer does not truncate silently)")
        t = ops.shape(x)[1]
        if self.spec.positional == "rope":  # positions enter in self-attention
            pass
        elif isinstance(past_length, int) and past_length == 0:  # the plain forward pass
            if self.position_embeddings is not None:
                x = x + self.position_embeddings(ops.arange(t, dtype="int32"))[None]
            else:
                x = x + ops.convert_to_tensor(self._sinusoidal,
                                              dtype=self.compute_dtype)[None, :t]
        elif self.position_embeddings is not None:
            positions = ops.arange(t, dtype="int32") + ops.cast(past_length, "int32")
            x = x + self.position_embeddings(positions)[None]
        else:
            table = ops.convert_to_tensor(self._sinusoidal, dtype=self.compute_dtype)
            x = x + ops.slice(table, (past_length, 0), (t, self.spec.d_model))[None]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = ops.zeros(ops.shape(x)[:2], dtype="int32")
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:2], self.spec.d_model)

    def get_config(self):
        return {**super().get_config(), "word_embeddings": self.has_word_embeddings}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MultiHeadAttention(_SpecLayer):
    """Multi-head scaled dot-product attention (Vaswani 2017 §3.2.1-3.2.2; scaling and
    additive bias as Hugging Face ``BertSelfAttention``), with grouped-query attention (Ainslie
    et al. 2023) and rotary positions (Su et al. 2021). Self-attention by default;
    cross-attention (queries from ``x``, keys and values from ``key_value_states``) when built
    with ``cross_attention=True``.

    ``softmax(Q K^T / sqrt(d_head) + attention_bias) V`` per head, then ``out_proj``: ``q_proj``
    gives ``H = n_heads`` heads, ``k_proj`` / ``v_proj`` give ``H_kv = kv_heads`` heads, each of
    ``d_head`` (split as ``(B, T, heads, d_head)``); query head ``h`` reads key/value head
    ``h // (H / H_kv)`` (``ops.repeat`` on the head axis, Hugging Face ``repeat_kv``; no repeat
    when ``H_kv == H``). With ``positional="rope"`` self-attention owns ``rotary``
    (:class:`RotaryEmbedding`, else ``None``), which turns the new queries and keys at their
    absolute positions ``past .. past + T - 1`` before the keys join the cache, so the cache
    holds rotated keys. Dropout on the attention probabilities in training.

    Args:
        spec: the model spec (``d_model``, ``n_heads``, ``n_kv_heads``, ``head_dim``, ``bias``,
            ``qkv_bias``, ``out_proj_bias``, ``positional``, ``dropout``).
        cross_attention: cached keys/values (``past_key_value``) are the projected encoder
            output, reused as they are; self-attention appends the new keys/values to them.
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``.
        attention_bias: additive bias broadcastable to ``(B, H, T, S)`` (:func:`allowed_bias`
            of the key padding ``(B, 1, 1, S)`` or of padding times causality
            ``(B, 1, T, S)``); ``None`` attends everywhere. ``S`` counts cached keys too.
        key_value_states: ``(B, S, D)`` the encoder output (cross-attention); default ``x``.
        past_key_value: ``(k, v)``, each ``(B, H_kv, S_past, d_head)``, or ``None``.
        use_cache: also return the keys/values to cache.
        training: dropout on when true.

    Returns:
        ``(B, T, D)``, or ``((B, T, D), (k, v))`` with ``use_cache``, ``k`` / ``v``
        ``(B, H_kv, S, d_head)`` (not repeated; ``k`` rotated with ``positional="rope"``).

    Example::

        >>> attn = MultiHeadAttention(ModelSpec(d_model=8, n_heads=2), dtype="float64")
        >>> bias = allowed_bias(np.array([[1, 1, 0], [0, 0, 0]]), "float64")[:, None, None, :]
        >>> tuple(attn(np.ones((2, 3, 8)), attention_bias=bias).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.cross_attention = bool(cross_attention)
        inner, kv = spec.n_heads * spec.d_head, spec.kv_heads * spec.d_head
        self.q_proj = _dense(spec, inner, dtype, "q_proj", part="qkv")
        self.k_proj = _dense(spec, kv, dtype, "k_proj", part="qkv")
        self.v_proj = _dense(spec, kv, dtype, "v_proj", part="qkv")
        self.out_proj = _dense(spec, spec.d_model, dtype, "out_proj", part="out_proj")
        self.rotary = (RotaryEmbedding(spec, dtype=dtype, name="rotary")
                       if spec.positional == "rope" and not cross_attention else None)
        self.dropout = Dropout(spec.dropout, dtype=dtype, name="dropout")

    def build(self, input_shape=None):
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            proj.build((None, None, self.spec.d_model))
        self.out_proj.build((None, None, self.spec.n_heads * self.spec.d_head))

    def _split_heads(self, y, b, heads):
        """``(B, S, heads * d_head)`` -> ``(B, heads, S, d_head)``."""
        shape = (b, ops.shape(y)[1], heads, self.spec.d_head)
        return ops.transpose(ops.reshape(y, shape), (0, 2, 1, 3))

    def _keys_values(self, x, b, key_value_states, past_key_value, past):
        """This call's keys and values, each ``(B, H_kv, S, d_head)``: the cached encoder ones
        of a cross-attention, else projected from ``key_value_states`` (or ``x``) and, in
        self-attention, rotated at positions ``past ..`` (rope) and appended to the cached
        positions."""
        if self.cross_attention and past_key_value is not None:
            return tuple(past_key_value)
        source = x if key_value_states is None else key_value_states
        k = self._split_heads(self.k_proj(source), b, self.spec.kv_heads)
        v = self._split_heads(self.v_proj(source), b, self.spec.kv_heads)
        if self.rotary is not None:
            k = self.rotary(k, past_length=past)
        if past_key_value is not None:
            k = ops.concatenate([past_key_value[0], k], axis=2)
            v = ops.concatenate([past_key_value[1], v], axis=2)
        return k, v

    def call(self, x, attention_bias=None, key_value_states=None, past_key_value=None,
             use_cache=False, training=None):
        spec, dtype = self.spec, self.compute_dtype
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        past = 0 if past_key_value is None else _cached_positions(past_key_value[0])
        q = self._split_heads(self.q_proj(x), b, spec.n_heads)
        if self.rotary is not None:
            q = self.rotary(q, past_length=past)
        k, v = self._keys_values(x, b, key_value_states, past_key_value, past)
        present = (k, v)
        groups = spec.n_heads // spec.kv_heads
        if groups > 1:  # query head h reads kv head h // groups (Hugging Face repeat_kv)
            k, v = ops.repeat(k, groups, axis=1), ops.repeat(v, groups, axis=1)
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        scores = scores / ops.convert_to_tensor(math.sqrt(self.spec.d_head), dtype=dtype)
        if attention_bias is not None:
            scores = scores + attention_bias
        if scores.shape[-1] == 1:  # one key (first decoding step): softmax is exactly 1, and
            probs = ops.ones_like(scores)  # keras.ops.softmax would warn "use a sigmoid"
        else:
            probs = ops.softmax(scores, axis=-1)
        probs = self.dropout(probs, training=training)
        ctx = ops.reshape(ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)),
                          (b, t, spec.n_heads * spec.d_head))
        out = self.out_proj(ctx)
        return (out, present) if use_cache else out

    def get_config(self):
        return {**super().get_config(), "cross_attention": self.cross_attention}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Dropout(keras.layers.Dropout):
    """Inverted dropout (Srivastava et al. 2014) that can take its mask from outside: Keras'
    own ``keras.layers.Dropout``, except that while :attr:`stream_mask` is set the call returns
    ``x * stream_mask`` whatever ``training`` says, drawing nothing.

    Every dropout site of the models is one of these, at the canonical path that
    :func:`xformer.training.dropout_sites` names (``embeddings.dropout``,
    ``decoder.layers.0.self_attn.dropout``, ...). Training with ``TrainConfig(dropout="stream")``
    sets each site's mask (:func:`xformer.training.dropout_masks`: ``keep / (1 - p)`` in the
    model dtype, exactly the site's shape) for one model call and clears it afterwards
    (:func:`use_dropout_masks`); inside a ``tf.function`` the mask is a traced input
    (a symbolic tensor set while the function is traced), never a constant. Unset (the
    default), the layer is Keras' dropout: on with ``training=True`` and ``rate > 0``.

    Args: as ``keras.layers.Dropout`` (``rate``, ``noise_shape``, ``seed``, ``dtype``,
    ``name``).

    Call args:
        x: any shape. training: Keras' dropout on when true (ignored while a mask is set).

    Returns:
        ``x * stream_mask``, or Keras' dropout of ``x``.

    Raises:
        InputError: a mask whose static shape is not ``x``'s.

    Example::

        >>> drop = Dropout(0.5, dtype="float64")
        >>> drop.stream_mask = np.array([[2.0, 0.0]])
        >>> drop(np.array([[3.0, 4.0]])).numpy().tolist()
        [[6.0, 0.0]]
    """

    #: The scaled keep mask of the current call (a tensor of ``x``'s shape), or ``None``.
    stream_mask = None

    def call(self, x, training=False):
        mask = self.stream_mask
        if mask is None:
            return super().call(x, training=training)
        x = ops.convert_to_tensor(x, dtype=self.compute_dtype)
        mask = ops.convert_to_tensor(mask, dtype=x.dtype)
        if (None not in tuple(x.shape) and None not in tuple(mask.shape)
                and tuple(mask.shape) != tuple(x.shape)):
            raise InputError(f"dropout mask of {self.name!r} has shape {tuple(mask.shape)}, "
                             f"the input {tuple(x.shape)}; give one mask per site of exactly "
                             f"its shape")
        return x * mask


@contextlib.contextmanager
def use_dropout_masks(model, masks):
    """``with use_dropout_masks(model, masks):`` every :class:`Dropout` named in ``masks`` (its
    attribute path in ``model``, the canonical site name: ``embeddings.dropout``,
    ``decoder.layers.0.self_attn.dropout``, ...; :func:`xformer.training.dropout_sites`)
    multiplies by its mask (its ``stream_mask``) instead of drawing; on exit (also on error)
    every mask is cleared. Inside a ``tf.function`` the masks are the function's (symbolic)
    arguments, so each call uses its own. ``masks`` ``None`` or empty: nothing changes.

    Args:
        model: an :class:`EncoderModel`, :class:`DecoderModel` or :class:`EncoderDecoderModel`.
        masks: ``{site: tensor}`` in the model's dtype, each of its site's shape.
    Raises:
        InputError: a site that is not a :class:`Dropout` of ``model`` (a wiring bug, so it is
            loud rather than a silent native draw).
    """
    layers = []
    try:
        for site, mask in (masks or {}).items():
            layer = model
            try:
                for part in site.split("."):
                    layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
            except (AttributeError, IndexError, TypeError):
                layer = None
            if not isinstance(layer, Dropout):
                raise InputError(f"dropout site {site!r} is not a Dropout layer of the model")
            layer.stream_mask = mask
            layers.append(layer)
        yield model
    finally:
        for layer in layers:
            layer.stream_mask = None


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(_SpecLayer):
    """Position-wise feed-forward network ``linear2(dropout(act(linear1(x))))``
    (Vaswani 2017 §3.3), ``act`` from ``spec.activation`` (:data:`ACTIVATIONS`); biases iff
    ``spec.has_bias("mlp")``. Used with ``spec.ffn == "mlp"``.

    Args:
        spec: the model spec (``d_model``, ``d_ff``, ``activation``, ``bias``, ``mlp_bias``,
            ``dropout``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``. training: dropout on when true.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> ffn = FeedForward(ModelSpec(d_model=8, n_heads=2, d_ff=32), dtype="float64")
        >>> tuple(ffn(np.ones((2, 3, 8))).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        dtype = self.dtype_policy
        self.linear1 = _dense(self.spec, self.spec.d_ff, dtype, "linear1", part="mlp")
        self.activation = ACTIVATIONS[self.spec.activation]
        self.dropout = Dropout(self.spec.dropout, dtype=dtype, name="dropout")
        self.linear2 = _dense(self.spec, self.spec.d_model, dtype, "linear2", part="mlp")

    def build(self, input_shape=None):
        self.linear1.build((None, None, self.spec.d_model))
        self.linear2.build((None, None, self.spec.d_ff))

    def call(self, x, training=None):
        y = self.dropout(self.activation(self.linear1(x)), training=training)
        return self.linear2(y)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class GatedFeedForward(_SpecLayer):
    """Gated feed-forward network ``down_proj(dropout(act(gate_proj(x)) * up_proj(x)))``
    (Shazeer 2020, "GLU Variants Improve Transformer": SwiGLU with ``silu``, GeGLU with
    ``gelu``; Hugging Face ``LlamaMLP``), ``act`` from ``spec.activation``
    (:data:`ACTIVATIONS`); biases iff ``spec.has_bias("mlp")``. Used with ``spec.ffn == "glu"``.

    Args:
        spec: the model spec (``d_model``, ``d_ff``, ``activation``, ``bias``, ``mlp_bias``,
            ``dropout``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``. training: dropout on when true.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> spec = ModelSpec(d_model=8, n_heads=2, d_ff=32, ffn="glu", activation="silu")
        >>> ffn = GatedFeedForward(spec, dtype="float64")
        >>> tuple(ffn(np.ones((2, 3, 8))).shape), tuple(ffn.gate_proj.kernel.shape)
        ((2, 3, 8), (8, 32))
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.gate_proj = _dense(spec, spec.d_ff, dtype, "gate_proj", part="mlp")
        self.up_proj = _dense(spec, spec.d_ff, dtype, "up_proj", part="mlp")
        self.activation = ACTIVATIONS[spec.activation]
        self.dropout = Dropout(spec.dropout, dtype=dtype, name="dropout")
        self.down_proj = _dense(spec, spec.d_model, dtype, "down_proj", part="mlp")

    def build(self, input_shape=None):
        self.gate_proj.build((None, None, self.spec.d_model))
        self.up_proj.build((None, None, self.spec.d_model))
        self.down_proj.build((None, None, self.spec.d_ff))

    def call(self, x, training=None):
        y = self.activation(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(self.dropout(y, training=training))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderLayer(_SpecLayer):
    """One Transformer encoder layer: self-attention (``self_attn``, ``norm1``,
    ``dropout1``) then feed-forward (``ffn``: :class:`FeedForward` or :class:`GatedFeedForward`
    by ``spec.ffn``; ``norm2``, ``dropout2``), each through :func:`_residual`:
    ``norm_position="post"`` (Vaswani 2017 §3.1, BERT) or ``"pre"`` (GPT-2; Xiong et al. 2020);
    with ``spec.parallel_residual`` both read the same input in one step,
    ``x + dropout1(self_attn(norm1(x))) + dropout2(ffn(norm2(x)))`` (GPT-J; GPT-NeoX
    ``use_parallel_residual``).

    Args:
        spec: the model spec (``norm``, ``norm_position``, ``ffn``, ``parallel_residual``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``. attention_bias: as :class:`MultiHeadAttention`, or ``None``.
        training: dropout on when true.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> layer = EncoderLayer(ModelSpec(d_model=8, n_heads=2, d_ff=32), dtype="float64")
        >>> tuple(layer(np.ones((2, 3, 8)), attention_bias=np.zeros((2, 1, 1, 3))).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, name="self_attn")
        self.norm1 = _norm(spec, dtype, "norm1")
        self.ffn = (GatedFeedForward if spec.ffn == "glu" else FeedForward)(
            spec, dtype=dtype, name="ffn")
        self.norm2 = _norm(spec, dtype, "norm2")
        self.dropout1 = Dropout(spec.dropout, dtype=dtype, name="dropout1")
        self.dropout2 = Dropout(spec.dropout, dtype=dtype, name="dropout2")

    def build(self, input_shape=None):
        for layer in (self.self_attn, self.norm1, self.ffn, self.norm2):
            layer.build((None, None, self.spec.d_model))

    def call(self, x, attention_bias=None, training=None):
        pre = self.spec.norm_position == "pre"
        attend = functools.partial(self.self_attn, attention_bias=attention_bias,
                                   training=training)
        ffn = functools.partial(self.ffn, training=training)
        dropout1 = functools.partial(self.dropout1, training=training)
        dropout2 = functools.partial(self.dropout2, training=training)
        if self.spec.parallel_residual:  # GPT-NeoX use_parallel_residual (pre-LN only)
            return x + dropout1(attend(self.norm1(x))) + dropout2(ffn(self.norm2(x)))
        x = _residual(x, attend, self.norm1, dropout1, pre)
        return _residual(x, ffn, self.norm2, dropout2, pre)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Encoder(_SpecLayer):
    """A stack of ``spec.n_layers`` :class:`EncoderLayer` (``layers[i]``), then ``final_norm``
    when ``spec.final_norm`` (pre-LN models). Constructed and called as :class:`EncoderLayer`
    (the same ``attention_bias`` reaches every layer); ``(B, T, D)`` -> ``(B, T, D)``.

    Example::

        >>> enc = Encoder(ModelSpec(d_model=8, n_heads=2, d_ff=32, n_layers=3), dtype="float64")
        >>> len(enc.layers), tuple(enc(np.ones((2, 3, 8))).shape)
        (3, (2, 3, 8))
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.layers = [EncoderLayer(spec, dtype=dtype, name=f"layers_{i}")
                       for i in range(spec.n_layers)]
        self.final_norm = _norm(spec, dtype, "final_norm") if spec.final_norm else None

    def build(self, input_shape=None):
        _build_stack(self)

    def call(self, x, attention_bias=None, training=None):
        for layer in self.layers:
            x = layer(x, attention_bias=attention_bias, training=training)
        return x if self.final_norm is None else self.final_norm(x)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Pooler(_SpecLayer):
    """BERT pooler ``tanh(dense(x[:, 0]))`` (Devlin et al. 2019; Hugging Face ``BertPooler``).

    Args:
        spec: the model spec (``d_model``, ``bias``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``.

    Returns:
        ``(B, D)``: the first token's state, projected and squashed.

    Example::

        >>> pooler = Pooler(ModelSpec(d_model=8, n_heads=2), dtype="float64")
        >>> tuple(pooler(np.ones((2, 3, 8))).shape)
        (2, 8)
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        self.dense = _dense(self.spec, self.spec.d_model, self.dtype_policy, "dense",
                            activation="tanh")

    def build(self, input_shape=None):
        self.dense.build((None, self.spec.d_model))

    def call(self, x):
        return self.dense(x[:, 0])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.spec.d_model)


class _SpecModel(keras.Model):
    """What the three top-level models share: ``.spec``, the dtype (float32 by default), the
    config, building every child layer, and the key-padding bias."""

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(dtype=dtype or "float32", **kwargs)
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)

    def build(self, input_shape=None):
        for name in ("embeddings", "decoder_embeddings", "encoder", "decoder", "pooler",
                     "lm_head"):
            layer = getattr(self, name, None)
            if layer is not None:
                layer.build()

    def key_padding_bias(self, attention_mask):
        """``(B, 1, 1, S)`` additive bias of a ``(B, S)`` 0/1 key mask (encoder self-attention,
        cross-attention), in the compute dtype; ``None`` for ``None``."""
        if attention_mask is None:
            return None
        return allowed_bias(attention_mask, self.compute_dtype)[:, None, None, :]

    def get_config(self):
        return {"spec": self.spec.to_dict(), "dtype": self.dtype_policy.name,
                "name": self.name, "trainable": self.trainable}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderModel(_SpecModel):
    """A BERT-like encoder: :class:`Embeddings` -> :class:`Encoder` -> optional
    :class:`Pooler`, built from a :class:`~xformer.spec.ModelSpec`, float32 or float64 end to end.

    The attribute paths mirror the canonical parameter names (``embeddings``, ``encoder.layers[i]
    .self_attn.q_proj``, ``pooler.dense``); the model remembers ``spec`` and its ``dtype``.

    Args:
        spec: the model spec (a :class:`~xformer.spec.ModelSpec` or its dict).
        dtype: ``"float32"`` or ``"float64"`` for every weight, activation and constant
            (``keras.DTypePolicy`` accepted); default float32.
        **kwargs: base model arguments (``name``, ``trainable``).

    Call args (Hugging Face names):
        input_ids: ``(B, T)`` integer token ids in ``[0, vocab_size)``.
        attention_mask: ``(B, T)``, 1 = attend, 0 = padding; ``None`` = all ones.
        token_type_ids: ``(B, T)`` segment ids (only with ``type_vocab_size > 0``); ``None`` =
            zeros.
        inputs_embeds: ``(B, T, D)`` token embeddings (already scaled by ``sqrt(D)`` when
            ``embed_scale``), instead of ``input_ids``.
        training: dropout on when true (off by default).

    Returns:
        ``{"last_hidden_state": (B, T, D)}``, plus ``"pooler_output": (B, D)`` when
        ``spec.head == "pooler"``.

    Raises:
        InputError: both or neither of ``input_ids`` / ``inputs_embeds``; ``T > max_len`` (when
            ``T`` is known while tracing).

    Example::

        >>> model = EncoderModel(ModelSpec.preset("tiny"), dtype="float64")
        >>> out = model(input_ids=np.array([[5, 6, 7, 0]]), attention_mask=np.array([[1, 1, 1, 0]]))
        >>> sorted(out), out["last_hidden_state"].dtype.name
        (['last_hidden_state', 'pooler_output'], 'float64')
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        dtype = self.dtype_policy
        self.embeddings = Embeddings(self.spec, dtype=dtype, name="embeddings")
        self.encoder = Encoder(self.spec, dtype=dtype, name="encoder")
        self.pooler = (Pooler(self.spec, dtype=dtype, name="pooler")
                       if self.spec.head == "pooler" else None)

    def call(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
             training=None):
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds, training=training)
        x = self.encoder(x, attention_bias=self.key_padding_bias(attention_mask),
                         training=training)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(x)
        return out

# ---------------------------------------------------------------------- decoders
@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderLayer(_SpecLayer):
    """One Transformer decoder layer: causal self-attention, cross-attention over the encoder
    output (encoder-decoders only), then feed-forward (:class:`FeedForward` or
    :class:`GatedFeedForward` by ``spec.ffn``), each through :func:`_residual` with its own norm
    (:class:`LayerNorm` or :class:`RMSNorm`): ``norm1`` (self-attention), ``norm2``
    (cross-attention), ``norm3`` (FFN), or ``norm1`` / ``norm2`` without cross-attention (GPT-2's
    ``ln_1`` / ``ln_2``; ``nn.TransformerDecoderLayer``'s ``norm1..3``). With
    ``spec.parallel_residual`` (no cross-attention; the spec forbids it in encoder-decoders)
    ``x + dropout1(self_attn(norm1(x))) + dropout2(ffn(norm2(x)))`` in one step (GPT-J; GPT-NeoX
    ``use_parallel_residual``).

    Args:
        spec: the model spec (``norm``, ``norm_position``, ``ffn``, ``parallel_residual``).
        cross_attention: build ``cross_attn`` / ``norm3`` (encoder-decoders).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``.
        attention_bias: self-attention bias ``(B or 1, 1, T, past + T)`` (padding times
            causality, one :func:`allowed_bias`), or ``None``.
        encoder_hidden_states: ``(B, S, D)`` the encoder output (cross-attention), or ``None``
            when ``past_key_value`` holds its projected keys/values.
        encoder_attention_bias: ``(B, 1, 1, S)`` source key-padding bias, or ``None``.
        past_key_value: ``(k, v)``, or ``(k, v, cross_k, cross_v)`` with cross-attention, each
            ``(B, H_kv, past or S, d_head)``.
        use_cache: also return this layer's new cache entry.
        training: dropout on when true.

    Returns:
        ``(B, T, D)``, or ``((B, T, D), past_key_value)`` with ``use_cache``.

    Example::

        >>> spec = ModelSpec(architecture="decoder", d_model=8, n_heads=2, d_ff=32, head="lm")
        >>> layer = DecoderLayer(spec, dtype="float64")
        >>> tuple(layer(np.ones((2, 3, 8))).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.has_cross_attention = bool(cross_attention)
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, name="self_attn")
        self.norm1 = _norm(spec, dtype, "norm1")
        self.cross_attn = None
        ffn = GatedFeedForward if spec.ffn == "glu" else FeedForward
        if cross_attention:
            self.cross_attn = MultiHeadAttention(spec, cross_attention=True, dtype=dtype,
                                                 name="cross_attn")
            self.norm2 = _norm(spec, dtype, "norm2")
            self.ffn = ffn(spec, dtype=dtype, name="ffn")
            self.norm3 = _norm(spec, dtype, "norm3")
        else:
            self.ffn = ffn(spec, dtype=dtype, name="ffn")
            self.norm2 = _norm(spec, dtype, "norm2")
            self.norm3 = None
        self.dropout1 = Dropout(spec.dropout, dtype=dtype, name="dropout1")
        self.dropout2 = Dropout(spec.dropout, dtype=dtype, name="dropout2")
        self.dropout3 = Dropout(spec.dropout, dtype=dtype, name="dropout3")

    def build(self, input_shape=None):
        shape = (None, None, self.spec.d_model)
        for layer in (self.self_attn, self.norm1, self.cross_attn, self.norm2, self.ffn,
                      self.norm3):
            if layer is not None:
                layer.build(shape)

    def call(self, x, attention_bias=None, encoder_hidden_states=None,
             encoder_attention_bias=None, past_key_value=None, use_cache=False, training=None):
        pre = self.spec.norm_position == "pre"
        past = past_key_value or (None, None, None, None)
        present = []

        def attending(layer, bias, states, cached):
            def sublayer(y):
                y, kv = layer(y, attention_bias=bias, key_value_states=states,
                              past_key_value=cached, use_cache=True, training=training)
                present.extend(kv)
                return y
            return sublayer

        def bound(layer):  # a dropout or the FFN, with this call's training flag
            return functools.partial(layer, training=training)

        self_cache = None if past[0] is None else past[:2]
        self_attend = attending(self.self_attn, attention_bias, None, self_cache)
        if self.spec.parallel_residual:  # GPT-NeoX use_parallel_residual (no cross-attention)
            x = (x + bound(self.dropout1)(self_attend(self.norm1(x)))
                 + bound(self.dropout2)(bound(self.ffn)(self.norm2(x))))
            return (x, tuple(present)) if use_cache else x
        x = _residual(x, self_attend, self.norm1, bound(self.dropout1), pre)
        norm, dropout = self.norm2, self.dropout2  # the FFN's, without cross-attention
        if self.cross_attn is not None:
            cross_cache = None if len(past) < 4 or past[2] is None else past[2:]
            x = _residual(x, attending(self.cross_attn, encoder_attention_bias,
                                       encoder_hidden_states, cross_cache),
                          self.norm2, bound(self.dropout2), pre)
            norm, dropout = self.norm3, self.dropout3
        x = _residual(x, bound(self.ffn), norm, bound(dropout), pre)
        return (x, tuple(present)) if use_cache else x

    def get_config(self):
        return {**super().get_config(), "cross_attention": self.has_cross_attention}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Decoder(_SpecLayer):
    """A stack of ``spec.decoder_layers`` :class:`DecoderLayer` (``layers[i]``), then
    ``final_norm`` when ``spec.final_norm``. The masks come in as biases, made once per model
    call (:meth:`_CausalModel.self_attention_bias`, :meth:`_SpecModel.key_padding_bias`).

    Args:
        spec: the model spec.
        cross_attention: layers with cross-attention (encoder-decoders).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)`` embedded target tokens.
        attention_bias, encoder_hidden_states, encoder_attention_bias: as
            :class:`DecoderLayer`, shared by every layer.
        past_key_values: one cache entry per layer (see :class:`DecoderLayer`), or ``None``.
        use_cache: also return the new cache. training: dropout on when true.

    Returns:
        ``(B, T, D)``, or ``((B, T, D), past_key_values)`` with ``use_cache``.

    Example::

        >>> spec = ModelSpec(architecture="decoder", d_model=8, n_heads=2, d_ff=32, head="lm")
        >>> dec = Decoder(spec, dtype="float64")
        >>> len(dec.layers), tuple(dec(np.ones((2, 3, 8))).shape)
        (2, (2, 3, 8))
    """

    def __init__(self, spec: ModelSpec, cross_attention: bool = False, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.has_cross_attention = bool(cross_attention)
        self.layers = [DecoderLayer(spec, cross_attention=cross_attention, dtype=dtype,
                                    name=f"layers_{i}") for i in range(spec.decoder_layers)]
        self.final_norm = _norm(spec, dtype, "final_norm") if spec.final_norm else None

    def build(self, input_shape=None):
        _build_stack(self)

    def call(self, x, attention_bias=None, encoder_hidden_states=None,
             encoder_attention_bias=None, past_key_values=None, use_cache=False,
             training=None):
        present = []
        for i, layer in enumerate(self.layers):
            x = layer(x, attention_bias=attention_bias,
                      encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_bias=encoder_attention_bias,
                      past_key_value=None if past_key_values is None else past_key_values[i],
                      use_cache=use_cache, training=training)
            if use_cache:
                x, kv = x
                present.append(kv)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return (x, tuple(present)) if use_cache else x

    def get_config(self):
        return {**super().get_config(), "cross_attention": self.has_cross_attention}


@keras.saving.register_keras_serializable(package=_PACKAGE)
class LMHead(_SpecLayer):
    """Language-model head ``logits = x W^T``, ``W`` ``(vocab_size, D)``, no bias, no scale
    (GPT-2's ``lm_head``).

    Holds ``kernel`` ``(D, vocab_size)`` (a ``Dense`` kernel: ``lm_head.weight`` transposed)
    unless ``tied``; a tied head holds no variable and is called with the token table, so the
    table stays one variable and its gradient sums both uses.

    Args:
        spec: the model spec (``d_model``, ``vocab_size``).
        tied: hold no variable (``spec.tie_embeddings``).
        dtype: as :class:`Embeddings`. **kwargs: base layer arguments (``name``).

    Call args:
        x: ``(B, T, D)``.
        tied_weight: ``(vocab_size, D)`` the tied token table (required when tied, else
            ``None``).

    Returns:
        ``(B, T, vocab_size)``.

    Example::

        >>> spec = ModelSpec(architecture="decoder", vocab_size=50, d_model=8, n_heads=2,
        ...                  head="lm", tie_embeddings=False)
        >>> tuple(LMHead(spec, dtype="float64")(np.ones((2, 3, 8))).shape)
        (2, 3, 50)
    """

    def __init__(self, spec: ModelSpec, tied: bool = False, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        self.tied = bool(tied)
        self.kernel = None

    def build(self, input_shape=None):
        if not self.tied and self.kernel is None:
            self.kernel = self.add_weight(shape=(self.spec.d_model, self.spec.vocab_size),
                                          initializer="glorot_uniform", name="kernel")

    def call(self, x, tied_weight=None):
        if self.tied:
            if tied_weight is None:
                raise InputError("a tied LM head needs the token table: call it with "
                                 "tied_weight=")
            return ops.matmul(x, ops.transpose(tied_weight))
        return ops.matmul(x, self.kernel)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.spec.vocab_size)

    def get_config(self):
        return {**super().get_config(), "tied": self.tied}


class _CausalModel(_SpecModel):
    """What :class:`DecoderModel` and :class:`EncoderDecoderModel` share: the causal
    self-attention bias and the LM head over the target-side token table."""

    def self_attention_bias(self, attention_mask, x, past_length=0):
        """Causal self-attention bias ``(B or 1, 1, T, past + T)`` for the target ``x``
        ``(B, T, D)``: the 0/1 padding mask ``(B, past + T)`` times the 0/1 causal mask (query
        ``i``, at absolute position ``past + i``, sees keys ``j <= past + i``), then ONE
        :func:`allowed_bias` (two would add up to ``-inf``)."""
        dtype = self.compute_dtype
        t = ops.shape(x)[1]
        allowed = causal_allowed(t, past_length + t, dtype)[None, None]  # (1, 1, T, past + T)
        if attention_mask is not None:
            allowed = ops.cast(attention_mask, dtype)[:, None, None, :] * allowed
        return allowed_bias(allowed, dtype)

    def target_word_embeddings(self):
        """The ``(vocab_size, D)`` token table of the target side (``spec.word_embedding_name(
        "decoder")``): what target tokens look up and what a tied LM head multiplies by."""
        return self.embeddings.word_embeddings.embeddings

    def _outputs(self, hidden, use_cache, **extra):
        """The output dict from the decoder's ``hidden`` (``(y, past_key_values)`` with
        ``use_cache``): ``last_hidden_state``, ``extra``, ``logits``, ``past_key_values``."""
        present = None
        if use_cache:
            hidden, present = hidden
        out = {"last_hidden_state": hidden, **extra}
        if self.lm_head is not None:
            table = self.target_word_embeddings() if self.spec.tie_embeddings else None
            out["logits"] = self.lm_head(hidden, tied_weight=table)
        if use_cache:
            out["past_key_values"] = present
        return out


@keras.saving.register_keras_serializable(package=_PACKAGE)
class DecoderModel(_CausalModel):
    """A GPT-like decoder: :class:`Embeddings` -> :class:`Decoder` (causal self-attention) ->
    optional :class:`LMHead`, float32 or float64 end to end.

    Args:
        spec: a ``ModelSpec`` with ``architecture="decoder"`` (or its dict).
        dtype: ``"float32"`` or ``"float64"``; default float32.
        **kwargs: base model arguments (``name``, ``trainable``).

    Call args (Hugging Face names):
        input_ids: ``(B, T)`` token ids, or ``inputs_embeds`` ``(B, T, D)`` (already scaled).
        attention_mask: ``(B, past + T)`` 1/0 padding mask; ``None`` = all ones.
        past_key_values: per layer ``(k, v)`` ``(B, H_kv, past, d_head)`` from a previous call
            with ``use_cache=True``; the new tokens get positions ``past ..``.
        use_cache: also return ``"past_key_values"``.
        training: dropout on when true (off by default).

    Returns:
        ``{"last_hidden_state": (B, T, D)}``, ``"logits": (B, T, vocab_size)`` with
        ``head="lm"``, ``"past_key_values"`` with ``use_cache``.

    Example::

        >>> model = DecoderModel(ModelSpec.preset("gpt2-tiny"), dtype="float64")
        >>> out = model(input_ids=np.array([[5, 6, 7]]), use_cache=True)
        >>> step = model(input_ids=np.array([[8]]), past_key_values=out["past_key_values"])
        >>> tuple(step["logits"].shape)
        (1, 1, 1000)
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.embeddings = Embeddings(spec, dtype=dtype, name="embeddings")
        self.decoder = Decoder(spec, dtype=dtype, name="decoder")
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, name="lm_head")
                        if spec.head == "lm" else None)

    def call(self, input_ids=None, attention_mask=None, inputs_embeds=None,
             past_key_values=None, use_cache=False, training=None):
        past = past_length(past_key_values)
        x = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds, past_length=past,
                            training=training)
        x = self.decoder(x, attention_bias=self.self_attention_bias(attention_mask, x, past),
                         past_key_values=past_key_values, use_cache=use_cache,
                         training=training)
        return self._outputs(x, use_cache)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderDecoderModel(_CausalModel):
    """The Transformer of Vaswani et al. 2017: source :class:`Embeddings` (``embeddings``) ->
    :class:`Encoder`; target embeddings (``decoder_embeddings``, without a token table of their
    own when ``share_embeddings``) -> :class:`Decoder` with cross-attention over the encoder
    output -> optional :class:`LMHead`.

    Args:
        spec: a ``ModelSpec`` with ``architecture="encoder-decoder"`` (or its dict).
        dtype: ``"float32"`` or ``"float64"``; default float32.
        **kwargs: base model arguments (``name``, ``trainable``).

    Call args (Hugging Face names):
        input_ids / inputs_embeds: the source, ``(B, S)`` or ``(B, S, D)``.
        attention_mask: ``(B, S)`` source padding mask (also the cross-attention key mask).
        decoder_input_ids / decoder_inputs_embeds: the target, ``(B, T)`` or ``(B, T, D)``.
        decoder_attention_mask: ``(B, past + T)`` target padding mask.
        encoder_outputs: ``(B, S, D)`` an encoder output to reuse instead of running the encoder.
        past_key_values: per layer ``(k, v, cross_k, cross_v)``; the encoder is then skipped
            (its keys/values are cached), ``attention_mask`` is still the source mask.
        use_cache: also return ``"past_key_values"``. training: dropout on when true.

    Returns:
        ``{"last_hidden_state": (B, T, D), "encoder_last_hidden_state": (B, S, D)}`` (the latter
        not when the encoder was skipped), ``"logits"`` with ``head="lm"``,
        ``"past_key_values"`` with ``use_cache``.

    Example::

        >>> model = EncoderDecoderModel(ModelSpec.preset("vaswani-tiny"), dtype="float64")
        >>> out = model(input_ids=np.array([[5, 6, 7]]), decoder_input_ids=np.array([[0, 9]]))
        >>> tuple(out["logits"].shape), tuple(out["encoder_last_hidden_state"].shape)
        ((1, 2, 1000), (1, 3, 64))
    """

    def __init__(self, spec: ModelSpec, dtype=None, **kwargs):
        super().__init__(spec, dtype=dtype, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.embeddings = Embeddings(spec, dtype=dtype, name="embeddings")
        self.decoder_embeddings = Embeddings(spec, word_embeddings=not spec.share_embeddings,
                                             dtype=dtype, name="decoder_embeddings")
        self.encoder = Encoder(spec, dtype=dtype, name="encoder")
        self.decoder = Decoder(spec, cross_attention=True, dtype=dtype, name="decoder")
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, name="lm_head")
                        if spec.head == "lm" else None)

    def target_word_embeddings(self):
        emb = self.decoder_embeddings.word_embeddings
        return (emb if emb is not None else self.embeddings.word_embeddings).embeddings

    def embed_decoder_tokens(self, decoder_input_ids):
        """Target token embeddings (what ``decoder_inputs_embeds`` stands for), from the target
        table or the shared source one. ``(B, T)`` ints -> ``(B, T, D)``."""
        shared = None if self.decoder_embeddings.word_embeddings is not None else (
            self.embeddings.word_embeddings.embeddings)
        return self.decoder_embeddings.embed_tokens(decoder_input_ids, weight=shared)

    def call(self, input_ids=None, attention_mask=None, inputs_embeds=None,
             decoder_input_ids=None, decoder_attention_mask=None, decoder_inputs_embeds=None,
             encoder_outputs=None, past_key_values=None, use_cache=False, training=None):
        source_bias = self.key_padding_bias(attention_mask)
        memory = encoder_outputs
        if memory is None and past_key_values is None:
            x = self.embeddings(input_ids=input_ids, inputs_embeds=inputs_embeds,
                                training=training)
            memory = self.encoder(x, attention_bias=source_bias, training=training)
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise InputError("give exactly one of decoder_input_ids (B, T) and "
                             "decoder_inputs_embeds (B, T, D)")
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.embed_decoder_tokens(decoder_input_ids)
        past = past_length(past_key_values)
        y = self.decoder_embeddings(inputs_embeds=decoder_inputs_embeds, past_length=past,
                                    training=training)
        y = self.decoder(y, attention_bias=self.self_attention_bias(decoder_attention_mask, y,
                                                                    past),
                         encoder_hidden_states=memory, encoder_attention_bias=source_bias,
                         past_key_values=past_key_values, use_cache=use_cache,
                         training=training)
        extra = {} if memory is None else {"encoder_last_hidden_state": memory}
        return self._outputs(y, use_cache, **extra)
