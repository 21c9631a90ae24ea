"""Unit tests of the PyTorch backend's decoders (``architecture="decoder"``, GPT-like) and
encoder-decoders (Vaswani 2017): native modules, outputs against :func:`xformer.reference.forward`,
gradients (finite differences, modes, the ``inputs_embeds`` paths), cached (incremental)
decoding with ``decode`` / ``reorder_cache``, and the independent references built from PyTorch's
own ``nn.TransformerEncoderLayer`` (causal) and ``nn.Transformer``.

Relative error is ``max|a - b| / max(max|a|, max|b|)`` per tensor (docs/conformance.md). The
gradient of a ``k_proj.bias`` (self- or cross-attention) is zero in exact arithmetic, so it is
measured against the scale of the same block's ``v_proj.bias`` gradient (as in
``test_backend_torch.py``).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from xformer import InputError, ModelSpec, random_weights
from xformer.backend import check_inputs, get_backend
from xformer.reference import forward as reference_forward
from xformer_torch.modules import DecoderModel, EncoderDecoderModel
from xformer_torch.reference_nn import nn_transformer_reference

BACKEND = get_backend("torch")
B, S, T = 4, 7, 6  # batch, source length, target (decoded) length
BASE = dict(vocab_size=37, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=9)
DEC = dict(BASE, architecture="decoder")
ED = dict(BASE, architecture="encoder-decoder")

#: Small specs that together take every value of every decoder / encoder-decoder field.
SPECS = {
    "gpt2": ModelSpec(**DEC, norm_position="pre", norm_eps=1e-5, activation="gelu_tanh",
                      embedding_norm=False, final_norm=True, tie_embeddings=True, head="lm"),
    "dec_post": ModelSpec(**DEC, activation="relu", positional="sinusoidal", embed_scale=True,
                          bias=False, head="lm"),
    "dec_none": ModelSpec(**DEC, norm_position="post", activation="gelu", final_norm=True,
                          head="none"),
    "vaswani": ModelSpec(**ED, n_decoder_layers=3, norm_eps=1e-5, activation="relu",
                         positional="sinusoidal", embedding_norm=False, embed_scale=True,
                         share_embeddings=True, tie_embeddings=True, head="lm"),
    "ed_pre": ModelSpec(**ED, n_decoder_layers=1, norm_position="pre", norm_eps=1e-6,
                        activation="gelu", final_norm=True, bias=False, head="lm"),
    "ed_none": ModelSpec(**ED, activation="gelu_tanh", share_embeddings=True, head="none"),
    "ed_tied_unshared": ModelSpec(**ED, norm_position="pre", activation="relu",
                                  embedding_norm=False, final_norm=True, tie_embeddings=True,
                                  head="lm"),
}


def rel(a, b, scale=None) -> float:
    """``max|a - b| / max(max|a|, max|b|)`` (or ``/ scale``)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if scale is None:
        scale = max(np.abs(a).max(), np.abs(b).max())
    return float(np.abs(a - b).max() / scale) if scale else float(np.abs(a - b).max())


def max_rel(got: dict, want: dict) -> tuple[float, str]:
    """Worst relative error over the tensors of ``want`` and its name."""
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {}
    for k in want:
        scale = None
        if k.endswith("attn.k_proj.bias"):
            scale = np.abs(np.asarray(want[k.replace("k_proj", "v_proj")])).max()
        errs[k] = rel(got[k], want[k], scale)
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def mask_of(t: int, full_pad: bool = True) -> np.ndarray:
    """Row 0 attends everywhere, row 1 is padded at the end, row 2 at the start, row 3 fully.

    Without ``full_pad`` (for finite differences) rows 2 and 3 are padded in the middle: under a
    causal mask a padded *first* position leaves its query no allowed key, which then attends
    uniformly over all keys exactly like a fully padded row, and breaks finite differences the
    same way (docs/conformance.md)."""
    m = np.ones((B, t), np.int64)
    m[1, t - 2:] = 0
    if full_pad:
        m[2, :2] = 0
        m[3] = 0
    else:
        m[2, 1:3] = 0
        m[3, 2:4] = 0
    return m


def make_inputs(spec: ModelSpec, seed: int = 0, embeds: bool = False,
                full_pad: bool = True) -> dict:
    """Decoder: ``input_ids`` (B, T); encoder-decoder: source (B, S) and target (B, T); or the
    embeddings instead of the ids."""
    rng = np.random.default_rng(seed)
    sides = [("", S if spec.architecture == "encoder-decoder" else T)]
    if spec.architecture == "encoder-decoder":
        sides.append(("decoder_", T))
    inputs = {}
    for prefix, t in sides:
        inputs[f"{prefix}attention_mask"] = mask_of(t, full_pad)
        if embeds:
            inputs[f"{prefix}inputs_embeds"] = rng.standard_normal((B, t, spec.d_model))
        else:
            inputs[f"{prefix}input_ids"] = rng.integers(0, spec.vocab_size, (B, t))
    return inputs


def cotangents(spec: ModelSpec, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    shapes = {"last_hidden_state": (B, T, spec.d_model), "logits": (B, T, spec.vocab_size),
              "encoder_last_hidden_state": (B, S, spec.d_model)}
    return {k: rng.standard_normal(shapes[k]) for k in spec.output_names()}


def built(spec: ModelSpec, dtype: str = "float64", seed: int = 0):
    weights = random_weights(spec, seed, "float64")
    model = BACKEND.build(spec, dtype)
    BACKEND.set_weights(model, weights)
    return model, weights


def reference(spec, weights, inputs) -> dict:
    return reference_forward(spec, weights, check_inputs(spec, inputs, "float64"), "float64")


def loss(model, inputs, cot) -> float:
    out = BACKEND.forward(model, inputs)
    return float(sum(np.sum(out[k] * cot[k]) for k in cot))


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", SPECS)
def test_canonical_names_and_classes(name):
    """state_dict keys are the canonical names, in order: a tied LM head and a shared target
    table add no second key."""
    spec = SPECS[name]
    model = BACKEND.build(spec, "float32")
    cls = DecoderModel if spec.architecture == "decoder" else EncoderDecoderModel
    assert type(model) is cls
    names = [p.name for p in spec.parameters()]
    assert list(model.state_dict()) == names
    assert [n for n, _ in model.named_parameters()] == names
    assert list(BACKEND.get_weights(model)) == names
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == spec.parameter_shapes()


# ---------------------------------------------------------------------- forward vs numpy
@pytest.mark.parametrize("name", SPECS)
def test_forward_matches_reference_float64(name):
    spec = SPECS[name]
    model, weights = built(spec)
    inputs = make_inputs(spec)
    want = reference(spec, weights, inputs)
    out = BACKEND.forward(model, inputs)
    assert list(out) == list(spec.output_names())
    assert all(v.dtype == np.float64 for v in out.values())
    err, worst = max_rel(out, want)
    assert err <= 1e-12, (worst, err)
    # the fully padded row (uniform attention over all keys) is finite in outputs and gradients
    outs, grads = BACKEND.forward_backward(model, inputs, cotangents(spec))
    assert set(grads) == {*spec.parameter_shapes(), *spec.input_embeds_names()}
    assert all(np.isfinite(v).all() for v in outs.values())
    assert all(np.isfinite(g).all() for g in grads.values())
    assert all(grads[k].shape == s for k, s in spec.parameter_shapes().items())
    assert max_rel(outs, want)[0] <= 1e-12


@pytest.mark.parametrize("name", ["gpt2", "dec_post", "vaswani", "ed_pre"])
def test_forward_float32(name):
    spec = SPECS[name]
    model, weights = built(spec, "float32")
    inputs = make_inputs(spec)
    out = BACKEND.forward(model, inputs)
    assert all(v.dtype == np.float32 for v in out.values())
    err, worst = max_rel(out, reference(spec, weights, inputs))
    assert err <= 1e-5, (worst, err)


def test_causal_mask_semantics():
    """The decoder output at position i does not depend on tokens after i; a query with no
    allowed key (a padded position before the first real token, a fully padded row) attends
    uniformly over ALL keys (one finfo.min bias from the product of the masks), so it does
    see later tokens, as in xformer.reference."""
    spec = SPECS["dec_post"]
    model, _ = built(spec)
    inputs = make_inputs(spec)
    changed = {**inputs, "input_ids": inputs["input_ids"].copy()}
    changed["input_ids"][:, 4] = (changed["input_ids"][:, 4] + 1) % spec.vocab_size
    a = BACKEND.forward(model, inputs)["last_hidden_state"]
    b = BACKEND.forward(model, changed)["last_hidden_state"]
    np.testing.assert_array_equal(a[:2, :4], b[:2, :4])
    np.testing.assert_array_equal(a[2, 2:4], b[2, 2:4])  # row 2 is padded at positions 0, 1
    assert not np.allclose(a[:3, 4:], b[:3, 4:])
    assert not np.allclose(a[2, 0], b[2, 0])  # no allowed key: uniform over all T keys
    assert not np.allclose(a[3, 0], b[3, 0])  # fully padded row: the same


# ---------------------------------------------------------------------- gradients
def _finite_differences(model, weights, inputs, cot, names, rng, h=1e-5):
    _, grads = BACKEND.forward_backward(model, inputs, cot)
    for name in names:
        d = rng.standard_normal(weights[name].shape)
        values = []
        for sign in (1, -1):
            BACKEND.set_weights(model, {**weights, name: weights[name] + sign * h * d})
            values.append(loss(model, inputs, cot))
        fd, analytic = (values[0] - values[1]) / (2 * h), float(np.sum(grads[name] * d))
        assert abs(fd - analytic) <= 1e-6 * abs(analytic), (name, fd, analytic)
    BACKEND.set_weights(model, weights)


def _finite_differences_embeds(model, inputs, cot, rng, h=1e-5):
    _, grads = BACKEND.forward_backward(model, inputs, cot)
    for key in model.spec.input_embeds_names():
        e = inputs[key]
        d = rng.standard_normal(e.shape)
        fd = (loss(model, {**inputs, key: e + h * d}, cot)
              - loss(model, {**inputs, key: e - h * d}, cot)) / (2 * h)
        analytic = float(np.sum(grads[key] * d))
        assert abs(fd - analytic) <= 1e-6 * abs(analytic), (key, fd, analytic)


TINY_DEC = ModelSpec(architecture="decoder", vocab_size=11, d_model=8, n_heads=2, d_ff=12,
                     n_layers=1, max_len=T, norm_position="pre", activation="gelu",
                     final_norm=True, tie_embeddings=True, head="lm", norm_eps=1e-6)
TINY_ED = ModelSpec(architecture="encoder-decoder", vocab_size=11, d_model=8, n_heads=2, d_ff=12,
                    n_layers=1, max_len=S, activation="gelu_tanh", embed_scale=True,
                    head="lm", norm_eps=1e-6)


@pytest.mark.parametrize("spec", [TINY_DEC, TINY_ED], ids=["decoder", "encoder-decoder"])
def test_gradients_match_finite_differences(spec):
    """Directional central differences against ``<grad, d>``, float64, partial padding only (a
    fully padded row breaks finite differences: docs/conformance.md)."""
    model, weights = built(spec)
    cot, rng = cotangents(spec), np.random.default_rng(5)
    inputs = make_inputs(spec, full_pad=False)
    if spec.architecture == "decoder":  # tied: the table gets the lookup and the LM head
        names = ["embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
                 "decoder.layers.0.self_attn.q_proj.weight", "decoder.layers.0.norm1.weight",
                 "decoder.layers.0.ffn.linear1.bias", "decoder.final_norm.bias"]
    else:
        names = ["lm_head.weight", "embeddings.word_embeddings.weight",
                 "decoder_embeddings.word_embeddings.weight",
                 "decoder_embeddings.position_embeddings.weight",
                 "encoder.layers.0.self_attn.k_proj.weight",
                 "decoder.layers.0.cross_attn.q_proj.weight",
                 "decoder.layers.0.cross_attn.k_proj.weight",
                 "decoder.layers.0.cross_attn.v_proj.bias", "decoder.layers.0.norm2.weight",
                 "decoder.layers.0.norm3.bias"]
    _finite_differences(model, weights, inputs, cot, names, rng)
    _finite_differences_embeds(model, make_inputs(spec, embeds=True, full_pad=False), cot, rng)


@pytest.mark.parametrize("name", ["gpt2", "vaswani", "ed_tied_unshared"])
def test_inputs_embeds_path_equals_input_ids_path(name):
    """Same outputs and gradients; the token table's gradient through the ids path is the
    embeddings path's (the tied LM head's share, if any) plus the scatter-add of
    d/d(embeds) * scale for every side that looks it up."""
    spec = SPECS[name]
    model, weights = built(spec)
    by_ids = make_inputs(spec)
    scale = np.sqrt(spec.d_model) if spec.embed_scale else 1.0
    by_embeds, lookups = dict(by_ids), {}
    for side, prefix in zip(("encoder", "decoder"), ("", "decoder_")):
        if f"{prefix}input_ids" not in by_ids:
            continue
        table = spec.word_embedding_name(side)
        ids = by_embeds.pop(f"{prefix}input_ids")
        by_embeds[f"{prefix}inputs_embeds"] = weights[table][ids] * scale
        lookups.setdefault(table, []).append((ids, f"{prefix}inputs_embeds"))
    cot = cotangents(spec)
    out_i, g_i = BACKEND.forward_backward(model, by_ids, cot)
    out_e, g_e = BACKEND.forward_backward(model, by_embeds, cot)
    assert max_rel(out_e, out_i)[0] <= 1e-12
    assert set(g_i) == set(g_e) == {*spec.parameter_shapes(), *spec.input_embeds_names()}
    err, worst = max_rel({k: v for k, v in g_e.items() if k not in lookups},
                         {k: v for k, v in g_i.items() if k not in lookups})
    assert err <= 1e-12, (worst, err)
    for table, uses in lookups.items():
        want = g_e[table].copy()  # the LM head's share (zero when untied)
        assert want.any() == (spec.tie_embeddings and table == spec.lm_head_name())
        for ids, key in uses:
            np.add.at(want, ids, g_i[key] * scale)
        assert rel(g_i[table], want) <= 1e-12, table


@pytest.mark.parametrize("name", [
    "gpt2",
    pytest.param("vaswani", marks=pytest.mark.skipif(
        not os.environ.get("XFORMER_TEST_ALL_MODES"),
        reason="cold torch.compile of an encoder-decoder takes ~90 s on 2 loaded cores "
               "(~2 s with a warm inductor cache); set XFORMER_TEST_ALL_MODES=1")),
])
def test_compile_mode_matches_eager(name):
    """torch.compile (fwd + bwd) == eager <= 1e-12, float64; decode afterwards still works."""
    spec = SPECS[name].replace(n_layers=1, **({"n_decoder_layers": 1}
                                              if SPECS[name].n_decoder_layers else {}))
    model, _ = built(spec)
    inputs, cot = make_inputs(spec), cotangents(spec)
    outs = {m: BACKEND.forward_backward(model, inputs, cot, mode=m) for m in BACKEND.modes}
    first = BACKEND.modes[0]
    for mode in BACKEND.modes[1:]:
        assert max_rel(outs[mode][0], outs[first][0])[0] <= 1e-12, mode
        err, worst = max_rel(outs[mode][1], outs[first][1])
        assert err <= 1e-12, (mode, worst, err)
    assert list(model.state_dict()) == [p.name for p in spec.parameters()]
    # decoding after a compiled run: eager on the same module, same numbers
    logits, _ = BACKEND.decode(model, inputs)
    assert rel(logits, outs[first][0]["logits"]) <= 1e-12


# ---------------------------------------------------------------------- cached decoding
def _decode_all(model, inputs, key, mask_key, prompt: int, perm: np.ndarray, at: int):
    """Prompt of ``prompt`` tokens, then one token per call; after position ``at`` the cache is
    reordered by ``perm`` and the rest of the (permuted) batch is decoded."""
    first = {k: v for k, v in inputs.items() if k not in (key, mask_key)}
    first.update({key: inputs[key][:, :prompt], mask_key: inputs[mask_key][:, :prompt]})
    logits, cache = BACKEND.decode(model, first)
    steps = [logits]
    ids, mask = inputs[key], inputs[mask_key]
    for t in range(prompt, ids.shape[1]):
        if t == at:
            cache = BACKEND.reorder_cache(model, cache, perm)
            steps = [s[perm] for s in steps]
            ids, mask = ids[perm], mask[perm]
        step = {key: ids[:, t:t + 1]}
        if t % 2:  # a left-out mask means: cached mask kept, the new position attends
            step[mask_key] = mask[:, :t + 1]
        logits, cache = BACKEND.decode(model, step, cache)
        steps.append(logits)
    return np.concatenate(steps, axis=1), cache


@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("name", ["gpt2", "dec_post", "vaswani", "ed_pre"])
def test_cached_decoding_equals_full_forward(name, dtype, tol):
    """Prompt + one token at a time == one full forward pass, with the cache reordered by a
    permutation half-way (the full pass then runs on the permuted batch). Decoded-side masks
    pad at the end (row 1) and, for even positions only, not at all: a left-out mask on a step
    means ones, so padding must be given where it is (here: the odd steps)."""
    spec = SPECS[name]
    model, _ = built(spec, dtype)
    inputs = make_inputs(spec)
    enc_dec = spec.architecture == "encoder-decoder"
    key, mask_key = ("decoder_input_ids", "decoder_attention_mask") if enc_dec else (
        "input_ids", "attention_mask")
    mask = np.ones((B, T), np.int64)
    mask[1, 3] = mask[1, 5] = 0  # padding at odd positions, where the step passes a mask
    inputs[mask_key] = mask
    perm = np.array([2, 0, 3, 1])
    got, cache = _decode_all(model, inputs, key, mask_key, prompt=2, perm=perm, at=4)
    want = BACKEND.forward(model, {k: v[perm] for k, v in inputs.items()})["logits"]
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    assert rel(got, want) <= tol, rel(got, want)
    # the cache: per layer self k, v (B, H, T, d_head) (+ cross k, v (B, H, S, d_head))
    assert cache.past_length == T and len(cache.past_key_values) == spec.decoder_layers
    for layer in cache.past_key_values:
        assert [tuple(x.shape) for x in layer[:2]] == [(B, spec.n_heads, T, spec.d_head)] * 2
        if enc_dec:
            assert len(layer) == 4
            assert tuple(layer[2].shape) == (B, spec.n_heads, S, spec.d_head)


def test_cached_decoding_left_padding_and_beams():
    """A left-padded prompt: every position with a real token so far matches the full pass
    (padded query positions before the first token see no key in the cache and attend
    uniformly over what is there, a different set than the full pass: not compared). A beam
    reorder that duplicates and drops rows changes the batch size."""
    spec = SPECS["gpt2"]
    model, _ = built(spec)
    inputs = make_inputs(spec, full_pad=False)
    inputs["attention_mask"][3] = 1  # the step masks are left out: padding only in the prompt
    inputs["attention_mask"][1] = [0, 0, 0, 1, 1, 1]
    prompt = 4
    logits, cache = BACKEND.decode(model, {k: v[:, :prompt] for k, v in inputs.items()})
    steps = [logits]
    for t in range(prompt, T):
        logits, cache = BACKEND.decode(model, {"input_ids": inputs["input_ids"][:, t:t + 1]},
                                       cache)
        steps.append(logits)
    got = np.concatenate(steps, 1)
    want = BACKEND.forward(model, inputs)["logits"]
    valid = np.cumsum(inputs["attention_mask"], 1) > 0
    assert rel(got[valid], want[valid]) <= 1e-12
    beams = np.array([0, 0, 2, 1, 1, 3])
    reordered = BACKEND.reorder_cache(model, cache, beams)
    assert reordered.batch_size == 6 and reordered.past_length == T
    with pytest.raises(InputError, match="cache holds 6 rows"):
        BACKEND.decode(model, {"input_ids": np.zeros((4, 1), np.int64)}, reordered)
    with pytest.raises(InputError, match="beam_idx"):
        BACKEND.reorder_cache(model, cache, np.array([0, 7]))


@pytest.mark.parametrize("name", ["gpt2", "vaswani"])
def test_decoding_past_max_len_raises(name):
    spec = SPECS[name]
    model, _ = built(spec)
    enc_dec = spec.architecture == "encoder-decoder"
    key = "decoder_input_ids" if enc_dec else "input_ids"
    first = {key: np.zeros((2, spec.max_len - 1), np.int64)}
    if enc_dec:
        first["input_ids"] = np.zeros((2, 3), np.int64)
    _, cache = BACKEND.decode(model, first)
    _, cache = BACKEND.decode(model, {key: np.zeros((2, 1), np.int64)}, cache)  # == max_len
    with pytest.raises(InputError, match="9 cached \\+ 1 new positions is longer than max_len"):
        BACKEND.decode(model, {key: np.zeros((2, 1), np.int64)}, cache)
    with pytest.raises(InputError, match="longer than max_len"):  # the native module too
        native = {"past_key_values": cache.past_key_values}
        if enc_dec:
            native["attention_mask"] = cache.encoder_attention_mask
        model(**{key: torch.zeros(2, 1, dtype=torch.long)}, **native)


def test_decode_needs_lm_head():
    model, _ = built(SPECS["dec_none"])
    with pytest.raises(InputError, match="head = 'lm'"):
        BACKEND.decode(model, {"input_ids": np.zeros((1, 2), np.int64)})


def test_greedy_generate_matches_uncached_argmax():
    """The shared generate() over this backend's cache picks what step-by-step full forward
    passes pick."""
    spec = SPECS["dec_post"]
    model, _ = built(spec)
    prompt = np.random.default_rng(3).integers(0, spec.vocab_size, (2, 3))
    got = BACKEND.generate(model, prompt, max_new_tokens=4)
    seq = prompt
    for _ in range(4):
        nxt = BACKEND.forward(model, {"input_ids": seq})["logits"][:, -1].argmax(-1)
        seq = np.concatenate([seq, nxt[:, None]], 1)
    assert got == seq[:, 3:].tolist()


# ---------------------------------------------------------------------- nn.* references
NN_SPECS = {
    "dec_post_relu": SPECS["dec_post"],
    "dec_pre_gelu": SPECS["gpt2"].replace(activation="gelu"),
    "dec_post_gelu_none": SPECS["dec_none"],
    "ed_post_relu": SPECS["vaswani"],
    "ed_pre_gelu": SPECS["ed_pre"],
    "ed_pre_relu_tied": SPECS["ed_tied_unshared"],
    "ed_post_gelu_tanh_none": SPECS["ed_none"],
}


@pytest.mark.parametrize("name", NN_SPECS)
def test_nn_reference_agrees(name):
    """Outputs and every gradient (incl. ``inputs_embeds`` / ``decoder_inputs_embeds``, with the
    embeddings looked up outside the reference as conformance does) <= 1e-11, float64, with
    a fully padded row on each side."""
    spec = NN_SPECS[name]
    model, weights = built(spec)
    ref = nn_transformer_reference(spec, weights, "float64")
    assert ref.to_canonical(ref.state_dict()).keys() == weights.keys()
    inputs, cot = make_inputs(spec), cotangents(spec)
    outs, grads = BACKEND.forward_backward(model, inputs, cot)

    scale = spec.d_model ** 0.5 if spec.embed_scale else 1.0
    kwargs, embeds = {}, {}
    for prefix, table in (("", "word_embeddings"), ("decoder_", "decoder_word_embeddings")):
        if f"{prefix}input_ids" not in inputs:
            continue
        e = torch.nn.functional.embedding(torch.from_numpy(inputs[f"{prefix}input_ids"]),
                                          getattr(ref, table)) * scale
        embeds[f"{prefix}inputs_embeds"] = e
        kwargs[f"{prefix}attention_mask"] = torch.from_numpy(inputs[f"{prefix}attention_mask"])
    ref_out = ref(**embeds, **kwargs)
    params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad([ref_out[k] for k in cot],
                                    [*embeds.values(), *params.values()],
                                    [torch.from_numpy(cot[k]) for k in cot], allow_unused=True)
    native = {n: (g if g is not None else torch.zeros_like(p))
              for (n, p), g in zip(params.items(), ref_grads[len(embeds):])}
    want = {k: v.numpy() for k, v in ref.to_canonical(native).items()}
    want.update({k: g.numpy() for k, g in zip(embeds, ref_grads)})
    err, worst = max_rel(outs, {k: v.detach().numpy() for k, v in ref_out.items()})
    assert err <= 1e-11, (worst, err)
    assert set(want) == set(grads)
    err, worst = max_rel(grads, want)
    assert err <= 1e-11, (worst, err)
    # and through the ids path inside the reference, in eval + no_grad (no fast path taken)
    with torch.no_grad():
        again = ref.eval()(**{k: torch.from_numpy(v) for k, v in inputs.items()})
    assert max_rel({k: v.numpy() for k, v in again.items()}, outs)[0] <= 1e-11
