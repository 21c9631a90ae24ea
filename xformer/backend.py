"""The ``Backend`` protocol, the backend registry and backend selection.

A backend lowers a :class:`~xformer.spec.ModelSpec` to a native module of one framework and moves
canonical numpy weights, inputs, outputs and gradients in and out of it. The three built-in
backends (``torch``, ``tensorflow``, ``mxnet``) live in ``backends/xformer_<name>/backend.py``
and are found through the entry-point group ``xformer.backends``, so a fourth backend is a
package that declares one entry point (the pattern of einops' ``_backends.py``).

Picking a backend, most specific wins: the ``backend=`` argument (or the CLI's ``--backend``) >
the environment variable ``XFORMER_BACKEND`` > ``backend = "..."`` in ``./xformer.toml`` or
``~/.config/xformer/config.toml`` > ``"torch"``.
"""

from __future__ import annotations

import os
import time
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import BackendError, InputError
from .spec import ModelSpec

DTYPES = ("float32", "float64")
DEFAULT_BACKEND = "torch"
ENTRY_POINT_GROUP = "xformer.backends"

# Used when xformer runs from a source tree that was not pip-installed (no entry points).
_BUILTIN = {
    "torch": "xformer_torch.backend:TorchBackend",
    "tensorflow": "xformer_tensorflow.backend:TensorFlowBackend",
    "mxnet": "xformer_mxnet.backend:MXNetBackend",
}
_EXTRAS = {"torch": "torch", "tensorflow": "tensorflow", "mxnet": "mxnet"}
_FRAMEWORK_MODULES = {"torch": "torch", "tensorflow": "tensorflow", "mxnet": "mxnet"}


class Backend:
    """What every backend provides. Subclasses import their framework lazily (in ``__init__``),
    so listing backends never imports a framework.

    Arrays cross the boundary as numpy, in canonical names and layout (DESIGN.md §2):

    * **inputs** ``{"input_ids": (B, T) int64, "attention_mask": (B, T) 1 = attend / 0 = padding,
      "token_type_ids": (B, T) int64}``, or ``"inputs_embeds": (B, T, D)`` (the already scaled
      token embeddings) instead of ``input_ids``. ``attention_mask`` and ``token_type_ids`` are
      optional (all ones / all zeros).
    * **outputs** ``{"last_hidden_state": (B, T, D), "pooler_output": (B, D)}`` (the latter with
      ``head="pooler"``), in the model's dtype.
    * **gradients** of ``sum_k sum(outputs[k] * cotangents[k])`` w.r.t. every canonical parameter
      (canonical layout) and w.r.t. ``"inputs_embeds"``: the token embeddings after
      ``embed_scale``, whether they were looked up from ``input_ids`` or given.

    Attributes:
        name: registry name, e.g. ``"torch"``.
        extra: the pip extra that installs the framework (``pip install 'xformer[torch]'``).
        modes: every execution mode; ``default_modes`` those conformance runs by default.
        preferred_mode: the mode of a call that names none (``xformer embed``, user code): the
            fast one for the framework (DESIGN.md §7: Keras compiled with ``tf.function``, Gluon
            hybridized, torch eager).
    """

    name: str = ""
    extra: str = ""
    modes: tuple[str, ...] = ()
    default_modes: tuple[str, ...] = ()
    preferred_mode: str = ""

    # -- to implement --------------------------------------------------------------------
    def build(self, spec: ModelSpec, dtype: str = "float32") -> Any:
        """The native top-level module for ``spec`` (``EncoderModel``), parameters in ``dtype``."""
        raise NotImplementedError

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights (every name of ``spec.parameters()``, cast to the model dtype)."""
        raise NotImplementedError

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        """The model's parameters as canonical ``{name: array}``."""
        raise NotImplementedError

    def forward(self, model: Any, inputs: Mapping[str, np.ndarray], mode: str | None = None
                ) -> dict[str, np.ndarray]:
        """Outputs for ``inputs`` with dropout off, in ``mode`` (default: ``preferred_mode``)."""
        raise NotImplementedError

    def forward_backward(self, model: Any, inputs: Mapping[str, np.ndarray],
                         cotangents: Mapping[str, np.ndarray], mode: str | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(outputs, gradients)``: see the class docstring for the loss and the names."""
        raise NotImplementedError

    def framework_version(self) -> str:
        """The framework's version string, e.g. ``"2.13.0+cpu"``."""
        raise NotImplementedError

    # -- shared -------------------------------------------------------------------------
    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.preferred_mode or self.modes[0]
        if mode not in self.modes:
            raise BackendError(f"backend {self.name!r} has no mode {mode!r}; "
                               f"modes: {', '.join(self.modes)}")
        return mode

    def __repr__(self) -> str:
        return f"<xformer backend {self.name!r}>"


def check_dtype(dtype: Any) -> str:
    """``"float32"`` or ``"float64"`` (numpy dtypes accepted); raises ``InputError`` otherwise."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


def check_inputs(spec: ModelSpec, inputs: Mapping[str, Any], dtype: str = "float32"
                 ) -> dict[str, np.ndarray]:
    """Validate and normalise model inputs (see :class:`Backend`) to numpy.

    Returns a dict with ``attention_mask`` (B, T) in ``dtype``, ``input_ids`` / ``inputs_embeds``
    and ``token_type_ids`` (int64) when the spec has segment embeddings.

    Raises:
        InputError: unknown keys, neither or both of ``input_ids``/``inputs_embeds``, wrong rank,
            sequence longer than ``spec.max_len``, token id outside ``[0, vocab_size)``,
            token type outside ``[0, type_vocab_size)``, mismatched shapes.
    """
    known = {"input_ids", "inputs_embeds", "attention_mask", "token_type_ids"}
    unknown = set(inputs) - known
    if unknown:
        raise InputError(f"unknown model inputs {sorted(unknown)}; expected {sorted(known)}")
    has_ids = inputs.get("input_ids") is not None
    has_embeds = inputs.get("inputs_embeds") is not None
    if has_ids == has_embeds:
        raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
    out: dict[str, np.ndarray] = {}
    if has_ids:
        ids = np.asarray(inputs["input_ids"])
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids must be an integer array of shape (B, T), got "
                             f"{ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
            bad = int(ids.max()) if ids.max() >= spec.vocab_size else int(ids.min())
            raise InputError(f"token id {bad} is outside [0, vocab_size={spec.vocab_size})")
        out["input_ids"] = ids.astype(np.int64)
        b, t = ids.shape
    else:
        emb = np.asarray(inputs["inputs_embeds"])
        if emb.ndim != 3 or emb.shape[-1] != spec.d_model:
            raise InputError(f"inputs_embeds must have shape (B, T, d_model={spec.d_model}), "
                             f"got {emb.shape}")
        out["inputs_embeds"] = emb.astype(dtype)
        b, t = emb.shape[:2]
    if t > spec.max_len:
        raise InputError(f"sequence length {t} is longer than max_len={spec.max_len}; "
                         f"shorten the input (xformer does not truncate silently)")
    if t == 0:
        raise InputError("sequence length is 0; give at least one token")
    mask = inputs.get("attention_mask")
    mask = np.ones((b, t)) if mask is None else np.asarray(mask)
    if mask.shape != (b, t):
        raise InputError(f"attention_mask must have shape (B, T) = {(b, t)}, got {mask.shape}")
    out["attention_mask"] = mask.astype(dtype)
    if spec.type_vocab_size:
        tt = inputs.get("token_type_ids")
        tt = np.zeros((b, t), np.int64) if tt is None else np.asarray(tt)
        if tt.shape != (b, t) or not np.issubdtype(tt.dtype, np.integer):
            raise InputError(f"token_type_ids must be integers of shape {(b, t)}, got "
                             f"{tt.dtype} {tt.shape}")
        if tt.size and (tt.min() < 0 or tt.max() >= spec.type_vocab_size):
            raise InputError(f"token type id outside [0, type_vocab_size="
                             f"{spec.type_vocab_size})")
        out["token_type_ids"] = tt.astype(np.int64)
    elif inputs.get("token_type_ids") is not None:
        raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
    return out


# ---------------------------------------------------------------------- registry
def _entry_points() -> dict[str, str]:
    found = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {**_BUILTIN, **found}


def available_backends() -> list[str]:
    """Names of every registered backend (installed or not); imports no framework."""
    return list(_entry_points())


def is_installed(name: str) -> bool:
    """Whether the framework behind backend ``name`` can be imported (without importing it)."""
    import importlib.util

    module = _FRAMEWORK_MODULES.get(name)
    return module is None or importlib.util.find_spec(module) is not None


_CACHE: dict[str, Backend] = {}


def get_backend(name: str | None = None) -> Backend:
    """The backend instance for ``name`` (resolved with :func:`resolve_backend_name`).

    Raises:
        BackendError: unknown name (lists the known ones) or framework not installed (names the
            pip extra).
    """
    name = resolve_backend_name(name)
    if name in _CACHE:
        return _CACHE[name]
    eps = _entry_points()
    if name not in eps:
        raise BackendError(f"unknown backend {name!r}; backends: {', '.join(eps)}")
    if not is_installed(name):
        extra = _EXTRAS.get(name, name)
        raise BackendError(f"backend {name!r} needs {_FRAMEWORK_MODULES[name]}, which is not "
                           f"installed: pip install 'xformer[{extra}]'")
    module_name, _, attr = eps[name].partition(":")
    import importlib

    try:
        cls = getattr(importlib.import_module(module_name), attr)
        backend = cls()
    except ImportError as e:
        extra = _EXTRAS.get(name, name)
        raise BackendError(f"backend {name!r} could not be imported ({e}); "
                           f"pip install 'xformer[{extra}]'") from None
    _CACHE[name] = backend
    return backend


def _config_backend() -> str | None:
    for path in (Path.cwd() / "xformer.toml", Path.home() / ".config" / "xformer" / "config.toml"):
        if path.is_file():
            try:
                data = tomllib.loads(path.read_text())
            except tomllib.TOMLDecodeError as e:
                raise BackendError(f"config file {path} is not valid TOML: {e}") from None
            if "backend" in data:
                return str(data["backend"])
    return None


def resolve_backend_name(name: str | None = None) -> str:
    """``name`` > ``$XFORMER_BACKEND`` > config file ``backend`` > ``"torch"``."""
    return name or os.environ.get("XFORMER_BACKEND") or _config_backend() or DEFAULT_BACKEND


def build(spec: ModelSpec, backend: str | None = None, dtype: str = "float32",
          weights: Mapping[str, np.ndarray] | None = None) -> Any:
    """Lower ``spec`` to a native module: ``torch.nn.Module``, ``keras.Layer`` or
    ``mxnet.gluon.HybridBlock``.

    Args:
        spec: the model.
        backend: ``"torch"``, ``"tensorflow"`` or ``"mxnet"``; ``None`` picks it from
            ``$XFORMER_BACKEND``, a config file or the default (see the module docstring).
        dtype: ``"float32"`` or ``"float64"`` for every parameter and activation.
        weights: canonical weights to load (e.g. from :func:`xformer.load_weights`); random
            framework initialisation otherwise.

    Raises:
        BackendError: unknown or uninstalled backend. CheckpointError: weights that do not match.
    """
    from .weights import check_weights

    be = get_backend(backend)
    dtype = check_dtype(dtype)
    model = be.build(spec, dtype)
    if weights is not None:
        be.set_weights(model, check_weights(spec, weights))
    return model


def timed(fn, *args, repeats: int = 5, warmup: int = 1, **kwargs) -> tuple[Any, float]:
    """``(result of the last call, median seconds per call)`` after ``warmup`` untimed calls."""
    result = None
    for _ in range(warmup):
        result = fn(*args, **kwargs)
    times = []
    for _ in range(max(repeats, 1)):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return result, float(np.median(times))
