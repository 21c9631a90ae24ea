"""The xformer Transformers (encoder, decoder, encoder-decoder) as native PyTorch modules
(``torch.nn``).

One of three twins with ``xformer_tensorflow/modules.py`` (Keras 3) and
``xformer_mxnet/modules.py`` (Gluon): the same classes in the same order, the same constructor
and call parameters (``tests/test_twins.py`` checks both), computing
:func:`xformer.reference.forward` (docs/design.md §3)::

    Embeddings -> Encoder( EncoderLayer( MultiHeadAttention, FeedForward ) x n_layers ) -> Pooler
    \\______________________________ EncoderModel ______________________________________/

    Embeddings -> Decoder( DecoderLayer( causal MultiHeadAttention, FeedForward ) x n ) -> LMHead
    \\______________________________ DecoderModel ______________________________________/

    Embeddings -> Encoder ----------------------------------.  (encoder_hidden_states)
    decoder_embeddings -> Decoder( DecoderLayer( causal self-attention, cross-attention,
                                                 FeedForward ) x n_decoder_layers ) -> LMHead
    \\____________________________ EncoderDecoderModel _________________________________/

The inner blocks take the additive mask as ``attention_bias`` (``(B, 1, T_q, T_k)``
broadcastable, padding and causality already combined, finite), cross-attention inputs as
``encoder_hidden_states`` / ``encoder_attention_bias``, a layer's cache as ``past_key_value``
and a stack's as ``past_key_values``; the three top-level models build the biases from Hugging
Face's 0/1 ``attention_mask``.

Module paths mirror the canonical parameter names of :meth:`xformer.ModelSpec.parameters`, so
``EncoderModel(spec).state_dict().keys()`` *are* the canonical names (Linear weights
``(out_features, in_features)``, LayerNorm ``weight``/``bias``) and loading a canonical checkpoint
is ``load_state_dict``.

PyTorch specifics (docs/design.md §3, §5):

* every sub-module gets ``dtype`` (``torch.float32`` or ``torch.float64``) explicitly, and every
  constant (sinusoidal table, mask bias) is made in that dtype;
* LayerNorm is ``nn.LayerNorm(eps=spec.norm_eps, bias=spec.bias)``, never torch's default 1e-5;
* GELU is composed from ``torch.erf`` / ``torch.tanh`` (:func:`gelu`, :func:`gelu_tanh`) instead
  of ``F.gelu``;
* attention is written out (``softmax(Q K^T / sqrt(d_head) + bias) V``, Hugging Face
  ``BertSelfAttention``'s eager path) rather than calling ``F.scaled_dot_product_attention``: on
  CPU (torch 2.13) the fused SDPA kernel returns wrong gradients for a fully padded row when the
  mask is the finite ``finfo.min`` (its log-sum-exp absorbs ``log(T)``, so every padded query's
  weights come back as 1 instead of ``1/T`` in the backward pass), while its forward is right.

Incremental decoding uses Hugging Face's legacy cache format: per decoder layer a tuple
``(k, v)`` of ``(B, H, T_past, d_head)`` tensors, plus ``(cross_k, cross_v)`` ``(B, H, S, d_head)``
for an encoder-decoder.

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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xformer.errors import InputError
from xformer.spec import ModelSpec, sinusoidal_table

__all__ = [
    "gelu", "gelu_tanh", "relu", "ACTIVATIONS", "Embeddings", "MultiHeadAttention",
    "FeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel", "DecoderLayer", "Decoder",
    "LMHead", "DecoderModel", "EncoderDecoderModel", "causal_allowed", "allowed_bias",
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


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` (``F.relu``)."""
    return F.relu(x)


#: ``spec.activation`` -> function.
ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


# ---------------------------------------------------------------------- helpers
def _check_dtype(dtype: torch.dtype) -> None:
    """Raise ``InputError`` unless ``dtype`` is ``torch.float32`` or ``torch.float64``."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _layer_norm(spec: ModelSpec, dtype: torch.dtype, device) -> nn.LayerNorm:
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps, bias=spec.bias, dtype=dtype,
                        device=device)


def _residual(x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.LayerNorm,
              dropout: nn.Dropout, norm_first: bool) -> Tensor:
    """One residual sub-layer of an encoder or decoder layer: ``x + dropout(sublayer(norm(x)))``
    when ``norm_first`` (pre-LN: GPT-2, Xiong et al. 2020), else ``norm(x + dropout(
    sublayer(x)))`` (post-LN: Vaswani 2017 §3.1, BERT)."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def causal_allowed(t_q: int, t_k: int, device: torch.device | str | None = None) -> Tensor:
    """``(t_q, t_k)`` 0/1 int64: query ``i`` (absolute position ``t_k - t_q + i``: the cached
    positions come first) may attend to key ``j`` iff ``j <= t_k - t_q + i``."""
    keys = torch.arange(t_k, device=device)[None, :]
    return (keys <= (t_k - t_q) + torch.arange(t_q, device=device)[:, None]).long()


def allowed_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``(1 - allowed) * finfo(dtype).min`` in ``dtype``: ONE additive bias from a 0/1 mask that
    is already the product of padding and causality (docs/design.md §3; two ``finfo.min`` biases
    would add up to ``-inf``). Finite, so a fully padded row attends uniformly, never NaN."""
    return (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min


class _SpecLayer(nn.Module):
    """A block configured by a :class:`~xformer.ModelSpec` (kept as ``.spec``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec


# ---------------------------------------------------------------------- blocks
class Embeddings(_SpecLayer):
    """Token + position (+ segment) embeddings, then LayerNorm if ``spec.embedding_norm``.

    ``x = word_embeddings[input_ids] * s + positions[:T] + token_type_embeddings[token_type_ids]``
    with ``s = sqrt(d_model)`` if ``spec.embed_scale`` (Vaswani 2017 §3.4) else 1; positions are
    the learned table ``position_embeddings`` (BERT, Devlin 2019 §3.2) or the fixed table of
    Vaswani 2017 §3.5 (:func:`xformer.spec.sinusoidal_table`, a non-persistent buffer, not a
    parameter).

    Args:
        spec: the model; uses ``vocab_size, d_model, max_len, positional, type_vocab_size,
            embedding_norm, embed_scale, norm_eps, bias``.
        word_embeddings: whether to own a token table; ``False`` for the target side of an
            encoder-decoder with ``share_embeddings``, which looks up the source side's table
            (passed to :meth:`embed_tokens` as ``weight``).
        dtype: parameter and compute dtype, ``torch.float32`` or ``torch.float64``.
        device: where to create the parameters.

    Shapes: ``input_ids`` / ``token_type_ids`` ``(B, T)`` int64, or ``inputs_embeds``
    ``(B, T, D)`` (already scaled); returns ``(B, T, D)`` in ``dtype``. With ``past_length``
    (cached decoding) the positions are ``past_length .. past_length + T - 1``.

    Raises:
        InputError: ``past_length + T > spec.max_len``; ``token_type_ids`` without segment
            embeddings.
    """

    def __init__(self, spec: ModelSpec, *, word_embeddings: bool = True,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device}
        self.max_len = spec.max_len
        self.scale = math.sqrt(spec.d_model) if spec.embed_scale else None
        self.word_embeddings = (nn.Embedding(spec.vocab_size, spec.d_model, **factory)
                                if word_embeddings else None)
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

    def embed_tokens(self, input_ids: Tensor, weight: Tensor | None = None) -> Tensor:
        """``word_embeddings[input_ids]`` times ``sqrt(d_model)`` if ``embed_scale``: what
        ``inputs_embeds`` stands for. ``(B, T)`` int64 -> ``(B, T, D)``. ``weight``: a shared
        table to look up instead of this module's own (``share_embeddings``)."""
        x = F.embedding(input_ids, self.word_embeddings.weight if weight is None else weight)
        return x * self.scale if self.scale is not None else x

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_length: int = 0) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        t = inputs_embeds.shape[1]
        if past_length + t > self.max_len:
            what = f"sequence length {t}" if not past_length else (
                f"{past_length} cached + {t} new positions")
            raise InputError(f"{what} is longer than max_len={self.max_len}; "
                             f"shorten the input (xformer does not truncate silently)")
        positions = (self.position_embeddings.weight if self.position_embeddings is not None
                     else self.position_table)
        x = inputs_embeds + positions[past_length:past_length + t]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                             device=inputs_embeds.device)
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        return self.norm(x) if self.norm is not None else x


class MultiHeadAttention(_SpecLayer):
    """Multi-head attention (Vaswani 2017 §3.2.2), scaled as Hugging Face
    ``BertSelfAttention``: ``softmax(Q K^T / sqrt(d_head) + attention_bias) V``, heads split as
    ``(B, T, H, d_head)``, then ``out_proj``. Self-attention by default; cross-attention
    (queries from ``x``, keys and values from ``key_value_states``) when built with
    ``cross_attention=True``.

    Args:
        spec: uses ``d_model, n_heads, bias, dropout``.
        cross_attention: the cached keys/values (``past_key_value``) are the projected encoder
            output, reused as they are; self-attention appends the new keys/values to them.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``; ``key_value_states`` ``(B, S, D)`` (cross-attention; default
    ``x``); ``attention_bias`` additive, broadcastable to ``(B, H, T, S_total)`` (``(B, 1, 1, S)``
    from :meth:`EncoderModel.key_padding_bias`, ``(B, 1, T, past + T)`` causal) or ``None``;
    ``past_key_value`` ``(k, v)`` each ``(B, H, S_past, d_head)`` or ``None``. Returns
    ``(B, T, D)``, or ``((B, T, D), (k, v))`` with ``use_cache`` (the keys/values to cache).
    Dropout (``spec.dropout``) acts on the attention probabilities in training mode only.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device, "bias": spec.bias}
        d = spec.d_model
        self.cross_attention = cross_attention
        self.n_heads, self.d_head = spec.n_heads, spec.d_head
        self.q_proj = nn.Linear(d, d, **factory)
        self.k_proj = nn.Linear(d, d, **factory)
        self.v_proj = nn.Linear(d, d, **factory)
        self.out_proj = nn.Linear(d, d, **factory)
        self.dropout = nn.Dropout(spec.dropout)

    def _split_heads(self, y: Tensor) -> Tensor:  # (B, S, D) -> (B, H, S, d_head)
        return y.view(y.shape[0], y.shape[1], self.n_heads, self.d_head).transpose(1, 2)

    def _keys_values(self, x: Tensor, key_value_states: Tensor | None,
                     past_key_value: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        if self.cross_attention and past_key_value is not None:  # the encoder's, projected once
            return past_key_value
        source = x if key_value_states is None else key_value_states
        kv = (self._split_heads(self.k_proj(source)), self._split_heads(self.v_proj(source)))
        if past_key_value is None:
            return kv
        # self-attention: the new positions go after the cached ones
        return tuple(torch.cat((cached, new), dim=2) for cached, new in zip(past_key_value, kv))

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                key_value_states: Tensor | None = None,
                past_key_value: tuple[Tensor, Tensor] | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, d = x.shape
        q = self._split_heads(self.q_proj(x))
        k, v = self._keys_values(x, key_value_states, past_key_value)
        scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)
        if attention_bias is not None:
            scores = scores + attention_bias
        probs = self.dropout(scores.softmax(dim=-1))
        context = (probs @ v).transpose(1, 2).reshape(b, t, d)
        out = self.out_proj(context)
        return (out, (k, v)) if use_cache else out


class FeedForward(_SpecLayer):
    """Position-wise feed-forward network (Vaswani 2017 §3.3):
    ``linear2(dropout(act(linear1(x))))``, ``act`` from ``spec.activation``.

    Args:
        spec: uses ``d_model, d_ff, activation, bias, dropout``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``(B, T, D)`` -> ``(B, T, D)`` (inner ``(B, T, d_ff)``).
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device, "bias": spec.bias}
        self.linear1 = nn.Linear(spec.d_model, spec.d_ff, **factory)
        self.activation = ACTIVATIONS[spec.activation]
        self.dropout = nn.Dropout(spec.dropout)
        self.linear2 = nn.Linear(spec.d_ff, spec.d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))


class EncoderLayer(_SpecLayer):
    """One encoder layer: self-attention (``self_attn``, ``norm1``) and feed-forward (``ffn``,
    ``norm2``) sub-layers, each through :func:`_residual` (post- or pre-LN per
    ``spec.norm_position``; residual branches go through dropout in training mode only).

    Args:
        spec: uses ``norm_position, norm_eps, bias, dropout`` and those of the sub-layers.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``, ``attention_bias`` as :class:`MultiHeadAttention`; returns
    ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.norm_first = spec.norm_position == "pre"
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, device=device)
        self.norm1 = _layer_norm(spec, dtype, device)
        self.ffn = FeedForward(spec, dtype=dtype, device=device)
        self.norm2 = _layer_norm(spec, dtype, device)
        self.dropout1 = nn.Dropout(spec.dropout)
        self.dropout2 = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        x = _residual(x, lambda y: self.self_attn(y, attention_bias), self.norm1,
                      self.dropout1, self.norm_first)
        return _residual(x, self.ffn, self.norm2, self.dropout2, self.norm_first)


class Encoder(_SpecLayer):
    """``n_layers`` :class:`EncoderLayer` s (``layers.{i}``), then ``final_norm`` if
    ``spec.final_norm`` (pre-LN models: GPT-2, Xiong et al. 2020).

    Shapes: ``(B, T, D)`` -> ``(B, T, D)``; ``attention_bias`` as :class:`MultiHeadAttention`.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.layers = nn.ModuleList(
            EncoderLayer(spec, dtype=dtype, device=device) for _ in range(spec.n_layers))
        self.final_norm = _layer_norm(spec, dtype, device) if spec.final_norm else None

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attention_bias)
        return self.final_norm(x) if self.final_norm is not None else x


class Pooler(_SpecLayer):
    """BERT's pooler (Devlin 2019 §3; Hugging Face ``BertPooler``): ``tanh(dense(x[:, 0]))``.

    Shapes: ``(B, T, D)`` -> ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.dense = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias, dtype=dtype,
                               device=device)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class _SpecModel(nn.Module):
    """What the three top-level models share: ``.spec``, the dtype check, ``.dtype`` and the
    key-padding bias."""

    embeddings: Embeddings

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        _check_dtype(dtype)
        self.spec = spec

    @property
    def dtype(self) -> torch.dtype:
        """The parameter and compute dtype."""
        return self.embeddings.word_embeddings.weight.dtype

    def key_padding_bias(self, attention_mask: Tensor | None) -> Tensor | None:
        """``(B, 1, 1, S)`` additive key-padding bias of a ``(B, S)`` 0/1 ``attention_mask``
        (encoder self-attention, cross-attention), in the model dtype; ``None`` for ``None``."""
        if attention_mask is None:
            return None
        return allowed_bias(attention_mask[:, None, None, :], self.dtype)


class EncoderModel(_SpecModel):
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
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.encoder = Encoder(spec, dtype=dtype, device=device)
        self.pooler = Pooler(spec, dtype=dtype, device=device) if spec.head == "pooler" else None

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
                ) -> dict[str, Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids, inputs_embeds),
                              self.key_padding_bias(attention_mask))
        if self.pooler is None:
            return {"last_hidden_state": hidden}
        return {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden)}


# ---------------------------------------------------------------------- decoders
class DecoderLayer(_SpecLayer):
    """One decoder layer: causal self-attention (``self_attn``, ``norm1``), cross-attention over
    the encoder output (``cross_attn``, ``norm2``; encoder-decoders only) and the feed-forward
    network (``ffn``, ``norm2``, or ``norm3`` after cross-attention), each sub-layer through
    :func:`_residual` as in :class:`EncoderLayer` (``nn.TransformerDecoderLayer``'s order and
    names, Vaswani 2017 §3.1).

    Args:
        spec: as :class:`EncoderLayer`.
        cross_attention: with a cross-attention sub-layer (the decoder of an encoder-decoder).
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``; ``attention_bias`` ``(B or 1, 1, T, past + T)`` (causal and
    padding, :func:`allowed_bias`); ``encoder_hidden_states`` ``(B, S, D)`` and
    ``encoder_attention_bias`` ``(B, 1, 1, S)`` (cross-attention); ``past_key_value``
    ``(k, v)`` or ``(k, v, cross_k, cross_v)``. Returns ``(B, T, D)``, or
    ``((B, T, D), present_key_value)`` with ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.norm_first = spec.norm_position == "pre"
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, device=device)
        self.norm1 = _layer_norm(spec, dtype, device)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(spec, cross_attention=True, dtype=dtype,
                                                 device=device)
            self.norm2 = _layer_norm(spec, dtype, device)
        else:
            self.cross_attn = None
        self.ffn = FeedForward(spec, dtype=dtype, device=device)
        # the FFN's norm: norm3 after cross-attention, else norm2 (GPT-2's ln_2)
        setattr(self, "norm3" if cross_attention else "norm2", _layer_norm(spec, dtype, device))
        self.dropout1 = nn.Dropout(spec.dropout)
        self.dropout2 = nn.Dropout(spec.dropout)
        self.dropout3 = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None,
                encoder_attention_bias: Tensor | None = None,
                past_key_value: tuple | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple]:
        past = past_key_value or ()
        present: list[Tensor] = []

        def attend(attn: MultiHeadAttention, bias, states, cached):
            def sublayer(y: Tensor) -> Tensor:
                y, kv = attn(y, bias, states, cached or None, use_cache=True)
                present.extend(kv)
                return y
            return sublayer

        x = _residual(x, attend(self.self_attn, attention_bias, None, past[:2]), self.norm1,
                      self.dropout1, self.norm_first)
        ffn_norm, ffn_dropout = self.norm2, self.dropout2
        if self.cross_attn is not None:
            x = _residual(x, attend(self.cross_attn, encoder_attention_bias,
                                    encoder_hidden_states, past[2:]),
                          self.norm2, self.dropout2, self.norm_first)
            ffn_norm, ffn_dropout = self.norm3, self.dropout3
        x = _residual(x, self.ffn, ffn_norm, ffn_dropout, self.norm_first)
        return (x, tuple(present)) if use_cache else x


class Decoder(_SpecLayer):
    """``spec.decoder_layers`` :class:`DecoderLayer` s (``layers.{i}``), then ``final_norm`` if
    ``spec.final_norm``.

    Shapes: as :class:`DecoderLayer`; ``past_key_values`` one entry per layer. Returns
    ``(B, T, D)``, or ``((B, T, D), past_key_values)`` with ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, cross_attention=cross_attention, dtype=dtype, device=device)
            for _ in range(spec.decoder_layers))
        self.final_norm = _layer_norm(spec, dtype, device) if spec.final_norm else None

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None,
                encoder_attention_bias: Tensor | None = None,
                past_key_values: tuple | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple]:
        presents = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present = layer(x, attention_bias, encoder_hidden_states, encoder_attention_bias,
                               past, use_cache=True)
            presents.append(present)
        x = self.final_norm(x) if self.final_norm is not None else x
        return (x, tuple(presents)) if use_cache else x


class LMHead(_SpecLayer):
    """Language-model head (GPT-2's ``lm_head``): ``logits = x W^T``, no bias, no scale.

    Args:
        spec: uses ``vocab_size, d_model``.
        tied: hold no parameter: the caller passes the (target-side) token table as
            ``tied_weight`` (``tie_embeddings``), so the tied table is one parameter with one
            ``state_dict`` key.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``(B, T, D)`` -> ``(B, T, vocab_size)``.
    """

    def __init__(self, spec: ModelSpec, *, tied: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.weight = (None if tied else
                       nn.Parameter(torch.empty(spec.vocab_size, spec.d_model, dtype=dtype,
                                                device=device)))
        if self.weight is not None:
            nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor, tied_weight: Tensor | None = None) -> Tensor:
        return F.linear(x, self.weight if tied_weight is None else tied_weight)


class _CausalModel(_SpecModel):
    """What :class:`DecoderModel` and :class:`EncoderDecoderModel` share: the causal
    self-attention bias and the LM head over the target side's token table."""

    lm_head: LMHead | None

    def self_attention_bias(self, attention_mask: Tensor | None, t: int, past_length: int = 0,
                            device=None) -> Tensor:
        """Causal self-attention bias ``(B or 1, 1, T, past + T)``: padding (``attention_mask``
        ``(B, past + T)``, 1 = attend) times causality, then one :func:`allowed_bias`."""
        allowed = causal_allowed(t, past_length + t, device)[None, None]
        if attention_mask is not None:
            allowed = attention_mask.to(self.dtype)[:, None, None, :] * allowed
        return allowed_bias(allowed, self.dtype)

    def target_word_embeddings(self) -> Tensor:
        """The ``(vocab_size, D)`` token table of the target side: what target tokens look up
        and what a tied LM head multiplies by."""
        return self.embeddings.word_embeddings.weight

    def _outputs(self, hidden: Tensor, presents: tuple, use_cache: bool,
                 **extra: Tensor) -> dict[str, Tensor]:
        """The output dict: ``last_hidden_state``, ``extra``, ``logits`` (LM head), and
        ``past_key_values`` with ``use_cache``."""
        out = {"last_hidden_state": hidden, **extra}
        if self.lm_head is not None:
            tied = self.target_word_embeddings() if self.spec.tie_embeddings else None
            out["logits"] = self.lm_head(hidden, tied)
        if use_cache:
            out["past_key_values"] = presents
        return out


class DecoderModel(_CausalModel):
    """The whole decoder (GPT-like): :class:`Embeddings` -> :class:`Decoder` (causal
    self-attention) -> (:class:`LMHead`), called with Hugging Face's argument names.

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``, in that order (a tied LM
    head adds no key: it multiplies by ``embeddings.word_embeddings.weight``).

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="decoder"``); kept as ``.spec``.
        dtype, device: as :class:`EncoderModel`.

    Call with:
        input_ids: ``(B, T)`` int64, or inputs_embeds: ``(B, T, D)`` (already scaled).
        attention_mask: ``(B, past + T)``, 1 = attend, 0 = padding; default all ones.
        past_key_values: the ``"past_key_values"`` of the previous call (cached decoding):
            per layer ``(k, v)`` ``(B, H, past, d_head)``; positions then start at ``past``.
        use_cache: also return ``"past_key_values"`` (now ``past + T`` long).

    Returns:
        ``{"last_hidden_state": (B, T, D)}``, ``"logits": (B, T, vocab_size)`` with
        ``head="lm"``, ``"past_key_values"`` with ``use_cache``.

    Raises:
        InputError: neither or both of ``input_ids`` / ``inputs_embeds``; ``past + T > max_len``.

    Example::

        >>> spec = ModelSpec.preset("gpt2-tiny")
        >>> model = DecoderModel(spec, dtype=torch.float64).eval()
        >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        >>> step = model(input_ids=torch.tensor([[4]]), past_key_values=out["past_key_values"])
        >>> step["logits"].shape
        torch.Size([1, 1, 1000])
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.decoder = Decoder(spec, dtype=dtype, device=device)
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, device=device)
                        if spec.head == "lm" else None)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``inputs_embeds`` for ``input_ids`` (the scaled token embeddings)."""
        return self.embeddings.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: tuple | None = None,
                use_cache: bool = False) -> dict[str, Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        x = self.embeddings(input_ids, None, inputs_embeds, past_length=past)
        bias = self.self_attention_bias(attention_mask, x.shape[1], past, x.device)
        x, presents = self.decoder(x, bias, past_key_values=past_key_values, use_cache=True)
        return self._outputs(x, presents, use_cache)


class EncoderDecoderModel(_CausalModel):
    """The encoder-decoder (Vaswani 2017): source :class:`Embeddings` (``embeddings``) ->
    :class:`Encoder`; target :class:`Embeddings` (``decoder_embeddings``) -> :class:`Decoder`
    (causal self-attention, cross-attention over the encoder output) -> (:class:`LMHead`).

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``: with
    ``share_embeddings`` the target side looks up ``embeddings.word_embeddings.weight`` (and
    ``decoder_embeddings`` has no token table); a tied LM head multiplies by the target side's
    table and adds no key.

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="encoder-decoder"``).
        dtype, device: as :class:`EncoderModel`.

    Call with:
        input_ids / inputs_embeds, attention_mask: the source, as :class:`EncoderModel`.
        decoder_input_ids / decoder_inputs_embeds, decoder_attention_mask: the target, as
            :class:`DecoderModel` (mask ``(B, past + T)``).
        encoder_outputs: ``(B, S, D)`` encoder output to reuse instead of running the encoder.
        past_key_values: per decoder layer ``(k, v, cross_k, cross_v)``; with it the encoder
            is not needed (the cross keys/values are cached), but ``attention_mask`` (the
            source's) still is if the source has padding.
        use_cache: also return ``"past_key_values"``.

    Returns:
        ``{"last_hidden_state": (B, T, D)}`` (the decoder's), ``"encoder_last_hidden_state":
        (B, S, D)`` (when the encoder ran or ``encoder_outputs`` was given), ``"logits"`` with
        ``head="lm"``, ``"past_key_values"`` with ``use_cache``.

    Raises:
        InputError: neither or both of ids / embeddings on a side; a sequence over ``max_len``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.decoder_embeddings = Embeddings(spec, word_embeddings=not spec.share_embeddings,
                                             dtype=dtype, device=device)
        self.encoder = Encoder(spec, dtype=dtype, device=device)
        self.decoder = Decoder(spec, cross_attention=True, dtype=dtype, device=device)
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, device=device)
                        if spec.head == "lm" else None)

    def target_word_embeddings(self) -> Tensor:
        side = self.embeddings if self.spec.share_embeddings else self.decoder_embeddings
        return side.word_embeddings.weight

    def decoder_word_embeddings(self) -> Tensor:
        """The target side's token table (the source's with ``share_embeddings``)."""
        return self.target_word_embeddings()

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Source ``inputs_embeds`` for ``input_ids``."""
        return self.embeddings.embed_tokens(input_ids)

    def embed_decoder_tokens(self, decoder_input_ids: Tensor) -> Tensor:
        """Target ``decoder_inputs_embeds`` for ``decoder_input_ids``."""
        return self.decoder_embeddings.embed_tokens(decoder_input_ids,
                                                    self.target_word_embeddings())

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None,
                decoder_inputs_embeds: Tensor | None = None,
                encoder_outputs: Tensor | None = None, past_key_values: tuple | None = None,
                use_cache: bool = False) -> dict[str, Tensor]:
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise InputError("give exactly one of decoder_input_ids (B, T) and "
                             "decoder_inputs_embeds (B, T, D)")
        source_bias = self.key_padding_bias(attention_mask)
        memory = encoder_outputs
        cached_cross = bool(past_key_values) and len(past_key_values[0]) == 4
        if memory is None and not cached_cross:
            if (input_ids is None) == (inputs_embeds is None):
                raise InputError("give exactly one of input_ids (B, S) and inputs_embeds "
                                 "(B, S, D)")
            memory = self.encoder(self.embeddings(input_ids, None, inputs_embeds), source_bias)
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.embed_decoder_tokens(decoder_input_ids)
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        y = self.decoder_embeddings(inputs_embeds=decoder_inputs_embeds, past_length=past)
        bias = self.self_attention_bias(decoder_attention_mask, y.shape[1], past, y.device)
        y, presents = self.decoder(y, bias, memory, source_bias, past_key_values, use_cache=True)
        extra = {} if memory is None else {"encoder_last_hidden_state": memory}
        return self._outputs(y, presents, use_cache, **extra)
