"""The xformer encoder as native PyTorch modules (``torch.nn``).

Twin of ``xformer_tensorflow/modules.py`` (Keras 3) and ``xformer_mxnet/modules.py`` (Gluon): the
same classes, in the same order, computing the same thing (the executable statement is
:func:`xformer.reference.forward`, the contract DESIGN.md §3)::

    Embeddings -> Encoder( EncoderLayer( MultiHeadAttention, FeedForward ) x n_layers ) -> Pooler
    \\______________________________ EncoderModel ______________________________________/

Module paths mirror the canonical parameter names of :meth:`xformer.ModelSpec.parameters`, so
``EncoderModel(spec).state_dict().keys()`` *are* the canonical names (Linear weights
``(out_features, in_features)``, LayerNorm ``weight``/``bias``) and loading a canonical checkpoint
is ``load_state_dict``.

Numerics (DESIGN.md §3, §5):

* every sub-module gets ``dtype`` (``torch.float32`` or ``torch.float64``) explicitly, and every
  constant (sinusoidal table, mask bias) is made in that dtype;
* LayerNorm is ``nn.LayerNorm(eps=spec.norm_eps, bias=spec.bias)``, never torch's default 1e-5;
* GELU is composed from ``erf`` / ``tanh`` (:func:`gelu`, :func:`gelu_tanh`), as in the other two
  backends, instead of ``F.gelu``;
* padding adds ``finfo(dtype).min`` (finite) to the attention logits, never ``-inf``: a fully
  padded row attends uniformly and nothing is NaN.

Attention is written out (``softmax(Q K^T / sqrt(d_head) + bias) V``, Hugging Face
``BertSelfAttention``'s eager path) rather than calling ``F.scaled_dot_product_attention``: on
CPU (torch 2.13) the fused SDPA kernel returns wrong gradients for a fully padded row when the
mask is the finite ``finfo.min`` (its log-sum-exp absorbs ``log(T)``, so every padded query's
weights come back as 1 instead of ``1/T`` in the backward pass), while its forward is right.

Example::

    >>> import torch
    >>> from xformer import ModelSpec
    >>> from xformer_torch.modules import EncoderModel
    >>> spec = ModelSpec.preset("tiny")
    >>> model = EncoderModel(spec, dtype=torch.float64).eval()
    >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]))
    >>> out["last_hidden_state"].shape, out["pooler_output"].dtype
    (torch.Size([1, 3, 64]), torch.float64)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xformer.errors import InputError
from xformer.spec import ModelSpec, sinusoidal_table

__all__ = [
    "gelu", "gelu_tanh", "ACTIVATIONS", "Embeddings", "MultiHeadAttention", "FeedForward",
    "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
]


# ---------------------------------------------------------------------- activations
def gelu(x: Tensor) -> Tensor:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))`` (Hendrycks & Gimpel 2016, eq. 1), in ``x``'s
    dtype. Composed from ``torch.erf`` so the three backends share one formula."""
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016
    §2; GPT-2's ``gelu_new``), in ``x``'s dtype."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


#: ``spec.activation`` -> function.
ACTIVATIONS = {"relu": F.relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def _layer_norm(spec: ModelSpec, dtype: torch.dtype, device) -> nn.LayerNorm:
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps, bias=spec.bias, dtype=dtype,
                        device=device)


# ---------------------------------------------------------------------- blocks
class Embeddings(nn.Module):
    """Token + position (+ segment) embeddings, then LayerNorm if ``spec.embedding_norm``.

    ``x = word_embeddings[input_ids] * s + positions[:T] + token_type_embeddings[token_type_ids]``
    with ``s = sqrt(d_model)`` if ``spec.embed_scale`` (Vaswani 2017 §3.4) else 1; positions are
    the learned table ``position_embeddings`` (BERT, Devlin 2019 §3.2) or the fixed table of
    Vaswani 2017 §3.5 (:func:`xformer.spec.sinusoidal_table`, a non-persistent buffer, not a
    parameter).

    Args:
        spec: the model; uses ``vocab_size, d_model, max_len, positional, type_vocab_size,
            embedding_norm, embed_scale, norm_eps, bias``.
        dtype: parameter and compute dtype, ``torch.float32`` or ``torch.float64``.
        device: where to create the parameters.

    Shapes: ``input_ids`` / ``token_type_ids`` ``(B, T)`` int64, or ``inputs_embeds``
    ``(B, T, D)`` (already scaled); returns ``(B, T, D)`` in ``dtype``.

    Raises:
        InputError: ``T > spec.max_len``; ``token_type_ids`` without segment embeddings.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device}
        self.max_len = spec.max_len
        self.scale = math.sqrt(spec.d_model) if spec.embed_scale else None
        self.word_embeddings = nn.Embedding(spec.vocab_size, spec.d_model, **factory)
        if spec.positional == "learned":
            self.position_embeddings = nn.Embedding(spec.max_len, spec.d_model, **factory)
        else:
            self.position_embeddings = None
            table = torch.as_tensor(sinusoidal_table(spec.max_len, spec.d_model), **factory)
            self.register_buffer("position_table", table, persistent=False)
        self.token_type_embeddings = (
            nn.Embedding(spec.type_vocab_size, spec.d_model, **factory)
            if spec.type_vocab_size else None)
        self.norm = _layer_norm(spec, dtype, device) if spec.embedding_norm else None

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``word_embeddings[input_ids]`` times ``sqrt(d_model)`` if ``embed_scale``: what
        ``inputs_embeds`` stands for. ``(B, T)`` int64 -> ``(B, T, D)``."""
        x = self.word_embeddings(input_ids)
        return x * self.scale if self.scale is not None else x

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        t = inputs_embeds.shape[1]
        if t > self.max_len:
            raise InputError(f"sequence length {t} is longer than max_len={self.max_len}; "
                             f"shorten the input (xformer does not truncate silently)")
        positions = (self.position_embeddings.weight if self.position_embeddings is not None
                     else self.position_table)
        x = inputs_embeds + positions[:t]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                             device=inputs_embeds.device)
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        return self.norm(x) if self.norm is not None else x


class MultiHeadAttention(nn.Module):
    """Multi-head self-attention (Vaswani 2017 §3.2.2), scaled as Hugging Face
    ``BertSelfAttention``: ``softmax(Q K^T / sqrt(d_head) + attention_bias) V``, heads split as
    ``(B, T, H, d_head)``, then ``out_proj``.

    Args:
        spec: uses ``d_model, n_heads, bias, dropout``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``; ``attention_bias`` additive, broadcastable to ``(B, H, T, T)``
    (``(B, 1, 1, T)`` from :meth:`EncoderModel.attention_bias`) or ``None``; returns ``(B, T, D)``.
    Dropout (``spec.dropout``) acts on the attention probabilities in training mode only.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device, "bias": spec.bias}
        d = spec.d_model
        self.n_heads, self.d_head = spec.n_heads, spec.d_head
        self.q_proj = nn.Linear(d, d, **factory)
        self.k_proj = nn.Linear(d, d, **factory)
        self.v_proj = nn.Linear(d, d, **factory)
        self.out_proj = nn.Linear(d, d, **factory)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        b, t, d = x.shape

        def split(y: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, d_head)
            return y.view(b, t, self.n_heads, self.d_head).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if attention_bias is not None:
            scores = scores + attention_bias
        probs = self.dropout(scores.softmax(dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(b, t, d)
        return self.out_proj(context)


class FeedForward(nn.Module):
    """Position-wise feed-forward network (Vaswani 2017 §3.3):
    ``linear2(dropout(act(linear1(x))))``, ``act`` from ``spec.activation``.

    Args:
        spec: uses ``d_model, d_ff, activation, bias, dropout``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``(B, T, D)`` -> ``(B, T, D)`` (inner ``(B, T, d_ff)``).
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        factory = {"dtype": dtype, "device": device, "bias": spec.bias}
        self.linear1 = nn.Linear(spec.d_model, spec.d_ff, **factory)
        self.activation = ACTIVATIONS[spec.activation]
        self.dropout = nn.Dropout(spec.dropout)
        self.linear2 = nn.Linear(spec.d_ff, spec.d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(nn.Module):
    """One encoder layer: self-attention and feed-forward sub-layers, each with a residual
    connection and a LayerNorm (``norm1`` for attention, ``norm2`` for the FFN).

    * ``post`` (Vaswani 2017 §3.1, BERT): ``x = norm1(x + attn(x)); x = norm2(x + ffn(x))``
    * ``pre`` (GPT-2; Xiong et al. 2020): ``x = x + attn(norm1(x)); x = x + ffn(norm2(x))``

    Residual branches go through dropout (Vaswani 2017 §5.4) in training mode only.

    Args:
        spec: uses ``norm_position, norm_eps, bias, dropout`` and those of the sub-layers.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``, ``attention_bias`` as :class:`MultiHeadAttention`; returns
    ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.norm_first = spec.norm_position == "pre"
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, device=device)
        self.norm1 = _layer_norm(spec, dtype, device)
        self.ffn = FeedForward(spec, dtype=dtype, device=device)
        self.norm2 = _layer_norm(spec, dtype, device)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        if self.norm_first:
            x = x + self.dropout(self.self_attn(self.norm1(x), attention_bias))
            return x + self.dropout(self.ffn(self.norm2(x)))
        x = self.norm1(x + self.dropout(self.self_attn(x, attention_bias)))
        return self.norm2(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """``n_layers`` :class:`EncoderLayer` s (``layers.{i}``), then ``final_norm`` if
    ``spec.final_norm`` (pre-LN models: GPT-2, Xiong et al. 2020).

    Shapes: ``(B, T, D)`` -> ``(B, T, D)``; ``attention_bias`` as :class:`MultiHeadAttention`.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(spec, dtype=dtype, device=device) for _ in range(spec.n_layers))
        self.final_norm = _layer_norm(spec, dtype, device) if spec.final_norm else None

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attention_bias)
        return self.final_norm(x) if self.final_norm is not None else x


class Pooler(nn.Module):
    """BERT's pooler (Devlin 2019 §3; Hugging Face ``BertPooler``): ``tanh(dense(x[:, 0]))``.

    Shapes: ``(B, T, D)`` -> ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        self.dense = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias, dtype=dtype,
                               device=device)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class EncoderModel(nn.Module):
    """The whole encoder (BERT-like): :class:`Embeddings` -> :class:`Encoder` ->
    (:class:`Pooler`), called with Hugging Face's argument names.

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``, in that order.

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="encoder"``); kept as ``.spec``.
        dtype: ``torch.float32`` or ``torch.float64`` for every parameter, buffer and activation
            (``.dtype`` reports it).
        device: where to create the parameters.

    Call with:
        input_ids: ``(B, T)`` int64 token ids in ``[0, vocab_size)``, or
        inputs_embeds: ``(B, T, D)`` token embeddings already multiplied by the embedding
            scale, instead of ``input_ids``.
        attention_mask: ``(B, T)``, 1 = attend, 0 = padding; default all ones.
        token_type_ids: ``(B, T)`` int64 segment ids; default zeros (only with
            ``type_vocab_size > 0``).

    Returns:
        ``{"last_hidden_state": (B, T, D)}`` plus ``"pooler_output": (B, D)`` with
        ``head="pooler"``, in ``dtype``.

    Raises:
        InputError: neither or both of ``input_ids`` / ``inputs_embeds``; ``T > max_len``;
            ``token_type_ids`` with ``type_vocab_size = 0``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if dtype not in (torch.float32, torch.float64):
            raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.spec = spec
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.encoder = Encoder(spec, dtype=dtype, device=device)
        self.pooler = Pooler(spec, dtype=dtype, device=device) if spec.head == "pooler" else None

    @property
    def dtype(self) -> torch.dtype:
        """The parameter and compute dtype."""
        return self.embeddings.word_embeddings.weight.dtype

    def attention_bias(self, attention_mask: Tensor) -> Tensor:
        """``(1 - mask) * finfo(dtype).min`` as ``(B, 1, 1, T)``, made in the model dtype:
        the additive key-padding bias of DESIGN.md §3 (finite, so no NaN on empty rows)."""
        mask = attention_mask.to(self.dtype)
        return ((1.0 - mask) * torch.finfo(self.dtype).min)[:, None, None, :]

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
                ) -> dict[str, Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        x = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        bias = self.attention_bias(attention_mask) if attention_mask is not None else None
        x = self.encoder(x, bias)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = self.pooler(x)
        return out
