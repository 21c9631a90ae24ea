"""A framework-free numpy forward pass: the executable statement of DESIGN.md §3.

Used as an independent oracle (float64) by tests and by conformance when a framework reference
is not available. Forward only; gradients are compared between backends.

Semantics, for ``spec.architecture == "encoder"``:

* embeddings: ``x = word_embeddings[input_ids] * (sqrt(d_model) if embed_scale else 1)``
  (or ``inputs_embeds``), ``+ positions[:T]`` (learned table or :func:`sinusoidal_table`),
  ``+ token_type_embeddings[token_type_ids]``, then LayerNorm if ``embedding_norm``.
* attention (Vaswani 2017 §3.2.2; scaling as Hugging Face ``BertSelfAttention``):
  ``scores = (Q K^T) / sqrt(d_head) + (1 - attention_mask) * finfo(dtype).min``,
  heads split as ``(B, T, H, d_head)``, ``softmax`` over keys, ``out_proj(concat_heads(P V))``.
* post-LN layer: ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``;
  pre-LN: ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``; ``ffn = linear2(act(linear1(x)))``.
* ``final_norm`` after the last layer; pooler: ``tanh(pooler.dense(x[:, 0]))``.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .spec import ModelSpec, sinusoidal_table

try:  # scipy's erf is vectorised; math.erf is the fallback
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover
    _erf = np.vectorize(math.erf)


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """``relu``, exact ``gelu`` (erf) or ``gelu_tanh`` (Hendrycks & Gimpel 2016, eq. for GELU)."""
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def forward(spec: ModelSpec, weights: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
            dtype: str = "float64") -> dict[str, np.ndarray]:
    """Outputs ``{"last_hidden_state": (B, T, D), "pooler_output": (B, D)}`` in ``dtype``.

    ``inputs`` as for :class:`xformer.backend.Backend` (already checked).
    """
    w = {k: np.asarray(v, dtype) for k, v in weights.items()}
    lin = lambda x, p: x @ w[f"{p}.weight"].T + (w[f"{p}.bias"] if spec.bias else 0)  # noqa: E731
    ln = lambda x, p: layer_norm(x, w[f"{p}.weight"], w.get(f"{p}.bias"), spec.norm_eps)  # noqa

    if inputs.get("inputs_embeds") is not None:
        x = np.asarray(inputs["inputs_embeds"], dtype)
    else:
        x = w["embeddings.word_embeddings.weight"][inputs["input_ids"]]
        if spec.embed_scale:
            x = x * np.asarray(math.sqrt(spec.d_model), dtype)
    b, t, d = x.shape
    if spec.positional == "learned":
        x = x + w["embeddings.position_embeddings.weight"][:t]
    else:
        x = x + sinusoidal_table(spec.max_len, d)[:t].astype(dtype)
    if spec.type_vocab_size:
        tt = inputs.get("token_type_ids")
        tt = np.zeros((b, t), np.int64) if tt is None else tt
        x = x + w["embeddings.token_type_embeddings.weight"][tt]
    if spec.embedding_norm:
        x = ln(x, "embeddings.norm")

    mask = inputs.get("attention_mask")
    mask = np.ones((b, t), dtype) if mask is None else np.asarray(mask, dtype)
    bias = ((1.0 - mask) * np.finfo(dtype).min)[:, None, None, :]
    h, dh = spec.n_heads, spec.d_head

    def attn(x, p):
        split = lambda y: y.reshape(b, t, h, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(lin(x, f"{p}.{n}")) for n in ("q_proj", "k_proj", "v_proj"))
        scores = q @ k.transpose(0, 1, 3, 2) / np.asarray(math.sqrt(dh), dtype) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        ctx = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return lin(ctx, f"{p}.out_proj")

    for i in range(spec.n_layers):
        p = f"encoder.layers.{i}"
        ffn = lambda y: lin(activation(spec.activation, lin(y, f"{p}.ffn.linear1")),  # noqa
                            f"{p}.ffn.linear2")
        if spec.norm_position == "post":
            x = ln(x + attn(x, f"{p}.self_attn"), f"{p}.norm1")
            x = ln(x + ffn(x), f"{p}.norm2")
        else:
            x = x + attn(ln(x, f"{p}.norm1"), f"{p}.self_attn")
            x = x + ffn(ln(x, f"{p}.norm2"))
    if spec.final_norm:
        x = ln(x, "encoder.final_norm")
    out = {"last_hidden_state": x.astype(dtype)}
    if spec.head == "pooler":
        out["pooler_output"] = np.tanh(lin(x[:, 0], "pooler.dense")).astype(dtype)
    return out
