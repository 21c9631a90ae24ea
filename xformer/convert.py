"""Hugging Face checkpoint conversions: BERT import, GPT-2 import and export, and
:func:`from_pretrained` (Hugging Face or xformer directory -> spec and canonical weights).

A Hugging Face model directory holds ``config.json`` and ``model.safetensors`` (``pytorch_model.bin``
is never read: it is a pickle). The conversions map its tensors to and from the canonical layout
of :meth:`ModelSpec.parameters` without changing a single bit (splits, concatenations and
transposes only); dtypes are kept (``float16``, ``float32``, ``float64``), except ``bfloat16``,
which numpy cannot hold and which is widened exactly to ``float32``.

* BERT (``model_type: bert``, the upstream ``modeling_bert`` names): :func:`import_bert`.
* GPT-2 (``model_type: gpt2``, the upstream ``modeling_gpt2`` names, as written by
  ``GPT2LMHeadModel.save_pretrained`` / ``GPT2Model.save_pretrained``): :func:`import_gpt2`
  and :func:`export_gpt2`.
* Which specs a ``transformers`` class can express, and its config as a plain dict
  (:func:`bert_expressible`, :func:`bert_config_dict`, :func:`gpt2_expressible`,
  :func:`gpt2_config_dict`), for the Hugging Face reference of the torch backend
  (``xformer_torch.reference_hf``). Nothing here imports a framework: files are read and
  written as numpy (:mod:`xformer.weights`), and the name maps also take torch tensors.

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
                      load_weights, model_safetensors, read_safetensors, safetensors_bytes,
                      safetensors_header, shape_problems)

#: ``model_type`` values of ``config.json`` that :func:`from_pretrained` imports.
SUPPORTED_MODEL_TYPES = ("bert", "gpt2")


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
      ``head="none"``) and ``gpt2`` (:func:`import_gpt2`).
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
    model_safetensors(root)
    config = read_hf_config(root)
    if config is None:
        return load_pretrained(root)
    model_type = config.get("model_type", "bert")
    if model_type == "bert":
        return import_bert(root, config)
    if model_type == "gpt2":
        return import_gpt2(root, config)
    raise CheckpointError(f"{root / 'config.json'}: model_type {truncate(model_type)} is not "
                          f"supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


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
    ]
    return next((why for ok, why in checks if not ok), None)


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
    root = Path(path)
    st = model_safetensors(root)
    config = read_hf_config(root) if config is None else config
    if config is None:
        raise CheckpointError(f"{str(root)!r} has no config.json")
    spec = spec_from_bert_config(config)
    # names and shapes from the header first: a file claiming other tensors is refused unread
    shapes = {n: t for k, t in header_tensors(safetensors_header(st)).items()
              if (n := _bert_name(k)) is not None}
    if "pooler.dense.weight" not in shapes:
        spec = spec.replace(head="none")
    check_weights(spec, shapes, source=f"tensors in {st}")
    weights = {}
    for hf_name, arr in read_safetensors(st).items():
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
    ]
    return next((why for ok, why in checks if not ok), None)


def huggingface_expressible(spec: ModelSpec) -> str | None:
    """``None`` if a ``transformers`` model class can express ``spec``: ``BertModel`` for
    encoders (:func:`bert_expressible`), ``GPT2LMHeadModel`` / ``GPT2Model`` for decoders
    (:func:`gpt2_expressible`); else the reason."""
    if spec.architecture == "encoder":
        return bert_expressible(spec)
    if spec.architecture == "decoder":
        return gpt2_expressible(spec)
    return "no Hugging Face model class for encoder-decoders here (use torch.nn)"


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
        tok = cfg[key]
        if tok is not None and (isinstance(tok, bool) or not isinstance(tok, int)):
            raise SpecError(f"config.json {key} = {truncate(tok)} is not a token id; set it "
                            f"to one integer or null")
        if tok is not None and not 0 <= tok < vocab:
            # GPT2Config(vocab_size=...) keeps the default 50256; Hugging Face loads it with a
            # warning. A token the model can never produce cannot stop or start generation.
            warnings.warn(f"config.json {key} = {tok} is outside the vocabulary [0, "
                          f"vocab_size={vocab}): the model can never produce it, so it is "
                          f"dropped ({key} = None)", UserWarning, stacklevel=2)
            cfg[key] = None
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
    root = Path(path)
    st = model_safetensors(root)
    config = read_hf_config(root) if config is None else config
    if config is None:
        raise CheckpointError(f"{str(root)!r} has no config.json")
    if config.get("model_type") != "gpt2":
        raise CheckpointError(f"{root / 'config.json'}: model_type "
                              f"{truncate(config.get('model_type'))} is not a GPT-2 ('gpt2')")
    # names and shapes from the header first: a file claiming other tensors is refused unread
    raw = _strip_gpt2_names(header_tensors(safetensors_header(st)), st)
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
    raw = _strip_gpt2_names(read_safetensors(st), st)
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
