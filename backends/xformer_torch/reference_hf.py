"""Hugging Face ``transformers`` models as independent references (they need ``torch`` and
``transformers``, from the ``test`` extra): ``BertModel`` for BERT-like encoders,
``GPT2LMHeadModel`` / ``GPT2Model`` for GPT-2-like decoders, and the Llama family
(``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``GemmaForCausalLM``,
``GPTNeoXForCausalLM``) for rotary decoders, loaded with canonical weights.

Which specs they express, their configs and the name maps are plain data in
:mod:`xformer.convert` (no framework there); this module builds the torch models. They are run
by :mod:`xformer_torch.references` (reference ``"huggingface"``).

Float64 (docs/design.md §3: every activation in the compute dtype). The Llama-family classes of
transformers 5 compute three things in float32 whatever the model's dtype: RMSNorm
(``hidden_states.to(torch.float32)``; Gemma ``x.float()``), the rotary angles (``inv_freq``
made with ``dtype=torch.float`` and ``position_ids.float()``) and the attention softmax
(``softmax(..., dtype=torch.float32)``, which in a float64 model also turns the
``finfo(float64).min`` mask into ``-inf``: a fully padded row gives NaN); Gemma's embedding
scale is a float32 constant too. A float64 reference
therefore goes through :func:`exact_float64`, which computes those three in float64 with the
same formulas; float32 references are Hugging Face's code unchanged. (Measured on tiny
checkpoints, tests/test_convert_llama.py: unpatched float64 logits differ from exact float64 by
~1e-7 relative, and are NaN on a fully padded row.)
"""

from __future__ import annotations

import types
from typing import Any, Callable, Mapping

import numpy as np
import torch
import transformers
from transformers import (AttentionInterface, BertConfig, BertModel, GPT2Config,
                          GPT2LMHeadModel, GPT2Model)
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from xformer.convert import (LLAMA_FAMILY, LLAMA_FAMILY_CLASSES, LLAMA_FAMILY_CONFIGS,
                             _bert_name, bert_config_dict, bert_expressible, bert_to_canonical,
                             canonical_to_gpt2, canonical_to_llama_family, gpt2_config_dict,
                             gpt2_expressible, gpt2_to_canonical, huggingface_expressible,
                             huggingface_model_type, llama_family_config_dict,
                             llama_family_expressible, llama_family_to_canonical)
from xformer.errors import BackendError
from xformer.spec import ModelSpec
from xformer.weights import check_weights

__all__ = ["bert_reference", "gpt2_reference", "llama_family_reference", "exact_float64",
           "huggingface_reference", "EXACT_ATTENTION"]


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
    _copy_parameters(model, native, dtype, "Hugging Face GPT-2 reference")
    if lm and spec.tie_embeddings and model.lm_head.weight is not model.transformer.wte.weight:
        raise BackendError("Hugging Face GPT-2 reference: lm_head.weight is not tied to "
                           "transformer.wte.weight")
    if lm:
        _expose_last_hidden_state(model, model.transformer)
    return model


def _copy_parameters(model: torch.nn.Module, native: Mapping[str, np.ndarray], dtype: str,
                     who: str) -> None:
    """Copy ``native`` (``{parameter name: array}`` in the model's own names) into ``model``'s
    parameters, cast to ``dtype``.

    Raises:
        BackendError: naming ``who``, when the names differ from ``model.named_parameters()``.
    """
    params = dict(model.named_parameters())
    if set(params) != set(native):
        raise BackendError(f"{who}: parameters {sorted(set(params) ^ set(native))} do not "
                           f"match the spec")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(torch.as_tensor(np.asarray(native[name], dtype)))


def _expose_last_hidden_state(model: torch.nn.Module, base: torch.nn.Module) -> None:
    """Forward hooks that copy ``base``'s (``GPT2Model``, ``LlamaModel``, ...)
    ``last_hidden_state`` into the output of the LM ``model`` around it (which has only
    ``logits``)."""
    kept = {}

    def keep(_module, _args, out):
        kept["h"] = out["last_hidden_state"] if isinstance(out, Mapping) else out[0]

    def add(_module, _args, out):
        if isinstance(out, Mapping):
            out["last_hidden_state"] = kept.pop("h")
        return out

    base.register_forward_hook(keep)
    model.register_forward_hook(add)


# ---------------------------------------------------------------------- the Llama family
#: The ``attn_implementation`` of float64 references: ``modeling_llama.eager_attention_forward``
#: with the softmax in the input dtype (:func:`_eager_attention_exact`), and the eager
#: (additive ``finfo(dtype).min``) mask. Registered once, under this name only, in
#: ``transformers``' ``AttentionInterface`` / ``AttentionMaskInterface``.
EXACT_ATTENTION = "xformer_eager_exact"


def _eager_attention_exact(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           scaling: float, dropout: float = 0.0, **kwargs: Any
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """``eager_attention_forward`` of ``modeling_llama.py`` (transformers 5) with the softmax
    computed in ``query``'s dtype instead of float32: query ``(B, H, T, dh)``, key / value
    ``(B, H_kv, S, dh)`` repeated to ``H`` heads (``repeat_kv``, = ``repeat_interleave`` on
    the head axis; ``module.num_key_value_groups``, 1 for GPT-NeoX), additive mask
    ``(B, 1, T, S)``. Returns ``(output (B, T, H, dh), probabilities (B, H, T, S))``."""
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.nn.functional.softmax(weights, dim=-1)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


AttentionInterface.register(EXACT_ATTENTION, _eager_attention_exact)
AttentionMaskInterface.register(EXACT_ATTENTION, eager_mask)

#: RMSNorm classes: ``weight * x / sqrt(mean(x^2) + eps)`` (``variance_epsilon``) or Gemma's
#: ``x / sqrt(mean(x^2) + eps) * (1 + weight)`` (``eps``).
_RMS_NORMS = {"LlamaRMSNorm": False, "MistralRMSNorm": False, "Qwen2RMSNorm": False,
              "GemmaRMSNorm": True}


def _rms_norm_exact(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` without the float32 round trip: ``weight * (x *
    rsqrt(mean(x^2) + eps))`` in ``x``'s dtype."""
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                          + self.variance_epsilon))


def _gemma_rms_norm_exact(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``GemmaRMSNorm.forward`` without ``x.float()``: ``x * rsqrt(mean(x^2) + eps) *
    (1 + weight)`` in ``x``'s dtype."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1.0 + self.weight)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    """transformers' ``_compute_llama3_parameters`` (``modeling_rope_utils.py``), line for
    line, on a float64 ``inv_freq``: long wavelengths divided by ``factor``, short ones kept,
    the band between interpolated."""
    import math

    factor, low, high = (float(params[k]) for k in ("factor", "low_freq_factor",
                                                     "high_freq_factor"))
    old_len = params["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed, inv_freq_llama)


def _rotary_exact(self: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``LlamaRotaryEmbedding.forward`` (and its Mistral, Qwen2, Gemma, GPT-NeoX copies) in
    float64: ``freqs = position * inv_freq`` (``inv_freq`` float64), ``emb = cat(freqs,
    freqs)``, ``(cos(emb), sin(emb))`` cast to ``x``'s dtype; shapes ``(1, T, rotary_dim)``."""
    freqs = position_ids[..., None].to(torch.float64) * self.inv_freq.to(
        device=x.device, dtype=torch.float64)
    emb = torch.cat((freqs, freqs), dim=-1)
    return ((emb.cos() * self.attention_scaling).to(x.dtype),
            (emb.sin() * self.attention_scaling).to(x.dtype))


def exact_float64(model: torch.nn.Module) -> torch.nn.Module:
    """Make a float64 Llama-family model compute in float64 throughout (the module docstring
    says why), in place, with Hugging Face's own formulas:

    * every RMSNorm (:data:`_RMS_NORMS`) gets a ``forward`` without the float32 cast;
    * every rotary embedding gets ``inv_freq = 1 / theta^(arange(0, dim, 2) / dim)``
      recomputed in float64 (``compute_default_rope_parameters`` of ``modeling_llama.py``,
      ``dim`` = ``head_dim * partial_rotary_factor``) and a float64 ``forward``
      (:func:`_rotary_exact`);
    * attention uses :data:`EXACT_ATTENTION` (the softmax in float64);
    * Gemma's token-embedding scale (``GemmaTextScaledWordEmbedding.embed_scale``, a buffer
      made from ``torch.tensor(sqrt(hidden_size))``, i.e. rounded to float32) is remade in
      float64; it applies to ``input_ids`` only, never to ``inputs_embeds``.

    Returns ``model``.

    Raises:
        BackendError: an RMSNorm class it does not know, or a rotary type other than
            ``"default"`` (never built here: :mod:`xformer.convert` refuses them).
    """
    for module in model.modules():
        name = type(module).__name__
        if hasattr(module, "scalar_embed_scale"):  # GemmaTextScaledWordEmbedding
            module.register_buffer("embed_scale", torch.tensor(
                float(module.scalar_embed_scale), dtype=torch.float64), persistent=False)
        if name.endswith("RMSNorm"):
            if name not in _RMS_NORMS:
                raise BackendError(f"exact_float64: unknown RMSNorm class {name}")
            fn = _gemma_rms_norm_exact if _RMS_NORMS[name] else _rms_norm_exact
            module.forward = types.MethodType(fn, module)
        elif name.endswith("RotaryEmbedding"):
            if module.rope_type not in ("default", "llama3"):
                raise BackendError(f"exact_float64: rope_type {module.rope_type!r} is neither "
                                   f"the default rotary embedding nor llama3's")
            cfg = module.config
            params = cfg.rope_parameters
            head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            # only GPT-NeoX reads partial_rotary_factor (compute_default_rope_parameters)
            dim = int(head * params.get("partial_rotary_factor", 1.0)) if (
                name.startswith("GPTNeoX")) else head
            arange = torch.arange(0, dim, 2, dtype=torch.float64)
            inv_freq = 1.0 / (float(params["rope_theta"]) ** (arange / dim))
            if module.rope_type == "llama3":
                inv_freq = _llama3_inv_freq(inv_freq, params)
            module.register_buffer("inv_freq", inv_freq, persistent=False)
            module.forward = types.MethodType(_rotary_exact, module)
    model.config._attn_implementation = EXACT_ATTENTION
    return model


def llama_family_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str,
                           model_type: str | None = None) -> torch.nn.Module:
    """The ``transformers`` causal LM of ``model_type`` (:data:`xformer.convert.
    LLAMA_FAMILY_CLASSES`; default :func:`xformer.convert.huggingface_model_type`) for
    ``spec``: train mode with every dropout 0, ``attn_implementation="eager"``, no cache,
    parameters in ``dtype`` (``"float32"`` / ``"float64"``) loaded with canonical ``weights``
    through the export name map (:func:`xformer.convert.canonical_to_llama_family`; GPT-NeoX's
    head is the module's ``lm_head.weight``, the file's ``embed_out.weight``). A float64 model
    goes through :func:`exact_float64` (attention then :data:`EXACT_ATTENTION`).

    Call it as ``model(inputs_embeds=(B, T, D), attention_mask=(B, T))``: positions are
    ``0..T-1`` whatever the mask. The output holds ``logits`` and ``last_hidden_state`` (after
    the final norm; added by a forward hook). Gemma: ``inputs_embeds`` are taken as they are,
    already scaled by ``sqrt(d_model)`` (transformers 5 scales token embeddings inside
    ``GemmaTextScaledWordEmbedding``, so ``GemmaModel.forward`` leaves ``inputs_embeds``
    alone), as xformer's ``inputs_embeds``; the runner scales the looked-up rows
    (:func:`xformer_torch.references.run_torch_module`), so gradients w.r.t.
    ``inputs_embeds`` are w.r.t. the scaled embeddings on both sides.

    Raises:
        BackendError: ``model_type`` is not a Llama-family type or cannot express ``spec``
            (the reason names the spec field), a parameter was not loaded, or (Gemma) this
            ``transformers`` scales ``inputs_embeds`` inside ``GemmaModel.forward`` (4.x).
        CheckpointError: ``weights`` do not match ``spec``.
    """
    model_type = model_type or huggingface_model_type(spec)
    if model_type not in LLAMA_FAMILY:
        raise BackendError(f"the Hugging Face reference has no Llama-family class for this "
                           f"spec: {huggingface_expressible(spec) or model_type}")
    cls = LLAMA_FAMILY_CLASSES[model_type]
    why = llama_family_expressible(spec, model_type)
    if why:
        raise BackendError(f"the Hugging Face {cls} reference cannot express this spec: {why}")
    cfg = llama_family_config_dict(spec, model_type, dtype=None)
    for key in ("architectures", "model_type"):
        del cfg[key]
    cfg.update(attention_dropout=0.0, use_cache=False)
    if model_type == "gpt_neox":
        cfg["hidden_dropout"] = 0.0
    config = getattr(transformers, LLAMA_FAMILY_CONFIGS[model_type])(
        **cfg, attn_implementation="eager")
    model = getattr(transformers, cls)(config).to(getattr(torch, dtype)).train()
    native = canonical_to_llama_family(spec, check_weights(spec, weights), model_type)
    if "embed_out.weight" in native:  # GPT-NeoX: the file's name of the module's lm_head
        native["lm_head.weight"] = native.pop("embed_out.weight")
    _copy_parameters(model, native, dtype, f"Hugging Face {cls} reference")
    base = model.base_model  # LlamaModel, ..., GPTNeoXModel
    table = base.get_input_embeddings()
    if spec.tie_embeddings and model.lm_head.weight is not table.weight:
        raise BackendError(f"Hugging Face {cls} reference: lm_head.weight is not tied to the "
                           f"token table")
    if model_type == "gemma" and not hasattr(table, "embed_scale"):
        raise BackendError("this transformers scales inputs_embeds inside GemmaModel.forward "
                           "(4.x); the Gemma reference needs transformers >= 5")
    _expose_last_hidden_state(model, base)
    return exact_float64(model) if dtype == "float64" else model


def huggingface_reference(spec: ModelSpec, weights: Mapping[str, np.ndarray], dtype: str,
                          model_type: str | None = None
                          ) -> tuple[torch.nn.Module, dict[str, torch.Tensor],
                                     Callable[[Mapping[str, Any]], dict[str, Any]]]:
    """``(model, {"inputs_embeds": token table}, to_canonical)`` for ``spec``: a
    :func:`bert_reference` (encoders), :func:`gpt2_reference` or :func:`llama_family_reference`
    (decoders), the table its token embeddings are looked up in, and the map of its parameter
    names to canonical ones.

    Args:
        model_type: the Hugging Face ``model_type`` to build (a checkpoint's, so that a Mistral
            checkpoint is compared against ``MistralForCausalLM`` though its spec is a Llama
            one); default: :func:`xformer.convert.huggingface_model_type`.

    Raises:
        BackendError: no ``transformers`` class expresses ``spec``
            (:func:`xformer.convert.huggingface_expressible`), or the class of
            ``model_type`` cannot.
    """
    if spec.architecture == "encoder":
        model = bert_reference(spec, weights, dtype)
        return model, {"inputs_embeds": model.embeddings.word_embeddings.weight}, bert_to_canonical
    if spec.architecture == "decoder":
        kind = model_type or huggingface_model_type(spec)
        if kind in LLAMA_FAMILY:
            model = llama_family_reference(spec, weights, dtype, kind)
            table = model.get_input_embeddings().weight
            return (model, {"inputs_embeds": table},
                    lambda native: llama_family_to_canonical(spec, native, kind))
        if kind not in (None, "gpt2"):
            raise BackendError(f"the Hugging Face reference has no decoder class for "
                               f"model_type {kind!r}")
        model = gpt2_reference(spec, weights, dtype)
        base = getattr(model, "transformer", model)
        return model, {"inputs_embeds": base.wte.weight}, gpt2_to_canonical
    raise BackendError(f"the Hugging Face reference cannot express this spec: "
                       f"{huggingface_expressible(spec)}")


#: ``TrainConfig.schedule`` -> the ``transformers.optimization`` function a Hugging Face loop
#: calls (the same LambdaLR factors as :func:`xformer.training.lr_factor`).
HF_SCHEDULES = {"constant": "get_constant_schedule_with_warmup",
                "linear": "get_linear_schedule_with_warmup",
                "cosine": "get_cosine_schedule_with_warmup"}


def train_huggingface(spec: ModelSpec, weights: Mapping[str, np.ndarray], data: Any,
                      config: Any, steps: int, dtype: str = "float64",
                      model_type: str | None = None
                      ) -> tuple[dict[str, np.ndarray], list[float]]:
    """The reference of training conformance: a plain Hugging Face training loop that shares
    no code with xformer's backends, for a decoder that :func:`huggingface_reference`
    expresses (``GPT2LMHeadModel``, the Llama family).

    The loop is the one of the ``transformers`` examples (``run_clm_no_trainer.py``):
    ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` over ``model.parameters()`` (two param groups
    when biases and norm weights do not decay), the ``transformers.get_*_schedule_with_warmup``
    scheduler stepped after the optimizer, per micro-batch ``(loss / K).backward()``, then
    ``torch.nn.utils.clip_grad_norm_``, ``optimizer.step()``, ``scheduler.step()``,
    ``optimizer.zero_grad()``. The loss is the causal-LM cross-entropy of ``model(input_ids,
    attention_mask).logits`` (shifted, mean over the labels) computed here with
    ``torch.nn.functional.cross_entropy`` in the model's dtype: ``transformers``' own
    ``ForCausalLMLoss`` upcasts logits to float32 (``logits.float()``), which in a float64 run
    would round the loss and its gradient to float32. Dropout is 0 (the references are built
    without it).

    Args:
        data: token rows (:func:`xformer.training.check_data`). config: a
            :class:`xformer.training.TrainConfig` (``dropout`` ignored). steps: optimizer steps.
    Returns:
        ``(canonical weights after the last step, the loss of every step)``.
    Raises:
        BackendError: the spec is not a decoder Hugging Face expresses.
    """
    from xformer.training import check_data, micro_batches

    if spec.architecture != "decoder":
        raise BackendError("the Hugging Face training reference covers decoders (causal LM)")
    model, _, to_canonical = huggingface_reference(spec, weights, dtype, model_type)
    rows = check_data(spec, data)
    params = list(model.parameters())
    if config.no_decay_bias_and_norm:
        # Hugging Face Trainer.get_decay_parameter_names: no decay for biases and for every
        # parameter of a norm layer (by module class), decided on the Hugging Face model
        norm_params = {id(p) for m in model.modules() if "Norm" in type(m).__name__
                       for p in m.parameters(recurse=False)}
        skip = {id(p) for n, p in model.named_parameters()
                if n.endswith("bias") or id(p) in norm_params}
        groups = [{"params": [p for p in params if id(p) not in skip]},
                  {"params": [p for p in params if id(p) in skip], "weight_decay": 0.0}]
    else:
        groups = [{"params": params}]
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                              nesterov=config.nesterov, weight_decay=config.decay)
    else:
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
        opt = cls(groups, lr=config.lr, betas=config.betas, eps=config.eps,
                  weight_decay=config.decay)
    total = config.total_steps or steps
    make = getattr(transformers, HF_SCHEDULES[config.schedule])
    sched = (make(opt, config.warmup_steps) if config.schedule == "constant"
             else make(opt, config.warmup_steps, total))
    losses = []
    for step in range(steps):
        micro = micro_batches(spec, rows, config, step)
        total_loss = 0.0
        for batch in micro:
            ids = torch.from_numpy(batch["input_ids"])
            out = model(input_ids=ids, attention_mask=torch.from_numpy(batch["attention_mask"]))
            labels = torch.from_numpy(batch["labels"])
            loss = torch.nn.functional.cross_entropy(
                out.logits[:, :-1].reshape(-1, spec.vocab_size), labels[:, 1:].reshape(-1),
                ignore_index=-100)
            (loss / len(micro)).backward()
            total_loss += loss.item() / len(micro)
        if config.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        losses.append(total_loss)
    final = to_canonical({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    return final, losses
