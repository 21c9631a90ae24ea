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
from typing import Any, Callable, Mapping

import numpy as np

from .errors import CheckpointError, SpecError
from .errors import truncate
from .resources import check_regular
from .spec import (OLD_MARKER, ModelSpec, atomic_write_bytes, clean_stale_temps,
                   cleanup_on_signal, fsync_dir, temp_path)

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
    bad_dtype = [f"{n} {_dtype(weights[n])}" for n in expected
                 if n in weights and not np.issubdtype(_dtype(weights[n]), np.floating)]
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


def _dtype(x: Any) -> np.dtype:
    return x.dtype if isinstance(getattr(x, "dtype", None), np.dtype) else np.asarray(x).dtype


# ---------------------------------------------------------------------- init
def init_weights(spec: ModelSpec, seed: int = 0, dtype: str = "float32") -> dict[str, np.ndarray]:
    """Fresh weights from each parameter's initialiser (``ParamSpec.init``), reproducible from
    ``seed`` with numpy's PCG64 generator, identical for every backend."""
    rng = np.random.default_rng(seed)
    out = {}
    for p in spec.parameters():
        if p.init == "zeros":
            arr = np.zeros(p.shape, dtype)
        elif p.init == "ones":
            arr = np.ones(p.shape, dtype)
        else:  # drawn in float64 chunks straight into the result: the same numbers as one
            # rng.normal call (the generator's stream does not depend on the chunking), without
            # a float64 copy of a whole (vocab_size, D) table
            arr = np.empty(p.shape, dtype)
            flat = arr.reshape(-1)
            for i in range(0, flat.size, _INIT_CHUNK):
                n = min(_INIT_CHUNK, flat.size - i)
                flat[i:i + n] = rng.normal(0.0, p.std, size=n)
        out[p.name] = arr
    return out


#: Elements drawn per call by :func:`init_weights` (32 MiB of float64).
_INIT_CHUNK = 1 << 22


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
    atomic_write_bytes(Path(path), _checkpoint_writer(weights, spec))


def read_spec(path: str | os.PathLike) -> ModelSpec | None:
    """The spec stored in a checkpoint's metadata, or ``None`` (read from the header alone).

    Raises:
        CheckpointError: not a readable safetensors file (:func:`safetensors_header`).
        SpecError: the stored spec is invalid.
    """
    return _stored_spec(safetensors_header(path))


def _stored_spec(header: Mapping[str, Any]) -> ModelSpec | None:
    meta = header.get("__metadata__") or {}
    text = meta.get(SPEC_METADATA_KEY) if isinstance(meta, dict) else None
    return ModelSpec.from_json(text) if isinstance(text, str) and text else None


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
    header = safetensors_header(path)  # checks the file and every offset before any data
    try:
        stored = _stored_spec(header)
    except SpecError as e:
        raise CheckpointError(f"cannot read checkpoint {truncate(str(path), 200)}: the spec in "
                              f"its metadata is invalid: {e}") from None
    spec = spec or stored
    if spec is None:
        raise CheckpointError(f"checkpoint {str(path)!r} stores no spec; pass --spec")
    source = f"tensors in {path.name}"
    check_weights(spec, header_tensors(header), source=source)  # names, shapes, dtypes: no data
    try:
        weights = load_file(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {e}") from None
    except Exception as e:  # safetensors raises its own SafetensorError
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} as safetensors: "
                              f"{str(e).splitlines()[0]}") from None
    return spec, check_weights(spec, weights, source=source)


def check_finite(weights: Mapping[str, np.ndarray], source: str = "weights") -> None:
    """Refuse weights holding NaN or infinity (loading them is fine, for inspection; comparing
    or running them is not: every backend would "disagree").

    Args:
        weights: ``{name: array}``, any floating dtype (integer arrays are always finite).
        source: what the weights are, for the message (``"tensors in w.safetensors"``).
    Raises:
        CheckpointError: names the first non-finite tensor, its first bad element and value,
            and counts the non-finite values and tensors.
    """
    bad: list[tuple[str, int]] = []
    first = ""
    for name, arr in weights.items():
        a = np.asarray(arr)
        if not np.issubdtype(a.dtype, np.inexact):
            continue
        finite = np.isfinite(a)
        if finite.all():
            continue
        n = int(a.size - np.count_nonzero(finite))
        if not bad:
            where = tuple(int(i) for i in np.argwhere(~finite)[0])
            first = f"{truncate(name, 120)}{list(where)} = {a[where]}"
        bad.append((name, n))
    if bad:
        total = sum(n for _, n in bad)
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source} hold {total} non-finite values: {first}{more}; a "
                              f"checkpoint with NaN or inf cannot be compared; fix or "
                              f"re-export it", details=[f"non-finite: {n} ({k})" for n, k in bad])


# ---------------------------------------------------------------------- directories
def atomic_write_dir(path: str | os.PathLike,
                     files: Mapping[str, bytes | Callable[[Path], None]]) -> None:
    """Write a directory of ``files`` (``{file name: bytes, or a function that writes the file
    it is given}``) atomically: everything goes into
    a temporary sibling directory ``.{name}.xformer-tmp-{pid}-{hex}.tmp`` (each file and the
    directory ``fsync``-ed), which is then renamed to ``path`` and the parent ``fsync``-ed, so a
    reader never sees a half-written directory.

    An existing ``path`` is replaced only if it is a directory holding nothing but files named
    in ``files`` (a previous save): it is moved aside (``.{name}.xformer-old-{pid}-{hex}.old``),
    the new one renamed in, the old one deleted (and restored if the rename fails). On
    SIGTERM/SIGINT the temporary directory is removed and the old one restored
    (:class:`xformer.spec.cleanup_on_signal`); the next save in the same parent cleans up after
    a SIGKILL (:func:`xformer.spec.clean_stale_temps`, which also puts back a moved-aside
    directory whose target is missing).

    Raises:
        CheckpointError: ``path`` exists and is not a directory, or holds other files (which
            replacing it would delete).
        OSError: the parent cannot be written (nothing is left behind).
    """
    import shutil

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
    clean_stale_temps(parent)
    tmp = temp_path(target)
    with cleanup_on_signal() as guard:
        try:
            guard.armed = True
            os.mkdir(tmp)
            for name, data in files.items():
                with open(tmp / name, "wb") as fh:
                    if callable(data):
                        data(tmp / name)
                    else:
                        fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
            fsync_dir(tmp)
            if target.exists():
                old = temp_path(target, OLD_MARKER)
                os.replace(target, old)
                try:
                    os.replace(tmp, target)
                except BaseException:
                    os.replace(old, target)
                    raise
                fsync_dir(parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, target)
                fsync_dir(parent)
            guard.armed = False
        except BaseException:
            guard.armed = False
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def safetensors_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]
                      ) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (any names, each stored
    contiguous, in its dtype) and the string ``metadata``."""
    from safetensors.numpy import save

    return save({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                metadata=dict(metadata))


def _checkpoint_writer(weights: Mapping[str, np.ndarray], spec: ModelSpec | None):
    """A function that writes the canonical checkpoint of ``weights`` (checked against
    ``spec`` first, here) to the path it is given: ``safetensors.numpy.save_file`` writes the
    arrays' memory as it is, so a save needs no second copy of the model."""
    from safetensors.numpy import save_file

    if spec is not None:
        weights = check_weights(spec, weights)
    metadata = {"format": "np"}
    if spec is not None:
        metadata[SPEC_METADATA_KEY] = spec.to_json(indent=None)
    tensors = {k: np.ascontiguousarray(v) for k, v in weights.items()}
    return lambda path: save_file(tensors, path, metadata=metadata)


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
    data = _checkpoint_writer(weights, spec)  # checks first
    atomic_write_dir(Path(path), {"spec.json": (spec.to_json() + "\n").encode(),
                                  "model.safetensors": data})


#: The index of a sharded Hugging Face checkpoint (``save_pretrained(max_shard_size=...)``):
#: ``{"weight_map": {tensor name: shard file name}}``, shards next to it.
INDEX_FILE = "model.safetensors.index.json"


def model_safetensors(root: str | os.PathLike, sharded: bool = False) -> Path:
    """``root/model.safetensors`` of a model directory (xformer or Hugging Face); with
    ``sharded``, else ``root/model.safetensors.index.json`` (:data:`INDEX_FILE`: a sharded
    Hugging Face checkpoint, read with :func:`model_header` / :func:`read_model`).

    Raises:
        CheckpointError: ``root`` is not a directory or holds neither file
            (``pytorch_model.bin`` is never read: it is a pickle).
    """
    root = Path(root)
    st = root / "model.safetensors"
    if not root.is_dir():
        raise CheckpointError(f"model directory {str(root)!r} does not exist")
    if st.is_file():
        return st
    if sharded and (root / INDEX_FILE).is_file():
        return root / INDEX_FILE
    also = f" or {INDEX_FILE}" if sharded else ""
    raise CheckpointError(f"{str(root)!r} has no model.safetensors{also} (pytorch_model.bin "
                          f"is not read: it is a pickle)")


def shard_map(index: str | os.PathLike) -> dict[str, Path]:
    """``{tensor name: shard path}`` of a :data:`INDEX_FILE` (its ``weight_map``).

    Raises:
        CheckpointError: the index is not a JSON object with a ``weight_map`` of names to file
            names, names a shard outside its folder (``../x``, ``/x``, a hidden file) or one
            that is not a regular file; over 16 MiB.
    """
    from .resources import read_capped

    index = Path(index)
    try:
        doc = json.loads(read_capped(index, what="checkpoint index").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{index} is not a JSON index ({type(e).__name__}); re-save the "
                              f"checkpoint") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict) or not wmap or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in wmap.items()):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard files")
    out = {}
    for name, shard in wmap.items():
        if Path(shard).name != shard or shard.startswith(".") or not shard:
            raise CheckpointError(f"{index}: shard {truncate(shard)} of {truncate(name)} is not "
                                  f"a file name in the checkpoint's folder")
        path = index.parent / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {truncate(shard)} (of {truncate(name)}) is "
                                  f"missing")
        out[name] = path
    return out


def model_header(st: str | os.PathLike) -> dict[str, Any]:
    """The tensors' header entries of ``st``: :func:`safetensors_header` of one file, or of
    every shard of an :data:`INDEX_FILE`, merged (each shard checked against its size before
    anything is read).

    Raises:
        CheckpointError: as :func:`safetensors_header` and :func:`shard_map`; a tensor in two
            shards, in a shard the index does not say, or listed but in no shard.
    """
    st = Path(st)
    if st.name != INDEX_FILE:
        return safetensors_header(st)
    wmap = shard_map(st)
    merged: dict[str, Any] = {}
    for shard in sorted(set(wmap.values())):
        for name, info in safetensors_header(shard).items():
            if name in ("__metadata__", "__data_start__"):
                continue
            if name in merged or wmap.get(name) != shard:
                where = wmap.get(name)
                raise CheckpointError(f"{st}: tensor {truncate(name)} is in {shard.name} but the "
                                      f"index says {where.name if where else 'nothing'}; "
                                      f"re-save the checkpoint")
            merged[name] = info
    missing = sorted(set(wmap) - set(merged))
    if missing:
        raise CheckpointError(f"{st} lists {len(missing)} tensors that no shard holds: "
                              f"{', '.join(truncate(m, 60) for m in missing[:3])}")
    return merged


def read_model(st: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of ``st``: :func:`read_safetensors` of one file, or of every shard of an
    :data:`INDEX_FILE` (check it with :func:`model_header` first)."""
    st = Path(st)
    if st.name != INDEX_FILE:
        return read_safetensors(st)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(shard_map(st).values())):
        out.update(read_safetensors(shard))
    return out


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
    except CheckpointError:
        raise
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
        CheckpointError: the file is missing, unreadable or not a safetensors file, or its
            header does not match its size (:func:`safetensors_header`, checked before any
            tensor is read).
    """
    from safetensors import safe_open

    path = Path(path)
    header = safetensors_header(path)
    out: dict[str, np.ndarray] = {}
    try:
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


#: Bytes per element of each safetensors dtype.
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2,
                        "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8,
                        "U64": 8, "F64": 8}
#: Largest safetensors header read (the library's own limit is 100 MB).
HEADER_LIMIT = 100_000_000


def _checkpoint_stat(path: Path) -> os.stat_result:
    """``os.stat`` of a readable regular file, else a ``CheckpointError`` naming why."""
    from .errors import InputError

    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint {truncate(str(path), 200)} does not exist")
    try:
        st = check_regular(path, limit=None, what="checkpoint")
        with open(path, "rb"):
            pass
    except InputError as e:
        raise CheckpointError(str(e)) from None
    except PermissionError:
        raise CheckpointError(f"checkpoint {truncate(str(path), 200)}: permission denied; make "
                              f"it readable (chmod +r)") from None
    except OSError as e:
        raise CheckpointError(f"checkpoint {truncate(str(path), 200)}: cannot read it "
                              f"({e.strerror})") from None
    return st


def safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file size before any tensor
    is read, plus ``"__data_start__"`` (the byte offset of the data section: 8 + header length).

    Checks: the file is a readable regular file; the header length (first 8 bytes, little
    endian) is at most :data:`HEADER_LIMIT` and the file; the header is a JSON object; every
    tensor has a known dtype, a shape of non-negative integers and ``data_offsets``
    ``[start, end]`` with ``end - start = prod(shape) * itemsize`` inside the data section;
    the tensors fill the data section exactly. So a truncated file, or a small (sparse) file
    whose header claims gigabytes, is refused from its first bytes.

    Raises:
        CheckpointError: the first problem found, naming the tensor.
    """
    path = Path(path)
    size = _checkpoint_stat(path).st_size
    where = f"cannot read checkpoint {truncate(str(path), 200)} as safetensors"
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{where}: it has {size} bytes, fewer than the 8 of a header "
                                  f"length")
        n = int.from_bytes(head, "little")
        if n < 2 or n > HEADER_LIMIT or n > size - 8:
            raise CheckpointError(f"{where}: bad header size ({n} bytes claimed, the file has "
                                  f"{size}); is it a safetensors file?")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointError(f"{where}: its header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: its header is not a JSON object")
    data_size = size - 8 - n
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            if not (info is None or isinstance(info, dict) and all(
                    isinstance(v, str) for v in info.values())):
                raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
            continue
        tensor = f"{where}: tensor {truncate(name, 120)}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{tensor} has no dtype/shape/data_offsets entry")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in SAFETENSORS_ITEMSIZE:
            raise CheckpointError(f"{tensor} has an unknown dtype {truncate(dtype)}")
        if not (isinstance(shape, list) and all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise CheckpointError(f"{tensor} has a bad shape {truncate(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{tensor} has bad data_offsets {truncate(offsets)}")
        nbytes = SAFETENSORS_ITEMSIZE[dtype]
        for d in shape:
            nbytes *= d
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{tensor} {dtype} {tuple(shape)} needs {nbytes} bytes, its "
                                  f"data_offsets give {offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise CheckpointError(f"{tensor} lies at bytes {offsets} of a data section of "
                                  f"{data_size} bytes: the file is truncated")
        total += nbytes
    if total != data_size:
        raise CheckpointError(f"{where}: its tensors hold {total} bytes, the data section "
                              f"{data_size}: the header does not describe the file")
    header["__data_start__"] = 8 + n
    return header


_safetensors_header = safetensors_header


class _HeaderTensor:
    """A tensor described by a header entry: ``shape`` and ``dtype``, no data."""

    def __init__(self, info: Mapping[str, Any]) -> None:
        self.shape = tuple(info["shape"])
        name = info["dtype"]
        self.dtype = np.dtype("float32" if name == "BF16" else "float16" if name == "F16"
                              else "bool" if name == "BOOL" else
                              name[0].replace("F", "float").replace("I", "int").replace(
                                  "U", "uint") + "".join(c for c in name if c.isdigit())
                              if name[:2] != "F8" else "uint8")
        self.ndim = len(self.shape)


def header_tensors(header: Mapping[str, Any]) -> dict[str, Any]:
    """``{name: object with .shape and .dtype}`` of a :func:`safetensors_header`, for checking
    names and shapes against a spec (:func:`check_weights`) before any data is read (``BF16``
    shows as ``float32``, ``F8_*`` as ``uint8``)."""
    return {k: _HeaderTensor(v) for k, v in header.items()
            if k not in ("__metadata__", "__data_start__")}


def _read_bf16(path: Path, header: Mapping[str, Any], name: str) -> np.ndarray:
    """Tensor ``name`` (stored as little-endian ``BF16``) widened exactly to ``float32``."""
    info = header[name]
    start, end = info["data_offsets"]
    with open(path, "rb") as fh:
        fh.seek(header["__data_start__"] + start)
        raw = np.frombuffer(fh.read(end - start), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
