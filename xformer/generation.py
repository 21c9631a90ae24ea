"""Greedy and beam-search generation over any backend's key/value cache.

The search is numpy code shared by every backend: a backend only supplies logits through
:meth:`Backend.decode` and reorders its cache with :meth:`Backend.reorder_cache`, so the three
frameworks make the same choices from the same logits (ties broken by the lower token id, and
among candidates of equal score by beam order).

Beam search follows Hugging Face's ``BeamSearchScorer`` with ``early_stopping=False``: each
step keeps the ``2 K`` best ``(beam, token)`` continuations by summed log-probability; a
continuation that ends in EOS and ranks among the first ``K`` becomes a finished hypothesis
scored ``sum_logprobs / generated_length ** length_penalty`` (the generated length counts the
EOS and excludes the prompt); a batch row is done once it holds ``K`` finished hypotheses and
no running beam can beat the worst of them. Log-probabilities are taken in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import InputError, truncate
from .inputs import check_int_array, check_mask


def _count(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int ``>= minimum``: Python ints and numpy integers; bools, floats (even
    ``2.0``) and strings raise :class:`InputError` naming the value."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer >= {minimum}, got "
                         f"{type(value).__name__} {_short(value)}")
    if value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {_short(value)}")
    return int(value)


def _token(name: str, value: Any, vocab_size: int) -> int | None:
    """``None`` or a token id in ``[0, vocab_size)`` (Python or numpy integer)."""
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be a token id (an integer) or None, got "
                         f"{type(value).__name__} {_short(value)}")
    if not 0 <= value < vocab_size:
        raise InputError(f"{name} {_short(value)} is outside [0, vocab_size={vocab_size})")
    return int(value)


def _short(value: Any, limit: int = 60) -> str:
    return truncate(value, limit)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _first_inputs(spec, input_ids: np.ndarray, attention_mask, start: int | None):
    if spec.architecture == "decoder":
        if attention_mask is not None and not np.all(np.asarray(attention_mask) == 1):
            raise InputError("generate takes unpadded decoder prompts (attention_mask all "
                             "ones); generate prompts of different lengths separately")
        return {"input_ids": input_ids}, "input_ids", input_ids.shape[1]
    if spec.architecture != "encoder-decoder":
        raise InputError(f"generate needs a decoder or an encoder-decoder, not an "
                         f"{spec.architecture}")
    if start is None:
        raise InputError("an encoder-decoder needs decoder_start_token_id (or "
                         "spec.bos_token_id) to start generating")
    first = {"input_ids": input_ids,
             "decoder_input_ids": np.full((input_ids.shape[0], 1), start, np.int64)}
    if attention_mask is not None:
        first["attention_mask"] = np.asarray(attention_mask)
    return first, "decoder_input_ids", 1


def generate(backend, model: Any, input_ids, *, max_new_tokens: int = 20, num_beams: int = 1,
             eos_token_id: int | None = None, length_penalty: float = 1.0,
             attention_mask=None, decoder_start_token_id: int | None = None
             ) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` tokens per row with the key/value cache.

    Args:
        backend: a :class:`xformer.backend.Backend`; ``model`` one it built (decoder or
            encoder-decoder, ``head="lm"``).
        input_ids: ``(B, T)`` int: the prompts (decoder, unpadded) or the source sequences
            (encoder-decoder, with ``attention_mask`` for padding).
        num_beams: 1 for greedy search, ``K > 1`` for beam search.
        eos_token_id: stops a row; default ``spec.eos_token_id`` (``None``: never stops early).
        length_penalty: exponent of the generated length in beam scores (> 1 favours longer).
        decoder_start_token_id: first decoder token of an encoder-decoder; default
            ``spec.bos_token_id``.

    Returns:
        One list of generated ids per row, prompt excluded, ending at the first EOS if any.

    Raises:
        InputError: no LM head; a bad prompt (ragged rows, not integers, ids that do not fit in
            int64 or lie outside ``[0, vocab_size)``); ``max_new_tokens`` or ``num_beams``
            not an integer >= 1 (bools and floats such as ``2.5`` are refused; numpy integers
            are fine); ``eos_token_id`` / ``decoder_start_token_id`` not None or a token id;
            a non-finite ``length_penalty``; an attention mask with values other than 0/1;
            or a prompt plus ``max_new_tokens`` longer than ``max_len``.
    """
    spec = model.spec
    if spec.head != "lm":
        raise InputError("generate needs a spec with head = 'lm'")
    max_new_tokens = _count("max_new_tokens", max_new_tokens, 1)
    num_beams = _count("num_beams", num_beams, 1)
    if isinstance(length_penalty, (bool, np.bool_)) or not isinstance(
            length_penalty, (int, float, np.integer, np.floating)) or not np.isfinite(
            length_penalty):
        raise InputError(f"length_penalty must be a finite number, got {_short(length_penalty)}")
    input_ids = check_int_array(input_ids, "input_ids", "(B, T)")
    if input_ids.ndim != 2:
        raise InputError(f"input_ids must be an integer array of shape (B, T), got "
                         f"{input_ids.dtype} {input_ids.shape}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= spec.vocab_size):
        bad = input_ids.max() if input_ids.max() >= spec.vocab_size else input_ids.min()
        raise InputError(f"token id {int(bad)} is outside [0, vocab_size={spec.vocab_size})")
    input_ids = input_ids.astype(np.int64)
    if attention_mask is not None:
        attention_mask = check_mask(attention_mask, "attention_mask", input_ids.shape,
                                    "float64")
    eos = _token("eos_token_id", spec.eos_token_id if eos_token_id is None else eos_token_id,
                 spec.vocab_size)
    start = _token("decoder_start_token_id",
                   spec.bos_token_id if decoder_start_token_id is None
                   else decoder_start_token_id, spec.vocab_size)
    first, key, used = _first_inputs(spec, input_ids, attention_mask, start)
    if used + max_new_tokens - 1 > spec.max_len:
        raise InputError(f"{used} prompt positions + {max_new_tokens} new tokens is longer "
                         f"than max_len={spec.max_len}; lower --max-new-tokens")
    if num_beams == 1:
        return _greedy(backend, model, first, key, max_new_tokens, eos)
    return _beam(backend, model, first, key, max_new_tokens, eos, num_beams, length_penalty)


def _greedy(backend, model, first, key, max_new, eos) -> list[list[int]]:
    logits, cache = backend.decode(model, first)
    b = logits.shape[0]
    out: list[list[int]] = [[] for _ in range(b)]
    finished = np.zeros(b, bool)
    for step in range(max_new):
        nxt = np.argmax(logits[:, -1], axis=-1)  # first maximum: the lower id wins a tie
        for row in np.flatnonzero(~finished):
            out[row].append(int(nxt[row]))
        if eos is not None:
            finished |= nxt == eos
        if finished.all() or step == max_new - 1:
            break
        if eos is not None:  # finished rows keep decoding EOS, their output is frozen
            nxt = np.where(finished, eos, nxt)
        logits, cache = backend.decode(model, {key: nxt[:, None].astype(np.int64)}, cache)
    return out


def _beam(backend, model, first, key, max_new, eos, k, length_penalty) -> list[list[int]]:
    logits, cache = backend.decode(model, first)
    b, v = logits.shape[0], logits.shape[-1]
    rows = np.repeat(np.arange(b), k)
    cache = backend.reorder_cache(model, cache, rows)
    logits = logits[rows]
    scores = np.zeros((b, k))
    scores[:, 1:] = -np.inf  # all beams start equal: take the first step from beam 0 only
    tokens = np.zeros((b * k, 0), np.int64)
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    for step in range(max_new):
        gen_len = step + 1
        cand = (scores.reshape(b * k, 1) + _log_softmax(logits[:, -1])).reshape(b, k * v)
        new_scores = np.full((b, k), -np.inf)
        src = np.zeros((b, k), np.int64)
        nxt = np.zeros((b, k), np.int64)
        for row in range(b):
            if done[row]:  # keep a placeholder beam; its output is already decided
                src[row], nxt[row] = row * k, eos if eos is not None else 0
                new_scores[row] = -np.inf
                continue
            order = np.argsort(-cand[row], kind="stable")[: 2 * k]
            kept = 0
            for rank, idx in enumerate(order):
                beam, tok = divmod(int(idx), v)
                score = float(cand[row, idx])
                if eos is not None and tok == eos:
                    if rank < k:
                        seq = list(tokens[row * k + beam]) + [tok]
                        _add(finished[row], k, score / gen_len ** length_penalty, seq)
                    continue
                new_scores[row, kept], src[row, kept], nxt[row, kept] = score, row * k + beam, tok
                kept += 1
                if kept == k:
                    break
            best_running = new_scores[row].max() / gen_len ** length_penalty
            done[row] = len(finished[row]) >= k and min(
                s for s, _ in finished[row]) >= best_running
        if done.all():
            break
        tokens = np.concatenate([tokens[src.reshape(-1)], nxt.reshape(-1, 1)], axis=1)
        scores = new_scores
        if step == max_new - 1:
            break
        cache = backend.reorder_cache(model, cache, src.reshape(-1))
        logits, cache = backend.decode(model, {key: nxt.reshape(-1, 1)}, cache)
    for row in range(b):
        if done[row]:
            continue
        for beam in range(k):
            if np.isfinite(scores[row, beam]):
                _add(finished[row], k, scores[row, beam] / tokens.shape[1] ** length_penalty,
                     list(tokens[row * k + beam]))
    return [[int(t) for t in max(hyps, key=lambda h: h[0])[1]] if hyps else []
            for hyps in finished]


def _add(hyps: list, k: int, score: float, seq: list[int]) -> None:
    """Keep the ``k`` best finished hypotheses (ties keep the earlier one)."""
    hyps.append((score, seq))
    if len(hyps) > k:
        worst = min(range(len(hyps)), key=lambda i: (hyps[i][0], -i))
        hyps.pop(worst)
