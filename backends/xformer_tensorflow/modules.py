"""Keras 3 layers of the xformer encoder (TensorFlow backend).

The twin of ``xformer_torch/modules.py`` and ``xformer_mxnet/modules.py``: the same classes, in
the same order, with the same attribute names (``Embeddings``, ``MultiHeadAttention``,
``FeedForward``, ``EncoderLayer``, ``Encoder``, ``Pooler``, ``EncoderModel``), so the three files
diff block by block. The semantics are those of :mod:`xformer.reference` (DESIGN.md §3).

Attribute paths mirror the canonical parameter names of :meth:`xformer.ModelSpec.parameters`:
``model.encoder.layers[0].self_attn.q_proj.kernel`` holds
``encoder.layers.0.self_attn.q_proj.weight`` transposed (a Keras ``Dense`` kernel is
``(in, out)``, the canonical layout ``(out, in)``); ``Embedding.embeddings`` is ``weight``;
``LayerNormalization.gamma`` / ``beta`` are ``weight`` / ``bias``.

Numerics (DESIGN.md §5): every sub-layer gets ``dtype`` explicitly (a Keras parent's dtype does
not reach sub-layers created without one); ``LayerNormalization`` gets ``epsilon=spec.norm_eps``
(the Keras default is 1e-3); GELU is composed from ``erf`` / ``tanh`` (``tf.nn.gelu`` is off by
~5e-9 in float64 and ``keras.ops.gelu`` defaults to the tanh form); masked logits get the dtype's
most negative finite value, never ``-inf``, so a fully padded row attends uniformly instead of
giving NaN.

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

import math

import keras
import numpy as np
from keras import ops

from xformer.errors import InputError
from xformer.spec import ModelSpec, sinusoidal_table

__all__ = ["gelu", "gelu_tanh", "relu", "ACTIVATIONS", "Embeddings", "MultiHeadAttention",
           "FeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel"]

_PACKAGE = "xformer"


# ---------------------------------------------------------------------- activations
def gelu(x):
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt(2)))`` (Hendrycks & Gimpel 2016), constants in
    ``x.dtype``. Not ``tf.nn.gelu`` / ``keras.ops.gelu``: those lose ~5e-9 in float64 or default
    to the tanh approximation."""
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


#: ``spec.activation`` -> function.
ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def _layer_norm(spec: ModelSpec, dtype, name: str) -> keras.layers.LayerNormalization:
    """Keras' own LayerNorm with the spec's epsilon, ``beta`` only when ``spec.bias``."""
    return keras.layers.LayerNormalization(epsilon=spec.norm_eps, center=spec.bias, scale=True,
                                           dtype=dtype, name=name)


def _dense(spec: ModelSpec, units: int, dtype, name: str, **kwargs) -> keras.layers.Dense:
    return keras.layers.Dense(units, use_bias=spec.bias, dtype=dtype, name=name, **kwargs)


class _SpecLayer(keras.layers.Layer):
    """A layer configured by a :class:`~xformer.spec.ModelSpec` (serialised as a dict)."""

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)

    def get_config(self):
        return {**super().get_config(), "spec": self.spec.to_dict()}


# ---------------------------------------------------------------------- layers
@keras.saving.register_keras_serializable(package=_PACKAGE)
class Embeddings(_SpecLayer):
    """Token + position (+ segment) embeddings, then LayerNorm (BERT, Devlin et al. 2019 §3;
    Hugging Face ``BertEmbeddings``) and dropout.

    ``x = word_embeddings[input_ids] * (sqrt(D) if embed_scale)`` (Vaswani 2017 §3.4), or
    ``inputs_embeds``; ``+ positions[:T]`` (learned table, or the fixed sinusoidal table of
    Vaswani 2017 §3.5 held as a non-trainable constant); ``+ token_type_embeddings[
    token_type_ids]`` when ``type_vocab_size > 0``; ``norm`` when ``embedding_norm``.

    Args:
        spec: the model spec.
        **kwargs: base layer arguments (``name``, ``dtype``: ``"float32"`` or ``"float64"``).

    Call args:
        input_ids: ``(B, T)`` integer token ids, or ``None`` with ``inputs_embeds``.
        token_type_ids: ``(B, T)`` integers; ``None`` means all zeros.
        inputs_embeds: ``(B, T, D)`` already scaled token embeddings, in the layer dtype.
        training: dropout on when true.

    Returns:
        ``(B, T, D)`` in the layer dtype.

    Raises:
        InputError: ``T > spec.max_len`` (when ``T`` is known while tracing).

    Example::

        >>> emb = Embeddings(ModelSpec.preset("tiny"), dtype="float64")
        >>> tuple(emb(input_ids=np.zeros((2, 5), "int64")).shape)
        (2, 5, 64)
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.word_embeddings = keras.layers.Embedding(spec.vocab_size, spec.d_model, dtype=dtype,
                                                      name="word_embeddings")
        self.position_embeddings = None
        if spec.positional == "learned":
            self.position_embeddings = keras.layers.Embedding(
                spec.max_len, spec.d_model, dtype=dtype, name="position_embeddings")
        self.token_type_embeddings = None
        if spec.type_vocab_size:
            self.token_type_embeddings = keras.layers.Embedding(
                spec.type_vocab_size, spec.d_model, dtype=dtype, name="token_type_embeddings")
        self.norm = _layer_norm(spec, dtype, "norm") if spec.embedding_norm else None
        self.dropout = keras.layers.Dropout(spec.dropout, dtype=dtype, name="dropout")
        # Not a weight: the same float64 table on every backend, cast once to the compute dtype.
        self._sinusoidal = (sinusoidal_table(spec.max_len, spec.d_model)
                            .astype(self.compute_dtype) if spec.positional == "sinusoidal"
                            else None)

    def build(self, input_shape=None):
        self.word_embeddings.build()
        if self.position_embeddings is not None:
            self.position_embeddings.build()
        if self.token_type_embeddings is not None:
            self.token_type_embeddings.build()
        if self.norm is not None:
            self.norm.build((None, None, self.spec.d_model))

    def embed_tokens(self, input_ids):
        """``word_embeddings[input_ids]``, times ``sqrt(D)`` when ``embed_scale``: the tensor
        that ``inputs_embeds`` stands for. ``(B, T)`` ints -> ``(B, T, D)``."""
        x = self.word_embeddings(input_ids)
        if self.spec.embed_scale:
            x = x * ops.convert_to_tensor(math.sqrt(self.spec.d_model), dtype=self.compute_dtype)
        return x

    def call(self, input_ids=None, token_type_ids=None, inputs_embeds=None, training=None):
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        t = x.shape[1]
        if t is not None and t > self.spec.max_len:
            raise InputError(f"sequence length {t} is longer than max_len={self.spec.max_len}; "
                             f"shorten the input (xformer does not truncate silently)")
        t = ops.shape(x)[1]
        if self.position_embeddings is not None:
            x = x + self.position_embeddings(ops.arange(t, dtype="int32"))[None]
        else:
            x = x + ops.convert_to_tensor(self._sinusoidal, dtype=self.compute_dtype)[None, :t]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = ops.zeros(ops.shape(x)[:2], dtype="int32")
            x = x + self.token_type_embeddings(token_type_ids)
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x, training=training)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:2], self.spec.d_model)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class MultiHeadAttention(_SpecLayer):
    """Multi-head scaled dot-product self-attention (Vaswani 2017 §3.2.1-3.2.2; scaling and
    additive mask as Hugging Face ``BertSelfAttention``).

    ``softmax(Q K^T / sqrt(d_head) + (1 - mask) * finfo(dtype).min) V`` per head, heads split as
    ``(B, T, H, d_head)``, then ``out_proj``. The mask term is the dtype's most negative *finite*
    value, so a fully padded row gives uniform attention, never NaN. Dropout on the attention
    probabilities in training.

    Args:
        spec: the model spec (``d_model``, ``n_heads``, ``bias``, ``dropout``).
        **kwargs: base layer arguments (``name``, ``dtype``).

    Call args:
        x: ``(B, T, D)``.
        attention_mask: ``(B, T)``, 1 = attend, 0 = padding; ``None`` attends everywhere.
        training: dropout on when true.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> attn = MultiHeadAttention(ModelSpec(d_model=8, n_heads=2), dtype="float64")
        >>> tuple(attn(np.ones((2, 3, 8)), attention_mask=np.array([[1, 1, 0], [0, 0, 0]])).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        d, dtype = self.spec.d_model, self.dtype_policy
        self.q_proj = _dense(self.spec, d, dtype, "q_proj")
        self.k_proj = _dense(self.spec, d, dtype, "k_proj")
        self.v_proj = _dense(self.spec, d, dtype, "v_proj")
        self.out_proj = _dense(self.spec, d, dtype, "out_proj")
        self.dropout = keras.layers.Dropout(self.spec.dropout, dtype=dtype, name="dropout")

    def build(self, input_shape=None):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            proj.build((None, None, self.spec.d_model))

    def call(self, x, attention_mask=None, training=None):
        dtype = self.compute_dtype
        h, dh = self.spec.n_heads, self.spec.d_head
        b, t = ops.shape(x)[0], ops.shape(x)[1]

        def split(y):  # (B, T, D) -> (B, H, T, d_head)
            return ops.transpose(ops.reshape(y, (b, t, h, dh)), (0, 2, 1, 3))

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = ops.matmul(q, ops.transpose(k, (0, 1, 3, 2)))
        scores = scores / ops.convert_to_tensor(math.sqrt(dh), dtype=dtype)
        if attention_mask is not None:
            mask = ops.cast(attention_mask, dtype)
            neg = ops.convert_to_tensor(np.finfo(dtype).min, dtype=dtype)
            scores = scores + ((ops.convert_to_tensor(1.0, dtype=dtype) - mask) * neg
                               )[:, None, None, :]
        probs = self.dropout(ops.softmax(scores, axis=-1), training=training)
        ctx = ops.reshape(ops.transpose(ops.matmul(probs, v), (0, 2, 1, 3)),
                          (b, t, self.spec.d_model))
        return self.out_proj(ctx)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class FeedForward(_SpecLayer):
    """Position-wise feed-forward network ``linear2(dropout(act(linear1(x))))``
    (Vaswani 2017 §3.3), ``act`` from ``spec.activation`` (:data:`ACTIVATIONS`).

    Args:
        spec: the model spec (``d_model``, ``d_ff``, ``activation``, ``bias``, ``dropout``).
        **kwargs: base layer arguments (``name``, ``dtype``).

    Call args:
        x: ``(B, T, D)``. training: dropout on when true.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> ffn = FeedForward(ModelSpec(d_model=8, n_heads=2, d_ff=32), dtype="float64")
        >>> tuple(ffn(np.ones((2, 3, 8))).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        dtype = self.dtype_policy
        self.linear1 = _dense(self.spec, self.spec.d_ff, dtype, "linear1")
        self.activation = ACTIVATIONS[self.spec.activation]
        self.dropout = keras.layers.Dropout(self.spec.dropout, dtype=dtype, name="dropout")
        self.linear2 = _dense(self.spec, self.spec.d_model, dtype, "linear2")

    def build(self, input_shape=None):
        self.linear1.build((None, None, self.spec.d_model))
        self.linear2.build((None, None, self.spec.d_ff))

    def call(self, x, training=None):
        y = self.dropout(self.activation(self.linear1(x)), training=training)
        return self.linear2(y)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderLayer(_SpecLayer):
    """One Transformer encoder layer: self-attention then feed-forward, each with a residual
    connection and LayerNorm (``norm1`` for attention, ``norm2`` for the FFN).

    * ``norm_position="post"`` (Vaswani 2017 §3.1, BERT):
      ``x = norm1(x + drop(attn(x))); x = norm2(x + drop(ffn(x)))``.
    * ``norm_position="pre"`` (GPT-2; Xiong et al. 2020):
      ``x = x + drop(attn(norm1(x))); x = x + drop(ffn(norm2(x)))``.

    Args:
        spec: the model spec.
        **kwargs: base layer arguments (``name``, ``dtype``).

    Call args:
        x: ``(B, T, D)``. attention_mask: ``(B, T)`` 1/0 or ``None``. training: dropout on.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> layer = EncoderLayer(ModelSpec(d_model=8, n_heads=2, d_ff=32), dtype="float64")
        >>> tuple(layer(np.ones((2, 3, 8)), attention_mask=np.ones((2, 3))).shape)
        (2, 3, 8)
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, name="self_attn")
        self.norm1 = _layer_norm(spec, dtype, "norm1")
        self.ffn = FeedForward(spec, dtype=dtype, name="ffn")
        self.norm2 = _layer_norm(spec, dtype, "norm2")
        self.dropout1 = keras.layers.Dropout(spec.dropout, dtype=dtype, name="dropout1")
        self.dropout2 = keras.layers.Dropout(spec.dropout, dtype=dtype, name="dropout2")

    def build(self, input_shape=None):
        shape = (None, None, self.spec.d_model)
        self.self_attn.build(shape)
        self.norm1.build(shape)
        self.ffn.build(shape)
        self.norm2.build(shape)

    def call(self, x, attention_mask=None, training=None):
        def attn(y):
            y = self.self_attn(y, attention_mask=attention_mask, training=training)
            return self.dropout1(y, training=training)

        def ffn(y):
            return self.dropout2(self.ffn(y, training=training), training=training)

        if self.spec.norm_position == "post":
            x = self.norm1(x + attn(x))
            return self.norm2(x + ffn(x))
        x = x + attn(self.norm1(x))
        return x + ffn(self.norm2(x))

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Encoder(_SpecLayer):
    """A stack of ``spec.n_layers`` :class:`EncoderLayer` (``layers[i]``), then ``final_norm``
    when ``spec.final_norm`` (pre-LN models).

    Args:
        spec: the model spec.
        **kwargs: base layer arguments (``name``, ``dtype``).

    Call args:
        x: ``(B, T, D)``. attention_mask: ``(B, T)`` 1/0 or ``None``. training: dropout on.

    Returns:
        ``(B, T, D)``.

    Example::

        >>> enc = Encoder(ModelSpec(d_model=8, n_heads=2, d_ff=32, n_layers=3), dtype="float64")
        >>> len(enc.layers), tuple(enc(np.ones((2, 3, 8))).shape)
        (3, (2, 3, 8))
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        spec, dtype = self.spec, self.dtype_policy
        self.layers = [EncoderLayer(spec, dtype=dtype, name=f"layers_{i}")
                       for i in range(spec.n_layers)]
        self.final_norm = _layer_norm(spec, dtype, "final_norm") if spec.final_norm else None

    def build(self, input_shape=None):
        for layer in self.layers:
            layer.build((None, None, self.spec.d_model))
        if self.final_norm is not None:
            self.final_norm.build((None, None, self.spec.d_model))

    def call(self, x, attention_mask=None, training=None):
        for layer in self.layers:
            x = layer(x, attention_mask=attention_mask, training=training)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package=_PACKAGE)
class Pooler(_SpecLayer):
    """BERT pooler ``tanh(dense(x[:, 0]))`` (Devlin et al. 2019; Hugging Face ``BertPooler``).

    Args:
        spec: the model spec (``d_model``, ``bias``).
        **kwargs: base layer arguments (``name``, ``dtype``).

    Call args:
        x: ``(B, T, D)``.

    Returns:
        ``(B, D)``: the first token's state, projected and squashed.

    Example::

        >>> pooler = Pooler(ModelSpec(d_model=8, n_heads=2), dtype="float64")
        >>> tuple(pooler(np.ones((2, 3, 8))).shape)
        (2, 8)
    """

    def __init__(self, spec: ModelSpec, **kwargs):
        super().__init__(spec, **kwargs)
        self.dense = _dense(self.spec, self.spec.d_model, self.dtype_policy, "dense",
                            activation="tanh")

    def build(self, input_shape=None):
        self.dense.build((None, self.spec.d_model))

    def call(self, x):
        return self.dense(x[:, 0])

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.spec.d_model)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class EncoderModel(keras.Model):
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
        super().__init__(dtype=dtype or "float32", **kwargs)
        self.spec = spec if isinstance(spec, ModelSpec) else ModelSpec.from_dict(spec)
        dtype = self.dtype_policy
        self.embeddings = Embeddings(self.spec, dtype=dtype, name="embeddings")
        self.encoder = Encoder(self.spec, dtype=dtype, name="encoder")
        self.pooler = (Pooler(self.spec, dtype=dtype, name="pooler")
                       if self.spec.head == "pooler" else None)

    def build(self, input_shape=None):
        self.embeddings.build()
        self.encoder.build()
        if self.pooler is not None:
            self.pooler.build()

    def call(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None,
             training=None):
        if token_type_ids is not None and not self.spec.type_vocab_size:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        x = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids,
                            inputs_embeds=inputs_embeds, training=training)
        x = self.encoder(x, attention_mask=attention_mask, training=training)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(x)
        return out

    def get_config(self):
        return {"spec": self.spec.to_dict(), "dtype": self.dtype_policy.name,
                "name": self.name, "trainable": self.trainable}
