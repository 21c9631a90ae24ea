"""Decoders and encoder-decoders on every installed backend: the causal mask, cached
(incremental) decoding with ``decode`` / ``reorder_cache`` against full forward passes and the
numpy reference, the native modules' cache, and greedy generation.

Bounds: cached decoding within 1e-12 of the full pass in float64, 1e-5 in float32. The
validation errors of caches and ``beam_idx`` (one message for every backend) are tested in
test_contract.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from xformer import InputError
from backend_helpers import (SPECS, B, S, built, make_inputs, native_call, reference, rel)

#: Decoded length of the cached-decoding tests (the specs' max_len is 9).
N = 8


def decoded_keys(spec) -> tuple[str, str]:
    """``(ids key, mask key)`` of the decoded side."""
    if spec.architecture == "encoder-decoder":
        return "decoder_input_ids", "decoder_attention_mask"
    return "input_ids", "attention_mask"


def decode_case(spec, seed: int = 4, b: int = B, n: int = N):
    """Full inputs for cached decoding: row 0 attends everywhere, row 1 is padded in the middle
    (at an odd position, where the decoding step passes a mask: a left-out mask means the new
    position attends), row 2 at the start (as batched generation pads prompts), row 3 at the
    end; an encoder-decoder's source has a fully padded row."""
    rng = np.random.default_rng(seed)
    key, mask_key = decoded_keys(spec)
    mask = np.ones((b, n), np.int64)
    mask[1, 5] = 0
    mask[2, :2] = 0
    mask[3, 7:] = 0
    inputs = {key: rng.integers(0, spec.vocab_size, (b, n)), mask_key: mask}
    if spec.architecture == "encoder-decoder":
        inputs.update(input_ids=rng.integers(0, spec.vocab_size, (b, S)),
                      attention_mask=make_inputs(spec, b=b)["attention_mask"])
    return inputs


def decode_all(backend, model, inputs, prompt: int, reorders=()):
    """Logits of a ``prompt``-token first call then one token per call (with the decoded side's
    mask on odd positions only); before position ``p`` of each ``(p, rows)`` in ``reorders`` the
    cache (and the inputs) are gathered by ``rows``. Returns ``(logits (B', N, V), the gathered
    inputs, the cache)``."""
    spec = model.spec
    key, mask_key = decoded_keys(spec)
    first = {k: v for k, v in inputs.items() if k not in (key, mask_key)}
    first.update({key: inputs[key][:, :prompt], mask_key: inputs[mask_key][:, :prompt]})
    logits, cache = backend.decode(model, first)
    steps, reorders = [logits], dict(reorders)
    for t in range(prompt, inputs[key].shape[1]):
        if t in reorders:
            rows = np.asarray(reorders[t])
            cache = backend.reorder_cache(model, cache, rows)
            inputs = {k: v[rows] for k, v in inputs.items()}
            steps = [s[rows] for s in steps]
        step = {key: inputs[key][:, t:t + 1]}
        if t % 2:
            step[mask_key] = inputs[mask_key][:, :t + 1]
        logits, cache = backend.decode(model, step, cache)
        assert cache.past_length == t + 1
        steps.append(logits)
    return np.concatenate(steps, axis=1), inputs, cache


# ---------------------------------------------------------------------- the causal mask
def test_causal_mask_semantics(backend):
    """Position i does not depend on tokens after i; a query with no allowed key (padding
    before the first real token, a fully padded row) attends uniformly over ALL keys (one
    finfo.min bias from the product of the masks), so it does see later tokens, as in the
    reference, without NaN."""
    spec = SPECS["dec_post"]
    model, weights = built(backend, spec)
    inputs = make_inputs(spec)
    changed = {**inputs, "input_ids": inputs["input_ids"].copy()}
    changed["input_ids"][:, 4] = (changed["input_ids"][:, 4] + 1) % spec.vocab_size
    a = backend.forward(model, inputs)["last_hidden_state"]
    b = backend.forward(model, changed)["last_hidden_state"]
    np.testing.assert_array_equal(a[:2, :4], b[:2, :4])
    np.testing.assert_array_equal(a[2, 2:4], b[2, 2:4])  # row 2 is padded at positions 0, 1
    assert rel(a[:3, 4:], b[:3, 4:]) > 1e-3
    assert not np.allclose(a[2, 0], b[2, 0])  # no allowed key: uniform over all T keys
    assert not np.allclose(a[3, 0], b[3, 0])  # fully padded row: the same
    mask = np.zeros((2, 6))
    out = backend.forward(model, {"input_ids": inputs["input_ids"][:2], "attention_mask": mask})
    want = reference(spec, weights, {"input_ids": inputs["input_ids"][:2],
                                     "attention_mask": mask})
    assert np.isfinite(out["logits"]).all() and rel(out["logits"], want["logits"]) <= 1e-12


# ---------------------------------------------------------------------- cached decoding
@pytest.mark.parametrize("dtype,tol", [("float64", 1e-12), ("float32", 1e-5)])
@pytest.mark.parametrize("name", ["gpt2", "dec_post", "vaswani", "ed_pre"])
def test_cached_decoding_equals_full_forward(backend, name, dtype, tol):
    """Prompt, then one token at a time, with the cache permuted and later gathered with a
    duplicate and a drop (as beam search does), against one full forward pass of the gathered
    batch (run first, in the backend's preferred mode: decoding must not care that the model
    was compiled).

    Queries that may attend to no key at all (row 2's leading padding) are left out: the full
    pass spreads them uniformly over all N keys, decoding over the keys so far; both are
    arbitrary by design, and nothing valid attends to them."""
    spec = SPECS[name]
    model, _ = built(backend, spec, dtype)
    inputs = decode_case(spec)
    key, mask_key = decoded_keys(spec)
    perm, beams = np.array([2, 0, 3, 1]), np.array([1, 1, 0, 3])
    gathered = {k: v[perm][beams] for k, v in inputs.items()}
    want = backend.forward(model, gathered)["logits"]
    got, seen, cache = decode_all(backend, model, inputs, prompt=3, reorders=[(4, perm),
                                                                             (6, beams)])
    for k in gathered:
        np.testing.assert_array_equal(seen[k], gathered[k])
    assert got.dtype == np.dtype(dtype) and got.shape == want.shape
    valid = np.cumsum(gathered[mask_key], axis=1) > 0
    assert np.isfinite(got).all()
    assert rel(got[valid], want[valid]) <= tol, rel(got[valid], want[valid])
    # the cache: per decoder layer self k, v (B, H, N, d_head) (+ cross k, v (B, H, S, d_head))
    assert cache.past_length == N and cache.batch_size == B
    assert len(cache.past_key_values) == spec.decoder_layers
    for layer in cache.past_key_values:
        shapes = [tuple(x.shape) for x in layer]
        assert shapes[:2] == [(B, spec.n_heads, N, spec.d_head)] * 2
        if spec.architecture == "encoder-decoder":
            assert shapes[2:] == [(B, spec.n_heads, S, spec.d_head)] * 2
        else:
            assert len(shapes) == 2


@pytest.mark.parametrize("name", ["gpt2"])
def test_reorder_cache_changes_the_batch_size(backend, name):
    """A left-padded prompt, steps without masks; a beam reorder that duplicates and drops rows
    to 6 rows, then one more step of 6 rows matches the full pass of the gathered batch."""
    spec = SPECS[name]
    model, _ = built(backend, spec)
    key, mask_key = decoded_keys(spec)
    inputs = decode_case(spec, n=7)
    inputs[mask_key] = np.ones((B, 7), np.int64)
    inputs[mask_key][1, :3] = 0
    first = {k: v for k, v in inputs.items() if k not in (key, mask_key)}
    first.update({key: inputs[key][:, :4], mask_key: inputs[mask_key][:, :4]})
    logits, cache = backend.decode(model, first)
    steps = [logits]
    for t in (4, 5):
        logits, cache = backend.decode(model, {key: inputs[key][:, t:t + 1]}, cache)
        steps.append(logits)
    beams = np.array([0, 0, 2, 1, 1, 3])
    cache = backend.reorder_cache(model, cache, beams)
    assert cache.batch_size == 6 and cache.past_length == 6
    gathered = {k: v[beams] for k, v in inputs.items()}
    logits, cache = backend.decode(model, {key: gathered[key][:, 6:7]}, cache)
    assert cache.batch_size == 6 and cache.past_length == 7
    got = np.concatenate([np.concatenate(steps, 1)[beams], logits], 1)
    want = backend.forward(model, gathered)["logits"]
    valid = np.cumsum(gathered[mask_key], 1) > 0
    assert rel(got[valid], want[valid]) <= 1e-12


def test_decoding_matches_reference(backend):
    """The cached logits against the numpy reference directly (not only the backend's own full
    pass), with dropout in the spec (off in decoding)."""
    spec = SPECS["gpt2"].replace(dropout=0.5)
    model, weights = built(backend, spec)
    ids = np.random.default_rng(3).integers(0, spec.vocab_size, (2, spec.max_len))
    mask = np.ones(ids.shape, np.int64)
    got, _, _ = decode_all(backend, model, {"input_ids": ids, "attention_mask": mask}, prompt=3)
    want = reference(spec, weights, {"input_ids": ids, "attention_mask": mask})["logits"]
    assert rel(got, want) <= 1e-12, rel(got, want)


@pytest.mark.parametrize("name", ["gpt2", "vaswani"])
def test_decoding_past_max_len_raises(backend, name):
    spec = SPECS[name]
    model, _ = built(backend, spec)
    key, _ = decoded_keys(spec)
    first = {key: np.zeros((2, spec.max_len - 1), np.int64)}
    if spec.architecture == "encoder-decoder":
        first["input_ids"] = np.zeros((2, 3), np.int64)
    _, cache = backend.decode(model, first)
    _, cache = backend.decode(model, {key: np.zeros((2, 1), np.int64)}, cache)  # == max_len
    assert cache.past_length == spec.max_len
    with pytest.raises(InputError, match=f"{spec.max_len} cached \\+ 1 new positions is longer "
                                         f"than max_len"):
        backend.decode(model, {key: np.zeros((2, 1), np.int64)}, cache)
    with pytest.raises(InputError, match="longer than max_len"):
        backend.decode(model, {**first, key: np.zeros((2, spec.max_len + 1), np.int64)})
    if spec.architecture == "decoder":  # the native module checks it too
        with pytest.raises(InputError, match="max_len"):
            native_call(backend, model, input_ids=np.zeros((2, 1), np.int64),
                        past_key_values=cache.past_key_values)


def test_decode_checks_its_inputs(backend):
    with pytest.raises(InputError, match="head"):
        backend.decode(built(backend, SPECS["dec_none"])[0],
                       {"input_ids": np.zeros((1, 2), np.int64)})
    model, _ = built(backend, SPECS["gpt2"])
    _, cache = backend.decode(model, {"input_ids": np.zeros((2, 3), np.int64)})
    with pytest.raises(InputError, match="attention_mask"):  # must cover past + new
        backend.decode(model, {"input_ids": np.zeros((2, 1), np.int64),
                               "attention_mask": np.ones((2, 1))}, cache)
    with pytest.raises(InputError, match="decoder_input_ids"):
        backend.decode(built(backend, SPECS["vaswani"])[0],
                       {"input_ids": np.zeros((2, 3), np.int64)})


@pytest.mark.parametrize("name", ["gpt2", "vaswani"])
def test_decode_in_every_default_mode(backend, name):
    """``decode(..., mode=m)`` gives the same logits in every default mode (TensorFlow traces
    the step, the others run it eagerly), up to ``max_len`` and no further."""
    spec = SPECS[name]
    model, _ = built(backend, spec)
    inputs = make_inputs(spec)
    key, mask_key = decoded_keys(spec)
    first = {**inputs, key: inputs[key][:, :2], mask_key: inputs[mask_key][:, :2]}
    got = {}
    for mode in backend.default_modes:
        logits, cache = backend.decode(model, first, mode=mode)
        steps = [logits]
        while cache.past_length < spec.max_len:
            logits, cache = backend.decode(model, {key: inputs[key][:, :1]}, cache, mode=mode)
            steps.append(logits)
        got[mode] = np.concatenate(steps, 1)
        with pytest.raises(InputError, match="max_len"):
            backend.decode(model, {key: inputs[key][:, :1]}, cache, mode=mode)
    for mode in backend.default_modes[1:]:
        assert rel(got[mode], got[backend.default_modes[0]]) <= 1e-12, mode


# ---------------------------------------------------------------------- the native modules
def test_native_cache(backend):
    """``use_cache=True`` returns Hugging Face's legacy layout (per layer ``(k, v)``
    ``(B, H, T, d_head)``); a step on it equals the full call at those positions."""
    spec = SPECS["dec_post"]
    model, _ = built(backend, spec)
    ids = np.array([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    full = native_call(backend, model, input_ids=ids)
    assert list(full) == list(spec.output_names())
    out = native_call(backend, model, input_ids=ids[:, :3], use_cache=True)
    cache = out["past_key_values"]
    assert len(cache) == spec.n_layers
    assert [tuple(x.shape) for x in cache[0]] == [(2, spec.n_heads, 3, spec.d_head)] * 2
    step = native_call(backend, model, input_ids=ids[:, 3:], past_key_values=cache,
                       use_cache=True)
    assert rel(step["logits"], full["logits"][:, 3:]) <= 1e-12
    assert [tuple(x.shape) for x in step["past_key_values"][0]] == [
        (2, spec.n_heads, 5, spec.d_head)] * 2


# ---------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", ["dec_post", "ed_pre"])
def test_greedy_generation_matches_reference(backend, name):
    """``Backend.generate`` (the shared search over this backend's cache) against a greedy loop
    of full numpy reference passes."""
    spec = SPECS[name].replace(bos_token_id=1)
    model, weights = built(backend, spec)
    prompts = np.random.default_rng(5).integers(0, spec.vocab_size, (2, 4))
    got = backend.generate(model, prompts, max_new_tokens=4)
    for row, generated in enumerate(got):
        seq: list[int] = []
        for _ in range(4):
            if spec.architecture == "decoder":
                inputs = {"input_ids": np.array([[*prompts[row], *seq]])}
            else:
                inputs = {"input_ids": prompts[row:row + 1],
                          "decoder_input_ids": np.array([[spec.bos_token_id, *seq]])}
            seq.append(int(reference(spec, weights, inputs)["logits"][0, -1].argmax()))
        assert generated == seq, row
