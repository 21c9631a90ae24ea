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

import contextlib

import os
import time
import tomllib
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .errors import (BackendError, CheckpointError, InputError, SpecError, XformerError,
                     truncate)
from .inputs import as_array, check_int_array, check_mask  # noqa: F401 (check_mask: public)
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


@dataclass(frozen=True)
class DecodingCache:
    """The state of cached (incremental) decoding between :meth:`Backend.decode` calls, the
    same class with the same meaning of every field on every backend.

    Attributes:
        past_key_values: the model's own cache, exactly as its native ``DecoderModel`` /
            ``EncoderDecoderModel`` returns it with ``use_cache=True`` (framework tensors): per
            decoder layer ``(k, v)`` ``(B, H, past, d_head)`` of the causal self-attention,
            plus ``(cross_k, cross_v)`` ``(B, H, S, d_head)`` for an encoder-decoder
            (projected from the encoder output once, on the first call).
        attention_mask: ``(B, past)`` numpy in the model dtype: always the *decoded side's*
            mask so far (the decoder's ``attention_mask``, an encoder-decoder's
            ``decoder_attention_mask``), 1 = attend, 0 = padding.
        encoder_attention_mask: ``(B, S)`` numpy in the model dtype: an encoder-decoder's source
            mask (the cross-attention's key padding), reused by every later step; ``None`` for
            a decoder.
    """

    past_key_values: tuple
    attention_mask: np.ndarray
    encoder_attention_mask: np.ndarray | None = None

    @property
    def past_length(self) -> int:
        """Positions already decoded (``past``)."""
        return int(self.attention_mask.shape[1])

    @property
    def batch_size(self) -> int:
        """Rows ``B`` (changed only by :meth:`Backend.reorder_cache`)."""
        return int(self.attention_mask.shape[0])


class Backend:
    """What every backend provides: one contract, validated here once, run by framework hooks.

    The public methods (:meth:`forward`, :meth:`forward_backward`, :meth:`trace`,
    :meth:`decode`, :meth:`reorder_cache`) are template methods: they check the mode, the inputs
    (:func:`check_inputs`), the cotangents (:func:`check_cotangents`), the cache and
    ``beam_idx`` with the same rules and the same :class:`~xformer.errors.InputError` messages
    on every backend, then call the backend's hook (``_forward``, ``_forward_backward``,
    ``_trace``, ``_decode_step``, ``_reorder_past``) with checked numpy arrays. A backend
    implements only the hooks and the framework-specific methods (``build``,
    ``set_weights``, ``get_weights``, ``model_dtype``, ``framework_version``,
    ``environment``). Subclasses import their framework lazily (in ``__init__``), so listing
    backends never imports a framework.

    Arrays cross the boundary as numpy, in canonical names and layout (docs/design.md §2):

    * **inputs** ``{"input_ids": (B, T) int64, "attention_mask": (B, T) 1 = attend / 0 = padding,
      "token_type_ids": (B, T) int64}``, or ``"inputs_embeds": (B, T, D)`` (the already scaled
      token embeddings) instead of ``input_ids``. ``attention_mask`` and ``token_type_ids`` are
      optional (all ones / all zeros). An encoder-decoder also takes ``decoder_input_ids`` (or
      ``decoder_inputs_embeds``) and ``decoder_attention_mask``.
    * **outputs** ``spec.output_names()`` (:func:`output_shapes`): ``last_hidden_state``
      ``(B, T, D)`` (the decoder's for an encoder-decoder), ``pooler_output`` ``(B, D)``,
      ``encoder_last_hidden_state`` ``(B, S, D)``, ``logits`` ``(B, T, vocab_size)``, in the
      model's dtype.
    * **cotangents**, one rule: exactly one array per output name, no more and no fewer
      (a zero array leaves an output out of the loss), each of that output's shape, real
      numbers, cast to the model dtype (:func:`check_cotangents`).
    * **gradients** of ``sum_k sum(outputs[k] * cotangents[k])`` w.r.t. every canonical parameter
      (canonical layout) and w.r.t. ``spec.input_embeds_names()``: the token embeddings after
      ``embed_scale``, whether they were looked up from ids or given.

    Attributes:
        name: registry name, e.g. ``"torch"``.
        modes: every execution mode; ``default_modes`` those conformance runs by default.
        preferred_mode: the mode of a call that names none (``xformer embed``, user code): the
            fast one for the framework (docs/design.md §7: Keras compiled with
            ``tf.function``, Gluon hybridized, torch eager).
    """

    name: str = ""
    modes: tuple[str, ...] = ()
    default_modes: tuple[str, ...] = ()
    preferred_mode: str = ""

    # -- to implement: the model ---------------------------------------------------------
    def build(self, spec: ModelSpec, dtype: str = "float32") -> Any:
        """The native top-level module for ``spec`` (``EncoderModel``, ``DecoderModel`` or
        ``EncoderDecoderModel``), parameters in ``dtype``."""
        raise NotImplementedError

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        """Load canonical weights (every name of ``spec.parameters()``, cast to the model dtype)."""
        raise NotImplementedError

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        """The model's parameters as canonical ``{name: array}``."""
        raise NotImplementedError

    def model_dtype(self, model: Any) -> str:
        """The dtype of ``model``'s parameters and activations: ``"float32"`` or ``"float64"``."""
        raise NotImplementedError

    # -- to implement: the hooks (called with checked numpy inputs) ----------------------
    def _forward(self, model: Any, inputs: dict[str, np.ndarray], mode: str
                 ) -> dict[str, np.ndarray]:
        """Outputs ``{name: numpy}`` for checked ``inputs``, dropout off, in ``mode``."""
        raise NotImplementedError

    def _forward_backward(self, model: Any, inputs: dict[str, np.ndarray],
                          cotangents: dict[str, np.ndarray], mode: str
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(outputs, gradients)`` for checked inputs and cotangents (one per output, in the
        model dtype)."""
        raise NotImplementedError

    def _trace(self, model: Any, inputs: dict[str, np.ndarray],
               cotangents: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(forward, backward)`` per node (see :meth:`trace`), for checked arguments."""
        raise NotImplementedError

    def _decode_step(self, model: Any, inputs: dict[str, np.ndarray],
                     past_key_values: Any, mode: str) -> tuple[np.ndarray, Any]:
        """One cached step: the model called with checked ``inputs`` (every mask filled in:
        the decoded side's ``(B, past + T)``, an encoder-decoder's source mask ``(B, S)``),
        ``past_key_values`` (``None`` on the first step) and ``use_cache=True``, dropout off.
        Returns ``(logits numpy (B, T, vocab_size), the model's new past_key_values)``."""
        raise NotImplementedError

    def _reorder_past(self, past_key_values: Any, beam_idx: np.ndarray) -> Any:
        """``past_key_values`` with every tensor's batch rows gathered by the checked int64
        ``beam_idx`` ``(N,)``."""
        raise NotImplementedError

    def _make_trainer(self, model: Any, config: Any, steps: int) -> Any:
        """The native optimizer machinery for ``model`` and a checked
        :class:`~xformer.training.TrainConfig` in a run of ``steps`` steps: the framework's own
        optimizer (``torch.optim``, ``keras.optimizers``, ``mxnet.optimizer`` / Gluon
        ``Trainer``), corrected where its semantics differ from ``torch.optim``'s
        (docs/training.md), and its learning-rate schedule. Opaque to the caller."""
        raise NotImplementedError

    def _train_step(self, model: Any, trainer: Any, micro: list[dict[str, np.ndarray]],
                    masks: list[dict[str, np.ndarray]] | None, dropout: str, step: int,
                    mode: str, shares: list[float] | None = None) -> tuple[float, float, float]:
        """One optimizer step ``step`` (0-based): for each checked micro-batch (model inputs
        plus ``labels`` ``(B, T)`` int64), the model in training mode, the objective
        (:func:`xformer.training.objective`) computed natively, its backward pass with the loss
        divided by ``len(micro)`` (gradients add up); then clipping by global norm
        (``torch.nn.utils.clip_grad_norm_`` semantics) if configured, and the native optimizer
        step at this step's scheduled rate. Dropout: ``dropout == "stream"`` multiplies each
        site by ``masks[i][site]`` (:func:`xformer.training.dropout_masks`), ``"native"`` uses
        the framework's own dropout, ``"off"`` none. Returns ``(mean micro loss, learning rate
        used, global gradient norm before clipping)``.

        Data-parallel (``shares`` given, after :meth:`init_distributed`): ``micro`` and ``masks``
        are this worker's rows (:func:`xformer.distributed.shard`); micro-batch ``i``'s loss is
        scaled by ``shares[i]`` so that the engine's sum over workers is the global mean (an
        engine that averages, as DDP does, scales by ``shares[i] * world.size``); the
        gradients, the norm and the returned loss are the reduced, global ones."""
        raise NotImplementedError

    def _optimizer_state(self, model: Any, trainer: Any) -> dict[str, np.ndarray]:
        """The optimizer state in ``torch.optim``'s names and canonical layout:
        ``{"<parameter>:exp_avg" | ":exp_avg_sq" | ":momentum_buffer": array}`` for every
        parameter that has it (none before the first step)."""
        raise NotImplementedError

    def _init_distributed(self) -> Any:
        """Join the data-parallel run that the environment describes (the framework launcher's
        variables: :mod:`xformer.distributed`) with the framework's own engine; must run before
        the model is built. Returns :class:`xformer.distributed.World`. After it,
        :meth:`_make_trainer` builds a trainer whose :meth:`_train_step` reduces the gradients
        through that engine."""
        raise BackendError(f"backend {self.name!r} has no data-parallel engine")

    def _finish_distributed(self) -> None:
        """Leave the run: wait for every worker (a barrier), then release the engine."""

    # -- foreign modules: ``xformer check`` (issue #13, xformer/checking.py) ---------------
    def _foreign_parameters(self, module: Any, inputs: Mapping[str, np.ndarray],
                            cmap: Any) -> dict[str, tuple[tuple[int, ...], bool]]:
        """``{native name: (shape, transposed by default)}`` of every trainable parameter of
        a user's native module (torch ``named_parameters()`` names, Keras variable ``.path``,
        Gluon structural names), building it first if the framework builds lazily (with
        ``inputs`` under ``cmap.inputs``' keywords). ``transposed by default``: the native
        layout is the canonical one transposed (Keras ``Dense`` kernels)."""
        raise BackendError(f"backend {self.name!r} cannot check a foreign module")

    def _foreign_load(self, module: Any, arrays: Mapping[str, np.ndarray], dtype: str) -> None:
        """Copy ``{native name: array in the native layout}`` into the module's parameters.
        Raises InputError when a parameter's dtype is not ``dtype`` (the factory ignored it)."""
        raise BackendError(f"backend {self.name!r} cannot check a foreign module")

    def _foreign_run(self, module: Any, kwargs: Mapping[str, np.ndarray], output: Any,
                     cotangent: np.ndarray, nodes: Mapping[str, str]
                     ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, tuple]]:
        """One pass of the user's module, dropout off: ``module(**kwargs)`` (numpy arrays
        made native tensors), the output picked with :func:`xformer.checking.select_output`, the
        gradient of ``sum(output * cotangent)``. Returns ``(output, {native parameter name:
        gradient, native layout}, {canonical node: (its sub-module's output, the gradient
        flowing into it)})`` for ``nodes`` (``{canonical node: native sub-module path}``).
        Raises InputError for a node path the module does not have."""
        raise BackendError(f"backend {self.name!r} cannot check a foreign module")

    def framework_version(self) -> str:
        """The framework's version string, e.g. ``"2.13.0+cpu"``."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """Facts about the framework in this process, recorded when a run happens: its
        version(s) and thread settings, e.g. ``{"torch": "2.13.0+cpu", "torch threads":
        "2 intra-op, 2 inter-op"}``."""
        raise NotImplementedError

    # -- the contract --------------------------------------------------------------------
    def forward(self, model: Any, inputs: Mapping[str, np.ndarray], mode: str | None = None
                ) -> dict[str, np.ndarray]:
        """Outputs for ``inputs`` with dropout off, in ``mode`` (default: ``preferred_mode``).

        Raises:
            BackendError: an unknown mode. InputError: bad inputs (:func:`check_inputs`).
        """
        mode = self.check_mode(mode)
        checked = check_inputs(model.spec, inputs, self.model_dtype(model))
        return self._forward(model, checked, mode)

    def forward_backward(self, model: Any, inputs: Mapping[str, np.ndarray],
                         cotangents: Mapping[str, np.ndarray], mode: str | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(outputs, gradients)``: see the class docstring for the loss and the names.

        Raises:
            BackendError: an unknown mode. InputError: bad inputs or cotangents
                (:func:`check_inputs`, :func:`check_cotangents`).
        """
        mode = self.check_mode(mode)
        dtype = self.model_dtype(model)
        checked = check_inputs(model.spec, inputs, dtype)
        cots = check_cotangents(model.spec, checked, cotangents, dtype)
        return self._forward_backward(model, checked, cots, mode)

    def trace(self, model: Any, inputs: Mapping[str, np.ndarray],
              cotangents: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray]]:
        """Record every node of ``spec.nodes()`` during one forward + backward pass (eager /
        imperative, dropout off; the model is left as it was).

        Returns:
            ``(forward, backward)``: ``forward[name]`` is the node's output and
            ``backward[name]`` the gradient of ``sum_k sum(outputs[k] * cotangents[k])`` with
            respect to that output, both numpy in the model dtype, keyed by node name.

        Raises:
            InputError: bad inputs or cotangents, as :meth:`forward_backward`.
        """
        dtype = self.model_dtype(model)
        checked = check_inputs(model.spec, inputs, dtype)
        cots = check_cotangents(model.spec, checked, cotangents, dtype)
        return self._trace(model, checked, cots)

    def decode(self, model: Any, inputs: Mapping[str, np.ndarray],
               cache: DecodingCache | None = None, mode: str | None = None
               ) -> tuple[np.ndarray, DecodingCache]:
        """One step of cached (incremental) decoding, dropout off.

        Args:
            inputs: decoder: ``{"input_ids": (B, T_new), "attention_mask": (B, past + T_new)}``
                (mask optional). Encoder-decoder: the first call ``{"input_ids",
                "attention_mask", "decoder_input_ids"}`` runs the encoder and caches the
                cross-attention keys/values and the source mask; later calls take only
                ``{"decoder_input_ids", "decoder_attention_mask"}`` (mask optional) and reuse
                them. ``inputs_embeds`` / ``decoder_inputs_embeds`` may replace the ids.
            cache: ``None`` on the first call, then the :class:`DecodingCache` the previous
                call (or :meth:`reorder_cache`) returned.
            mode: as :meth:`forward`; a backend may decode every mode the same way (its
                ``_decode_step`` says which).

        A step that leaves out the decoded side's mask keeps the cached mask and counts the new
        positions as attended (what :mod:`xformer.generation` relies on); a step that gives it
        gives all ``past + T_new`` columns. Positions with no allowed key (left padding, fully
        padded rows) attend uniformly over *all* keys, so there cached and full decoding
        legitimately differ (``past + new`` keys against ``T``); every other position matches a
        full forward pass.

        Returns:
            ``(logits, cache)``: ``logits`` ``(B, T_new, vocab_size)`` numpy in the model dtype
            (the same numbers as a full forward pass at those positions), and the new
            :class:`DecodingCache` (``past + T_new`` positions).

        Raises:
            InputError: an encoder or ``head != "lm"``; a cache that is not a
                :class:`DecodingCache`; encoder inputs on a later encoder-decoder step; a batch
                size that does not match the cache's; past + new positions over ``max_len``;
                bad inputs (:func:`check_inputs`).
        """
        spec = model.spec
        if spec.architecture == "encoder" or spec.head != "lm":
            raise InputError(f"decode needs a decoder or an encoder-decoder with head='lm'; "
                             f"this spec is architecture={spec.architecture!r} with "
                             f"head={spec.head!r}")
        if cache is not None and not isinstance(cache, DecodingCache):
            raise InputError(f"cache must be None (first step) or the DecodingCache that "
                             f"decode or reorder_cache returned, got {type(cache).__name__}")
        enc_dec = spec.architecture == "encoder-decoder"
        mask_key = "decoder_attention_mask" if enc_dec else "attention_mask"
        past = 0 if cache is None else cache.past_length
        if cache is not None and enc_dec:
            given = sorted(k for k in ("input_ids", "inputs_embeds", "attention_mask")
                           if inputs.get(k) is not None)
            if given:
                raise InputError(f"decode: {given} were given on a later step of an "
                                 f"encoder-decoder; the cache already holds the encoder's "
                                 f"keys/values and source mask: give only decoder_input_ids "
                                 f"(and decoder_attention_mask)")
        mode = self.check_mode(mode)
        checked = check_inputs(spec, inputs, self.model_dtype(model), past_length=past,
                               encoder=cache is None or not enc_dec)
        if cache is not None:
            b = checked[mask_key].shape[0]
            if b != cache.batch_size:
                raise InputError(f"decode: batch size {b}, but the cache holds "
                                 f"{cache.batch_size} rows; give one row per cached row "
                                 f"(reorder_cache changes the row count)")
            if inputs.get(mask_key) is None:  # the cached mask, the new positions attended
                checked[mask_key] = np.concatenate(
                    [cache.attention_mask, checked[mask_key][:, past:]], axis=1)
            if enc_dec:
                checked["attention_mask"] = cache.encoder_attention_mask
        logits, past_key_values = self._decode_step(
            model, checked, None if cache is None else cache.past_key_values, mode)
        return logits, DecodingCache(past_key_values, checked[mask_key],
                                     checked["attention_mask"] if enc_dec else None)

    def reorder_cache(self, model: Any, cache: DecodingCache, beam_idx: np.ndarray
                      ) -> DecodingCache:
        """The cache with its batch rows gathered by ``beam_idx`` ``(N,)`` integers in
        ``[0, B)`` (beam search keeps, duplicates and drops hypotheses; ``N`` may differ from
        ``B``): the native keys/values, the decoded side's mask and the source mask alike.

        Raises:
            InputError: a cache that is not a :class:`DecodingCache`; ``beam_idx`` not a 1-D
                integer array of rows in ``[0, B)``.
        """
        if not isinstance(cache, DecodingCache):
            raise InputError(f"cache must be the DecodingCache that decode returned, got "
                             f"{type(cache).__name__}")
        idx = np.asarray(beam_idx)
        b = cache.batch_size
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (
                idx.size and (idx.min() < 0 or idx.max() >= b)):
            raise InputError(f"beam_idx must be a 1-D integer array of rows in [0, {b}), got "
                             f"{idx.dtype} {idx.shape} "
                             f"{np.array2string(idx, threshold=8, separator=', ')}")
        idx = idx.astype(np.int64)
        enc = cache.encoder_attention_mask
        return DecodingCache(self._reorder_past(cache.past_key_values, idx),
                             cache.attention_mask[idx], None if enc is None else enc[idx])

    def generate(self, model: Any, input_ids: np.ndarray, **kwargs: Any) -> list[list[int]]:
        """Greedy or beam-search generation with the key/value cache: see
        :func:`xformer.generation.generate` for the arguments. The search itself is shared
        numpy code, so every backend makes the same choices from the same logits."""
        from .generation import generate

        with self._inference(model):
            return generate(self, model, input_ids, **kwargs)

    def _inference(self, model: Any) -> contextlib.AbstractContextManager:
        """Hook: a context in which :meth:`decode` steps run back to back (:meth:`generate`
        enters it once rather than once per step); by default nothing. torch switches the
        model to eval mode there, so a model in train mode is not walked twice a token."""
        return contextlib.nullcontext()

    #: This process's place in a data-parallel run (:meth:`init_distributed`), else ``None``.
    world: Any = None

    def init_distributed(self) -> Any:
        """Join the data-parallel run the environment describes, through the framework's own
        engine (:mod:`xformer.distributed`); call it once, before building the model. From then
        on :meth:`train_step` trains on this worker's rows of every global micro-batch and the
        engine reduces the gradients, so that every worker ends each step with the weights that
        single-process training on the global batch gives.

        Returns:
            :class:`xformer.distributed.World`.
        Raises:
            BackendError: the backend has no engine, or joining failed (named, with the fix).
        """
        if self.world is None:
            self.world = self._init_distributed()
        return self.world

    def finish_distributed(self) -> None:
        """Wait for every worker, then leave the run (no-op outside one)."""
        if self.world is not None:
            self._finish_distributed()

    def make_trainer(self, model: Any, config: Any, steps: int) -> Any:
        """The native optimizer and schedule of a training run of ``steps`` optimizer steps
        (:meth:`train_step` takes it); see :func:`xformer.training.train` for the whole loop.

        Raises:
            InputError: a config that is not a :class:`~xformer.training.TrainConfig`, a
                spec without a training objective, a ``warmup_steps`` beyond the run.
        """
        from .training import TrainConfig, _count, objective

        if not isinstance(config, TrainConfig):
            raise InputError(f"config must be an xformer.training.TrainConfig, got "
                             f"{type(config).__name__}")
        objective(model.spec)
        steps = _count("steps", steps, 1)
        config.lr_at(0, steps)
        return _Trainer(self._make_trainer(model, config, steps), config, steps)

    def train_step(self, model: Any, trainer: Any, micro: list[Mapping[str, np.ndarray]],
                   step: int, mode: str | None = None) -> Any:
        """One optimizer step over the micro-batches ``micro`` (``config.grad_accum`` of
        them, each the model inputs plus ``labels``: :func:`xformer.training.micro_batches`).

        Returns:
            :class:`xformer.training.StepLog`.
        Raises:
            BackendError: an unknown mode, or a native schedule whose rate is not
                :meth:`TrainConfig.lr_at` (a backend bug). InputError: bad inputs or labels.
        """
        from .training import StepLog, dropout_masks

        if not isinstance(trainer, _Trainer):
            raise InputError(f"trainer must be what make_trainer returned, got "
                             f"{type(trainer).__name__}")
        mode = self.check_mode(mode)
        config, spec = trainer.config, model.spec
        dtype = self.model_dtype(model)
        if len(micro) != config.grad_accum:
            raise InputError(f"give grad_accum={config.grad_accum} micro-batches, got "
                             f"{len(micro)}")
        checked = []
        for batch in micro:
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            c = check_inputs(spec, inputs, dtype)
            labels = check_int_array(batch.get("labels"), "labels", "(B, T)")
            side = "decoder_attention_mask" if "decoder_attention_mask" in c else "attention_mask"
            if labels.shape != c[side].shape:
                raise InputError(f"labels must have shape {c[side].shape}, got {labels.shape}")
            scored = labels != -100
            if not scored.any():
                raise InputError("a micro-batch has no scored label (all -100); its loss "
                                 "would be 0/0")
            if (scored & ((labels < 0) | (labels >= spec.vocab_size))).any():
                raise InputError(f"labels must be -100 (ignored) or token ids in "
                                 f"[0, vocab_size={spec.vocab_size})")
            c["labels"] = labels.astype(np.int64)
            checked.append(c)
        dropout = config.dropout if spec.dropout else "off"
        masks = None
        if dropout == "stream":
            masks = [dropout_masks(spec, c, config.seed, step, i, dtype)
                     for i, c in enumerate(checked)]
        if self.world is not None and self.world.size > 1:
            from .distributed import shard

            checked, masks, shares = shard(self.world, checked, masks)
            loss, lr, norm = self._train_step(model, trainer.native, checked, masks, dropout,
                                              step, mode, shares=shares)
        else:
            loss, lr, norm = self._train_step(model, trainer.native, checked, masks, dropout,
                                              step, mode)
        want = config.lr_at(step, trainer.steps)
        if abs(lr - want) > 1e-12 * max(abs(want), 1e-300):
            raise BackendError(f"backend {self.name!r} used learning rate {lr!r} at step "
                               f"{step}, not the schedule's {want!r}")
        return StepLog(step, float(loss), float(lr), float(norm))

    def optimizer_state(self, model: Any, trainer: Any) -> dict[str, np.ndarray]:
        """The optimizer state as ``{"<parameter>:<torch.optim key>": numpy}`` (canonical
        names and layout): ``exp_avg``, ``exp_avg_sq`` (Adam, AdamW), ``momentum_buffer``
        (SGD with momentum)."""
        return self._optimizer_state(model, trainer.native)

    # -- shared -------------------------------------------------------------------------
    def check_mode(self, mode: str | None) -> str:
        """``mode`` or the preferred one; raises ``BackendError`` for an unknown mode."""
        mode = mode or self.preferred_mode or self.modes[0]
        if mode not in self.modes:
            raise BackendError(f"backend {self.name!r} has no mode {mode!r}; "
                               f"modes: {', '.join(self.modes)}")
        return mode

    def __repr__(self) -> str:
        return f"<xformer backend {self.name!r}>"


@dataclass
class _Trainer:
    """What :meth:`Backend.make_trainer` returns: the backend's native optimizer machinery,
    the run's config and its length."""

    native: Any
    config: Any
    steps: int


def output_shapes(spec: ModelSpec, inputs: Mapping[str, np.ndarray]
                  ) -> dict[str, tuple[int, ...]]:
    """``{output name: shape}`` of a full forward pass over checked ``inputs``
    (:func:`check_inputs`), in ``spec.output_names()`` order: ``last_hidden_state`` ``(B, T, D)``
    (``T`` the decoder side's for an encoder-decoder), ``pooler_output`` ``(B, D)``,
    ``encoder_last_hidden_state`` ``(B, S, D)``, ``logits`` ``(B, T, vocab_size)``."""
    d = spec.d_model
    side = "decoder_" if spec.architecture == "encoder-decoder" else ""
    b, t = inputs[f"{side}attention_mask"].shape
    shapes = {"last_hidden_state": (b, t, d), "pooler_output": (b, d),
              "logits": (b, t, spec.vocab_size)}
    if side:
        shapes["encoder_last_hidden_state"] = (b, inputs["attention_mask"].shape[1], d)
    return {name: shapes[name] for name in spec.output_names()}


def check_cotangents(spec: ModelSpec, inputs: Mapping[str, np.ndarray],
                     cotangents: Mapping[str, Any], dtype: str = "float32"
                     ) -> dict[str, np.ndarray]:
    """Validate the cotangents of :meth:`Backend.forward_backward` and :meth:`Backend.trace`:
    the one rule every backend follows.

    Args:
        spec: the model.
        inputs: the checked inputs (:func:`check_inputs`), which fix the output shapes.
        cotangents: exactly the keys of ``spec.output_names()`` (no subset: give zeros to leave
            an output out of the loss; no extra key), each an array of real numbers with the
            shape of that output (:func:`output_shapes`).
        dtype: the model dtype.

    Returns:
        ``{name: array}`` in ``spec.output_names()`` order, cast to ``dtype``.

    Raises:
        InputError: missing or extra keys, a wrong shape, or values that are not real numbers.
    """
    names = spec.output_names()
    if set(cotangents) != set(names):
        missing = [n for n in names if n not in cotangents]
        extra = sorted(set(cotangents) - set(names))
        raise InputError(f"cotangents must have exactly the keys {list(names)} (one per "
                         f"output; zeros leave an output out of the loss), got "
                         f"{sorted(cotangents)}: missing {missing}, extra {extra}")
    out = {}
    for name, shape in output_shapes(spec, inputs).items():
        cot = np.asarray(cotangents[name])
        if not (np.issubdtype(cot.dtype, np.integer) or np.issubdtype(cot.dtype, np.floating)):
            raise InputError(f"cotangent {name!r} must hold real numbers, got {cot.dtype}")
        if cot.shape != shape:
            raise InputError(f"cotangent {name!r} must have the shape of the output, {shape}, "
                             f"got {cot.shape}")
        out[name] = cot.astype(dtype)
    return out


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
        InputError: unknown keys, neither or both of ids / embeddings, ragged rows (lists of
            unequal length), ids that are not integers (floats, bools, strings; any numpy
            integer dtype or Python ints is fine) or do not fit in int64, wrong rank or shape,
            sequence longer than ``spec.max_len``, token id outside ``[0, vocab_size)``,
            token type outside ``[0, type_vocab_size)``, an attention-mask value other than 0
            or 1 (2, -1, NaN, inf), non-finite ``inputs_embeds``.
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
        tt = (np.zeros((b, t), np.int64) if tt is None
              else check_int_array(tt, "token_type_ids", str((b, t))))
        if tt.shape != (b, t):
            raise InputError(f"token_type_ids must be integers of shape {(b, t)}, got "
                             f"{tt.dtype} {tt.shape}")
        if tt.size and (tt.min() < 0 or tt.max() >= spec.type_vocab_size):
            raise InputError(f"token type id outside [0, type_vocab_size="
                             f"{spec.type_vocab_size})")
        out["token_type_ids"] = tt.astype(np.int64)
    return out


def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters (:func:`xformer.errors.truncate`)."""
    return truncate(value, limit)


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
        ids = check_int_array(inputs[ids_key], ids_key, "(B, T)")
        if ids.ndim != 2:
            raise InputError(f"{ids_key} must be an integer array of shape (B, T), got "
                             f"{ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
            bad = int(ids.max()) if ids.max() >= spec.vocab_size else int(ids.min())
            raise InputError(f"token id {bad} is outside [0, vocab_size={spec.vocab_size})")
        out[ids_key] = ids.astype(np.int64)
        b, t = ids.shape
    else:
        emb = as_array(inputs[emb_key], emb_key, f"(B, T, d_model={spec.d_model})")
        if emb.dtype == np.bool_ or not (np.issubdtype(emb.dtype, np.floating)
                                         or np.issubdtype(emb.dtype, np.integer)):
            raise InputError(f"{emb_key} must hold real numbers, got {emb.dtype}")
        if emb.ndim != 3 or emb.shape[-1] != spec.d_model:
            raise InputError(f"{emb_key} must have shape (B, T, d_model={spec.d_model}), "
                             f"got {emb.shape}")
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused below
            emb = emb.astype(dtype)
        if not np.isfinite(emb).all():
            where = tuple(int(i) for i in np.argwhere(~np.isfinite(emb))[0])
            raise InputError(f"{emb_key} holds {emb[where]} at {where} "
                             f"({int((~np.isfinite(emb)).sum())} non-finite values, after the "
                             f"cast to {dtype}); give finite embeddings")
        out[emb_key] = emb
        b, t = emb.shape[:2]
    if t == 0:
        raise InputError(f"{ids_key} has sequence length 0; give at least one token")
    if past + t > spec.max_len:
        what = f"sequence length {t}" if not past else f"{past} cached + {t} new positions"
        raise InputError(f"{what} is longer than max_len={spec.max_len}; shorten the input "
                         f"(xformer does not truncate silently)")
    mask = inputs.get(mask_key)
    out[mask_key] = (np.ones((b, past + t), dtype) if mask is None
                     else check_mask(mask, mask_key, (b, past + t), dtype))
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


#: The most bytes of a config file xformer reads (a config is a few lines).
CONFIG_LIMIT = 1 << 20


def _read_config(path: Path) -> str:
    """The text of config file ``path``: a regular, readable, UTF-8 file of at most
    :data:`CONFIG_LIMIT` bytes (:func:`xformer.resources.read_capped`); raises
    :class:`BackendError` naming the file and the fix."""
    from .resources import read_capped

    try:
        data = read_capped(path, limit=CONFIG_LIMIT, what="config file")
    except XformerError as e:  # read_capped's InputError: a problem of the backend config
        raise BackendError(str(e)) from None
    except OSError as e:
        raise BackendError(f"config file {path} cannot be read ({e.strerror or e}); fix or "
                           f"remove it") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BackendError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as "
                           f"UTF-8 TOML or remove it") from None


def _config_backend() -> tuple[str, str] | None:
    """``(backend, file shown as ./xformer.toml or ~/...)`` of the first config file that sets
    ``backend``, or ``None``.

    Raises:
        BackendError: a config file that exists but is not a regular file, cannot be read, is
            not UTF-8, is over :data:`CONFIG_LIMIT` bytes, is not valid TOML, or whose
            ``backend`` is not a string; the message names the file.
    """
    for path in (Path.cwd() / "xformer.toml", Path.home() / ".config" / "xformer" / "config.toml"):
        try:
            exists = path.exists() or path.is_symlink()
        except OSError:
            exists = True
        if not exists:
            continue
        text = _read_config(path)
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise BackendError(f"config file {path} is not valid TOML: {e}") from None
        if "backend" in data:
            if not isinstance(data["backend"], str) or not data["backend"].strip():
                raise BackendError(f"config file {path}: backend must be a backend name "
                                   f"(a string such as \"torch\"), got "
                                   f"{_short(data['backend'], 60)}")
            shown = ("./xformer.toml" if path.parent == Path.cwd()
                     else str(path).replace(str(Path.home()), "~", 1))
            return data["backend"], shown
    return None


def resolve_backend(name: str | None = None) -> tuple[str, str]:
    """``(backend name, where it came from)``, most specific first: the argument
    (``"--backend"``) > ``$XFORMER_BACKEND`` > the ``backend`` of ``./xformer.toml`` or
    ``~/.config/xformer/config.toml`` (the file) > ``"default"``.

    Raises:
        BackendError: a config file that is not valid TOML.
    """
    if name:
        return name, "--backend"
    if os.environ.get("XFORMER_BACKEND"):
        return os.environ["XFORMER_BACKEND"], "$XFORMER_BACKEND"
    return _config_backend() or (DEFAULT_BACKEND, "default")


def resolve_backend_name(name: str | None = None) -> str:
    """The backend name of :func:`resolve_backend`."""
    return resolve_backend(name)[0]


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
        SpecError: ``spec`` is not a :class:`~xformer.spec.ModelSpec` (a dict: use
            ``ModelSpec.from_dict``; a path or preset name: ``ModelSpec.load`` /
            ``ModelSpec.preset``). BackendError: unknown or uninstalled backend.
        InputError: a dtype other than float32/float64. CheckpointError: weights that do not
            match.
    """
    from .weights import check_weights

    if not isinstance(spec, ModelSpec):
        if isinstance(spec, Mapping):
            fix = "ModelSpec.from_dict(d)"
        elif isinstance(spec, (str, os.PathLike)):
            fix = "ModelSpec.load(path) for a .json/.yaml file or ModelSpec.preset(name)"
        else:
            fix = "ModelSpec.from_dict, ModelSpec.load or ModelSpec.preset"
        raise SpecError(f"build takes a ModelSpec, got {type(spec).__name__} "
                        f"{_short(spec, 60)}; make one with {fix}")
    if weights is not None and not isinstance(weights, Mapping):
        raise CheckpointError(f"weights must be a mapping {{name: array}} (e.g. from "
                              f"xformer.load_weights), got {type(weights).__name__}")
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
