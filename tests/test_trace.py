"""Divergence localisation on every installed backend: ``Backend.trace`` records every node of
``spec.nodes()`` (its output and the gradient of the cotangent loss w.r.t. that output) in one
eager / imperative forward + backward pass, dropout off, leaving the model as it was.

Checked for an encoder (post-LN, embedding norm, token types, pooler), an encoder (pre-LN, final
norm), a decoder (pre-LN, tied LM head) and an encoder-decoder (post-LN, sinusoidal, shared and
tied tables), float64: node names, shapes and dtypes; output nodes against the model outputs and
their gradients against the cotangents (plus, where a hidden state also feeds a head, that
head's contribution in closed form); the embeddings' gradient against ``forward_backward``'s
``inputs_embeds`` gradient; central finite differences of the loss w.r.t. a perturbation added
to a node's output; node outputs against numpy and :mod:`xformer.reference`; the model unchanged
afterwards (outputs and gradients in every default mode, no probe left), also after a failed
trace; float32.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

from xformer import InputError, ModelSpec, random_weights
from xformer.backend import check_inputs
from xformer.reference import forward as reference_forward
from xformer.reference import layer_norm
from xformer.spec import sinusoidal_table
from backend_helpers import build_with, make_inputs, rel

TB, TS, TT = 3, 6, 5  # batch, (source) length, target length of an encoder-decoder
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


def case_weights(spec: ModelSpec) -> dict[str, np.ndarray]:
    """``random_weights`` with the LayerNorm weights moved away from 1 and biases from 0, so a
    mix-up shows."""
    rng = np.random.default_rng(2)
    return {k: v + 0.1 * rng.standard_normal(v.shape) if "norm" in k else v
            for k, v in random_weights(spec, 1).items()}


def trace_inputs(spec: ModelSpec, seed: int = 0, embeds: bool = False) -> dict:
    """Ids (or embeddings) and masks with trailing padding (every query keeps an allowed key, so
    finite differences are valid everywhere)."""
    def trailing(side: int, n: int) -> np.ndarray:
        mask = np.ones((TB, n), np.int64)
        mask[1 + side, n - 2:] = 0
        return mask

    t = TT if spec.architecture == "encoder-decoder" else TS
    return make_inputs(spec, seed, embeds, b=TB, s=TS, t=t, masks=trailing)


def make_cotangents(backend, model, inputs, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    out = backend.forward(model, inputs)
    return {k: rng.standard_normal(v.shape) for k, v in out.items()}


def loss_of(out: dict, cot: dict) -> float:
    return float(sum(np.sum(np.asarray(out[k], np.float64) * cot[k]) for k in cot))


def build(backend, spec, dtype="float64"):
    return build_with(backend, spec, case_weights(spec), dtype)


@functools.lru_cache(maxsize=None)
def _traced(backend, key: str) -> dict:
    spec = SPECS[key]
    model, weights = build(backend, spec)
    inputs = trace_inputs(spec)
    cot = make_cotangents(backend, model, inputs)
    # (a model compiled before the trace: test_model_left_as_it_was)
    outputs, grads = backend.forward_backward(model, inputs, cot, mode=backend.modes[0])
    fwd, bwd = backend.trace(model, inputs, cot)
    return dict(spec=spec, model=model, weights=weights, inputs=inputs, cot=cot,
                outputs=outputs, grads=grads, fwd=fwd, bwd=bwd)


@pytest.fixture
def traced(backend):
    """``traced(key)``: the traced case of ``SPECS[key]`` on this backend (one per session)."""
    return functools.partial(_traced, backend)


def last_node(spec: ModelSpec, side: str) -> str:
    n = spec.n_layers if side == "encoder" else spec.decoder_layers
    return f"{side}.final_norm" if spec.final_norm else f"{side}.layers.{n - 1}"


def output_nodes(spec: ModelSpec) -> dict[str, str]:
    """Model output -> the node that produces it."""
    arch = spec.architecture
    nodes = {"last_hidden_state": last_node(spec, "encoder" if arch == "encoder" else "decoder")}
    if spec.head == "pooler":
        nodes["pooler_output"] = "pooler"
    if arch == "encoder-decoder":
        nodes["encoder_last_hidden_state"] = last_node(spec, "encoder")
    if spec.head == "lm":
        nodes["logits"] = "lm_head"
    return nodes


# ---------------------------------------------------------------------- the probes
def submodule(backend, model, node: str):
    if backend.name == "torch":
        return model.get_submodule(node)
    if backend.name == "tensorflow":
        return backend.sublayer(model, node)
    return backend._submodule(model, node)


#: The method a framework calls on a (sub)module, which a probe may wrap.
CALL = {"torch": "forward", "tensorflow": "call", "mxnet": "forward"}


def probes_left(backend, model) -> list[str]:
    """Nodes that still carry a probe (a torch hook, a wrapped ``call`` / ``forward``)."""
    out = []
    for name, _ in model.spec.nodes():
        sub = submodule(backend, model, name)
        if backend.name == "torch":
            if sub._forward_hooks or sub._forward_pre_hooks:
                out.append(name)
        elif CALL[backend.name] in vars(sub):
            out.append(name)
    return out


@contextlib.contextmanager
def perturbed(backend, model, node: str, delta: np.ndarray):
    """``delta`` added to ``node``'s output (the first element where it returns a tuple) while
    inside, on the eager / imperative path."""
    sub = submodule(backend, model, node)
    if backend.name == "torch":
        import torch

        d = torch.from_numpy(delta)
        handle = sub.register_forward_hook(
            lambda m, a, out: (out[0] + d, *out[1:]) if isinstance(out, tuple) else out + d)
        try:
            yield
        finally:
            handle.remove()
        return
    if backend.name == "mxnet":
        import mxnet as mx

        d = mx.nd.array(delta, dtype="float64")
    else:
        d = delta
    method = CALL[backend.name]
    original = getattr(sub, method)

    def call(*args, **kwargs):
        out = original(*args, **kwargs)
        return (out[0] + d, *out[1:]) if isinstance(out, tuple) else out + d

    object.__setattr__(sub, method, call)
    try:
        yield
    finally:
        object.__delattr__(sub, method)


# ---------------------------------------------------------------------- names, shapes, outputs
@pytest.mark.parametrize("key", list(SPECS))
def test_nodes_shapes_and_outputs(traced, key):
    c = traced(key)
    spec, fwd, bwd = c["spec"], c["fwd"], c["bwd"]
    names = [n for n, _ in spec.nodes()]
    assert list(fwd) == names and list(bwd) == names
    # an encoder-decoder's target side (TT positions) starts at decoder_embeddings
    target = (names[names.index("decoder_embeddings"):]
              if spec.architecture == "encoder-decoder" else [])
    for n in names:
        t = TT if n in target else TS
        shape = {"pooler": (TB, spec.d_model), "lm_head": (TB, t, spec.vocab_size)}.get(
            n, (TB, t, spec.d_model))
        assert fwd[n].shape == shape and bwd[n].shape == shape, (n, fwd[n].shape, shape)
        assert fwd[n].dtype == np.float64 and bwd[n].dtype == np.float64, n
        assert np.isfinite(fwd[n]).all() and np.isfinite(bwd[n]).all(), n
        assert np.abs(bwd[n]).max() > 0, n  # every node reaches the loss
    for out, node in output_nodes(spec).items():  # bit for bit against the eager pass
        np.testing.assert_array_equal(fwd[node], c["outputs"][out], err_msg=f"{out} vs {node}")


@pytest.mark.parametrize("key", list(SPECS))
def test_output_node_gradients(traced, key):
    """Terminal nodes get exactly their cotangent; a hidden state that also feeds a head gets
    its cotangent plus the head's contribution (closed form); an encoder-decoder's memory also
    feeds every cross-attention."""
    c = traced(key)
    spec, fwd, bwd, cot, w = c["spec"], c["fwd"], c["bwd"], c["cot"], c["weights"]
    hidden = output_nodes(spec)["last_hidden_state"]
    if spec.head == "pooler":
        np.testing.assert_array_equal(bwd["pooler"], cot["pooler_output"])
        # pooler = tanh(x[:, 0] W^T + b): d/dx[:, 0] = ((1 - pooler^2) * c) W
        want = cot["last_hidden_state"].copy()
        want[:, 0] += ((1 - fwd["pooler"] ** 2) * cot["pooler_output"]) @ w["pooler.dense.weight"]
        np.testing.assert_array_equal(bwd[hidden][:, 1:], cot["last_hidden_state"][:, 1:])
        assert rel(bwd[hidden], want) <= 1e-14
    elif spec.head == "lm":
        np.testing.assert_array_equal(bwd["lm_head"], cot["logits"])
        # logits = x W^T: d/dx = c W
        want = cot["last_hidden_state"] + cot["logits"] @ w[spec.lm_head_name()]
        assert rel(bwd[hidden], want) <= 1e-14
    else:
        np.testing.assert_array_equal(bwd[hidden], cot["last_hidden_state"])
    if spec.architecture == "encoder-decoder":
        enc = output_nodes(spec)["encoder_last_hidden_state"]
        assert rel(bwd[enc], cot["encoder_last_hidden_state"]) > 1e-3


@pytest.mark.parametrize("key", list(SPECS))
def test_one_output_cotangent(backend, traced, key):
    """With a nonzero cotangent on one output only, that output's node gets exactly the
    cotangent, and nodes that do not reach it exact zeros; all-zero cotangents give zeros."""
    c = traced(key)
    spec, model, inputs, cot = c["spec"], c["model"], c["inputs"], c["cot"]
    names = [n for n, _ in spec.nodes()]
    zeros = {k: np.zeros_like(v) for k, v in cot.items()}
    for out, node in output_nodes(spec).items():
        _, bwd = backend.trace(model, inputs, {**zeros, out: cot[out]})
        np.testing.assert_array_equal(bwd[node], cot[out], err_msg=f"{out} -> {node}")
        unreached = [n for n in ("pooler", "lm_head") if n in names and n != node]
        if out == "encoder_last_hidden_state":  # the whole decoder side comes after
            unreached += names[names.index("decoder_embeddings"):]
        for n in unreached:
            assert not bwd[n].any(), (out, n)
        if node in ("pooler", "lm_head"):  # and everything before a head is reached
            assert all(bwd[n].any() for n in names), out
    _, zero = backend.trace(model, inputs, zeros)
    assert not any(g.any() for g in zero.values())


@pytest.mark.parametrize("key", ["enc_pre", "dec", "enc_dec"])
def test_embeddings_gradient_equals_inputs_embeds_gradient(backend, traced, key):
    """Without an embedding LayerNorm the embeddings output is ``inputs_embeds`` plus constant
    positions, so its gradient is ``forward_backward``'s ``inputs_embeds`` gradient (also through
    ``embed_scale``, which comes before ``inputs_embeds``), from ids and from embeddings."""
    c = traced(key)
    spec, model = c["spec"], c["model"]
    pairs = [("embeddings", "inputs_embeds")]
    if spec.architecture == "encoder-decoder":
        pairs.append(("decoder_embeddings", "decoder_inputs_embeds"))
    for node, grad in pairs:
        assert rel(c["bwd"][node], c["grads"][grad]) <= 1e-14, node
    inputs = trace_inputs(spec, seed=3, embeds=True)
    cot = make_cotangents(backend, model, inputs, seed=4)
    _, grads = backend.forward_backward(model, inputs, cot, mode=backend.modes[0])
    _, bwd = backend.trace(model, inputs, cot)
    for node, grad in pairs:
        assert rel(bwd[node], grads[grad]) <= 1e-14, ("embeds", node)


#: Nodes checked against finite differences (None: every node).
FD_NODES = {
    "enc_post": None,
    "dec": ["embeddings", "decoder.layers.0.norm1", "decoder.layers.1.self_attn",
            "decoder.layers.1", "lm_head"],
    "enc_dec": ["embeddings", "encoder.layers.0.ffn", "encoder.layers.1", "decoder_embeddings",
                "decoder.layers.0.self_attn", "decoder.layers.0.cross_attn",
                "decoder.layers.1.norm2", "decoder.layers.1.ffn", "decoder.layers.1.norm3",
                "lm_head"],
}


@pytest.mark.parametrize("key", list(FD_NODES))
def test_node_gradient_matches_finite_differences(backend, traced, key):
    """``<backward[node], v>`` == ``(L(out + h v) - L(out - h v)) / 2h``, the perturbation added
    to the node's output (h = 1e-5, float64)."""
    c = traced(key)
    spec, model, inputs, cot, bwd = c["spec"], c["model"], c["inputs"], c["cot"], c["bwd"]
    rng, h = np.random.default_rng(7), 1e-5
    for node in FD_NODES[key] or [n for n, _ in spec.nodes()]:
        v = rng.standard_normal(bwd[node].shape)
        values = []
        for sign in (1, -1):
            with perturbed(backend, model, node, sign * h * v):
                values.append(loss_of(backend.forward(model, inputs, mode=backend.modes[0]),
                                      cot))
        fd, analytic = (values[0] - values[1]) / (2 * h), float(np.sum(bwd[node] * v))
        assert abs(fd - analytic) <= 1e-7 * max(abs(analytic), 1.0), (node, fd, analytic)
    assert probes_left(backend, model) == []


# ---------------------------------------------------------------------- against numpy
def test_nodes_match_reference(traced):
    """``embeddings.norm`` from numpy (and ``embeddings``, after the dropout that is off, the
    same tensor); each layer's output from the reference of the spec cut after that layer; a
    post-LN layer is its last norm; the pooler on top; the encoder-decoder's scaled, shared
    embeddings plus sinusoidal positions on both sides."""
    c = traced("enc_post")
    spec, w, x, fwd, bwd = c["spec"], c["weights"], c["inputs"], c["fwd"], c["bwd"]
    summed = (w["embeddings.word_embeddings.weight"][x["input_ids"]]
              + w["embeddings.position_embeddings.weight"][:TS]
              + w["embeddings.token_type_embeddings.weight"][x["token_type_ids"]])
    want = layer_norm(summed, w["embeddings.norm.weight"], w["embeddings.norm.bias"],
                      spec.norm_eps)
    assert rel(fwd["embeddings.norm"], want) <= 1e-14
    np.testing.assert_array_equal(fwd["embeddings"], fwd["embeddings.norm"])
    np.testing.assert_array_equal(bwd["embeddings"], bwd["embeddings.norm"])
    checked = check_inputs(spec, x, "float64")
    for i in range(spec.n_layers):
        cut = spec.replace(n_layers=i + 1, head="none")
        sub = {p.name: w[p.name] for p in cut.parameters()}
        want = reference_forward(cut, sub, checked)["last_hidden_state"]
        assert rel(fwd[f"encoder.layers.{i}"], want) <= 1e-13, i
        np.testing.assert_array_equal(fwd[f"encoder.layers.{i}"], fwd[f"encoder.layers.{i}.norm2"])
        np.testing.assert_array_equal(bwd[f"encoder.layers.{i}"], bwd[f"encoder.layers.{i}.norm2"])
    pooled = np.tanh(fwd[f"encoder.layers.{spec.n_layers - 1}"][:, 0]
                     @ w["pooler.dense.weight"].T + w["pooler.dense.bias"])
    assert rel(fwd["pooler"], pooled) <= 1e-14
    c = traced("enc_dec")
    spec, w, x, fwd, bwd = c["spec"], c["weights"], c["inputs"], c["fwd"], c["bwd"]
    table = w["embeddings.word_embeddings.weight"]
    pe = sinusoidal_table(spec.max_len, spec.d_model)
    for node, ids in (("embeddings", "input_ids"), ("decoder_embeddings", "decoder_input_ids")):
        want = table[x[ids]] * np.sqrt(spec.d_model) + pe[:x[ids].shape[1]]
        assert rel(fwd[node], want) <= 1e-15, node
    np.testing.assert_array_equal(fwd["decoder.layers.0"], fwd["decoder.layers.0.norm3"])
    np.testing.assert_array_equal(bwd["decoder.layers.0"], bwd["decoder.layers.0.norm3"])


# ---------------------------------------------------------------------- the model afterwards
@pytest.mark.parametrize("key", ["enc_post", "enc_dec"])
def test_model_left_as_it_was(backend, key, monkeypatch):
    """Traced after running in every default mode: the same outputs (bit for bit) and gradients
    before and after, in every default mode, with dropout in the spec (off inside trace); no
    probe left, also after a trace that raised (bad cotangents, bad inputs, an error inside the
    model); a never-compiled model traces to the same numbers."""
    spec = SPECS[key].replace(dropout=0.1)
    model, _ = build(backend, spec)
    inputs = trace_inputs(spec, seed=7)
    cot = make_cotangents(backend, model, inputs, seed=8)
    before = {m: backend.forward(model, inputs, mode=m) for m in backend.default_modes}
    grads_before = backend.forward_backward(model, inputs, cot)[1]
    fwd, bwd = backend.trace(model, inputs, cot)
    for out, node in output_nodes(spec).items():  # dropout was off
        np.testing.assert_array_equal(fwd[node], before[backend.modes[0]][out])
        assert rel(fwd[node], before[backend.preferred_mode][out]) <= 1e-14, (out, node)
    with pytest.raises(InputError):
        backend.trace(model, inputs, {**cot, "no_such_output": cot["last_hidden_state"]})
    with pytest.raises(InputError):
        backend.trace(model, inputs, {k: v[:, :2] for k, v in cot.items()})
    with pytest.raises(InputError):
        backend.trace(model, {k: v[:1] for k, v in inputs.items()}, cot)
    head = submodule(backend, model, spec.nodes()[-1][0])

    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    with monkeypatch.context() as patch:  # fails inside the model, probes installed
        patch.setattr(type(head), CALL[backend.name], boom)
        with pytest.raises(RuntimeError, match="boom"):
            backend.trace(model, inputs, cot)
    assert probes_left(backend, model) == []
    for m, outs in before.items():
        after = backend.forward(model, inputs, mode=m)
        for k in outs:
            np.testing.assert_array_equal(after[k], outs[k], err_msg=f"{m} {k}")
    grads_after = backend.forward_backward(model, inputs, cot)[1]
    for k in grads_before:
        np.testing.assert_array_equal(grads_after[k], grads_before[k], err_msg=k)
    fresh, _ = build(backend, spec)
    fwd2, bwd2 = backend.trace(fresh, inputs, cot)
    for n in fwd:
        np.testing.assert_array_equal(fwd2[n], fwd[n], err_msg=n)
        np.testing.assert_array_equal(bwd2[n], bwd[n], err_msg=n)


def test_inputs_embeds_and_float32(backend):
    """``inputs_embeds`` in, float32 model: nodes in float32, ``embeddings`` == embeds +
    positions, ``lm_head`` == the logits of ``forward_backward`` (the same lowering) and its
    gradient the cotangent; ``forward``'s logits the same (MXNet: to float32 rounding)."""
    spec = SPECS["dec"]
    model, _ = build(backend, spec, "float32")
    rng = np.random.default_rng(3)
    embeds = rng.standard_normal((TB, TS, spec.d_model))
    out = backend.forward(model, {"inputs_embeds": embeds}, mode=backend.modes[0])
    cot = {k: rng.standard_normal(v.shape) for k, v in out.items()}
    fwd, bwd = backend.trace(model, {"inputs_embeds": embeds}, cot)
    assert all(a.dtype == np.float32 for a in (*fwd.values(), *bwd.values()))
    pos = backend.get_weights(model)["embeddings.position_embeddings.weight"][:TS]
    np.testing.assert_array_equal(fwd["embeddings"], embeds.astype(np.float32) + pos)
    np.testing.assert_array_equal(bwd["lm_head"], cot["logits"].astype(np.float32))
    outs, grads = backend.forward_backward(model, {"inputs_embeds": embeds}, cot,
                                           mode=backend.modes[0])
    np.testing.assert_array_equal(fwd["lm_head"], outs["logits"])
    assert rel(bwd["embeddings"], grads["inputs_embeds"]) <= 1e-6
    if backend.name == "mxnet":  # float32 LayerNorm: fused in inference, the GEMM form where
        assert rel(out["logits"], outs["logits"]) <= 1e-6  # differentiated (design §7)
    else:
        np.testing.assert_array_equal(out["logits"], outs["logits"])
