"""The TensorFlow backend: Keras 3 layers (TensorFlow backend) behind the
:class:`xformer.backend.Backend` contract.

Modes: ``eager`` (plain calls), ``function`` (``tf.function(reduce_retracing=True)``) and ``xla``
(``tf.function(jit_compile=True)``). Only the framework-specific hooks live here;
:class:`~xformer.backend.Backend` validates the inputs, cotangents, caches and beam indices once
for every backend. TensorFlow and Keras are imported in ``__init__``, so listing backends stays
cheap (the pattern of einops' ``_backends.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype
from xformer.errors import BackendError
from xformer.spec import ModelSpec
from xformer.weights import check_weights


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
    modes = ("eager", "function", "xla")
    default_modes = ("eager", "function")
    preferred_mode = "function"

    def __init__(self) -> None:
        from . import import_tensorflow

        tf = import_tensorflow()  # first: its C++ start-up log honours TF_CPP_MIN_LOG_LEVEL
        import keras

        from . import modules

        self.tf, self.keras, self.modules = tf, keras, modules

    # -- the model -----------------------------------------------------------------------
    def build(self, spec: ModelSpec, dtype: str = "float32") -> Any:
        cls = {"encoder": self.modules.EncoderModel, "decoder": self.modules.DecoderModel,
               "encoder-decoder": self.modules.EncoderDecoderModel}[spec.architecture]
        model = cls(spec, dtype=check_dtype(dtype))
        model.build()
        return model

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        for name, (var, transposed) in self.variables(model).items():
            value = np.asarray(weights[name], dtype=model.dtype)
            var.assign(value.T if transposed else value)

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        return {name: np.array(var.numpy().T if transposed else var.numpy())
                for name, (var, transposed) in self.variables(model).items()}

    def model_dtype(self, model: Any) -> str:
        return np.dtype(model.dtype).name

    # -- the hooks -----------------------------------------------------------------------
    def _forward(self, model: Any, inputs: dict[str, np.ndarray], mode: str
                 ) -> dict[str, np.ndarray]:
        outputs = self._compiled(model, "forward", mode)(self._tensors(inputs))
        return {k: v.numpy() for k, v in outputs.items()}

    def _forward_backward(self, model: Any, inputs: dict[str, np.ndarray],
                          cotangents: dict[str, np.ndarray], mode: str
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        outputs, grads = self._compiled(model, "backward", mode)(
            self._tensors(inputs), self._tensors(cotangents))
        table = self.variables(model)
        embeds = list(self._embedders(model))
        out = {k: g.numpy() for k, g in zip(embeds, grads)}
        for (name, (_, transposed)), g in zip(table.items(), grads[len(embeds):]):
            g = g.numpy()
            out[name] = np.ascontiguousarray(g.T) if transposed else g
        return {k: v.numpy() for k, v in outputs.items()}, out

    def _trace(self, model: Any, inputs: dict[str, np.ndarray],
               cotangents: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
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
            BackendError: a node layer that was not called exactly once (a model that does not
                match its spec), or one already being traced.
        """
        tf = self.tf
        spec = model.spec
        names = spec.output_names()
        cot = self._tensors(cotangents)
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
            tensors = self._tensors(inputs)
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

    def _decode_step(self, model: Any, inputs: dict[str, np.ndarray], past_key_values,
                     mode: str) -> tuple[np.ndarray, tuple]:
        """``"function"`` (the default, :attr:`preferred_mode`) traces the step with
        ``tf.function(reduce_retracing=True)``: one trace for the prompt, then the growing cache
        length becomes a dynamic dimension after two steps; ``"eager"`` calls the layers
        directly; ``"xla"`` would recompile at every new cache length, so it decodes as
        ``"function"``. The numbers are the same either way, and it does not matter in which
        mode the model ran before."""
        tensors = self._tensors(inputs)
        if past_key_values is not None:
            tensors["past_key_values"] = past_key_values
        out = self._compiled(model, "decode", "eager" if mode == "eager" else "function")(
            tensors)
        return out["logits"].numpy(), out["past_key_values"]

    def _reorder_past(self, past_key_values: tuple, beam_idx: np.ndarray) -> tuple:
        tf = self.tf
        idx = tf.constant(beam_idx)
        return tf.nest.map_structure(lambda t: tf.gather(t, idx, axis=0), past_key_values)

    # -- the environment -----------------------------------------------------------------
    def framework_version(self) -> str:
        return f"{self.tf.__version__} (keras {self.keras.__version__})"

    def environment(self) -> dict[str, str]:
        threading = self.tf.config.threading
        intra, inter = (threading.get_intra_op_parallelism_threads(),
                        threading.get_inter_op_parallelism_threads())
        return {"tensorflow": self.tf.__version__, "keras": self.keras.__version__,
                "tensorflow threads": (f"{intra or 'default'} intra-op, "
                                       f"{inter or 'default'} inter-op")}

    # -- helpers -------------------------------------------------------------------------
    def variables(self, model: Any) -> dict[str, tuple[Any, bool]]:
        """``{canonical name: (keras.Variable, transposed)}``, by walking the attribute path of
        each name (``encoder.layers.0.ffn.linear1.weight`` -> ``model.encoder.layers[0].ffn
        .linear1.kernel``, transposed: Keras kernels are ``(in, out)``; a ``LayerNorm``'s
        ``weight`` / ``bias`` are ``gamma`` / ``beta``, an ``RMSNorm``'s ``weight`` is
        ``weight``)."""
        layers = self.keras.layers
        leaves = {(layers.Dense, "weight"): ("kernel", True),
                  (layers.Dense, "bias"): ("bias", False),
                  (layers.Embedding, "weight"): ("embeddings", False),
                  (layers.LayerNormalization, "weight"): ("gamma", False),
                  (layers.LayerNormalization, "bias"): ("beta", False),
                  (self.modules.RMSNorm, "weight"): ("weight", False),
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
