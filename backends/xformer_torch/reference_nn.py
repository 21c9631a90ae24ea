"""An independent PyTorch reference: the xformer encoder built from PyTorch's own
``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` (DESIGN.md §4), loaded with canonical
weights. Used by tests and conformance to check :class:`xformer_torch.modules.EncoderModel`.

How it is run, and why (torch 2.13, CPU):

* The key-padding mask is a float ``(1 - mask) * finfo(dtype).min`` (a bool mask becomes
  ``-inf``).
* ``nn.TransformerEncoderLayer``'s fast path (``torch._transformer_encoder_layer_fwd``, taken in
  eval mode without grad) returns NaN for a fully padded row, with a bool mask *and* with the
  finite float mask. The encoder is therefore kept in training mode (dropout is 0, so this is
  deterministic), which always takes the slow, composite path.
* The slow path calls ``F.scaled_dot_product_attention``, whose fused CPU kernel gets the
  gradients of a fully padded row wrong with a finite ``finfo.min`` mask (forward is fine); the
  encoder runs under ``sdpa_kernel(SDPBackend.MATH)``, the plain ``softmax(QK^T)V`` composite.
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

__all__ = ["NNTransformerReference", "nn_transformer_reference"]

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


def nn_transformer_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray],
                             dtype: str | torch.dtype = "float64") -> NNTransformerReference:
    """:class:`NNTransformerReference` for ``spec`` with canonical ``weights`` loaded, in
    ``dtype`` (``"float32"``/``"float64"`` or a torch dtype).

    Raises:
        CheckpointError: ``weights`` do not match ``spec``.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    model = NNTransformerReference(spec, dtype)
    model.load_canonical(weights)
    return model
