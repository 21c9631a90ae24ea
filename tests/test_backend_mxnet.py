"""What only the MXNet Gluon backend has: one Gluon Parameter per canonical weight (a tied head
is not a second one) and a frozen LayerNorm beta where ``bias=False``, activations with exact
float64 gradients (MXNet's own erf gradient is float32-accurate), a float64 LayerNorm that
matches the reference where MXNet's fused operator does not, the float32 LayerNorm of a
differentiated pass (products and ``L2Normalization``), the hybridized graphs cached (one per
autograd state) and kept across imperative decoding, and ``trace`` writing no parameter
gradient.

The Backend contract itself is tested on every backend in test_backends.py,
test_backends_decoder.py and test_trace.py; helpers and bounds are in backend_helpers.py. MXNet 1.9.1
needs numpy's ``np.bool`` alias, which ``xformer_mxnet`` restores before importing it.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer.backend import get_backend  # noqa: E402
from xformer_mxnet import modules  # noqa: E402
from backend_helpers import (SPECS, built, covering_params, cotangents, make_inputs,  # noqa: E402
                      rel)

mx = modules.mx
BE = get_backend("mxnet")


@pytest.mark.parametrize("spec", covering_params())
def test_one_gluon_parameter_per_weight(spec):
    """A tied LM head / shared table is one Gluon Parameter, not a second one; a LayerNorm
    without a bias (``bias=False``) keeps Gluon's beta, but as a frozen zero, not trained."""
    model = BE.build(spec, "float32")
    cls = {"encoder": modules.EncoderModel, "decoder": modules.DecoderModel,
           "encoder-decoder": modules.EncoderDecoderModel}[spec.architecture]
    assert isinstance(model, cls)
    params = model.collect_params().values()
    assert len([p for p in params if p.grad_req != "null"]) == len(spec.parameters())
    names = modules.canonical_parameters(model)
    assert list(names) == [p.name for p in spec.parameters()]
    assert {n: tuple(p.shape) for n, p in names.items()} == spec.parameter_shapes()
    betas = [p for n, p in model._collect_params_with_prefix().items() if n.endswith(".beta")]
    if spec.norm == "layernorm" and not spec.has_bias("norm"):
        assert betas and all(p.grad_req == "null" and not p.data().asnumpy().any()
                             for p in betas)
    elif spec.norm == "rmsnorm":
        assert not betas


# ---------------------------------------------------------------------- the native blocks
def _value_and_grad(fn, x: np.ndarray):
    nd_x = mx.nd.array(x, dtype="float64")
    nd_x.attach_grad()
    with mx.autograd.record():
        y = fn(nd_x)
    y.backward()
    return y.asnumpy(), nd_x.grad.asnumpy()


def test_activations_values_and_float64_gradients():
    """Values match the reference; gradients match the analytic derivatives to rounding
    (1e-14: the closed forms round differently; the erf bug is 3e-8)."""
    from scipy.special import erf

    from xformer.reference import activation

    x = np.linspace(-6, 6, 1001)
    pdf = np.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
    u = math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)
    derivative = {
        "gelu": 0.5 * (1 + erf(x / math.sqrt(2))) + x * pdf,
        "gelu_tanh": 0.5 * (1 + np.tanh(u)) + 0.5 * x * (1 - np.tanh(u) ** 2)
        * math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * x ** 2),
        "relu": (x > 0).astype(np.float64),
    }
    for name, fn in (("gelu", modules.gelu), ("gelu_tanh", modules.gelu_tanh),
                     ("relu", modules.relu)):
        y, dy = _value_and_grad(lambda v: fn(mx.nd, v, exact_grad=True), x)
        assert rel(y, activation(name, x)) <= 1e-15, name
        assert rel(dy, derivative[name]) <= 1e-14, (name, rel(dy, derivative[name]))
    # why erf_exact_grad exists: MXNet's own erf gradient uses a float32 2/sqrt(pi)
    _, plain = _value_and_grad(lambda v: modules.gelu(mx.nd, v), x)
    assert 1e-9 < rel(plain, derivative["gelu"]) < 1e-7


def layer_norm_closed_form(x, cot, scale, beta, eps) -> dict[str, np.ndarray]:
    """LayerNorm in float64 and the gradients of ``sum(cot * LN(x))``: ``{"y", "x", "gamma",
    "beta"}``; d/dx is ``(1/s)(g - mean(g) - xh mean(g xh))`` with ``g = cot * scale``, ``xh``
    the normalised x and ``s = sqrt(var + eps)``."""
    s = np.sqrt(x.var(-1, keepdims=True) + eps)
    xh = (x - x.mean(-1, keepdims=True)) / s
    g = cot * scale
    d = x.shape[-1]
    return {"y": xh * scale + beta,
            "x": (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True)) / s,
            "gamma": (cot * xh).reshape(-1, d).sum(0), "beta": cot.reshape(-1, d).sum(0)}


def test_layer_norm_float64_gradient():
    """d/dx of sum(c * LN(x)) against the closed form (1/s)(g - mean(g) - xh mean(g xh)), with
    g = c * gamma, xh the normalised x and s = sqrt(var + eps); and the gamma / beta grads."""
    spec = SPECS["bert"].replace(norm_eps=1e-5)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, spec.d_model)) * 0.7 + 0.3
    c = rng.standard_normal(x.shape)
    gamma = 1 + 0.2 * rng.standard_normal(spec.d_model)
    norm = modules.LayerNorm(spec, "float64")
    norm.initialize()
    norm.gamma.set_data(mx.nd.array(gamma, dtype="float64"))
    nd_x = mx.nd.array(x, dtype="float64")
    nd_x.attach_grad()
    with mx.autograd.record():
        y = norm(nd_x)
    y.backward(mx.nd.array(c, dtype="float64"))
    want = layer_norm_closed_form(x, c, gamma, 0.0, spec.norm_eps)
    assert rel(nd_x.grad.asnumpy(), want["x"]) <= 1e-14
    assert rel(norm.gamma.grad().asnumpy(), want["gamma"]) <= 1e-14
    assert rel(norm.beta.grad().asnumpy(), want["beta"]) <= 1e-14


@pytest.mark.parametrize("eps", [1e-12, 1e-5, 0.1])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_float64_is_exact(eps, bias):
    """The float64 LayerNorm matches the reference to rounding. MXNet's fused LayerNorm operator
    would not: its eps is a C++ float (eps=0.1 -> ~7e-10 relative error, eps=1e-5 -> ~1e-13)."""
    from xformer.reference import layer_norm

    spec = SPECS["bert"].replace(norm_eps=eps, bias=bias)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, spec.d_model)) * 0.3 + 2.0
    gamma = 1 + 0.2 * rng.standard_normal(spec.d_model)
    beta = 0.1 * rng.standard_normal(spec.d_model)
    norm = modules.LayerNorm(spec, "float64")
    norm.initialize()
    norm.gamma.set_data(mx.nd.array(gamma, dtype="float64"))
    if bias:
        norm.beta.set_data(mx.nd.array(beta, dtype="float64"))
    ref = layer_norm(x, gamma, beta if bias else None, eps)
    for hybridize in (False, True):
        norm.hybridize(hybridize)
        out = norm(mx.nd.array(x, dtype="float64")).asnumpy()
        assert out.dtype == np.float64
        assert rel(out, ref) <= 1e-15, (hybridize, rel(out, ref))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_layer_norm_float32_under_record_is_the_gemm_form(bias, offset):
    """float32 inside ``autograd.record``: :meth:`LayerNorm.gemm_form` (products and
    ``L2Normalization``, whose backward is fast), imperative and hybridized alike; outside it
    the fused operator. Both within float32 rounding of the float64 formula, outputs and the
    gradients of x, gamma and beta (Gemma's scale offset and a frozen beta included); and the
    two lowerings really are different graphs (their float32 roundings differ)."""
    spec = SPECS["bert"].replace(norm_eps=1e-12, bias=bias, norm_scale_offset=offset)
    d = spec.d_model
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, d)) * 2.0 + 0.5
    cot = rng.standard_normal(x.shape)
    gamma = offset * -0.5 + 1 + 0.2 * rng.standard_normal(d)
    beta = 0.1 * rng.standard_normal(d) if bias else np.zeros(d)
    want = layer_norm_closed_form(x, cot, gamma + offset, beta, spec.norm_eps)
    norm = modules.LayerNorm(spec, "float32")
    norm.initialize()
    norm.gamma.set_data(mx.nd.array(gamma, dtype="float32"))
    if bias:
        norm.beta.set_data(mx.nd.array(beta, dtype="float32"))
    nd_x = mx.nd.array(x, dtype="float32")
    nd_x.attach_grad()
    for hybridize in (False, True, True):  # the second hybridized pass reuses both graphs
        if hybridize != norm._active:
            norm.hybridize(hybridize, static_alloc=True, static_shape=True)
        with mx.autograd.record():
            y = norm(nd_x)
        y.backward(mx.nd.array(cot, dtype="float32"))
        inference = norm(nd_x).asnumpy()
        got = {"y": y.asnumpy(), "x": nd_x.grad.asnumpy(), "gamma": norm.gamma.grad().asnumpy()}
        if bias:
            got["beta"] = norm.beta.grad().asnumpy()
        for k, v in got.items():
            assert v.dtype == np.float32, k
            assert rel(v, want[k]) <= 1e-6, (hybridize, k, rel(v, want[k]))
        assert rel(inference, want["y"]) <= 1e-6
        assert not np.array_equal(inference, got["y"])  # the fused operator, not the same graph
        fused = mx.nd.LayerNorm(nd_x, norm.gamma.data() + offset, mx.nd.array(beta),
                                eps=spec.norm_eps)  # the float32 scale, as the block adds it
        np.testing.assert_array_equal(inference, fused.asnumpy())


def test_hybridized_graph_per_autograd_state():
    """A hybridized model keeps two cached graphs, one traced inside ``autograd.record`` and one
    outside (here also for two argument structures: ``forward_backward`` passes
    ``inputs_embeds``, ``forward`` ``input_ids``), and alternating training and inference
    retraces neither; ``hybridize()`` clears both."""
    spec = SPECS["pre_ln"]
    model, _ = built(BE, spec, fresh=True, dtype="float32")
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    BE.forward(model, inputs, mode="hybridize")
    inference = model._cached_op
    out, _ = BE.forward_backward(model, inputs, cot, mode="hybridize")
    training = model._cached_op
    assert training is not None and training is not inference
    for _ in range(2):
        again = BE.forward(model, inputs, mode="hybridize")
        assert model._cached_op is inference
        BE.forward_backward(model, inputs, cot, mode="hybridize")
        assert model._cached_op is training
    for k in again:  # float32 rounding apart, the two graphs compute the same outputs
        assert rel(again[k], out[k]) <= 1e-5, k
    model.hybridize(static_alloc=True, static_shape=True)
    assert model._cached_op is None and "_graphs" not in model.__dict__


# ---------------------------------------------------------------------- the hybridized graph
def test_hybridized_graph_is_cached():
    spec = SPECS["pre_ln"]
    model, _ = built(BE, spec, fresh=True)
    inputs = make_inputs(spec)
    BE.forward(model, inputs, mode="hybridize")
    cached = model._cached_op
    assert cached is not None
    BE.forward(model, inputs, mode="hybridize")
    assert model._cached_op is cached


@pytest.mark.parametrize("name", ["gpt2", "vaswani"])
def test_decoding_keeps_the_hybridized_graph(name):
    """Decoding runs imperatively (the static shapes of a hybridized graph would not fit a
    growing cache) and leaves the hybridized graph as it was."""
    spec = SPECS[name]
    model, _ = built(BE, spec, fresh=True)
    inputs = make_inputs(spec)
    before = BE.forward(model, inputs, mode="hybridize")
    graph = model._cached_op
    logits, cache = BE.decode(model, inputs)
    assert rel(logits, before["logits"]) <= 1e-12
    assert model._cached_op is graph and model._active
    after = BE.forward(model, inputs, mode="hybridize")
    assert model._cached_op is graph
    np.testing.assert_array_equal(after["logits"], before["logits"])


def test_trace_writes_no_parameter_gradient():
    spec = SPECS["vaswani"]
    model, _ = built(BE, spec, fresh=True)
    inputs = make_inputs(spec)
    params = modules.canonical_parameters(model)
    for p in params.values():
        p.zero_grad()
    BE.trace(model, inputs, cotangents(spec, inputs))
    for name, p in params.items():
        assert not p.grad().asnumpy().any(), name
