"""Unit tests of the TensorFlow (Keras 3) backend: canonical weights, forward against the numpy
reference, gradients against finite differences, modes against each other.

Errors are ``max|a - b| / max|b|`` per tensor (as conformance measures them).
"""

from __future__ import annotations

import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import xformer  # noqa: E402
from xformer import CheckpointError, InputError, ModelSpec, random_weights  # noqa: E402
from xformer.reference import forward as reference_forward  # noqa: E402
from xformer_tensorflow.backend import TensorFlowBackend  # noqa: E402
from xformer_tensorflow import modules  # noqa: E402

tf.get_logger().setLevel("ERROR")  # per-model tf.functions trip the retracing warning

SMALL = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=10)

#: Between them, every value of every field that matters for the encoder.
SPECS = {
    "bert": ModelSpec(**SMALL, norm_position="post", activation="gelu", positional="learned",
                      type_vocab_size=2, embedding_norm=True, head="pooler", norm_eps=1e-12),
    "pre_ln": ModelSpec(**SMALL, norm_position="pre", activation="gelu_tanh",
                        positional="sinusoidal", type_vocab_size=0, embedding_norm=False,
                        final_norm=True, embed_scale=True, head="none", norm_eps=1e-5),
    "vaswani_nobias": ModelSpec(**SMALL, norm_position="post", activation="relu",
                                positional="sinusoidal", type_vocab_size=0, embedding_norm=False,
                                embed_scale=True, bias=False, head="pooler", norm_eps=1e-6),
    "pre_nobias_types": ModelSpec(**{**SMALL, "n_heads": 2}, norm_position="pre",
                                  activation="relu", positional="learned", type_vocab_size=3,
                                  embedding_norm=True, final_norm=True, bias=False, head="none",
                                  norm_eps=1e-12),
    "post_final_scale": ModelSpec(**{**SMALL, "n_layers": 1}, norm_position="post",
                                  activation="gelu", positional="learned", type_vocab_size=0,
                                  embedding_norm=False, final_norm=True, embed_scale=True,
                                  head="pooler", norm_eps=1e-12),
}
TINY = ModelSpec(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=6,
                 activation="gelu", type_vocab_size=2, head="pooler", norm_eps=1e-12)

#: Gradients that are exactly zero in exact arithmetic: a key bias adds the same q.b to every
#: logit of a row, and softmax is shift invariant. Compared on the model's gradient scale.
ZERO_GRADS = ("self_attn.k_proj.bias",)


@pytest.fixture(scope="module")
def be() -> TensorFlowBackend:
    return xformer.get_backend("tensorflow")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def grad_errors(a: dict, b: dict) -> dict[str, float]:
    """Relative error per gradient; the exactly-zero ones relative to the largest gradient."""
    scale = max(np.abs(v).max() for v in b.values())
    return {k: (float(np.abs(a[k] - b[k]).max() / scale) if k.endswith(ZERO_GRADS)
                else rel(a[k], b[k])) for k in b}


def make_inputs(spec: ModelSpec, b: int = 3, t: int = 7, seed: int = 1, embeds: bool = False):
    """Padding in row 1, row 2 fully padded (uniform attention, must not give NaN)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t))
    mask[1, t - 2:] = 0
    mask[2, :] = 0
    inputs = {"attention_mask": mask}
    if embeds:
        inputs["inputs_embeds"] = rng.standard_normal((b, t, spec.d_model))
    else:
        inputs["input_ids"] = rng.integers(0, spec.vocab_size, (b, t))
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (b, t))
    return inputs


def cotangents(spec: ModelSpec, b: int, t: int, seed: int = 2):
    rng = np.random.default_rng(seed)
    shapes = {"last_hidden_state": (b, t, spec.d_model), "pooler_output": (b, spec.d_model)}
    return {k: rng.standard_normal(shapes[k]) for k in spec.output_names()}


def built(be, spec, dtype="float64", seed=0):
    model = be.build(spec, dtype)
    weights = random_weights(spec, seed, "float64")
    be.set_weights(model, weights)
    return model, weights


# ---------------------------------------------------------------------- registry, structure
def test_backend_attributes_and_lazy_import(be):
    assert isinstance(be, TensorFlowBackend)
    assert (be.name, be.extra) == ("tensorflow", "tensorflow")
    assert be.modes == ("eager", "function", "xla")
    assert be.default_modes == ("eager", "function")
    assert be.framework_version().startswith(tf.__version__)
    code = ("import sys, xformer_tensorflow, xformer_tensorflow.backend; "
            "sys.exit(int('tensorflow' in sys.modules or 'keras' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("name", SPECS)
def test_canonical_names_shapes_dtypes(be, name):
    spec = SPECS[name]
    model = be.build(spec, "float64")
    assert isinstance(model, keras.Model) and model.spec == spec and model.dtype == "float64"
    table = be.variables(model)
    assert list(table) == [p.name for p in spec.parameters()]
    # the walk reaches every trainable variable exactly once and nothing else holds state
    assert sorted(id(v) for v, _ in table.values()) == sorted(id(v) for v in
                                                              model.trainable_variables)
    assert model.non_trainable_variables == []
    for p in spec.parameters():
        var, transposed = table[p.name]
        assert tuple(var.shape) == (p.shape[::-1] if transposed else p.shape), p.name
        assert var.dtype == "float64", p.name
    assert set(be.get_weights(model)) == set(spec.parameter_shapes())


def test_every_sublayer_has_the_dtype(be):
    model = be.build(SPECS["bert"], "float64")
    layers = model._flatten_layers(include_self=True, recursive=True)
    assert len(layers) > 20
    assert {layer.dtype_policy.name for layer in layers} == {"float64"}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_weights_round_trip_exact(be, dtype):
    spec = SPECS["bert"]
    model = be.build(spec, dtype)
    weights = random_weights(spec, 3, "float64")
    be.set_weights(model, weights)
    got = be.get_weights(model)
    assert list(got) == list(weights)
    for name, value in weights.items():
        assert got[name].dtype == np.dtype(dtype) and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value.astype(dtype), err_msg=name)
    be.set_weights(model, got)  # and back again, bit for bit
    for name, value in be.get_weights(model).items():
        np.testing.assert_array_equal(value, got[name], err_msg=name)


def test_set_weights_rejects_mismatch(be):
    spec = SPECS["bert"]
    model = be.build(spec, "float64")
    weights = random_weights(spec, 0)
    missing = dict(weights)
    missing.pop("pooler.dense.bias")
    with pytest.raises(CheckpointError, match="pooler.dense.bias"):
        be.set_weights(model, missing)
    with pytest.raises(CheckpointError, match="extra"):
        be.set_weights(model, {**weights, "encoder.layers.9.norm1.weight": np.ones(16)})
    bad = {**weights, "encoder.layers.0.ffn.linear1.weight": np.ones((16, 24))}
    with pytest.raises(CheckpointError, match="mis-shaped"):
        be.set_weights(model, bad)


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", SPECS)
def test_forward_matches_reference_float64(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    ref = reference_forward(spec, weights, inputs, "float64")
    out = be.forward(model, inputs)
    assert set(out) == set(spec.output_names())
    for k in ref:
        assert out[k].dtype == np.float64 and out[k].shape == ref[k].shape
        assert np.isfinite(out[k]).all(), k
        assert rel(out[k], ref[k]) <= 1e-12, (k, rel(out[k], ref[k]))
    # the fully padded row attends uniformly: no NaN in outputs nor in any gradient
    outs, grads = be.forward_backward(model, inputs, cotangents(spec, 3, 7))
    for k in ref:
        assert rel(outs[k], ref[k]) <= 1e-12, k
    assert set(grads) == set(spec.parameter_shapes()) | {"inputs_embeds"}
    for k, g in grads.items():
        assert np.isfinite(g).all(), k
        assert g.shape == (spec.parameter_shapes().get(k) or (3, 7, spec.d_model)), k


@pytest.mark.parametrize("name", ["bert", "pre_ln", "vaswani_nobias"])
def test_forward_matches_reference_float32(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec, "float32")
    inputs = make_inputs(spec)
    ref = reference_forward(spec, weights, inputs, "float64")
    out = be.forward(model, inputs)
    for k in ref:
        assert out[k].dtype == np.float32
        assert rel(out[k], ref[k]) <= 1e-5, (k, rel(out[k], ref[k]))


def test_native_model_call_and_errors():
    spec = SPECS["bert"]
    model = modules.EncoderModel(spec, dtype="float64")
    ids = np.array([[1, 2, 3, 4]])
    out = model(input_ids=ids)  # mask and token types default to ones / zeros
    explicit = model(input_ids=ids, attention_mask=np.ones((1, 4)),
                     token_type_ids=np.zeros((1, 4), "int64"))
    for k in out:
        assert out[k].dtype == tf.float64
        np.testing.assert_array_equal(out[k].numpy(), explicit[k].numpy())
    with pytest.raises(InputError, match="max_len"):
        model(input_ids=np.zeros((1, spec.max_len + 1), "int64"))
    with pytest.raises(InputError, match="exactly one"):
        model(attention_mask=np.ones((1, 4)))
    no_types = modules.EncoderModel(SPECS["pre_ln"], dtype="float64")
    with pytest.raises(InputError, match="type_vocab_size"):
        no_types(input_ids=ids, token_type_ids=np.zeros((1, 4), "int64"))


def test_backend_checks_inputs(be):
    spec = SPECS["bert"]
    model = be.build(spec, "float64")
    with pytest.raises(InputError, match="max_len"):
        be.forward(model, {"input_ids": np.zeros((1, spec.max_len + 1), "int64")})
    with pytest.raises(InputError, match="vocab_size"):
        be.forward(model, {"input_ids": np.full((1, 3), spec.vocab_size)})
    with pytest.raises(InputError, match="cotangents"):
        be.forward_backward(model, {"input_ids": np.zeros((1, 3), "int64")},
                            {"last_hidden_state": np.zeros((1, 3, 16))})


def test_sinusoidal_table_is_a_constant_not_a_weight(be):
    spec = SPECS["pre_ln"]
    model = be.build(spec, "float64")
    assert all("position" not in v.path for v in model.variables)
    x = np.zeros((1, 5, spec.d_model))
    emb = model.embeddings(inputs_embeds=tf.constant(x)).numpy()
    np.testing.assert_array_equal(emb[0], xformer.spec.sinusoidal_table(spec.max_len,
                                                                        spec.d_model)[:5])


def test_activations_are_composed_exactly():
    from scipy.special import erf

    x = np.linspace(-6, 6, 1001)
    want = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    assert rel(modules.gelu(tf.constant(x)).numpy(), want) <= 1e-15
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    assert rel(modules.gelu_tanh(tf.constant(x)).numpy(), want) <= 1e-15
    assert modules.gelu(tf.constant(x, tf.float32)).dtype == tf.float32


def test_dropout_only_in_training():
    spec = SPECS["bert"].replace(dropout=0.5)
    model = modules.EncoderModel(spec, dtype="float64")
    ids = np.arange(1, 9).reshape(1, 8)
    a, b = model(input_ids=ids), model(input_ids=ids, training=False)
    np.testing.assert_array_equal(a["last_hidden_state"].numpy(), b["last_hidden_state"].numpy())
    c = model(input_ids=ids, training=True)
    assert not np.allclose(c["last_hidden_state"].numpy(), a["last_hidden_state"].numpy())


def test_get_config_round_trip(be):
    spec = SPECS["vaswani_nobias"]
    model = be.build(spec, "float64")
    clone = modules.EncoderModel.from_config(model.get_config())
    clone.build()
    assert clone.spec == spec and clone.dtype == "float64"
    be.set_weights(clone, be.get_weights(model))
    inputs = make_inputs(spec)
    for k, v in be.forward(model, inputs).items():
        np.testing.assert_array_equal(be.forward(clone, inputs)[k], v)


# ---------------------------------------------------------------------- gradients
def test_gradients_match_finite_differences(be):
    """Central differences of the backend's own float64 loss along random directions, for a few
    parameters and for inputs_embeds; and of the numpy reference for every parameter."""
    spec = TINY
    model, weights = built(be, spec)
    inputs = make_inputs(spec, b=3, t=5)
    # Not the fully padded row here: its logits are all finfo.min (uniform attention, constant
    # in q and k), but backprop differentiates softmax(s + c) = softmax(s) as in exact
    # arithmetic, so its q/k gradients are not the finite differences of the float forward.
    # Every backend (and autodiff of the reference formula) agrees on them; finite differences
    # cannot.
    inputs["attention_mask"][2, :2] = 1
    cot = cotangents(spec, 3, 5)
    _, grads = be.forward_backward(model, inputs, cot)
    rng = np.random.default_rng(7)
    eps = 1e-5

    def loss(out):
        return sum(float(np.sum(out[k] * cot[k])) for k in cot)

    def backend_loss(w, inp):
        be.set_weights(model, w)
        return loss(be.forward(model, inp))

    def reference_loss(w, inp):
        return loss(reference_forward(spec, w, inp, "float64"))

    def directional(fn, w, inp, name):
        d = rng.standard_normal(grads[name].shape)
        if name == "inputs_embeds":
            plus = fn(w, {**inp, "inputs_embeds": inp["inputs_embeds"] + eps * d})
            minus = fn(w, {**inp, "inputs_embeds": inp["inputs_embeds"] - eps * d})
        else:
            plus = fn({**w, name: w[name] + eps * d}, inp)
            minus = fn({**w, name: w[name] - eps * d}, inp)
        fd, analytic = (plus - minus) / (2 * eps), float(np.sum(grads[name] * d))
        return abs(fd - analytic) / max(abs(analytic), 1e-2)  # k_proj.bias: 0

    ids = inputs["input_ids"]
    table = weights["embeddings.word_embeddings.weight"]
    embeds_inputs = {k: v for k, v in inputs.items() if k != "input_ids"}
    embeds_inputs["inputs_embeds"] = table[ids]
    few = ["inputs_embeds", "embeddings.word_embeddings.weight",
           "embeddings.position_embeddings.weight", "encoder.layers.0.self_attn.q_proj.weight",
           "encoder.layers.0.norm1.bias", "encoder.layers.0.ffn.linear1.weight",
           "pooler.dense.bias"]
    errors = {n: directional(backend_loss, weights, embeds_inputs if n == "inputs_embeds"
                             else inputs, n) for n in few}
    be.set_weights(model, weights)
    for name in spec.parameter_shapes():
        errors[f"ref:{name}"] = directional(reference_loss, weights, inputs, name)
    errors["ref:inputs_embeds"] = directional(reference_loss, weights, embeds_inputs,
                                              "inputs_embeds")
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, (worst, errors[worst])


@pytest.mark.parametrize("name", ["bert", "pre_ln"])
def test_inputs_embeds_path_equals_input_ids_path(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    embeds = weights["embeddings.word_embeddings.weight"][inputs["input_ids"]]
    if spec.embed_scale:
        embeds = embeds * np.sqrt(spec.d_model)
    via_embeds = {k: v for k, v in inputs.items() if k != "input_ids"}
    via_embeds["inputs_embeds"] = embeds
    cot = cotangents(spec, 3, 7)
    out_ids, g_ids = be.forward_backward(model, inputs, cot)
    out_emb, g_emb = be.forward_backward(model, via_embeds, cot)
    for k in out_ids:
        assert rel(out_emb[k], out_ids[k]) <= 1e-15, k
    np.testing.assert_array_equal(g_emb["embeddings.word_embeddings.weight"], 0.0)
    errors = grad_errors({k: v for k, v in g_emb.items() if "word_embeddings" not in k},
                         {k: v for k, v in g_ids.items() if "word_embeddings" not in k})
    assert max(errors.values()) <= 1e-13, max(errors.items(), key=lambda kv: kv[1])
    # chain rule of the lookup: d table[i] = scale * sum of d embeds at the positions of i
    want = np.zeros_like(g_ids["embeddings.word_embeddings.weight"])
    np.add.at(want, inputs["input_ids"], g_ids["inputs_embeds"])
    want *= np.sqrt(spec.d_model) if spec.embed_scale else 1.0
    assert rel(g_ids["embeddings.word_embeddings.weight"], want) <= 1e-13


@pytest.mark.parametrize("name", ["bert", "vaswani_nobias"])
def test_modes_agree_float64(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    cot = cotangents(spec, 3, 7)
    out0, g0 = be.forward_backward(model, inputs, cot, mode=be.modes[0])
    for mode in be.modes[1:]:
        fwd = be.forward(model, inputs, mode=mode)
        out, grads = be.forward_backward(model, inputs, cot, mode=mode)
        for k in out0:
            assert rel(fwd[k], out0[k]) <= 1e-12, (mode, k, rel(fwd[k], out0[k]))
            assert rel(out[k], out0[k]) <= 1e-12, (mode, k, rel(out[k], out0[k]))
        errors = grad_errors(grads, g0)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-12, (mode, worst, errors[worst])


def test_function_mode_relaxes_shapes_and_caches(be):
    spec = SPECS["pre_ln"]
    model, weights = built(be, spec)
    for t in (7, 5, 6, 9):  # reduce_retracing: the third call traces with T = None
        inputs = make_inputs(spec, t=t)
        ref = reference_forward(spec, weights, inputs, "float64")
        out = be.forward(model, inputs, mode="function")
        assert rel(out["last_hidden_state"], ref["last_hidden_state"]) <= 1e-12, t
    fn = be._compiled(model, "forward", "function")
    assert fn is be._compiled(model, "forward", "function")
    assert fn.experimental_get_tracing_count() <= 3
