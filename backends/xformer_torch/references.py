"""The torch-based independent references of conformance, as
:class:`xformer.conformance.Reference` records (registered in
:mod:`xformer.conformance.references`):

* ``TORCH_NN`` (``"torch.nn"``): PyTorch's own layers with the same weights
  (:mod:`xformer_torch.reference_nn`): ``nn.TransformerEncoderLayer`` stacks for encoders and
  (with a causal mask) decoders, ``nn.Transformer`` for encoder-decoders; every spec those
  layers can build (:func:`torch_nn_expressible`).
* ``HUGGINGFACE`` (``"huggingface"``): ``transformers.BertModel`` (BERT-shaped encoders),
  ``GPT2LMHeadModel`` / ``GPT2Model`` (GPT-2-shaped decoders) or a Llama-family causal LM
  (rotary decoders: Llama, Mistral, Qwen2, Gemma, GPT-NeoX; the case's ``model_type`` when it
  names one), same weights (:mod:`xformer_torch.reference_hf`; which specs:
  :func:`xformer.convert.huggingface_expressible`).

Importing this module imports neither torch nor transformers; running a reference does. Both
give outputs and gradients through :func:`run_torch_module`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

from xformer.backend import timed
from xformer.conformance import Case, Reference, RunResult
from xformer.convert import classic_transformer_checks, huggingface_expressible

__all__ = ["HUGGINGFACE", "TORCH_NN", "run_torch_module", "torch_nn_expressible"]

#: The id input each embeddings input is looked up from.
_IDS = {"inputs_embeds": "input_ids", "decoder_inputs_embeds": "decoder_input_ids"}
_PASSED = ("attention_mask", "decoder_attention_mask", "token_type_ids")


def run_torch_module(label: str, model: Any, case: Case, tables: Mapping[str, Any],
                     to_canonical: Callable[[Mapping[str, Any]], Mapping[str, Any]],
                     repeats: int = 0) -> RunResult:
    """Run a torch reference module on ``case``: outputs, and the gradients of
    ``sum_k sum(outputs[k] * cotangents[k])``.

    Token embeddings are looked up outside the module from ``tables``
    (``{"inputs_embeds": table, "decoder_inputs_embeds": table}``, scaled by ``sqrt(d_model)``
    with ``embed_scale``) and passed in as those keyword arguments, so that their gradients
    come in the same pass; ``attention_mask``, ``decoder_attention_mask`` and
    ``token_type_ids`` are passed as they are. Parameter gradients are mapped with
    ``to_canonical`` (``{native name: tensor}`` -> ``{canonical name: tensor}``); a parameter
    without a gradient counts as zero. ``repeats > 0`` also times each call.
    """
    import torch

    dtype = getattr(torch, case.dtype)
    spec = case.spec
    scale = math.sqrt(spec.d_model) if spec.embed_scale else 1.0
    ids = {k: torch.as_tensor(case.inputs[_IDS[k]]) for k in tables}
    kwargs = {k: torch.as_tensor(v) for k, v in case.inputs.items() if k in _PASSED}
    cot = {k: torch.as_tensor(case.cotangents[k], dtype=dtype) for k in spec.output_names()}

    def embeds() -> dict[str, Any]:
        return {k: torch.nn.functional.embedding(ids[k], t) * scale for k, t in tables.items()}

    def forward() -> dict[str, Any]:
        with torch.no_grad():
            out = model(**embeds(), **kwargs)
        return {k: _get(out, k).numpy() for k in spec.output_names()}

    def step() -> dict[str, Any]:
        model.zero_grad(set_to_none=False)
        emb = embeds()
        for e in emb.values():
            e.retain_grad()
        out = model(**emb, **kwargs)
        loss = sum((_get(out, k) * cot[k]).sum() for k in spec.output_names())
        loss.backward()
        native = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                  for n, p in model.named_parameters()}
        grads = {k: v.detach().numpy() for k, v in to_canonical(native).items()}
        grads.update({k: e.grad.numpy() for k, e in emb.items()})
        return grads

    if repeats > 0:
        outputs, fwd = timed(forward, repeats=repeats)
        grads, stp = timed(step, repeats=repeats)
    else:
        outputs, grads, fwd, stp = forward(), step(), float("nan"), float("nan")
    return RunResult(label, outputs, grads, fwd, stp)


def _get(out: Any, key: str) -> Any:
    return out[key] if isinstance(out, Mapping) else getattr(out, key)


def _run_nn(case: Case, repeats: int = 0) -> RunResult:
    from .reference_nn import nn_transformer_reference

    model = nn_transformer_reference(case.spec, case.weights, case.dtype)
    tables = {"inputs_embeds": model.word_embeddings}
    if case.spec.architecture == "encoder-decoder":
        tables["decoder_inputs_embeds"] = model.decoder_word_embeddings
    return run_torch_module("torch.nn", model, case, tables, model.to_canonical, repeats)


def _run_huggingface(case: Case, repeats: int = 0) -> RunResult:
    from .reference_hf import huggingface_reference

    model, tables, to_canonical = huggingface_reference(
        case.spec, case.weights, case.dtype, model_type=case.model_type)
    return run_torch_module("huggingface", model, case, tables, to_canonical, repeats)


def torch_nn_expressible(spec) -> str | None:
    """``None`` if :mod:`xformer_torch.reference_nn` can build ``spec`` from
    ``nn.TransformerEncoderLayer`` / ``nn.Transformer`` (plain Python, no torch import), else
    the reason, naming the spec field. Those layers have LayerNorm (``weight * y + bias``),
    a two-layer MLP with relu, gelu or gelu_tanh (the activations ``reference_nn`` maps),
    multi-head attention over heads of ``d_model / n_heads``, one ``bias`` switch for every
    Linear and LayerNorm, sequential sub-layers, and learned or sinusoidal positions."""
    checks = [
        *classic_transformer_checks(spec, "nn.TransformerEncoderLayer"),
        (spec.positional in ("learned", "sinusoidal"),
         f"spec field 'positional' is {spec.positional!r}; nn.MultiheadAttention has no rotary "
         f"positions"),
    ]
    return next((why for ok, why in checks if not ok), None)


TORCH_NN = Reference(
    "torch.nn", "PyTorch's own nn.TransformerEncoderLayer / nn.Transformer, same weights",
    expressible=torch_nn_expressible, runner=_run_nn, requires=("torch",))

HUGGINGFACE = Reference(
    "huggingface", "transformers BertModel (encoders) / GPT2LMHeadModel, GPT2Model, Llama, "
                   "Mistral, Qwen2, Gemma, GPT-NeoX causal LMs (decoders)",
    expressible=huggingface_expressible, runner=_run_huggingface,
    requires=("torch", "transformers"))
