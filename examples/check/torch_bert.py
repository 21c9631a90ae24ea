"""A BERT encoder written by hand in plain PyTorch, as a tutorial would: its own names (``tok``,
``blocks.0.wq``, ``ln1``...), ``nn.Linear`` / ``nn.LayerNorm`` / ``nn.Embedding``, no xformer
code. ``xformer check torch:examples/check/torch_bert.py:build --map
examples/check/torch_bert.yaml --spec examples/check/bert_tiny.yaml`` checks it.

The other factories plant one classic porting bug each (``BUGS``): LayerNorm eps left at
PyTorch's default 1e-5, attention scaled by sqrt(d_model) instead of sqrt(d_head), GELU's tanh
approximation instead of erf, and a kernel used transposed (``x @ W`` for ``x @ W.T``).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    def __init__(self, d, h, f, eps, bugs):
        super().__init__()
        self.h, self.bugs = h, bugs
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.ln1 = nn.LayerNorm(d, eps=eps)
        self.fc1, self.fc2 = nn.Linear(d, f), nn.Linear(f, d)
        self.ln2 = nn.LayerNorm(d, eps=eps)

    def attention(self, x, mask):
        b, t, d = x.shape
        dh = d // self.h
        if "transposed-kernel" in self.bugs:
            q = x @ self.wq.weight + self.wq.bias  # W is (out, in): this needs W.T
        else:
            q = self.wq(x)
        split = lambda y: y.view(b, t, self.h, dh).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(self.wk(x)), split(self.wv(x))
        scale = math.sqrt(d if "scale-d_model" in self.bugs else dh)
        scores = q @ k.transpose(-2, -1) / scale + (1.0 - mask[:, None, None, :]) * -1e9
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        return self.wo(ctx)

    def forward(self, x, mask):
        x = self.ln1(x + self.attention(x, mask))
        hidden = self.fc1(x)
        hidden = F.gelu(hidden, approximate="tanh" if "gelu-tanh" in self.bugs else "none")
        return self.ln2(x + self.fc2(hidden))


class TinyBert(nn.Module):
    def __init__(self, spec, dtype, bugs=()):
        super().__init__()
        eps = 1e-5 if "eps-default" in bugs else spec.norm_eps
        self.tok = nn.Embedding(spec.vocab_size, spec.d_model)
        self.pos = nn.Embedding(spec.max_len, spec.d_model)
        self.typ = nn.Embedding(spec.type_vocab_size, spec.d_model)
        self.emb_ln = nn.LayerNorm(spec.d_model, eps=eps)
        self.blocks = nn.ModuleList(Block(spec.d_model, spec.n_heads, spec.d_ff, eps, bugs)
                                    for _ in range(spec.n_layers))
        self.to(getattr(torch, dtype))

    def forward(self, ids, mask, types):
        pos = torch.arange(ids.shape[1])
        x = self.emb_ln(self.tok(ids) + self.pos(pos)[None] + self.typ(types))
        for block in self.blocks:
            x = block(x, mask.to(x.dtype))
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
