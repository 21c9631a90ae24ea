"""The PyTorch backend: :class:`xformer_torch.modules.EncoderModel` behind the ``Backend`` protocol.

Imports torch lazily (in ``TorchBackend.__init__``), so listing backends stays cheap.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype, check_inputs
from xformer.errors import InputError
from xformer.weights import check_weights


class TorchBackend(Backend):
    """PyTorch (``torch.nn``). Modes: ``"eager"``; ``"compile"`` runs ``torch.compile(model)``,
    compiled once per model and cached on it (``model._xformer_compiled``)."""

    name = "torch"
    extra = "torch"
    modes = ("eager", "compile")
    default_modes = ("eager",)
    preferred_mode = "eager"

    def __init__(self) -> None:
        import torch

        from . import modules

        self.torch = torch
        self.modules = modules

    def build(self, spec, dtype: str = "float32"):
        return self.modules.EncoderModel(spec, dtype=getattr(self.torch, check_dtype(dtype)))

    def set_weights(self, model, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        dtype = self._np_dtype(model)
        model.load_state_dict({name: self.torch.from_numpy(np.array(w, dtype=dtype))
                               for name, w in weights.items()}, strict=True)

    def get_weights(self, model) -> dict[str, np.ndarray]:
        state = model.state_dict()
        return {p.name: state[p.name].detach().cpu().numpy().copy()
                for p in model.spec.parameters()}

    def forward(self, model, inputs: Mapping[str, np.ndarray], mode: str | None = None
                ) -> dict[str, np.ndarray]:
        fn = self._callable(model, self.check_mode(mode))
        x = self._tensors(model, inputs)
        with self._eval(model), self.torch.no_grad():
            out = fn(**x)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def forward_backward(self, model, inputs: Mapping[str, np.ndarray],
                         cotangents: Mapping[str, np.ndarray], mode: str | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        torch = self.torch
        fn = self._callable(model, self.check_mode(mode))
        x = self._tensors(model, inputs)
        params = dict(model.named_parameters())
        with self._eval(model), torch.enable_grad():
            if "input_ids" in x:  # the lookup runs eagerly, so d(loss)/d(embeds) comes with it
                embeds = model.embeddings.embed_tokens(x.pop("input_ids"))
            else:
                embeds = x.pop("inputs_embeds").requires_grad_(True)
            out = fn(inputs_embeds=embeds, **x)
            unknown = set(cotangents) - set(out)
            if unknown:
                raise InputError(f"cotangents for unknown outputs {sorted(unknown)}; "
                                 f"outputs: {sorted(out)}")
            names = [k for k in out if k in cotangents]
            cots = [torch.as_tensor(np.asarray(cotangents[k], dtype=self._np_dtype(model)))
                    for k in names]
            for k, c in zip(names, cots):
                if c.shape != out[k].shape:
                    raise InputError(f"cotangent {k!r} has shape {tuple(c.shape)}, the output "
                                     f"{tuple(out[k].shape)}")
            grads = torch.autograd.grad([out[k] for k in names], [embeds, *params.values()],
                                        grad_outputs=cots, allow_unused=True)
        numpy = {k: v.detach().cpu().numpy() for k, v in out.items()}
        result = {"inputs_embeds": grads[0].cpu().numpy()}
        for (name, p), g in zip(params.items(), grads[1:]):
            result[name] = (torch.zeros_like(p) if g is None else g).detach().cpu().numpy()
        return numpy, result

    def framework_version(self) -> str:
        return self.torch.__version__

    # -- helpers -------------------------------------------------------------------------
    def _np_dtype(self, model) -> np.dtype:
        return np.dtype(str(model.dtype).removeprefix("torch."))

    def _tensors(self, model, inputs: Mapping[str, Any]) -> dict[str, Any]:
        checked = check_inputs(model.spec, inputs, self._np_dtype(model).name)
        device = model.embeddings.word_embeddings.weight.device
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

    def _eval(self, model):
        return _EvalMode(model)


class _EvalMode:
    """``with _EvalMode(model):`` dropout off inside, the caller's train/eval mode restored."""

    def __init__(self, model) -> None:
        self.model, self.training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)
