"""Hugging Face checkpoint conversions: BERT import, GPT-2 and Llama-family import and export,
and :func:`from_pretrained` (Hugging Face or xformer directory -> spec and canonical weights).

A Hugging Face model directory holds ``config.json`` and ``model.safetensors``
(``pytorch_model.bin`` is never read: it is a pickle). The conversions map its tensors to and
from the canonical layout of :meth:`ModelSpec.parameters` without changing a single bit
(splits, concatenations and transposes only); dtypes are kept (``float16``, ``float32``,
``float64``), except ``bfloat16``, which numpy cannot hold and which is widened exactly to
``float32``.

* BERT (``model_type: bert``, the upstream ``modeling_bert`` names): :func:`import_bert`.
* GPT-2 (``model_type: gpt2``, the upstream ``modeling_gpt2`` names, as written by
  ``GPT2LMHeadModel.save_pretrained`` / ``GPT2Model.save_pretrained``): :func:`import_gpt2`
  and :func:`export_gpt2`.
* The Llama family (``model_type: llama``, ``mistral``, ``qwen2``, ``gemma``, ``gpt_neox``, the
  upstream ``modeling_<type>`` names of ``<Type>ForCausalLM.save_pretrained``):
  :func:`import_llama_family` and :func:`export_llama_family` (mapping: the section "the Llama
  family" below); :func:`export_huggingface` writes whichever class expresses a decoder.
* Which specs a ``transformers`` class can express, and its config as a plain dict
  (:func:`bert_expressible`, :func:`bert_config_dict`, :func:`gpt2_expressible`,
  :func:`gpt2_config_dict`, :func:`llama_family_expressible`,
  :func:`llama_family_config_dict`, :func:`huggingface_model_type`), for the Hugging Face
  reference of the torch backend (``xformer_torch.reference_hf``). Nothing here imports a
  framework: files are read and written as numpy (:mod:`xformer.weights`), and the name maps
  also take torch tensors.

GPT-2 naming (``transformers/models/gpt2/modeling_gpt2.py``), ``D = n_embd``, ``F = n_inner or
4 D``. GPT-2's ``Conv1D`` stores its weight as ``(in, out)`` and computes ``x W + b``; a canonical
Linear weight is ``(out, in)``, so every ``Conv1D`` weight is transposed. ``attn.c_attn`` fuses
the query, key and value projections along the output axis, in that order::

    wte.weight (V, D)                  -> embeddings.word_embeddings.weight (V, D)
    wpe.weight (n_positions, D)        -> embeddings.position_embeddings.weight (max_len, D)
    h.{i}.ln_1.{weight,bias} (D,)      -> decoder.layers.{i}.norm1.{weight,bias}
    h.{i}.attn.c_attn.weight (D, 3D)   -> decoder.layers.{i}.self_attn.{q,k,v}_proj.weight (D, D)
                                          = c_attn.weight[:, j*D:(j+1)*D].T, j = 0, 1, 2
    h.{i}.attn.c_attn.bias (3D,)       -> decoder.layers.{i}.self_attn.{q,k,v}_proj.bias (D,)
    h.{i}.attn.c_proj.{weight (D, D), bias} -> decoder.layers.{i}.self_attn.out_proj (.T)
    h.{i}.ln_2.{weight,bias}           -> decoder.layers.{i}.norm2.{weight,bias}
    h.{i}.mlp.c_fc.{weight (D, F), bias (F,)}   -> decoder.layers.{i}.ffn.linear1 (weight .T)
    h.{i}.mlp.c_proj.{weight (F, D), bias (D,)} -> decoder.layers.{i}.ffn.linear2 (weight .T)
    ln_f.{weight,bias}                 -> decoder.final_norm.{weight,bias}
    lm_head.weight (V, D)  (untied)    -> lm_head.weight (V, D)  (an nn.Linear: not transposed)

``GPT2LMHeadModel`` prefixes the body with ``transformer.``; ``GPT2Model`` (and the original
OpenAI ``gpt2`` files) do not: both are read, exports use the prefix for ``head = "lm"``.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import CheckpointError, SpecError, truncate
from .resources import read_capped
from .spec import ModelSpec
from .weights import (atomic_write_dir, check_weights, header_tensors, load_pretrained,
                      load_weights, model_header, model_safetensors, read_model,
                      safetensors_bytes, shape_problems)

#: ``model_type`` values of ``config.json`` that :func:`from_pretrained` imports.
SUPPORTED_MODEL_TYPES = ("bert", "gpt2", "llama", "mistral", "qwen2", "gemma", "gpt_neox")


# ---------------------------------------------------------------------- shared
def read_hf_config(root: str | os.PathLike) -> dict[str, Any] | None:
    """``config.json`` of a model directory as a dict, or ``None`` if there is none.

    Raises:
        CheckpointError: the file is not UTF-8 JSON, nests too deeply, holds an unreadable
            number, or is not a JSON object.
        InputError: ``config.json`` is not a regular file, is over 16 MiB or cannot be read
            (permission denied) (:func:`xformer.resources.read_capped`).
    """
    path = Path(root) / "config.json"
    if not os.path.lexists(path):
        return None
    data = read_capped(path, what="config.json")
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start}); save it as UTF-8 "
                              f"JSON") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a config.json") from None
    except ValueError as e:  # an integer over Python's 4300-digit limit
        raise CheckpointError(f"{path} holds a value xformer cannot read "
                              f"({str(e).split(';')[0][:120]})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def from_pretrained(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a model directory, or an xformer checkpoint file, into ``(spec, canonical
    weights)``.

    * Hugging Face directories (``config.json`` + ``model.safetensors``), dispatched on
      ``config.json``'s ``model_type``: ``bert`` (also when ``model_type`` is absent;
      :func:`import_bert`: task heads such as ``cls.*`` dropped, a missing pooler gives
      ``head="none"``), ``gpt2`` (:func:`import_gpt2`) and the Llama family, ``llama``,
      ``mistral``, ``qwen2``, ``gemma`` and ``gpt_neox`` (:func:`import_llama_family`).
    * xformer directories (no ``config.json``, as :func:`xformer.weights.save_pretrained`
      writes them): :func:`xformer.weights.load_pretrained`.
    * an xformer ``.safetensors`` file that stores its spec in its metadata (as ``xformer init
      --out FILE.safetensors`` and :func:`xformer.weights.save_weights` write it):
      :func:`xformer.weights.load_weights`.

    Raises:
        CheckpointError: the directory or a file is missing, an unsupported ``model_type``
            (names the supported ones), specs that disagree, or tensors that do not match.
        SpecError: an unsupported ``config.json`` or a malformed spec file.
    """
    root = Path(path)
    if root.is_file():
        return load_weights(root)
    model_safetensors(root, sharded=True)
    config = read_hf_config(root)
    if config is None:
        return load_pretrained(root)
    model_type = config.get("model_type", "bert")
    if model_type == "bert":
        return import_bert(root, config)
    if model_type == "gpt2":
        return import_gpt2(root, config)
    if model_type in LLAMA_FAMILY:
        return import_llama_family(root, config)
    raise CheckpointError(f"{root / 'config.json'}: model_type {truncate(model_type)} is not "
                          f"supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


def _hf_checkpoint(path: str | os.PathLike, config: Mapping[str, Any] | None
                   ) -> tuple[Path, Path, Mapping[str, Any]]:
    """``(folder, weights file, config)`` of a Hugging Face directory: its ``model.safetensors``
    or shard index (:func:`xformer.weights.model_safetensors`) and ``config`` or its
    ``config.json``.

    Raises:
        CheckpointError: the folder, the weights or ``config.json`` is missing.
    """
    root = Path(path)
    st = model_safetensors(root, sharded=True)
    config = read_hf_config(root) if config is None else config
    if config is None:
        raise CheckpointError(f"{str(root)!r} has no config.json")
    return root, st, config


_REQUIRED = object()


def config_int(config: Mapping[str, Any], key: str, default: Any = _REQUIRED, *,
               low: int = 1, null_ok: bool = False) -> int | None:
    """``config[key]`` as an ``int`` >= ``low`` (a float only if it is integral: ``32.0``,
    never ``32.7``); ``default`` if absent (no default: required); ``None`` kept if
    ``null_ok``.

    Raises:
        SpecError: naming the ``config.json`` key: missing, null, a string, a bool, a
            fraction or below ``low``.
    """
    if key not in config:
        if default is _REQUIRED:
            raise SpecError(f"config.json has no {key!r}; a Hugging Face config gives it (is "
                            f"this the model's config.json?)")
        return default
    value = config[key]
    if value is None and null_ok:
        return None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"config.json {key} = {truncate(value)} is not an integer; give a "
                        f"whole number >= {low}")
    if value < low:
        raise SpecError(f"config.json {key} = {truncate(value)} must be >= {low}")
    return value


def config_float(config: Mapping[str, Any], key: str, default: float) -> float:
    """``config[key]`` (or ``default``) as a finite ``float``.

    Raises:
        SpecError: naming the key: not a number (a string, null, a bool) or not finite.
    """
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpecError(f"config.json {key} = {truncate(value)} is not a number")
    try:
        out = float(value)
    except OverflowError:
        out = float("inf")
    if out != out or out in (float("inf"), float("-inf")):
        raise SpecError(f"config.json {key} = {truncate(value)} is not a finite number")
    return out


# ---------------------------------------------------------------------- Hugging Face BERT
_HF_ACTIVATIONS = {"gelu": "gelu", "gelu_python": "gelu", "relu": "relu", "gelu_new": "gelu_tanh",
                   "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}

_BERT_LAYER_MAP = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "norm1",
    "intermediate.dense": "ffn.linear1",
    "output.dense": "ffn.linear2",
    "output.LayerNorm": "norm2",
}


def spec_from_bert_config(config: Mapping) -> ModelSpec:
    """The spec of a Hugging Face ``BertConfig`` (``config.json``) as a dict.

    Raises:
        SpecError: an unsupported ``hidden_act`` or ``position_embedding_type``; a missing
            size (``hidden_size``, ``num_attention_heads``, ``intermediate_size``,
            ``num_hidden_layers``, ``vocab_size``) or one that is not a whole number (a string,
            null, a bool, ``32.7``), naming the key (:func:`config_int`).
    """
    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in _HF_ACTIVATIONS:
        raise SpecError(f"config.json hidden_act {truncate(act)} is not supported; "
                        f"supported: {', '.join(_HF_ACTIVATIONS)}")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise SpecError(f"config.json position_embedding_type {truncate(pos)} is not supported "
                        f"(only 'absolute')")
    return ModelSpec(
        architecture="encoder", vocab_size=config_int(config, "vocab_size"),
        d_model=config_int(config, "hidden_size"),
        n_heads=config_int(config, "num_attention_heads"),
        d_ff=config_int(config, "intermediate_size"),
        n_layers=config_int(config, "num_hidden_layers"),
        max_len=config_int(config, "max_position_embeddings", 512), norm_position="post",
        norm_eps=config_float(config, "layer_norm_eps", 1e-12), activation=_HF_ACTIVATIONS[act],
        positional="learned", type_vocab_size=config_int(config, "type_vocab_size", 2, low=0),
        embedding_norm=True, final_norm=False, embed_scale=False, bias=True, head="pooler",
    )


def _bert_name(hf_name: str) -> str | None:
    """The canonical name of a ``BertModel`` tensor (``modeling_bert`` naming, with or without
    the ``bert.`` prefix), or ``None`` for heads (``cls.*``) and buffers."""
    name = re.sub(r"^bert\.", "", hf_name)
    name = name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                       "LayerNorm.bias")
    if name.startswith("embeddings."):
        if name == "embeddings.position_ids":
            return None
        return name.replace("embeddings.LayerNorm", "embeddings.norm")
    if name.startswith("pooler."):
        return name
    m = re.match(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m and m.group(2) in _BERT_LAYER_MAP:
        return f"encoder.layers.{m.group(1)}.{_BERT_LAYER_MAP[m.group(2)]}.{m.group(3)}"
    return None  # heads (cls.*) and buffers are not part of the encoder


def bert_to_canonical(native: Mapping[str, Any]) -> dict[str, Any]:
    """``{BertModel parameter name: tensor}`` -> ``{canonical name: tensor}`` (numpy arrays or
    torch tensors, parameters or their gradients; heads and buffers dropped)."""
    return {_bert_name(k): v for k, v in native.items() if _bert_name(k) is not None}


_BERT_EXPORT_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu"}


def bert_expressible(spec: ModelSpec) -> str | None:
    """``None`` if ``transformers.BertModel`` can express ``spec`` exactly, else the reason."""
    checks = [
        (spec.architecture == "encoder", "BertModel is an encoder"),
        (spec.norm_position == "post", "BertModel is post-LN"),
        (spec.positional == "learned", "BertModel has learned positions"),
        (spec.embedding_norm, "BertModel always normalises embeddings"),
        (not spec.final_norm, "BertModel has no final norm"),
        (not spec.embed_scale, "BertModel does not scale embeddings"),
        (spec.bias, "BertModel always has biases"),
        (spec.type_vocab_size > 0, "BertModel needs type_vocab_size >= 1"),
        *classic_transformer_checks(spec, "BertModel"),
    ]
    return next((why for ok, why in checks if not ok), None)


def classic_transformer_checks(spec: ModelSpec, who: str) -> list[tuple[bool, str]]:
    """``(ok, reason)`` for the spec fields of issue #9 that a 2017-2019 Transformer class
    (``BertModel``, GPT-2, ``nn.TransformerEncoderLayer``: ``who`` names it) cannot express:
    LayerNorm only (no RMSNorm, no ``1 + weight`` scale), a two-layer MLP with gelu /
    gelu_tanh / relu, multi-head attention with heads of ``d_model / n_heads``, every Linear
    biased as ``bias`` says, sequential sub-layers. Plain Python: no framework is imported."""
    switch = next((f"{p}_bias" for p in ("qkv", "out_proj", "mlp")
                   if spec.has_bias(p) != spec.bias), None)
    return [
        (spec.norm == "layernorm",
         f"spec field 'norm' is {spec.norm!r}; {who} has LayerNorm ('layernorm')"),
        (spec.norm_scale_offset == 0.0,
         f"spec field 'norm_scale_offset' is {spec.norm_scale_offset}; {who}'s LayerNorm "
         f"multiplies by its weight (0.0)"),
        (spec.ffn == "mlp", f"spec field 'ffn' is {spec.ffn!r}; {who} has a two-layer MLP "
                            f"('mlp')"),
        (spec.activation != "silu",
         f"spec field 'activation' is 'silu'; {who} is exported with gelu, gelu_tanh or relu"),
        (spec.kv_heads == spec.n_heads,
         f"spec field 'n_kv_heads' is {spec.n_kv_heads}; {who} has multi-head attention "
         f"(n_kv_heads = n_heads = {spec.n_heads})"),
        (spec.d_head * spec.n_heads == spec.d_model,
         f"spec field 'head_dim' is {spec.head_dim}; {who}'s heads are d_model / n_heads"),
        (switch is None, f"spec field {switch!r} is {getattr(spec, switch or 'bias')} and "
                         f"'bias' is {spec.bias}; {who} has a bias in every Linear or in none"),
        (not spec.parallel_residual,
         f"spec field 'parallel_residual' is true; {who}'s sub-layers are sequential"),
    ]


def bert_config_dict(spec: ModelSpec) -> dict[str, Any]:
    """The ``transformers.BertConfig`` keyword arguments of ``spec``: no dropout, eager
    attention (``BertConfig(**bert_config_dict(spec))``).

    Raises:
        SpecError: ``spec`` is not BERT-expressible (:func:`bert_expressible`).
    """
    why = bert_expressible(spec)
    if why:
        raise SpecError(f"cannot express this spec as BERT: {why}")
    return dict(vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                intermediate_size=spec.d_ff, hidden_act=_BERT_EXPORT_ACTIVATION[spec.activation],
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=spec.max_len, type_vocab_size=spec.type_vocab_size,
                layer_norm_eps=spec.norm_eps, attn_implementation="eager")


def import_bert(path: str | os.PathLike, config: Mapping | None = None
                ) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a Hugging Face BERT directory (``config.json`` + ``model.safetensors``) into
    ``(spec, canonical weights)``. Task heads such as ``cls.*`` are dropped; a missing pooler
    gives ``head="none"``. Weights other than float64 are cast to float32.

    Raises:
        CheckpointError: a file is missing or the tensors do not match the config.
        SpecError: an unsupported ``config.json``.
    """
    root, st, config = _hf_checkpoint(path, config)
    spec = spec_from_bert_config(config)
    # names and shapes from the header first: a file claiming other tensors is refused unread
    shapes = {n: t for k, t in header_tensors(model_header(st)).items()
              if (n := _bert_name(k)) is not None}
    if "pooler.dense.weight" not in shapes:
        spec = spec.replace(head="none")
    check_weights(spec, shapes, source=f"tensors in {st}")
    weights = {}
    for hf_name, arr in read_model(st).items():
        name = _bert_name(hf_name)
        if name is not None:
            weights[name] = arr.astype(np.float32) if arr.dtype != np.float64 else arr
    if "pooler.dense.weight" not in weights:
        spec = spec.replace(head="none")
    return spec, check_weights(spec, weights, source=f"tensors in {st}")


# ---------------------------------------------------------------------- Hugging Face GPT-2
#: ``activation_function`` values and their spec activation. ``gelu_new`` / ``gelu_fast`` /
#: ``gelu_pytorch_tanh`` are all the tanh approximation (different float rounding only).
GPT2_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                    "gelu_fast": "gelu_tanh", "gelu": "gelu", "gelu_python": "gelu",
                    "relu": "relu"}
_GPT2_EXPORT_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}

#: GPT2Config defaults (``configuration_gpt2.py``) for keys a ``config.json`` may leave out.
GPT2_CONFIG_DEFAULTS = dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12,
                            n_head=12, n_inner=None, activation_function="gelu_new",
                            resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                            layer_norm_epsilon=1e-5, scale_attn_weights=True,
                            scale_attn_by_inverse_layer_idx=False,
                            reorder_and_upcast_attn=False, add_cross_attention=False,
                            tie_word_embeddings=True, bos_token_id=50256, eos_token_id=50256)

#: Per-layer modules: GPT-2 name -> canonical name (``c_attn`` is split, not listed).
GPT2_LAYER_MAP = {"ln_1": "norm1", "attn.c_proj": "self_attn.out_proj", "ln_2": "norm2",
                  "mlp.c_fc": "ffn.linear1", "mlp.c_proj": "ffn.linear2"}
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
#: Non-parameter buffers of old ``GPT2Model`` checkpoints (the causal mask), skipped.
_GPT2_BUFFER = re.compile(r"^h\.\d+\.(attn|crossattention)\.(bias|masked_bias)$")
#: Heads of the other GPT-2 task classes (sequence / token classification, QA, double heads).
_GPT2_TASK_HEADS = ("score.", "classifier.", "qa_outputs.", "multiple_choice_head.")


def gpt2_expressible(spec: ModelSpec) -> str | None:
    """``None`` if ``GPT2LMHeadModel`` (``head="lm"``) or ``GPT2Model`` (``head="none"``) can
    express ``spec`` exactly, else the reason, naming the spec field."""
    checks = [
        (spec.architecture == "decoder",
         f"spec field 'architecture' is {spec.architecture!r}; GPT-2 is a 'decoder'"),
        (spec.norm_position == "pre",
         f"spec field 'norm_position' is {spec.norm_position!r}; GPT-2 is pre-LN ('pre')"),
        (spec.positional == "learned",
         f"spec field 'positional' is {spec.positional!r}; GPT-2 has 'learned' positions"),
        (not spec.embedding_norm, "spec field 'embedding_norm' is true; GPT-2 has no "
                                  "embedding LayerNorm"),
        (spec.final_norm, "spec field 'final_norm' is false; GPT-2 always has ln_f"),
        (not spec.embed_scale, "spec field 'embed_scale' is true; GPT-2 does not scale "
                               "embeddings"),
        (spec.bias, "spec field 'bias' is false; GPT-2 has biases in every Conv1D and "
                    "LayerNorm"),
        (spec.type_vocab_size == 0, "spec field 'type_vocab_size' must be 0 for GPT-2"),
        (spec.head in ("lm", "none"), f"spec field 'head' is {spec.head!r}; GPT-2 takes 'lm' "
                                      f"(GPT2LMHeadModel) or 'none' (GPT2Model)"),
        *classic_transformer_checks(spec, "GPT-2"),
    ]
    return next((why for ok, why in checks if not ok), None)


def huggingface_expressible(spec: ModelSpec) -> str | None:
    """``None`` if a ``transformers`` model class can express ``spec``: ``BertModel`` for
    encoders (:func:`bert_expressible`); for decoders ``GPT2LMHeadModel`` / ``GPT2Model``
    (:func:`gpt2_expressible`) or a Llama-family causal LM (:func:`llama_family_expressible`,
    the class :func:`huggingface_model_type` picks); else the reason, from the class closest to
    ``spec`` (learned positions: GPT-2; rotary with LayerNorm: GPT-NeoX; with RMSNorm: Gemma if
    ``norm_scale_offset`` is 1, else Qwen2 for its bias pattern, else Llama)."""
    if spec.architecture == "encoder":
        return bert_expressible(spec)
    if spec.architecture == "decoder":
        if huggingface_model_type(spec) is not None:
            return None
        if spec.positional != "rope":
            return gpt2_expressible(spec)
        if spec.norm == "layernorm":
            return llama_family_expressible(spec, "gpt_neox")
        if spec.norm_scale_offset:
            return llama_family_expressible(spec, "gemma")
        if spec.has_bias("qkv") and not spec.has_bias("out_proj"):
            return llama_family_expressible(spec, "qwen2")
        return llama_family_expressible(spec, "llama")
    return "no Hugging Face model class for encoder-decoders here (use torch.nn)"


def huggingface_model_type(spec: ModelSpec) -> str | None:
    """The ``model_type`` of the ``transformers`` class that expresses ``spec`` exactly:
    ``"bert"`` (encoders, :func:`bert_expressible`); for decoders ``"gpt2"``, else the first
    Llama-family type of ``"llama"``, ``"qwen2"``, ``"gemma"``, ``"gpt_neox"``, ``"mistral"``
    that can (:func:`llama_family_expressible`; Mistral only when Llama cannot: it is a bias-free
    Llama whose config does not require ``d_model % n_heads == 0``); ``None`` if none can."""
    if spec.architecture == "encoder":
        return "bert" if bert_expressible(spec) is None else None
    if spec.architecture != "decoder":
        return None
    if gpt2_expressible(spec) is None:
        return "gpt2"
    return next((t for t in ("llama", "qwen2", "gemma", "gpt_neox", "mistral")
                 if llama_family_expressible(spec, t) is None), None)


def spec_from_gpt2_config(config: Mapping[str, Any], head: str = "lm") -> ModelSpec:
    """The spec of a Hugging Face ``GPT2Config`` (``config.json``; absent keys take the
    ``GPT2Config`` defaults, :data:`GPT2_CONFIG_DEFAULTS`).

    ``d_ff = n_inner or 4 * n_embd``; ``max_len = n_positions``; ``norm_eps =
    layer_norm_epsilon``; ``tie_embeddings = tie_word_embeddings`` (with ``head="lm"``);
    ``dropout = resid_pdrop`` (xformer has one rate; ``embd_pdrop`` and ``attn_pdrop`` are not
    represented: they matter in training mode only). ``reorder_and_upcast_attn`` is accepted and
    dropped: it only reorders the float32 score computation (scale before the matmul, upcast
    under fp16 autocast), the same function up to rounding.

    Raises:
        SpecError: naming the ``config.json`` key: ``scale_attn_weights`` false (xformer always
            divides scores by ``sqrt(d_head)``), ``scale_attn_by_inverse_layer_idx`` true,
            ``add_cross_attention`` true, an unsupported ``activation_function``, or a
            ``bos_token_id`` / ``eos_token_id`` that is not an integer or null.

    Warns:
        UserWarning: a ``bos_token_id`` / ``eos_token_id`` outside ``[0, vocab_size)`` (what
            ``GPT2Config(vocab_size=...)`` writes by default: 50256), which Hugging Face
            accepts: the model can never produce it, so it is dropped to ``None``.
    """
    cfg = {**GPT2_CONFIG_DEFAULTS, **{k: v for k, v in config.items()
                                      if k in GPT2_CONFIG_DEFAULTS}}
    if cfg["scale_attn_weights"] is not True:
        raise SpecError("config.json scale_attn_weights = false is not supported (xformer "
                        "always scales attention scores by 1/sqrt(d_head))")
    if cfg["scale_attn_by_inverse_layer_idx"]:
        raise SpecError("config.json scale_attn_by_inverse_layer_idx = true is not supported "
                        "(xformer scales every layer's scores by 1/sqrt(d_head) only)")
    if cfg["add_cross_attention"]:
        raise SpecError("config.json add_cross_attention = true is not supported (a GPT-2 "
                        "with cross-attention is not a decoder-only model)")
    act = cfg["activation_function"]
    if not isinstance(act, str) or act not in GPT2_ACTIVATIONS:
        raise SpecError(f"config.json activation_function {truncate(act)} is not supported; "
                        f"supported: {', '.join(GPT2_ACTIVATIONS)}")
    vocab = config_int(cfg, "vocab_size")
    for key in ("bos_token_id", "eos_token_id"):
        # GPT2Config(vocab_size=...) keeps the default 50256, outside a small vocabulary:
        # dropped with a warning (:func:`_family_token_id`)
        cfg[key] = _family_token_id(cfg, key, vocab)
    d = config_int(cfg, "n_embd")
    inner = config_int(cfg, "n_inner", null_ok=True)
    return ModelSpec(
        architecture="decoder", vocab_size=vocab, d_model=d, n_heads=config_int(cfg, "n_head"),
        d_ff=inner or 4 * d, n_layers=config_int(cfg, "n_layer"),
        max_len=config_int(cfg, "n_positions"), norm_position="pre",
        norm_eps=config_float(cfg, "layer_norm_epsilon", 1e-5), activation=GPT2_ACTIVATIONS[act],
        positional="learned", type_vocab_size=0, embedding_norm=False, final_norm=True,
        embed_scale=False, bias=True, head=head,
        tie_embeddings=head == "lm" and bool(cfg["tie_word_embeddings"]),
        dropout=config_float(cfg, "resid_pdrop", 0.1), bos_token_id=cfg["bos_token_id"],
        eos_token_id=cfg["eos_token_id"],
    )


def gpt2_config_dict(spec: ModelSpec, dtype: str | None = "float32") -> dict[str, Any]:
    """The ``config.json`` of ``spec`` as ``GPT2LMHeadModel`` / ``GPT2Model.save_pretrained``
    write it (keys sorted; ``summary_*`` and ``initializer_range`` keys of the double-heads
    model left to their defaults). Every pdrop is ``spec.dropout``.

    Raises:
        SpecError: ``spec`` is not GPT-2-expressible (:func:`gpt2_expressible`).
    """
    why = gpt2_expressible(spec)
    if why:
        raise SpecError(f"cannot express this spec as GPT-2: {why}")
    config: dict[str, Any] = {
        "activation_function": _GPT2_EXPORT_ACTIVATION[spec.activation],
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel" if spec.head == "lm" else "GPT2Model"],
        "attn_pdrop": spec.dropout,
        "bos_token_id": spec.bos_token_id,
        "embd_pdrop": spec.dropout,
        "eos_token_id": spec.eos_token_id,
        "initializer_range": 0.02,
        "layer_norm_epsilon": spec.norm_eps,
        "model_type": "gpt2",
        "n_embd": spec.d_model,
        "n_head": spec.n_heads,
        "n_inner": None if spec.d_ff == 4 * spec.d_model else spec.d_ff,
        "n_layer": spec.n_layers,
        "n_positions": spec.max_len,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": spec.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": True,
        "tie_word_embeddings": spec.tie_embeddings or spec.head == "none",
        "use_cache": True,
        "vocab_size": spec.vocab_size,
    }
    if dtype is not None:
        config["dtype"] = dtype
    return dict(sorted(config.items()))


def gpt2_tensor_shapes(spec: ModelSpec, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """``{GPT-2 tensor name: shape}`` of ``spec`` in the ``modeling_gpt2`` naming; the body
    carries ``prefix`` (``"transformer."`` for ``GPT2LMHeadModel``), ``lm_head.weight`` is
    listed only for an untied LM head."""
    d, f = spec.d_model, spec.d_ff
    shapes = {"wte.weight": (spec.vocab_size, d), "wpe.weight": (spec.max_len, d)}
    for i in range(spec.n_layers):
        p = f"h.{i}"
        shapes.update({f"{p}.ln_1.weight": (d,), f"{p}.ln_1.bias": (d,),
                       f"{p}.attn.c_attn.weight": (d, 3 * d), f"{p}.attn.c_attn.bias": (3 * d,),
                       f"{p}.attn.c_proj.weight": (d, d), f"{p}.attn.c_proj.bias": (d,),
                       f"{p}.ln_2.weight": (d,), f"{p}.ln_2.bias": (d,),
                       f"{p}.mlp.c_fc.weight": (d, f), f"{p}.mlp.c_fc.bias": (f,),
                       f"{p}.mlp.c_proj.weight": (f, d), f"{p}.mlp.c_proj.bias": (d,)})
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    out = {prefix + k: v for k, v in shapes.items()}
    if spec.head == "lm" and not spec.tie_embeddings:
        out["lm_head.weight"] = (spec.vocab_size, d)
    return out


def _contiguous(x):
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x)
    return x.contiguous() if hasattr(x, "contiguous") else x


def gpt2_names_to_canonical(tensors: Mapping[str, Any]) -> dict[str, Any]:
    """``{GPT-2 name: tensor}`` -> ``{canonical name: tensor}`` for numpy arrays or torch
    tensors (parameters or their gradients: the mapping is linear): ``transformer.`` prefixes
    stripped, ``c_attn`` split into q/k/v, ``Conv1D`` weights transposed (contiguous results).
    Names that are not GPT-2 parameters are dropped; ``lm_head.weight`` is kept as is."""
    out: dict[str, Any] = {}
    for hf_name, value in tensors.items():
        name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
        if name == "wte.weight":
            out["embeddings.word_embeddings.weight"] = value
        elif name == "wpe.weight":
            out["embeddings.position_embeddings.weight"] = value
        elif name in ("ln_f.weight", "ln_f.bias"):
            out[f"decoder.final_norm.{name[5:]}"] = value
        elif name == "lm_head.weight":
            out["lm_head.weight"] = value
        else:
            m = re.match(r"h\.(\d+)\.(.+)\.(weight|bias)$", name)
            if not m:
                continue
            i, module, kind = m.groups()
            p = f"decoder.layers.{i}"
            if module == "attn.c_attn":
                d = value.shape[-1] // 3
                for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    part = value[..., j * d:(j + 1) * d]
                    out[f"{p}.self_attn.{proj}.{kind}"] = _contiguous(
                        part.T if kind == "weight" else part)
            elif module in GPT2_LAYER_MAP:
                conv = module in _GPT2_CONV1D and kind == "weight"
                out[f"{p}.{GPT2_LAYER_MAP[module]}.{kind}"] = (
                    _contiguous(value.T) if conv else value)
    return out


def gpt2_to_canonical(native: Mapping[str, Any]) -> dict[str, Any]:
    """``{GPT-2 parameter name: tensor}`` -> ``{canonical name: tensor}`` for a model's
    parameters or their gradients (torch tensors or numpy arrays), names with or without
    ``transformer.`` (:func:`gpt2_names_to_canonical`), and an ``lm_head.weight`` that shares
    memory with ``wte.weight`` dropped (a tied ``state_dict()``; ``named_parameters()`` lists it
    once)."""
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
    try:  # torch tensors, without importing torch
        return a.data_ptr() == b.data_ptr() and a.shape == b.shape
    except AttributeError:
        return False


def canonical_to_gpt2(spec: ModelSpec, weights: Mapping[str, np.ndarray], prefix: str = ""
                      ) -> dict[str, np.ndarray]:
    """Canonical numpy weights -> ``{GPT-2 name: array}`` (:func:`gpt2_tensor_shapes` order),
    the exact inverse of :func:`gpt2_names_to_canonical` (bit for bit, dtypes kept)."""
    w = weights
    out: dict[str, np.ndarray] = {}
    for name in gpt2_tensor_shapes(spec):
        if name == "wte.weight":
            arr = w["embeddings.word_embeddings.weight"]
        elif name == "wpe.weight":
            arr = w["embeddings.position_embeddings.weight"]
        elif name.startswith("ln_f."):
            arr = w[f"decoder.final_norm.{name[5:]}"]
        elif name == "lm_head.weight":
            out[name] = np.ascontiguousarray(w["lm_head.weight"])
            continue
        else:
            i, module, kind = re.match(r"h\.(\d+)\.(.+)\.(weight|bias)$", name).groups()
            p = f"decoder.layers.{i}"
            if module == "attn.c_attn":
                parts = [w[f"{p}.self_attn.{proj}.{kind}"] for proj in ("q_proj", "k_proj",
                                                                         "v_proj")]
                arr = (np.concatenate([x.T for x in parts], axis=1) if kind == "weight"
                       else np.concatenate(parts))
            else:
                arr = w[f"{p}.{GPT2_LAYER_MAP[module]}.{kind}"]
                if module in _GPT2_CONV1D and kind == "weight":
                    arr = arr.T
        out[prefix + name] = np.ascontiguousarray(arr)
    return out


def _strip_gpt2_names(raw: Mapping[str, np.ndarray], st: Path) -> dict[str, np.ndarray]:
    """Drop buffers and task heads, strip ``transformer.``; duplicates are an error."""
    out: dict[str, np.ndarray] = {}
    for hf_name, arr in raw.items():
        name = hf_name[len("transformer."):] if hf_name.startswith("transformer.") else hf_name
        if _GPT2_BUFFER.match(name) or name.startswith(_GPT2_TASK_HEADS):
            continue
        if name in out:
            raise CheckpointError(f"tensors in {st}: {name!r} appears both with and without "
                                  f"the 'transformer.' prefix")
        out[name] = arr
    return out


def import_gpt2(path: str | os.PathLike, config: Mapping[str, Any] | None = None
                ) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a Hugging Face GPT-2 directory into ``(spec, canonical weights)``.

    Args:
        path: a directory with ``config.json`` (``model_type: gpt2``) and ``model.safetensors``
            as ``GPT2LMHeadModel.save_pretrained`` (names ``transformer.*``, ``lm_head.weight``
            only if untied) or ``GPT2Model.save_pretrained`` / the OpenAI ``gpt2`` files (no
            prefix) write them. Names follow ``modeling_gpt2`` (see the module docstring for
            the mapping); the causal-mask buffers ``h.{i}.attn.bias`` / ``masked_bias`` and the
            heads of the other GPT-2 task classes (``score``, ``classifier``, ``qa_outputs``,
            ``multiple_choice_head``) are skipped.
        config: the parsed ``config.json`` (read from ``path`` if not given).

    Returns:
        ``(spec, weights)``: ``spec`` from :func:`spec_from_gpt2_config`; ``head="lm"``, tied
        when ``tie_word_embeddings`` (default true; a stored ``lm_head.weight`` is then ignored,
        as ``GPT2LMHeadModel`` ties it to ``wte`` on load), except ``head="none"`` for a
        ``GPT2Model`` directory (``architectures: ["GPT2Model"]``, no ``lm_head.weight``).
        ``weights`` maps every canonical name to a numpy array in the stored dtype
        (``bfloat16`` widened exactly to ``float32``).

    Raises:
        CheckpointError: a file is missing, ``model_type`` is not ``gpt2``, an untied config
            without ``lm_head.weight``, or missing / unexpected / mis-shaped tensors (all
            listed in one line, in GPT-2 names).
        SpecError: an unsupported ``config.json`` (names the key).
    """
    root, st, config = _hf_checkpoint(path, config)
    if config.get("model_type") != "gpt2":
        raise CheckpointError(f"{root / 'config.json'}: model_type "
                              f"{truncate(config.get('model_type'))} is not a GPT-2 ('gpt2')")
    # names and shapes from the header first: a file claiming other tensors is refused unread
    raw = _strip_gpt2_names(header_tensors(model_header(st)), st)
    has_head = "lm_head.weight" in raw
    tied = bool(config.get("tie_word_embeddings", True))
    archs = config.get("architectures") or []
    head = "none" if (not has_head and "GPT2Model" in archs) else "lm"
    if head == "lm" and not tied and not has_head:
        raise CheckpointError(f"tensors in {st}: tie_word_embeddings is false but "
                              f"lm_head.weight is missing")
    if tied and has_head:
        del raw["lm_head.weight"]  # GPT2LMHeadModel ties it to wte on load
    spec = spec_from_gpt2_config(config, head=head)
    details: list[str] = []
    problems = shape_problems(gpt2_tensor_shapes(spec), raw, extra_word="unexpected",
                              details=details)
    if problems:
        raise CheckpointError(f"tensors in {st} do not match its config.json (GPT-2 names): "
                              + "; ".join(problems), details=details)
    raw = _strip_gpt2_names(read_model(st), st)
    if tied and has_head:
        del raw["lm_head.weight"]
    weights = gpt2_names_to_canonical(raw)
    return spec, check_weights(spec, weights, source=f"tensors in {st}")


def export_gpt2(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, np.ndarray]
                ) -> None:
    """Write ``spec`` and canonical ``weights`` as a Hugging Face GPT-2 directory that
    ``GPT2LMHeadModel.from_pretrained`` (``head="lm"``) or ``GPT2Model.from_pretrained``
    (``head="none"``) loads: ``config.json`` (:func:`gpt2_config_dict`) and
    ``model.safetensors`` (metadata ``{"format": "pt"}``; names as ``save_pretrained`` writes
    them: ``transformer.*`` + ``lm_head.weight`` if untied for ``head="lm"``, unprefixed for
    ``head="none"``; each tensor in its canonical dtype, bit for bit). No
    ``generation_config.json`` and no tokenizer are written.

    Atomic: both files are written into a temporary sibling directory that is then renamed to
    ``path``; an existing ``path`` is replaced only if it holds nothing but those two files.

    Raises:
        SpecError: ``spec`` is not GPT-2-expressible (names the field).
        CheckpointError: ``weights`` do not match ``spec`` (all problems listed), or ``path``
            exists and is not such a directory.
    """
    config = gpt2_config_dict(spec, dtype=None)  # raises SpecError first
    weights = check_weights(spec, weights)
    config["dtype"] = str(weights[spec.word_embedding_name()].dtype)
    config = dict(sorted(config.items()))
    prefix = "transformer." if spec.head == "lm" else ""
    tensors = canonical_to_gpt2(spec, weights, prefix=prefix)
    atomic_write_dir(Path(path), {
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "model.safetensors": safetensors_bytes(tensors, {"format": "pt"}),
    })


def export_huggingface(path: str | os.PathLike, spec: ModelSpec,
                       weights: Mapping[str, np.ndarray], model_type: str | None = None) -> None:
    """Write a decoder as the Hugging Face directory of ``model_type`` (default: the class that
    expresses ``spec``, :func:`huggingface_model_type`): :func:`export_gpt2` for ``"gpt2"``,
    :func:`export_llama_family` for the Llama family.

    Raises:
        SpecError: no Hugging Face decoder class expresses ``spec`` (the reason names the spec
            field), or ``model_type`` is not one of ``gpt2`` and :data:`LLAMA_FAMILY`.
        CheckpointError: as :func:`export_gpt2` / :func:`export_llama_family`.
    """
    kind = model_type or huggingface_model_type(spec)
    if kind == "gpt2":
        return export_gpt2(path, spec, weights)
    if kind is None or kind == "bert":
        why = huggingface_expressible(spec) or "no Hugging Face decoder export for encoders"
        raise SpecError(f"cannot export this spec to Hugging Face: {why}")
    return export_llama_family(path, spec, weights, model_type=kind)


def checkpoint_model_type(path: str | os.PathLike) -> str | None:
    """The Hugging Face ``model_type`` of a model directory (its ``config.json``; ``"bert"``
    when the key is absent, as :func:`from_pretrained` reads it), or ``None`` for a file or an
    xformer directory (no ``config.json``).

    Raises:
        CheckpointError, InputError: an unreadable ``config.json`` (:func:`read_hf_config`).
    """
    root = Path(path)
    if not root.is_dir():
        return None
    config = read_hf_config(root)
    return None if config is None else config.get("model_type", "bert")


# ---------------------------------------------------------------------- the Llama family
# Llama, Mistral, Qwen2 and Gemma (transformers/models/<type>/modeling_<type>.py) share one
# layout, ``D = hidden_size``, ``F = intermediate_size``, ``dh = head_dim``, ``H`` query and
# ``Hkv`` key/value heads; every Linear is an ``nn.Linear`` ``(out, in)``, as canonical:
#
#     model.embed_tokens.weight (V, D)                  -> embeddings.word_embeddings.weight
#     model.layers.{i}.input_layernorm.weight (D,)      -> decoder.layers.{i}.norm1.weight
#     model.layers.{i}.self_attn.q_proj (H dh, D)       -> decoder.layers.{i}.self_attn.q_proj
#     model.layers.{i}.self_attn.{k,v}_proj (Hkv dh, D) -> decoder.layers.{i}.self_attn.{k,v}_proj
#     model.layers.{i}.self_attn.o_proj (D, H dh)       -> decoder.layers.{i}.self_attn.out_proj
#     model.layers.{i}.post_attention_layernorm.weight  -> decoder.layers.{i}.norm2.weight
#     model.layers.{i}.mlp.{gate,up}_proj (F, D)        -> decoder.layers.{i}.ffn.{gate,up}_proj
#     model.layers.{i}.mlp.down_proj (D, F)             -> decoder.layers.{i}.ffn.down_proj
#     model.norm.weight (D,)                            -> decoder.final_norm.weight
#     lm_head.weight (V, D) (untied)                    -> lm_head.weight
#
# (``.bias`` alongside where the config gives biases.) GPT-NeoX (modeling_gpt_neox.py):
#
#     gpt_neox.embed_in.weight                          -> embeddings.word_embeddings.weight
#     gpt_neox.layers.{i}.input_layernorm.{weight,bias} -> decoder.layers.{i}.norm1
#     gpt_neox.layers.{i}.attention.query_key_value (3D, D), (3D,)
#         -> self_attn.{q,k,v}_proj: per head [q | k | v]: W.view(H, 3, dh, D)[:, j]
#            .reshape(H dh, D), j = 0, 1, 2 (GPTNeoXAttention: .view(..., H, 3 dh).chunk(3))
#     gpt_neox.layers.{i}.attention.dense               -> decoder.layers.{i}.self_attn.out_proj
#     gpt_neox.layers.{i}.post_attention_layernorm      -> decoder.layers.{i}.norm2
#     gpt_neox.layers.{i}.mlp.dense_h_to_4h (F, D)      -> decoder.layers.{i}.ffn.linear1
#     gpt_neox.layers.{i}.mlp.dense_4h_to_h (D, F)      -> decoder.layers.{i}.ffn.linear2
#     gpt_neox.final_layer_norm.{weight,bias}           -> decoder.final_norm
#     embed_out.weight (file; the module is lm_head)    -> lm_head.weight

#: ``model_type`` -> the ``transformers`` causal-LM class of a Llama-family directory.
LLAMA_FAMILY_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                        "qwen2": "Qwen2ForCausalLM", "gemma": "GemmaForCausalLM",
                        "gpt_neox": "GPTNeoXForCausalLM"}
#: ``model_type`` -> its ``transformers`` config class.
LLAMA_FAMILY_CONFIGS = {"llama": "LlamaConfig", "mistral": "MistralConfig",
                        "qwen2": "Qwen2Config", "gemma": "GemmaConfig",
                        "gpt_neox": "GPTNeoXConfig"}
#: The Llama-family ``model_type`` values.
LLAMA_FAMILY = tuple(LLAMA_FAMILY_CLASSES)

#: The defaults of each config class (transformers 5, ``configuration_<type>.py``) for the keys
#: a ``config.json`` may leave out. (Qwen2's and Gemma's ``num_key_value_heads`` default to
#: 32 and 16, not to ``num_attention_heads``; Gemma's ``head_dim`` to 256; Mistral's
#: ``sliding_window`` to 4096.)
LLAMA_FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu",
                  max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  attention_bias=False, mlp_bias=False, attention_dropout=0.0, bos_token_id=1,
                  eos_token_id=2),
    "mistral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu",
                    max_position_embeddings=131072, rms_norm_eps=1e-6,
                    tie_word_embeddings=False, sliding_window=4096, attention_dropout=0.0,
                    bos_token_id=1, eos_token_id=2),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, hidden_act="silu",
                  max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  use_sliding_window=False, sliding_window=4096, max_window_layers=28,
                  attention_dropout=0.0, bos_token_id=None, eos_token_id=None),
    "gemma": dict(num_key_value_heads=16, head_dim=256, hidden_act="gelu_pytorch_tanh",
                  max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  attention_bias=False, attention_dropout=0.0, bos_token_id=2,
                  eos_token_id=1),
    "gpt_neox": dict(hidden_act="gelu", max_position_embeddings=2048, layer_norm_eps=1e-5,
                     tie_word_embeddings=False, use_parallel_residual=True,
                     attention_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
                     bos_token_id=0, eos_token_id=2),
}

#: ``hidden_act`` values (``transformers.activations.ACT2CLS``) and their spec activation:
#: each is the exact formula of the spec's (``gelu_fast``, ``quick_gelu`` and
#: ``gelu_accurate`` are other functions or other constants, and are refused). Gemma maps
#: ``"gelu"`` to the tanh form, as ``GemmaConfig`` does.
LLAMA_FAMILY_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu",
                            "gelu_python": "gelu", "gelu_new": "gelu_tanh",
                            "gelu_pytorch_tanh": "gelu_tanh", "gelu_python_tanh": "gelu_tanh",
                            "relu": "relu"}
_FAMILY_EXPORT_ACTIVATION = {"silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh",
                             "relu": "relu"}

#: Config keys of other architectures (Gemma 2, Cohere, ...) that these classes ignore:
#: refused when set, since the checkpoint then expects numbers these classes do not compute.
_FOREIGN_KEYS = ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                 "logit_scale", "use_qk_norm", "qk_layernorm", "residual_multiplier",
                 "embedding_multiplier", "attention_multiplier", "logits_scaling")

_LLAMA_LAYER_MAP = {"input_layernorm": "norm1", "self_attn.q_proj": "self_attn.q_proj",
                    "self_attn.k_proj": "self_attn.k_proj", "self_attn.v_proj": "self_attn.v_proj",
                    "self_attn.o_proj": "self_attn.out_proj",
                    "post_attention_layernorm": "norm2", "mlp.gate_proj": "ffn.gate_proj",
                    "mlp.up_proj": "ffn.up_proj", "mlp.down_proj": "ffn.down_proj"}
_NEOX_LAYER_MAP = {"input_layernorm": "norm1", "attention.dense": "self_attn.out_proj",
                   "post_attention_layernorm": "norm2", "mlp.dense_h_to_4h": "ffn.linear1",
                   "mlp.dense_4h_to_h": "ffn.linear2"}
_QKV = ("q_proj", "k_proj", "v_proj")
#: Buffers of older Llama-family files (rotary tables, GPT-NeoX causal masks), skipped as
#: ``transformers`` skips them.
_FAMILY_BUFFER = re.compile(r"(^|\.)rotary_emb\.inv_freq$|"
                            r"^gpt_neox\.layers\.\d+\.attention\.(bias|masked_bias)$")


def _family(model_type: str) -> tuple[str, str, str, dict[str, str]]:
    """``(prefix, embedding module, final norm module, layer map)`` of a family."""
    if model_type == "gpt_neox":
        return "gpt_neox.", "embed_in", "final_layer_norm", _NEOX_LAYER_MAP
    return "model.", "embed_tokens", "norm", _LLAMA_LAYER_MAP


def _check_family(model_type: Any) -> str:
    if model_type not in LLAMA_FAMILY:
        raise SpecError(f"model_type {truncate(model_type)} is not a Llama-family type; "
                        f"supported: {', '.join(LLAMA_FAMILY)}")
    return model_type


#: ``rope_type: llama3`` keys -> spec fields (Llama 3.1 / 3.2 frequency scaling).
_LLAMA3_KEYS = {"factor": "rope_scaling_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_len"}


def _rope_config(cfg: Mapping[str, Any], model_type: str
                 ) -> tuple[float, float, str, dict[str, Any]]:
    """``(rope_theta, rotary_fraction, the key that gave the fraction, scaling fields)`` of a
    config, from ``rope_parameters`` (transformers 5) and ``rope_scaling`` (transformers 4),
    each ``{"rope_type": "default" | "llama3", "rope_theta": ..., "partial_rotary_factor": ...}``
    (``llama3`` also ``factor``, ``low_freq_factor``, ``high_freq_factor``,
    ``original_max_position_embeddings``: the spec's ``rope_scaling="llama3"`` fields), and the
    top-level keys ``rope_theta`` / ``partial_rotary_factor`` (GPT-NeoX also
    ``rotary_emb_base`` / ``rotary_pct``). Every place that gives a value must give the same
    one; defaults: theta 10000, fraction 1 (GPT-NeoX 0.25).

    Raises:
        SpecError: naming the key: a ``rope_type`` other than ``"default"`` and ``"llama3"``
            (``linear``, ``dynamic``, ``yarn``, ``longrope``, ... rescale the frequencies in
            ways xformer does not express), a ``llama3`` dict without one of its four numbers,
            any other key in the rope dict, values that disagree, a fraction other than 1
            outside GPT-NeoX (the other classes ignore it).
    """
    thetas: list[tuple[str, Any]] = []
    fractions: list[tuple[str, Any]] = []
    scalings: list[tuple[str, dict[str, Any]]] = []
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key)
        if params is None:
            continue
        if not isinstance(params, Mapping):
            raise SpecError(f"config.json {key} = {truncate(params)} is not an object; give "
                            f"{{\"rope_type\": \"default\", \"rope_theta\": ...}} or null")
        kind = "default"
        for type_key in ("rope_type", "type"):
            if type_key in params and params[type_key] not in ("default", "llama3"):
                raise SpecError(
                    f"config.json {key}.{type_key} = {truncate(params[type_key])} is not "
                    f"supported: xformer's rotary embeddings are the unscaled kind (rope_type "
                    f"'default', Su et al. 2021) or Llama 3's ('llama3'); this one rescales "
                    f"the frequencies otherwise")
            kind = params.get(type_key, kind)
        scaling: dict[str, Any] = {}
        for sub, value in params.items():
            if sub == "rope_theta":
                thetas.append((f"{key}.{sub}", value))
            elif sub == "partial_rotary_factor":
                fractions.append((f"{key}.{sub}", value))
            elif kind == "llama3" and sub in _LLAMA3_KEYS:
                field = _LLAMA3_KEYS[sub]
                scaling[field] = (config_int(params, sub) if field == "rope_original_max_len"
                                  else config_float(params, sub, 1.0))
            elif sub not in ("rope_type", "type"):
                raise SpecError(f"config.json {key}.{str(sub)[:80]} is not supported (xformer "
                                f"reads rope_type 'default' or 'llama3', rope_theta, "
                                f"partial_rotary_factor and llama3's factor, low_freq_factor, "
                                f"high_freq_factor, original_max_position_embeddings)")
        if kind == "llama3":
            missing = [k for k, f in _LLAMA3_KEYS.items() if f not in scaling]
            if missing:
                raise SpecError(f"config.json {key} has rope_type 'llama3' but no "
                                f"{', '.join(missing)}; give all four")
            scalings.append((key, {"rope_scaling": "llama3", **scaling}))
        else:
            scalings.append((key, {}))
    neox = model_type == "gpt_neox"
    for key in ("rope_theta", "rotary_emb_base") if neox else ("rope_theta",):
        if key in cfg:
            thetas.append((key, cfg[key]))
    for key in ("partial_rotary_factor", "rotary_pct") if neox else ("partial_rotary_factor",):
        if key in cfg:
            fractions.append((key, cfg[key]))

    def agreed(found: list[tuple[str, Any]], default: float) -> tuple[str, float]:
        values = [(k, config_float({k: v}, k, default)) for k, v in found]
        for k, v in values[1:]:
            if v != values[0][1]:
                raise SpecError(f"config.json {values[0][0]} = {values[0][1]} and {k} = {v} "
                                f"disagree; keep one")
        return values[0] if values else ("", default)

    _, theta = agreed(thetas, 10000.0)
    where, fraction = agreed(fractions, 0.25 if neox else 1.0)
    for k, other in scalings[1:]:
        if other != scalings[0][1]:
            raise SpecError(f"config.json {scalings[0][0]} and {k} give different rope "
                            f"scalings; keep one")
    if not neox and fraction != 1.0:
        raise SpecError(f"config.json {where} = {fraction} is not supported for {model_type}: "
                        f"{LLAMA_FAMILY_CLASSES[model_type]} rotates every dimension of a head "
                        f"(it ignores partial_rotary_factor)")
    return (theta, fraction, where or "partial_rotary_factor (default)",
            scalings[0][1] if scalings else {})


def _family_token_id(cfg: Mapping[str, Any], key: str, vocab: int) -> int | None:
    """``bos_token_id`` / ``eos_token_id`` of a GPT-2 or Llama-family config: one integer or
    null (a list, as some chat models give ``eos_token_id``, is refused: a spec holds one id);
    one outside ``[0, vocab)`` is dropped with a warning (Hugging Face loads it with a warning;
    a token the model can never produce cannot stop or start generation)."""
    tok = cfg.get(key)
    if isinstance(tok, float) and tok.is_integer():
        tok = int(tok)
    if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int)):
        raise SpecError(f"config.json {key} = {truncate(tok)} is not a token id; set it to one "
                        f"integer or null")
    if tok is not None and not 0 <= tok < vocab:
        warnings.warn(f"config.json {key} = {tok} is outside the vocabulary [0, vocab_size="
                      f"{vocab}): the model can never produce it, so it is dropped ({key} = "
                      f"None)", UserWarning, stacklevel=3)
        return None
    return tok


def _config_bool(cfg: Mapping[str, Any], key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):
        raise SpecError(f"config.json {key} = {truncate(value)} is not true or false")
    return value


def _sliding_window(cfg: Mapping[str, Any], model_type: str, n_layers: int) -> int | None:
    """The attention window that limits ``max_len``, or ``None``.

    Mistral: ``sliding_window`` (every layer; null for none). Qwen2: only with
    ``use_sliding_window`` true, on the layers ``layer_types`` marks ``"sliding_attention"``
    (by default those at index >= ``max_window_layers``); none marked: no window. Within a
    sequence no longer than the window, sliding-window attention (``masking_utils.
    sliding_window_overlay``: key ``j`` is seen by query ``i`` iff ``i - window < j <= i``) is
    plain causal attention, so the window becomes ``max_len``, exactly.

    Raises:
        SpecError: naming the key: a ``layer_types`` entry other than ``"full_attention"`` /
            ``"sliding_attention"``, a wrong length, sliding layers without a window (where
            ``transformers`` fails), ``layer_types`` on Mistral or on another family.
    """
    types = cfg.get("layer_types")
    if model_type not in ("mistral", "qwen2"):
        for key in ("sliding_window", "layer_types", "use_sliding_window"):
            if cfg.get(key) not in (None, False):
                raise SpecError(f"config.json {key} = {truncate(cfg[key])} is not supported "
                                f"for {model_type} ({LLAMA_FAMILY_CLASSES[model_type]} has no "
                                f"sliding-window attention); remove it or set it to null")
        return None
    if model_type == "mistral":
        if types is not None:
            raise SpecError(f"config.json layer_types = {truncate(types)} is not supported for "
                            f"mistral (MistralForCausalLM gives every layer the same window)")
        return config_int(cfg, "sliding_window", null_ok=True)
    if types is not None:
        if not isinstance(types, list) or len(types) != n_layers or any(
                t not in ("full_attention", "sliding_attention") for t in types):
            raise SpecError(f"config.json layer_types = {truncate(types)} must list "
                            f"'full_attention' or 'sliding_attention' for each of the "
                            f"{n_layers} layers")
    use = _config_bool(cfg, "use_sliding_window")
    window = config_int(cfg, "sliding_window", null_ok=True) if use else None
    if types is None:
        first = config_int(cfg, "max_window_layers", low=0)
        sliding = window is not None and first < n_layers
    else:
        sliding = "sliding_attention" in types
        if sliding and window is None:
            raise SpecError(f"config.json layer_types marks sliding_attention layers, but "
                            f"use_sliding_window = {cfg['use_sliding_window']} / sliding_window "
                            f"= {cfg.get('sliding_window')} give no window (Qwen2ForCausalLM "
                            f"fails on it)")
    return window if sliding else None


def spec_from_llama_family_config(config: Mapping[str, Any]) -> ModelSpec:
    """The spec of a Llama-family ``config.json`` (``model_type`` ``llama``, ``mistral``,
    ``qwen2``, ``gemma`` or ``gpt_neox``; absent keys take the config class's defaults,
    :data:`LLAMA_FAMILY_DEFAULTS`).

    Every family: ``architecture="decoder"``, ``head="lm"``, pre-norm with a final norm, no
    embedding norm, ``positional="rope"`` with ``rope_style="half"`` (``rotate_half``: pair
    ``i`` with ``i + rotary_dim / 2``), ``rope_theta`` and the rotary fraction from
    :func:`_rope_config`, ``tie_embeddings = tie_word_embeddings``, ``n_kv_heads =
    num_key_value_heads`` (``None`` when it equals ``num_attention_heads``), ``head_dim``
    (``None`` when it is ``hidden_size // num_attention_heads``), ``d_ff =
    intermediate_size``, ``activation`` from ``hidden_act`` (:data:`LLAMA_FAMILY_ACTIVATIONS`),
    ``dropout = attention_dropout`` (GPT-NeoX: ``hidden_dropout``; training mode only).

    * Llama, Mistral, Qwen2, Gemma: ``norm="rmsnorm"`` (``rms_norm_eps``), ``ffn="glu"``
      (``down_proj(act(gate_proj(x)) * up_proj(x))``), ``bias=False`` and the switches: Llama
      ``attention_bias`` -> ``qkv_bias`` and ``out_proj_bias``, ``mlp_bias``; Qwen2 ``qkv_bias``
      true (q/k/v are biased, ``o_proj`` is not); Gemma ``attention_bias``. Gemma also
      ``norm_scale_offset=1.0`` (``GemmaRMSNorm``: ``(1 + weight)``) and ``embed_scale=True``
      (``GemmaModel`` scales token embeddings by ``sqrt(hidden_size)``).
    * GPT-NeoX: ``norm="layernorm"`` (``layer_norm_eps``), ``ffn="mlp"``, ``bias=True`` (its
      MLP and LayerNorms always have biases), ``attention_bias`` -> ``qkv_bias`` and
      ``out_proj_bias``, ``parallel_residual = use_parallel_residual``, ``rotary_fraction`` from
      ``rope_parameters.partial_rotary_factor`` / ``rotary_pct`` (default 0.25).
    * ``max_len = max_position_embeddings``, or the sliding window when it is shorter (Mistral
      ``sliding_window``; Qwen2 with ``use_sliding_window``; :func:`_sliding_window`): within
      sequences no longer than the window, sliding-window attention *is* plain causal attention.
      ``pretraining_tp`` is accepted: transformers 5 ignores it and 4 only splits the same
      matmuls into slices (rounding only).

    Raises:
        SpecError: naming the key and value: an unsupported ``model_type``, ``hidden_act`` (or
            Gemma ``hidden_activation`` disagreeing with it), rope scaling
            (:func:`_rope_config`), sliding-window layouts (:func:`_sliding_window`), a bias key
            the class ignores but the checkpoint would need (``mlp_bias`` true on Mistral,
            Qwen2, Gemma; ``attention_bias`` on Mistral / Qwen2; ``mlp_bias`` false on
            GPT-NeoX), bidirectional attention (Gemma ``use_bidirectional_attention``,
            ``is_causal`` false), a set key of another architecture (:data:`_FOREIGN_KEYS`,
            e.g. ``attn_logit_softcapping``), a GPT-NeoX ``num_key_value_heads`` /
            ``head_dim`` other than the heads (GPTNeoXAttention ignores them), a rotary size
            that is odd or 0, a missing or malformed size.
    """
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise SpecError(f"config.json model_type {truncate(model_type)} is not a Llama-family "
                        f"type ({', '.join(LLAMA_FAMILY)})")
    cls = LLAMA_FAMILY_CLASSES[model_type]
    cfg = {**LLAMA_FAMILY_DEFAULTS[model_type], **config}
    for key in _FOREIGN_KEYS:
        if cfg.get(key) not in (None, False):
            raise SpecError(f"config.json {key} = {truncate(cfg[key])} is not supported: {cls} "
                            f"ignores it, and xformer does not express it")
    if cfg.get("is_causal", True) is not True or cfg.get("use_bidirectional_attention"):
        key = "is_causal" if cfg.get("is_causal", True) is not True else (
            "use_bidirectional_attention")
        raise SpecError(f"config.json {key} = {truncate(cfg[key])} is not supported: xformer "
                        f"decoders are causal")
    config_int(cfg, "pretraining_tp", 1, null_ok=True)  # checked only: the same function
    neox = model_type == "gpt_neox"
    d = config_int(cfg, "hidden_size")
    h = config_int(cfg, "num_attention_heads")
    n_layers = config_int(cfg, "num_hidden_layers")
    vocab = config_int(cfg, "vocab_size")
    if neox:
        for key in ("num_key_value_heads", "head_dim"):
            want = h if key == "num_key_value_heads" else d // h
            if cfg.get(key) is not None and config_int(cfg, key) != want:
                raise SpecError(f"config.json {key} = {truncate(cfg[key])} is not supported for "
                                f"gpt_neox: GPTNeoXAttention always has {h} heads of "
                                f"hidden_size / num_attention_heads = {d // h}")
        kv, head_dim = h, d // h
    else:
        kv = config_int(cfg, "num_key_value_heads", null_ok=True) or h
        head_dim = config_int(cfg, "head_dim", null_ok=True) or d // h
    act = cfg["hidden_act"]
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # as GemmaConfig.__post_init__ does
    if not isinstance(act, str) or act not in LLAMA_FAMILY_ACTIVATIONS:
        raise SpecError(f"config.json hidden_act {truncate(cfg['hidden_act'])} is not "
                        f"supported; supported: {', '.join(LLAMA_FAMILY_ACTIVATIONS)}")
    legacy = cfg.get("hidden_activation") if model_type == "gemma" else None
    if legacy is not None and (not isinstance(legacy, str) or LLAMA_FAMILY_ACTIVATIONS.get(
            legacy) != LLAMA_FAMILY_ACTIVATIONS[act]):
        raise SpecError(f"config.json hidden_activation = {truncate(legacy)} and hidden_act = "
                        f"{truncate(cfg['hidden_act'])} disagree (transformers 4 reads the "
                        f"first, 5 the second); keep one")
    theta, fraction, where, rope_scaling = _rope_config(config, model_type)
    rotary_dim = int(head_dim * fraction)
    if rotary_dim < 2 or rotary_dim % 2:
        raise SpecError(f"config.json {where} = {fraction} gives int(head size {head_dim} * "
                        f"{fraction}) = {rotary_dim} rotated dimensions per head; xformer "
                        f"needs an even number >= 2")
    window = _sliding_window(cfg, model_type, n_layers)
    max_len = config_int(cfg, "max_position_embeddings")
    if window is not None:
        max_len = min(max_len, window)
    fixed = {"mistral": {"attention_bias": False, "mlp_bias": False},
             "qwen2": {"attention_bias": None, "mlp_bias": False},
             "gemma": {"mlp_bias": False}, "gpt_neox": {"mlp_bias": True}}.get(model_type, {})
    for key, value in fixed.items():
        if key in config and config[key] is not None and config[key] != value:
            raise SpecError(f"config.json {key} = {truncate(config[key])} is not supported for "
                            f"{model_type}: {cls} ignores it (its biases are fixed), so the "
                            f"checkpoint would not load as written")
    common = dict(
        architecture="decoder", vocab_size=vocab, d_model=d, n_heads=h,
        n_kv_heads=None if kv == h else kv,
        head_dim=None if (d % h == 0 and head_dim == d // h) else head_dim,
        d_ff=config_int(cfg, "intermediate_size"), n_layers=n_layers, max_len=max_len,
        norm_position="pre", activation=LLAMA_FAMILY_ACTIVATIONS[act], positional="rope",
        rope_theta=theta, rope_style="half", rotary_fraction=fraction, **rope_scaling,
        type_vocab_size=0,
        embedding_norm=False, final_norm=True, head="lm",
        tie_embeddings=_config_bool(cfg, "tie_word_embeddings"),
        bos_token_id=_family_token_id(cfg, "bos_token_id", vocab),
        eos_token_id=_family_token_id(cfg, "eos_token_id", vocab))
    if neox:
        attn = _config_bool(cfg, "attention_bias")
        return ModelSpec(
            **common, norm="layernorm", norm_eps=config_float(cfg, "layer_norm_eps", 1e-5),
            ffn="mlp", embed_scale=False, bias=True, qkv_bias=None if attn else False,
            out_proj_bias=None if attn else False,
            parallel_residual=_config_bool(cfg, "use_parallel_residual"),
            dropout=config_float(cfg, "hidden_dropout", 0.0))
    if model_type == "qwen2":
        qkv, out, mlp = True, False, False
    elif model_type == "mistral":
        qkv = out = mlp = False
    else:
        qkv = out = _config_bool(cfg, "attention_bias")
        mlp = _config_bool(cfg, "mlp_bias") if model_type == "llama" else False
    gemma = model_type == "gemma"
    return ModelSpec(
        **common, norm="rmsnorm", norm_eps=config_float(cfg, "rms_norm_eps", 1e-6),
        norm_scale_offset=1.0 if gemma else 0.0, ffn="glu", embed_scale=gemma, bias=False,
        qkv_bias=qkv or None, out_proj_bias=out or None, mlp_bias=mlp or None,
        dropout=config_float(cfg, "attention_dropout", 0.0))


def llama_family_expressible(spec: ModelSpec, model_type: str) -> str | None:
    """``None`` if the ``transformers`` class of ``model_type`` (:data:`LLAMA_FAMILY_CLASSES`)
    expresses ``spec`` exactly, else the reason, naming the spec field.

    Llama, Mistral, Qwen2, Gemma: a pre-norm RMSNorm decoder with a final norm, a GLU
    feed-forward, half-style rotary embeddings on every dimension of a head, an LM head; Gemma
    with ``norm_scale_offset`` 1 and ``embed_scale``, the others with neither. Biases: Llama one
    switch for q/k/v and ``out_proj`` (``attention_bias``) and one for the MLP (``mlp_bias``);
    Mistral none; Qwen2 exactly q/k/v; Gemma one switch for q/k/v and ``out_proj``. Llama's
    config also requires ``d_model % n_heads == 0``. GPT-NeoX: pre-LN LayerNorm with biases, a
    biased two-layer MLP, multi-head attention with heads of ``d_model / n_heads``, one switch
    for q/k/v and ``out_proj``, half-style rotary embeddings on any even share of a head,
    sequential or parallel residual; no embedding scale.

    Raises:
        SpecError: ``model_type`` is not in :data:`LLAMA_FAMILY`.
    """
    _check_family(model_type)
    cls = LLAMA_FAMILY_CLASSES[model_type]
    neox = model_type == "gpt_neox"
    gemma = model_type == "gemma"
    qkv, out, mlp = (spec.has_bias(p) for p in ("qkv", "out_proj", "mlp"))
    checks = [
        (spec.architecture == "decoder",
         f"spec field 'architecture' is {spec.architecture!r}; {cls} is a 'decoder'"),
        (spec.head == "lm", f"spec field 'head' is {spec.head!r}; {cls} has an LM head ('lm')"),
        (spec.norm_position == "pre",
         f"spec field 'norm_position' is {spec.norm_position!r}; {cls} is pre-norm ('pre')"),
        (spec.positional == "rope",
         f"spec field 'positional' is {spec.positional!r}; {cls} has rotary positions ('rope')"),
        (spec.rope_style == "half",
         f"spec field 'rope_style' is {spec.rope_style!r}; {cls} rotates halves ('half', "
         f"rotate_half)"),
        (neox or spec.rotary_fraction == 1.0,
         f"spec field 'rotary_fraction' is {spec.rotary_fraction}; {cls} rotates whole heads "
         f"(1.0)"),
        (not spec.embedding_norm,
         f"spec field 'embedding_norm' is true; {cls} has no embedding norm"),
        (spec.final_norm, f"spec field 'final_norm' is false; {cls} always has a final norm"),
        (spec.embed_scale == gemma,
         f"spec field 'embed_scale' is {str(spec.embed_scale).lower()}; {cls} "
         f"{'always scales' if gemma else 'does not scale'} token embeddings by sqrt(d_model)"),
        (spec.norm == ("layernorm" if neox else "rmsnorm"),
         f"spec field 'norm' is {spec.norm!r}; {cls} has "
         f"{'LayerNorm' if neox else 'RMSNorm'}"),
        (spec.norm_scale_offset == (1.0 if gemma else 0.0),
         f"spec field 'norm_scale_offset' is {spec.norm_scale_offset}; {cls}'s norm multiplies "
         f"by {'(1 + weight) (1.0)' if gemma else 'its weight (0.0)'}"),
        (spec.ffn == ("mlp" if neox else "glu"),
         f"spec field 'ffn' is {spec.ffn!r}; {cls} has "
         f"{'a two-layer MLP (mlp)' if neox else 'a gated MLP (glu)'}"),
        (not spec.parallel_residual or neox,
         f"spec field 'parallel_residual' is true; {cls}'s sub-layers are sequential"),
    ]
    if neox:
        checks += [
            (spec.kv_heads == spec.n_heads,
             f"spec field 'n_kv_heads' is {spec.n_kv_heads}; {cls} has multi-head attention"),
            (spec.d_head * spec.n_heads == spec.d_model,
             f"spec field 'head_dim' is {spec.head_dim}; {cls}'s heads are d_model / n_heads"),
            (spec.bias, f"spec field 'bias' is false; {cls}'s LayerNorms always have biases"),
            (mlp, "spec field 'mlp_bias' is false; GPTNeoXMLP always has biases"),
            (qkv == out, f"spec fields 'qkv_bias' and 'out_proj_bias' differ; {cls} has one "
                         f"switch for both (attention_bias)"),
        ]
    elif model_type == "llama":
        checks += [
            (spec.d_model % spec.n_heads == 0,
             f"spec field 'd_model' ({spec.d_model}) is not a multiple of 'n_heads' "
             f"({spec.n_heads}); LlamaConfig refuses it (MistralForCausalLM takes it)"),
            (qkv == out, f"spec fields 'qkv_bias' and 'out_proj_bias' differ; {cls} has one "
                         f"switch for both (attention_bias)"),
        ]
    elif model_type == "mistral":
        checks += [(not (qkv or out or mlp),
                    f"spec field '{'qkv' if qkv else 'out_proj' if out else 'mlp'}_bias' is "
                    f"true; {cls} has no biases")]
    elif model_type == "qwen2":
        checks += [(qkv, "spec field 'qkv_bias' is false; Qwen2ForCausalLM's q/k/v always "
                         "have biases"),
                   (not out, "spec field 'out_proj_bias' is true; Qwen2ForCausalLM's o_proj "
                             "has no bias"),
                   (not mlp, "spec field 'mlp_bias' is true; Qwen2ForCausalLM's MLP has no "
                             "biases")]
    else:  # gemma
        checks += [(qkv == out, f"spec fields 'qkv_bias' and 'out_proj_bias' differ; {cls} has "
                                f"one switch for both (attention_bias)"),
                   (not mlp, f"spec field 'mlp_bias' is true; {cls}'s MLP has no biases")]
    return next((why for ok, why in checks if not ok), None)


def llama_family_config_dict(spec: ModelSpec, model_type: str | None = None,
                             dtype: str | None = "float32") -> dict[str, Any]:
    """The ``config.json`` of ``spec`` as ``<Type>ForCausalLM.save_pretrained`` writes it for
    ``model_type`` (default: :func:`huggingface_model_type`), keys sorted.

    Rotary settings are written both as transformers 5 reads them (``rope_parameters``) and as
    4 does (``rope_theta``, ``rope_scaling: null``; GPT-NeoX ``rotary_emb_base`` /
    ``rotary_pct``); Gemma's activation both as ``hidden_act`` (5) and ``hidden_activation``
    (4), exact GELU as ``gelu_python`` (GemmaConfig turns ``gelu`` into the tanh form);
    ``max_position_embeddings = max_len`` and no sliding window (Mistral ``sliding_window:
    null``; Qwen2 ``use_sliding_window: false``); every dropout is ``spec.dropout``.

    Raises:
        SpecError: the class cannot express ``spec`` (:func:`llama_family_expressible`, names
            the field), or ``model_type`` is not a Llama-family type.
    """
    model_type = model_type or huggingface_model_type(spec)
    if model_type not in LLAMA_FAMILY:
        why = huggingface_expressible(spec) or (
            f"it is a {model_type} spec, not a Llama-family one")
        raise SpecError(f"cannot express this spec as a Llama-family model: {why}")
    cls = LLAMA_FAMILY_CLASSES[model_type]
    why = llama_family_expressible(spec, model_type)
    if why:
        raise SpecError(f"cannot express this spec as {cls}: {why}")
    act = _FAMILY_EXPORT_ACTIVATION[spec.activation]
    if model_type == "gemma" and act == "gelu":
        act = "gelu_python"
    rope: dict[str, Any] = {"rope_theta": spec.rope_theta, "rope_type": "default"}
    config: dict[str, Any] = {
        "architectures": [cls], "model_type": model_type, "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model, "intermediate_size": spec.d_ff,
        "num_hidden_layers": spec.n_layers, "num_attention_heads": spec.n_heads,
        "hidden_act": act, "max_position_embeddings": spec.max_len,
        "initializer_range": 0.02, "tie_word_embeddings": spec.tie_embeddings,
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.eos_token_id,
        "pad_token_id": None, "use_cache": True, "attention_dropout": spec.dropout,
        "rope_theta": spec.rope_theta, "rope_scaling": None,
    }
    if model_type == "gpt_neox":
        rope["partial_rotary_factor"] = spec.rotary_fraction
        config.update(layer_norm_eps=spec.norm_eps, hidden_dropout=spec.dropout,
                      use_parallel_residual=spec.parallel_residual,
                      attention_bias=spec.has_bias("qkv"), rotary_pct=spec.rotary_fraction,
                      rotary_emb_base=spec.rope_theta)
    else:
        config.update(num_key_value_heads=spec.kv_heads, rms_norm_eps=spec.norm_eps)
        if model_type != "qwen2" or spec.d_head * spec.n_heads != spec.d_model:
            config["head_dim"] = spec.d_head
        if model_type in ("llama", "gemma"):
            config["attention_bias"] = spec.has_bias("qkv")
        if model_type == "llama":
            config.update(mlp_bias=spec.has_bias("mlp"), pretraining_tp=1)
        if model_type == "gemma":
            config["hidden_activation"] = act
        if model_type == "mistral":
            config["sliding_window"] = None
        if model_type == "qwen2":
            config.update(use_sliding_window=False, sliding_window=None,
                          max_window_layers=spec.n_layers)
    if spec.rope_scaling == "llama3":
        rope.update({"rope_type": "llama3", **{k: getattr(spec, f)
                                               for k, f in _LLAMA3_KEYS.items()}})
        config["rope_scaling"] = dict(rope)  # transformers 4 reads this one
    config["rope_parameters"] = rope
    if dtype is not None:
        config["dtype"] = dtype
    return dict(sorted(config.items()))


def _family_names(spec: ModelSpec, model_type: str) -> dict[str, tuple[str, int | None]]:
    """``{canonical name: (Hugging Face file name, j)}``: ``j`` is the share of GPT-NeoX's
    fused ``query_key_value`` (0 q, 1 k, 2 v), else ``None``."""
    prefix, embed, final, layer_map = _family(model_type)
    inverse = {v: k for k, v in layer_map.items()}
    out: dict[str, tuple[str, int | None]] = {}
    for p in spec.parameters():
        name = p.name
        if name == "embeddings.word_embeddings.weight":
            out[name] = (f"{prefix}{embed}.weight", None)
        elif name == "lm_head.weight":
            out[name] = ("embed_out.weight" if model_type == "gpt_neox" else name, None)
        elif name.startswith("decoder.final_norm."):
            out[name] = (f"{prefix}{final}.{name.rsplit('.', 1)[1]}", None)
        else:
            m = re.match(r"decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
            i, module, kind = m.groups()
            layer = f"{prefix}layers.{i}"
            if model_type == "gpt_neox" and module.startswith("self_attn.") and (
                    module.split(".")[1] in _QKV):
                out[name] = (f"{layer}.attention.query_key_value.{kind}",
                             _QKV.index(module.split(".")[1]))
            else:
                out[name] = (f"{layer}.{inverse[module]}.{kind}", None)
    return out


def llama_family_tensor_shapes(spec: ModelSpec, model_type: str) -> dict[str, tuple[int, ...]]:
    """``{Hugging Face tensor name: shape}`` of ``spec`` as ``<Type>ForCausalLM.save_pretrained``
    writes it (``lm_head.weight`` / GPT-NeoX ``embed_out.weight`` only when untied)."""
    _check_family(model_type)
    shapes = spec.parameter_shapes()
    out: dict[str, tuple[int, ...]] = {}
    for name, (hf, j) in _family_names(spec, model_type).items():
        if j is None:
            out[hf] = shapes[name]
        elif j == 0:
            out[hf] = (3 * shapes[name][0],) + shapes[name][1:]
    return out


def canonical_to_llama_family(spec: ModelSpec, weights: Mapping[str, np.ndarray],
                              model_type: str) -> dict[str, np.ndarray]:
    """Canonical numpy weights -> ``{Hugging Face name: array}`` of ``model_type`` (file names,
    :func:`llama_family_tensor_shapes` order), the exact inverse of
    :func:`llama_family_to_canonical`: renames, and for GPT-NeoX the per-head interleaving of
    q, k, v into ``query_key_value`` (``W.reshape(H, 3, dh, D)``), bit for bit, dtypes kept."""
    _check_family(model_type)
    h, dh = spec.n_heads, spec.d_head
    out: dict[str, np.ndarray] = {}
    parts: dict[str, list] = {}
    for name, (hf, j) in _family_names(spec, model_type).items():
        if j is None:
            out[hf] = np.ascontiguousarray(weights[name])
            continue
        parts.setdefault(hf, [None, None, None])[j] = np.asarray(weights[name])
        if j == 2:
            q, k, v = parts.pop(hf)
            rest = q.shape[1:]
            fused = np.stack([x.reshape((h, dh) + rest) for x in (q, k, v)], axis=1)
            out[hf] = np.ascontiguousarray(fused.reshape((3 * h * dh,) + rest))
    return out


def llama_family_to_canonical(spec: ModelSpec, tensors: Mapping[str, Any], model_type: str
                              ) -> dict[str, Any]:
    """``{Hugging Face name: tensor}`` -> ``{canonical name: tensor}`` for ``model_type``:
    numpy arrays or torch tensors, parameters or their gradients (the map is linear), names as
    in the file or as in the module (GPT-NeoX's ``embed_out.weight`` is the module's
    ``lm_head.weight``); GPT-NeoX's ``query_key_value`` is split per head into q, k, v
    (contiguous results). An LM head that shares memory with the token table (a tied
    ``state_dict()``) is dropped, and so are names that are not parameters of ``spec``."""
    _check_family(model_type)
    items = dict(tensors)
    if model_type == "gpt_neox" and "lm_head.weight" in items:
        items["embed_out.weight"] = items.pop("lm_head.weight")
    prefix, embed, _, _ = _family(model_type)
    head = "embed_out.weight" if model_type == "gpt_neox" else "lm_head.weight"
    table = items.get(f"{prefix}{embed}.weight")
    if head in items and table is not None and _same_memory(items[head], table):
        del items[head]
    h, dh = spec.n_heads, spec.d_head
    out: dict[str, Any] = {}
    for name, (hf, j) in _family_names(spec, model_type).items():
        if hf not in items:
            continue
        value = items[hf]
        if j is None:
            out[name] = value
        else:
            rest = tuple(value.shape[1:])
            out[name] = _contiguous(value.reshape((h, 3, dh) + rest)[:, j].reshape(
                (h * dh,) + rest))
    return out


def _strip_family_names(raw: Mapping[str, Any], model_type: str, st: Path) -> dict[str, Any]:
    """Drop buffers (:data:`_FAMILY_BUFFER`); GPT-NeoX's head is read as ``embed_out.weight``
    whether the file says that or ``lm_head.weight`` (both load); both is an error."""
    out = {k: v for k, v in raw.items() if not _FAMILY_BUFFER.search(k)}
    if model_type == "gpt_neox" and "lm_head.weight" in out:
        if "embed_out.weight" in out:
            raise CheckpointError(f"tensors in {st}: both embed_out.weight and lm_head.weight "
                                  f"(the same GPT-NeoX head); keep one")
        out["embed_out.weight"] = out.pop("lm_head.weight")
    return out


def import_llama_family(path: str | os.PathLike, config: Mapping[str, Any] | None = None
                        ) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a Hugging Face Llama-family directory (``LlamaForCausalLM``,
    ``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``GemmaForCausalLM``, ``GPTNeoXForCausalLM``
    as ``save_pretrained`` writes them) into ``(spec, canonical weights)``.

    Args:
        path: a directory with ``config.json`` (``model_type`` in :data:`LLAMA_FAMILY`) and
            ``model.safetensors`` (names: the section "the Llama family" of this module;
            rotary ``inv_freq`` buffers and GPT-NeoX ``attention.bias`` / ``masked_bias``
            are skipped).
        config: the parsed ``config.json`` (read from ``path`` if not given).

    Returns:
        ``(spec, weights)``: ``spec`` from :func:`spec_from_llama_family_config` (read that
        function for the ``max_len`` of a sliding-window model); ``weights`` in the stored
        dtype (``bfloat16`` widened exactly to ``float32``). With ``tie_word_embeddings`` a
        stored LM head is ignored, as the class ties it to the token table on load.

    Raises:
        CheckpointError: a file is missing, ``model_type`` is not a Llama-family type, an
            untied config without its LM head, or missing / unexpected / mis-shaped tensors (all
            listed in one line, in Hugging Face names).
        SpecError: an unsupported ``config.json`` (names the key).
    """
    root, st, config = _hf_checkpoint(path, config)
    model_type = config.get("model_type")
    if model_type not in LLAMA_FAMILY:
        raise CheckpointError(f"{root / 'config.json'}: model_type {truncate(model_type)} is "
                              f"not a Llama-family type ({', '.join(LLAMA_FAMILY)})")
    spec = spec_from_llama_family_config(config)
    head = "embed_out.weight" if model_type == "gpt_neox" else "lm_head.weight"

    def names(raw: Mapping[str, Any]) -> dict[str, Any]:
        raw = _strip_family_names(raw, model_type, st)
        if spec.tie_embeddings:
            raw.pop(head, None)  # the class ties it to the token table on load
        elif head not in raw:
            raise CheckpointError(f"tensors in {st}: tie_word_embeddings is false but {head} "
                                  f"is missing")
        return raw

    # names and shapes from the header first: a file claiming other tensors is refused unread
    found = names(header_tensors(model_header(st)))
    details: list[str] = []
    problems = shape_problems(llama_family_tensor_shapes(spec, model_type), found,
                              extra_word="unexpected", details=details)
    if problems:
        raise CheckpointError(f"tensors in {st} do not match its config.json "
                              f"({LLAMA_FAMILY_CLASSES[model_type]} names): "
                              + "; ".join(problems), details=details)
    weights = llama_family_to_canonical(spec, names(read_model(st)), model_type)
    return spec, check_weights(spec, weights, source=f"tensors in {st}")


def export_llama_family(path: str | os.PathLike, spec: ModelSpec,
                        weights: Mapping[str, np.ndarray], model_type: str | None = None
                        ) -> None:
    """Write ``spec`` and canonical ``weights`` as the Hugging Face directory of
    ``model_type`` (default: :func:`huggingface_model_type`; give ``"mistral"`` to write a
    Mistral checkpoint, whose spec equals a Llama one) that ``<Type>ForCausalLM.from_pretrained``
    loads: ``config.json`` (:func:`llama_family_config_dict`, ``dtype`` that of the weights)
    and ``model.safetensors`` (metadata ``{"format": "pt"}``, the names
    ``save_pretrained`` writes, :func:`canonical_to_llama_family`; each tensor in its canonical
    dtype, bit for bit). No ``generation_config.json`` and no tokenizer are written.

    Atomic, as :func:`export_gpt2`: an existing ``path`` is replaced only if it holds nothing
    but those two files.

    Raises:
        SpecError: the class cannot express ``spec`` (names the field) or ``model_type`` is not
            a Llama-family type.
        CheckpointError: ``weights`` do not match ``spec`` (all problems listed), or ``path``
            exists and is not such a directory.
    """
    if model_type is not None:
        _check_family(model_type)
    config = llama_family_config_dict(spec, model_type, dtype=None)  # raises SpecError first
    weights = check_weights(spec, weights)
    config["dtype"] = str(weights[spec.word_embedding_name()].dtype)
    config = dict(sorted(config.items()))
    tensors = canonical_to_llama_family(spec, weights, config["model_type"])
    atomic_write_dir(Path(path), {
        "config.json": (json.dumps(config, indent=2) + "\n").encode(),
        "model.safetensors": safetensors_bytes(tensors, {"format": "pt"}),
    })
