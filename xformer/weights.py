"""Canonical checkpoints: safetensors files of ``{canonical name: array}`` (no pickle, ever).

An xformer checkpoint stores the spec as JSON in the safetensors metadata (key ``xformer_spec``),
so a single file is self-describing. Saves are atomic; loads check the tensors against the spec
and list every missing, extra and mis-shaped tensor in one ``CheckpointError``.

Hugging Face BERT directories (``config.json`` + ``model.safetensors``) import into a spec and
canonical weights with :func:`from_pretrained`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointError, SpecError
from .spec import ModelSpec, atomic_write_bytes

SPEC_METADATA_KEY = "xformer_spec"


# ---------------------------------------------------------------------- checking
def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray], *, source: str = "weights"
                  ) -> dict[str, np.ndarray]:
    """Check ``weights`` against ``spec.parameters()`` and return them in canonical order.

    Raises:
        CheckpointError: lists the missing, extra and mis-shaped tensors (name, expected shape,
            found shape), and non-floating dtypes.
    """
    expected = spec.parameter_shapes()
    missing = [n for n in expected if n not in weights]
    extra = [n for n in weights if n not in expected]
    misshaped = [f"{n} {tuple(np.shape(weights[n]))} (expected {expected[n]})"
                 for n in expected if n in weights and tuple(np.shape(weights[n])) != expected[n]]
    bad_dtype = [f"{n} {np.asarray(weights[n]).dtype}" for n in expected
                 if n in weights and not np.issubdtype(np.asarray(weights[n]).dtype, np.floating)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if extra:
        problems.append(f"extra {len(extra)}: {', '.join(extra)}")
    if misshaped:
        problems.append(f"mis-shaped {len(misshaped)}: {', '.join(misshaped)}")
    if bad_dtype:
        problems.append(f"not floating point: {', '.join(bad_dtype)}")
    if problems:
        raise CheckpointError(f"{source} do not match the spec: " + "; ".join(problems)
                              + " (was it saved for another spec?)")
    return {n: np.asarray(weights[n]) for n in expected}


# ---------------------------------------------------------------------- init
def init_weights(spec: ModelSpec, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Fresh weights from each parameter's initialiser (``ParamSpec.init``), reproducible from
    ``seed`` with numpy's PCG64 generator, identical for every backend."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in spec.parameters():
        if p.init == "zeros":
            arr = np.zeros(p.shape)
        elif p.init == "ones":
            arr = np.ones(p.shape)
        else:
            arr = rng.normal(0.0, p.std, size=p.shape)
        out[p.name] = arr.astype(dtype)
    return out


def random_weights(spec: ModelSpec, seed: int = 0, dtype: str = "float64"
                   ) -> dict[str, np.ndarray]:
    """Weights for testing: every tensor random, LayerNorm scales ``1 + 0.2 N(0, 1)``, biases
    ``0.1 N(0, 1)``, matrices scaled by ``1/sqrt(fan_in)``, so that a wrong bias, a skipped
    LayerNorm scale or a transposed matrix shows in the outputs (unlike the ones/zeros init)."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in spec.parameters():
        if p.init == "ones":
            arr = 1.0 + 0.2 * rng.standard_normal(p.shape)
        elif p.init == "zeros":
            arr = 0.1 * rng.standard_normal(p.shape)
        elif "embeddings" in p.name:
            arr = 0.5 * rng.standard_normal(p.shape)
        else:
            arr = rng.standard_normal(p.shape) / np.sqrt(p.shape[-1])
        out[p.name] = arr.astype(dtype)
    return out


# ---------------------------------------------------------------------- files
def save_weights(path: str | os.PathLike, weights: Mapping[str, np.ndarray],
                 spec: ModelSpec | None = None) -> None:
    """Write a canonical safetensors checkpoint atomically (temporary file + ``os.replace``).

    With ``spec``, the weights are checked against it first (``CheckpointError``) and the spec
    is stored in the file's metadata.
    """
    from safetensors.numpy import save

    if spec is not None:
        weights = check_weights(spec, weights)
    metadata = {"format": "np"}
    if spec is not None:
        metadata[SPEC_METADATA_KEY] = spec.to_json(indent=None)
    data = save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata=metadata)
    atomic_write_bytes(Path(path), data)


def read_spec(path: str | os.PathLike) -> ModelSpec | None:
    """The spec stored in a checkpoint's metadata, or ``None``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as fh:
        meta = fh.metadata() or {}
    text = meta.get(SPEC_METADATA_KEY)
    return ModelSpec.from_json(text) if text else None


def load_weights(path: str | os.PathLike, spec: ModelSpec | None = None
                 ) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Read a canonical checkpoint: ``(spec, weights)``.

    Args:
        path: a ``.safetensors`` file written by :func:`save_weights`.
        spec: the spec to check against; default: the one stored in the file.

    Raises:
        CheckpointError: the file is missing or unreadable, has no spec and none was given, or
            its tensors do not match the spec (all problems listed).
    """
    from safetensors.numpy import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        weights = load_file(str(path))
        stored = read_spec(path)
    except (OSError, ValueError, SpecError) as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} as safetensors: "
                              f"{str(e).splitlines()[0]}") from None
    spec = spec or stored
    if spec is None:
        raise CheckpointError(f"checkpoint {str(path)!r} stores no spec; pass --spec")
    return spec, check_weights(spec, weights, source=f"tensors in {path.name}")


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
        SpecError: an unsupported ``hidden_act`` or ``position_embedding_type``.
    """
    act = config.get("hidden_act", "gelu")
    if act not in _HF_ACTIVATIONS:
        raise SpecError(f"config.json hidden_act {act!r} is not supported; "
                        f"supported: {', '.join(_HF_ACTIVATIONS)}")
    pos = config.get("position_embedding_type", "absolute")
    if pos != "absolute":
        raise SpecError(f"config.json position_embedding_type {pos!r} is not supported "
                        f"(only 'absolute')")
    return ModelSpec(
        architecture="encoder", vocab_size=int(config["vocab_size"]),
        d_model=int(config["hidden_size"]), n_heads=int(config["num_attention_heads"]),
        d_ff=int(config["intermediate_size"]), n_layers=int(config["num_hidden_layers"]),
        max_len=int(config.get("max_position_embeddings", 512)), norm_position="post",
        norm_eps=float(config.get("layer_norm_eps", 1e-12)), activation=_HF_ACTIVATIONS[act],
        positional="learned", type_vocab_size=int(config.get("type_vocab_size", 2)),
        embedding_norm=True, final_norm=False, embed_scale=False, bias=True, head="pooler",
    )


def _bert_name(hf_name: str) -> str | None:
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


def from_pretrained(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a model directory into ``(spec, canonical weights)``.

    Accepts a Hugging Face BERT directory (``config.json`` with ``model_type: bert`` +
    ``model.safetensors``; task heads such as ``cls.*`` are dropped, a missing pooler gives
    ``head="none"``), or an xformer directory (``model.safetensors`` with the spec in its
    metadata).

    Raises:
        CheckpointError: the directory or a file is missing, or the tensors do not match.
        SpecError: an unsupported ``config.json``.
    """
    from safetensors.numpy import load_file

    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist")
    st = root / "model.safetensors"
    if not st.is_file():
        raise CheckpointError(f"{str(root)!r} has no model.safetensors (pytorch_model.bin is "
                              f"not read: it is a pickle)")
    cfg_path = root / "config.json"
    if not cfg_path.is_file():
        spec, weights = load_weights(st)
        return spec, weights
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    if config.get("model_type", "bert") != "bert":
        raise CheckpointError(f"{cfg_path}: model_type {config.get('model_type')!r} is not "
                              f"supported yet (supported: bert)")
    spec = spec_from_bert_config(config)
    raw = load_file(str(st))
    weights = {}
    for hf_name, arr in raw.items():
        name = _bert_name(hf_name)
        if name is not None:
            weights[name] = arr.astype(np.float32) if arr.dtype != np.float64 else arr
    if "pooler.dense.weight" not in weights:
        spec = spec.replace(head="none")
    return spec, check_weights(spec, weights, source=f"tensors in {st}")
