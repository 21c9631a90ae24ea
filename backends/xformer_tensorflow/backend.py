"""The ``tensorflow`` backend: Keras 3 layers (TensorFlow backend) behind the ``Backend`` protocol.

Modes: ``eager`` (plain calls), ``function`` (``tf.function(reduce_retracing=True)``) and ``xla``
(``tf.function(jit_compile=True)``). TensorFlow and Keras are imported in ``__init__``, so
listing backends stays cheap (the pattern of einops' ``_backends.py``).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype, check_inputs
from xformer.errors import InputError
from xformer.spec import ModelSpec
from xformer.weights import check_weights


class TensorFlowBackend(Backend):
    """Builds :class:`xformer_tensorflow.modules.EncoderModel` (a ``keras.Model``) and runs it.

    Canonical names map to Keras variables by walking attribute paths (:meth:`variables`), never
    through Keras' generated variable paths. Gradients come from one ``tf.GradientTape`` that
    also records the token-embedding lookup, so ``inputs_embeds`` and ``word_embeddings`` get
    theirs in the same pass. Traced steps are cached on the model (``_xformer_steps``).
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
        model = self.modules.EncoderModel(spec, dtype=check_dtype(dtype))
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
                  (layers.LayerNormalization, "bias"): ("beta", False)}
        out = {}
        for p in model.spec.parameters():
            *path, leaf = p.name.split(".")
            layer = model
            for part in path:
                layer = layer[int(part)] if part.isdigit() else getattr(layer, part)
            attr, transposed = next(v for (cls, name), v in leaves.items()
                                    if isinstance(layer, cls) and name == leaf)
            out[p.name] = (getattr(layer, attr), transposed)
        return out

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        for name, (var, transposed) in self.variables(model).items():
            value = np.asarray(weights[name], dtype=model.dtype)
            var.assign(value.T if transposed else value)

    def get_weights(self, model: Any) -> dict[str, np.ndarray]:
        return {name: np.array(var.numpy().T if transposed else var.numpy())
                for name, (var, transposed) in self.variables(model).items()}

    def _compiled(self, model: Any, kind: str, mode: str):
        """The forward or forward+backward step for ``mode``, cached on the model."""
        cache = model.__dict__.setdefault("_xformer_steps", {})
        if (kind, mode) not in cache:
            tf = self.tf
            fn = self._forward_fn(model) if kind == "forward" else self._step_fn(model)
            if mode == "function":
                fn = tf.function(fn, reduce_retracing=True)
            elif mode == "xla":
                fn = tf.function(fn, jit_compile=True)
            cache[(kind, mode)] = fn
        return cache[(kind, mode)]

    def _forward_fn(self, model: Any):
        return lambda inputs: model(**inputs, training=False)

    def _step_fn(self, model: Any):
        tf, table = self.tf, self.variables(model)

        def step(inputs, cotangents):
            inputs = dict(inputs)
            with tf.GradientTape() as tape:
                if "input_ids" in inputs:  # look up inside the tape: d/d(embeds) and d/d(table)
                    embeds = model.embeddings.embed_tokens(inputs.pop("input_ids"))
                else:
                    embeds = inputs.pop("inputs_embeds")
                    tape.watch(embeds)
                outputs = model(inputs_embeds=embeds, **inputs, training=False)
                loss = tf.add_n([tf.reduce_sum(outputs[k] * cotangents[k]) for k in outputs])
            targets = [var for var, _ in table.values()]
            grads = tape.gradient(loss, [embeds] + targets)
            dense = [tf.zeros_like(x) if g is None else tf.convert_to_tensor(g)
                     for x, g in zip([embeds] + targets, grads)]
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
        out = {"inputs_embeds": grads[0].numpy()}
        for (name, (_, transposed)), g in zip(table.items(), grads[1:]):
            g = g.numpy()
            out[name] = np.ascontiguousarray(g.T) if transposed else g
        return {k: v.numpy() for k, v in outputs.items()}, out

    def framework_version(self) -> str:
        return f"{self.tf.__version__} (keras {self.keras.__version__})"
