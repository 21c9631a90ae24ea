"""``MXNetBackend.trace`` (divergence localisation): every node of ``spec.nodes()``, its output
and the gradient of ``sum_k sum(outputs[k] * cotangents[k])`` flowing into it.

float64 checks: the node names and shapes; the nodes that ARE model outputs equal them and the
gradients flowing into them equal the cotangents (plus, where a node also feeds the LM head or
the pooler, exactly that contribution); ``backward["embeddings"]`` equals
``forward_backward``'s gradient w.r.t. ``inputs_embeds`` (no embedding norm in between); the
embeddings' output equals a numpy computation; inner nodes' gradients match central finite
differences of the loss w.r.t. a perturbation added to the node's output; and the model is left
as it was (same outputs in both modes, no wrapper left, no parameter gradient written).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from xformer import InputError, ModelSpec, random_weights, reference
from xformer.backend import check_inputs
from xformer.spec import sinusoidal_table

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer_mxnet import modules  # noqa: E402
from xformer_mxnet.backend import MXNetBackend  # noqa: E402

mx = modules.mx
BE = MXNetBackend()

_SMALL = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=10)
SPECS = {
    # BERT-like: post-LN, embedding LayerNorm, segments, pooler
    "enc-post": ModelSpec(**_SMALL, norm_position="post", embedding_norm=True, type_vocab_size=2,
                          activation="gelu", head="pooler", norm_eps=1e-12),
    # pre-LN, final norm, no embedding norm: d loss / d embeddings == d loss / d inputs_embeds
    "enc-pre": ModelSpec(**_SMALL, norm_position="pre", embedding_norm=False, final_norm=True,
                         activation="gelu_tanh", head="none", norm_eps=1e-5),
    # GPT-2-like: tied LM head
    "dec": ModelSpec(architecture="decoder", **_SMALL, norm_position="pre",
                     embedding_norm=False, final_norm=True, activation="gelu_tanh",
                     tie_embeddings=True, head="lm", norm_eps=1e-5),
    # Vaswani-like: post-LN, sinusoidal, scaled and shared embeddings, tied head, 3 dec layers
    "ed": ModelSpec(architecture="encoder-decoder", **_SMALL, n_decoder_layers=3,
                    norm_position="post", embedding_norm=False, positional="sinusoidal",
                    embed_scale=True, share_embeddings=True, tie_embeddings=True,
                    activation="relu", head="lm", norm_eps=1e-5),
}
B, T, S = 2, 5, 6


def make_case(spec: ModelSpec, seed: int = 0):
    """Inputs with padding (an ``attention_mask`` with zeros) and random cotangents."""
    rng = np.random.default_rng(seed)
    enc_dec = spec.architecture == "encoder-decoder"
    t_src = S if enc_dec else T
    mask = np.ones((B, t_src))
    mask[1, -2:] = 0
    inputs = {"input_ids": rng.integers(0, spec.vocab_size, (B, t_src)),
              "attention_mask": mask}
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (B, t_src))
    if enc_dec:
        inputs["decoder_input_ids"] = rng.integers(0, spec.vocab_size, (B, T))
    shapes = {"last_hidden_state": (B, T, spec.d_model), "pooler_output": (B, spec.d_model),
              "encoder_last_hidden_state": (B, S, spec.d_model),
              "logits": (B, T, spec.vocab_size)}
    cotangents = {n: rng.standard_normal(shapes[n]) for n in spec.output_names()}
    return inputs, cotangents


def build(spec: ModelSpec, dtype: str = "float64"):
    model = BE.build(spec, dtype)
    weights = random_weights(spec, seed=1)
    # LayerNorm weights away from 1 and biases away from 0, so a mix-up shows
    rng = np.random.default_rng(2)
    weights = {k: v + 0.1 * rng.standard_normal(v.shape) if "norm" in k else v
               for k, v in weights.items()}
    BE.set_weights(model, {k: v.astype(dtype) for k, v in weights.items()})
    return model, weights


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    return float(np.abs(a - b).max() / scale) if scale else 0.0


@pytest.fixture(scope="module")
def traced():
    """Per spec: model, weights, inputs, cotangents, outputs, gradients, forward, backward
    (the model hybridized and run before the trace)."""
    out = {}
    for key, spec in SPECS.items():
        model, weights = build(spec)
        inputs, cots = make_case(spec)
        outputs, grads = BE.forward_backward(model, inputs, cots, mode="hybridize")
        fwd, bwd = BE.trace(model, inputs, cots)
        out[key] = dict(spec=spec, model=model, weights=weights, inputs=inputs, cots=cots,
                        outputs=outputs, grads=grads, fwd=fwd, bwd=bwd)
    return out


@pytest.mark.parametrize("key", list(SPECS))
def test_names_shapes_dtype(traced, key):
    c = traced[key]
    spec = c["spec"]
    names = [n for n, _ in spec.nodes()]
    assert list(c["fwd"]) == names and list(c["bwd"]) == names
    enc_side = {n for n in names if n == "embeddings" or n.startswith(("embeddings.",
                                                                       "encoder."))}
    for n in names:
        t = S if spec.architecture == "encoder-decoder" and n in enc_side else T
        want = {"pooler": (B, spec.d_model), "lm_head": (B, T, spec.vocab_size)}.get(
            n, (B, t, spec.d_model))
        for d in ("fwd", "bwd"):
            assert c[d][n].shape == want, (d, n)
            assert c[d][n].dtype == np.float64, (d, n)
            assert np.isfinite(c[d][n]).all(), (d, n)


def test_output_nodes_encoder_post(traced):
    c = traced["enc-post"]
    fwd, bwd, out, cots = c["fwd"], c["bwd"], c["outputs"], c["cots"]
    last = "encoder.layers.1"
    assert rel(fwd["pooler"], out["pooler_output"]) <= 1e-14
    assert rel(fwd[last], out["last_hidden_state"]) <= 1e-14
    assert np.array_equal(bwd["pooler"], cots["pooler_output"])
    # the last layer feeds last_hidden_state and, at position 0, the pooler:
    # d/dh0 = g_hidden[:, 0] + (g_pool * (1 - pooled^2)) @ W
    want = cots["last_hidden_state"].copy()
    w = c["weights"]["pooler.dense.weight"]
    want[:, 0] += (cots["pooler_output"] * (1 - out["pooler_output"] ** 2)) @ w
    assert np.array_equal(bwd[last][:, 1:], cots["last_hidden_state"][:, 1:])
    assert rel(bwd[last], want) <= 1e-14


def test_output_nodes_encoder_pre(traced):
    c = traced["enc-pre"]
    assert rel(c["fwd"]["encoder.final_norm"], c["outputs"]["last_hidden_state"]) <= 1e-14
    assert np.array_equal(c["bwd"]["encoder.final_norm"], c["cots"]["last_hidden_state"])


def test_output_nodes_decoder(traced):
    c = traced["dec"]
    fwd, bwd, out, cots = c["fwd"], c["bwd"], c["outputs"], c["cots"]
    assert rel(fwd["lm_head"], out["logits"]) <= 1e-14
    assert rel(fwd["decoder.final_norm"], out["last_hidden_state"]) <= 1e-14
    assert np.array_equal(bwd["lm_head"], cots["logits"])
    table = c["weights"]["embeddings.word_embeddings.weight"]  # tied head: logits = h W^T
    assert rel(bwd["decoder.final_norm"], cots["last_hidden_state"] + cots["logits"] @ table
               ) <= 1e-14


def test_output_nodes_encoder_decoder(traced):
    c = traced["ed"]
    fwd, bwd, out, cots = c["fwd"], c["bwd"], c["outputs"], c["cots"]
    assert rel(fwd["lm_head"], out["logits"]) <= 1e-14
    assert rel(fwd["decoder.layers.2"], out["last_hidden_state"]) <= 1e-14
    assert rel(fwd["encoder.layers.1"], out["encoder_last_hidden_state"]) <= 1e-14
    assert np.array_equal(bwd["lm_head"], cots["logits"])
    table = c["weights"]["embeddings.word_embeddings.weight"]  # shared and tied
    assert rel(bwd["decoder.layers.2"], cots["last_hidden_state"] + cots["logits"] @ table
               ) <= 1e-14
    # the encoder output also feeds every cross-attention: more than its cotangent
    assert rel(bwd["encoder.layers.1"], cots["encoder_last_hidden_state"]) > 1e-3


@pytest.mark.parametrize("key,pairs", [
    ("enc-pre", [("embeddings", "inputs_embeds")]),
    ("dec", [("embeddings", "inputs_embeds")]),
    ("ed", [("embeddings", "inputs_embeds"), ("decoder_embeddings", "decoder_inputs_embeds")]),
])
def test_embeddings_gradient_is_inputs_embeds_gradient(traced, key, pairs):
    """Without an embedding LayerNorm, the embeddings' output is inputs_embeds + positions:
    the gradients are the same (also through embed_scale, which comes before
    inputs_embeds)."""
    c = traced[key]
    for node, grad in pairs:
        assert rel(c["bwd"][node], c["grads"][grad]) <= 1e-14, node


def test_embeddings_forward_against_numpy(traced):
    c = traced["enc-post"]
    spec, w, x = c["spec"], c["weights"], c["inputs"]
    summed = (w["embeddings.word_embeddings.weight"][x["input_ids"]]
              + w["embeddings.position_embeddings.weight"][:T]
              + w["embeddings.token_type_embeddings.weight"][x["token_type_ids"]])
    want = reference.layer_norm(summed, w["embeddings.norm.weight"], w["embeddings.norm.bias"],
                                spec.norm_eps)
    assert rel(c["fwd"]["embeddings.norm"], want) <= 1e-14
    assert np.array_equal(c["fwd"]["embeddings"], c["fwd"]["embeddings.norm"])  # dropout off
    # Vaswani: word_embeddings[ids] * sqrt(D) + sinusoidal positions, both sides
    c = traced["ed"]
    spec, w, x = c["spec"], c["weights"], c["inputs"]
    table, pe = w["embeddings.word_embeddings.weight"], sinusoidal_table(spec.max_len,
                                                                         spec.d_model)
    for node, ids in (("embeddings", "input_ids"), ("decoder_embeddings", "decoder_input_ids")):
        t = x[ids].shape[1]
        want = table[x[ids]] * np.sqrt(spec.d_model) + pe[:t]
        assert rel(c["fwd"][node], want) <= 1e-15, node


def perturbed_loss(model, inputs, cots, node: str, delta) -> float:
    """The loss with ``delta`` added to ``node``'s output (imperative, dropout off)."""
    spec = model.spec
    block = BE._submodule(model, node)
    original = block.forward

    def forward(*args):
        out = original(*args)
        if isinstance(out, tuple):
            return (out[0] + delta, *out[1:])
        return out + delta

    object.__setattr__(block, "forward", forward)
    try:
        args = {k: mx.nd.array(v, dtype=v.dtype) for k, v in
                check_inputs(spec, inputs, "float64").items()}
        with modules.imperative(model), mx.autograd.predict_mode():
            out = model(**args)
    finally:
        vars(block).pop("forward")
    heads = out if isinstance(out, tuple) else (out,)
    return float(sum((h.asnumpy() * cots[n]).sum() for n, h in zip(spec.output_names(), heads)))


@pytest.mark.parametrize("key,nodes", [
    ("enc-post", ["embeddings.norm", "encoder.layers.0.self_attn", "encoder.layers.0.norm2",
                  "encoder.layers.1"]),
    ("ed", ["encoder.layers.0.ffn", "decoder_embeddings", "decoder.layers.0.cross_attn",
            "decoder.layers.1.self_attn", "decoder.layers.2.norm3"]),
])
def test_gradients_match_finite_differences(traced, key, nodes):
    c = traced[key]
    rng = np.random.default_rng(3)
    eps = 1e-6
    for node in nodes:
        direction = rng.standard_normal(c["fwd"][node].shape)
        plus = perturbed_loss(c["model"], c["inputs"], c["cots"], node, mx.nd.array(
            eps * direction, dtype="float64"))
        minus = perturbed_loss(c["model"], c["inputs"], c["cots"], node, mx.nd.array(
            -eps * direction, dtype="float64"))
        fd = (plus - minus) / (2 * eps)
        analytic = float((c["bwd"][node] * direction).sum())
        assert abs(fd - analytic) <= 1e-7 * max(abs(analytic), 1.0), (node, fd, analytic)


@pytest.mark.parametrize("key", list(SPECS))
def test_model_left_as_it_was(traced, key):
    c = traced[key]
    model, spec = c["model"], c["spec"]
    for name, _ in spec.nodes():
        assert "forward" not in vars(BE._submodule(model, name)), name
    after_h = BE.forward(model, c["inputs"], mode="hybridize")
    assert model._active  # still hybridized, with its cached graph
    for name in spec.output_names():
        assert np.array_equal(after_h[name], c["outputs"][name]), name
    after_i = BE.forward(model, c["inputs"], mode="imperative")
    for name in spec.output_names():
        assert rel(after_i[name], c["outputs"][name]) <= 1e-14, name
    # a trace of a never-hybridized model gives the same numbers
    fresh, _ = build(spec)
    fwd, bwd = BE.trace(fresh, c["inputs"], c["cots"])
    for name in fwd:
        assert np.array_equal(fwd[name], c["fwd"][name]), name
        assert np.array_equal(bwd[name], c["bwd"][name]), name


def test_no_parameter_gradient_written():
    spec = SPECS["dec"]
    model, _ = build(spec)
    inputs, cots = make_case(spec)
    params = modules.canonical_parameters(model)
    for p in params.values():
        p.zero_grad()
    BE.trace(model, inputs, cots)
    for name, p in params.items():
        assert not p.grad().asnumpy().any(), name


def test_float32():
    spec = SPECS["ed"]
    model, _ = build(spec, "float32")
    inputs, cots = make_case(spec)
    outputs = BE.forward(model, inputs)  # hybridized first
    fwd, bwd = BE.trace(model, inputs, cots)
    assert all(v.dtype == np.float32 for v in (*fwd.values(), *bwd.values()))
    assert rel(fwd["lm_head"], outputs["logits"]) <= 1e-6
    assert np.array_equal(bwd["lm_head"], cots["logits"].astype(np.float32))


def test_bad_cotangent_leaves_no_wrapper():
    spec = SPECS["enc-pre"]
    model, _ = build(spec)
    inputs, cots = make_case(spec)
    with pytest.raises(InputError, match="cotangent 'last_hidden_state'"):
        BE.trace(model, inputs, {"last_hidden_state": cots["last_hidden_state"][:, :2]})
    for name, _ in spec.nodes():
        assert "forward" not in vars(BE._submodule(model, name)), name
    BE.trace(model, inputs, cots)  # and it traces afterwards
