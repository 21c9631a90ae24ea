"""What a conformance experiment is (:class:`Case`), what a run of it gives (:class:`RunResult`),
and how close two runs must be (:data:`TOLERANCES`).

A case's loss is ``sum_k sum(outputs[k] * cotangents[k])`` with a fixed random cotangent;
gradients are taken w.r.t. every canonical parameter and w.r.t. ``inputs_embeds``
(docs/design.md §4).

Tolerances are stated once, here, per dtype. They are evidence, not knobs: the bounds of
issue #2 (float64 1e-11 everywhere; float32 1e-5 outputs, 1e-4 gradients), on ``max_rel``
(:func:`xformer.conformance.diff_tensors`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..backend import check_dtype, check_inputs
from ..spec import ModelSpec
from ..weights import check_weights, random_weights


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed ``max_rel`` for outputs and for gradients."""

    output: float
    grad: float


#: Per-dtype tolerances (max relative error, see :func:`xformer.conformance.diff_tensors`).
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(output=1e-11, grad=1e-11),
    "float32": Tolerance(output=1e-5, grad=1e-4),
}


@dataclass
class Case:
    """One conformance experiment.

    Attributes:
        spec: the model.
        weights: canonical weights (cast to ``dtype`` when loaded).
        inputs: model inputs (see :class:`xformer.backend.Backend`).
        cotangents: ``{output name: array}``, same shapes as the outputs.
        dtype: ``"float32"`` or ``"float64"``.
        name: a label for reports.
        model_type: the Hugging Face ``model_type`` of the checkpoint the case came from
            (``"mistral"``, ...), or ``None``; the ``huggingface`` reference then builds that
            class, not the one :func:`xformer.convert.huggingface_model_type` would pick.
    """

    spec: ModelSpec
    weights: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    cotangents: dict[str, np.ndarray]
    dtype: str = "float64"
    name: str = "case"
    model_type: str | None = None

    @classmethod
    def make(cls, spec: ModelSpec, *, seed: int = 0, dtype: str = "float64", batch: int = 3,
             seq_len: int | None = None, weights: Mapping[str, np.ndarray] | None = None,
             input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
             decoder_seq_len: int | None = None, fully_padded: bool = True,
             name: str | None = None, model_type: str | None = None) -> "Case":
        """A case with random inputs (or the given ``input_ids``/``attention_mask``);
        ``model_type`` is stored as :attr:`model_type`.

        Random masks: row 0 attends everywhere, the middle rows are padded at the end, and the
        last row is fully padded (``fully_padded``), the case that gives NaN with ``-inf`` masks.
        Encoder-decoders get the same kind of mask on both sides.
        """
        dtype = check_dtype(dtype)
        rng = np.random.default_rng(seed)
        if weights is None:
            weights = random_weights(spec, seed=seed, dtype="float64")
        weights = {k: np.asarray(v).astype(dtype) for k, v in
                   check_weights(spec, weights).items()}

        def mask(b: int, t: int) -> np.ndarray:
            m = np.ones((b, t), np.int64)
            for row in range(1, b):
                m[row, max(1, t - 2 * row):] = 0
            if fully_padded and b > 1:
                m[-1] = 0
            return m

        if input_ids is None:
            t = seq_len or min(spec.max_len, 12)
            input_ids = rng.integers(0, spec.vocab_size, size=(batch, t))
        input_ids = np.asarray(input_ids, np.int64)
        b, t = input_ids.shape
        if attention_mask is None:
            attention_mask = mask(b, t)
        inputs = {"input_ids": input_ids, "attention_mask": np.asarray(attention_mask)}
        if spec.type_vocab_size:
            inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, size=(b, t))
        out_t = t
        if spec.architecture == "encoder-decoder":
            out_t = decoder_seq_len or max(1, min(spec.max_len, t - 2))
            inputs["decoder_input_ids"] = rng.integers(0, spec.vocab_size, size=(b, out_t))
            inputs["decoder_attention_mask"] = mask(b, out_t)
        inputs = check_inputs(spec, inputs, dtype)
        d, v = spec.d_model, spec.vocab_size
        shapes = {"last_hidden_state": (b, out_t, d), "pooler_output": (b, d),
                  "encoder_last_hidden_state": (b, t, d), "logits": (b, out_t, v)}
        cot = {k: rng.standard_normal(shapes[k]).astype(dtype) for k in spec.output_names()}
        return cls(spec, weights, inputs, cot, dtype, name or f"seed{seed}-{dtype}",
                   model_type)


@dataclass
class RunResult:
    """What one target or reference produced for a case (numpy, canonical names).

    Attributes:
        label: ``"backend/mode"`` or the reference's name.
        outputs: ``{output name: array}``.
        grads: ``{canonical parameter name or "inputs_embeds": array}`` (empty for a
            forward-only reference).
        forward_s, step_s: median seconds of one forward / forward+backward call (NaN when
            not timed).
    """

    label: str
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    forward_s: float = float("nan")
    step_s: float = float("nan")
