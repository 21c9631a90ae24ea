"""Resource bounds checked before any work: capped reads of small input files, and a memory
estimate of a model from its spec (docs/design.md; issue #8).

* :func:`read_capped` reads a spec, ``config.json``, ``tokenizer.json`` or ``config.toml``: it
  refuses what is not a regular file (a directory, a FIFO, which would block, a device such as
  ``/dev/zero``, which never ends, a socket) and a file over the cap, from ``os.stat`` alone,
  before reading a byte.
* :func:`check_memory` estimates the bytes a model needs (parameters, activations, gradients,
  the key/value cache of beam search) from the spec, and refuses with
  ``"needs 14.9 GiB; 5.2 GiB available; use --force to try"`` before anything is allocated.

Layering: this module imports only the standard library and :mod:`xformer.errors` (a spec is
taken duck-typed), so every other module may use it.
"""

from __future__ import annotations

import os
import stat

from .errors import InputError, truncate

MiB = 1 << 20
GiB = 1 << 30

#: Default cap of :func:`read_capped`: specs, ``config.json``, ``config.toml`` (a real one is
#: under 4 KiB) and ``tokenizer.json`` (bert-base-uncased's is 0.7 MB, multilingual ones a few
#: MB).
DEFAULT_LIMIT = 16 * MiB

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _os_error(path: str | os.PathLike, what: str, e: OSError) -> InputError:
    """The one-line ``InputError`` of an ``OSError`` met opening or reading ``path``."""
    name = truncate(str(path), 200)
    if isinstance(e, FileNotFoundError):
        return InputError(f"{what} {name}: no such file; check the path")
    if isinstance(e, PermissionError):
        return InputError(f"{what} {name}: permission denied; make it readable (chmod +r) "
                          f"or copy it somewhere readable")
    if isinstance(e, NotADirectoryError):
        return InputError(f"{what} {name}: a part of the path is not a directory; check the "
                          f"path")
    if isinstance(e, IsADirectoryError):
        return InputError(f"{what} {name} is not a regular file (a directory); give a file")
    return InputError(f"{what} {name}: cannot read it ({e.strerror or type(e).__name__})")


def check_regular(path: str | os.PathLike, *, limit: int | None = DEFAULT_LIMIT,
                  what: str = "spec") -> os.stat_result:
    """``os.stat(path)`` of a regular file no larger than ``limit`` bytes (``None``: no cap).

    Raises:
        InputError: missing (``"no such file"``), unreadable (``"permission denied"``), not a
            regular file (directory, FIFO, device, socket; nothing is opened, so a FIFO cannot
            block), or larger than ``limit``.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        raise _os_error(path, what, e) from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a file")
        raise InputError(f"{what} {truncate(str(path), 200)} is not a regular file ({kind}); "
                         f"give a file")
    if limit is not None and st.st_size > limit:
        raise InputError(f"{what} {truncate(str(path), 200)} is {_size(st.st_size)}, over the "
                         f"{_size(limit)} limit for a {what}; is it the right file?")
    return st


def read_capped(path: str | os.PathLike, *, limit: int = DEFAULT_LIMIT, what: str = "spec"
                ) -> bytes:
    """The bytes of a small input file (a spec, ``config.json``, ``tokenizer.json``,
    ``config.toml``), read only if it is a regular file of at most ``limit`` bytes.

    Args:
        path: the file. limit: the cap in bytes (default :data:`DEFAULT_LIMIT`, 16 MiB).
        what: what the file is, for the message (``"spec"``, ``"config.json"``...).
    Returns:
        ``bytes``, at most ``limit`` of them (a file that grows while read is cut off and
        refused).
    Raises:
        InputError: see :func:`check_regular`; also a file that grows past ``limit`` while
            it is read.
    """
    check_regular(path, limit=limit, what=what)
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise _os_error(path, what, e) from None
    if len(data) > limit:
        raise InputError(f"{what} {truncate(str(path), 200)} is over the {_size(limit)} limit "
                         f"for a {what}; is it the right file?")
    return data


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"


# ---------------------------------------------------------------------- memory
#: Activations kept per token and layer, in units of ``d_model``: the layer input, Q, K, V,
#: the attention context, the output projection, two residual sums and two LayerNorm outputs
#: (10), plus the feed-forward network's inner activation and its GELU (2 ``d_ff``, counted
#: apart). Attention scores and probabilities add ``2 n_heads T`` per token and layer.
ACTIVATION_D_MODEL = 10
ACTIVATION_D_FF = 2
ACTIVATION_SCORES = 2
#: Training holds parameters, their gradients and the activations' gradients: the forward
#: estimate times 3.
BACKWARD_FACTOR = 3
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def estimate_memory(spec, dtype: str = "float32", *, batch: int = 1, seq_len: int | None = None,
                    num_beams: int = 1, backward: bool = False) -> int:
    """Bytes a model of ``spec`` needs for one call, estimated from the spec alone (nothing is
    allocated): parameters ``spec.num_parameters() * itemsize``; activations
    ``B * beams * T * L * (10 D + 2 F + 2 H T)`` (:data:`ACTIVATION_D_MODEL` etc.), plus
    ``B * beams * T * vocab_size`` logits with an LM head; the key/value cache of generation
    ``2 * B * beams * T * L_dec * H_kv * d_head``; with ``positional="rope"`` the rotary
    tables, ``cos`` and ``sin`` ``(max_len, rotary_dim / 2)`` held by every self-attention
    (``L * max_len * rotary_dim``); all times :data:`BACKWARD_FACTOR` with ``backward``.

    Args:
        spec: a :class:`xformer.ModelSpec` (duck-typed). dtype: ``"float32"``, ``"float64"``...
        batch, num_beams: positive integers. seq_len: tokens per row (default ``spec.max_len``).
    Raises:
        InputError: an unknown dtype, or a non-positive ``batch`` / ``seq_len`` / ``num_beams``.
    """
    if dtype not in ITEMSIZE:
        raise InputError(f"dtype {truncate(dtype)} is not one of {', '.join(ITEMSIZE)}")
    t = spec.max_len if seq_len is None else seq_len
    for name, v in (("batch", batch), ("seq_len", t), ("num_beams", num_beams)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {truncate(v)}")
    item = ITEMSIZE[dtype]
    d, f, h = spec.d_model, spec.d_ff, spec.n_heads
    layers = spec.encoder_layers + spec.decoder_layers
    rows = batch * num_beams
    acts = rows * t * layers * (ACTIVATION_D_MODEL * d + ACTIVATION_D_FF * f
                                + ACTIVATION_SCORES * h * t)
    if spec.head == "lm":
        acts += rows * t * spec.vocab_size
    kv = getattr(spec, "kv_heads", h) * getattr(spec, "d_head", d // h)
    cache = 2 * rows * t * spec.decoder_layers * kv if num_beams > 1 or spec.is_causal else 0
    tables = layers * spec.max_len * getattr(spec, "rotary_dim", 0)
    total = (spec.num_parameters() + acts + cache + tables) * item
    return total * BACKWARD_FACTOR if backward else total


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation: ``MemAvailable`` of ``/proc/meminfo``,
    else ``os.sysconf`` free pages times the page size; ``None`` if neither is known."""
    try:
        with open("/proc/meminfo", "rb") as fh:
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(spec, dtype: str = "float32", *, batch: int = 1, seq_len: int | None = None,
                 num_beams: int = 1, backward: bool = False, force: bool = False,
                 available: int | None = None) -> int:
    """Refuse, before anything is allocated, a model and call that need more memory than is
    available (:func:`estimate_memory`, :func:`available_memory`).

    Args:
        spec, dtype, batch, seq_len, num_beams, backward: as :func:`estimate_memory`.
        force: never refuse (``--force``).
        available: bytes available (default: :func:`available_memory`; unknown: never refuse).
    Returns:
        The estimate in bytes (``int``).
    Raises:
        InputError: ``"the model needs 14.9 GiB; 5.2 GiB available; use --force to try"``.
    """
    need = estimate_memory(spec, dtype, batch=batch, seq_len=seq_len, num_beams=num_beams,
                           backward=backward)
    have = available_memory() if available is None else available
    if not force and have is not None and need > have:
        raise InputError(f"the model ({spec.num_parameters():,} parameters, {dtype}"
                         + (f", {num_beams} beams" if num_beams > 1 else "")
                         + f") needs {need / GiB:.1f} GiB; {have / GiB:.1f} GiB available; "
                         f"use --force to try")
    return need


__all__ = ["DEFAULT_LIMIT", "read_capped", "check_regular", "estimate_memory",
           "available_memory", "check_memory"]
