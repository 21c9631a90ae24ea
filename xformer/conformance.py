"""The conformance engine: run one :class:`Case` on several (backend, mode) targets and on an
independent reference, and compare outputs and gradients tensor by tensor.

A case's loss is ``sum_k sum(outputs[k] * cotangents[k])`` with a fixed random cotangent;
gradients are taken w.r.t. every canonical parameter and w.r.t. ``inputs_embeds`` (DESIGN.md §4).

Error measure, for tensors ``a`` and ``b`` of one name: ``max_abs = max |a - b|`` and
``max_rel = max_abs / max(max |a|, max |b|)`` (relative to the tensor's largest magnitude, so
that elements near zero do not dominate; the message also gives where the worst element is).

Tolerances are stated once, here, per dtype. They are evidence, not knobs: the bounds of
issue #2 (float64 1e-11 everywhere; float32 1e-5 outputs, 1e-4 gradients).
"""

from __future__ import annotations

import itertools
import math
import platform
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .backend import check_dtype, check_inputs, get_backend, is_installed, timed
from .errors import BackendError
from .spec import ModelSpec
from .weights import check_weights, random_weights


@dataclass(frozen=True)
class Tolerance:
    """Largest allowed ``max_rel`` for outputs and for gradients."""

    output: float
    grad: float


#: Per-dtype tolerances (max relative error, see the module docstring).
TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(output=1e-11, grad=1e-11),
    "float32": Tolerance(output=1e-5, grad=1e-4),
}


# ---------------------------------------------------------------------- cases
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
    """

    spec: ModelSpec
    weights: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    cotangents: dict[str, np.ndarray]
    dtype: str = "float64"
    name: str = "case"

    @classmethod
    def make(cls, spec: ModelSpec, *, seed: int = 0, dtype: str = "float64", batch: int = 3,
             seq_len: int | None = None, weights: Mapping[str, np.ndarray] | None = None,
             input_ids: np.ndarray | None = None, attention_mask: np.ndarray | None = None,
             decoder_seq_len: int | None = None, fully_padded: bool = True,
             name: str | None = None) -> "Case":
        """A case with random inputs (or the given ``input_ids``/``attention_mask``).

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
        return cls(spec, weights, inputs, cot, dtype, name or f"seed{seed}-{dtype}")


# ---------------------------------------------------------------------- running
@dataclass(frozen=True)
class Target:
    """A (backend, mode) pair; ``label`` is ``"backend/mode"``."""

    backend: str
    mode: str

    @property
    def label(self) -> str:
        return f"{self.backend}/{self.mode}"

    @classmethod
    def parse(cls, text: str) -> "Target":
        backend, _, mode = text.partition("/")
        be = get_backend(backend)
        return cls(be.name, be.check_mode(mode or None))


def default_targets(backends: Iterable[str] | None = None, all_modes: bool = False
                    ) -> list[Target]:
    """Every default mode (or every mode) of each named backend (default: every installed)."""
    from .backend import available_backends

    names = list(backends) if backends else [b for b in available_backends() if is_installed(b)]
    out = []
    for name in names:
        be = get_backend(name)
        out += [Target(be.name, m) for m in (be.modes if all_modes else be.default_modes)]
    return out


@dataclass
class RunResult:
    """What one target produced for a case (numpy, canonical names)."""

    label: str
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    forward_s: float = float("nan")
    step_s: float = float("nan")


def run_target(case: Case, target: Target, repeats: int = 0) -> RunResult:
    """Build ``case.spec`` on ``target``, load the weights, and run forward and forward+backward.

    ``repeats > 0`` also times each call (median of ``repeats`` after one warm-up call).
    """
    be = get_backend(target.backend)
    model = be.build(case.spec, case.dtype)
    be.set_weights(model, case.weights)
    if repeats > 0:
        outputs, fwd = timed(be.forward, model, case.inputs, mode=target.mode, repeats=repeats)
        (_, grads), step = timed(be.forward_backward, model, case.inputs, case.cotangents,
                                 mode=target.mode, repeats=repeats)
    else:
        outputs = be.forward(model, case.inputs, mode=target.mode)
        _, grads = be.forward_backward(model, case.inputs, case.cotangents, mode=target.mode)
        fwd = step = float("nan")
    return RunResult(target.label, outputs, grads, fwd, step)


# ---------------------------------------------------------------------- references
def available_references() -> list[str]:
    names = ["numpy"]
    if is_installed("torch"):
        names.append("torch.nn")
        try:
            import importlib.util

            if importlib.util.find_spec("transformers") is not None:
                names.append("huggingface")
        except ValueError:
            pass
    return names


def run_reference(case: Case, name: str, repeats: int = 0) -> RunResult:
    """Run an independent implementation.

    * ``"numpy"``: :mod:`xformer.reference`, forward only.
    * ``"torch.nn"``: PyTorch's own layers with the same weights (outputs and gradients):
      ``nn.TransformerEncoderLayer`` stacks for encoders and (with a causal mask) decoders,
      ``nn.Transformer`` for encoder-decoders.
    * ``"huggingface"``: ``transformers.BertModel`` (BERT-shaped encoders) or
      ``GPT2LMHeadModel`` / ``GPT2Model`` (GPT-2-shaped decoders), same weights.
    """
    spec = case.spec
    if name == "numpy":
        from . import reference

        out = reference.forward(spec, case.weights, case.inputs, case.dtype)
        return RunResult("numpy", out, {})
    if name == "torch.nn":
        from xformer_torch.reference_nn import nn_transformer_reference

        model = nn_transformer_reference(spec, case.weights, case.dtype)
        tables = {"inputs_embeds": model.word_embeddings}
        if spec.architecture == "encoder-decoder":
            tables["decoder_inputs_embeds"] = model.decoder_word_embeddings
        return _run_torch_reference("torch.nn", model, case, tables, model.to_canonical,
                                    repeats)
    if name == "huggingface":
        if spec.architecture == "encoder":
            from .hf import bert_reference, bert_to_canonical

            model = bert_reference(spec, case.weights, case.dtype)
            return _run_torch_reference(
                "huggingface", model, case,
                {"inputs_embeds": model.embeddings.word_embeddings.weight}, bert_to_canonical,
                repeats)
        if spec.architecture == "decoder":
            from .hf import gpt2_reference, gpt2_to_canonical

            model = gpt2_reference(spec, case.weights, case.dtype)
            base = getattr(model, "transformer", model)
            return _run_torch_reference("huggingface", model, case,
                                        {"inputs_embeds": base.wte.weight}, gpt2_to_canonical,
                                        repeats)
        raise BackendError("no Hugging Face reference for encoder-decoders; use torch.nn")
    raise BackendError(f"unknown reference {name!r}; references: numpy, torch.nn, huggingface")


_IDS = {"inputs_embeds": "input_ids", "decoder_inputs_embeds": "decoder_input_ids"}


def _run_torch_reference(label: str, model, case: Case, tables, to_canonical,
                         repeats: int) -> RunResult:
    """Run a torch reference module. Token embeddings are looked up outside it from
    ``tables`` (``{"inputs_embeds": table, "decoder_inputs_embeds": table}``) and passed in, so
    their gradients come in the same pass; parameter gradients are mapped with
    ``to_canonical`` (``{native name: tensor}`` -> ``{canonical name: tensor}``)."""
    import torch

    dtype = getattr(torch, case.dtype)
    spec = case.spec
    scale = math.sqrt(spec.d_model) if spec.embed_scale else 1.0
    ids = {k: torch.as_tensor(case.inputs[_IDS[k]]) for k in tables}
    kwargs: dict[str, Any] = {k: torch.as_tensor(v) for k, v in case.inputs.items()
                              if k in ("attention_mask", "decoder_attention_mask",
                                       "token_type_ids")}
    cot = {k: torch.as_tensor(case.cotangents[k], dtype=dtype) for k in spec.output_names()}

    def embeds() -> dict[str, Any]:
        return {k: torch.nn.functional.embedding(ids[k], t) * scale for k, t in tables.items()}

    def forward():
        with torch.no_grad():
            out = model(**embeds(), **kwargs)
        return {k: _get(out, k).numpy() for k in spec.output_names()}

    def step():
        model.zero_grad(set_to_none=False)
        emb = embeds()
        for e in emb.values():
            e.retain_grad()
        out = model(**emb, **kwargs)
        loss = sum((_get(out, k) * cot[k]).sum() for k in spec.output_names())
        loss.backward()
        native = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
                  for n, p in model.named_parameters()}
        grads = {k: v.detach().numpy() for k, v in to_canonical(native).items()}
        grads.update({k: e.grad.numpy() for k, e in emb.items()})
        return grads

    if repeats > 0:
        outputs, fwd = timed(forward, repeats=repeats)
        grads, stp = timed(step, repeats=repeats)
    else:
        outputs, grads, fwd, stp = forward(), step(), float("nan"), float("nan")
    return RunResult(label, outputs, grads, fwd, stp)


def _get(out, key):
    return out[key] if isinstance(out, Mapping) else getattr(out, key)


# ---------------------------------------------------------------------- comparing
@dataclass(frozen=True)
class Diff:
    """The difference of one tensor between two runs.

    ``tensor`` is ``"output:<name>"`` or ``"grad:<name>"``; ``where`` the index of the largest
    absolute difference.
    """

    a: str
    b: str
    tensor: str
    max_abs: float
    max_rel: float
    tol: float
    where: tuple[int, ...] = ()

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)  # False for NaN

    def message(self) -> str:
        status = "ok" if self.ok else "MISMATCH"
        return (f"{status} {self.tensor}: {self.a} vs {self.b} max abs {self.max_abs:.3e}, "
                f"max rel {self.max_rel:.3e} (tol {self.tol:.0e}) at {list(self.where)}")


def diff_tensors(a_label: str, b_label: str, tensor: str, a: np.ndarray, b: np.ndarray,
                 tol: float, scale: float | None = None) -> Diff:
    """Compare two arrays (NaN anywhere or a shape mismatch gives ``max_rel = nan``, not ok).

    ``max_rel = max|a - b| / scale``, ``scale`` defaulting to ``max(max|a|, max|b|)``.
    """
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        return Diff(a_label, b_label, f"{tensor} (shapes {a.shape} vs {b.shape})", math.nan,
                    math.nan, tol)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        bad = np.argwhere(~(np.isfinite(a) & np.isfinite(b)))[0]
        return Diff(a_label, b_label, f"{tensor} (non-finite)", math.nan, math.nan, tol,
                    tuple(int(i) for i in bad))
    if a.size == 0:
        return Diff(a_label, b_label, tensor, 0.0, 0.0, tol)
    d = np.abs(a - b)
    idx = np.unravel_index(int(np.argmax(d)), d.shape)
    max_abs = float(d[idx])
    if scale is None:
        scale = max(float(np.abs(a).max()), float(np.abs(b).max()))
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    return Diff(a_label, b_label, tensor, max_abs, max_rel, tol, tuple(int(i) for i in idx))


#: Gradients that are zero in exact arithmetic: a key projection's bias adds ``q_i . b_k`` to
#: every logit of row ``i``, which softmax ignores. What backends return there is rounding noise
#: with no magnitude of its own, so its error is measured against the largest gradient of the
#: attention block's projection weights (and so checks that the noise is that small).
ZERO_GRADIENTS = re.compile(r"^(?P<block>.+\.(self|cross)_attn)\.k_proj\.bias$")


def _grad_scale(name: str, a: RunResult, b: RunResult) -> float | None:
    m = ZERO_GRADIENTS.match(name)
    if not m:
        return None
    sib = [f"{m['block']}.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
    return max(float(np.abs(r.grads[n]).max()) for r in (a, b) for n in sib if n in r.grads)


def compare_runs(a: RunResult, b: RunResult, tol: Tolerance) -> list[Diff]:
    """Every output and every gradient the two runs share, in canonical order."""
    diffs = [diff_tensors(a.label, b.label, f"output:{k}", a.outputs[k], b.outputs[k],
                          tol.output) for k in a.outputs if k in b.outputs]
    for k in a.grads:
        if k in b.grads:
            diffs.append(diff_tensors(a.label, b.label, f"grad:{k}", a.grads[k], b.grads[k],
                                      tol.grad, _grad_scale(k, a, b)))
    return diffs


# ---------------------------------------------------------------------- reports
@dataclass
class Report:
    """Results of one case: every run, every pairwise and reference diff, and the verdict."""

    case: Case
    runs: list[RunResult]
    reference: RunResult | None
    diffs: list[Diff] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(d.ok for d in self.diffs)

    @property
    def failures(self) -> list[Diff]:
        return [d for d in self.diffs if not d.ok]

    def worst(self, a: str | None = None, b: str | None = None, kind: str | None = None
              ) -> Diff | None:
        """The largest ``max_rel / tol`` among diffs that involve ``a`` (and ``b``) and whose
        tensor starts with ``kind`` (``"output"`` / ``"grad"``); NaN counts as worst."""
        sel = [d for d in self.diffs
               if (a is None or a in (d.a, d.b)) and (b is None or b in (d.a, d.b))
               and (kind is None or d.tensor.startswith(kind))]
        if not sel:
            return None
        return max(sel, key=lambda d: math.inf if math.isnan(d.max_rel) else d.max_rel / d.tol)

    def to_dict(self) -> dict[str, Any]:
        return {
            "case": self.case.name, "dtype": self.case.dtype, "spec": self.case.spec.to_dict(),
            "ok": self.ok,
            "tolerance": vars(TOLERANCES[self.case.dtype]),
            "reference": self.reference.label if self.reference else None,
            "reference_run": ({"forward_ms": _ms(self.reference.forward_s),
                               "forward_backward_ms": _ms(self.reference.step_s)}
                              if self.reference else None),
            "runs": [{"label": r.label, "forward_ms": _ms(r.forward_s),
                      "forward_backward_ms": _ms(r.step_s)} for r in self.runs],
            "diffs": [{"a": d.a, "b": d.b, "tensor": d.tensor, "max_abs": _num(d.max_abs),
                       "max_rel": _num(d.max_rel), "tol": d.tol, "where": list(d.where),
                       "ok": d.ok} for d in self.diffs],
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1e3, 3)


def _num(x: float) -> float | None:
    return None if math.isnan(x) else x


def run_case(case: Case, targets: Sequence[Target], reference: str | None = "numpy",
             repeats: int = 0, progress: Callable[[str], None] | None = None) -> Report:
    """Run ``case`` on every target and on ``reference`` (``None`` for none); compare every
    pair of targets and every target against the reference. ``progress(label)`` is called
    after each run (for a progress bar)."""
    tol = TOLERANCES[case.dtype]
    runs = []
    for t in targets:
        runs.append(run_target(case, t, repeats))
        if progress:
            progress(t.label)
    ref = run_reference(case, reference, repeats) if reference else None
    if ref is not None and progress:
        progress(ref.label)
    diffs: list[Diff] = []
    for a, b in itertools.combinations(runs, 2):
        diffs += compare_runs(a, b, tol)
    if ref is not None:
        for r in runs:
            diffs += compare_runs(r, ref, tol)
    return Report(case, runs, ref, diffs)


def environment() -> dict[str, str]:
    """Python, platform and framework versions of the installed backends."""
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine()}
    from .backend import available_backends

    for name in available_backends():
        if is_installed(name):
            try:
                env[name] = get_backend(name).framework_version()
            except BackendError as e:
                env[name] = f"unavailable ({e})"
    return env


# ---------------------------------------------------------------------- spec generation
#: Every value of every categorical field, per architecture (issues #2 and #3's coverage lists).
FIELD_VALUES: dict[str, tuple] = {
    "norm_position": ("post", "pre"),
    "activation": ("relu", "gelu", "gelu_tanh"),
    "positional": ("learned", "sinusoidal"),
    "type_vocab_size": (0, 2),
    "embedding_norm": (True, False),
    "final_norm": (False, True),
    "embed_scale": (False, True),
    "bias": (True, False),
    "head": ("pooler", "none"),
}
DECODER_FIELD_VALUES: dict[str, tuple] = {
    **{k: v for k, v in FIELD_VALUES.items() if k not in ("type_vocab_size", "head")},
    "head": ("lm", "none"),
    "tie_embeddings": (True, False),
}
ENCODER_DECODER_FIELD_VALUES: dict[str, tuple] = {
    **DECODER_FIELD_VALUES, "share_embeddings": (True, False),
}


def field_values(architecture: str) -> dict[str, tuple]:
    return {"encoder": FIELD_VALUES, "decoder": DECODER_FIELD_VALUES,
            "encoder-decoder": ENCODER_DECODER_FIELD_VALUES}[architecture]


def covering_specs(n: int = 6, seed: int = 0, architecture: str = "encoder") -> list[ModelSpec]:
    """``n`` small random specs (``n >= 3``) of ``architecture`` in which every value of every
    field in :func:`field_values` occurs at least once (each field cycles through its values
    from a random offset); sizes and ``norm_eps`` are drawn at random too. ``tie_embeddings``
    is dropped where ``head`` is not ``"lm"``."""
    rng = np.random.default_rng(seed)
    values = field_values(architecture)
    offsets = {k: int(rng.integers(len(v))) for k, v in values.items()}
    out = []
    for i in range(n):
        fields = {k: v[(i + offsets[k]) % len(v)] for k, v in values.items()}
        if fields.get("head") != "lm":
            fields["tie_embeddings"] = False
        n_heads = int(rng.choice([1, 2, 4]))
        extra = {}
        if architecture == "encoder-decoder":
            extra["n_decoder_layers"] = int(rng.integers(1, 3))
        out.append(ModelSpec(
            architecture=architecture,
            vocab_size=int(rng.integers(20, 100)), d_model=n_heads * int(rng.choice([4, 8])),
            n_heads=n_heads, d_ff=int(rng.integers(8, 40)), n_layers=int(rng.integers(1, 3)),
            max_len=int(rng.integers(8, 17)), norm_eps=float(rng.choice([1e-12, 1e-6, 1e-5])),
            **extra, **fields))
    return out


# ---------------------------------------------------------------------- generation
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
    from . import reference

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


# ---------------------------------------------------------------------- divergence localisation
@dataclass(frozen=True)
class NodeDiff:
    """The difference at one node between two traced runs (``direction``: ``forward`` is the
    node's output, ``backward`` the gradient flowing into it)."""

    name: str
    kind: str
    direction: str
    max_abs: float
    max_rel: float
    tol: float
    where: tuple[int, ...] = ()
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.max_rel <= self.tol)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "direction": self.direction,
                "max_abs": _num(self.max_abs), "max_rel": _num(self.max_rel), "tol": self.tol,
                "ok": self.ok, "where": list(self.where), "note": self.note}


@dataclass
class NodeTrace:
    """One traced run: node outputs and the gradients flowing into them."""

    label: str
    spec: ModelSpec
    forward: dict[str, np.ndarray]
    backward: dict[str, np.ndarray]


def trace_run(spec: ModelSpec, weights: Mapping[str, np.ndarray], case: Case, backend: str
              ) -> NodeTrace:
    """Build ``spec`` on ``backend`` with ``weights`` (cast to ``case.dtype``) and trace
    ``case``'s inputs and cotangents through it (:meth:`Backend.trace`)."""
    be = get_backend(backend)
    model = be.build(spec, case.dtype)
    be.set_weights(model, {k: np.asarray(v).astype(case.dtype) for k, v in
                           check_weights(spec, weights).items()})
    fwd, bwd = be.trace(model, case.inputs, case.cotangents)
    return NodeTrace(be.name, spec, fwd, bwd)


def diff_traces(a: NodeTrace, b: NodeTrace, dtype: str) -> list[NodeDiff]:
    """Per node, in side ``a``'s execution order: forward rows, then backward rows in reverse
    execution order (the order backpropagation visits them). A node only one side has, or a
    shape mismatch, is a row with ``max_rel = nan`` (not ok) and a note."""
    tol = TOLERANCES[dtype]
    kinds = dict(a.spec.nodes())
    kinds.update({n: k for n, k in b.spec.nodes() if n not in kinds})
    order = [n for n, _ in a.spec.nodes()] + [n for n, _ in b.spec.nodes()
                                                if n not in dict(a.spec.nodes())]
    rows = []
    for direction, names, t in (("forward", order, tol.output),
                                ("backward", order[::-1], tol.grad)):
        sa, sb = getattr(a, direction), getattr(b, direction)
        for name in names:
            if name not in sa or name not in sb:
                side = a.label if name in sa else b.label
                rows.append(NodeDiff(name, kinds[name], direction, math.nan, math.nan, t,
                                     note=f"only in {side}"))
                continue
            d = diff_tensors(a.label, b.label, name, sa[name], sb[name], t)
            note = "" if d.tensor == name else d.tensor[len(name):].strip()
            rows.append(NodeDiff(name, kinds[name], direction, d.max_abs, d.max_rel, t,
                                 d.where, note))
    return rows


def first_divergence(rows: Sequence[NodeDiff]) -> NodeDiff | None:
    """The first row past its tolerance (forward rows come first), or ``None``."""
    return next((r for r in rows if not r.ok), None)
