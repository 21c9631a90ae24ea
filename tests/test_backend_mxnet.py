"""Unit tests of the MXNet Gluon backend (``backends/xformer_mxnet``) against ``xformer.reference``.

float64: outputs within 1e-12 (relative to the largest magnitude) of the numpy reference, every
mode equal to the first within 1e-12, gradients within 1e-6 of central finite differences.
float32: outputs within 1e-5. MXNet is imported once, at module level.
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys

import numpy as np
import pytest

from xformer import CheckpointError, InputError, ModelSpec, random_weights, reference
from xformer.backend import check_inputs

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer_mxnet.backend import MXNetBackend  # noqa: E402
from xformer_mxnet import modules  # noqa: E402

mx = modules.mx
BE = MXNetBackend()

_SMALL = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=10)
#: Together they take every value of every encoder field.
SPECS = {
    "bert": ModelSpec(**_SMALL, norm_position="post", activation="gelu", positional="learned",
                      type_vocab_size=2, embedding_norm=True, final_norm=False,
                      embed_scale=False, bias=True, head="pooler", norm_eps=1e-12),
    "pre-ln": ModelSpec(**_SMALL, norm_position="pre", activation="gelu_tanh",
                        positional="sinusoidal", type_vocab_size=0, embedding_norm=False,
                        final_norm=True, embed_scale=True, bias=False, head="none",
                        norm_eps=1e-5),
    "vaswani": ModelSpec(**{**_SMALL, "n_heads": 2}, norm_position="post", activation="relu",
                         positional="sinusoidal", type_vocab_size=3, embedding_norm=False,
                         final_norm=False, embed_scale=True, bias=True, head="pooler",
                         norm_eps=1e-5),
    "pre-nobias": ModelSpec(**_SMALL, norm_position="pre", activation="relu",
                            positional="learned", type_vocab_size=0, embedding_norm=True,
                            final_norm=True, embed_scale=False, bias=False, head="pooler",
                            norm_eps=1e-12),
}
TINY = ModelSpec(vocab_size=12, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=6,
                 activation="gelu", type_vocab_size=2, embed_scale=True, head="pooler")


def rel(a, b, floor: float = 0.0) -> float:
    """max|a - b| / max(max|b|, floor): the conformance metric (``floor`` for tensors that are
    analytically zero, where the ratio of two rounding noises means nothing)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(b).max()), floor)
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a).max())


def is_k_bias(name: str) -> bool:
    """The key projection's bias adds ``q . b_k`` to every score of a row: softmax ignores it,
    so its gradient is exactly 0 in exact arithmetic (rounding noise in practice)."""
    return name.endswith("self_attn.k_proj.bias")


def make_inputs(spec: ModelSpec, seed: int = 1, b: int = 4, t: int = 7,
                full_pad: bool = True) -> dict:
    """Random ids, segment ids, and a mask with padding and (``full_pad``) a fully padded last
    row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t))
    mask[1, t - 2:] = 0
    mask[2, 3:] = 0
    if full_pad:
        mask[-1, :] = 0  # fully padded row: uniform attention, no NaN
    inputs = {"input_ids": rng.integers(0, spec.vocab_size, (b, t)), "attention_mask": mask}
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (b, t))
    return inputs


def cotangents(spec: ModelSpec, inputs: dict, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    b, t = inputs["attention_mask"].shape
    shapes = {"last_hidden_state": (b, t, spec.d_model), "pooler_output": (b, spec.d_model)}
    return {name: rng.standard_normal(shapes[name]) for name in spec.output_names()}


def embeds_of(spec: ModelSpec, weights: dict, inputs: dict) -> dict:
    """The same inputs with ``inputs_embeds`` (scaled lookup) in place of ``input_ids``."""
    out = {k: v for k, v in inputs.items() if k != "input_ids"}
    emb = weights["embeddings.word_embeddings.weight"][inputs["input_ids"]]
    out["inputs_embeds"] = emb * math.sqrt(spec.d_model) if spec.embed_scale else emb
    return out


_MODELS: dict = {}


def model_for(key: str, dtype: str = "float64"):
    """A built model with ``random_weights`` loaded, shared by the tests (they do not mutate
    its weights, except the finite-difference test, which restores them)."""
    if (key, dtype) not in _MODELS:
        spec = TINY if key == "tiny" else SPECS[key]
        model = BE.build(spec, dtype)
        BE.set_weights(model, random_weights(spec, seed=0, dtype="float64"))
        _MODELS[key, dtype] = model
    return _MODELS[key, dtype]


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("key", SPECS)
def test_canonical_names_and_shapes(key):
    spec = SPECS[key]
    weights = BE.get_weights(BE.build(spec, "float32"))
    assert list(weights) == [p.name for p in spec.parameters()]
    assert {k: v.shape for k, v in weights.items()} == spec.parameter_shapes()
    assert all(v.dtype == np.float32 for v in weights.values())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("key", ["bert", "pre-ln"])
def test_weights_round_trip(key, dtype):
    spec = SPECS[key]
    weights = random_weights(spec, seed=3, dtype="float64")
    model = BE.build(spec, dtype)
    BE.set_weights(model, weights)
    back = BE.get_weights(model)
    assert list(back) == list(weights)
    for name, value in weights.items():
        assert back[name].dtype == np.dtype(dtype), name
        np.testing.assert_array_equal(back[name], value.astype(dtype), err_msg=name)


def test_set_weights_mismatch_raises():
    spec = SPECS["bert"]
    model = BE.build(spec, "float64")
    weights = random_weights(spec, seed=0)
    missing = {k: v for k, v in weights.items() if k != "pooler.dense.bias"}
    with pytest.raises(CheckpointError, match="pooler.dense.bias"):
        BE.set_weights(model, missing)
    wrong = {**weights, "embeddings.norm.weight": np.ones(spec.d_model + 1)}
    with pytest.raises(CheckpointError, match="embeddings.norm.weight"):
        BE.set_weights(model, wrong)
    with pytest.raises(CheckpointError, match="extra"):
        BE.set_weights(model, {**weights, "encoder.layers.9.norm1.weight": np.ones(16)})


def test_bias_false_has_no_bias_anywhere():
    model = BE.build(SPECS["pre-ln"], "float64")
    names = modules.canonical_parameters(model)
    assert not [n for n in names if n.endswith(".bias")]
    # LayerNorm's beta exists in Gluon but is a frozen zero, not trained
    betas = [p for n, p in model._collect_params_with_prefix().items() if n.endswith(".beta")]
    assert betas and all(p.grad_req == "null" and not p.data().asnumpy().any() for p in betas)


# ---------------------------------------------------------------------- forward vs reference
@pytest.mark.parametrize("key", SPECS)
def test_forward_float64_matches_reference(key):
    spec, model = SPECS[key], model_for(key)
    inputs = make_inputs(spec)
    ref = reference.forward(spec, random_weights(spec, seed=0),
                            check_inputs(spec, inputs, "float64"), "float64")
    for mode in BE.modes:
        out = BE.forward(model, inputs, mode=mode)
        assert list(out) == list(spec.output_names())
        for name in out:
            assert out[name].dtype == np.float64
            assert np.isfinite(out[name]).all(), (mode, name)
            assert rel(out[name], ref[name]) <= 1e-12, (mode, name, rel(out[name], ref[name]))


@pytest.mark.parametrize("key", SPECS)
def test_forward_float32_matches_reference(key):
    spec, model = SPECS[key], model_for(key, "float32")
    inputs = make_inputs(spec)
    ref = reference.forward(spec, random_weights(spec, seed=0),
                            check_inputs(spec, inputs, "float64"), "float64")
    for mode in BE.modes:
        out = BE.forward(model, inputs, mode=mode)
        for name in out:
            assert out[name].dtype == np.float32
            assert rel(out[name], ref[name]) <= 1e-5, (mode, name, rel(out[name], ref[name]))


def test_float32_grads_match_float64():
    spec = SPECS["bert"]
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    _, g64 = BE.forward_backward(model_for("bert"), inputs, cot)
    _, g32 = BE.forward_backward(model_for("bert", "float32"), inputs, cot)
    scale = max(float(np.abs(g).max()) for g in g64.values())
    for name in g64:
        assert g32[name].dtype == np.float32
        if is_k_bias(name):  # analytically zero: float32 noise ~1e-7 of the largest gradient
            assert np.abs(g32[name]).max() <= 1e-5 * scale, name
            assert np.abs(g64[name]).max() <= 1e-13 * scale, name
            continue
        assert rel(g32[name], g64[name]) <= 1e-4, (name, rel(g32[name], g64[name]))


def test_full_length_sequence_and_defaults():
    """T == max_len works; a missing mask means all ones, missing token types mean zeros."""
    spec, model = SPECS["bert"], model_for("bert")
    ids = make_inputs(spec, t=spec.max_len)["input_ids"]
    weights = random_weights(spec, seed=0)
    full = {"input_ids": ids, "attention_mask": np.ones(ids.shape),
            "token_type_ids": np.zeros(ids.shape, np.int64)}
    ref = reference.forward(spec, weights, check_inputs(spec, full, "float64"))
    for mode in BE.modes:
        out = BE.forward(model, {"input_ids": ids}, mode=mode)
        assert rel(out["last_hidden_state"], ref["last_hidden_state"]) <= 1e-12
        # the native block itself, with keyword arguments and the optional inputs left out
        native = model(input_ids=mx.nd.array(ids, dtype="int64"))
        assert rel(native[0].asnumpy(), ref["last_hidden_state"]) <= 1e-12
        assert rel(native[1].asnumpy(), ref["pooler_output"]) <= 1e-12


def test_too_long_and_bad_inputs_raise():
    spec, model = SPECS["bert"], model_for("bert")
    ids = np.zeros((1, spec.max_len + 1), np.int64)
    with pytest.raises(InputError, match="max_len"):
        BE.forward(model, {"input_ids": ids})
    with pytest.raises(InputError, match="max_len"):  # the native block checks it too
        model(input_ids=mx.nd.array(ids, dtype="int64"))
    with pytest.raises(InputError, match="exactly one"):
        model(attention_mask=mx.nd.ones((1, 3)))
    with pytest.raises(InputError, match="vocab_size"):  # MXNet's Embedding would clip
        BE.forward(model, {"input_ids": np.array([[spec.vocab_size]])})


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("key", SPECS)
def test_modes_and_input_paths_agree(key):
    """Every mode, and inputs_embeds vs input_ids, give the same outputs and gradients."""
    spec, model = SPECS[key], model_for(key)
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    embeds = embeds_of(spec, random_weights(spec, seed=0), inputs)
    out0, grads0 = BE.forward_backward(model, inputs, cot, mode=BE.modes[0])
    assert list(grads0) == [p.name for p in spec.parameters()] + ["inputs_embeds"]
    for name, g in grads0.items():
        assert np.isfinite(g).all(), name
        if not is_k_bias(name):
            assert np.abs(g).max() > 0, name  # the loss reaches every weight
    for mode in BE.modes:
        fwd = BE.forward(model, inputs, mode=mode)
        for via, feed in (("ids", inputs), ("embeds", embeds)):
            out, grads = BE.forward_backward(model, feed, cot, mode=mode)
            for name in out0:
                assert rel(out[name], out0[name]) <= 1e-12, (mode, via, name)
                assert rel(fwd[name], out0[name]) <= 1e-12, (mode, via, name)
            for name, g in grads.items():
                if via == "embeds" and name == "embeddings.word_embeddings.weight":
                    assert not g.any()  # the lookup is not part of the graph
                    continue
                floor = 1e-6 if is_k_bias(name) else 0.0  # noise ~1e-16 vs noise: abs check
                assert rel(g, grads0[name], floor) <= 1e-12, (mode, via, name,
                                                              rel(g, grads0[name], floor))
        out = BE.forward(model, embeds, mode=mode)
        for name in out0:
            assert rel(out[name], out0[name]) <= 1e-12, (mode, "forward embeds", name)


@pytest.mark.parametrize("mode", ["imperative", "hybridize"])
def test_gradients_match_finite_differences(mode):
    """Directional derivatives of the loss along a random direction, one parameter tensor at a
    time (every parameter), and along inputs_embeds, by central differences (h = 1e-6).

    The error is |fd - analytic| / max(|analytic|, 1e-2): relative, except near a zero
    derivative (the k_proj bias gets exactly none: softmax is shift invariant).

    No fully padded row here: there ``score + finfo.min`` rounds to ``finfo.min`` for every key,
    so the computed function is flat in Q and K (uniform attention) while autograd, through
    the add, returns the softmax gradient of the unrounded scores: finite differences disagree
    by a few percent (as for every framework; the backends agree with each other).
    """
    spec, model = TINY, model_for("tiny")
    weights = random_weights(spec, seed=0)
    inputs = make_inputs(spec, b=3, t=5, full_pad=False)
    cot = cotangents(spec, inputs)
    _, grads = BE.forward_backward(model, inputs, cot, mode=mode)
    rng, h = np.random.default_rng(7), 1e-6

    def loss(feed) -> float:
        out = BE.forward(model, feed, mode=mode)
        return sum(float((out[k] * cot[k]).sum()) for k in out)

    def check(name, analytic, plus, minus):
        fd = (plus() - minus()) / (2 * h)
        err = abs(fd - analytic) / max(abs(analytic), 1e-2)
        assert err <= 1e-6, (name, fd, analytic, err)

    try:
        for name, value in weights.items():
            v = rng.standard_normal(value.shape)

            def shifted(sign, name=name, value=value, v=v):
                BE.set_weights(model, {**weights, name: value + sign * h * v})
                return loss(inputs)

            check(name, float((grads[name] * v).sum()), lambda: shifted(1), lambda: shifted(-1))
    finally:
        BE.set_weights(model, weights)
    feed = embeds_of(spec, weights, inputs)
    v = rng.standard_normal(feed["inputs_embeds"].shape)
    check("inputs_embeds", float((grads["inputs_embeds"] * v).sum()),
          lambda: loss({**feed, "inputs_embeds": feed["inputs_embeds"] + h * v}),
          lambda: loss({**feed, "inputs_embeds": feed["inputs_embeds"] - h * v}))


def test_fully_padded_row_attends_uniformly():
    """A row whose keys are all padding averages every value vector: the same output whatever
    the (masked) token ids, and no NaN in outputs or gradients."""
    spec, model = SPECS["bert"], model_for("bert")
    inputs = make_inputs(spec)
    out, grads = BE.forward_backward(model, inputs, cotangents(spec, inputs), mode="hybridize")
    assert all(np.isfinite(v).all() for v in (*out.values(), *grads.values()))
    mask = np.zeros((1, 5))
    ids = np.arange(5)[None]
    a = BE.forward(model, {"input_ids": ids, "attention_mask": mask})
    b = BE.forward(model, {"input_ids": ids, "attention_mask": np.ones((1, 5))})
    assert np.isfinite(a["last_hidden_state"]).all()
    assert rel(a["last_hidden_state"], b["last_hidden_state"]) > 1e-3  # the mask did act


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
    s = np.sqrt(x.var(-1, keepdims=True) + spec.norm_eps)
    xh = (x - x.mean(-1, keepdims=True)) / s
    g = c * gamma
    dx = (g - g.mean(-1, keepdims=True) - xh * (g * xh).mean(-1, keepdims=True)) / s
    assert rel(nd_x.grad.asnumpy(), dx) <= 1e-14
    assert rel(norm.gamma.grad().asnumpy(), (c * xh).sum(0)) <= 1e-14
    assert rel(norm.beta.grad().asnumpy(), c.sum(0)) <= 1e-14


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


def test_dropout_only_in_training():
    spec = SPECS["bert"].replace(dropout=0.5)
    model = BE.build(spec, "float64")
    BE.set_weights(model, random_weights(spec, seed=0))
    inputs = make_inputs(spec)
    ref = reference.forward(spec, random_weights(spec, seed=0),
                            check_inputs(spec, inputs, "float64"))
    for mode in BE.modes:  # the backend runs with dropout off
        assert rel(BE.forward(model, inputs, mode)["last_hidden_state"],
                   ref["last_hidden_state"]) <= 1e-12
    ids = mx.nd.array(inputs["input_ids"], dtype="int64")
    with mx.autograd.train_mode():
        trained = model(input_ids=ids)[0].asnumpy()
    assert rel(trained, ref["last_hidden_state"]) > 1e-2


def test_hybridized_graph_is_cached():
    spec, model = SPECS["pre-ln"], model_for("pre-ln")
    inputs = make_inputs(spec)
    BE.forward(model, inputs, mode="hybridize")
    cached = model._cached_op
    assert cached is not None
    BE.forward(model, inputs, mode="hybridize")
    assert model._cached_op is cached


def test_backend_module_does_not_import_mxnet():
    code = ("import sys, xformer_mxnet.backend, xformer; xformer.available_backends(); "
            "assert 'mxnet' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backend_attributes():
    assert (BE.name, BE.extra) == ("mxnet", "mxnet")
    assert BE.modes == BE.default_modes == ("imperative", "hybridize")
    assert "1.9.1" in BE.framework_version()
