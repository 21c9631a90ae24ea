"""Unit tests of the PyTorch backend (backends/xformer_torch): native modules, the Backend
protocol, gradients, modes, and the independent ``nn.TransformerEncoderLayer`` reference.

Relative error is ``max|a - b| / max|b|`` per tensor (DESIGN.md §4). One exception, stated where
it is used: the gradient of ``k_proj.bias`` is exactly zero in exact arithmetic (a key bias
shifts every logit of a query row by the same amount, and softmax ignores that), so its computed
value is rounding noise; it is measured against the scale of the same layer's ``v_proj.bias``
gradient instead of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xformer import CheckpointError, InputError, ModelSpec, random_weights
from xformer.backend import BackendError, check_inputs, get_backend
from xformer.reference import forward as reference_forward
from xformer_torch.backend import TorchBackend
from xformer_torch.modules import EncoderModel, gelu, gelu_tanh
from xformer_torch.reference_nn import nn_transformer_reference

BACKEND = get_backend("torch")
B, T = 4, 7
BASE = dict(vocab_size=37, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=9)

#: Small specs that together take every value of every encoder field.
SPECS = {
    "bert": ModelSpec(**BASE, type_vocab_size=2, head="pooler"),  # post, gelu, learned, emb
    # norm, bias (type_vocab_size explicit: the spec's default is 0)
    "vaswani": ModelSpec(**BASE, norm_position="post", norm_eps=1e-5, activation="relu",
                         positional="sinusoidal", type_vocab_size=0, embedding_norm=False,
                         embed_scale=True),
    "pre_ln": ModelSpec(**BASE, norm_position="pre", norm_eps=1e-6, activation="gelu_tanh",
                        type_vocab_size=0, embedding_norm=False, final_norm=True),
    "nobias": ModelSpec(**{**BASE, "n_heads": 2}, norm_position="pre", activation="gelu",
                        positional="sinusoidal", type_vocab_size=3, embedding_norm=True,
                        final_norm=True, embed_scale=True, bias=False, head="pooler"),
    "nobias_post": ModelSpec(**BASE, activation="relu", bias=False, head="pooler"),
}


def rel(a, b, scale=None) -> float:
    """``max|a - b| / max|b|`` (or ``/ scale``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() if scale is None else scale))


def max_rel(got: dict, want: dict) -> tuple[float, str]:
    """Worst relative error over the tensors of ``want`` and its name (see module docstring for
    ``k_proj.bias``)."""
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {}
    for k in want:
        scale = None
        if k.endswith("self_attn.k_proj.bias"):
            scale = np.abs(np.asarray(want[k.replace("k_proj", "v_proj")])).max()
        errs[k] = rel(got[k], want[k], scale)
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def make_inputs(spec: ModelSpec, seed: int = 0, embeds: bool = False) -> dict:
    """Ids (or embeddings), segment ids, and a mask with trailing padding, leading padding and
    one fully padded row."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, T), np.int64)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    mask[3, :] = 0
    inputs = {"attention_mask": mask}
    if embeds:
        inputs["inputs_embeds"] = rng.standard_normal((B, T, spec.d_model))
    else:
        inputs["input_ids"] = rng.integers(0, spec.vocab_size, (B, T))
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (B, T))
    return inputs


def cotangents(spec: ModelSpec, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    cot = {"last_hidden_state": rng.standard_normal((B, T, spec.d_model))}
    if spec.head == "pooler":
        cot["pooler_output"] = rng.standard_normal((B, spec.d_model))
    return cot


def built(spec: ModelSpec, dtype: str = "float64", seed: int = 0):
    weights = random_weights(spec, seed, "float64")
    model = BACKEND.build(spec, dtype)
    BACKEND.set_weights(model, weights)
    return model, weights


def loss(model, inputs, cot) -> float:
    out = BACKEND.forward(model, inputs)
    return float(sum(np.sum(out[k] * cot[k]) for k in cot))


# ---------------------------------------------------------------------- protocol and weights
def test_backend_attributes():
    assert isinstance(BACKEND, TorchBackend)
    assert (BACKEND.name, BACKEND.extra) == ("torch", "torch")
    assert BACKEND.modes == ("eager", "compile") and BACKEND.default_modes == ("eager",)
    assert BACKEND.framework_version() == torch.__version__
    model, _ = built(SPECS["bert"])
    with pytest.raises(BackendError, match="no mode 'jit'"):
        BACKEND.forward(model, make_inputs(SPECS["bert"]), mode="jit")


def test_package_is_lazy_and_exports():
    """``import xformer_torch`` (the package __init__, put first on the path: an editable install
    made before the folder had an ``__init__.py`` sees a namespace package) imports no torch
    until a module class is asked for."""
    code = ("import sys, xformer_torch, xformer_torch.backend, xformer\n"
            "assert xformer_torch.__file__.endswith('__init__.py'), xformer_torch.__file__\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "assert xformer.get_backend('torch').name == 'torch'\n"
            "assert xformer_torch.EncoderModel.__module__ == 'xformer_torch.modules'\n"
            "assert callable(xformer_torch.nn_transformer_reference)\n"
            "assert xformer_torch.TorchBackend is xformer_torch.backend.TorchBackend\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parents[1] / "backends"), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


@pytest.mark.parametrize("name", SPECS)
def test_canonical_names(name):
    spec = SPECS[name]
    model = BACKEND.build(spec, "float32")
    names = [p.name for p in spec.parameters()]
    assert list(model.state_dict()) == names
    assert [n for n, _ in model.named_parameters()] == names
    assert list(BACKEND.get_weights(model)) == names
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == spec.parameter_shapes()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weights_round_trip_exact(dtype):
    spec = SPECS["nobias"]
    weights = random_weights(spec, 3, dtype)
    model = BACKEND.build(spec, dtype)
    BACKEND.set_weights(model, weights)
    got = BACKEND.get_weights(model)
    for name, w in weights.items():
        assert got[name].dtype == np.dtype(dtype)
        np.testing.assert_array_equal(got[name], w, err_msg=name)
    assert all(p.dtype == getattr(torch, dtype) for p in model.parameters())


def test_set_weights_casts_to_model_dtype():
    spec = SPECS["bert"]
    weights = random_weights(spec, 0, "float64")
    model = BACKEND.build(spec, "float32")
    BACKEND.set_weights(model, weights)
    got = BACKEND.get_weights(model)
    for name, w in weights.items():
        np.testing.assert_array_equal(got[name], w.astype(np.float32), err_msg=name)


def test_set_weights_mismatch_raises():
    spec = SPECS["bert"]
    model = BACKEND.build(spec, "float64")
    weights = random_weights(spec, 0)
    missing = {k: v for k, v in weights.items() if k != "pooler.dense.bias"}
    with pytest.raises(CheckpointError, match="missing 1: pooler.dense.bias"):
        BACKEND.set_weights(model, missing)
    with pytest.raises(CheckpointError, match="extra 1: pooler.dense.extra"):
        BACKEND.set_weights(model, {**weights, "pooler.dense.extra": np.zeros(3)})
    bad = {**weights, "encoder.layers.0.ffn.linear1.weight": np.zeros((16, 24))}
    with pytest.raises(CheckpointError, match="mis-shaped"):
        BACKEND.set_weights(model, bad)


# ---------------------------------------------------------------------- forward vs numpy
@pytest.mark.parametrize("name", SPECS)
def test_forward_matches_reference_float64(name):
    spec = SPECS[name]
    model, weights = built(spec)
    inputs = make_inputs(spec)
    out = BACKEND.forward(model, inputs)
    want = reference_forward(spec, weights, check_inputs(spec, inputs, "float64"), "float64")
    assert set(out) == set(spec.output_names())
    assert all(v.dtype == np.float64 for v in out.values())
    err, worst = max_rel(out, want)
    assert err <= 1e-12, (worst, err)
    # the padded rows are finite in outputs and in every gradient
    outs, grads = BACKEND.forward_backward(model, inputs, cotangents(spec))
    assert all(np.isfinite(v).all() for v in outs.values())
    assert all(np.isfinite(g).all() for g in grads.values())
    assert max_rel(outs, want)[0] <= 1e-12


@pytest.mark.parametrize("name", ["bert", "vaswani", "nobias"])
def test_forward_float32(name):
    spec = SPECS[name]
    model, weights = built(spec, "float32")
    inputs = make_inputs(spec)
    out = BACKEND.forward(model, inputs)
    assert all(v.dtype == np.float32 for v in out.values())
    want = reference_forward(spec, weights, check_inputs(spec, inputs, "float64"), "float64")
    err, worst = max_rel(out, want)
    assert err <= 1e-5, (worst, err)


def test_activations_composed():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(gelu(x), torch.nn.functional.gelu(x), rtol=0, atol=1e-15)
    assert torch.allclose(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"),
                          rtol=0, atol=1e-15)


# ---------------------------------------------------------------------- gradients
def test_gradients_match_finite_differences():
    """Directional central differences ``(L(w + h d) - L(w - h d)) / 2h`` against ``<grad, d>``
    for a random direction ``d`` over whole tensors, float64.

    Without the fully padded row: there the computed forward is exactly uniform attention (the
    logits vanish next to ``finfo.min``), so it is flat in Q and K, while backprop (in every
    framework, and as the math says: softmax(s + c) = softmax(s)) returns the softmax Jacobian
    at the uniform probabilities. Finite differences of that row measure the rounding, not the
    model. That row's gradients are checked between implementations instead (compile mode, the
    ``nn.TransformerEncoderLayer`` reference, the inputs_embeds path)."""
    spec = ModelSpec(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=T,
                     activation="gelu", type_vocab_size=2, head="pooler", norm_eps=1e-6)
    model, weights = built(spec)
    cot = cotangents(spec)
    rng = np.random.default_rng(5)
    h = 1e-5
    inputs = make_inputs(spec)
    inputs["attention_mask"][3, 1:4] = 1  # no fully padded row (see the docstring)
    _, grads = BACKEND.forward_backward(model, inputs, cot)
    for name in ("embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "embeddings.token_type_embeddings.weight", "embeddings.norm.weight",
                 "encoder.layers.0.self_attn.q_proj.weight",
                 "encoder.layers.0.self_attn.v_proj.bias", "encoder.layers.0.ffn.linear1.weight",
                 "encoder.layers.0.norm2.bias",
                 "pooler.dense.weight"):
        d = rng.standard_normal(weights[name].shape)
        values = []
        for sign in (1, -1):
            BACKEND.set_weights(model, {**weights, name: weights[name] + sign * h * d})
            values.append(loss(model, inputs, cot))
        fd, analytic = (values[0] - values[1]) / (2 * h), float(np.sum(grads[name] * d))
        assert abs(fd - analytic) <= 1e-6 * abs(analytic), (name, fd, analytic)
    BACKEND.set_weights(model, weights)
    # inputs_embeds, through the inputs_embeds path
    inputs = make_inputs(spec, embeds=True)
    inputs["attention_mask"][3, 1:4] = 1
    _, grads = BACKEND.forward_backward(model, inputs, cot)
    d = rng.standard_normal(inputs["inputs_embeds"].shape)
    e = inputs["inputs_embeds"]
    fd = (loss(model, {**inputs, "inputs_embeds": e + h * d}, cot)
          - loss(model, {**inputs, "inputs_embeds": e - h * d}, cot)) / (2 * h)
    analytic = float(np.sum(grads["inputs_embeds"] * d))
    assert abs(fd - analytic) <= 1e-6 * abs(analytic), ("inputs_embeds", fd, analytic)


@pytest.mark.parametrize("name", ["vaswani", "bert"])
def test_inputs_embeds_path_equals_input_ids_path(name):
    spec = SPECS[name]
    model, weights = built(spec)
    by_ids = make_inputs(spec)
    scale = np.sqrt(spec.d_model) if spec.embed_scale else 1.0
    embeds = weights["embeddings.word_embeddings.weight"][by_ids["input_ids"]] * scale
    by_embeds = {**{k: v for k, v in by_ids.items() if k != "input_ids"},
                 "inputs_embeds": embeds}
    cot = cotangents(spec)
    out_i, g_i = BACKEND.forward_backward(model, by_ids, cot)
    out_e, g_e = BACKEND.forward_backward(model, by_embeds, cot)
    assert max_rel(out_e, out_i)[0] <= 1e-12
    word = "embeddings.word_embeddings.weight"
    assert set(g_i) == set(g_e) == {*spec.parameter_shapes(), "inputs_embeds"}
    assert not g_e[word].any()  # no lookup in the inputs_embeds path
    err, worst = max_rel({k: v for k, v in g_e.items() if k != word},
                         {k: v for k, v in g_i.items() if k != word})
    assert err <= 1e-12, (worst, err)
    # chain rule through the lookup: d/dW = scatter-add of d/d(embeds) * scale
    want = np.zeros_like(weights[word])
    np.add.at(want, by_ids["input_ids"], g_i["inputs_embeds"] * scale)
    assert rel(g_i[word], want) <= 1e-12


def test_forward_backward_outputs_equal_forward():
    spec = SPECS["nobias"]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    outs, grads = BACKEND.forward_backward(model, inputs, cotangents(spec))
    fwd = BACKEND.forward(model, inputs)
    for k in fwd:
        np.testing.assert_array_equal(outs[k], fwd[k])
    assert all(grads[k].shape == s for k, s in spec.parameter_shapes().items())
    assert grads["inputs_embeds"].shape == (B, T, spec.d_model)


def test_compile_mode_matches_eager():
    spec = ModelSpec(vocab_size=13, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=T,
                     activation="gelu_tanh", head="pooler")
    model, _ = built(spec)
    inputs, cot = make_inputs(spec), cotangents(spec)
    outs = {m: BACKEND.forward_backward(model, inputs, cot, mode=m) for m in BACKEND.modes}
    first = BACKEND.modes[0]
    for mode in BACKEND.modes[1:]:
        assert max_rel(outs[mode][0], outs[first][0])[0] <= 1e-12, mode
        err, worst = max_rel(outs[mode][1], outs[first][1])
        assert err <= 1e-12, (mode, worst, err)
        fwd = BACKEND.forward(model, inputs, mode=mode)
        assert max_rel(fwd, outs[first][0])[0] <= 1e-12, mode
    compiled = model.__dict__["_xformer_compiled"]
    BACKEND.forward(model, inputs, mode="compile")
    assert model.__dict__["_xformer_compiled"] is compiled  # cached, not rebuilt
    assert list(model.state_dict()) == [p.name for p in spec.parameters()]


# ---------------------------------------------------------------------- native module behaviour
def test_too_long_and_bad_inputs_raise():
    spec = SPECS["vaswani"]
    model = EncoderModel(spec, dtype=torch.float64)
    ids = torch.zeros(1, spec.max_len + 1, dtype=torch.long)
    with pytest.raises(InputError, match="longer than max_len=9"):
        model(input_ids=ids)
    with pytest.raises(InputError, match="longer than max_len=9"):
        BACKEND.forward(model, {"input_ids": ids.numpy()})
    with pytest.raises(InputError, match="exactly one"):
        model(input_ids=ids[:, :3], inputs_embeds=torch.zeros(1, 3, 16, dtype=torch.float64))
    with pytest.raises(InputError, match="type_vocab_size = 0"):
        model(input_ids=ids[:, :3], token_type_ids=ids[:, :3])


def test_native_call_defaults_and_dtype():
    spec = SPECS["bert"]
    model, _ = built(spec)
    ids = torch.from_numpy(make_inputs(spec)["input_ids"])
    default = model(input_ids=ids)
    explicit = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                     token_type_ids=torch.zeros_like(ids))
    assert model.dtype == torch.float64 and model.spec == spec
    for k in default:
        assert default[k].dtype == torch.float64
        torch.testing.assert_close(default[k], explicit[k], rtol=0, atol=0)
    assert EncoderModel(SPECS["vaswani"], dtype=torch.float64).embeddings.position_table.dtype \
        == torch.float64


def test_dropout_only_in_training():
    spec = SPECS["bert"].replace(dropout=0.3)
    model, _ = built(spec)
    ids = torch.from_numpy(make_inputs(spec)["input_ids"])
    model.train()
    torch.manual_seed(0)
    a = model(input_ids=ids)["last_hidden_state"]
    b = model(input_ids=ids)["last_hidden_state"]
    assert not torch.equal(a, b)
    model.eval()
    torch.testing.assert_close(model(input_ids=ids)["last_hidden_state"],
                               model(input_ids=ids)["last_hidden_state"], rtol=0, atol=0)
    model.train()
    out = BACKEND.forward(model, {"input_ids": ids.numpy()})  # dropout off in the backend
    assert model.training  # ... and the caller's mode is restored
    model.eval()
    np.testing.assert_array_equal(out["last_hidden_state"],
                                  BACKEND.forward(model, {"input_ids": ids.numpy()})[
                                      "last_hidden_state"])


# ---------------------------------------------------------------------- nn.TransformerEncoderLayer
NN_SPECS = {
    "post_relu": SPECS["bert"].replace(activation="relu"),
    "post_gelu": SPECS["bert"],
    "pre_gelu": SPECS["bert"].replace(norm_position="pre", final_norm=True),
    "pre_relu_nobias": SPECS["nobias"].replace(activation="relu"),
    "pre_gelu_tanh": SPECS["pre_ln"],
    "post_gelu_tanh_sinusoidal": SPECS["vaswani"].replace(activation="gelu_tanh"),
}


@pytest.mark.parametrize("name", NN_SPECS)
def test_nn_transformer_reference_agrees(name):
    spec = NN_SPECS[name]
    model, weights = built(spec)
    ref = nn_transformer_reference(spec, weights, "float64")
    assert {k: v.numpy() for k, v in ref.to_canonical(ref.state_dict()).items()}.keys() \
        == weights.keys()
    inputs, cot = make_inputs(spec), cotangents(spec)
    outs, grads = BACKEND.forward_backward(model, inputs, cot)

    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    ref_out = ref(**tensors)
    params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad([ref_out[k] for k in cot], list(params.values()),
                                    [torch.from_numpy(cot[k]) for k in cot])
    ref_grads = ref.to_canonical(dict(zip(params, ref_grads)))
    err, worst = max_rel(outs, {k: v.detach().numpy() for k, v in ref_out.items()})
    assert err <= 1e-11, (worst, err)
    err, worst = max_rel({k: grads[k] for k in ref_grads},
                         {k: v.numpy() for k, v in ref_grads.items()})
    assert err <= 1e-11, (worst, err)
    # eval + no_grad (where nn.TransformerEncoderLayer's fast path would give NaN on the fully
    # padded row): the reference still takes the slow path
    with torch.no_grad():
        ref.eval()
        again = ref(**tensors)
    for k, v in again.items():
        assert torch.isfinite(v).all()
        torch.testing.assert_close(v, ref_out[k].detach(), rtol=0, atol=0)


def test_nn_fast_path_nan_on_fully_padded_row_is_real():
    """Why the reference forces the slow path: torch's fused encoder layer (eval + no_grad)
    returns NaN for a fully padded row even with the finite float mask."""
    layer = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True,
                                             dtype=torch.float64).eval()
    x = torch.randn(2, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(2, T, dtype=torch.float64)
    pad[1] = torch.finfo(torch.float64).min
    with torch.no_grad():
        fast = layer(x, src_key_padding_mask=pad)
    slow = layer(x, src_key_padding_mask=pad)  # grad enabled: composite path
    assert torch.isfinite(slow).all()
    torch.testing.assert_close(fast[0], slow[0].detach(), rtol=0, atol=1e-13)
    assert torch.isnan(fast[1]).all(), "torch's fast path no longer NaNs: update docs"
