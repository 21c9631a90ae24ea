"""Hugging Face ``transformers`` as an independent reference (optional: needs ``transformers``
and ``torch``, from the ``test`` extra): ``BertModel`` for BERT-like encoders,
``GPT2LMHeadModel`` / ``GPT2Model`` for GPT-2-like decoders."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .errors import BackendError
from .spec import ModelSpec
from .convert import (_bert_name, canonical_to_gpt2, gpt2_config_dict, gpt2_names_to_canonical,
                      gpt2_unsupported)
from .weights import check_weights

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



# ---------------------------------------------------------------------- GPT-2
def gpt2_expressible(spec: ModelSpec) -> str | None:
    """``None`` if ``transformers.GPT2LMHeadModel`` (``head="lm"``) or ``GPT2Model``
    (``head="none"``) can express ``spec``, else the reason (naming the spec field): decoder,
    pre-LN, learned positions, final norm, biases, no embedding norm or scale."""
    return gpt2_unsupported(spec)


def gpt2_config(spec: ModelSpec):
    """A ``transformers.GPT2Config`` for ``spec``: eager attention, every dropout 0, no cache.

    Raises:
        SpecError: ``spec`` is not GPT-2-expressible.
    """
    from transformers import GPT2Config

    cfg = gpt2_config_dict(spec, dtype=None)
    cfg.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, use_cache=False)
    del cfg["model_type"], cfg["architectures"]
    return GPT2Config(**cfg, attn_implementation="eager")


def gpt2_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str):
    """``transformers.GPT2LMHeadModel`` (``head="lm"``) or ``GPT2Model`` (``head="none"``),
    train mode with every dropout 0, ``attn_implementation="eager"``, parameters in ``dtype``
    (``"float32"`` / ``"float64"``) loaded with canonical ``weights`` (:func:`canonical_to_gpt2`:
    ``c_attn`` fused from q/k/v, ``Conv1D`` weights transposed to ``(in, out)``).

    Call it as ``model(inputs_embeds=(B, T, D) token embeddings, attention_mask=(B, T))``:
    GPT-2 adds ``wpe`` itself (positions ``0..T-1``, whatever the mask). Do not pass
    ``token_type_ids``: GPT-2 would look them up in ``wte``. The output holds ``logits``
    ``(B, T, vocab_size)`` (``GPT2LMHeadModel``) and ``last_hidden_state`` ``(B, T, D)``
    (after ``ln_f``; added to the ``GPT2LMHeadModel`` output by a forward hook). With tied
    embeddings ``model.lm_head.weight`` *is* ``model.transformer.wte.weight``, and
    ``named_parameters()`` lists it once, as ``transformer.wte.weight``.

    Raises:
        BackendError: the spec is not GPT-2-expressible, or a parameter was not loaded.
        CheckpointError: ``weights`` do not match ``spec``.
    """
    import torch
    from transformers import GPT2LMHeadModel, GPT2Model

    why = gpt2_expressible(spec)
    if why:
        raise BackendError(f"the Hugging Face GPT-2 reference cannot express this spec: {why}")
    lm = spec.head == "lm"
    model = (GPT2LMHeadModel if lm else GPT2Model)(gpt2_config(spec))
    model = model.to(getattr(torch, dtype)).train()
    native = canonical_to_gpt2(spec, check_weights(spec, weights),
                               prefix="transformer." if lm else "")
    params = dict(model.named_parameters())
    if set(params) != set(native):
        raise BackendError(f"Hugging Face GPT-2 reference: parameters "
                           f"{sorted(set(params) ^ set(native))} do not match the spec")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(np.asarray(native[name], dtype)))
    if lm and spec.tie_embeddings and model.lm_head.weight is not model.transformer.wte.weight:
        raise BackendError("Hugging Face GPT-2 reference: lm_head.weight is not tied to "
                           "transformer.wte.weight")
    if lm:
        _expose_last_hidden_state(model)
    return model


def _expose_last_hidden_state(model) -> None:
    """Forward hooks that copy ``model.transformer``'s ``last_hidden_state`` into the
    ``GPT2LMHeadModel`` output (which has only ``logits``)."""
    kept = {}

    def keep(_module, _args, out):
        kept["h"] = out["last_hidden_state"] if isinstance(out, Mapping) else out[0]

    def add(_module, _args, out):
        if isinstance(out, Mapping):
            out["last_hidden_state"] = kept.pop("h")
        return out

    model.transformer.register_forward_hook(keep)
    model.register_forward_hook(add)


def gpt2_to_canonical(native: Mapping[str, object]) -> dict[str, object]:
    """``{GPT-2 parameter name: tensor}`` -> ``{canonical name: tensor}`` for parameters or
    their gradients (torch tensors or numpy arrays), names with or without ``transformer.``:
    ``attn.c_attn`` (weight ``(D, 3D)``, bias ``(3D,)``) split into ``q/k/v_proj`` and every
    ``Conv1D`` weight transposed to ``(out, in)`` (:func:`xformer.convert.gpt2_names_to_canonical`).
    Buffers and other names are dropped, and so is an ``lm_head.weight`` that shares memory
    with ``wte.weight`` (a tied ``state_dict()``; ``named_parameters()`` lists it once)."""
    items = dict(native)
    wte = items.get("transformer.wte.weight", items.get("wte.weight"))
    head = items.get("lm_head.weight")
    if head is not None and wte is not None and _same_memory(head, wte):
        del items["lm_head.weight"]
    return gpt2_names_to_canonical(items)


def _same_memory(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return np.shares_memory(a, b)
    try:
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape
    except AttributeError:
        return False
