"""``MXNetBackend``: xformer's Backend protocol on Apache MXNet 1.9.1 Gluon (imports MXNet lazily).

Modes: ``"imperative"`` (plain Gluon blocks) and ``"hybridize"`` (one cached graph,
``hybridize(static_alloc=True, static_shape=True)``). The gradient w.r.t. ``inputs_embeds``
splits the chain rule: the looked-up (scaled) token embeddings enter the model as a leaf with
``attach_grad()``, and their gradient is then backpropagated through the lookup into
``word_embeddings``.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype, check_inputs
from xformer.weights import check_weights


@contextlib.contextmanager
def _quiet():
    """Hybridizing the ``inputs_embeds`` graph warns that ``word_embeddings`` is unused: true."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Parameter .* is not used", UserWarning)
        yield


class MXNetBackend(Backend):
    name = "mxnet"
    extra = "mxnet"
    modes = ("imperative", "hybridize")
    default_modes = ("imperative", "hybridize")
    preferred_mode = "hybridize"

    def __init__(self) -> None:
        from . import modules  # imports mxnet, after restoring numpy's np.bool alias

        self._modules = modules
        self._mx = modules.mx

    def build(self, spec, dtype: str = "float32") -> Any:
        model = self._modules.EncoderModel(spec, check_dtype(dtype))
        model.initialize(self._mx.init.Normal(0.02))  # LayerNorm and bias inits: ones / zeros
        return model

    def set_weights(self, model, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        for name, param in self._modules.canonical_parameters(model).items():
            param.set_data(self._mx.nd.array(weights[name], dtype=model.dtype))

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return {name: param.data().asnumpy()
                for name, param in self._modules.canonical_parameters(model).items()}

    def forward(self, model, inputs, mode=None) -> dict[str, np.ndarray]:
        args = self._call_args(model, inputs, mode)
        with self._mx.autograd.predict_mode(), _quiet():  # predict_mode: dropout off
            out = model(**args)
        return self._outputs(model, out)

    def forward_backward(self, model, inputs, cotangents, mode=None):
        mx = self._mx
        args = self._call_args(model, inputs, mode)
        ids = args.pop("input_ids", None)
        params = self._modules.canonical_parameters(model)
        for param in params.values():
            param.zero_grad()
        if ids is not None:  # detached lookup: a leaf whose gradient we read
            args["inputs_embeds"] = model.embeddings.embed_tokens(ids)
        embeds = args["inputs_embeds"]
        embeds.attach_grad()
        with mx.autograd.record(train_mode=False), _quiet():  # train_mode=False: dropout off
            out = model(**args)
        heads = list(out) if isinstance(out, (tuple, list)) else [out]
        names = model.spec.output_names()
        mx.autograd.backward(heads, head_grads=[
            mx.nd.array(cotangents[n], dtype=model.dtype) for n in names])
        if ids is not None:  # d loss / d word_embeddings through the lookup (and the scale)
            with mx.autograd.record(train_mode=False):
                looked_up = model.embeddings.embed_tokens(ids)
            looked_up.backward(embeds.grad)
        grads = {name: param.grad().asnumpy() for name, param in params.items()}
        grads["inputs_embeds"] = embeds.grad.asnumpy()
        return self._outputs(model, out), grads

    def framework_version(self) -> str:
        return self._mx.__version__

    # -- helpers ------------------------------------------------------------------------
    def _call_args(self, model, inputs, mode) -> dict:
        """Checked inputs as NDArrays, and the model (un)hybridized for ``mode``."""
        mode = self.check_mode(mode)
        if getattr(model, "_xformer_mode", None) != mode:
            model.hybridize(active=mode == "hybridize", static_alloc=True, static_shape=True)
            model._xformer_mode = mode
        checked = check_inputs(model.spec, inputs, model.dtype)
        return {key: self._mx.nd.array(value, dtype=value.dtype) for key, value in checked.items()}

    def _outputs(self, model, out) -> dict[str, np.ndarray]:
        heads = out if isinstance(out, (tuple, list)) else [out]
        return {name: h.asnumpy() for name, h in zip(model.spec.output_names(), heads)}
