"""Canonical checkpoints: safetensors files of ``{canonical name: array}`` (no pickle, ever).

An xformer checkpoint stores the spec as JSON in the safetensors metadata (key ``xformer_spec``),
so a single file is self-describing. Saves are atomic; loads check the tensors against the spec
and list every missing, extra and mis-shaped tensor in one ``CheckpointError``.

A checkpoint *directory* (:func:`save_pretrained`) adds a ``spec.json``. :func:`from_pretrained`
reads those and Hugging Face directories (``config.json`` + ``model.safetensors``: BERT and GPT-2,
converted by :mod:`xformer.convert`) into a spec and canonical weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from .errors import CheckpointError, SpecError
from .spec import ModelSpec, atomic_write_bytes

SPEC_METADATA_KEY = "xformer_spec"


# ---------------------------------------------------------------------- checking
def shape_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, object],
                   extra_word: str = "extra") -> list[str]:
    """The missing, extra (``extra_word``) and mis-shaped tensors of ``found`` against
    ``expected`` (``{name: shape}``), one phrase per kind, in ``expected``'s order."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    misshaped = [f"{n} {tuple(np.shape(found[n]))} (expected {tuple(expected[n])})"
                 for n in expected if n in found and tuple(np.shape(found[n])) != tuple(
                     expected[n])]
    problems = []
    for word, names in (("missing", missing), (extra_word, extra), ("mis-shaped", misshaped)):
        if names:
            problems.append(f"{word} {len(names)}: {', '.join(names)}")
    return problems


def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray], *, source: str = "weights"
                  ) -> dict[str, np.ndarray]:
    """Check ``weights`` against ``spec.parameters()`` and return them in canonical order.

    Raises:
        CheckpointError: lists the missing, extra and mis-shaped tensors (name, expected shape,
            found shape), and non-floating dtypes.
    """
    expected = spec.parameter_shapes()
    problems = shape_problems(expected, weights)
    bad_dtype = [f"{n} {np.asarray(weights[n]).dtype}" for n in expected
                 if n in weights and not np.issubdtype(np.asarray(weights[n]).dtype, np.floating)]
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
    data = _checkpoint_bytes(weights, spec)
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


# ---------------------------------------------------------------------- directories
def atomic_write_dir(path: str | os.PathLike, files: Mapping[str, bytes]) -> None:
    """Write a directory of ``files`` (``{file name: bytes}``) atomically: everything goes into
    a temporary sibling directory (flushed to disk), which is then renamed to ``path``, so a
    reader never sees a half-written directory.

    An existing ``path`` is replaced only if it is a directory holding nothing but files named
    in ``files`` (a previous save): it is moved aside, the new one renamed in, the old one
    deleted (and restored if the rename fails).

    Raises:
        CheckpointError: ``path`` exists and is not a directory, or holds other files (which
            replacing it would delete).
    """
    import shutil
    import tempfile

    target = Path(path)
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise CheckpointError(f"{str(target)!r} exists and is not a directory; choose a "
                                  f"new directory name")
        others = sorted(p.name for p in target.iterdir() if p.name not in files)
        if others:
            raise CheckpointError(f"{str(target)!r} already exists and holds other files "
                                  f"({', '.join(others)}); write into a new directory or "
                                  f"remove it")
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".old"))
            os.replace(target, old)  # onto the empty directory just made: atomic
            try:
                os.replace(tmp, target)
            except BaseException:
                os.replace(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _checkpoint_bytes(weights: Mapping[str, np.ndarray], spec: ModelSpec | None) -> bytes:
    from safetensors.numpy import save

    if spec is not None:
        weights = check_weights(spec, weights)
    metadata = {"format": "np"}
    if spec is not None:
        metadata[SPEC_METADATA_KEY] = spec.to_json(indent=None)
    return save({k: np.ascontiguousarray(v) for k, v in weights.items()}, metadata=metadata)


#: Spec files an xformer checkpoint directory may hold next to ``model.safetensors``.
SPEC_FILES = ("spec.json", "spec.yaml", "spec.yml")


def save_pretrained(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, np.ndarray]
                    ) -> None:
    """Write an xformer checkpoint directory that :func:`from_pretrained` reads:
    ``spec.json`` and ``model.safetensors`` (canonical names and dtypes, the spec also in the
    metadata), atomically (:func:`atomic_write_dir`).

    Raises:
        CheckpointError: ``weights`` do not match ``spec`` (all problems listed), or ``path``
            exists and holds other files.
    """
    data = _checkpoint_bytes(weights, spec)  # checks first
    atomic_write_dir(Path(path), {"spec.json": (spec.to_json() + "\n").encode(),
                                  "model.safetensors": data})


def _load_xformer_dir(root: Path, st: Path) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    specs = []
    for name in SPEC_FILES:
        f = root / name
        if f.is_file():
            try:
                specs.append((name, ModelSpec.load(f)))
            except SpecError as e:
                raise SpecError(f"{f}: {e}") from None
    try:
        stored = read_spec(st)
    except SpecError as e:
        raise CheckpointError(f"{st}: the spec in its metadata is invalid: {e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read checkpoint {str(st)!r} as safetensors: "
                              f"{str(e).splitlines()[0]}") from None
    if stored is not None:
        specs.append(("model.safetensors metadata", stored))
    if not specs:
        raise CheckpointError(f"{str(root)!r} has no config.json, no spec file "
                              f"({', '.join(SPEC_FILES)}) and model.safetensors stores no spec")
    first_name, spec = specs[0]
    for name, other in specs[1:]:
        if other != spec:
            a, b = spec.to_dict(), other.to_dict()
            diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
            raise CheckpointError(f"{root}: {first_name} and {name} hold different specs "
                                  f"({diff}); keep one")
    return load_weights(st, spec)


def from_pretrained(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Import a model directory into ``(spec, canonical weights)``.

    * Hugging Face directories (``config.json`` + ``model.safetensors``), dispatched on
      ``config.json``'s ``model_type``: ``bert`` (also when ``model_type`` is absent;
      :func:`xformer.convert.import_bert`: task heads such as ``cls.*`` dropped, a missing
      pooler gives ``head="none"``) and ``gpt2`` (:func:`xformer.convert.import_gpt2`).
    * xformer directories (no ``config.json``, as :func:`save_pretrained` writes them):
      ``model.safetensors`` with the spec in its metadata and/or a ``spec.json`` /
      ``spec.yaml`` / ``spec.yml`` next to it (all present ones must agree).

    Raises:
        CheckpointError: the directory or a file is missing, an unsupported ``model_type``
            (names the supported ones), specs that disagree, or tensors that do not match.
        SpecError: an unsupported ``config.json`` or a malformed spec file.
    """
    from .convert import SUPPORTED_MODEL_TYPES, _hf_safetensors, import_bert, import_gpt2
    from .convert import read_hf_config

    root = Path(path)
    st = _hf_safetensors(root)
    config = read_hf_config(root)
    if config is None:
        return _load_xformer_dir(root, st)
    model_type = config.get("model_type", "bert")
    if model_type == "bert":
        return import_bert(root, config)
    if model_type == "gpt2":
        return import_gpt2(root, config)
    raise CheckpointError(f"{root / 'config.json'}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")


# The Hugging Face BERT helpers live in xformer.convert; these names stay importable from here.
_MOVED_TO_CONVERT = ("_HF_ACTIVATIONS", "_BERT_LAYER_MAP", "spec_from_bert_config", "_bert_name")


def __getattr__(name: str):
    if name in _MOVED_TO_CONVERT:
        from . import convert

        return getattr(convert, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
