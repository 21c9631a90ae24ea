"""The TensorFlow backend: Keras 3 layers (TensorFlow backend) behind the
:class:`xformer.backend.Backend` contract.

Modes: ``eager`` (plain calls), ``function`` (``tf.function(reduce_retracing=True)``) and ``xla``
(``tf.function(jit_compile=True)``). Data-parallel training (issue #12) runs on
``tf.distribute.MultiWorkerMirroredStrategy`` (:meth:`TensorFlowBackend._init_distributed`).
Only the framework-specific hooks live here;
:class:`~xformer.backend.Backend` validates the inputs, cotangents, caches and beam indices once
for every backend. TensorFlow and Keras are imported in ``__init__``, so listing backends stays
cheap (the pattern of einops' ``_backends.py``).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype
from xformer.errors import BackendError, InputError, first_line
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
        #: The ``tf.distribute.MultiWorkerMirroredStrategy`` of a data-parallel run
        #: (:meth:`_init_distributed`), else ``None``.
        self._strategy = None

    # -- the model -----------------------------------------------------------------------
    def build(self, spec: ModelSpec, dtype: str = "float32") -> Any:
        """The Keras model of ``spec``; in a data-parallel run built under the strategy's
        ``scope()``, so its variables are ``MirroredVariable`` s (their initial values
        broadcast from worker 0: every worker must build the same model)."""
        cls = {"encoder": self.modules.EncoderModel, "decoder": self.modules.DecoderModel,
               "encoder-decoder": self.modules.EncoderDecoderModel}[spec.architecture]
        with self._scope():
            model = cls(spec, dtype=check_dtype(dtype))
            model.build()
        return model

    def set_weights(self, model: Any, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        with self._scope():  # a mirrored variable assigns every local copy
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

    # -- training --------------------------------------------------------------------------
    def _make_trainer(self, model: Any, config: Any, steps: int) -> "_KerasTrainer":
        """A Keras optimizer with ``torch.optim`` semantics built on the model's variables in
        canonical order (:func:`xformer_tensorflow.optimizers.make_optimizer`: the corrected
        :class:`~xformer_tensorflow.optimizers.SGD` / ``Adam`` / ``AdamW``, its rate a
        float64 :class:`~xformer_tensorflow.optimizers.Schedule`, AdamW's exclusions by
        canonical name through ``exclude_from_weight_decay``), whether the objective shifts
        (causal LM) and the config. The loss lives in the model's cached gradient function
        (:meth:`_train_fn`)."""
        from xformer.training import objective

        from .optimizers import make_optimizer

        variables = {name: var for name, (var, _) in self.variables(model).items()}
        with self._scope():  # data-parallel: the optimizer's state is mirrored too
            optimizer = make_optimizer(config, steps, variables, self.model_dtype(model),
                                       reduced_gradients=self._strategy is not None)
        return _KerasTrainer(optimizer, objective(model.spec) == "causal_lm", config)

    def _train_step(self, model: Any, trainer: "_KerasTrainer",
                    micro: list[dict[str, np.ndarray]], masks: list[dict[str, np.ndarray]] | None,
                    dropout: str, step: int, mode: str, shares: list[float] | None = None
                    ) -> tuple[float, float, float]:
        """One optimizer step: see :meth:`Backend._train_step`.

        The gradient of each micro-batch (the model called with ``training=True`` unless
        dropout is ``"off"``, the loss, ``loss / len(micro)``, ``tf.GradientTape``) is one
        function per mode, cached on the model: called directly in ``"eager"``,
        ``tf.function(reduce_retracing=True)`` in ``"function"``, ``tf.function(jit_compile=
        True)`` in ``"xla"``. The stream's masks are an argument of that function (a dict of
        tensors), set on the :class:`~xformer_tensorflow.modules.Dropout` layers while the
        body runs (while it is traced, in the traced modes) and cleared afterwards, so each
        call multiplies by its own masks, never by ones captured at trace time. The update
        (the micro-batch gradients added up, the global norm, :func:`~xformer_tensorflow.
        optimizers.clip_grad_norm`, ``optimizer.apply``) is a second function per trainer,
        compiled the same way. The rate is the optimizer's :class:`~xformer_tensorflow.
        optimizers.Schedule` at its ``iterations`` before the update.

        Data-parallel (``shares``): :meth:`_train_step_distributed`.
        """
        tf = self.tf
        if trainer.optimizer.iterations.numpy() != step:
            raise InputError(f"train_step {step} on a trainer that has done "
                             f"{int(trainer.optimizer.iterations.numpy())} steps; give the "
                             f"steps in order, from 0")
        if shares is not None:
            return self._train_step_distributed(model, trainer, micro, masks, dropout, mode,
                                                shares)
        grad_fn = self._compiled(model, "train", mode)
        count = tf.constant(float(len(micro)), dtype=model.dtype)
        losses, grads = [], []
        for i, batch in enumerate(micro):
            inputs = self._tensors({k: v for k, v in batch.items() if k != "labels"})
            site_masks = self._tensors(masks[i]) if masks is not None else {}
            loss, g = grad_fn(inputs, tf.constant(batch["labels"]), site_masks, count,
                              trainer.shift, dropout != "off")
            losses.append(loss)
            grads.append(g)
        lr, norm = trainer.update_fn(self, mode)(grads)
        loss = float(np.mean(np.array([x.numpy() for x in losses])))
        return loss, float(lr.numpy()), float(norm.numpy())

    def _train_step_distributed(self, model: Any, trainer: "_KerasTrainer",
                                micro: list[dict[str, np.ndarray]],
                                masks: list[dict[str, np.ndarray]] | None, dropout: str,
                                mode: str, shares: list[float]) -> tuple[float, float, float]:
        """One data-parallel optimizer step on ``tf.distribute.MultiWorkerMirroredStrategy``
        (one replica per worker, :meth:`_init_distributed`).

        ``micro`` / ``masks`` are this worker's rows (:func:`xformer.distributed.shard`). Each
        micro-batch's gradient is the single-process function (:meth:`_train_fn`, compiled by
        mode) run in the replica context by ``strategy.run``. Under a strategy a Keras loss
        divides its mean by ``num_replicas_in_sync`` ``N`` (``keras/src/losses/loss.py``,
        ``reduce_values`` -> ``scale_loss_for_distribution``: Keras averages over replicas, as
        DDP does), so the function gets the divisor ``len(micro) / (shares[i] * N)`` (exactly
        ``len(micro)`` for an even split): its gradient is that of ``shares[i] * local mean /
        len(micro)``, and the sum over the workers is the global mean's.

        The update (:meth:`_KerasTrainer.update_fn`, also under ``strategy.run``) adds the
        micro-batch gradients up, sums them over the workers together with the losses
        ``shares[i] * local mean`` (one ``ReplicaContext.all_reduce(SUM, ...)``: the
        strategy's collective all-reduce), then clips by the global norm of the reduced
        gradients and calls ``optimizer.apply``, whose own all-reduce passes the reduced
        gradients through (``reduced_gradients``, :mod:`xformer_tensorflow.optimizers`): every
        worker applies the same update to its copy of the mirrored variables. The returned
        loss is the mean over micro-batches of the reduced (global) losses.

        Modes: ``"eager"`` (TensorFlow warns that eager collectives are slow), ``"function"``;
        ``"xla"`` compiles the gradients with XLA and the update as a plain ``tf.function``
        (XLA on CPU does not compile collectives).
        """
        tf, strategy = self.tf, self._strategy
        grad_fn = self._compiled(model, "train", mode)
        replicas = strategy.num_replicas_in_sync  # = world.size (_init_distributed)
        losses, grads = [], []
        with strategy.scope():
            for i, batch in enumerate(micro):
                inputs = self._tensors({k: v for k, v in batch.items() if k != "labels"})
                site_masks = self._tensors(masks[i]) if masks is not None else {}
                weight = shares[i] * replicas  # 1.0 exactly for an even split
                count = tf.constant(len(micro) / weight, dtype=model.dtype)
                loss, g = strategy.run(grad_fn, args=(
                    inputs, tf.constant(batch["labels"]), site_masks, count, trainer.shift,
                    dropout != "off"))
                # Keras' (local mean / N) * shares[i] * N = shares[i] * local mean
                losses.append(loss * tf.constant(weight, dtype=model.dtype))
                grads.append(g)
            lr, norm, losses = trainer.update_fn(self, mode, distributed=True)(grads, losses)
        loss = float(np.mean(np.array([x.numpy() for x in losses])))
        return loss, float(lr.numpy()), float(norm.numpy())

    def _optimizer_state(self, model: Any, trainer: "_KerasTrainer") -> dict[str, np.ndarray]:
        """``{"<name>:exp_avg" | ":exp_avg_sq" | ":momentum_buffer": numpy}`` read from the
        optimizer's variables (Keras' ``"momentum"`` / ``"velocity"``), kernels transposed back
        to the canonical ``(out, in)``; empty before the first step."""
        opt = trainer.optimizer
        if int(opt.iterations.numpy()) == 0:
            return {}
        out = {}
        for name, (var, transposed) in self.variables(model).items():
            for key, value in opt.torch_state(var).items():
                arr = np.array(value.numpy())
                out[f"{name}:{key}"] = np.ascontiguousarray(arr.T) if transposed else arr
        return out

    def _train_fn(self, model: Any):
        """``(inputs, labels, masks, count, shift, training) -> (loss, grads)``: one
        micro-batch's mean loss, Keras' ``SparseCategoricalCrossentropy(from_logits=True,
        ignore_class=-100)`` in the model dtype (a Keras loss computes in ``floatx()`` unless
        told; Hugging Face ``ForCausalLMLoss``: ``logits[:, :-1]`` against ``labels[:, 1:]``
        for a causal LM, no shift for seq2seq), and the gradients of ``loss / count`` w.r.t. the
        model's variables in canonical order (dense, Keras layout)."""
        tf, table = self.tf, self.variables(model)
        from xformer.training import IGNORE_INDEX

        loss_obj = self.keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, ignore_class=IGNORE_INDEX, dtype=model.dtype)
        variables = [var for var, _ in table.values()]

        def step(inputs, labels, masks, count, shift, training):
            with tf.GradientTape() as tape:
                with self.modules.use_dropout_masks(model, masks):
                    logits = model(**inputs, training=training)["logits"]
                if shift:
                    logits, labels = logits[:, :-1], labels[:, 1:]
                loss = loss_obj(labels, logits)
                scaled = loss / count
            grads = tape.gradient(scaled, variables,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
            return loss, [tf.convert_to_tensor(g) for g in grads]

        return step

    # -- data-parallel ---------------------------------------------------------------------
    def _init_distributed(self) -> Any:
        """Join the run ``TF_CONFIG`` describes (``{"cluster": {"worker": [...]}, "task":
        {"type": "worker", "index": i}}``) with ``tf.distribute.MultiWorkerMirroredStrategy``:
        its gRPC server, the coordination service (worker 0 leads) and the collective ops
        (ring all-reduce on CPU). One replica per worker: CPU, or one visible GPU.

        TensorFlow configures collectives when its runtime starts, so the strategy must come
        first: before the model is built or any other op runs in the process.

        Returns:
            :class:`xformer.distributed.World`: rank = the task's place in the cluster (the
            chief first, if any), size = the number of workers.
        Raises:
            BackendError: TensorFlow already ran in this process, ``TF_CONFIG`` that the
                strategy rejects, or a worker with more than one device.
        """
        from xformer.distributed import ENGINES, World

        tf = self.tf
        try:
            strategy = tf.distribute.MultiWorkerMirroredStrategy()
        except RuntimeError as e:
            if "program startup" in str(e):
                raise BackendError("tf.distribute.MultiWorkerMirroredStrategy must start before "
                                   "TensorFlow runs anything in this process; call "
                                   "init_distributed() first, before building a model") from None
            raise BackendError(f"MultiWorkerMirroredStrategy could not join the run "
                               f"({first_line(e)}); check TF_CONFIG") from None
        except ValueError as e:
            raise BackendError(f"MultiWorkerMirroredStrategy rejected TF_CONFIG "
                               f"({first_line(e)}); give {{\"cluster\": {{\"worker\": "
                               f"[\"host:port\", ...]}}, \"task\": {{\"type\": \"worker\", "
                               f"\"index\": i}}}}") from None
        resolver = strategy.cluster_resolver
        jobs = resolver.cluster_spec().as_dict()
        chiefs, workers = len(jobs.get("chief", [])), len(jobs.get("worker", []))
        rank = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        size = chiefs + workers
        if strategy.num_replicas_in_sync != size:
            local = strategy.num_replicas_in_sync // size
            raise BackendError(f"worker {rank} has {local} devices; data-parallel training "
                               f"takes one device per worker (hide the others, e.g. with "
                               f"CUDA_VISIBLE_DEVICES)")
        self._strategy = strategy
        return World(ENGINES["tensorflow"], rank, size)

    def _finish_distributed(self) -> None:
        """A barrier: one all-reduce (SUM) of 1 from every worker through the strategy, which
        returns once every worker has done its last step."""
        tf, strategy = self.tf, self._strategy
        if strategy is None:
            return

        @tf.function
        def barrier():
            ones = strategy.run(lambda: tf.constant(1.0, dtype=tf.float64))
            return strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)

        with strategy.scope():
            total = barrier()
        if int(total.numpy()) != self.world.size:
            raise BackendError(f"the final barrier counted {int(total.numpy())} of "
                               f"{self.world.size} workers")

    def _scope(self) -> contextlib.AbstractContextManager:
        """The strategy's ``scope()`` in a data-parallel run (variables created inside are
        mirrored), else nothing."""
        return self._strategy.scope() if self._strategy is not None else contextlib.nullcontext()

    # -- foreign modules (xformer check) ---------------------------------------------------
    def _foreign_parameters(self, module, inputs, cmap):
        """``{variable .path: (shape, transposed by default)}`` of every trainable variable of a
        user's ``keras.Model`` / ``keras.layers.Layer`` (a shared variable once; non-trainable
        state such as a dropout seed or a frozen layer is not a parameter). A ``Dense`` kernel
        is ``(in, out)``: transposed by default; an ``Embedding`` table ``(V, D)``, a
        ``LayerNormalization``'s ``gamma`` / ``beta`` and everything else are as they are.

        Keras creates variables on the first call: a module with an unbuilt layer is called
        once first, dropout off, with ``inputs`` under ``cmap.inputs``' keywords.

        Raises:
            InputError: not a Keras layer, the call fails (its error's first line), two
                variables with one ``.path`` (give sibling layers distinct names).
        """
        self._foreign_check(module)
        if any(not layer.built for layer in module._flatten_layers()):
            self._foreign_call(module, {cmap.inputs[k]: v for k, v in inputs.items()
                                        if k in cmap.inputs})
        kernels = {id(v) for layer in module._flatten_layers()
                   if isinstance(layer, self.keras.layers.Dense)
                   for v in layer.trainable_variables if v.name == "kernel"}
        return {path: (tuple(var.shape), id(var) in kernels)
                for path, var in self._foreign_variables(module).items()}

    def _foreign_load(self, module, arrays, dtype: str) -> None:
        """``var.assign`` each ``{variable .path: array, native layout}``.

        Raises:
            InputError: a variable whose dtype is not ``dtype`` (the factory ignored it).
        """
        variables = self._foreign_variables(module)
        for name, value in arrays.items():
            var = variables[name]
            if np.dtype(var.dtype).name != dtype:
                raise InputError(f"variable {name!r} is {np.dtype(var.dtype).name} but the "
                                 f"check runs in {dtype}; build every layer with the dtype "
                                 f"the factory is given (dtype=dtype)")
            var.assign(np.ascontiguousarray(value))

    def _foreign_run(self, module, kwargs, output, cotangent, nodes):
        """One eager pass, ``training=False`` (Keras passes it on only to a ``call`` that takes
        it), under one ``tf.GradientTape``: the output (``select_output``), the gradient of
        ``sum(output * cotangent)`` for every trainable variable (``{.path: (shape) array}``,
        zeros where unconnected, an ``Embedding``'s sparse gradient made dense) and, for each
        of ``nodes`` (``{canonical node: Keras layer .path}``), the layer's output and the
        gradient flowing into it.

        As in :meth:`_trace`, each node layer gets, for the pass only, an instance attribute
        ``call`` wrapping its ``call`` (so ``layer(x)`` and ``layer.call(x)`` both go through
        it): the layer returns ``out + probe``, ``probe`` a zero tensor the tape watches, so
        ``d loss / d probe`` is the gradient flowing into that output alone (a layer called
        more than once: its last call; a tuple output: its first element). Every wrapper is
        removed afterwards, also on errors.

        Raises:
            InputError: a node path that is not one layer of the module (the known paths
                named), a node layer that was not called, the call failing, an output that is
                not a tensor.
        """
        from xformer.checking import select_output

        tf = self.tf
        self._foreign_check(module)
        layers = self._foreign_layers(module)
        targets: dict[int, tuple[Any, list[str]]] = {}
        for node, path in nodes.items():
            found = layers.get(path, [])
            if len(found) != 1:
                known = ", ".join(list(layers)[:6])
                raise InputError(
                    f"nodes maps {node} to {path!r}, which is "
                    + (f"the path of {len(found)} layers (give them distinct names)" if found
                       else f"not a layer of the module (Keras layer .path: {known}, ...)"))
            targets.setdefault(id(found[0]), (found[0], []))[1].append(node)
        captured: dict[str, tuple[Any, Any]] = {}
        tape = tf.GradientTape()

        def probing(names: list[str], call):
            def call_and_probe(*args, **kwargs):
                out = call(*args, **kwargs)
                first = out[0] if isinstance(out, (tuple, list)) else out
                if not (tf.is_tensor(first) and first.dtype.is_floating):
                    for name in names:
                        captured[name] = (first, None)
                    return out
                probe = tf.zeros_like(first)
                tape.watch(probe)
                probed = first + probe
                mask = getattr(first, "_keras_mask", None)
                if mask is not None:  # a layer called by .call directly keeps its mask
                    probed._keras_mask = mask
                for name in names:
                    captured[name] = (first, probe)
                if not isinstance(out, (tuple, list)):
                    return probed
                rest = list(out[1:])
                return (out._make([probed, *rest]) if hasattr(out, "_make")
                        else type(out)([probed, *rest]))
            return call_and_probe

        missing = object()
        patched: list[tuple[Any, Any]] = []
        try:
            for layer, names in targets.values():
                previous = vars(layer).get("call", missing)
                object.__setattr__(layer, "call", probing(names, layer.call))
                patched.append((layer, previous))
            with tape:
                y = select_output(self._foreign_call(module, kwargs), output)
                if not tf.is_tensor(y):
                    raise InputError(f"the module's output is a {type(y).__name__}, not a "
                                     f"tensor; set output in the mapping file")
                loss = (tf.reduce_sum(y * tf.cast(cotangent, y.dtype))
                        if tuple(y.shape) == cotangent.shape else None)
        finally:
            for layer, previous in reversed(patched):
                if previous is missing:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", previous)
        for node in nodes:
            if node not in captured:
                raise InputError(f"node {node}'s layer {nodes[node]!r} was not called in the "
                                 f"forward pass")
        variables = self._foreign_variables(module)
        probed = [n for n in nodes if captured[n][1] is not None]
        sources = list(variables.values()) + [captured[n][1] for n in probed]
        if loss is None:  # a mis-shaped output: check() says so
            grads = [tf.zeros(s.shape, cotangent.dtype) for s in sources]
        else:
            grads = tape.gradient(loss, sources,
                                  unconnected_gradients=tf.UnconnectedGradients.ZERO)
        grads = [tf.convert_to_tensor(g).numpy() for g in grads]
        native = dict(zip(variables, grads))
        flowing = dict(zip(probed, grads[len(variables):]))
        values = {}
        for node in nodes:
            value = np.asarray(captured[node][0])
            values[node] = (value.copy(), flowing.get(node, np.zeros(value.shape,
                                                                     cotangent.dtype)))
        return np.asarray(y).copy(), native, values

    def _foreign_check(self, module) -> None:
        """Raises InputError unless ``module`` is a Keras layer (a ``keras.Model`` is one)."""
        if not isinstance(module, self.keras.layers.Layer):
            raise InputError(f"the factory returned {type(module).__name__}, not a keras.Model "
                             f"or keras.layers.Layer")

    def _foreign_call(self, module, kwargs: Mapping[str, np.ndarray]) -> Any:
        """``module(**kwargs, training=False)``, the arrays made tensors.

        Raises:
            InputError: the call raised (the keywords and its error's first line).
        """
        tensors = {k: self.tf.convert_to_tensor(np.ascontiguousarray(v))
                   for k, v in kwargs.items()}
        try:
            return module(**tensors, training=False)
        except InputError:
            raise
        except Exception as e:  # the user's module failed: their error, one line
            raise InputError(f"calling the module with {', '.join(kwargs) or 'no keywords'} "
                             f"raised {type(e).__name__}: {_keras_error_line(e)} (inputs in "
                             f"the mapping file names its call keywords)") from None

    def _foreign_variables(self, module) -> dict[str, Any]:
        """``{.path: variable}`` of the module's trainable variables, each once.

        Raises:
            InputError: two variables with one ``.path``.
        """
        out: dict[str, Any] = {}
        seen: set[int] = set()
        for var in module.trainable_variables:
            if id(var) in seen:
                continue
            seen.add(id(var))
            if var.path in out:
                raise InputError(f"two variables of the module have the path {var.path!r}; "
                                 f"give sibling layers distinct names")
            out[var.path] = var
        return out

    @staticmethod
    def _foreign_layers(module) -> dict[str, list[Any]]:
        """``{layer .path: [layers]}`` of the module and every nested layer (built ones: an
        unbuilt layer has no path yet)."""
        out: dict[str, list[Any]] = {}
        for layer in module._flatten_layers(include_self=True, recursive=True):
            if layer.path is not None:
                out.setdefault(layer.path, []).append(layer)
        return out

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
                  "decode": self._decode_fn, "train": self._train_fn}[kind](model)
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


def _keras_error_line(error: BaseException) -> str:
    """:func:`xformer.errors.first_line`, or for an error Keras annotated (``Exception
    encountered when calling Block.call().``, the original message on a later line in ANSI
    bold) ``"in Block.call(): <the original message's first line>"``."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    head, _, rest = text.partition("\n")
    found = re.match(r"Exception encountered when calling (\S+?)\.?$", head.strip())
    lines = [ln.strip() for ln in rest.splitlines() if ln.strip()]
    if found and lines:
        return f"in {found.group(1)}: {lines[0]}"[:200]
    return first_line(error)


class _KerasTrainer:
    """The native trainer of :meth:`TensorFlowBackend.make_trainer`: the Keras ``optimizer``
    (:mod:`xformer_tensorflow.optimizers`), whether the objective shifts (causal LM) and the
    config; :meth:`update_fn` compiles the update once per mode."""

    def __init__(self, optimizer: Any, shift: bool, config: Any) -> None:
        self.optimizer, self.shift, self.config = optimizer, shift, config
        self._updates: dict[str, Any] = {}

    def update_fn(self, backend: TensorFlowBackend, mode: str, distributed: bool = False):
        """``(micro_grads: list of lists of tensors) -> (lr, pre-clip global norm)``: the
        gradients added up in micro-batch order, the norm of the per-tensor norms, clipping when
        configured, ``optimizer.apply``; eager, ``tf.function`` or ``jit_compile`` by mode.

        ``distributed``: ``(micro_grads, losses) -> (lr, norm, losses)``, the same body run by
        ``strategy.run`` in the replica context, with the added-up gradients and ``losses``
        (one scalar per micro-batch) summed over the workers by one ``ReplicaContext.
        all_reduce(SUM, ...)`` before the norm; eager, else ``tf.function`` (also for
        ``"xla"``: XLA on CPU does not compile collectives, b/194942685)."""
        key = (mode, distributed)
        if key not in self._updates:
            from .optimizers import clip_grad_norm, global_norm

            tf, opt, limit = backend.tf, self.optimizer, self.config.clip_grad_norm

            def update(micro_grads, losses=None):
                grads = list(micro_grads[0])
                for more in micro_grads[1:]:
                    grads = [a + b for a, b in zip(grads, more)]
                if distributed:
                    # identity: placed on this replica's device, where the all-reduce (its
                    # merge_call on CPU) sends the sums; the function's inputs have no device
                    values = [tf.identity(v) for v in [*grads, *losses]]
                    reduced = tf.distribute.get_replica_context().all_reduce(
                        tf.distribute.ReduceOp.SUM, values)
                    grads, losses = reduced[:len(grads)], reduced[len(grads):]
                if limit is None:
                    norm = global_norm(grads)
                else:
                    grads, norm = clip_grad_norm(grads, limit)
                lr = tf.convert_to_tensor(opt.learning_rate)
                opt.apply(grads)
                return (lr, norm, losses) if distributed else (lr, norm)

            if distributed:
                strategy, local = backend._strategy, update
                update = lambda micro_grads, losses: strategy.run(  # noqa: E731
                    local, args=(micro_grads, losses))
            if mode == "function" or (mode == "xla" and distributed):
                update = tf.function(update, reduce_retracing=True)
            elif mode == "xla":
                update = tf.function(update, jit_compile=True)
            self._updates[key] = update
        return self._updates[key]
