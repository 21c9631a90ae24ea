"""The shared search (xformer.generation) against brute force, on a numpy toy model whose
logits depend on the previous token and the position: no framework needed."""

import itertools
import math

import numpy as np
import pytest

from xformer import InputError, ModelSpec
from xformer.generation import generate


class ToyModel:
    def __init__(self, vocab=4, eos=3, max_len=32, seed=0):
        self.spec = ModelSpec(architecture="decoder", vocab_size=vocab, d_model=4, n_heads=1,
                              d_ff=4, n_layers=1, max_len=max_len, head="lm",
                              eos_token_id=eos)
        self.table = np.random.default_rng(seed).normal(0, 2, size=(max_len, vocab, vocab))

    def logits(self, seq):
        return self.table[len(seq) - 1, seq[-1]]


class ToyBackend:
    """decode/reorder_cache over a cache that is just the token history."""

    calls = 0

    def decode(self, model, inputs, cache=None):
        self.calls += 1
        new = np.asarray(inputs["input_ids"])
        cache = [list(r) for r in new] if cache is None else [c + list(r) for c, r in
                                                              zip(cache, new)]
        t = new.shape[1]
        out = np.stack([[model.logits(row[: len(row) - t + i + 1]) for i in range(t)]
                        for row in cache])
        return out, cache

    def reorder_cache(self, model, cache, idx):
        return [list(cache[i]) for i in idx]


def logprob(model, prompt, seq):
    total, hist = 0.0, list(prompt)
    for tok in seq:
        x = model.logits(hist)
        x = x - x.max()
        total += x[tok] - math.log(np.exp(x).sum())
        hist.append(tok)
    return total


def brute_force(model, prompt, max_new, lp):
    eos, v = model.spec.eos_token_id, model.spec.vocab_size
    best, best_seq = -np.inf, None
    for n in range(1, max_new + 1):
        for seq in itertools.product(range(v), repeat=n):
            if eos in seq[:-1] or (n < max_new and seq[-1] != eos):
                continue
            score = logprob(model, prompt, seq) / n ** lp
            if score > best:
                best, best_seq = score, list(seq)
    return best_seq


def test_greedy_is_the_argmax_path():
    model, be = ToyModel(vocab=6, eos=5, seed=1), ToyBackend()
    prompt = np.array([[0, 2], [1, 1]])
    got = generate(be, model, prompt, max_new_tokens=8)
    for row, out in zip(prompt, got):
        hist, want = list(row), []
        for _ in range(8):
            tok = int(np.argmax(model.logits(hist)))
            want.append(tok)
            hist.append(tok)
            if tok == 5:
                break
        assert out == want


@pytest.mark.parametrize("lp", [0.0, 1.0, 2.0])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_wide_beam_equals_exhaustive_search(seed, lp):
    model, be = ToyModel(vocab=4, eos=3, seed=seed), ToyBackend()
    max_new = 4
    prompt = np.array([[1, 0]])
    got = generate(be, model, prompt, max_new_tokens=max_new, num_beams=4 ** max_new,
                   length_penalty=lp)
    assert got[0] == brute_force(model, [1, 0], max_new, lp)


def test_narrow_beam_is_at_least_as_good_as_greedy():
    for seed in range(10):
        model, be = ToyModel(vocab=5, eos=4, seed=seed), ToyBackend()
        prompt = np.array([[2]])
        g = generate(be, model, prompt, max_new_tokens=6)[0]
        b = generate(be, model, prompt, max_new_tokens=6, num_beams=3)[0]
        score = lambda s: logprob(model, [2], s) / len(s)  # noqa: E731
        assert score(b) >= score(g) - 1e-12


def test_beam_search_batches_rows_independently():
    model, be = ToyModel(vocab=5, eos=4, seed=7), ToyBackend()
    both = generate(be, model, np.array([[0], [3]]), max_new_tokens=5, num_beams=3)
    alone = [generate(be, model, np.array([[p]]), max_new_tokens=5, num_beams=3)[0]
             for p in (0, 3)]
    assert both == alone


def test_errors():
    model, be = ToyModel(max_len=8), ToyBackend()
    with pytest.raises(InputError, match="longer than max_len=8"):
        generate(be, model, np.array([[0, 1, 2]]), max_new_tokens=7)
    with pytest.raises(InputError, match="unpadded"):
        generate(be, model, np.array([[0, 1]]), attention_mask=np.array([[1, 0]]))
    with pytest.raises(InputError, match=">= 1"):
        generate(be, model, np.array([[0]]), num_beams=0)
