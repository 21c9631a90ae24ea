"""The one :class:`xformer.backend.Backend` contract, checked by one test body on every installed
backend: the same bad cotangents, caches and beam indices are refused with the same
``InputError`` message (the validation lives once, in ``xformer.backend``), and valid calls
give the same numbers and the same cache state (the numpy reference and literal masks are the
yardstick, so every backend is held to the same values).

Tiny float64 specs (one layer, ``d_model=64``); the whole file runs in seconds per backend.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from xformer import reference
from xformer.backend import DecodingCache, check_cotangents, check_inputs, output_shapes
from xformer.errors import InputError
from xformer.spec import ModelSpec
from xformer.weights import random_weights

SMALL = dict(n_layers=1, d_ff=64, max_len=12, vocab_size=50)
SPECS = {
    "encoder": ModelSpec.preset("tiny").replace(**SMALL),  # with pooler_output
    "decoder": ModelSpec.preset("gpt2-tiny").replace(**SMALL),
    "encoder-decoder": ModelSpec.preset("vaswani-tiny").replace(**SMALL, n_decoder_layers=1),
}
B, T, S = 2, 5, 4  # batch, (decoded) sequence, source sequence


_MODELS: dict = {}


def model_for(backend, arch: str):
    """A float64 model of ``SPECS[arch]`` with the same random weights on every backend."""
    key = (backend.name, arch)
    if key not in _MODELS:
        spec = SPECS[arch]
        model = backend.build(spec, "float64")
        backend.set_weights(model, random_weights(spec, seed=3))
        _MODELS[key] = model
    return _MODELS[key]


def make_inputs(arch: str) -> dict:
    rng = np.random.default_rng(0)
    if arch == "encoder-decoder":
        return {"input_ids": rng.integers(0, 50, (B, S)),
                "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]]),
                "decoder_input_ids": rng.integers(0, 50, (B, T))}
    return {"input_ids": rng.integers(0, 50, (B, T))}


def make_cotangents(arch: str) -> dict:
    rng = np.random.default_rng(1)
    shapes = {"last_hidden_state": (B, T, 64), "pooler_output": (B, 64),
              "encoder_last_hidden_state": (B, S, 64), "logits": (B, T, 50)}
    return {n: rng.standard_normal(shapes[n]) for n in SPECS[arch].output_names()}


def rel(got, want) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


# ---------------------------------------------------------------------- cotangents
KEYS = {"encoder": "['last_hidden_state', 'pooler_output']",
        "decoder": "['last_hidden_state', 'logits']",
        "encoder-decoder": "['last_hidden_state', 'encoder_last_hidden_state', 'logits']"}


def bad_cotangents(arch: str):
    """``(label, cotangents, the exact InputError message)``: one rule for every backend."""
    good = make_cotangents(arch)
    names = list(good)
    last = names[-1]
    head = f"cotangents must have exactly the keys {KEYS[arch]} (one per output; zeros leave " \
           f"an output out of the loss), got "
    shape = tuple(good[last].shape)
    short = shape[:-1] + (shape[-1] - 1,)
    yield ("missing key", {k: v for k, v in good.items() if k != last},
           head + f"{sorted(names[:-1])}: missing ['{last}'], extra []")
    yield ("extra key", {**good, "hidden_states": good[names[0]]},
           head + f"{sorted(names + ['hidden_states'])}: missing [], extra ['hidden_states']")
    yield ("subset", {names[0]: good[names[0]]},
           head + f"['last_hidden_state']: missing {names[1:]}, extra []")
    yield ("empty", {}, head + f"[]: missing {names}, extra []")
    yield ("wrong shape", {**good, last: good[last][..., :-1]},
           f"cotangent '{last}' must have the shape of the output, {shape}, got {short}")
    yield ("transposed batch", {**good, "last_hidden_state": np.zeros((T, B, 64))},
           f"cotangent 'last_hidden_state' must have the shape of the output, {(B, T, 64)}, "
           f"got {(T, B, 64)}")
    yield ("complex", {**good, last: good[last] * 1j},
           f"cotangent '{last}' must hold real numbers, got complex128")


@pytest.mark.parametrize("arch", list(SPECS))
def test_every_backend_refuses_the_same_cotangents(backend, arch):
    model = model_for(backend, arch)
    inputs = make_inputs(arch)
    for label, cotangents, message in bad_cotangents(arch):
        for call in (lambda: backend.forward_backward(model, inputs, cotangents),
                     lambda: backend.trace(model, inputs, cotangents)):
            with pytest.raises(InputError) as info:
                call()
            assert str(info.value) == message, label


@pytest.mark.parametrize("arch", list(SPECS))
def test_valid_cotangents_give_the_reference_gradients(backend, arch):
    """Exactly the output names, any real dtype (integers are cast): the outputs have the shapes
    of ``output_shapes`` and the numbers of the numpy reference; zero cotangents for every
    output but one leave the others out of the loss."""
    spec, model = SPECS[arch], model_for(backend, arch)
    inputs = make_inputs(arch)
    cot = make_cotangents(arch)
    checked = check_inputs(spec, inputs, "float64")
    assert list(check_cotangents(spec, checked, cot, "float64")) == list(spec.output_names())
    outputs, grads = backend.forward_backward(model, inputs, cot)
    assert {k: v.shape for k, v in outputs.items()} == output_shapes(spec, checked)
    want = reference.forward(spec, random_weights(spec, seed=3), checked)
    for name in spec.output_names():
        assert outputs[name].dtype == np.float64
        assert rel(outputs[name], want[name]) <= 1e-11, name
    # integer cotangents are cast; a zero cotangent drops an output from the loss
    only = {k: (np.ones(v.shape, np.int64) if k == "last_hidden_state" else
                np.zeros(v.shape, np.int64)) for k, v in cot.items()}
    _, by_int = backend.forward_backward(model, inputs, only)
    ones = {k: np.ones(v.shape) if k == "last_hidden_state" else np.zeros(v.shape)
            for k, v in cot.items()}
    _, by_float = backend.forward_backward(model, inputs, ones)
    assert set(by_int) == set(by_float) == set(grads)
    for k in grads:
        np.testing.assert_array_equal(by_int[k], by_float[k], err_msg=k)


# ---------------------------------------------------------------------- caches
def test_decoding_cache_is_one_frozen_dataclass():
    cache = DecodingCache((), np.ones((3, 4)), np.ones((3, 2)))
    assert (cache.past_length, cache.batch_size) == (4, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cache.attention_mask = np.ones((1, 1))  # type: ignore[misc]
    assert [f.name for f in dataclasses.fields(DecodingCache)] == [
        "past_key_values", "attention_mask", "encoder_attention_mask"]


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_every_backend_refuses_the_same_caches(backend, arch):
    spec, model = SPECS[arch], model_for(backend, arch)
    key = "decoder_input_ids" if arch == "encoder-decoder" else "input_ids"
    mask_key = "decoder_attention_mask" if arch == "encoder-decoder" else "attention_mask"
    first = make_inputs(arch)
    logits, cache = backend.decode(model, first)
    assert isinstance(cache, DecodingCache) and logits.shape == (B, T, spec.vocab_size)
    step = {key: np.zeros((B, 1), np.int64)}

    def refused(message, inputs, cache):
        with pytest.raises(InputError) as info:
            backend.decode(model, inputs, cache)
        assert str(info.value) == message

    refused("cache must be None (first step) or the DecodingCache that decode or "
            "reorder_cache returned, got tuple", step, cache.past_key_values)
    refused("cache must be None (first step) or the DecodingCache that decode or "
            "reorder_cache returned, got dict", step, dataclasses.asdict(cache))
    refused("decode: batch size 3, but the cache holds 2 rows; give one row per cached row "
            "(reorder_cache changes the row count)", {key: np.zeros((3, 1), np.int64)}, cache)
    refused(f"{T} cached + 8 new positions is longer than max_len=12; shorten the input "
            f"(xformer does not truncate silently)", {key: np.zeros((B, 8), np.int64)}, cache)
    refused(f"{mask_key} must have shape (B, T) = (2, {T + 1}), got (2, 1)",
            {**step, mask_key: np.ones((B, 1))}, cache)
    if arch == "encoder-decoder":
        refused("decode: ['attention_mask', 'input_ids'] were given on a later step of an "
                "encoder-decoder; the cache already holds the encoder's keys/values and source "
                "mask: give only decoder_input_ids (and decoder_attention_mask)",
                {**first, **step}, cache)
    with pytest.raises(InputError) as info:
        backend.reorder_cache(model, cache.past_key_values, np.array([0]))
    assert str(info.value) == "cache must be the DecodingCache that decode returned, got tuple"
    # nothing was consumed: the cache still decodes
    logits, cache = backend.decode(model, step, cache)
    assert logits.shape == (B, 1, spec.vocab_size) and cache.past_length == T + 1


def test_decode_refuses_an_encoder_and_a_model_without_lm_head(backend):
    with pytest.raises(InputError) as info:
        backend.decode(model_for(backend, "encoder"), make_inputs("encoder"))
    assert str(info.value) == ("decode needs a decoder or an encoder-decoder with head='lm'; "
                               "this spec is architecture='encoder' with head='pooler'")


@pytest.mark.parametrize("beam_idx, shown", [
    (np.array([[0, 1]]), "int64 (1, 2) [[0, 1]]"),
    (np.array([0.0, 1.0]), "float64 (2,) [0., 1.]"),
    (np.array([0, 2]), "int64 (2,) [0, 2]"),
    (np.array([-1, 0]), "int64 (2,) [-1,  0]"),
    (np.array(1), "int64 () 1"),
])
def test_every_backend_refuses_the_same_beam_idx(backend, beam_idx, shown):
    model = model_for(backend, "decoder")
    _, cache = backend.decode(model, make_inputs("decoder"))
    with pytest.raises(InputError) as info:
        backend.reorder_cache(model, cache, beam_idx)
    assert str(info.value) == f"beam_idx must be a 1-D integer array of rows in [0, 2), got {shown}"


# ---------------------------------------------------------------------- valid decoding
@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
def test_cached_decoding_state_and_logits_agree(backend, arch):
    """A prompt with padding inside it, steps that leave the mask out (cached mask + ones), a
    beam reorder that duplicates a row and changes the batch size: the cache holds the same
    masks on every backend, and the logits are the numpy reference's full pass at those
    positions (float64, 1e-11)."""
    spec, model = SPECS[arch], model_for(backend, arch)
    enc_dec = arch == "encoder-decoder"
    key, mask_key = (("decoder_input_ids", "decoder_attention_mask") if enc_dec
                     else ("input_ids", "attention_mask"))
    inputs = make_inputs(arch)
    ids = inputs[key]
    prompt_mask = np.array([[1, 1], [1, 0]])  # row 1: position 1 is padding (a key no one sees)
    first = {**inputs, key: ids[:, :2], mask_key: prompt_mask}
    logits, cache = backend.decode(model, first)
    steps = [logits]
    np.testing.assert_array_equal(cache.attention_mask, prompt_mask)
    assert cache.attention_mask.dtype == np.float64
    source = inputs.get("attention_mask")
    if enc_dec:
        np.testing.assert_array_equal(cache.encoder_attention_mask, source)
    else:
        assert cache.encoder_attention_mask is None
    logits, cache = backend.decode(model, {key: ids[:, 2:3]}, cache)  # mask left out
    steps.append(logits)
    np.testing.assert_array_equal(cache.attention_mask, [[1, 1, 1], [1, 0, 1]])
    perm = np.array([1, 0, 1])  # duplicate row 1, batch 2 -> 3
    cache = backend.reorder_cache(model, cache, perm)
    assert (cache.batch_size, cache.past_length) == (3, 3)
    np.testing.assert_array_equal(cache.attention_mask, [[1, 0, 1], [1, 1, 1], [1, 0, 1]])
    if enc_dec:
        np.testing.assert_array_equal(cache.encoder_attention_mask, source[perm])
    ids, steps = ids[perm], [s[perm] for s in steps]
    logits, cache = backend.decode(model, {key: ids[:, 3:5]}, cache)
    steps.append(logits)
    assert (cache.batch_size, cache.past_length) == (3, T)
    full_mask = np.array([[1, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 1, 1, 1]])
    np.testing.assert_array_equal(cache.attention_mask, full_mask)
    want_inputs = {key: ids, mask_key: full_mask}
    if enc_dec:
        want_inputs.update(input_ids=inputs["input_ids"][perm], attention_mask=source[perm])
    want = reference.forward(spec, random_weights(spec, seed=3), want_inputs)["logits"]
    got = np.concatenate(steps, axis=1)
    assert got.shape == want.shape == (3, T, spec.vocab_size)
    assert rel(got, want) <= 1e-11
    # the same numbers as the backend's own full forward pass
    own = backend.forward(model, want_inputs)["logits"]
    assert rel(got, own) <= 1e-11


# ---------------------------------------------------------------------- the rest
def test_environment_model_dtype_and_no_dead_fields(backend):
    env = backend.environment()
    assert env and all(isinstance(k, str) and isinstance(v, str) and v for k, v in env.items())
    assert backend.name in env and backend.framework_version().startswith(env[backend.name])
    assert f"{backend.name} threads" in env
    assert not hasattr(backend, "extra")
    assert backend.model_dtype(model_for(backend, "decoder")) == "float64"
    model32 = backend.build(SPECS["decoder"], "float32")
    assert backend.model_dtype(model32) == "float32"
