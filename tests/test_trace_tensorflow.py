"""Divergence localisation on the TensorFlow (Keras 3) backend: ``TensorFlowBackend.trace``
records every node of ``spec.nodes()`` (its output and the gradient of the loss w.r.t. it) in one
eager forward + backward pass.

Checked for an encoder (post-LN, embedding norm, token types, pooler), an encoder (pre-LN, final
norm), a decoder (tied LM head) and an encoder-decoder (sinusoidal positions, shared and tied
tables): node names and shapes; output nodes against the model outputs; the gradients of output
nodes against the cotangents (plus the head's contribution, in closed form); the embeddings'
gradient against ``forward_backward``'s ``inputs_embeds`` gradient; every node's gradient against
a central finite difference of the loss w.r.t. a perturbation added to that node's output; the
embeddings against numpy; and the model unchanged afterwards, eager and compiled.

Errors are ``max|a - b| / max|b|`` per tensor (as conformance measures them).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
pytest.importorskip("keras")

import xformer  # noqa: E402
from xformer import InputError, ModelSpec, random_weights  # noqa: E402
from xformer.reference import layer_norm  # noqa: E402

tf.get_logger().setLevel("ERROR")

SMALL = dict(vocab_size=30, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=12)

SPECS = {
    # embedding LayerNorm and token types: "embeddings.norm" is a node, inputs_embeds enters
    # before it.
    "enc_post_pooler": ModelSpec(**SMALL, norm_position="post", activation="gelu",
                                 type_vocab_size=2, embedding_norm=True, head="pooler"),
    # no embedding norm, learned positions: d loss / d embeddings == d loss / d inputs_embeds.
    "enc_pre_final": ModelSpec(**SMALL, norm_position="pre", activation="relu",
                               embedding_norm=False, final_norm=True, norm_eps=1e-6),
    "dec_tied": ModelSpec(**SMALL, architecture="decoder", norm_position="pre",
                          activation="gelu_tanh", embedding_norm=False, final_norm=True,
                          tie_embeddings=True, head="lm", norm_eps=1e-5),
    # sinusoidal positions, no norm: with inputs_embeds the embeddings' output depends on no
    # variable at all (the gradient must reach it anyway).
    "encdec": ModelSpec(**{**SMALL, "n_layers": 1}, architecture="encoder-decoder",
                        n_decoder_layers=2, norm_position="post", activation="relu",
                        positional="sinusoidal", embedding_norm=False, embed_scale=True,
                        share_embeddings=True, tie_embeddings=True, head="lm", norm_eps=1e-5),
}


@pytest.fixture(scope="module")
def be():
    return xformer.get_backend("tensorflow")


@pytest.fixture(scope="module")
def models(be):
    out = {}
    for key, spec in SPECS.items():
        model = be.build(spec, "float64")
        be.set_weights(model, random_weights(spec, seed=1))
        out[key] = model
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def make_inputs(spec: ModelSpec, seed: int = 0, embeds: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t, s = 2, 5, 4
    sides = [("", t)] if spec.architecture != "encoder-decoder" else [("", s),
                                                                        ("decoder_", t)]
    out = {}
    for prefix, n in sides:
        if embeds:
            out[f"{prefix}inputs_embeds"] = rng.normal(size=(b, n, spec.d_model))
        else:
            out[f"{prefix}input_ids"] = rng.integers(0, spec.vocab_size, (b, n))
        mask = np.ones((b, n))
        mask[1, -2:] = 0  # right padding in the second row
        out[f"{prefix}attention_mask"] = mask
    if spec.type_vocab_size:
        out["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (b, t))
    return out


def make_cotangents(be, model, inputs, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {k: v.shape for k, v in be.forward(model, inputs, mode="eager").items()}
    return {k: rng.normal(size=shape) for k, shape in shapes.items()}


def last_node(spec: ModelSpec, side: str) -> str:
    """The node whose output is ``side``'s last hidden state."""
    n = spec.n_layers if side == "encoder" else spec.decoder_layers
    return f"{side}.final_norm" if spec.final_norm else f"{side}.layers.{n - 1}"


def output_nodes(spec: ModelSpec) -> dict[str, str]:
    """``{output name: node name}``."""
    arch = spec.architecture
    out = {"last_hidden_state": last_node(spec, "encoder" if arch == "encoder" else "decoder")}
    if arch == "encoder-decoder":
        out["encoder_last_hidden_state"] = last_node(spec, "encoder")
    if spec.head == "pooler":
        out["pooler_output"] = "pooler"
    if spec.head == "lm":
        out["logits"] = "lm_head"
    return out


@pytest.fixture(scope="module")
def traces(be, models):
    """``{spec key: (inputs, cotangents, outputs, forward, backward)}``."""
    out = {}
    for key, model in models.items():
        inputs = make_inputs(model.spec)
        cot = make_cotangents(be, model, inputs)
        outputs = be.forward(model, inputs, mode="eager")
        fwd, bwd = be.trace(model, inputs, cot)
        out[key] = (inputs, cot, outputs, fwd, bwd)
    return out


@pytest.mark.parametrize("key", list(SPECS))
def test_names_and_shapes(key, traces):
    spec = SPECS[key]
    inputs, _, _, fwd, bwd = traces[key]
    names = [n for n, _ in spec.nodes()]
    assert list(fwd) == names and list(bwd) == names
    b = 2
    for name in names:
        target = name.startswith("decoder") or name == "lm_head"
        side = "decoder_" if spec.architecture == "encoder-decoder" and target else ""
        t = inputs[f"{side}attention_mask"].shape[1]
        want = {"pooler": (b, spec.d_model), "lm_head": (b, t, spec.vocab_size)}.get(
            name, (b, t, spec.d_model))
        assert fwd[name].shape == want, name
        assert bwd[name].shape == want, name
        assert fwd[name].dtype == np.float64 and bwd[name].dtype == np.float64, name
        assert np.isfinite(fwd[name]).all() and np.isfinite(bwd[name]).all(), name
        assert np.abs(bwd[name]).max() > 0, name  # every node reaches the loss


@pytest.mark.parametrize("key", list(SPECS))
def test_output_nodes_are_the_outputs(key, traces):
    spec = SPECS[key]
    _, _, outputs, fwd, _ = traces[key]
    for out_name, node in output_nodes(spec).items():
        assert rel(fwd[node], outputs[out_name]) <= 1e-14, (out_name, node)


@pytest.mark.parametrize("key", list(SPECS))
def test_output_node_gradients(key, be, models, traces):
    """Terminal nodes get exactly their cotangent; a hidden state that also feeds a head gets
    its cotangent plus the head's contribution (closed form)."""
    spec, model = SPECS[key], models[key]
    _, cot, _, fwd, bwd = traces[key]
    nodes = output_nodes(spec)
    w = be.get_weights(model)
    hidden = nodes["last_hidden_state"]
    if spec.head == "pooler":
        np.testing.assert_array_equal(bwd["pooler"], cot["pooler_output"])
        # pooler = tanh(x[:, 0] W^T + b): d/dx[:, 0] = ((1 - pooler^2) * c) W
        want = cot["last_hidden_state"].copy()
        want[:, 0] += ((1 - fwd["pooler"] ** 2) * cot["pooler_output"]) @ w[
            "pooler.dense.weight"]
        assert rel(bwd[hidden], want) <= 1e-14
    elif spec.head == "lm":
        np.testing.assert_array_equal(bwd["lm_head"], cot["logits"])
        # logits = x W^T: d/dx = c W
        want = cot["last_hidden_state"] + cot["logits"] @ w[spec.lm_head_name()]
        assert rel(bwd[hidden], want) <= 1e-14
    else:
        np.testing.assert_array_equal(bwd[hidden], cot["last_hidden_state"])
    if spec.architecture == "encoder-decoder":  # the memory also feeds cross-attention
        enc = nodes["encoder_last_hidden_state"]
        assert rel(bwd[enc], cot["encoder_last_hidden_state"]) > 1e-3


@pytest.mark.parametrize("key", ["enc_pre_final", "dec_tied", "encdec"])
def test_embeddings_gradient_is_inputs_embeds_gradient(key, be, models):
    """With no embedding norm, ``embeddings = inputs_embeds + positions``: the two gradients
    are the same, from token ids and from given embeddings."""
    spec, model = SPECS[key], models[key]
    for embeds in (False, True):
        inputs = make_inputs(spec, seed=3, embeds=embeds)
        cot = make_cotangents(be, model, inputs, seed=4)
        _, grads = be.forward_backward(model, inputs, cot, mode="eager")
        _, bwd = be.trace(model, inputs, cot)
        assert rel(bwd["embeddings"], grads["inputs_embeds"]) <= 1e-14
        if spec.architecture == "encoder-decoder":
            assert rel(bwd["decoder_embeddings"], grads["decoder_inputs_embeds"]) <= 1e-14


#: Nodes checked against finite differences: all of the encoder's; the encoder-decoder's
#: embeddings, memory (fed to the output and to every cross-attention), attentions that return
#: ``(hidden, (k, v))``, a norm and the head.
FD_NODES = {"enc_post_pooler": None,
            "encdec": ["embeddings", "encoder.layers.0", "decoder_embeddings",
                       "decoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                       "decoder.layers.1.norm2", "decoder.layers.1", "lm_head"]}


@pytest.mark.parametrize("key", list(FD_NODES))
def test_gradients_match_finite_differences(key, be, models, traces):
    """``d loss / d node`` along a random direction ``d`` against ``(L(+h d) - L(-h d)) / 2h``,
    where ``L(e)`` adds ``e`` to the node's output."""
    spec, model = SPECS[key], models[key]
    inputs, cot, _, _, bwd = traces[key]
    rng = np.random.default_rng(5)
    h = 1e-5

    def loss(layer, delta):
        call = layer.call

        def perturbed(*args, **kwargs):
            out = call(*args, **kwargs)  # attention returns (hidden, (k, v)) in decoders
            return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta

        object.__setattr__(layer, "call", perturbed)
        try:
            out = be.forward(model, inputs, mode="eager")
        finally:
            object.__delattr__(layer, "call")
        return sum(float(np.sum(out[k] * cot[k])) for k in cot)

    for name in FD_NODES[key] or [n for n, _ in spec.nodes()]:
        layer = be.sublayer(model, name)
        d = rng.normal(size=bwd[name].shape)
        fd = (loss(layer, h * d) - loss(layer, -h * d)) / (2 * h)
        exact = float(np.sum(bwd[name] * d))
        assert abs(fd - exact) <= 1e-7 * max(1.0, abs(exact)), (name, fd, exact)


def test_post_ln_layer_is_its_last_norm(traces):
    for key, last in (("enc_post_pooler", "norm2"), ("encdec", "norm3")):
        spec = SPECS[key]
        _, _, _, fwd, bwd = traces[key]
        side = "encoder" if spec.architecture == "encoder" else "decoder"
        np.testing.assert_array_equal(fwd[f"{side}.layers.0"], fwd[f"{side}.layers.0.{last}"])
        np.testing.assert_array_equal(bwd[f"{side}.layers.0"], bwd[f"{side}.layers.0.{last}"])


def test_embeddings_against_numpy(be, models, traces):
    """``embeddings.norm = LayerNorm(word[ids] + positions[:T] + token_types[tt])``, and the
    ``embeddings`` node (after the dropout, off) is the same tensor."""
    spec, model = SPECS["enc_post_pooler"], models["enc_post_pooler"]
    inputs, _, _, fwd, bwd = traces["enc_post_pooler"]
    w = be.get_weights(model)
    t = inputs["input_ids"].shape[1]
    x = (w["embeddings.word_embeddings.weight"][inputs["input_ids"]]
         + w["embeddings.position_embeddings.weight"][:t][None]
         + w["embeddings.token_type_embeddings.weight"][inputs["token_type_ids"]])
    want = layer_norm(x, w["embeddings.norm.weight"], w["embeddings.norm.bias"], spec.norm_eps)
    assert rel(fwd["embeddings.norm"], want) <= 1e-14
    np.testing.assert_array_equal(fwd["embeddings"], fwd["embeddings.norm"])
    np.testing.assert_array_equal(bwd["embeddings"], bwd["embeddings.norm"])


@pytest.mark.parametrize("key", ["enc_post_pooler", "encdec"])
def test_model_unchanged_after_trace(key, be, models, monkeypatch):
    """Compiled before, traced, then forward / forward_backward in every default mode give the
    same numbers as before, and no wrapper is left on any layer (also after a failed trace)."""
    spec, model = SPECS[key], models[key]
    inputs = make_inputs(spec, seed=7)
    cot = make_cotangents(be, model, inputs, seed=8)
    before = {m: be.forward(model, inputs, mode=m) for m in ("eager", "function")}
    grads_before = be.forward_backward(model, inputs, cot, mode="function")[1]
    fwd, _ = be.trace(model, inputs, cot)
    with pytest.raises(InputError):
        be.trace(model, inputs, {"nope": np.zeros(1)})
    with pytest.raises(InputError):
        be.trace(model, {**inputs, "attention_mask": np.ones((2, 3))}, cot)
    head = be.sublayer(model, spec.nodes()[-1][0])

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:  # fails inside the model, wrappers installed
        patch.setattr(type(head), "call", boom)
        with pytest.raises(RuntimeError, match="boom"):
            be.trace(model, inputs, cot)
    for name, _ in spec.nodes():
        assert "call" not in vars(be.sublayer(model, name)), name
    for m, outs in before.items():
        after = be.forward(model, inputs, mode=m)
        for k in outs:
            np.testing.assert_array_equal(after[k], outs[k])
    grads_after = be.forward_backward(model, inputs, cot, mode="function")[1]
    for k in grads_before:
        np.testing.assert_array_equal(grads_after[k], grads_before[k])
    last = output_nodes(spec)["last_hidden_state"]
    assert rel(fwd[last], before["function"]["last_hidden_state"]) <= 1e-14


def test_float32(be):
    spec = SPECS["dec_tied"]
    model = be.build(spec, "float32")
    be.set_weights(model, random_weights(spec, seed=1))
    inputs = make_inputs(spec)
    cot = make_cotangents(be, model, inputs)
    fwd, bwd = be.trace(model, inputs, cot)
    assert all(v.dtype == np.float32 for v in (*fwd.values(), *bwd.values()))
    out = be.forward(model, inputs, mode="eager")
    np.testing.assert_array_equal(fwd["lm_head"], out["logits"])
