"""Sentences in, embeddings out: tokenising with a checkpoint's ``tokenizer.json`` (the
Hugging Face ``tokenizers`` library) and sentence-transformers mean pooling."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CheckpointError, InputError, truncate
from .resources import MiB, read_capped
from .spec import ModelSpec

#: Cap on ``tokenizer.json`` (bert-base-uncased's is 0.7 MB, xlm-roberta-base's 17 MB).
TOKENIZER_LIMIT = 64 * MiB


def load_tokenizer(model_dir: str | os.PathLike):
    """The ``tokenizers.Tokenizer`` of ``model_dir/tokenizer.json``, with truncation off (an
    over-long sentence is an error, not silently cut) and padding to the longest sentence.

    Raises:
        CheckpointError: no ``tokenizer.json`` in ``model_dir``, or one that is not UTF-8 or
            that ``tokenizers`` cannot read (its first line of error).
        InputError: ``tokenizer.json`` is not a regular file, is over
            :data:`TOKENIZER_LIMIT` or cannot be read (permission denied).
    """
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not os.path.lexists(path):
        raise CheckpointError(f"{truncate(str(model_dir), 200)} has no tokenizer.json; "
                              f"`xformer embed` needs the checkpoint's tokenizer")
    data = read_capped(path, limit=TOKENIZER_LIMIT, what="tokenizer.json")
    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except Exception as e:  # tokenizers raises its own Exception subclass
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise CheckpointError(f"{path} is not a tokenizers tokenizer.json: "
                              f"{truncate(first, 160)}") from None
    tok.no_truncation()
    pad = tok.padding or {}
    tok.enable_padding(pad_id=pad.get("pad_id", 0), pad_type_id=pad.get("pad_type_id", 0),
                       pad_token=pad.get("pad_token", "[PAD]"))
    return tok


def encode(tokenizer, sentences: Sequence[str], spec: ModelSpec) -> dict[str, np.ndarray]:
    """``{"input_ids", "attention_mask", "token_type_ids"}`` of shape ``(B, T)``, int64.

    Raises:
        InputError: no sentences, or a sentence longer than ``spec.max_len`` tokens.
    """
    if not sentences:
        raise InputError("give at least one sentence")
    batch = tokenizer.encode_batch(list(sentences))
    for s, enc in zip(sentences, batch):
        n = sum(enc.attention_mask)
        if n > spec.max_len:
            raise InputError(f"sentence {s[:30]!r}... has {n} tokens, longer than "
                             f"max_len={spec.max_len}; shorten it")
    out = {"input_ids": np.array([e.ids for e in batch], np.int64),
           "attention_mask": np.array([e.attention_mask for e in batch], np.int64)}
    if spec.type_vocab_size:
        out["token_type_ids"] = np.array([e.type_ids for e in batch], np.int64)
    return out


def mean_pool(last_hidden_state: np.ndarray, attention_mask: np.ndarray,
              normalize: bool = True) -> np.ndarray:
    """Mean of the token vectors where ``attention_mask`` is 1, then L2-normalised: the
    sentence-transformers ``Pooling(mode_mean_tokens)`` + ``Normalize`` modules.

    Args:
        last_hidden_state: ``(B, T, D)``. attention_mask: ``(B, T)``.
    Returns:
        ``(B, D)`` in the dtype of ``last_hidden_state``.
    """
    mask = attention_mask.astype(last_hidden_state.dtype)[..., None]
    summed = (last_hidden_state * mask).sum(1)
    counts = np.clip(mask.sum(1), 1e-9, None)
    emb = summed / counts
    if normalize:
        emb = emb / np.clip(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12, None)
    return emb.astype(last_hidden_state.dtype)


def embed(model_dir: str | os.PathLike, sentences: Sequence[str], backend: str | None = None,
          dtype: str = "float32") -> np.ndarray:
    """Sentence embeddings ``(B, D)`` of a BERT checkpoint directory on one backend.

    Raises:
        XformerError subclasses for a bad directory, backend or sentence.
    """
    from .backend import build, get_backend
    from .convert import from_pretrained

    spec, weights = from_pretrained(model_dir)
    tokenizer = load_tokenizer(model_dir)
    inputs = encode(tokenizer, sentences, spec)
    be = get_backend(backend)
    model = build(spec, backend=be.name, dtype=dtype, weights=weights)
    out = be.forward(model, inputs)
    return mean_pool(out["last_hidden_state"], inputs["attention_mask"])
