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

    # -- divergence localisation ---------------------------------------------------------
    def trace(self, model: Any, inputs: Mapping[str, np.ndarray],
              cotangents: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray]]:
        """Record every node of ``spec.nodes()`` during one forward + backward pass (eager /
        imperative, dropout off; the model is left as it was).

        Returns:
            ``(forward, backward)``: ``forward[name]`` is the node's output and
            ``backward[name]`` the gradient of ``sum_k sum(outputs[k] * cotangents[k])`` with
            respect to that output, both numpy in the model dtype, keyed by node name.
        """
        raise NotImplementedError

    # -- incremental decoding (decoder, encoder-decoder) ----------------------------------
    def decode(self, model: Any, inputs: Mapping[str, np.ndarray], cache: Any = None
               ) -> tuple[np.ndarray, Any]:
        """One step of cached (incremental) decoding, dropout off.

        Args:
            inputs: decoder: ``{"input_ids": (B, T_new), "attention_mask": (B, past + T_new)}``
                (mask optional). Encoder-decoder: the first call ``{"input_ids",
                "attention_mask", "decoder_input_ids"}`` runs the encoder and caches the
                cross-attention keys/values; later calls ``{"decoder_input_ids",
                "decoder_attention_mask"}`` (mask optional) reuse them.
            cache: ``None`` on the first call, then what the previous call returned.

        A step that leaves out the decoded side's mask keeps the cached mask and counts the new
        positions as attended (what :mod:`xformer.generation` relies on). Positions with no
        allowed key (left padding, fully padded rows) attend uniformly over *all* keys, so
        there cached and full decoding legitimately differ (``past + new`` keys against ``T``);
        every other position matches a full forward pass.

        Returns:
            ``(logits, cache)``: ``logits`` ``(B, T_new, vocab_size)`` numpy in the model dtype
            (the same numbers as a full forward pass at those positions), and the new cache,
            a native object: per decoder layer the self-attention keys and values
            ``(B, H, past + T_new, d_head)`` (and the cross-attention ones).

        Raises:
            InputError: an encoder, ``head != "lm"``, past + new positions over ``max_len``,
                a batch size that does not match the cache.
        """
        raise NotImplementedError

    def reorder_cache(self, model: Any, cache: Any, beam_idx: np.ndarray) -> Any:
        """The cache with its batch rows gathered by ``beam_idx`` ``(N,)`` int64 (beam search
        keeps, duplicates and drops hypotheses)."""
        raise NotImplementedError

    def generate(self, model: Any, input_ids: np.ndarray, **kwargs: Any) -> list[list[int]]:
        """Greedy or beam-search generation with the key/value cache: see
        :func:`xformer.generation.generate` for the arguments. The search itself is shared
        numpy code, so every backend makes the same choices from the same logits."""
        from .generation import generate

        return generate(self, model, input_ids, **kwargs)

    # -- shared -------------------------------------------------------------------------
    def check_mode(self, mode: str | None) -> str:
        mode = mode or self.preferred_mode or self.modes[0]
        if mode not in self.modes:
            raise BackendError(f"backend {self.name!r} has no mode {mode!r}; "
                               f"modes: {', '.join(self.modes)}")
        return mode

    def __repr__(self) -> str:
        return f"<xformer backend {self.name!r}>"


def check_cotangent_names(spec: ModelSpec, cotangents: Mapping[str, Any]) -> None:
    """Raise ``InputError`` unless ``cotangents`` has exactly the keys of
    ``spec.output_names()`` (what every backend accepts)."""
    names = spec.output_names()
    if set(cotangents) != set(names):
        raise InputError(f"cotangents must have exactly the keys {list(names)}, got "
                         f"{sorted(cotangents)}")


def check_dtype(dtype: Any) -> str:
    """``"float32"`` or ``"float64"`` (numpy dtypes accepted); raises ``InputError`` otherwise."""
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = str(dtype)
    if name not in DTYPES:
        raise InputError(f"dtype must be float32 or float64, got {dtype!r}")
    return name


def check_inputs(spec: ModelSpec, inputs: Mapping[str, Any], dtype: str = "float32", *,
                 past_length: int = 0, encoder: bool = True) -> dict[str, np.ndarray]:
    """Validate and normalise model inputs (see :class:`Backend`) to numpy.

    Args:
        spec: the model.
        inputs: ``input_ids`` (B, T) or ``inputs_embeds`` (B, T, D), ``attention_mask`` (B, T),
            ``token_type_ids`` (B, T) (encoders); for an encoder-decoder also
            ``decoder_input_ids`` or ``decoder_inputs_embeds`` and ``decoder_attention_mask``.
        dtype: the model dtype; masks and embeddings are cast to it.
        past_length: positions already in the key/value cache of the decoded side (incremental
            decoding): positions then run from ``past_length``, and the decoded side's
            attention mask covers ``past_length + T`` positions.
        encoder: whether the encoder inputs of an encoder-decoder must be there (False for
            decoding steps after the first, which reuse the cached encoder output).

    Returns:
        The inputs as int64 ids / ``dtype`` arrays, masks filled in with ones.

    Raises:
        InputError: unknown keys, neither or both of ids / embeddings, wrong rank or shape,
            sequence longer than ``spec.max_len``, token id outside ``[0, vocab_size)``,
            token type outside ``[0, type_vocab_size)``.
    """
    arch = spec.architecture
    sides = [""] if arch != "encoder-decoder" else (["", "decoder_"] if encoder else
                                                     ["decoder_"])
    known = {"token_type_ids"} if spec.type_vocab_size else set()
    for prefix in ("", "decoder_") if arch == "encoder-decoder" else ("",):
        known |= {f"{prefix}input_ids", f"{prefix}inputs_embeds", f"{prefix}attention_mask"}
    unknown = {k for k, v in inputs.items() if v is not None} - known
    if unknown:
        raise InputError(f"unknown model inputs {sorted(unknown)} for a {arch}; expected "
                         f"{sorted(known)}")
    out: dict[str, np.ndarray] = {}
    decoded = "decoder_" if arch == "encoder-decoder" else ("" if arch == "decoder" else None)
    for prefix in sides:
        past = past_length if prefix == decoded else 0
        out.update(_check_side(spec, inputs, dtype, prefix, past))
    if spec.type_vocab_size:
        b, t = out["attention_mask"].shape
        tt = inputs.get("token_type_ids")
        tt = np.zeros((b, t), np.int64) if tt is None else np.asarray(tt)
        if tt.shape != (b, t) or not np.issubdtype(tt.dtype, np.integer):
            raise InputError(f"token_type_ids must be integers of shape {(b, t)}, got "
                             f"{tt.dtype} {tt.shape}")
        if tt.size and (tt.min() < 0 or tt.max() >= spec.type_vocab_size):
            raise InputError(f"token type id outside [0, type_vocab_size="
                             f"{spec.type_vocab_size})")
        out["token_type_ids"] = tt.astype(np.int64)
    return out


def _check_side(spec: ModelSpec, inputs: Mapping[str, Any], dtype: str, prefix: str,
                past: int) -> dict[str, np.ndarray]:
    ids_key, emb_key, mask_key = (f"{prefix}input_ids", f"{prefix}inputs_embeds",
                                  f"{prefix}attention_mask")
    has_ids = inputs.get(ids_key) is not None
    has_embeds = inputs.get(emb_key) is not None
    if has_ids == has_embeds:
        raise InputError(f"give exactly one of {ids_key} (B, T) and {emb_key} (B, T, D)")
    out: dict[str, np.ndarray] = {}
    if has_ids:
        ids = np.asarray(inputs[ids_key])
        if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"{ids_key} must be an integer array of shape (B, T), got "
                             f"{ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
            bad = int(ids.max()) if ids.max() >= spec.vocab_size else int(ids.min())
            raise InputError(f"token id {bad} is outside [0, vocab_size={spec.vocab_size})")
        out[ids_key] = ids.astype(np.int64)
        b, t = ids.shape
    else:
        emb = np.asarray(inputs[emb_key])
        if emb.ndim != 3 or emb.shape[-1] != spec.d_model:
            raise InputError(f"{emb_key} must have shape (B, T, d_model={spec.d_model}), "
                             f"got {emb.shape}")
        out[emb_key] = emb.astype(dtype)
        b, t = emb.shape[:2]
    if t == 0:
        raise InputError(f"{ids_key} has sequence length 0; give at least one token")
    if past + t > spec.max_len:
        what = f"sequence length {t}" if not past else f"{past} cached + {t} new positions"
        raise InputError(f"{what} is longer than max_len={spec.max_len}; shorten the input "
                         f"(xformer does not truncate silently)")
    mask = inputs.get(mask_key)
    mask = np.ones((b, past + t)) if mask is None else np.asarray(mask)
    if mask.shape != (b, past + t):
        raise InputError(f"{mask_key} must have shape (B, T) = {(b, past + t)}, got "
                         f"{mask.shape}")
    out[mask_key] = mask.astype(dtype)
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
