"""A BERT encoder written by hand in plain Keras 3, as a tutorial would: its own names (a
``keras.Model`` named ``mybert``, blocks ``block0``, ``block1`` with ``wq``, ``ln1``...),
``Dense`` / ``LayerNormalization`` / ``Embedding`` layers, no xformer code. ``xformer check
tensorflow:examples/check/keras_bert.py:build --map examples/check/keras_bert.yaml --spec
examples/check/bert_tiny.yaml`` checks it.

Every layer gets an explicit ``name``: Keras 3 keeps an explicit name as it is (two models built
in one process both have ``mybert/block0/wq/kernel``), but numbers generated ones per process
(``dense``, ``dense_1``, ...), and the mapping file names variables by their ``.path``.

The other factories plant one classic porting bug each (``BUGS``): LayerNormalization epsilon
left at Keras' default 1e-3, attention scaled by sqrt(d_model) instead of sqrt(d_head), GELU's
tanh approximation (``keras.activations.gelu(x, approximate=True)``) instead of erf, and a
kernel used transposed (``x @ W.T`` for ``x @ W``, Keras kernels being ``(in, out)``).
"""

import math

import keras
from keras import layers, ops


def gelu(x):
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt(2)))``, written out: ``keras.activations.gelu(x)``
    is ``tf.nn.gelu`` on TensorFlow, ~1e-9 off in float64 (``xformer check`` finds it at the
    first ffn node, past the float64 bounds; fine in float32)."""
    return 0.5 * x * (1.0 + ops.erf(x / math.sqrt(2.0)))


class Block(keras.layers.Layer):
    """One post-LN encoder block: ``x = ln1(x + attention(x)); x = ln2(x + fc2(gelu(fc1(x))))``."""

    def __init__(self, d, h, f, eps, bugs, **kwargs):
        super().__init__(**kwargs)
        dtype = kwargs.get("dtype")
        self.h, self.bugs = h, bugs
        self.wq, self.wk, self.wv, self.wo = (layers.Dense(d, name=n, dtype=dtype)
                                              for n in ("wq", "wk", "wv", "wo"))
        self.ln1 = layers.LayerNormalization(epsilon=eps, name="ln1", dtype=dtype)
        self.fc1 = layers.Dense(f, name="fc1", dtype=dtype)
        self.fc2 = layers.Dense(d, name="fc2", dtype=dtype)
        self.ln2 = layers.LayerNormalization(epsilon=eps, name="ln2", dtype=dtype)

    def build(self, x_shape):
        # every sublayer's variables now, under this block's name (``mybert/block0/wq/...``):
        # the transposed-kernel bug reads wq.kernel without ever calling wq
        for layer in (self.wq, self.wk, self.wv, self.wo, self.ln1, self.fc1, self.ln2):
            layer.build(x_shape)
        self.fc2.build((*x_shape[:-1], self.fc1.units))

    def attention(self, x, padding_mask):
        _, t, d = ops.shape(x)
        dh = d // self.h
        if "transposed-kernel" in self.bugs:
            q = ops.matmul(x, ops.transpose(self.wq.kernel)) + self.wq.bias  # needs x @ W
        else:
            q = self.wq(x)

        def split(y):  # (B, T, D) -> (B, H, T, dh)
            return ops.transpose(ops.reshape(y, (-1, t, self.h, dh)), (0, 2, 1, 3))

        q, k, v = split(q), split(self.wk(x)), split(self.wv(x))
        scale = math.sqrt(d if "scale-d_model" in self.bugs else dh)
        scores = (ops.matmul(q, ops.transpose(k, (0, 1, 3, 2))) / scale
                  + (1.0 - padding_mask[:, None, None, :]) * -1e9)
        ctx = ops.matmul(ops.softmax(scores, axis=-1), v)
        ctx = ops.reshape(ops.transpose(ctx, (0, 2, 1, 3)), (-1, t, d))
        return self.wo(ctx)

    def call(self, x, padding_mask):
        x = self.ln1(x + self.attention(x, padding_mask))
        hidden = self.fc1(x)
        hidden = (keras.activations.gelu(hidden, approximate=True) if "gelu-tanh" in self.bugs
                  else gelu(hidden))
        return self.ln2(x + self.fc2(hidden))


class TinyBert(keras.Model):
    """``call(token_ids, padding_mask, segment_ids)`` -> the ``(B, T, D)`` hidden states."""

    def __init__(self, spec, dtype, bugs=()):
        super().__init__(name="mybert", dtype=dtype)
        eps = 1e-3 if "eps-default" in bugs else spec.norm_eps
        d = spec.d_model
        self.tok = layers.Embedding(spec.vocab_size, d, name="tok", dtype=dtype)
        self.pos = layers.Embedding(spec.max_len, d, name="pos", dtype=dtype)
        self.typ = layers.Embedding(spec.type_vocab_size, d, name="typ", dtype=dtype)
        self.emb_ln = layers.LayerNormalization(epsilon=eps, name="emb_ln", dtype=dtype)
        self.blocks = [Block(d, spec.n_heads, spec.d_ff, eps, bugs, name=f"block{i}",
                             dtype=dtype) for i in range(spec.n_layers)]

    def call(self, token_ids, padding_mask, segment_ids):
        positions = ops.arange(ops.shape(token_ids)[1])
        x = self.emb_ln(self.tok(token_ids) + self.pos(positions)[None]
                        + self.typ(segment_ids))
        padding_mask = ops.cast(padding_mask, x.dtype)
        for block in self.blocks:
            x = block(x, padding_mask)
        return x


BUGS = ("eps-default", "scale-d_model", "gelu-tanh", "transposed-kernel")


def build(spec, dtype):
    return TinyBert(spec, dtype)


def build_eps_default(spec, dtype):
    return TinyBert(spec, dtype, {"eps-default"})


def build_scale_d_model(spec, dtype):
    return TinyBert(spec, dtype, {"scale-d_model"})


def build_gelu_tanh(spec, dtype):
    return TinyBert(spec, dtype, {"gelu-tanh"})


def build_transposed_kernel(spec, dtype):
    return TinyBert(spec, dtype, {"transposed-kernel"})
