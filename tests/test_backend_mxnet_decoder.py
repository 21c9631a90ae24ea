"""Unit tests of the MXNet Gluon backend's decoder and encoder-decoder (``DecoderModel``,
``EncoderDecoderModel``) against ``xformer.reference``, and of cached decoding.

float64: outputs within 1e-12 (relative to the largest magnitude) of the numpy reference, every
mode equal to the first within 1e-12, gradients within 1e-6 of central finite differences,
cached decoding equal to the full forward within 1e-12. float32: outputs and cached decoding
within 1e-5, gradients within 1e-4 of float64. MXNet is imported once, at module level.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from xformer import InputError, ModelSpec, random_weights, reference
from xformer.backend import check_inputs

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer_mxnet.backend import MXNetBackend  # noqa: E402
from xformer_mxnet import modules  # noqa: E402

mx = modules.mx
BE = MXNetBackend()

_SMALL = dict(vocab_size=40, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=10)
_DEC = dict(architecture="decoder", **_SMALL)
_ED = dict(architecture="encoder-decoder", **_SMALL)
#: Together they take every value of every decoder / encoder-decoder field.
SPECS = {
    "gpt2": ModelSpec(**_DEC, norm_position="pre", activation="gelu_tanh", positional="learned",
                      embedding_norm=False, final_norm=True, embed_scale=False, bias=True,
                      tie_embeddings=True, head="lm", norm_eps=1e-5),
    "dec-post": ModelSpec(**_DEC, norm_position="post", activation="relu",
                          positional="sinusoidal", embedding_norm=True, final_norm=False,
                          embed_scale=True, bias=False, tie_embeddings=False, head="lm",
                          norm_eps=1e-12),
    "dec-none": ModelSpec(**_DEC, norm_position="post", activation="gelu", head="none"),
    "vaswani": ModelSpec(**{**_ED, "n_heads": 2}, n_decoder_layers=3, norm_position="post",
                         activation="relu", positional="sinusoidal", embedding_norm=False,
                         final_norm=False, embed_scale=True, bias=True, share_embeddings=True,
                         tie_embeddings=True, head="lm", norm_eps=1e-5),
    "ed-pre": ModelSpec(**_ED, n_decoder_layers=1, norm_position="pre", activation="gelu",
                        positional="learned", embedding_norm=True, final_norm=True,
                        embed_scale=False, bias=False, share_embeddings=False,
                        tie_embeddings=True, head="lm", norm_eps=1e-12),
    "ed-untied": ModelSpec(**_ED, norm_position="post", activation="gelu_tanh",
                           positional="learned", embedding_norm=True, share_embeddings=True,
                           tie_embeddings=False, head="lm", norm_eps=1e-5),
    "ed-none": ModelSpec(**_ED, norm_position="pre", activation="gelu", final_norm=True,
                         embedding_norm=False, head="none"),
}
_TINY = dict(vocab_size=12, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=6)
TINY = {
    "tiny-dec": ModelSpec(architecture="decoder", **_TINY, norm_position="pre",
                          activation="gelu", final_norm=True, embed_scale=True, head="lm"),
    "tiny-ed": ModelSpec(architecture="encoder-decoder", **_TINY, n_decoder_layers=2,
                         activation="gelu_tanh", positional="sinusoidal", embed_scale=True,
                         share_embeddings=True, tie_embeddings=True, head="lm"),
}
ALL = {**SPECS, **TINY}
DECODING = ["gpt2", "dec-post", "vaswani", "ed-pre"]


def rel(a, b, floor: float = 0.0) -> float:
    """max|a - b| / max(max|a|, max|b|, floor): the conformance metric (``floor`` for tensors
    that are analytically zero, where the ratio of two rounding noises means nothing)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.abs(a).max()), float(np.abs(b).max()), floor)
    return float(np.abs(a - b).max() / scale) if scale else 0.0


def is_k_bias(name: str) -> bool:
    """A key projection's bias adds ``q . b_k`` to every score of a row: softmax ignores it, so
    its gradient is exactly 0 in exact arithmetic (rounding noise in practice)."""
    return name.endswith("_attn.k_proj.bias")


def pad_mask(b: int, t: int, full_pad: bool) -> np.ndarray:
    """Row 0 attends everywhere, rows 1.. are padded at the end (row 1 from ``t - 2``, row 2
    from 3), and (``full_pad``) the last row is fully padded."""
    mask = np.ones((b, t))
    mask[1, t - 2:] = 0
    mask[2, 3:] = 0
    if full_pad:
        mask[-1, :] = 0
    return mask


def make_inputs(spec: ModelSpec, seed: int = 1, b: int = 4, t: int = 7,
                full_pad: bool = True) -> dict:
    """Random ids and padding masks (a fully padded row with ``full_pad``) on every side; the
    target of an encoder-decoder is ``t - 2`` long."""
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, spec.vocab_size, (b, t)),
              "attention_mask": pad_mask(b, t, full_pad)}
    if spec.architecture == "encoder-decoder":
        inputs["decoder_input_ids"] = rng.integers(0, spec.vocab_size, (b, t - 2))
        inputs["decoder_attention_mask"] = pad_mask(b, t - 2, full_pad)
    return inputs


def cotangents(spec: ModelSpec, inputs: dict, seed: int = 2) -> dict:
    rng = np.random.default_rng(seed)
    b, s = inputs["attention_mask"].shape
    t = inputs.get("decoder_attention_mask", inputs["attention_mask"]).shape[1]
    d, v = spec.d_model, spec.vocab_size
    shapes = {"last_hidden_state": (b, t, d), "encoder_last_hidden_state": (b, s, d),
              "logits": (b, t, v)}
    return {name: rng.standard_normal(shapes[name]) for name in spec.output_names()}


def scale_of(spec: ModelSpec) -> float:
    return math.sqrt(spec.d_model) if spec.embed_scale else 1.0


def embeds_of(spec: ModelSpec, weights: dict, inputs: dict) -> dict:
    """The same inputs with ``(decoder_)inputs_embeds`` (scaled lookups) in place of ids."""
    out = {k: v for k, v in inputs.items() if not k.endswith("input_ids")}
    for prefix, side in (("", "encoder"), ("decoder_", "decoder")):
        if f"{prefix}input_ids" in inputs:
            table = weights[spec.word_embedding_name(side)]
            out[f"{prefix}inputs_embeds"] = table[inputs[f"{prefix}input_ids"]] * scale_of(spec)
    return out


def reference_outputs(spec: ModelSpec, inputs: dict, weights=None) -> dict:
    weights = random_weights(spec, seed=0) if weights is None else weights
    return reference.forward(spec, weights, check_inputs(spec, inputs, "float64"), "float64")


_MODELS: dict = {}


def model_for(key: str, dtype: str = "float64"):
    """A built model with ``random_weights`` loaded, shared by the tests (they do not mutate
    its weights, except the finite-difference test, which restores them)."""
    if (key, dtype) not in _MODELS:
        spec = ALL[key]
        model = BE.build(spec, dtype)
        BE.set_weights(model, random_weights(spec, seed=0, dtype="float64"))
        _MODELS[key, dtype] = model
    return _MODELS[key, dtype]


# ---------------------------------------------------------------------- weights
@pytest.mark.parametrize("key", SPECS)
def test_canonical_names_and_shapes(key):
    spec = SPECS[key]
    model = BE.build(spec, "float32")
    weights = BE.get_weights(model)
    assert list(weights) == [p.name for p in spec.parameters()]
    assert {k: v.shape for k, v in weights.items()} == spec.parameter_shapes()
    # a tied LM head / shared table is one Gluon Parameter, not a second one
    trainable = [p for p in model.collect_params().values() if p.grad_req != "null"]
    assert len(trainable) == len(weights)
    assert isinstance(model, {"decoder": modules.DecoderModel,
                              "encoder-decoder": modules.EncoderDecoderModel}[spec.architecture])


@pytest.mark.parametrize("key", ["gpt2", "ed-pre"])
def test_weights_round_trip(key):
    spec = SPECS[key]
    weights = random_weights(spec, seed=3, dtype="float64")
    model = BE.build(spec, "float64")
    BE.set_weights(model, weights)
    back = BE.get_weights(model)
    assert list(back) == list(weights)
    for name, value in weights.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


# ---------------------------------------------------------------------- forward vs reference
@pytest.mark.parametrize("key", SPECS)
def test_forward_float64_matches_reference(key):
    spec, model = SPECS[key], model_for(key)
    inputs = make_inputs(spec)
    ref = reference_outputs(spec, inputs)
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
    ref = reference_outputs(spec, inputs)
    for mode in BE.modes:
        out = BE.forward(model, inputs, mode=mode)
        for name in out:
            assert out[name].dtype == np.float32
            assert rel(out[name], ref[name]) <= 1e-5, (mode, name, rel(out[name], ref[name]))


@pytest.mark.parametrize("key", ["gpt2", "vaswani"])
def test_float32_grads_match_float64(key):
    spec = SPECS[key]
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    _, g64 = BE.forward_backward(model_for(key), inputs, cot)
    _, g32 = BE.forward_backward(model_for(key, "float32"), inputs, cot)
    scale = max(float(np.abs(g).max()) for g in g64.values())
    for name in g64:
        assert g32[name].dtype == np.float32
        if is_k_bias(name):  # analytically zero: float32 noise ~1e-7 of the largest gradient
            assert np.abs(g32[name]).max() <= 1e-5 * scale, name
            assert np.abs(g64[name]).max() <= 1e-13 * scale, name
            continue
        assert rel(g32[name], g64[name]) <= 1e-4, (name, rel(g32[name], g64[name]))


def test_causal_mask_and_fully_padded_row():
    """Changing a later token never changes earlier positions; a fully padded row attends
    uniformly over all keys (reference semantics: one finfo.min bias), without NaN."""
    spec, model = SPECS["gpt2"], model_for("gpt2")
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 6))
    changed = ids.copy()
    changed[:, 4] = (changed[:, 4] + 1) % spec.vocab_size
    a = BE.forward(model, {"input_ids": ids})["logits"]
    b = BE.forward(model, {"input_ids": changed})["logits"]
    np.testing.assert_array_equal(a[:, :4], b[:, :4])
    assert rel(a[:, 4:], b[:, 4:]) > 1e-3
    mask = np.zeros((2, 6))
    out = BE.forward(model, {"input_ids": ids, "attention_mask": mask})["logits"]
    ref = reference_outputs(spec, {"input_ids": ids, "attention_mask": mask})["logits"]
    assert np.isfinite(out).all() and rel(out, ref) <= 1e-12


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("key", SPECS)
def test_modes_and_input_paths_agree(key):
    """Every mode, and (decoder_)inputs_embeds vs ids, give the same outputs and gradients; no
    NaN with a fully padded row. Through the embeddings path a token table gets only what the
    model itself gives it (the tied LM head's part): the lookups' part is the scatter-add of
    the embeddings' gradients, which is checked too."""
    spec, model = SPECS[key], model_for(key)
    weights = random_weights(spec, seed=0)
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    embeds = embeds_of(spec, weights, inputs)
    out0, grads0 = BE.forward_backward(model, inputs, cot, mode=BE.modes[0])
    assert list(grads0) == [p.name for p in spec.parameters()] + list(spec.input_embeds_names())
    for name, g in grads0.items():
        assert np.isfinite(g).all(), name
        if not is_k_bias(name):
            assert np.abs(g).max() > 0, name  # the loss reaches every weight
    lookup = {}  # what the lookups give each token table: scatter-add of the embeddings' grads
    for prefix, side in (("", "encoder"), ("decoder_", "decoder")):
        if f"{prefix}input_ids" in inputs:
            name = spec.word_embedding_name(side)
            part = lookup.setdefault(name, np.zeros_like(weights[name]))
            np.add.at(part, inputs[f"{prefix}input_ids"],
                      grads0[f"{prefix}inputs_embeds"] * scale_of(spec))
    for mode in BE.modes:
        fwd = BE.forward(model, inputs, mode=mode)
        for via, feed in (("ids", inputs), ("embeds", embeds)):
            out, grads = BE.forward_backward(model, feed, cot, mode=mode)
            for name in out0:
                assert rel(out[name], out0[name]) <= 1e-12, (mode, via, name)
                assert rel(fwd[name], out0[name]) <= 1e-12, (mode, via, name)
            for name, g in grads.items():
                expected = grads0[name]
                if via == "embeds" and name in lookup:
                    expected = expected - lookup[name]
                    if not spec.tie_embeddings or name != spec.lm_head_name():
                        assert not g.any(), (mode, name)  # the lookup is not in the graph
                        continue
                floor = 1e-6 if is_k_bias(name) else 0.0  # noise ~1e-16 vs noise: abs check
                assert rel(g, expected, floor) <= 1e-12, (mode, via, name,
                                                          rel(g, expected, floor))
        out = BE.forward(model, embeds, mode=mode)
        for name in out0:
            assert rel(out[name], out0[name]) <= 1e-12, (mode, "forward embeds", name)


@pytest.mark.parametrize("key", TINY)
def test_gradients_match_finite_differences(key):
    """Directional derivatives of the loss along a random direction, one parameter tensor at a
    time (every parameter: the LM head or the tied table, cross-attention, ...), and along
    (decoder_)inputs_embeds, by central differences (h = 1e-6).

    The error is |fd - analytic| / max(|analytic|, 1e-2): relative, except near a zero
    derivative (k_proj biases get exactly none). Partial padding only: a fully padded row
    breaks finite differences (docs/conformance.md).
    """
    spec, model = TINY[key], model_for(key)
    weights = random_weights(spec, seed=0)
    inputs = make_inputs(spec, b=3, t=5, full_pad=False)
    cot = cotangents(spec, inputs)
    _, grads = BE.forward_backward(model, inputs, cot, mode="imperative")
    rng, h = np.random.default_rng(7), 1e-6

    def loss(feed) -> float:
        out = BE.forward(model, feed, mode="imperative")
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
    for key_ in spec.input_embeds_names():
        v = rng.standard_normal(feed[key_].shape)
        check(key_, float((grads[key_] * v).sum()),
              lambda: loss({**feed, key_: feed[key_] + h * v}),
              lambda: loss({**feed, key_: feed[key_] - h * v}))


# ---------------------------------------------------------------------- cached decoding
def _decode_all(spec, model, source: dict, ids, mask, prompt: int, beam_idx=None, at: int = 0):
    """Logits of the prompt then one token per call; at step ``at`` the cache (and the ids and
    mask) are reordered by ``beam_idx``. Returns ``(logits (B, T, V), ids, mask)`` as decoded."""
    enc_dec = spec.architecture == "encoder-decoder"
    prefix = "decoder_" if enc_dec else ""
    first = {**source, f"{prefix}input_ids": ids[:, :prompt],
             f"{prefix}attention_mask": mask[:, :prompt]}
    logits, cache = BE.decode(model, first)
    steps = [logits]
    for i in range(prompt, ids.shape[1]):
        if i == at and beam_idx is not None:
            cache = BE.reorder_cache(model, cache, beam_idx)
            ids, mask = ids[beam_idx], mask[beam_idx]
            steps = [s[beam_idx] for s in steps]
        logits, cache = BE.decode(model, {f"{prefix}input_ids": ids[:, i:i + 1],
                                          f"{prefix}attention_mask": mask[:, :i + 1]}, cache)
        steps.append(logits)
    assert cache.length == ids.shape[1]
    return np.concatenate(steps, axis=1), ids, mask


def _full_logits(spec, model, source: dict, ids, mask, mode):
    if spec.architecture == "encoder-decoder":
        feed = {**source, "decoder_input_ids": ids, "decoder_attention_mask": mask}
    else:
        feed = {"input_ids": ids, "attention_mask": mask}
    return BE.forward(model, feed, mode=mode)["logits"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("key", DECODING)
def test_cached_decoding_matches_full_forward(key, dtype):
    """Prompt, then one token at a time through ``decode``, with the cache reordered by a
    permutation (and, second run, by a gather with duplicates, as beam search does) halfway:
    the logits equal one full forward pass of the reordered batch.

    Rows: unpadded, padded in the middle, left-padded. A query whose allowed set is empty
    (a left-padding position) attends uniformly over *all* keys, and "all" is the keys present:
    ``past + T_new`` in a cached step, ``T`` in the full pass, so those positions differ by
    design and are compared for finiteness only.
    """
    spec, model = SPECS[key], model_for(key, dtype)
    rng = np.random.default_rng(5)
    b, t, prompt = 3, spec.max_len, 4
    ids = rng.integers(0, spec.vocab_size, (b, t))
    mask = np.ones((b, t))
    mask[1, 2] = 0       # padding in the middle (the query row keeps allowed keys)
    mask[2, :2] = 0      # left padding: positions 0 and 1 have no allowed key
    source = {}
    if spec.architecture == "encoder-decoder":
        source = {"input_ids": rng.integers(0, spec.vocab_size, (b, 7)),
                  "attention_mask": pad_mask(b, 7, full_pad=True)}  # incl. a fully padded row
    tol = 1e-12 if dtype == "float64" else 1e-5
    for mode, beam_idx in (("hybridize", np.array([2, 0, 1])), ("imperative", np.array([1, 1, 0]))):
        full0 = _full_logits(spec, model, source, ids, mask, mode)  # the model in `mode` first
        graph = model._cached_op
        got, ids_b, mask_b = _decode_all(spec, model, source, ids, mask, prompt, beam_idx, at=6)
        src = {k: v[beam_idx] for k, v in source.items()}  # the reordered batch's sources
        full = _full_logits(spec, model, src, ids_b, mask_b, mode)
        assert got.dtype == np.dtype(dtype) and got.shape == full.shape
        assert np.isfinite(got).all()
        has_key = np.cumsum(mask_b, axis=1) > 0                            # (B, T)
        assert rel(got[has_key], full[has_key]) <= tol, (mode, rel(got[has_key], full[has_key]))
        assert rel(full0[beam_idx][:, :6][has_key[:, :6]], full[:, :6][has_key[:, :6]]) <= tol
        if mode == "hybridize":  # decoding ran imperatively and kept the graph
            assert model._cached_op is graph and model._active
            BE.forward(model, {**source, "input_ids": ids} if not source else
                       {**source, "decoder_input_ids": ids}, mode=mode)
            assert model._cached_op is graph


def test_decoding_matches_reference_float64():
    """The cached logits against the numpy reference directly (not only the backend's own
    full pass), for the GPT-2-like decoder."""
    spec, model = SPECS["gpt2"], model_for("gpt2")
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, (2, spec.max_len))
    mask = np.ones(ids.shape)
    got, _, _ = _decode_all(spec, model, {}, ids, mask, prompt=3)
    ref = reference_outputs(spec, {"input_ids": ids, "attention_mask": mask})["logits"]
    assert rel(got, ref) <= 1e-12, rel(got, ref)


def test_native_cache_layout():
    """``past_key_values`` is Hugging Face's legacy layout: per layer ``(k, v)`` ``(B, H, T,
    d_head)``, plus the cross-attention's ``(B, H, S, d_head)`` for an encoder-decoder."""
    spec, model = SPECS["vaswani"], model_for("vaswani")
    src = mx.nd.array(np.arange(10).reshape(2, 5), dtype="int64")
    tgt = mx.nd.array(np.arange(6).reshape(2, 3), dtype="int64")
    hidden, memory, logits, cache = model(input_ids=src, decoder_input_ids=tgt, use_cache=True)
    assert len(cache) == spec.decoder_layers
    h, dh = spec.n_heads, spec.d_head
    assert [t.shape for t in cache[0]] == [(2, h, 3, dh)] * 2 + [(2, h, 5, dh)] * 2
    nxt = mx.nd.array([[7], [8]], dtype="int64")
    hidden, memory, logits, cache = model(decoder_input_ids=nxt, past_key_values=cache,
                                          use_cache=True)
    assert memory is None and logits.shape == (2, 1, spec.vocab_size)
    assert [t.shape for t in cache[0]][:2] == [(2, h, 4, dh)] * 2
    spec, model = SPECS["gpt2"], model_for("gpt2")
    hidden, logits, cache = model(input_ids=tgt, use_cache=True)
    assert len(cache) == spec.n_layers and len(cache[0]) == 2
    hidden, logits = model(input_ids=nxt, past_key_values=cache)
    assert logits.shape == (2, 1, spec.vocab_size)


def test_decoding_past_max_len_raises():
    spec, model = SPECS["gpt2"], model_for("gpt2")
    ids = np.zeros((1, spec.max_len), np.int64)
    _, cache = BE.decode(model, {"input_ids": ids[:, :-1]})
    _, cache = BE.decode(model, {"input_ids": ids[:, :1]}, cache)  # exactly max_len: fine
    with pytest.raises(InputError, match="max_len"):
        BE.decode(model, {"input_ids": ids[:, :1]}, cache)
    with pytest.raises(InputError, match="max_len"):  # the native block checks it too
        model(input_ids=mx.nd.array(ids[:, :1], dtype="int64"),
              past_key_values=cache.past_key_values)
    with pytest.raises(InputError, match="max_len"):
        BE.decode(model, {"input_ids": np.zeros((1, spec.max_len + 1), np.int64)})
    spec, model = SPECS["vaswani"], model_for("vaswani")
    first = {"input_ids": np.zeros((1, 4), np.int64),
             "decoder_input_ids": np.zeros((1, spec.max_len), np.int64)}
    _, cache = BE.decode(model, first)
    with pytest.raises(InputError, match="max_len"):
        BE.decode(model, {"decoder_input_ids": np.zeros((1, 1), np.int64)}, cache)


def test_decode_needs_lm_head_and_checks_inputs():
    with pytest.raises(InputError, match="head"):
        BE.decode(model_for("dec-none"), {"input_ids": np.zeros((1, 2), np.int64)})
    spec, model = SPECS["gpt2"], model_for("gpt2")
    _, cache = BE.decode(model, {"input_ids": np.zeros((2, 3), np.int64)})
    with pytest.raises(InputError, match="attention_mask"):  # must cover past + new
        BE.decode(model, {"input_ids": np.zeros((2, 1), np.int64),
                          "attention_mask": np.ones((2, 1))}, cache)


def test_dropout_off_in_decoding():
    spec = SPECS["gpt2"].replace(dropout=0.5)
    model = BE.build(spec, "float64")
    BE.set_weights(model, random_weights(spec, seed=0))
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (2, 5))
    got, _, _ = _decode_all(spec, model, {}, ids, np.ones(ids.shape), prompt=2)
    ref = reference_outputs(spec, {"input_ids": ids})["logits"]
    assert rel(got, ref) <= 1e-12
    with mx.autograd.train_mode():  # the native block does use dropout when training
        trained = model(input_ids=mx.nd.array(ids, dtype="int64"))[1].asnumpy()
    assert rel(trained, ref) > 1e-2
