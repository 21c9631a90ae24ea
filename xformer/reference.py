"""A framework-free numpy forward pass: the executable statement of docs/design.md §3.

Used as an independent oracle (float64) by tests and by conformance when a framework reference
is not available. Forward only; gradients are compared between backends.

Semantics (decoders and encoder-decoders as below, plus the causal mask and cross-attention):

* embeddings: ``x = word_embeddings[input_ids] * (sqrt(d_model) if embed_scale else 1)``
  (or ``inputs_embeds``), ``+ positions[:T]`` (learned table or :func:`sinusoidal_table`),
  ``+ token_type_embeddings[token_type_ids]``, then LayerNorm if ``embedding_norm``.
* attention (Vaswani 2017 §3.2.2; scaling as Hugging Face ``BertSelfAttention``):
  ``scores = (Q K^T) / sqrt(d_head) + (1 - attention_mask) * finfo(dtype).min``,
  heads split as ``(B, T, H, d_head)``, ``softmax`` over keys, ``out_proj(concat_heads(P V))``.
* grouped-query attention (Ainslie et al. 2023): ``k_proj``/``v_proj`` give ``H_kv`` heads;
  query head ``h`` reads key/value head ``h // (H / H_kv)`` (Hugging Face ``repeat_kv``).
* rotary positions (Su et al. 2021), ``positional="rope"``: in self-attention, the first
  ``rotary_dim`` dimensions of each query and key head are rotated by the angles of
  :func:`xformer.spec.rotary_table` (``rope_theta``, ``rope_scaling``: ``spec.rotary_tables()``)
  at the token's absolute position; pair ``i`` is
  ``(i, i + rotary_dim / 2)`` (``rope_style="half"``) or ``(2i, 2i + 1)`` (``"interleaved"``):
  ``(a, b) -> (a cos - b sin, b cos + a sin)``.
* norms: LayerNorm ``(x - mean) / sqrt(var + eps) * (offset + w) + b`` or RMSNorm
  ``x / sqrt(mean(x^2) + eps) * (offset + w)``, ``offset = norm_scale_offset``.
* post-LN layer: ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``;
  pre-LN: ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``; parallel residual (GPT-NeoX):
  ``x = x + attn(norm1(x)) + ffn(norm2(x))``. ``ffn = linear2(act(linear1(x)))`` (``"mlp"``)
  or ``down_proj(act(gate_proj(x)) * up_proj(x))`` (``"glu"``, Shazeer 2020).
* ``final_norm`` after the last layer; pooler: ``tanh(pooler.dense(x[:, 0]))``.
* decoder self-attention adds the causal mask: query ``i`` sees keys ``j <= i``; padding and
  causality are multiplied into one 0/1 ``allowed`` mask first, then turned into one
  ``finfo.min`` bias (two biases would add up to ``-inf``).
* encoder-decoder layer: ``norm1`` around causal self-attention, ``norm2`` around
  cross-attention (queries from the decoder, keys/values from the encoder output, the source
  ``attention_mask`` as key padding), ``norm3`` around the FFN (``nn.TransformerDecoderLayer``).
* LM head: ``logits = last_hidden_state @ W^T``, ``W`` = ``lm_head.weight`` or the tied
  (target-side) token table; no bias, no scale.
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
    """``relu``, exact ``gelu`` (erf), ``gelu_tanh`` (Hendrycks & Gimpel 2016, eq. for GELU) or
    ``silu`` (``x sigmoid(x)``, Elfwing et al. 2018)."""
    if name == "relu":
        return np.maximum(x, 0)
    if name == "gelu":
        return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))
    if name == "silu":
        return x / (1.0 + np.exp(-x))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * weight
    return y + bias if bias is not None else y


def rms_norm(x, weight, eps):
    """RMSNorm (Zhang & Sennrich 2019, eq. 4): ``x / sqrt(mean(x^2) + eps) * weight``."""
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * weight


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, style: str) -> np.ndarray:
    """Rotary embedding of ``x`` ``(..., T, d_head)`` (Su et al. 2021 eq. 34) with ``cos`` /
    ``sin`` ``(T, rotary_dim / 2)``: the first ``rotary_dim`` dimensions turn pairwise,
    ``(a, b) -> (a cos - b sin, b cos + a sin)``, pairs ``(i, i + rotary_dim / 2)`` for
    ``style="half"`` or ``(2i, 2i + 1)`` for ``"interleaved"``; the rest pass through."""
    r = 2 * cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    if style == "half":
        a, b = rot[..., : r // 2], rot[..., r // 2:]
        out = np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    else:
        a, b = rot[..., 0::2], rot[..., 1::2]
        out = np.stack([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(rot.shape)
    return np.concatenate([out, rest], axis=-1)


def causal_allowed(t_q: int, t_k: int) -> np.ndarray:
    """``(t_q, t_k)`` 0/1: query ``i`` (at absolute position ``t_k - t_q + i``) may attend to
    key ``j`` iff ``j <= t_k - t_q + i``."""
    return (np.arange(t_k)[None, :] <= (t_k - t_q) + np.arange(t_q)[:, None]).astype(np.int64)


def attention_bias(allowed: np.ndarray, dtype: str) -> np.ndarray:
    """``(1 - allowed) * finfo(dtype).min``: one bias from the *product* of the padding and
    causal masks, so two masks never add up to ``2 * finfo.min = -inf``."""
    return ((1.0 - allowed.astype(dtype)) * np.finfo(dtype).min).astype(dtype)


def forward(spec: ModelSpec, weights: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
            dtype: str = "float64") -> dict[str, np.ndarray]:
    """Outputs of :meth:`ModelSpec.output_names` in ``dtype``, for every architecture.

    ``inputs`` as for :class:`xformer.backend.Backend` (already checked): ``input_ids`` or
    ``inputs_embeds``, ``attention_mask``, ``token_type_ids``; for an encoder-decoder also
    ``decoder_input_ids`` or ``decoder_inputs_embeds`` and ``decoder_attention_mask``.
    """
    w = {k: np.asarray(v, dtype) for k, v in weights.items()}
    lin = lambda x, p: x @ w[f"{p}.weight"].T + w.get(f"{p}.bias", 0)  # noqa: E731
    h, hkv, dh = spec.n_heads, spec.kv_heads, spec.d_head
    if spec.positional == "rope":
        cos, sin = (np.asarray(t, dtype) for t in spec.rotary_tables())

    def ln(x, p):
        scale = w[f"{p}.weight"] + np.asarray(spec.norm_scale_offset, dtype)
        if spec.norm == "rmsnorm":
            return rms_norm(x, scale, spec.norm_eps)
        return layer_norm(x, scale, w.get(f"{p}.bias"), spec.norm_eps)

    def embed(prefix: str, word: str, ids, embeds, token_types):
        if embeds is not None:
            x = np.asarray(embeds, dtype)
        else:
            x = w[word][ids]
            if spec.embed_scale:
                x = x * np.asarray(math.sqrt(spec.d_model), dtype)
        b, t, d = x.shape
        if spec.positional == "learned":
            x = x + w[f"{prefix}.position_embeddings.weight"][:t]
        elif spec.positional == "sinusoidal":
            x = x + sinusoidal_table(spec.max_len, d)[:t].astype(dtype)
        if spec.type_vocab_size:
            tt = np.zeros((b, t), np.int64) if token_types is None else token_types
            x = x + w[f"{prefix}.token_type_embeddings.weight"][tt]
        if spec.embedding_norm:
            x = ln(x, f"{prefix}.norm")
        return x

    def attn(x, kv, p, bias, rotary=False):
        b, tq, d = x.shape
        tk = kv.shape[1]
        split = lambda y, t, n: y.reshape(b, t, n, dh).transpose(0, 2, 1, 3)  # noqa: E731
        q = split(lin(x, f"{p}.q_proj"), tq, h)
        k, v = split(lin(kv, f"{p}.k_proj"), tk, hkv), split(lin(kv, f"{p}.v_proj"), tk, hkv)
        if rotary:  # self-attention: positions 0..T-1 on both sides
            q = rotate(q, cos[:tq], sin[:tq], spec.rope_style)
            k = rotate(k, cos[:tk], sin[:tk], spec.rope_style)
        k, v = np.repeat(k, h // hkv, axis=1), np.repeat(v, h // hkv, axis=1)
        scores = q @ k.transpose(0, 1, 3, 2) / np.asarray(math.sqrt(dh), dtype) + bias
        scores = scores - scores.max(-1, keepdims=True)
        probs = np.exp(scores)
        probs = probs / probs.sum(-1, keepdims=True)
        return lin((probs @ v).transpose(0, 2, 1, 3).reshape(b, tq, h * dh), f"{p}.out_proj")

    def sublayer(x, i, fn, p):
        """Residual + norm ``norm{i}`` around ``fn`` (post- or pre-LN)."""
        if spec.norm_position == "post":
            return ln(x + fn(x), f"{p}.norm{i}")
        return x + fn(ln(x, f"{p}.norm{i}"))

    def ffn(y, p):
        act = lambda z: activation(spec.activation, z)  # noqa: E731
        if spec.ffn == "glu":
            return lin(act(lin(y, f"{p}.ffn.gate_proj")) * lin(y, f"{p}.ffn.up_proj"),
                       f"{p}.ffn.down_proj")
        return lin(act(lin(y, f"{p}.ffn.linear1")), f"{p}.ffn.linear2")

    def stack(name, n, x, self_bias, memory=None, cross_bias=None):
        rotary = spec.positional == "rope"
        for i in range(n):
            p = f"{name}.layers.{i}"
            self_attn = lambda y: attn(y, y, f"{p}.self_attn", self_bias, rotary)  # noqa: E731
            if spec.parallel_residual:
                x = x + self_attn(ln(x, f"{p}.norm1")) + ffn(ln(x, f"{p}.norm2"), p)
                continue
            x = sublayer(x, 1, self_attn, p)
            if memory is not None:
                x = sublayer(x, 2, lambda y: attn(y, memory, f"{p}.cross_attn", cross_bias), p)
            x = sublayer(x, 3 if memory is not None else 2, lambda y: ffn(y, p), p)
        return ln(x, f"{name}.final_norm") if spec.final_norm else x

    def mask_of(key: str, like) -> np.ndarray:
        m = inputs.get(key)
        return np.ones(like.shape[:2]) if m is None else np.asarray(m)

    arch = spec.architecture
    x = embed("embeddings", spec.word_embedding_name("encoder"), inputs.get("input_ids"),
              inputs.get("inputs_embeds"), inputs.get("token_type_ids"))
    pad = mask_of("attention_mask", x)[:, None, None, :]  # (B, 1, 1, S)
    out: dict[str, np.ndarray] = {}
    if arch == "encoder":
        x = stack("encoder", spec.n_layers, x, attention_bias(pad, dtype))
        out["last_hidden_state"] = x
        if spec.head == "pooler":
            out["pooler_output"] = np.tanh(lin(x[:, 0], "pooler.dense"))
    elif arch == "decoder":
        t = x.shape[1]
        x = stack("decoder", spec.n_layers, x, attention_bias(pad * causal_allowed(t, t), dtype))
        out["last_hidden_state"] = x
    else:
        memory = stack("encoder", spec.n_layers, x, attention_bias(pad, dtype))
        y = embed("decoder_embeddings", spec.word_embedding_name("decoder"),
                  inputs.get("decoder_input_ids"), inputs.get("decoder_inputs_embeds"), None)
        t = y.shape[1]
        dpad = mask_of("decoder_attention_mask", y)[:, None, None, :]
        y = stack("decoder", spec.decoder_layers, y,
                  attention_bias(dpad * causal_allowed(t, t), dtype), memory,
                  attention_bias(pad, dtype))
        out["last_hidden_state"] = y
        out["encoder_last_hidden_state"] = memory
    if spec.head == "lm":
        out["logits"] = out["last_hidden_state"] @ w[spec.lm_head_name()].T
    return {k: out[k].astype(dtype) for k in spec.output_names()}
