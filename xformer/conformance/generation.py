"""Generation across backends: the same ids from every target, and where float32 may differ."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from ..backend import check_inputs, get_backend
from ..spec import ModelSpec
from .run import Target


def run_generation(spec: ModelSpec, weights: Mapping[str, np.ndarray], input_ids: np.ndarray,
                   targets: Sequence[Target], *, dtype: str = "float64", **kwargs: Any
                   ) -> dict[str, list[list[int]]]:
    """``{target label: generated ids per row}``: ``Backend.generate`` on every target with the
    same weights (``kwargs``: see :func:`xformer.generation.generate`)."""
    out = {}
    for t in targets:
        be = get_backend(t.backend)
        model = be.build(spec, dtype)
        be.set_weights(model, weights)
        out[t.label] = be.generate(model, input_ids, **kwargs)
    return out


def greedy_margins(spec: ModelSpec, weights: Mapping[str, np.ndarray], input_ids: np.ndarray,
                   generated: Sequence[Sequence[int]], attention_mask: np.ndarray | None = None,
                   decoder_start_token_id: int | None = None) -> list[np.ndarray]:
    """Per row, at each generated step: ``(top-1 logit - top-2 logit) / max |logits|`` from the
    float64 numpy reference, teacher-forced on the generated tokens. A float32 argmax can
    legitimately differ between backends only where this is within float32 noise."""
    from .. import reference

    out = []
    for row, gen in enumerate(generated):
        if not gen:
            out.append(np.zeros(0))
            continue
        src = np.asarray(input_ids[row: row + 1], np.int64)
        if spec.architecture == "decoder":
            seq = np.concatenate([src, np.asarray([gen], np.int64)], axis=1)
            inputs = {"input_ids": seq[:, :-1]}
            first = src.shape[1] - 1
        else:
            start = spec.bos_token_id if decoder_start_token_id is None else (
                decoder_start_token_id)
            inputs = {"input_ids": src, "decoder_input_ids": np.asarray([[start, *gen[:-1]]])}
            if attention_mask is not None:
                inputs["attention_mask"] = np.asarray(attention_mask[row: row + 1])
            first = 0
        logits = reference.forward(spec, weights, check_inputs(spec, inputs, "float64"),
                                   "float64")["logits"][0, first:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        out.append((top2[:, 1] - top2[:, 0]) / np.abs(logits).max())
    return out
