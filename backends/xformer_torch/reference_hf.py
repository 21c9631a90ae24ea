"""Hugging Face ``transformers`` models as independent references (they need ``torch`` and
``transformers``, from the ``test`` extra): ``BertModel`` for BERT-like encoders,
``GPT2LMHeadModel`` / ``GPT2Model`` for GPT-2-like decoders, loaded with canonical weights.

Which specs they express, their configs and the name maps are plain data in
:mod:`xformer.convert` (no framework there); this module builds the torch models. They are run
by :mod:`xformer_torch.references` (reference ``"huggingface"``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPT2Model

from xformer.convert import (_bert_name, bert_config_dict, bert_expressible, bert_to_canonical,
                             canonical_to_gpt2, gpt2_config_dict, gpt2_expressible,
                             gpt2_to_canonical, huggingface_expressible)
from xformer.errors import BackendError
from xformer.spec import ModelSpec
from xformer.weights import check_weights

__all__ = ["bert_reference", "gpt2_reference", "huggingface_reference"]


def bert_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str) -> BertModel:
    """``transformers.BertModel`` (train mode, dropout 0, eager attention) in ``dtype``
    (``"float32"`` / ``"float64"``) loaded with canonical ``weights``; the pooler only with
    ``head="pooler"``.

    Raises:
        BackendError: the spec is not expressible as a ``BertModel``
            (:func:`xformer.convert.bert_expressible`), or a weight was not loaded.
    """
    why = bert_expressible(spec)
    if why:
        raise BackendError(f"the Hugging Face reference cannot express this spec: {why}")
    model = BertModel(BertConfig(**bert_config_dict(spec)), add_pooling_layer=spec.head == "pooler")
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


def gpt2_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str
                   ) -> GPT2LMHeadModel | GPT2Model:
    """``transformers.GPT2LMHeadModel`` (``head="lm"``) or ``GPT2Model`` (``head="none"``),
    train mode with every dropout 0, ``attn_implementation="eager"``, parameters in ``dtype``
    (``"float32"`` / ``"float64"``) loaded with canonical ``weights``
    (:func:`xformer.convert.canonical_to_gpt2`: ``c_attn`` fused from q/k/v, ``Conv1D`` weights
    transposed to ``(in, out)``).

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
    why = gpt2_expressible(spec)
    if why:
        raise BackendError(f"the Hugging Face GPT-2 reference cannot express this spec: {why}")
    lm = spec.head == "lm"
    cfg = gpt2_config_dict(spec, dtype=None)
    cfg.update(attn_pdrop=0.0, embd_pdrop=0.0, resid_pdrop=0.0, use_cache=False)
    del cfg["model_type"], cfg["architectures"]
    model = (GPT2LMHeadModel if lm else GPT2Model)(GPT2Config(**cfg, attn_implementation="eager"))
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


def _expose_last_hidden_state(model: GPT2LMHeadModel) -> None:
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


def huggingface_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str
                          ) -> tuple[torch.nn.Module, dict[str, torch.Tensor],
                                     Callable[[Mapping[str, Any]], dict[str, Any]]]:
    """``(model, {"inputs_embeds": token table}, to_canonical)`` for ``spec``: a
    :func:`bert_reference` (encoders) or :func:`gpt2_reference` (decoders), the table its
    token embeddings are looked up in, and the map of its parameter names to canonical ones.

    Raises:
        BackendError: no ``transformers`` class expresses ``spec``
            (:func:`xformer.convert.huggingface_expressible`).
    """
    if spec.architecture == "encoder":
        model = bert_reference(spec, weights, dtype)
        return model, {"inputs_embeds": model.embeddings.word_embeddings.weight}, bert_to_canonical
    if spec.architecture == "decoder":
        model = gpt2_reference(spec, weights, dtype)
        base = getattr(model, "transformer", model)
        return model, {"inputs_embeds": base.wte.weight}, gpt2_to_canonical
    raise BackendError(f"the Hugging Face reference cannot express this spec: "
                       f"{huggingface_expressible(spec)}")
