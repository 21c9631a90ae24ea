"""Shared helpers of the backend tests (the ``backend`` fixture is in conftest.py).

They live here, not in conftest.py, because conformance/ has a conftest.py of its own and
``from conftest import ...`` would find whichever pytest loaded last.

* ``SPECS``: the canonical small specs the behaviour tests run on (named after the model they
  imitate), ``TINY`` the finite-difference ones, ``covering(arch)`` the specs that take every
  value of every field, derived from :func:`xformer.conformance.field_values` (the spec's own
  choices) by :func:`xformer.conformance.covering_specs`.
* Numbers: :func:`rel`, :func:`max_rel`; inputs: :func:`make_inputs`, :func:`as_embeds`,
  :func:`cotangents`; models: :func:`built` (cached per backend, spec and dtype).
* :func:`native_call`: the native module called directly, numpy in and out, for the tests of
  behaviour that the three frameworks' modules share (defaults, input checks, dropout).

Relative error is ``max|a - b| / max|b|`` per tensor (docs/conformance.md). One exception:
the gradient of a ``k_proj.bias`` (self- or cross-attention) is exactly zero in exact arithmetic
(a key bias shifts every logit of a query row by the same ``q . b``, and softmax ignores that),
so its computed value is rounding noise; :func:`max_rel` measures it against the scale of the
same block's ``v_proj.bias`` gradient instead of its own.
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pytest

from xformer import ModelSpec, random_weights
from xformer.backend import check_inputs, get_backend
from xformer.reference import forward as reference_forward

B, S, T = 4, 7, 6  # batch, source (encoder) length, target (decoded) length

BASE = dict(vocab_size=37, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=9)
DEC = dict(BASE, architecture="decoder")
ED = dict(BASE, architecture="encoder-decoder")

#: The canonical specs of the behaviour tests.
SPECS = {
    # encoders
    "bert": ModelSpec(**BASE, type_vocab_size=2, head="pooler"),
    "vaswani_enc": ModelSpec(**BASE, norm_position="post", norm_eps=1e-5, activation="relu",
                             positional="sinusoidal", type_vocab_size=0, embedding_norm=False,
                             embed_scale=True),
    "pre_ln": ModelSpec(**BASE, norm_position="pre", norm_eps=1e-6, activation="gelu_tanh",
                        type_vocab_size=0, embedding_norm=False, final_norm=True),
    "nobias": ModelSpec(**{**BASE, "n_heads": 2}, norm_position="pre", activation="gelu",
                        positional="sinusoidal", type_vocab_size=3, embedding_norm=True,
                        final_norm=True, embed_scale=True, bias=False, head="pooler"),
    # decoders
    "gpt2": ModelSpec(**DEC, norm_position="pre", norm_eps=1e-5, activation="gelu_tanh",
                      embedding_norm=False, final_norm=True, tie_embeddings=True, head="lm"),
    "dec_post": ModelSpec(**DEC, activation="relu", positional="sinusoidal", embed_scale=True,
                          bias=False, head="lm"),
    "dec_none": ModelSpec(**DEC, norm_position="post", activation="gelu", final_norm=True,
                          head="none"),
    # encoder-decoders
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
_TINY = dict(vocab_size=11, d_model=8, n_heads=2, d_ff=12, n_layers=1, max_len=S,
             norm_eps=1e-6)
#: Finite-difference specs, one per architecture (one layer: the differences are many).
TINY = {
    "encoder": ModelSpec(**_TINY, activation="gelu", type_vocab_size=2, head="pooler"),
    "decoder": ModelSpec(architecture="decoder", **_TINY, norm_position="pre",
                         activation="gelu", final_norm=True, tie_embeddings=True, head="lm"),
    "encoder-decoder": ModelSpec(architecture="encoder-decoder", **_TINY, n_decoder_layers=2,
                                 activation="gelu_tanh", embed_scale=True, head="lm"),
}
ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")


def covering(architecture: str, n: int = 4, seed: int = 7) -> list[ModelSpec]:
    """Small specs of ``architecture`` that take every value of every field of
    ``xformer.conformance.field_values(architecture)`` (asserted here, so a new field value in
    the spec grows the tests without an edit)."""
    from xformer.conformance import covering_specs, field_values

    specs = [s.replace(max_len=max(s.max_len, S)) for s in covering_specs(n, seed, architecture)]
    for field, values in field_values(architecture).items():
        seen = {getattr(s, field) for s in specs}
        assert set(values) <= seen, (architecture, field, set(values) - seen)
    return specs


def covering_params() -> list:
    """``pytest.param(spec, id="encoder-0")`` for every covering spec of every architecture."""
    return [pytest.param(spec, id=f"{arch}-{i}") for arch in ARCHITECTURES
            for i, spec in enumerate(covering(arch))]


# ---------------------------------------------------------------------- numbers
def rel(a, b, scale: float | None = None) -> float:
    """``max|a - b| / max|b|`` (or ``/ scale``); the absolute error where the scale is 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max() if scale is None else scale
    diff = np.abs(a - b).max() if a.size else 0.0
    return float(diff / scale) if scale else float(diff)


def max_rel(got: dict, want: dict) -> tuple[float, str]:
    """``(worst relative error, its name)`` over the tensors of ``want`` (``got`` must have the
    same names); a ``k_proj.bias`` gradient is measured on its block's ``v_proj.bias`` scale
    (module docstring)."""
    assert set(got) == set(want), set(got) ^ set(want)
    errs = {}
    for k in want:
        scale = None
        if k.endswith("attn.k_proj.bias"):
            scale = np.abs(np.asarray(want[k.replace("k_proj", "v_proj")])).max()
        errs[k] = rel(got[k], want[k], scale)
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def assert_close(got: dict, want: dict, tol: float, what: str = "") -> None:
    err, worst = max_rel(got, want)
    assert err <= tol, (what, worst, err)


def to_numpy(x) -> np.ndarray:
    """A torch / TensorFlow / MXNet tensor (or numpy array) as numpy."""
    if hasattr(x, "asnumpy"):
        return x.asnumpy()
    if hasattr(x, "detach"):
        return x.detach().numpy()
    if hasattr(x, "numpy"):
        return x.numpy()
    return np.asarray(x)


# ---------------------------------------------------------------------- inputs
def mask_of(t: int, full_pad: bool = True, b: int = B) -> np.ndarray:
    """Row 0 attends everywhere, row 1 is padded at the end, row 2 at the start, row 3 fully.

    Without ``full_pad`` (for finite differences) rows 2 and 3 are padded in the middle: under
    a causal mask a padded *first* position leaves its query no allowed key, which then attends
    uniformly over all keys like a fully padded row. There the computed forward is flat in Q and
    K (every logit vanishes next to ``finfo.min``) while backprop returns the softmax Jacobian
    (softmax(s + c) = softmax(s)): finite differences measure the rounding, not the model. Those
    rows' gradients are checked between implementations instead (docs/conformance.md)."""
    m = np.ones((b, t), np.int64)
    m[1, t - 2:] = 0
    if full_pad:
        m[2, :2] = 0
        m[3:] = 0
    else:
        m[2, 1:3] = 0
        m[3:, 2:4] = 0
    return m


def make_inputs(spec: ModelSpec, seed: int = 0, embeds: bool = False, full_pad: bool = True,
                b: int = B, s: int = S, t: int = T, masks=None) -> dict[str, np.ndarray]:
    """Ids (or embeddings), masks and segment ids of every side of ``spec``: an encoder's
    inputs are ``s`` long, a decoder's ``t``, an encoder-decoder's ``s`` (source) and ``t``
    (target). The masks are :func:`mask_of`'s, or ``masks(side index, length)``."""
    rng = np.random.default_rng(seed)
    arch = spec.architecture
    sides = {"encoder": [("", s)], "decoder": [("", t)],
             "encoder-decoder": [("", s), ("decoder_", t)]}[arch]
    inputs = {}
    for i, (prefix, n) in enumerate(sides):
        mask = mask_of(n, full_pad, b) if masks is None else masks(i, n)
        inputs[f"{prefix}attention_mask"] = mask
        if embeds:
            inputs[f"{prefix}inputs_embeds"] = rng.standard_normal((b, n, spec.d_model))
        else:
            inputs[f"{prefix}input_ids"] = rng.integers(0, spec.vocab_size, (b, n))
    if spec.type_vocab_size:
        inputs["token_type_ids"] = rng.integers(0, spec.type_vocab_size, (b, s))
    return inputs


def embed_scale(spec: ModelSpec) -> float:
    return float(np.sqrt(spec.d_model)) if spec.embed_scale else 1.0


def as_embeds(spec: ModelSpec, weights, inputs) -> dict[str, np.ndarray]:
    """``inputs`` with every side's token ids replaced by their scaled embeddings."""
    out = {k: v for k, v in inputs.items() if not k.endswith("input_ids")}
    for prefix, side in (("", "encoder"), ("decoder_", "decoder")):
        if f"{prefix}input_ids" in inputs:
            table = weights[spec.word_embedding_name(side)]
            out[f"{prefix}inputs_embeds"] = table[inputs[f"{prefix}input_ids"]] * embed_scale(spec)
    return out


def cotangents(spec: ModelSpec, inputs, seed: int = 1) -> dict[str, np.ndarray]:
    """Random cotangents of every output, shaped after ``inputs``."""
    rng = np.random.default_rng(seed)
    first = inputs["attention_mask"] if "attention_mask" in inputs else next(iter(inputs.values()))
    b, s = first.shape[:2]
    t = inputs["decoder_attention_mask"].shape[1] if "decoder_attention_mask" in inputs else s
    shapes = {"last_hidden_state": (b, t, spec.d_model), "pooler_output": (b, spec.d_model),
              "logits": (b, t, spec.vocab_size), "encoder_last_hidden_state": (b, s, spec.d_model)}
    return {k: rng.standard_normal(shapes[k]) for k in spec.output_names()}


def reference(spec: ModelSpec, weights, inputs) -> dict[str, np.ndarray]:
    """:func:`xformer.reference.forward` in float64 of the checked inputs."""
    return reference_forward(spec, weights, check_inputs(spec, inputs, "float64"), "float64")


def loss(backend, model, inputs, cot, mode: str | None = None) -> float:
    """``sum_k sum(outputs[k] * cot[k])`` of a forward pass."""
    out = backend.forward(model, inputs, mode=mode)
    return float(sum(np.sum(np.asarray(out[k], np.float64) * cot[k]) for k in cot))


# ---------------------------------------------------------------------- models
def build_with(backend, spec: ModelSpec, weights, dtype: str = "float64"):
    """``(model, weights)``: ``spec`` built in ``dtype`` with ``weights`` loaded."""
    model = backend.build(spec, dtype)
    backend.set_weights(model, weights)
    return model, weights


@functools.lru_cache(maxsize=None)
def _built(name: str, spec: ModelSpec, dtype: str, seed: int):
    return build_with(get_backend(name), spec, random_weights(spec, seed, "float64"), dtype)


def built(backend, spec: ModelSpec, dtype: str = "float64", seed: int = 0, fresh: bool = False):
    """``(model, weights)``: ``spec`` built in ``dtype`` with ``random_weights(spec, seed)``.

    Shared by the tests of a session (one build per backend, spec, dtype and seed), so a test
    that changes the weights restores them (:func:`restored`); ``fresh=True`` builds a model of
    its own (a test that counts traces or compiles, or changes the model's state)."""
    if fresh:
        return _built.__wrapped__(backend.name, spec, dtype, seed)
    return _built(backend.name, spec, dtype, seed)


@contextlib.contextmanager
def restored(backend, model, weights):
    """Put ``weights`` back into ``model`` on the way out."""
    try:
        yield
    finally:
        backend.set_weights(model, weights)


# ---------------------------------------------------------------------- native modules
def native_call(backend, model, training: bool = False, **inputs) -> dict[str, np.ndarray]:
    """Call ``model`` (the native module) directly: numpy arrays in (converted to the
    framework's tensors; anything else passed as it is), ``{output name: numpy}`` out, in
    training mode (dropout on) with ``training``. A cache returned with ``use_cache=True`` is
    under ``"past_key_values"``, native."""
    name = backend.name
    if name == "torch":
        import torch

        args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                for k, v in inputs.items()}
        was = model.training
        model.train(training)
        try:
            out = model(**args)
        finally:
            model.train(was)
    elif name == "tensorflow":
        out = model(**inputs, training=training)
    else:
        import mxnet as mx

        args = {k: mx.nd.array(v, dtype=v.dtype) if isinstance(v, np.ndarray) else v
                for k, v in inputs.items()}
        with mx.autograd.train_mode() if training else mx.autograd.predict_mode():
            out = model(**args)
    if not isinstance(out, dict):
        out = out if isinstance(out, (tuple, list)) else (out,)
        names = list(model.spec.output_names())
        if inputs.get("use_cache"):
            names.append("past_key_values")
        out = {k: v for k, v in zip(names, out) if v is not None}
    return {k: v if k == "past_key_values" else to_numpy(v) for k, v in out.items()}
