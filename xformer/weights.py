"""Canonical checkpoints: safetensors files of ``{canonical name: array}`` (no pickle, ever).

An xformer checkpoint stores the spec as JSON in the safetensors metadata (key ``xformer_spec``),
so a single file is self-describing. Saves are atomic; loads check the tensors against the spec
and list every missing, extra and mis-shaped tensor in one ``CheckpointError``.

A checkpoint *directory* (:func:`save_pretrained`) adds a ``spec.json``; :func:`load_pretrained`
reads it back. This is the one module that reads and writes safetensors
(:func:`read_safetensors` reads any file, ``bfloat16`` included); :mod:`xformer.convert` maps
Hugging Face names onto these files, and :func:`xformer.convert.from_pretrained` reads both kinds
of directory. Layering: ``spec`` -> ``weights`` -> ``convert`` (no import goes the other way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import CheckpointError, SpecError
from .spec import ModelSpec, atomic_write_bytes

SPEC_METADATA_KEY = "xformer_spec"


# ---------------------------------------------------------------------- checking
#: How many tensors a checkpoint error names per kind of problem; the rest are counted, and
#: ``CheckpointError.details`` lists them all (printed by ``xformer --verbose``).
NAMES_SHOWN = 3


def shape_problems(expected: Mapping[str, tuple[int, ...]], found: Mapping[str, object],
                   extra_word: str = "extra", details: list[str] | None = None) -> list[str]:
    """The missing, extra (``extra_word``) and mis-shaped tensors of ``found`` against
    ``expected`` (``{name: shape}``), one phrase per kind, in ``expected``'s order, naming the
    first :data:`NAMES_SHOWN` and counting the rest (``"missing 71: a, b, c and 68 more"``).
    Every problem, one line per tensor (``"missing: a"``), is appended to ``details``."""
    missing = [n for n in expected if n not in found]
    extra = [n for n in found if n not in expected]
    misshaped = [f"{n} {tuple(np.shape(found[n]))} (expected {tuple(expected[n])})"
                 for n in expected if n in found and tuple(np.shape(found[n])) != tuple(
                     expected[n])]
    problems = []
    for word, names in (("missing", missing), (extra_word, extra), ("mis-shaped", misshaped)):
        if names:
            problems.append(summarize(word, names))
            if details is not None:
                details += [f"{word}: {n}" for n in names]
    return problems


def summarize(word: str, names: list[str]) -> str:
    """``"word N: first, second, third and N-3 more"`` (:data:`NAMES_SHOWN` names)."""
    more = f" and {len(names) - NAMES_SHOWN} more" if len(names) > NAMES_SHOWN else ""
    return f"{word} {len(names)}: {', '.join(names[:NAMES_SHOWN])}{more}"


def check_weights(spec: ModelSpec, weights: Mapping[str, np.ndarray], *, source: str = "weights"
                  ) -> dict[str, np.ndarray]:
    """Check ``weights`` against ``spec.parameters()`` and return them in canonical order.

    Raises:
        CheckpointError: counts the missing, extra and mis-shaped tensors (name, expected
            shape, found shape) and non-floating dtypes, naming the first few of each kind;
            its ``details`` list every one.
    """
    expected = spec.parameter_shapes()
    details: list[str] = []
    problems = shape_problems(expected, weights, details=details)
    bad_dtype = [f"{n} {np.asarray(weights[n]).dtype}" for n in expected
                 if n in weights and not np.issubdtype(np.asarray(weights[n]).dtype, np.floating)]
    if bad_dtype:
        problems.append(summarize("not floating point", bad_dtype))
        details += [f"not floating point: {n}" for n in bad_dtype]
    if problems:
        raise CheckpointError(f"{source} do not match the spec: " + "; ".join(problems)
                              + " (was it saved for another spec?"
                              + ("; --verbose lists every tensor)" if any(
                                  p.endswith(" more") for p in problems) else ")"),
                              details=details)
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


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
                      ) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (any names, each stored
    contiguous, in its dtype) and the string ``metadata``."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata=dict(metadata))


def _checkpoint_bytes(weights: Mapping[str, np.ndarray], spec: ModelSpec | None) -> bytes:
    if spec is not None:
        weights = check_weights(spec, weights)
    metadata = {"format": "np"}
    if spec is not None:
        metadata[SPEC_METADATA_KEY] = spec.to_json(indent=None)
    return safetensors_bytes(weights, metadata)


#: Spec files an xformer checkpoint directory may hold next to ``model.safetensors``.
SPEC_FILES = ("spec.json", "spec.yaml", "spec.yml")


def save_pretrained(path: str | os.PathLike, spec: ModelSpec, weights: Mapping[str, np.ndarray]
                    ) -> None:
    """Write an xformer checkpoint directory that :func:`load_pretrained` (and
    :func:`xformer.convert.from_pretrained`) reads:
    ``spec.json`` and ``model.safetensors`` (canonical names and dtypes, the spec also in the
    metadata), atomically (:func:`atomic_write_dir`).

    Raises:
        CheckpointError: ``weights`` do not match ``spec`` (all problems listed), or ``path``
            exists and holds other files.
    """
    data = _checkpoint_bytes(weights, spec)  # checks first
    atomic_write_dir(Path(path), {"spec.json": (spec.to_json() + "\n").encode(),
                                  "model.safetensors": data})


def model_safetensors(root: str | os.PathLike) -> Path:
    """``root/model.safetensors`` of a model directory (xformer or Hugging Face).

    Raises:
        CheckpointError: ``root`` is not a directory or holds no ``model.safetensors``
            (``pytorch_model.bin`` is never read: it is a pickle).
    """
    root = Path(root)
    st = root / "model.safetensors"
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist")
    if not st.is_file():
        raise CheckpointError(f"{str(root)!r} has no model.safetensors (pytorch_model.bin is "
                              f"not read: it is a pickle)")
    return st


def load_pretrained(path: str | os.PathLike) -> tuple[ModelSpec, dict[str, np.ndarray]]:
    """Read an xformer checkpoint directory (as :func:`save_pretrained` writes it):
    ``model.safetensors`` with the spec in its metadata and/or a ``spec.json`` / ``spec.yaml``
    / ``spec.yml`` next to it; every spec present must be the same.

    Raises:
        CheckpointError: no directory, no ``model.safetensors``, no spec anywhere, specs that
            disagree (the differing fields named), or tensors that do not match the spec.
        SpecError: a malformed spec file (its path named).
    """
    root = Path(path)
    st = model_safetensors(root)
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


# ---------------------------------------------------------------------- any safetensors file
def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (any naming, e.g. a Hugging Face checkpoint) as
    numpy, in the stored dtype; ``bfloat16`` (which numpy lacks) is widened exactly to
    ``float32`` (its bits are the high half of a float32).

    Raises:
        CheckpointError: the file is missing or is not a safetensors file.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    out: dict[str, np.ndarray] = {}
    try:
        header = _safetensors_header(path)
        with safe_open(str(path), framework="np") as fh:
            for name in fh.keys():
                if header.get(name, {}).get("dtype") == "BF16":
                    out[name] = _read_bf16(path, header, name)
                else:
                    out[name] = fh.get_tensor(name)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read {str(path)!r} as safetensors: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
                              ) from None
    return out


def _safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, plus ``"__data_start__"`` (the byte offset of
    the data section: 8 + header length)."""
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise CheckpointError(f"cannot read {str(path)!r} as safetensors: bad header size")
        header = json.loads(fh.read(n))
    header["__data_start__"] = 8 + n
    return header


def _read_bf16(path: Path, header: Mapping[str, Any], name: str) -> np.ndarray:
    """Tensor ``name`` (stored as little-endian ``BF16``) widened exactly to ``float32``."""
    info = header[name]
    start, end = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(header["__data_start__"] + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
