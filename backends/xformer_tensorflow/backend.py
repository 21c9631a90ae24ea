"""The ``tensorflow`` backend: Keras 3 layers (TensorFlow backend) behind the ``Backend`` protocol.

Modes: ``eager`` (plain calls), ``function`` (``tf.function(reduce_retracing=True)``) and ``xla``
(``tf.function(jit_compile=True)``). TensorFlow and Keras are imported in ``__init__``, so
listing backends stays cheap (the pattern of einops' ``_backends.py``).

Cached decoding (:meth:`TensorFlowBackend.decode`) runs eagerly; its cache is a
:class:`DecodeCache` of TensorFlow tensors (a named tuple, so ``tf.nest`` walks it).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np

from xformer.backend import Backend, check_dtype, check_inputs
from xformer.errors import BackendError, InputError
from xformer.spec import ModelSpec
from xformer.weights import check_weights


class DecodeCache(NamedTuple):
    """The state of cached decoding between :meth:`TensorFlowBackend.decode` calls.

    Attributes:
        past_key_values: per decoder layer ``(k, v)`` of ``(B, H, past, d_head)`` tensors, plus
            ``(cross_k, cross_v)`` ``(B, H, S, d_head)`` for an encoder-decoder.
        encoder_attention_mask: ``(B, S)`` the source mask (encoder-decoder), else ``None``.
    """

    past_key_values: tuple
    encoder_attention_mask: Any = None

    @property
    def past_length(self) -> int:
        """Positions decoded so far."""
        return int(self.past_key_values[0][0].shape[2])

    @property
    def batch_size(self) -> int:
        return int(self.past_key_values[0][0].shape[0])


class TensorFlowBackend(Backend):
    """Builds :class:`xformer_tensorflow.modules.EncoderModel`, ``DecoderModel`` or
    ``EncoderDecoderModel`` (``keras.Model`` s) from ``spec.architecture`` and runs them.

    Canonical names map to Keras variables by walking attribute paths (:meth:`variables`), never
    through Keras' generated variable paths. Gradients come from one ``tf.GradientTape`` that
    also records the token-embedding lookups, so ``inputs_embeds`` (and
    ``decoder_inputs_embeds``) and the token tables get theirs in the same pass; a tied LM head
    multiplies by the table variable itself, so the table's gradient includes the head's.
    Traced steps are cached on the model (``_xformer_steps``).
    """

    name = "tensorflow"
    extra = "tensorflow"
    modes = ("eager", "function", "xla")
    default_modes = ("eager", "function")
    preferred_mode = "function"

    def __init__(self) -> None:
        import keras
        import tensorflow as tf

        from . import modules

        self.tf, self.keras, self.modules = tf, keras, modules

    def build(self, spec: ModelSpec, dtype: str = "float32") -> Any:
        cls = {"encoder": self.modules.EncoderModel, "decoder": self.modules.DecoderModel,
               "encoder-decoder": self.modules.EncoderDecoderModel}[spec.architecture]
        model = cls(spec, dtype=check_dtype(dtype))
        model.build()
        return model

    def variables(self, model: Any) -> dict[str, tuple[Any, bool]]:
        """``{canonical name: (keras.Variable, transposed)}``, by walking the attribute path of
        each name (``encoder.layers.0.ffn.linear1.weight`` -> ``model.encoder.layers[0].ffn
        .linear1.kernel``, transposed: Keras kernels are ``(in, out)``)."""
        layers = self.keras.layers
        leaves = {(layers.Dense, "weight"): ("kernel", True),
                  (layers.Dense, "bias"): ("bias", False),
                  (layers.Embedding, "weight"): ("embeddings", False),
                  (layers.LayerNormalization, "weight"): ("gamma", False),
                  (layers.LayerNormalization, "bias"): ("beta", False),
                  (self.modules.LMHead, "weight"): ("kernel", True)}
        out = {}
        for p in model.spec.parameters():
            *path, leaf = p.name.split(".")
            layer = self.sublayer(model, ".".join(path))
            attr, transposed = next(v for (cls, name), v in leaves.items()
                                    if isinstance(layer, cls) and name == leaf)
            out[p.name] = (getattr(layer, attr), transposed)
        return out

    @staticmethod
    def sublayer(model: Any, path: str) -> Any:
        """The layer at a dotted attribute path (``"encoder.layers.0.norm1"`` ->
        ``model.encoder.layers[0].norm1``); ``""`` is the model itself."""
        layer = model
        for part in path.split(".") if path else ():
            layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
        return layer

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        for name, (var, transposed) in self.variables(model).items():
            value = np.asarray(weights[name], dtype=model.dtype)
            var.assign(value.T if transposed else value)

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        return {name: np.array(var.numpy().T if transposed else var.numpy())
                for name, (var, transposed) in self.variables(model).items()}

    def _compiled(self, model: Any, kind: str, mode: str):
        """The forward, forward+backward or cached-decoding step for ``mode``, cached on the
        model."""
        cache = model.__dict__.setdefault("_xformer_steps", {})
        if (kind, mode) not in cache:
            tf = self.tf
            fn = {"forward": self._forward_fn, "backward": self._step_fn,
                  "decode": self._decode_fn}[kind](model)
            if mode == "function":
                fn = tf.function(fn, reduce_retracing=True)
            elif mode == "xla":
                fn = tf.function(fn, jit_compile=True)
            cache[(kind, mode)] = fn
        return cache[(kind, mode)]

    def _forward_fn(self, model: Any):
        return lambda inputs: model(**inputs, training=False)

    def _decode_fn(self, model: Any):
        return lambda inputs: model(**inputs, use_cache=True, training=False)

    def _embedders(self, model: Any) -> dict[str, tuple[str, Any]]:
        """``{embeds input: (ids input, lookup function)}`` for ``spec.input_embeds_names()``."""
        out = {"inputs_embeds": ("input_ids", model.embeddings.embed_tokens)}
        if model.spec.architecture == "encoder-decoder":
            out["decoder_inputs_embeds"] = ("decoder_input_ids", model.embed_decoder_tokens)
        return out

    def _step_fn(self, model: Any):
        tf, table = self.tf, self.variables(model)
        embedders = self._embedders(model)

        def step(inputs, cotangents):
            inputs = dict(inputs)
            embeds = []
            with tf.GradientTape() as tape:
                for key, (ids_key, lookup) in embedders.items():
                    if ids_key in inputs:  # look up inside the tape: d/d(embeds), d/d(table)
                        inputs[key] = lookup(inputs.pop(ids_key))
                    else:
                        tape.watch(inputs[key])
                    embeds.append(inputs[key])
                outputs = model(**inputs, training=False)
                loss = tf.add_n([tf.reduce_sum(outputs[k] * cotangents[k]) for k in outputs])
            targets = embeds + [var for var, _ in table.values()]
            grads = tape.gradient(loss, targets)
            dense = [tf.zeros_like(x) if g is None else tf.convert_to_tensor(g)
                     for x, g in zip(targets, grads)]
            return outputs, dense

        return step

    def _tensors(self, arrays: Mapping[str, np.ndarray]) -> dict[str, Any]:
        return {k: self.tf.convert_to_tensor(v) for k, v in arrays.items()}

    def forward(self, model: Any, inputs: Mapping[str, np.ndarray], mode: str | None = None
                ) -> dict[str, np.ndarray]:
        mode = self.check_mode(mode)
        inputs = check_inputs(model.spec, inputs, model.dtype)
        outputs = self._compiled(model, "forward", mode)(self._tensors(inputs))
        return {k: v.numpy() for k, v in outputs.items()}

    def forward_backward(self, model: Any, inputs: Mapping[str, np.ndarray],
                         cotangents: Mapping[str, np.ndarray], mode: str | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        mode = self.check_mode(mode)
        inputs = check_inputs(model.spec, inputs, model.dtype)
        names = model.spec.output_names()
        if set(cotangents) != set(names):
            raise InputError(f"cotangents must have exactly the keys {list(names)}, "
                             f"got {sorted(cotangents)}")
        cot = {k: np.asarray(cotangents[k], dtype=model.dtype) for k in names}
        outputs, grads = self._compiled(model, "backward", mode)(
            self._tensors(inputs), self._tensors(cot))
        table = self.variables(model)
        embeds = list(self._embedders(model))
        out = {k: g.numpy() for k, g in zip(embeds, grads)}
        for (name, (_, transposed)), g in zip(table.items(), grads[len(embeds):]):
            g = g.numpy()
            out[name] = np.ascontiguousarray(g.T) if transposed else g
        return {k: v.numpy() for k, v in outputs.items()}, out

    def trace(self, model: Any, inputs: Mapping[str, np.ndarray],
              cotangents: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray],
                                                             dict[str, np.ndarray]]:
        """Every node of ``spec.nodes()`` during one eager forward + backward pass, dropout off:
        see :meth:`Backend.trace`.

        Each node's layer gets, for the duration of the call only, an instance attribute
        ``call`` that wraps the class's ``call`` (Keras' ``Layer.__call__`` looks ``self.call``
        up on the instance) and records the output tensor, watched by one
        ``tf.GradientTape``; ``tape.gradient(loss, recorded)`` then gives the gradient flowing
        into each output. The wrappers are removed afterwards (also on errors), so the
        production path carries no overhead and the model's cached ``tf.function`` steps keep
        working.

        Raises:
            InputError: bad inputs or cotangent keys. BackendError: a node layer that was not
                called exactly once (a model that does not match its spec).
        """
        tf = self.tf
        spec = model.spec
        checked = check_inputs(spec, inputs, model.dtype)
        names = spec.output_names()
        if set(cotangents) != set(names):
            raise InputError(f"cotangents must have exactly the keys {list(names)}, "
                             f"got {sorted(cotangents)}")
        cot = self._tensors({k: np.asarray(cotangents[k], dtype=model.dtype) for k in names})
        nodes = [name for name, _ in spec.nodes()]
        recorded: dict[str, Any] = {}
        calls: dict[str, int] = {}
        tape = tf.GradientTape()

        def recording(name: str, call):
            def call_and_record(*args, **kwargs):
                out = call(*args, **kwargs)
                hidden = out[0] if isinstance(out, (tuple, list)) else out
                tape.watch(hidden)  # so the gradient reaches it even from constant inputs
                recorded[name] = hidden
                calls[name] = calls.get(name, 0) + 1
                return out
            return call_and_record

        patched = []
        try:
            for name in nodes:
                layer = self.sublayer(model, name)
                if "call" in vars(layer):
                    raise BackendError(f"layer {name!r} is already being traced")
                object.__setattr__(layer, "call", recording(name, layer.call))
                patched.append(layer)
            tensors = self._tensors(checked)
            with tape:
                for value in tensors.values():
                    if value.dtype.is_floating:
                        tape.watch(value)
                outputs = model(**tensors, training=False)
                loss = tf.add_n([tf.reduce_sum(outputs[k] * cot[k]) for k in names])
        finally:
            for layer in patched:
                object.__delattr__(layer, "call")
        wrong = {n: calls.get(n, 0) for n in nodes if calls.get(n, 0) != 1}
        if wrong:
            raise BackendError(f"trace: these node layers were not called exactly once: "
                               f"{wrong}")
        grads = tape.gradient(loss, [recorded[n] for n in nodes],
                              unconnected_gradients=tf.UnconnectedGradients.ZERO)
        forward = {n: recorded[n].numpy() for n in nodes}
        backward = {n: tf.convert_to_tensor(g).numpy() for n, g in zip(nodes, grads)}
        return forward, backward

    def decode(self, model: Any, inputs: Mapping[str, np.ndarray], cache: Any = None,
               mode: str | None = None) -> tuple[np.ndarray, DecodeCache]:
        """One step of cached decoding, dropout off: see :meth:`Backend.decode`.

        ``mode``: ``"function"`` (default, :attr:`preferred_mode`) traces the step with
        ``tf.function(reduce_retracing=True)``: one trace for the prompt, then the growing cache
        length becomes a dynamic dimension after two steps; ``"eager"`` calls the layers
        directly; ``"xla"`` would recompile at every new cache length, so it decodes as
        ``"function"``. The numbers are the same either way, and it does not matter in which
        mode the model ran before.
        """
        spec = model.spec
        if spec.architecture == "encoder" or spec.head != "lm":
            raise InputError(f"decode needs a decoder or an encoder-decoder with head='lm'; "
                             f"this is a {spec.architecture} with head={spec.head!r}")
        if cache is not None and not isinstance(cache, DecodeCache):
            raise InputError(f"cache must be None or what decode returned, got "
                             f"{type(cache).__name__}")
        past = 0 if cache is None else cache.past_length
        first = cache is None
        arch = spec.architecture
        checked = check_inputs(spec, inputs, model.dtype, past_length=past,
                               encoder=first or arch != "encoder-decoder")
        tensors = self._tensors(checked)
        if cache is not None:
            side = "decoder_" if arch == "encoder-decoder" else ""
            b = checked[f"{side}attention_mask"].shape[0]
            if b != cache.batch_size:
                raise InputError(f"batch size {b} does not match the cache's "
                                 f"{cache.batch_size}; reorder_cache when the batch changes")
            tensors["past_key_values"] = cache.past_key_values
            if arch == "encoder-decoder":
                tensors["attention_mask"] = cache.encoder_attention_mask
        mode = self.check_mode(mode)
        out = self._compiled(model, "decode", "eager" if mode == "eager" else "function")(
            tensors)
        source_mask = None
        if arch == "encoder-decoder":
            source_mask = tensors["attention_mask"]
        return out["logits"].numpy(), DecodeCache(out["past_key_values"], source_mask)

    def reorder_cache(self, model: Any, cache: DecodeCache, beam_idx: np.ndarray
                      ) -> DecodeCache:
        """Every cached tensor's batch rows gathered by ``beam_idx`` ``(N,)``."""
        tf = self.tf
        idx = np.asarray(beam_idx, np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= cache.batch_size)):
            raise InputError(f"beam_idx must be a 1-D array of rows in [0, {cache.batch_size}), "
                             f"got {idx!r}")
        idx = tf.constant(idx)
        gather = lambda t: None if t is None else tf.gather(t, idx, axis=0)  # noqa: E731
        return DecodeCache(tf.nest.map_structure(gather, cache.past_key_values),
                           gather(cache.encoder_attention_mask))

    def framework_version(self) -> str:
        return f"{self.tf.__version__} (keras {self.keras.__version__})"
