"""Divergence localisation in the PyTorch backend: ``TorchBackend.trace`` records every node of
``spec.nodes()`` (its output and the gradient of the cotangent loss w.r.t. that output) in one
eager forward + backward pass.

Checked for an encoder (post-LN, embedding norm, pooler), an encoder (pre-LN, final norm), a
decoder (pre-LN, tied LM head) and an encoder-decoder (post-LN, shared and tied tables), float64:
node names and shapes; output nodes against the model outputs and their cotangents; the
embedding nodes' gradients against ``forward_backward``'s ``inputs_embeds`` gradients; central
finite differences of the loss w.r.t. a perturbation added to a node's output; node outputs
against :mod:`xformer.reference`; and that the model is left as it was (no hooks, train mode,
same outputs, eager and compiled).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from xformer import InputError, ModelSpec, random_weights
from xformer.backend import check_inputs, get_backend
from xformer.reference import forward as reference_forward
from xformer.reference import layer_norm

BACKEND = get_backend("torch")
B, S, T = 3, 6, 5  # batch, (source) length, target length of an encoder-decoder
BASE = dict(vocab_size=29, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=8)

SPECS = {
    # post-LN, embedding LayerNorm, segment embeddings, pooler
    "enc_post": ModelSpec(**BASE, type_vocab_size=2, head="pooler"),
    # pre-LN, final norm, no embedding norm: d loss / d embeddings == d loss / d inputs_embeds
    "enc_pre": ModelSpec(**BASE, norm_position="pre", activation="gelu_tanh",
                         embedding_norm=False, final_norm=True),
    # GPT-2-like: pre-LN, final norm, tied LM head
    "dec": ModelSpec(**BASE, architecture="decoder", norm_position="pre", activation="gelu_tanh",
                     embedding_norm=False, final_norm=True, tie_embeddings=True, head="lm"),
    # Vaswani-like: post-LN, sinusoidal, embed scale, shared + tied tables, LM head
    "enc_dec": ModelSpec(**BASE, architecture="encoder-decoder", n_decoder_layers=2,
                         activation="relu", positional="sinusoidal", embedding_norm=False,
                         embed_scale=True, share_embeddings=True, tie_embeddings=True,
                         head="lm"),
}


def rel(a, b) -> float:
    """``max|a - b| / max(max|a|, max|b|)``."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.abs(a).max(), np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a - b).max())


def built(spec: ModelSpec, dtype: str = "float64"):
    weights = random_weights(spec, 0, "float64")
    model = BACKEND.build(spec, dtype)
    BACKEND.set_weights(model, weights)
    return model, weights


def make_inputs(spec: ModelSpec, seed: int = 0) -> dict:
    """Token ids and masks with trailing padding in row 1 (no row without an allowed key, so
    finite differences are valid everywhere)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((B, S), np.int64)
    mask[1, 4:] = 0
    inputs = {"input_ids": rng.integers(0, spec.vocab_size, (B, S)), "attention_mask": mask}
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (B, S))
    if spec.architecture == "encoder-decoder":
        dmask = np.ones((B, T), np.int64)
        dmask[2, 3:] = 0
        inputs.update(decoder_input_ids=rng.integers(0, spec.vocab_size, (B, T)),
                      decoder_attention_mask=dmask)
    return inputs


def make_cotangents(model, inputs: dict, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = BACKEND.forward(model, inputs)
    return {k: rng.standard_normal(v.shape) for k, v in out.items()}


def loss_of(out: dict, cot: dict) -> float:
    return float(sum(np.sum(np.asarray(out[k], np.float64) * cot[k]) for k in cot))


def output_nodes(spec: ModelSpec) -> dict[str, str]:
    """Model output -> the node that produces it."""
    def last(stack: str, n: int) -> str:
        return f"{stack}.final_norm" if spec.final_norm else f"{stack}.layers.{n - 1}"

    arch = spec.architecture
    if arch == "encoder":
        nodes = {"last_hidden_state": last("encoder", spec.n_layers)}
    else:
        nodes = {"last_hidden_state": last("decoder", spec.decoder_layers)}
    if arch == "encoder-decoder":
        nodes["encoder_last_hidden_state"] = last("encoder", spec.n_layers)
    if spec.head == "pooler":
        nodes["pooler_output"] = "pooler"
    if spec.head == "lm":
        nodes["logits"] = "lm_head"
    return nodes


def no_hooks(model) -> bool:
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


# ---------------------------------------------------------------------- names, shapes, outputs
@pytest.mark.parametrize("name", list(SPECS))
def test_nodes_shapes_and_outputs(name):
    spec = SPECS[name]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    fwd, bwd = BACKEND.trace(model, inputs, cot)
    names = [n for n, _ in spec.nodes()]
    assert list(fwd) == names and list(bwd) == names
    # an encoder-decoder's target side (T positions) starts at decoder_embeddings
    target = (names[names.index("decoder_embeddings"):]
              if spec.architecture == "encoder-decoder" else [])
    for n in names:
        t = T if n in target else S
        shape = {"pooler": (B, spec.d_model), "lm_head": (B, t, spec.vocab_size)}.get(
            n, (B, t, spec.d_model))
        assert fwd[n].shape == shape and bwd[n].shape == shape, (n, fwd[n].shape, shape)
        assert fwd[n].dtype == np.float64 and bwd[n].dtype == np.float64, n
        assert np.isfinite(fwd[n]).all() and np.isfinite(bwd[n]).all(), n
    # (2) the output nodes are the model outputs (bit for bit: the probe adds an exact zero)
    out = BACKEND.forward(model, inputs)
    for key, node in output_nodes(spec).items():
        np.testing.assert_array_equal(fwd[node], out[key], err_msg=f"{key} vs {node}")
    # (3) a head output's gradient is its cotangent
    for key, node in output_nodes(spec).items():
        if node in ("pooler", "lm_head"):
            np.testing.assert_array_equal(bwd[node], cot[key], err_msg=node)
    if spec.head == "lm":  # the hidden state feeds the loss directly and through the tied head
        table = model.embeddings.word_embeddings.weight.detach().numpy()
        want = cot["last_hidden_state"] + cot["logits"] @ table
        assert rel(bwd[output_nodes(spec)["last_hidden_state"]], want) <= 1e-14


@pytest.mark.parametrize("name", list(SPECS))
def test_output_node_gradient_is_its_cotangent(name):
    """With a cotangent on one output only, that output's node gets exactly the cotangent, and
    nodes that do not reach it get exact zeros."""
    spec = SPECS[name]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    names = [n for n, _ in spec.nodes()]
    for key, node in output_nodes(spec).items():
        _, bwd = BACKEND.trace(model, inputs, {key: cot[key]})
        np.testing.assert_array_equal(bwd[node], cot[key], err_msg=f"{key} -> {node}")
        unreached = [n for n in ("pooler", "lm_head") if n in names and n != node]
        if key == "encoder_last_hidden_state":  # the whole decoder side comes after
            unreached += names[names.index("decoder_embeddings"):]
        for n in unreached:
            assert not bwd[n].any(), (key, n)
        if node in ("pooler", "lm_head"):  # and everything before a head is reached
            assert all(bwd[n].any() for n in names), key


@pytest.mark.parametrize("name", ["enc_pre", "dec", "enc_dec"])
def test_embeddings_gradient_equals_inputs_embeds_gradient(name):
    """Without an embedding LayerNorm the embeddings output is ``inputs_embeds`` plus constant
    positions, so its gradient is ``forward_backward``'s ``inputs_embeds`` gradient."""
    spec = SPECS[name]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    _, bwd = BACKEND.trace(model, inputs, cot)
    _, grads = BACKEND.forward_backward(model, inputs, cot)
    assert rel(bwd["embeddings"], grads["inputs_embeds"]) <= 1e-14
    if spec.architecture == "encoder-decoder":
        assert rel(bwd["decoder_embeddings"], grads["decoder_inputs_embeds"]) <= 1e-14


def _perturbed_loss(model, node: str, delta: np.ndarray, inputs: dict, cot: dict) -> float:
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + torch.from_numpy(delta), *output[1:])
        return output + torch.from_numpy(delta)

    handle = model.get_submodule(node).register_forward_hook(hook)
    try:
        return loss_of(BACKEND.forward(model, inputs), cot)
    finally:
        handle.remove()


@pytest.mark.parametrize("name,nodes", [
    ("enc_post", ["embeddings.norm", "encoder.layers.0.self_attn", "encoder.layers.1.norm1",
                  "encoder.layers.1.ffn"]),
    ("dec", ["embeddings", "decoder.layers.0.norm1", "decoder.layers.1.self_attn",
             "decoder.layers.1"]),
    ("enc_dec", ["encoder.layers.1", "decoder.layers.0.cross_attn", "decoder.layers.1.norm2",
                 "decoder.layers.1.ffn"]),
])
def test_node_gradient_matches_finite_differences(name, nodes):
    """``<backward[node], v>`` == ``(L(out + h v) - L(out - h v)) / 2h``, the perturbation added
    to the node's output by a forward hook (h = 1e-5, float64)."""
    spec = SPECS[name]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    fwd, bwd = BACKEND.trace(model, inputs, cot)
    rng = np.random.default_rng(7)
    h = 1e-5
    for node in nodes:
        v = rng.standard_normal(fwd[node].shape)
        fd = (_perturbed_loss(model, node, h * v, inputs, cot)
              - _perturbed_loss(model, node, -h * v, inputs, cot)) / (2 * h)
        analytic = float(np.sum(bwd[node] * v))
        assert abs(fd - analytic) <= 1e-7 * max(abs(analytic), 1.0), (node, fd, analytic)
    assert no_hooks(model)


# ---------------------------------------------------------------------- against the reference
def test_nodes_match_reference():
    """``embeddings.norm`` from numpy; each layer's output from :func:`xformer.reference.forward`
    of the spec cut after that layer (head and final norm dropped); the pooler on top."""
    spec = SPECS["enc_post"]
    model, weights = built(spec)
    inputs = make_inputs(spec)
    fwd, _ = BACKEND.trace(model, inputs, make_cotangents(model, inputs))
    ids, tt = inputs["input_ids"], inputs["token_type_ids"]
    x = (weights["embeddings.word_embeddings.weight"][ids]
         + weights["embeddings.position_embeddings.weight"][:S]
         + weights["embeddings.token_type_embeddings.weight"][tt])
    want = layer_norm(x, weights["embeddings.norm.weight"], weights["embeddings.norm.bias"],
                      spec.norm_eps)
    assert rel(fwd["embeddings.norm"], want) <= 1e-14
    assert rel(fwd["embeddings"], want) <= 1e-14
    checked = check_inputs(spec, inputs, "float64")
    for i in range(spec.n_layers):
        cut = spec.replace(n_layers=i + 1, head="none")
        sub = {p.name: weights[p.name] for p in cut.parameters()}
        want = reference_forward(cut, sub, checked)["last_hidden_state"]
        assert rel(fwd[f"encoder.layers.{i}"], want) <= 1e-13, i
    pooled = np.tanh(fwd[f"encoder.layers.{spec.n_layers - 1}"][:, 0]
                     @ weights["pooler.dense.weight"].T + weights["pooler.dense.bias"])
    assert rel(fwd["pooler"], pooled) <= 1e-14


# ---------------------------------------------------------------------- the model afterwards
@pytest.mark.parametrize("name", ["enc_post", "enc_dec"])
def test_model_left_as_it_was(name):
    """No hooks left, train mode kept (dropout off inside trace), parameters' ``.grad`` untouched,
    same outputs before and after; hooks removed when the pass raises."""
    spec = SPECS[name].replace(dropout=0.1)
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    before = BACKEND.forward(model, inputs)
    model.train()
    fwd, _ = BACKEND.trace(model, inputs, cot)
    assert model.training and no_hooks(model)
    assert all(p.grad is None for p in model.parameters())
    for key, node in output_nodes(spec).items():  # dropout was off
        np.testing.assert_array_equal(fwd[node], before[key])
    after = BACKEND.forward(model, inputs)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])
    _, zero = BACKEND.trace(model, inputs, {})  # no cotangent: the loss is 0
    assert not any(g.any() for g in zero.values())
    with pytest.raises(InputError, match="cotangents for unknown outputs"):
        BACKEND.trace(model, inputs, {"no_such_output": cot["last_hidden_state"]})
    with pytest.raises(InputError, match="has shape"):
        BACKEND.trace(model, {k: v[:1] for k, v in inputs.items()}, cot)
    assert model.training and no_hooks(model)


def test_inputs_embeds_and_float32():
    """``inputs_embeds`` in, float32 model: nodes in float32, embeddings == embeds + positions."""
    spec = SPECS["dec"]
    model, _ = built(spec, "float32")
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((B, S, spec.d_model))
    out = BACKEND.forward(model, {"inputs_embeds": embeds})
    cot = {k: rng.standard_normal(v.shape) for k, v in out.items()}
    fwd, bwd = BACKEND.trace(model, {"inputs_embeds": embeds}, cot)
    assert all(a.dtype == np.float32 for a in (*fwd.values(), *bwd.values()))
    pos = model.embeddings.position_embeddings.weight.detach().numpy()[:S]
    np.testing.assert_array_equal(fwd["embeddings"], embeds.astype(np.float32) + pos)
    np.testing.assert_array_equal(fwd["lm_head"], out["logits"])
    _, grads = BACKEND.forward_backward(model, {"inputs_embeds": embeds}, cot)
    assert rel(bwd["embeddings"], grads["inputs_embeds"]) <= 1e-6


@pytest.mark.skipif(not os.environ.get("XFORMER_TEST_ALL_MODES"),
                    reason="a cold torch.compile takes tens of seconds on 2 loaded cores; "
                           "set XFORMER_TEST_ALL_MODES=1")
def test_compiled_model_after_trace():
    """A model compiled before ``trace`` gives the same compiled outputs afterwards, and the
    trace (eager) agrees with them."""
    spec = SPECS["dec"].replace(n_layers=1)
    model, _ = built(spec)
    inputs = make_inputs(spec)
    cot = make_cotangents(model, inputs)
    compiled_before = BACKEND.forward(model, inputs, mode="compile")
    fwd, _ = BACKEND.trace(model, inputs, cot)
    compiled_after = BACKEND.forward(model, inputs, mode="compile")
    for k in compiled_before:
        np.testing.assert_array_equal(compiled_after[k], compiled_before[k])
    assert rel(fwd["lm_head"], compiled_before["logits"]) <= 1e-12
    outs, _ = BACKEND.forward_backward(model, inputs, cot, mode="compile")
    assert rel(outs["logits"], compiled_before["logits"]) <= 1e-12
    assert no_hooks(model)
