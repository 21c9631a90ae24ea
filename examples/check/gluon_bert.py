"""A BERT encoder written by hand in MXNet Gluon (1.9.1), as a tutorial would: its own names
(``tok``, ``blocks.0.wq``, ``ln1``...), ``HybridBlock`` s with ``nn.Dense(flatten=False)`` /
``nn.LayerNorm`` / ``nn.Embedding``, shapes inferred at the first call (no ``in_units``), no
xformer code. ``xformer check mxnet:examples/check/gluon_bert.py:build --map
examples/check/gluon_bert.yaml --spec examples/check/bert_tiny.yaml`` checks it.

Gluon blocks are called positionally: ``TinyBert.hybrid_forward(F, ids, mask, types)``, and the
mapping file's ``inputs`` names those arguments (xformer passes each input at its argument's
position).

The other factories plant one classic porting bug each (``BUGS``), as ``torch_bert.py`` does:
LayerNorm epsilon left at Gluon's default 1e-5, attention scaled by sqrt(d_model) instead of
sqrt(d_head), GELU's tanh approximation instead of erf, and the query kernel used transposed
(``x @ W`` for ``x @ W.T``: Gluon's ``Dense`` weight is ``(out, in)``).

Exact GELU in float64 needs care in MXNet 1.9.1: ``LeakyReLU(act_type="gelu")`` is off by ~3e-7
and ``F.erf``'s backward multiplies by a float32 ``2/sqrt(pi)`` (3e-8 off), so :func:`gelu`
keeps ``F.erf``'s value and gives autograd the slope computed in the input's dtype.
"""

import math
import warnings

import numpy as np

with warnings.catch_warnings():  # MXNet 1.9.1 uses np.bool, gone in numpy 1.24 to 1.26
    warnings.simplefilter("ignore", FutureWarning)
    if not hasattr(np, "bool"):
        np.bool = np.bool_

import mxnet as mx  # noqa: E402
from mxnet.gluon import HybridBlock, nn  # noqa: E402


def gelu(F, x):
    """``0.5 x (1 + erf(x / sqrt 2))`` with a float64-exact gradient (see the module docstring):
    the value is ``F.erf``'s, autograd sees only ``(z - BlockGrad(z)) * slope``."""
    z = x / math.sqrt(2.0)
    slope = F.BlockGrad(2.0 / math.sqrt(math.pi) * F.exp(-F.square(z)))
    erf = F.BlockGrad(F.erf(z)) + (z - F.BlockGrad(z)) * slope
    return 0.5 * x * (1.0 + erf)


def gelu_tanh(F, x):
    """The tanh approximation ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``."""
    return 0.5 * x * (1.0 + F.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


class DenseUsedTransposed(nn.Dense):
    """A hand-rolled projection ``x @ W + b`` on Gluon's ``(out, in)`` weight: needs ``W.T``
    (``in_units`` given: ``F.dot`` cannot infer a deferred weight shape)."""

    def hybrid_forward(self, F, x, weight, bias=None):
        return F.broadcast_add(F.dot(x, weight), bias)


class EncoderBlock(HybridBlock):
    def __init__(self, d, h, f, eps, bugs, dtype):
        super().__init__()
        self.d, self.h, self.bugs, self.dtype = d, h, bugs, dtype
        dense = lambda units: nn.Dense(units, flatten=False, dtype=dtype)  # noqa: E731
        with self.name_scope():
            self.wq = (DenseUsedTransposed(d, flatten=False, in_units=d, dtype=dtype)
                       if "transposed-kernel" in bugs else dense(d))
            self.wk, self.wv, self.wo = dense(d), dense(d), dense(d)
            self.ln1 = nn.LayerNorm(epsilon=eps)
            self.fc1, self.fc2 = dense(f), dense(d)
            self.ln2 = nn.LayerNorm(epsilon=eps)

    def attention(self, F, x, mask):
        h, dh = self.h, self.d // self.h
        # (B, T, D) -> (B * H, T, dh)
        split = lambda y: F.reshape(F.transpose(F.reshape(y, shape=(0, 0, h, -1)),  # noqa: E731
                                                axes=(0, 2, 1, 3)), shape=(-3, 0, 0))
        q, k, v = split(self.wq(x)), split(self.wk(x)), split(self.wv(x))
        scale = math.sqrt(self.d if "scale-d_model" in self.bugs else dh)
        scores = F.reshape(F.batch_dot(q, k, transpose_b=True) / scale,
                           shape=(-4, -1, h, 0, 0))  # (B, H, T, T)
        bias = F.reshape((1.0 - F.cast(mask, dtype=self.dtype)) * -1e9, shape=(0, 1, 1, -1))
        probs = F.softmax(F.broadcast_add(scores, bias), axis=-1)
        ctx = F.batch_dot(F.reshape(probs, shape=(-3, 0, 0)), v)  # (B * H, T, dh)
        ctx = F.reshape(F.transpose(F.reshape(ctx, shape=(-4, -1, h, 0, 0)), axes=(0, 2, 1, 3)),
                        shape=(0, 0, -3))
        return self.wo(ctx)

    def hybrid_forward(self, F, x, mask):
        x = self.ln1(x + self.attention(F, x, mask))
        hidden = self.fc1(x)
        hidden = gelu_tanh(F, hidden) if "gelu-tanh" in self.bugs else gelu(F, hidden)
        return self.ln2(x + self.fc2(hidden))


class TinyBert(HybridBlock):
    def __init__(self, spec, dtype, bugs=()):
        super().__init__()
        eps = 1e-5 if "eps-default" in bugs else spec.norm_eps
        d = spec.d_model
        with self.name_scope():
            self.tok = nn.Embedding(spec.vocab_size, d, dtype=dtype)
            self.pos = nn.Embedding(spec.max_len, d, dtype=dtype)
            self.typ = nn.Embedding(spec.type_vocab_size, d, dtype=dtype)
            self.emb_ln = nn.LayerNorm(epsilon=eps)
            self.blocks = nn.HybridSequential()
            for _ in range(spec.n_layers):
                self.blocks.add(EncoderBlock(d, spec.n_heads, spec.d_ff, eps, bugs, dtype))
        self.cast(dtype)  # nn.LayerNorm has no dtype argument

    def hybrid_forward(self, F, ids, mask, types):
        pos = self.pos(F.contrib.arange_like(ids, axis=1))  # (T, D)
        x = self.emb_ln(F.broadcast_add(self.tok(ids) + self.typ(types), F.expand_dims(pos, 0)))
        for block in self.blocks:
            x = block(x, mask)
        return x


BUGS = ("eps-default", "scale-d_model", "gelu-tanh", "transposed-kernel")


def _made(spec, dtype, bugs=()):
    net = TinyBert(spec, dtype, bugs)
    net.initialize(mx.init.Normal(0.02))  # deferred: the shapes come with the first call
    return net


def build(spec, dtype):
    return _made(spec, dtype)


def build_eps_default(spec, dtype):
    return _made(spec, dtype, {"eps-default"})


def build_scale_d_model(spec, dtype):
    return _made(spec, dtype, {"scale-d_model"})


def build_gelu_tanh(spec, dtype):
    return _made(spec, dtype, {"gelu-tanh"})


def build_transposed_kernel(spec, dtype):
    return _made(spec, dtype, {"transposed-kernel"})
