"""The PyTorch backend: :class:`xformer_torch.modules.EncoderModel`, ``DecoderModel`` and
``EncoderDecoderModel`` behind the :class:`xformer.backend.Backend` contract.

Only the framework-specific hooks live here; :class:`~xformer.backend.Backend` validates the
inputs, cotangents, caches and beam indices once for every backend. Imports torch lazily (in
``TorchBackend.__init__``), so listing backends stays cheap.
"""

from __future__ import annotations

import contextlib

from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype
from xformer.weights import check_weights


class TorchBackend(Backend):
    """PyTorch (``torch.nn``). Modes: ``"eager"``; ``"compile"`` runs ``torch.compile(model)``,
    compiled once per model and cached on it (``model._xformer_compiled``). Tracing and cached
    decoding always run the module itself, eagerly. Training (:meth:`make_trainer`,
    :meth:`train_step`) uses ``torch.optim``, ``LambdaLR`` and ``clip_grad_norm_`` as they are
    (:mod:`xformer_torch.optimizers`), in both modes."""

    name = "torch"
    modes = ("eager", "compile")
    default_modes = ("eager",)
    preferred_mode = "eager"

    def __init__(self) -> None:
        import torch

        from . import modules

        self.torch = torch
        self.modules = modules

    # -- the model -----------------------------------------------------------------------
    def build(self, spec, dtype: str = "float32"):
        cls = {"encoder": self.modules.EncoderModel, "decoder": self.modules.DecoderModel,
               "encoder-decoder": self.modules.EncoderDecoderModel}[spec.architecture]
        return cls(spec, dtype=getattr(self.torch, check_dtype(dtype)))

    def set_weights(self, model, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        dtype = self.model_dtype(model)
        model.load_state_dict({name: self.torch.from_numpy(np.array(w, dtype=dtype))
                               for name, w in weights.items()}, strict=True)

    def get_weights(self, model) -> dict[str, np.ndarray]:
        state = model.state_dict()
        return {p.name: state[p.name].detach().cpu().numpy().copy()
                for p in model.spec.parameters()}

    def model_dtype(self, model) -> str:
        return str(next(model.parameters()).dtype).removeprefix("torch.")

    # -- the hooks -----------------------------------------------------------------------
    def _forward(self, model, inputs: dict[str, np.ndarray], mode: str
                 ) -> dict[str, np.ndarray]:
        fn = self._callable(model, mode)
        x = self._tensors(model, inputs)
        # the numbers forward_backward and trace compute, bit for bit (docs/design.md §8)
        with self._eval(model), self.torch.no_grad(), self.modules.written_out_attention():
            out = fn(**x)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def _forward_backward(self, model, inputs: dict[str, np.ndarray],
                          cotangents: dict[str, np.ndarray], mode: str
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        torch = self.torch
        fn = self._callable(model, mode)
        x = self._tensors(model, inputs)
        params = dict(model.named_parameters())
        sides = model.spec.input_embeds_names()  # inputs_embeds (, decoder_inputs_embeds)
        with self._eval(model), torch.enable_grad(), self.modules.written_out_attention():
            # the lookups run eagerly, so d(loss)/d(embeds) comes with the parameter gradients
            embeds = {}
            for key in sides:
                ids = key.replace("inputs_embeds", "input_ids")
                if ids in x:
                    lookup = (model.embed_decoder_tokens if key == "decoder_inputs_embeds"
                              else model.embeddings.embed_tokens)
                    embeds[key] = lookup(x.pop(ids))
                else:
                    embeds[key] = x.pop(key).requires_grad_(True)
            out = fn(**embeds, **x)
            names, cots = self._cotangents(out, cotangents)
            grads = torch.autograd.grad([out[k] for k in names],
                                        [*embeds.values(), *params.values()],
                                        grad_outputs=cots, allow_unused=True)
        numpy = {k: v.detach().cpu().numpy() for k, v in out.items()}
        result = {}
        for key, e, g in zip(embeds, embeds.values(), grads):
            result[key] = (torch.zeros_like(e) if g is None else g).detach().cpu().numpy()
        for (name, p), g in zip(params.items(), grads[len(embeds):]):
            result[name] = (torch.zeros_like(p) if g is None else g).detach().cpu().numpy()
        return numpy, result

    def _trace(self, model, inputs: dict[str, np.ndarray], cotangents: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every node of ``model.spec.nodes()``: its output and the gradient of the loss
        ``sum_k sum(outputs[k] * cotangents[k])`` with respect to it (see
        :meth:`xformer.backend.Backend.trace`).

        One eager forward + backward pass of the module itself (never the ``torch.compile``
        wrapper), dropout off. A forward hook on each node's sub-module
        (``model.get_submodule(name)``) records its output (the hidden state of an
        ``(out, (k, v))`` tuple) and returns ``output + probe``, ``probe`` a zero tensor that
        requires grad: adding an exact zero leaves every value as it was, and
        ``d loss / d probe`` is the gradient flowing into that output, whether or not the
        parameters or inputs require grad. The hooks are removed afterwards (also on error);
        no parameter's ``.grad`` is touched, and the production forward path has no hooks.
        """
        torch = self.torch
        nodes = [name for name, _ in model.spec.nodes()]
        x = self._tensors(model, inputs)
        values: dict[str, Any] = {}
        probes: dict[str, Any] = {}

        def hook_for(name: str):
            def hook(module, args, output):
                if name in values:
                    raise RuntimeError(f"trace: node {name!r} ran twice in one forward pass")
                hidden = output[0] if isinstance(output, tuple) else output
                probe = torch.zeros_like(hidden, requires_grad=True)
                values[name], probes[name] = hidden.detach(), probe
                return (hidden + probe, *output[1:]) if isinstance(output, tuple) else (
                    hidden + probe)
            return hook

        handles = [model.get_submodule(name).register_forward_hook(hook_for(name))
                   for name in nodes]
        try:
            with self._eval(model), torch.enable_grad(), self.modules.written_out_attention():
                out = model(**x)
                names, cots = self._cotangents(out, cotangents)
                missing = [n for n in nodes if n not in probes]
                if missing:
                    raise RuntimeError(f"trace: nodes {missing} did not run")
                grads = torch.autograd.grad([out[k] for k in names],
                                            [probes[n] for n in nodes], grad_outputs=cots,
                                            allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        forward = {n: values[n].cpu().numpy() for n in nodes}
        backward = {n: (torch.zeros_like(probes[n]) if g is None else g).detach().cpu().numpy()
                    for n, g in zip(nodes, grads)}
        return forward, backward

    def _decode_step(self, model, inputs: dict[str, np.ndarray], past_key_values, mode: str
                     ) -> tuple[np.ndarray, tuple]:
        """Eager, no grad, dropout off, whatever ``mode`` (``torch.compile`` would recompile at
        every new cache length); the caller's train/eval mode is restored."""
        x = self._tensors(model, inputs)
        with self._eval(model), self.torch.no_grad():
            out = model(**x, past_key_values=past_key_values, use_cache=True)
        return out["logits"].detach().cpu().numpy(), out["past_key_values"]

    def _reorder_past(self, past_key_values: tuple, beam_idx: np.ndarray) -> tuple:
        rows = self.torch.from_numpy(beam_idx)
        return tuple(tuple(t.index_select(0, rows.to(t.device)) for t in layer)
                     for layer in past_key_values)

    # -- training ------------------------------------------------------------------------
    def _make_trainer(self, model, config, steps: int):
        """``torch.optim`` ``SGD`` / ``Adam`` / ``AdamW`` over ``model.named_parameters()`` with
        its ``LambdaLR`` schedule and the clip threshold (:mod:`xformer_torch.optimizers`):
        torch's semantics are the contract, nothing to correct."""
        from . import optimizers

        trainer = optimizers.make_trainer(model, config, steps)
        if self.world is not None and self.world.size > 1:
            # the module's own parameters stay the optimizer's; DDP only reduces their .grad
            # (averaged over the workers, bucketed, overlapped with the backward pass)
            import inspect

            ddp = self.torch.nn.parallel.DistributedDataParallel
            # no buffer broadcast at every forward: the buffers (rotary tables, position ids)
            # are computed, the same on every worker (torch >= 2.12 names it differently)
            no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers"
                       in inspect.signature(ddp).parameters else {"broadcast_buffers": False})
            trainer.ddp = ddp(model, **no_sync)
        return trainer

    def _init_distributed(self):
        """``torch.distributed.init_process_group("gloo")`` from torchrun's variables
        (``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``); gloo: CPU tensors,
        float64 included (NCCL is for CUDA tensors, which this backend does not place)."""
        import datetime

        from xformer.backend import BackendError
        from xformer.distributed import ENGINES, World
        from xformer.errors import first_line

        dist = self.torch.distributed
        if not dist.is_available():
            raise BackendError("this torch build has no torch.distributed; install a build "
                               "with it (every PyPI wheel has it)")
        if not dist.is_initialized():
            try:
                dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=5))
            except (RuntimeError, ValueError, KeyError) as e:
                raise BackendError(f"torch.distributed could not join the run "
                                   f"({first_line(e)}); "
                                   f"check MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE "
                                   f"(torchrun sets them)") from None
        return World(ENGINES["torch"], dist.get_rank(), dist.get_world_size())

    def _finish_distributed(self) -> None:
        dist = self.torch.distributed
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def _train_step(self, model, trainer, micro: list[dict[str, np.ndarray]],
                    masks: list[dict[str, np.ndarray]] | None, dropout: str, step: int,
                    mode: str, shares: list[float] | None = None) -> tuple[float, float, float]:
        """One optimizer step, the Hugging Face ``Trainer`` loop written with torch's own parts:
        ``zero_grad``; per micro-batch the model (``mode``'s callable, :meth:`_callable`) in
        training mode, the loss with ``F.cross_entropy(ignore_index=-100)`` (:meth:`_loss`),
        ``(loss / K).backward()`` (the ``.grad`` add up over the ``K`` micro-batches);
        ``clip_grad_norm_`` (or just the global norm); ``optimizer.step()`` then
        ``scheduler.step()``.

        Dropout: ``"native"`` is torch's own (``model.train()``); ``"off"`` runs the model in
        eval mode (the modules' only train/eval difference is dropout); ``"stream"`` trains with
        each micro-batch's masks on the :class:`~xformer_torch.modules.Dropout` layers
        (:func:`~xformer_torch.modules.use_dropout_masks`). In ``"compile"`` mode the masks are
        module attributes that Dynamo lifts as graph inputs: a new mask each step neither
        recompiles nor is reused as a constant (tests/test_train_torch.py checks the recompile
        count and the numbers against eager). The caller's train/eval mode is restored.

        Data-parallel (``shares``): the model runs through its ``DistributedDataParallel``
        (compiled in ``"compile"`` mode), which averages the gradients over the workers during
        the last micro-batch's backward pass (``no_sync()`` for the others: the local
        gradients add up first, as in ``torch.nn.parallel``'s accumulation recipe); each loss
        is scaled by ``shares[i] * world_size`` (exactly 1 for an even split) and the global
        loss is one ``all_reduce`` of the shares' weighted losses.
        """
        from .modules import use_dropout_masks, written_out_attention
        from .optimizers import clip_grad_norm

        torch = self.torch
        ddp = trainer.ddp if shares is not None else None
        fn = self._callable(model, mode) if ddp is None else self._callable_ddp(ddp, mode)
        was_training = model.training
        losses = []
        trainer.optimizer.zero_grad(set_to_none=True)
        try:
            model.train(dropout != "off")
            # the protocol's attention: the numbers conformance checks (docs/design.md §3)
            with written_out_attention():
                for i, batch in enumerate(micro):
                    x = self._tensors(model, batch)
                    labels = x.pop("labels")
                    site_masks = None if masks is None else self._tensors(model, masks[i])
                    sync = (contextlib.nullcontext() if ddp is None or i == len(micro) - 1
                            else ddp.no_sync())
                    with sync:
                        with use_dropout_masks(model, site_masks):
                            logits = fn(**x)["logits"]
                        loss = self._loss(model, logits, labels)
                        if shares is not None:
                            loss = loss * (shares[i] * self.world.size)
                        (loss / len(micro)).backward()
                    losses.append(loss.detach())
        finally:
            model.train(was_training)
        if ddp is not None:  # sum over workers of share * local mean = the global mean
            total = torch.stack(losses) / self.world.size
            torch.distributed.all_reduce(total)
            losses = list(total)
        norm = clip_grad_norm(model.parameters(), trainer.clip)
        lr = trainer.lr  # what this optimizer.step() uses: lr_at(step), set by LambdaLR
        trainer.optimizer.step()
        trainer.scheduler.step()
        return float(torch.stack(losses).mean()), lr, float(norm)

    def _loss(self, model, logits, labels):
        """The objective (:func:`xformer.training.objective`) natively: mean
        ``F.cross_entropy(ignore_index=-100)`` of ``logits`` ``(B, T, V)`` against ``labels``
        ``(B, T)`` int64, shifted for a causal LM (``logits[:, :-1]`` vs ``labels[:, 1:]``,
        Hugging Face ``ForCausalLMLoss``), not for seq2seq; in the logits' dtype (Hugging Face
        upcasts to float32; here float64 stays float64)."""
        from xformer.training import objective

        if objective(model.spec) == "causal_lm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        return self.torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)

    def _optimizer_state(self, model, trainer) -> dict[str, np.ndarray]:
        """``optimizer.state`` by canonical name (the param groups' ``param_names``); torch's
        layout is the canonical one."""
        return {k: v.detach().cpu().numpy().copy() for k, v in trainer.state().items()}

    # -- foreign modules (xformer check) ---------------------------------------------------
    def _foreign_parameters(self, module, inputs, cmap):
        """``named_parameters()`` (shared parameters once); torch's ``nn.Linear`` layout is the
        canonical ``(out, in)``: nothing transposed by default."""
        if not isinstance(module, self.torch.nn.Module):
            from xformer.errors import InputError

            raise InputError(f"the factory returned {type(module).__name__}, not a "
                             f"torch.nn.Module")
        return {name: (tuple(p.shape), False) for name, p in module.named_parameters()}

    def _foreign_load(self, module, arrays, dtype: str) -> None:
        from xformer.errors import InputError

        params = dict(module.named_parameters())
        want = getattr(self.torch, dtype)
        with self.torch.no_grad():
            for name, value in arrays.items():
                p = params[name]
                if p.dtype != want:
                    raise InputError(f"parameter {name!r} is {str(p.dtype).removeprefix('torch.')}"
                                     f" but the check runs in {dtype}; build the module in the "
                                     f"dtype the factory is given")
                p.copy_(self.torch.from_numpy(np.ascontiguousarray(value)))

    def _foreign_run(self, module, kwargs, output, cotangent, nodes):
        """Eval mode (dropout off) for the pass, the caller's mode restored; the node outputs
        captured by forward hooks and ``retain_grad()`` (a sub-module called more than once:
        its last call)."""
        from xformer.checking import select_output
        from xformer.errors import InputError

        torch = self.torch
        subs = {}
        for node, path in nodes.items():
            try:
                subs[node] = module.get_submodule(path)
            except AttributeError:
                raise InputError(f"nodes maps {node} to {path!r}, which is not a sub-module "
                                 f"of the module (named_modules() names)") from None
        captured: dict[str, Any] = {}
        handles = []
        for node, sub in subs.items():
            def hook(mod, args, out, node=node):
                t = out[0] if isinstance(out, (tuple, list)) else out
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.retain_grad()
                captured[node] = t
            handles.append(sub.register_forward_hook(hook))
        x = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in kwargs.items()}
        was_training = module.training
        for p in module.parameters():
            p.grad = None
        try:
            module.eval()
            y = select_output(module(**x), output)
            if not isinstance(y, torch.Tensor):
                raise InputError(f"the module's output is a {type(y).__name__}, not a tensor; "
                                 f"set output in the mapping file")
            if tuple(y.shape) == cotangent.shape:
                (y * torch.from_numpy(cotangent).to(y.dtype)).sum().backward()
        finally:
            module.train(was_training)
            for h in handles:
                h.remove()
        grads = {n: (np.zeros(tuple(p.shape), cotangent.dtype) if p.grad is None
                     else p.grad.detach().numpy().copy())
                 for n, p in module.named_parameters()}
        values = {}
        for node in nodes:
            t = captured.get(node)
            if t is None:
                raise InputError(f"node {node}'s sub-module {nodes[node]!r} was not called "
                                 f"in the forward pass")
            g = t.grad
            values[node] = (t.detach().numpy().copy(),
                            np.zeros(tuple(t.shape), cotangent.dtype) if g is None
                            else g.detach().numpy().copy())
        return y.detach().numpy().copy(), grads, values

    # -- the environment -----------------------------------------------------------------
    def framework_version(self) -> str:
        return self.torch.__version__

    def environment(self) -> dict[str, str]:
        torch = self.torch
        return {"torch": torch.__version__,
                "torch threads": (f"{torch.get_num_threads()} intra-op, "
                                  f"{torch.get_num_interop_threads()} inter-op")}

    # -- helpers -------------------------------------------------------------------------
    def _cotangents(self, out: Mapping[str, Any], cotangents: Mapping[str, np.ndarray]
                    ) -> tuple[list[str], list[Any]]:
        """The output names, in the model's order, and their (checked) cotangents as tensors
        on the outputs' device."""
        names = [k for k in out if k in cotangents]
        cots = [self.torch.from_numpy(np.ascontiguousarray(cotangents[k])).to(out[k].device)
                for k in names]
        return names, cots

    def _tensors(self, model, checked: Mapping[str, np.ndarray]) -> dict[str, Any]:
        device = next(model.parameters()).device
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(device)
                for k, v in checked.items()}

    def _callable(self, model, mode: str):
        if mode == "eager":
            return model
        compiled = model.__dict__.get("_xformer_compiled")
        if compiled is None:  # via __dict__: an nn.Module attribute would join the state_dict
            # Inductor's pattern matcher rewrites softmax(QK^T/s + bias)V into the fused CPU SDPA
            # kernel, whose backward is wrong for a fully padded row under a finfo.min mask
            # (gradients 5x off at T=5; forward fine): keep the written-out attention.
            compiled = self.torch.compile(model, options={"pattern_matcher": False})
            model.__dict__["_xformer_compiled"] = compiled
        return compiled

    def _callable_ddp(self, ddp, mode: str):
        """The ``DistributedDataParallel`` module, compiled in ``"compile"`` mode (Dynamo splits
        the graph at DDP's bucket boundaries; cached on the wrapper)."""
        if mode == "eager":
            return ddp
        compiled = ddp.__dict__.get("_xformer_compiled")
        if compiled is None:
            compiled = self.torch.compile(ddp, options={"pattern_matcher": False})
            ddp.__dict__["_xformer_compiled"] = compiled
        return compiled

    def _eval(self, model):
        return _EvalMode(model)

    def _inference(self, model):
        """Eval mode for the whole generation and, with a tied LM head, its table in the
        storage decoding reads fastest (:meth:`xformer_torch.modules.LMHead.decoding_table`)."""
        stack = contextlib.ExitStack()
        stack.enter_context(_EvalMode(model))
        tables = getattr(model, "decoding_tables", None)  # decoders (an encoder is refused
        if tables is not None:                             # by generate, inside)
            stack.enter_context(tables())
        return stack


class _EvalMode:
    """``with _EvalMode(model):`` dropout off inside, the caller's train/eval mode restored.

    Nested uses (a :meth:`TorchBackend.generate` around its decoding steps) cost nothing
    inside the outermost, and a model already in eval mode is never switched: ``train()``
    walks every submodule, which cost 4 ms of a 60 ms GPT-2 decoding step (issue #11)."""

    _FLAG = "_xformer_eval_held"

    def __init__(self, model) -> None:
        self.model, self.modes, self.outermost = model, None, False

    def __enter__(self) -> None:
        state = self.model.__dict__
        if state.get(self._FLAG):
            return
        state[self._FLAG] = self.outermost = True
        modules = list(self.model.modules())
        if any(m.training for m in modules):
            self.modes = {m: m.training for m in modules}
            self.model.eval()

    def __exit__(self, *exc) -> None:
        if not self.outermost:
            return
        del self.model.__dict__[self._FLAG]
        if self.modes is not None:
            for module, training in self.modes.items():
                module.training = training
