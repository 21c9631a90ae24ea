"""Independent PyTorch references: the xformer models built from PyTorch's own layers
(docs/design.md §4), loaded with canonical weights. Used by tests and conformance to check
:mod:`xformer_torch.modules`.

* encoder: ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer``
  (:class:`NNTransformerReference`);
* decoder (GPT-like): the same encoder stack with a causal attention mask (a GPT block *is* an
  encoder layer with causal self-attention), functional embeddings, an LM head
  (:class:`NNDecoderReference`);
* encoder-decoder: ``nn.Transformer`` with ``custom_encoder`` / ``custom_decoder`` =
  ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` whose ``norm`` is the final LayerNorm
  only when ``spec.final_norm`` (:class:`NNEncoderDecoderReference`).

How it is run, and why (torch 2.13, CPU):

* The key-padding mask is a float ``(1 - mask) * finfo(dtype).min`` (a bool mask becomes
  ``-inf``).
* Decoder masks: padding and causality are multiplied into one 0/1 ``allowed`` mask and passed
  as ONE 3-D float ``attn_mask`` ``(B * H, T, S)`` (``mask`` / ``tgt_mask`` / ``memory_mask``),
  with no ``*_key_padding_mask``: ``F.multi_head_attention_forward`` *adds* a float key-padding
  mask to the attention mask, and two ``finfo.min`` add up to ``-inf`` (a fully padded row would
  then be NaN). One mask keeps docs/design.md §3's semantics, fully padded rows included.
* ``nn.TransformerEncoderLayer``'s fast path (``torch._transformer_encoder_layer_fwd``, taken in
  eval mode without grad) returns NaN for a fully padded row, with a bool mask *and* with the
  finite float mask. The encoder is therefore kept in training mode (dropout is 0, so this is
  deterministic), which always takes the slow, composite path.
* The slow path calls ``F.scaled_dot_product_attention``, whose fused CPU kernel gets the
  gradients of a fully padded row wrong with a finite ``finfo.min`` mask (forward is fine); the
  encoder runs under ``sdpa_kernel(SDPBackend.MATH)``, the plain ``softmax(QK^T)V`` composite.
* The layer stacks are always in training mode (dropout is 0), as for the encoder: no fast path
  (``nn.MultiheadAttention`` has one too, in eval mode without grad).
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from xformer.spec import ModelSpec, sinusoidal_table
from xformer.weights import check_weights

__all__ = ["NNTransformerReference", "NNDecoderReference", "NNEncoderDecoderReference",
           "nn_transformer_reference"]

_QKV = ("q_proj", "k_proj", "v_proj")


class NNTransformerReference(nn.Module):
    """The encoder of ``spec`` on ``nn.TransformerEncoder`` (see the module docstring).

    Embeddings and the embedding LayerNorm are functional ops on plain parameters; the layers are
    ``nn.TransformerEncoderLayer(batch_first=True, norm_first=(norm_position == "pre"))`` with
    ``dropout=0``; ``final_norm`` is ``nn.TransformerEncoder``'s ``norm``; the pooler an
    ``nn.Linear``. :meth:`load_canonical` and :meth:`to_canonical` translate between canonical
    names and this module's ``state_dict`` names (``in_proj_weight = cat(q, k, v)``).

    Call with the arguments of :class:`~xformer_torch.modules.EncoderModel`; returns the same
    dict of ``last_hidden_state`` ``(B, T, D)`` and ``pooler_output`` ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.spec, d = spec, spec.d_model
        factory = {"dtype": dtype}
        self.word_embeddings = nn.Parameter(torch.empty(spec.vocab_size, d, **factory))
        if spec.positional == "learned":
            self.position_embeddings = nn.Parameter(torch.empty(spec.max_len, d, **factory))
        else:
            self.register_buffer("position_embeddings", torch.as_tensor(
                sinusoidal_table(spec.max_len, d), **factory), persistent=False)
        self.token_type_embeddings = (nn.Parameter(torch.empty(spec.type_vocab_size, d,
                                                               **factory))
                                      if spec.type_vocab_size else None)
        self.embedding_norm_weight = (nn.Parameter(torch.empty(d, **factory))
                                      if spec.embedding_norm else None)
        self.embedding_norm_bias = (nn.Parameter(torch.empty(d, **factory))
                                    if spec.embedding_norm and spec.bias else None)
        activation = {"relu": "relu", "gelu": "gelu",
                      "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[spec.activation]
        layer = nn.TransformerEncoderLayer(
            d, spec.n_heads, spec.d_ff, dropout=0.0, activation=activation,
            layer_norm_eps=spec.norm_eps, batch_first=True,
            norm_first=spec.norm_position == "pre", bias=spec.bias, **factory)
        final = (nn.LayerNorm(d, eps=spec.norm_eps, bias=spec.bias, **factory)
                 if spec.final_norm else None)
        self.encoder = nn.TransformerEncoder(layer, spec.n_layers, norm=final,
                                             enable_nested_tensor=False)
        self.pooler = (nn.Linear(d, d, bias=spec.bias, **factory) if spec.head == "pooler"
                       else None)
        self.train(False)

    def train(self, mode: bool = True) -> "NNTransformerReference":
        super().train(mode)
        self.encoder.train(True)  # dropout is 0: training mode only forces the slow path
        return self

    # -- names ---------------------------------------------------------------------------
    def _native(self, canonical: str) -> tuple[str, int | None]:
        """``(state_dict name, third of in_proj or None)`` for a canonical name."""
        parts = canonical.split(".")
        if parts[0] == "embeddings":
            if parts[1] == "norm":
                return f"embedding_norm_{parts[2]}", None
            return parts[1], None
        if parts[0] == "pooler":
            return f"pooler.{parts[-1]}", None
        if parts[1] == "final_norm":
            return f"encoder.norm.{parts[-1]}", None
        prefix, sub, leaf = ".".join(parts[:3]), parts[3:-1], parts[-1]
        if sub[-1] in _QKV:
            return f"{prefix}.self_attn.in_proj_{leaf}", _QKV.index(sub[-1])
        if sub[0] == "ffn":
            return f"{prefix}.{sub[1]}.{leaf}", None
        return f"{prefix}.{'.'.join(sub)}.{leaf}", None

    def to_canonical(self, native: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Tensors keyed by this module's parameter names (a ``state_dict``, or gradients) ->
        canonical names, splitting ``in_proj_*`` into ``q/k/v_proj``."""
        out = {}
        for p in self.spec.parameters():
            name, third = self._native(p.name)
            t = native[name]
            out[p.name] = t if third is None else t.chunk(3, dim=0)[third]
        return out

    def load_canonical(self, weights: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights (checked with :func:`xformer.weights.check_weights`), cast to
        this module's dtype."""
        weights = check_weights(self.spec, weights)
        dtype = self.word_embeddings.dtype
        state: dict[str, Tensor | list] = {}
        for name, w in weights.items():
            native, third = self._native(name)
            t = torch.as_tensor(np.asarray(w), dtype=dtype)
            if third is None:
                state[native] = t
            else:  # in_proj_* = cat(q, k, v) along the output dimension
                state.setdefault(native, [None] * 3)[third] = t
        self.load_state_dict({k: torch.cat(v) if isinstance(v, list) else v
                              for k, v in state.items()}, strict=True)

    # -- forward -------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
                ) -> dict[str, Tensor]:
        spec, dtype = self.spec, self.word_embeddings.dtype
        if inputs_embeds is None:
            inputs_embeds = F.embedding(input_ids, self.word_embeddings)
            if spec.embed_scale:
                inputs_embeds = inputs_embeds * math.sqrt(spec.d_model)
        b, t, _ = inputs_embeds.shape
        x = inputs_embeds + self.position_embeddings[:t]
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(b, t, dtype=torch.long)
            x = x + F.embedding(token_type_ids, self.token_type_embeddings)
        if self.embedding_norm_weight is not None:
            x = F.layer_norm(x, (spec.d_model,), self.embedding_norm_weight,
                             self.embedding_norm_bias, spec.norm_eps)
        pad = None
        if attention_mask is not None:
            pad = (1.0 - attention_mask.to(dtype)) * torch.finfo(dtype).min
        with sdpa_kernel(SDPBackend.MATH):
            x = self.encoder(x, src_key_padding_mask=pad)
        out = {"last_hidden_state": x}
        if self.pooler is not None:
            out["pooler_output"] = torch.tanh(self.pooler(x[:, 0]))
        return out


# ---------------------------------------------------------------------- decoders
def _activation(spec: ModelSpec):
    return {"relu": "relu", "gelu": "gelu",
            "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}[spec.activation]


def _mask_3d(allowed: Tensor, n_heads: int, dtype: torch.dtype) -> Tensor:
    """One float ``attn_mask`` ``(B * H, T, S)`` from a 0/1 ``allowed`` ``(B, 1, T, S)`` (the
    product of padding and causality): ``(1 - allowed) * finfo(dtype).min``, batch-major as
    ``F.multi_head_attention_forward`` reads it."""
    b, _, t, s = allowed.shape
    bias = (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min
    return bias.expand(b, n_heads, t, s).reshape(b * n_heads, t, s)


def _causal(t: int) -> Tensor:
    return (torch.arange(t)[None, :] <= torch.arange(t)[:, None]).long()


class _SideEmbeddings(nn.Module):
    """Functional embeddings of one side on plain parameters: ``word`` (or a shared table),
    ``position`` (learned parameter or sinusoidal buffer), LayerNorm ``norm_weight`` /
    ``norm_bias`` if ``embedding_norm``."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, word: bool = True) -> None:
        super().__init__()
        d = spec.d_model
        self.spec = spec
        self.word = nn.Parameter(torch.empty(spec.vocab_size, d, dtype=dtype)) if word else None
        if spec.positional == "learned":
            self.position = nn.Parameter(torch.empty(spec.max_len, d, dtype=dtype))
        else:
            self.register_buffer("position", torch.as_tensor(
                sinusoidal_table(spec.max_len, d), dtype=dtype), persistent=False)
        self.norm_weight = (nn.Parameter(torch.empty(d, dtype=dtype)) if spec.embedding_norm
                            else None)
        self.norm_bias = (nn.Parameter(torch.empty(d, dtype=dtype))
                          if spec.embedding_norm and spec.bias else None)

    def forward(self, table: Tensor, input_ids: Tensor | None, inputs_embeds: Tensor | None
                ) -> Tensor:
        spec = self.spec
        if inputs_embeds is None:
            inputs_embeds = F.embedding(input_ids, table)
            if spec.embed_scale:
                inputs_embeds = inputs_embeds * math.sqrt(spec.d_model)
        x = inputs_embeds + self.position[:inputs_embeds.shape[1]]
        if self.norm_weight is not None:
            x = F.layer_norm(x, (spec.d_model,), self.norm_weight, self.norm_bias,
                             spec.norm_eps)
        return x


class _CanonicalNames(nn.Module):
    """Canonical <-> native names for the decoder references: ``_embeddings`` maps a canonical
    embeddings prefix to a :class:`_SideEmbeddings` path, ``_stacks`` a canonical stack name to
    the native ``nn.TransformerEncoder`` / ``nn.TransformerDecoder`` path."""

    _embeddings: dict[str, str] = {}
    _stacks: dict[str, str] = {}
    _LEAF = {"word_embeddings": "word", "position_embeddings": "position"}

    def train(self, mode: bool = True):
        super().train(mode)
        for path in self._stacks.values():  # dropout is 0: training mode only forces slow paths
            self.get_submodule(path).train(True)
        return self

    def _native(self, canonical: str) -> tuple[str, int | None]:
        parts = canonical.split(".")
        if parts[0] in self._embeddings:
            side = self._embeddings[parts[0]]
            if parts[1] == "norm":
                return f"{side}.norm_{parts[2]}", None
            return f"{side}.{self._LEAF[parts[1]]}", None
        if parts[0] == "lm_head":
            return "lm_head.weight", None
        stack = self._stacks[parts[0]]
        if parts[1] == "final_norm":
            return f"{stack}.norm.{parts[-1]}", None
        prefix, sub, leaf = f"{stack}.layers.{parts[2]}", parts[3:-1], parts[-1]
        attn = {"self_attn": "self_attn", "cross_attn": "multihead_attn"}.get(sub[0])
        if attn and sub[-1] in _QKV:
            return f"{prefix}.{attn}.in_proj_{leaf}", _QKV.index(sub[-1])
        if attn:
            return f"{prefix}.{attn}.{sub[1]}.{leaf}", None
        if sub[0] == "ffn":
            return f"{prefix}.{sub[1]}.{leaf}", None
        return f"{prefix}.{'.'.join(sub)}.{leaf}", None

    to_canonical = NNTransformerReference.to_canonical
    load_canonical = NNTransformerReference.load_canonical

    @property
    def word_embeddings(self) -> nn.Parameter:
        """The source side's token table (the decoder's, for a decoder): look up
        ``inputs_embeds`` with it outside the model to get their gradient in the same pass."""
        return self.embeddings.word

    def _logits(self, out: dict[str, Tensor], x: Tensor, tied: Tensor) -> None:
        if self.spec.head == "lm":
            out["logits"] = F.linear(x, tied if self.spec.tie_embeddings else
                                     self.lm_head.weight)


class NNDecoderReference(_CanonicalNames):
    """The decoder (GPT-like) of ``spec`` on PyTorch's own layers: functional embeddings
    (``embeddings.word`` / ``.position`` / ``.norm_*``), ``decoder`` =
    ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` (``batch_first``,
    ``norm_first`` for pre-LN, ``norm`` = the final LayerNorm if ``spec.final_norm``) called with
    a causal 3-D float ``mask``, and ``lm_head`` (``nn.Linear`` without bias; the token table
    when tied).

    Call with the arguments of :class:`~xformer_torch.modules.DecoderModel` (no cache):
    ``input_ids`` or ``inputs_embeds``, ``attention_mask``. Returns ``last_hidden_state`` and
    ``logits`` (``head="lm"``). ``.word_embeddings`` is the token table (tensor).
    """

    _embeddings = {"embeddings": "embeddings"}
    _stacks = {"decoder": "decoder"}

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.spec, d = spec, spec.d_model
        self.embeddings = _SideEmbeddings(spec, dtype)
        layer = nn.TransformerEncoderLayer(
            d, spec.n_heads, spec.d_ff, dropout=0.0, activation=_activation(spec),
            layer_norm_eps=spec.norm_eps, batch_first=True,
            norm_first=spec.norm_position == "pre", bias=spec.bias, dtype=dtype)
        final = (nn.LayerNorm(d, eps=spec.norm_eps, bias=spec.bias, dtype=dtype)
                 if spec.final_norm else None)
        self.decoder = nn.TransformerEncoder(layer, spec.n_layers, norm=final,
                                             enable_nested_tensor=False)
        self.lm_head = (nn.Linear(d, spec.vocab_size, bias=False, dtype=dtype)
                        if spec.head == "lm" and not spec.tie_embeddings else None)
        self.train(False)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None) -> dict[str, Tensor]:
        dtype = self.embeddings.position.dtype
        x = self.embeddings(self.word_embeddings, input_ids, inputs_embeds)
        b, t, _ = x.shape
        allowed = _causal(t)[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            allowed = attention_mask.to(dtype)[:, None, None, :] * allowed
        with sdpa_kernel(SDPBackend.MATH):
            x = self.decoder(x, mask=_mask_3d(allowed, self.spec.n_heads, dtype))
        out = {"last_hidden_state": x}
        self._logits(out, x, self.word_embeddings)
        return out


class NNEncoderDecoderReference(_CanonicalNames):
    """The encoder-decoder of ``spec`` on ``nn.Transformer`` (``batch_first``, ``norm_first``
    for pre-LN) with ``custom_encoder`` = ``nn.TransformerEncoder`` and ``custom_decoder`` =
    ``nn.TransformerDecoder`` (``norm`` = the final LayerNorm only if ``spec.final_norm``;
    ``nn.TransformerDecoderLayer``'s ``self_attn``, ``multihead_attn``, ``norm1/2/3``,
    ``linear1/2``), functional embeddings for both sides (``embeddings``,
    ``decoder_embeddings``; the latter without a table under ``share_embeddings``) and
    ``lm_head``. Masks: ``src_mask`` (source padding), ``tgt_mask`` (target padding x causal),
    ``memory_mask`` (source padding), each one 3-D float mask, no key-padding masks.

    Call with ``input_ids`` / ``inputs_embeds``, ``attention_mask``, ``decoder_input_ids`` /
    ``decoder_inputs_embeds``, ``decoder_attention_mask``. Returns ``last_hidden_state``,
    ``encoder_last_hidden_state`` and ``logits`` (``head="lm"``). ``.word_embeddings`` and
    ``.decoder_word_embeddings`` are the source and target token tables (tensors; the same
    parameter under ``share_embeddings``).
    """

    _embeddings = {"embeddings": "embeddings", "decoder_embeddings": "decoder_embeddings"}
    _stacks = {"encoder": "transformer.encoder", "decoder": "transformer.decoder"}

    def __init__(self, spec: ModelSpec, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        self.spec, d = spec, spec.d_model
        self.embeddings = _SideEmbeddings(spec, dtype)
        self.decoder_embeddings = _SideEmbeddings(spec, dtype, word=not spec.share_embeddings)
        common = dict(dim_feedforward=spec.d_ff, dropout=0.0, activation=_activation(spec),
                      layer_norm_eps=spec.norm_eps, batch_first=True,
                      norm_first=spec.norm_position == "pre", bias=spec.bias, dtype=dtype)

        def final():
            return (nn.LayerNorm(d, eps=spec.norm_eps, bias=spec.bias, dtype=dtype)
                    if spec.final_norm else None)

        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d, spec.n_heads, **common),
                                        spec.n_layers, norm=final(), enable_nested_tensor=False)
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d, spec.n_heads, **common),
                                        spec.decoder_layers, norm=final())
        self.transformer = nn.Transformer(
            d, spec.n_heads, custom_encoder=encoder, custom_decoder=decoder, batch_first=True,
            **{k: v for k, v in common.items() if k not in ("batch_first",)})
        self.lm_head = (nn.Linear(d, spec.vocab_size, bias=False, dtype=dtype)
                        if spec.head == "lm" and not spec.tie_embeddings else None)
        self.train(False)

    @property
    def decoder_word_embeddings(self) -> nn.Parameter:
        """The target side's token table (``word_embeddings`` under ``share_embeddings``)."""
        return (self.embeddings.word if self.spec.share_embeddings
                else self.decoder_embeddings.word)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, decoder_inputs_embeds: Tensor | None = None
                ) -> dict[str, Tensor]:
        spec, dtype = self.spec, self.embeddings.position.dtype
        x = self.embeddings(self.word_embeddings, input_ids, inputs_embeds)
        y = self.decoder_embeddings(self.decoder_word_embeddings, decoder_input_ids,
                                    decoder_inputs_embeds)
        (b, s, _), t = x.shape, y.shape[1]
        src = (torch.ones(b, s, dtype=dtype) if attention_mask is None
               else attention_mask.to(dtype))[:, None, None, :]
        tgt = (torch.ones(b, t, dtype=dtype) if decoder_attention_mask is None
               else decoder_attention_mask.to(dtype))[:, None, None, :]
        h = spec.n_heads
        with sdpa_kernel(SDPBackend.MATH):
            memory = self.transformer.encoder(x, mask=_mask_3d(src.expand(b, 1, s, s), h, dtype))
            y = self.transformer.decoder(
                y, memory, tgt_mask=_mask_3d(tgt * _causal(t), h, dtype),
                memory_mask=_mask_3d(src.expand(b, 1, t, s), h, dtype))
        out = {"last_hidden_state": y, "encoder_last_hidden_state": memory}
        self._logits(out, y, self.decoder_word_embeddings)
        return out


def nn_transformer_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray],
                             dtype: str | torch.dtype = "float64") -> nn.Module:
    """The reference for ``spec.architecture`` (:class:`NNTransformerReference`,
    :class:`NNDecoderReference` or :class:`NNEncoderDecoderReference`) with canonical
    ``weights`` loaded, in ``dtype`` (``"float32"``/``"float64"`` or a torch dtype).

    Raises:
        CheckpointError: ``weights`` do not match ``spec``.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    cls = {"encoder": NNTransformerReference, "decoder": NNDecoderReference,
           "encoder-decoder": NNEncoderDecoderReference}[spec.architecture]
    model = cls(spec, dtype)
    model.load_canonical(weights)
    return model
