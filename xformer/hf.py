"""Hugging Face ``transformers`` as an independent reference (optional: needs ``transformers``
and ``torch``, from the ``test`` extra)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import BackendError
from .spec import ModelSpec
from .weights import _bert_name

_ACT = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def bert_expressible(spec: ModelSpec) -> str | None:
    """``None`` if ``transformers.BertModel`` can express ``spec``, else the reason."""
    checks = [
        (spec.norm_position == "post", "BertModel is post-LN"),
        (spec.positional == "learned", "BertModel has learned positions"),
        (spec.embedding_norm, "BertModel always normalises embeddings"),
        (not spec.final_norm, "BertModel has no final norm"),
        (not spec.embed_scale, "BertModel does not scale embeddings"),
        (spec.bias, "BertModel always has biases"),
        (spec.type_vocab_size > 0, "BertModel needs type_vocab_size >= 1"),
    ]
    for ok, why in checks:
        if not ok:
            return why
    return None


def bert_config(spec: ModelSpec):
    """A ``transformers.BertConfig`` for ``spec`` (eager attention, no dropout)."""
    from transformers import BertConfig

    return BertConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                      num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                      intermediate_size=spec.d_ff, hidden_act=_ACT[spec.activation],
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      max_position_embeddings=spec.max_len, type_vocab_size=spec.type_vocab_size,
                      layer_norm_eps=spec.norm_eps, attn_implementation="eager")


def bert_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str):
    """``transformers.BertModel`` (train mode, dropout 0) loaded with canonical ``weights``.

    Raises:
        BackendError: the spec is not expressible as a ``BertModel``.
    """
    import torch
    from transformers import BertModel

    why = bert_expressible(spec)
    if why:
        raise BackendError(f"the Hugging Face reference cannot express this spec: {why}")
    model = BertModel(bert_config(spec), add_pooling_layer=spec.head == "pooler")
    model = model.to(getattr(torch, dtype)).train()
    state = {}
    for hf_name in model.state_dict():
        cn = _bert_name(hf_name)
        if cn is not None:
            state[hf_name] = torch.as_tensor(np.asarray(weights[cn], dtype))
    missing, _ = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if _bert_name(m) is not None]
    if missing:
        raise BackendError(f"Hugging Face reference: weights not loaded: {missing}")
    return model


def bert_to_canonical(native: Mapping[str, object]) -> dict[str, object]:
    """``{BertModel parameter name: tensor}`` -> ``{canonical name: tensor}`` (others dropped)."""
    return {_bert_name(k): v for k, v in native.items() if _bert_name(k) is not None}

