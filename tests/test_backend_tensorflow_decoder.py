"""Unit tests of the TensorFlow (Keras 3) backend for decoders (GPT-like) and encoder-decoders
(Vaswani 2017): canonical weights, forward against the numpy reference, gradients against
finite differences, modes against each other, and cached (incremental) decoding against the full
forward pass.

Errors are ``max|a - b| / max|b|`` per tensor (as conformance measures them).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import xformer  # noqa: E402
from xformer import InputError, ModelSpec, random_weights  # noqa: E402
from xformer.reference import forward as reference_forward  # noqa: E402
from xformer_tensorflow import modules  # noqa: E402
from xformer_tensorflow.backend import DecodeCache, TensorFlowBackend  # noqa: E402

tf.get_logger().setLevel("ERROR")  # per-model tf.functions trip the retracing warning

SMALL = dict(vocab_size=30, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=12)
DEC = dict(SMALL, architecture="decoder")
ENCDEC = dict(SMALL, architecture="encoder-decoder")

#: Between them, every value of every field that matters for decoders and encoder-decoders.
SPECS = {
    "gpt2": ModelSpec(**DEC, norm_position="pre", activation="gelu_tanh", positional="learned",
                      embedding_norm=False, final_norm=True, tie_embeddings=True, head="lm",
                      norm_eps=1e-5),
    "dec_post_sin": ModelSpec(**DEC, norm_position="post", activation="gelu",
                              positional="sinusoidal", embedding_norm=True, embed_scale=True,
                              head="lm", norm_eps=1e-12),
    "dec_nobias_none": ModelSpec(**{**DEC, "n_layers": 1}, norm_position="pre",
                                 activation="relu", positional="learned", embedding_norm=False,
                                 final_norm=True, bias=False, head="none", norm_eps=1e-6),
    "vaswani": ModelSpec(**{**ENCDEC, "n_layers": 1}, n_decoder_layers=2, norm_position="post",
                         activation="relu",
                         positional="sinusoidal", embedding_norm=False, embed_scale=True,
                         share_embeddings=True, tie_embeddings=True, head="lm", norm_eps=1e-5),
    "encdec_pre_untied": ModelSpec(**ENCDEC, n_decoder_layers=1,
                                   norm_position="pre", activation="gelu", positional="learned",
                                   embedding_norm=True, final_norm=True, bias=False, head="lm",
                                   norm_eps=1e-12),
    "encdec_tied_unshared": ModelSpec(**ENCDEC, norm_position="post", activation="gelu_tanh",
                                      positional="learned", embedding_norm=True,
                                      tie_embeddings=True, head="lm", norm_eps=1e-12),
    "encdec_shared_none": ModelSpec(**ENCDEC, n_decoder_layers=1, norm_position="pre",
                                    activation="relu", positional="sinusoidal",
                                    embedding_norm=False, final_norm=True, embed_scale=True,
                                    share_embeddings=True, head="none", norm_eps=1e-6),
}
TINY_DEC = ModelSpec(architecture="decoder", vocab_size=11, d_model=8, n_heads=2, d_ff=12,
                     n_layers=1, max_len=6, activation="gelu", embedding_norm=False,
                     tie_embeddings=True, head="lm", norm_eps=1e-12)
TINY_ENCDEC = ModelSpec(architecture="encoder-decoder", vocab_size=11, d_model=8, n_heads=2,
                        d_ff=12, n_layers=1, max_len=6, activation="gelu_tanh",
                        positional="sinusoidal", embed_scale=True, head="lm", norm_eps=1e-12)

#: Gradients that are exactly zero in exact arithmetic: a key bias adds the same q.b to every
#: logit of a row, and softmax is shift invariant. Compared on the model's gradient scale.
ZERO_GRADS = ("self_attn.k_proj.bias", "cross_attn.k_proj.bias")


@pytest.fixture(scope="module")
def be() -> TensorFlowBackend:
    return xformer.get_backend("tensorflow")


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.abs(b).max()
    return float(np.abs(a - b).max() / scale) if scale > 0 else float(np.abs(a).max())


def grad_errors(a: dict, b: dict) -> dict[str, float]:
    """Relative error per gradient; the exactly-zero ones relative to the largest gradient."""
    scale = max(np.abs(v).max() for v in b.values())
    return {k: (float(np.abs(a[k] - b[k]).max() / scale) if k.endswith(ZERO_GRADS)
                else rel(a[k], b[k])) for k in b}


def padding(b: int, t: int, fully_padded: bool = True) -> np.ndarray:
    """Row 0 attends everywhere, row 1 is padded at the end, the last row is fully padded."""
    mask = np.ones((b, t))
    mask[1, t - 2:] = 0
    if fully_padded:
        mask[b - 1, :] = 0
    return mask


def make_inputs(spec: ModelSpec, b: int = 3, t: int = 7, t_dec: int = 5, seed: int = 1,
                fully_padded: bool = True) -> dict[str, np.ndarray]:
    """Token ids and masks of every side of ``spec`` (``t`` source, ``t_dec`` target)."""
    rng = np.random.default_rng(seed)
    inputs = {"input_ids": rng.integers(0, spec.vocab_size, (b, t)),
              "attention_mask": padding(b, t, fully_padded)}
    if spec.architecture == "encoder-decoder":
        inputs["decoder_input_ids"] = rng.integers(0, spec.vocab_size, (b, t_dec))
        inputs["decoder_attention_mask"] = padding(b, t_dec, fully_padded)
    return inputs


def as_embeds(spec: ModelSpec, weights, inputs) -> dict[str, np.ndarray]:
    """``inputs`` with the token ids replaced by their (scaled) embeddings."""
    scale = np.sqrt(spec.d_model) if spec.embed_scale else 1.0
    out = {k: v for k, v in inputs.items() if not k.endswith("input_ids")}
    out["inputs_embeds"] = weights[spec.word_embedding_name("encoder")][
        inputs["input_ids"]] * scale
    if "decoder_input_ids" in inputs:
        out["decoder_inputs_embeds"] = weights[spec.word_embedding_name("decoder")][
            inputs["decoder_input_ids"]] * scale
    return out


def cotangents(spec: ModelSpec, inputs, seed: int = 2) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, s = inputs["attention_mask"].shape
    t = inputs["decoder_attention_mask"].shape[1] if "decoder_attention_mask" in inputs else s
    shapes = {"last_hidden_state": (b, t, spec.d_model), "logits": (b, t, spec.vocab_size),
              "encoder_last_hidden_state": (b, s, spec.d_model)}
    return {k: rng.standard_normal(shapes[k]) for k in spec.output_names()}


def built(be, spec, dtype="float64", seed=0):
    model = be.build(spec, dtype)
    weights = random_weights(spec, seed, "float64")
    be.set_weights(model, weights)
    return model, weights


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize("name", SPECS)
def test_canonical_names_shapes_dtypes(be, name):
    spec = SPECS[name]
    model = be.build(spec, "float64")
    cls = {"decoder": modules.DecoderModel, "encoder-decoder": modules.EncoderDecoderModel}
    assert isinstance(model, cls[spec.architecture]) and model.spec == spec
    table = be.variables(model)
    assert list(table) == [p.name for p in spec.parameters()]
    # every trainable variable exactly once (a tied head or shared table adds none)
    assert sorted(id(v) for v, _ in table.values()) == sorted(id(v) for v in
                                                              model.trainable_variables)
    assert model.non_trainable_variables == []
    for p in spec.parameters():
        var, transposed = table[p.name]
        assert tuple(var.shape) == (p.shape[::-1] if transposed else p.shape), p.name
        assert var.dtype == "float64", p.name
    layers = model._flatten_layers(include_self=True, recursive=True)
    assert {layer.dtype_policy.name for layer in layers} == {"float64"}
    weights = random_weights(spec, 3, "float64")
    be.set_weights(model, weights)
    for k, v in be.get_weights(model).items():
        np.testing.assert_array_equal(v, weights[k], err_msg=k)


# ---------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", SPECS)
def test_forward_matches_reference_float64(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    ref = reference_forward(spec, weights, inputs, "float64")
    cot = cotangents(spec, inputs)
    outs, grads = be.forward_backward(model, inputs, cot, mode="eager")
    assert set(outs) == set(spec.output_names())
    for k in ref:
        assert outs[k].dtype == np.float64 and outs[k].shape == ref[k].shape, k
        assert np.isfinite(outs[k]).all(), k
        assert rel(outs[k], ref[k]) <= 1e-12, (k, rel(outs[k], ref[k]))
    # fully padded rows on both sides attend uniformly: no NaN in any gradient
    shapes = {**spec.parameter_shapes(), "inputs_embeds": (3, 7, spec.d_model),
              "decoder_inputs_embeds": (3, 5, spec.d_model)}
    assert set(grads) == set(spec.parameter_shapes()) | set(spec.input_embeds_names())
    for k, g in grads.items():
        assert np.isfinite(g).all(), k
        assert g.shape == shapes[k], k
    if spec.head == "lm":
        assert np.abs(grads[spec.lm_head_name()]).max() > 0


@pytest.mark.parametrize("name", ["gpt2", "dec_post_sin", "vaswani", "encdec_pre_untied"])
def test_forward_matches_reference_float32(be, name):
    """float32 outputs against the float64 reference, gradients against float64 ones."""
    spec = SPECS[name]
    model, weights = built(be, spec, "float32")
    inputs = make_inputs(spec)
    ref = reference_forward(spec, weights, inputs, "float64")
    cot = cotangents(spec, inputs)
    out, grads = be.forward_backward(model, inputs, cot, mode="eager")
    for k in ref:
        assert out[k].dtype == np.float32
        assert rel(out[k], ref[k]) <= 1e-5, (k, rel(out[k], ref[k]))
    _, want = be.forward_backward(built(be, spec)[0], inputs, cot, mode="eager")
    errors = grad_errors(grads, want)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-4, (worst, errors[worst])


@pytest.mark.parametrize("name", ["gpt2", "vaswani"])
def test_modes_agree_float64(be, name):
    """Every mode against eager (a 1-layer GPT-2 keeps the XLA compiles short); then function
    mode with other lengths (``reduce_retracing``: the third call traces with T = None)."""
    spec = SPECS[name] if name != "gpt2" else SPECS[name].replace(n_layers=1)
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    out0, g0 = be.forward_backward(model, inputs, cot, mode=be.modes[0])
    for mode in be.modes[1:]:
        fwd = be.forward(model, inputs, mode=mode)
        out, grads = be.forward_backward(model, inputs, cot, mode=mode)
        for k in out0:
            assert rel(fwd[k], out0[k]) <= 1e-12, (mode, k, rel(fwd[k], out0[k]))
            assert rel(out[k], out0[k]) <= 1e-12, (mode, k, rel(out[k], out0[k]))
        errors = grad_errors(grads, g0)
        worst = max(errors, key=errors.get)
        assert errors[worst] <= 1e-12, (mode, worst, errors[worst])
    for t, t_dec in ((5, 4), (6, 6), (9, 3)):
        inputs = make_inputs(spec, t=t, t_dec=t_dec)
        ref = reference_forward(spec, weights, inputs, "float64")
        out = be.forward(model, inputs, mode="function")
        for k in ref:
            assert rel(out[k], ref[k]) <= 1e-12, (t, t_dec, k)
    assert be._compiled(model, "forward", "function").experimental_get_tracing_count() <= 3


@pytest.mark.parametrize("name", ["gpt2", "vaswani", "encdec_tied_unshared"])
def test_inputs_embeds_path_equals_input_ids_path(be, name):
    spec = SPECS[name]
    model, weights = built(be, spec)
    inputs = make_inputs(spec)
    via_embeds = as_embeds(spec, weights, inputs)
    cot = cotangents(spec, inputs)
    out_ids, g_ids = be.forward_backward(model, inputs, cot, mode="eager")
    out_emb, g_emb = be.forward_backward(model, via_embeds, cot, mode="eager")
    for k in out_ids:
        assert rel(out_emb[k], out_ids[k]) <= 1e-15, k
    tables = {spec.word_embedding_name("encoder"), spec.word_embedding_name("decoder")}
    errors = grad_errors({k: v for k, v in g_emb.items() if k not in tables},
                         {k: v for k, v in g_ids.items() if k not in tables})
    assert max(errors.values()) <= 1e-13, max(errors.items(), key=lambda kv: kv[1])
    # chain rule of the lookups: d table[i] = scale * (sum of d embeds at the positions of i),
    # plus, through the embeds path, what is left: the tied LM head's share (else nothing)
    scale = np.sqrt(spec.d_model) if spec.embed_scale else 1.0
    want = {k: g_emb[k].copy() for k in tables}
    np.add.at(want[spec.word_embedding_name("encoder")], inputs["input_ids"],
              g_ids["inputs_embeds"] * scale)
    if spec.architecture == "encoder-decoder":
        np.add.at(want[spec.word_embedding_name("decoder")], inputs["decoder_input_ids"],
                  g_ids["decoder_inputs_embeds"] * scale)
    for k in tables:
        assert rel(g_ids[k], want[k]) <= 1e-13, k
        head_only = spec.tie_embeddings and k == spec.word_embedding_name("decoder")
        assert (np.abs(g_emb[k]).max() > 0) == head_only, k


# ---------------------------------------------------------------------- gradients
@pytest.mark.parametrize("spec", [TINY_DEC, TINY_ENCDEC], ids=["decoder", "encoder-decoder"])
def test_gradients_match_finite_differences(be, spec):
    """Central differences of the backend's own float64 loss along random directions, for a few
    parameters and the input embeddings; and of the numpy reference for every parameter.
    Partial padding only: a fully padded row's forward does not change with Q and K (every logit
    is finfo.min), so finite differences cannot check its q/k gradients (docs/conformance.md)."""
    model, weights = built(be, spec)
    inputs = make_inputs(spec, b=3, t=5, t_dec=4, fully_padded=False)
    cot = cotangents(spec, inputs)
    _, grads = be.forward_backward(model, inputs, cot)
    rng = np.random.default_rng(7)
    eps = 1e-5

    def loss(out):
        return sum(float(np.sum(out[k] * cot[k])) for k in cot)

    def backend_loss(w, inp):
        be.set_weights(model, w)
        return loss(be.forward(model, inp))

    def reference_loss(w, inp):
        return loss(reference_forward(spec, w, inp, "float64"))

    def directional(fn, w, inp, name):
        d = rng.standard_normal(grads[name].shape)
        if name in inp:
            plus = fn(w, {**inp, name: inp[name] + eps * d})
            minus = fn(w, {**inp, name: inp[name] - eps * d})
        else:
            plus = fn({**w, name: w[name] + eps * d}, inp)
            minus = fn({**w, name: w[name] - eps * d}, inp)
        fd, analytic = (plus - minus) / (2 * eps), float(np.sum(grads[name] * d))
        return abs(fd - analytic) / max(abs(analytic), 1e-2)  # k_proj.bias: 0

    embeds_inputs = as_embeds(spec, weights, inputs)
    if spec.architecture == "decoder":  # tied: the table is looked up and is the LM head
        few = ["inputs_embeds", "embeddings.word_embeddings.weight",
               "embeddings.position_embeddings.weight", "decoder.layers.0.self_attn.q_proj.weight",
               "decoder.layers.0.norm2.weight", "decoder.layers.0.ffn.linear2.bias"]
    else:
        few = ["inputs_embeds", "decoder_inputs_embeds", "lm_head.weight",
               "decoder_embeddings.word_embeddings.weight",
               "decoder.layers.0.cross_attn.k_proj.weight",
               "decoder.layers.0.cross_attn.v_proj.bias", "decoder.layers.0.norm3.bias",
               "encoder.layers.0.self_attn.out_proj.weight"]
    errors = {n: directional(backend_loss, weights, embeds_inputs if n.endswith("_embeds")
                             else inputs, n) for n in few}
    be.set_weights(model, weights)
    for name in spec.parameter_shapes():
        errors[f"ref:{name}"] = directional(reference_loss, weights, inputs, name)
    for name in spec.input_embeds_names():
        errors[f"ref:{name}"] = directional(reference_loss, weights, embeds_inputs, name)
    worst = max(errors, key=errors.get)
    assert errors[worst] <= 1e-6, (worst, errors[worst])


# ---------------------------------------------------------------------- cached decoding
def decode_case(spec: ModelSpec, b: int = 3, t: int = 8, seed: int = 4):
    """Full inputs for cached decoding: row 0 attends everywhere, row 1 is padded at the end,
    row 2 at the start (as batched generation pads prompts); the source has a fully padded row.
    ``valid[r, i]``: query ``i`` of row ``r`` may attend to at least one key."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t))
    mask[1, t - 3:] = 0
    mask[2, :2] = 0
    inputs = {"ids": rng.integers(0, spec.vocab_size, (b, t)), "mask": mask}
    if spec.architecture == "encoder-decoder":
        inputs["source_ids"] = rng.integers(0, spec.vocab_size, (b, 6))
        inputs["source_mask"] = padding(b, 6)
    return inputs, np.cumsum(mask, axis=1) > 0


def full_inputs(spec: ModelSpec, case) -> dict[str, np.ndarray]:
    if spec.architecture == "decoder":
        return {"input_ids": case["ids"], "attention_mask": case["mask"]}
    return {"input_ids": case["source_ids"], "attention_mask": case["source_mask"],
            "decoder_input_ids": case["ids"], "decoder_attention_mask": case["mask"]}


def step_inputs(spec: ModelSpec, case, start: int, stop: int, first: bool):
    """``decode`` inputs for target positions ``start .. stop - 1``."""
    side = "decoder_" if spec.architecture == "encoder-decoder" else ""
    out = {f"{side}input_ids": case["ids"][:, start:stop],
           f"{side}attention_mask": case["mask"][:, :stop]}
    if side and first:
        out.update(input_ids=case["source_ids"], attention_mask=case["source_mask"])
    return out


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["gpt2", "dec_post_sin", "vaswani", "encdec_pre_untied"])
def test_cached_decoding_equals_full_forward(be, name, dtype):
    """Prompt, then one token at a time, with the batch permuted (and then a row duplicated and
    one dropped, as beam search does) in between, against one full forward pass.

    Queries that may attend to no key at all (row 2's leading padding) are left out: the full
    pass spreads them uniformly over all T keys, decoding over the keys so far; both are
    arbitrary, and nothing valid attends to them."""
    spec = SPECS[name]
    model, _ = built(be, spec, dtype)
    case0, valid = decode_case(spec)
    # the full pass in function mode first: decoding must not care that the model was traced
    full = be.forward(model, full_inputs(spec, case0), mode="function")["logits"]
    tol = 1e-12 if dtype == "float64" else 1e-5
    errors = []
    # traced (the default) and, in float64, plain calls
    for mode in ("function", "eager") if dtype == "float64" else ("function",):
        case = case0
        logits, cache = be.decode(model, step_inputs(spec, case, 0, 3, first=True), mode=mode)
        assert isinstance(cache, DecodeCache) and cache.past_length == 3
        assert logits.dtype == np.dtype(dtype) and logits.shape == (3, 3, spec.vocab_size)
        errors.append(rel(logits[valid[:, :3]], full[:, :3][valid[:, :3]]))
        rows = np.arange(3)
        for pos, reorder in ((3, None), (4, [2, 0, 1]), (5, None), (6, [1, 1, 0]), (7, None)):
            if reorder is not None:
                cache = be.reorder_cache(model, cache, np.array(reorder))
                rows = rows[reorder]
                case = {k: v[reorder] for k, v in case.items()}
            logits, cache = be.decode(model, step_inputs(spec, case, pos, pos + 1, first=False),
                                      cache, mode=mode)
            assert cache.past_length == pos + 1 and logits.shape == (3, 1, spec.vocab_size)
            ok = valid[rows, pos]
            errors.append(rel(logits[ok, 0], full[rows, pos][ok]))
    k = cache.past_key_values[0][0]
    assert tuple(k.shape) == (3, spec.n_heads, 8, spec.d_head) and k.dtype == dtype
    if spec.architecture == "encoder-decoder":
        assert len(cache.past_key_values[0]) == 4
        assert tuple(cache.past_key_values[0][2].shape) == (3, spec.n_heads, 6, spec.d_head)
    assert max(errors) <= tol, errors


def test_decode_errors(be):
    spec = SPECS["gpt2"]
    model, _ = built(be, spec)
    ids = np.zeros((2, spec.max_len - 2), "int64")
    _, cache = be.decode(model, {"input_ids": ids})
    _, cache = be.decode(model, {"input_ids": ids[:, :2]}, cache)  # exactly max_len
    assert cache.past_length == spec.max_len
    with pytest.raises(InputError, match="max_len"):
        be.decode(model, {"input_ids": ids[:, :1]}, cache)
    with pytest.raises(InputError, match="max_len"):
        be.decode(model, {"input_ids": np.zeros((2, spec.max_len + 1), "int64")})
    _, cache = be.decode(model, {"input_ids": ids[:, :3]})
    with pytest.raises(InputError, match="attention_mask"):  # must cover past + new
        be.decode(model, {"input_ids": ids[:, :1], "attention_mask": np.ones((2, 1))}, cache)
    with pytest.raises(InputError, match="batch size"):
        be.decode(model, {"input_ids": ids[:1, :1]}, cache)
    with pytest.raises(InputError, match="beam_idx"):
        be.reorder_cache(model, cache, np.array([0, 2]))
    with pytest.raises(InputError, match="head='lm'"):
        be.decode(be.build(SPECS["dec_nobias_none"], "float64"), {"input_ids": ids})
    encdec = SPECS["vaswani"]
    model, _ = built(be, encdec)
    first = {"input_ids": ids, "decoder_input_ids": ids[:, :1]}
    _, cache = be.decode(model, first)
    for _ in range(spec.max_len - 1):
        _, cache = be.decode(model, {"decoder_input_ids": ids[:, :1]}, cache, mode="eager")
    with pytest.raises(InputError, match="max_len"):
        be.decode(model, {"decoder_input_ids": ids[:, :1]}, cache)
    with pytest.raises(InputError, match="decoder_input_ids"):
        be.decode(model, {"input_ids": ids})


# ---------------------------------------------------------------------- native layers
def test_native_models_call_cache_and_config(be):
    spec = SPECS["dec_post_sin"]
    model, _ = built(be, spec)
    ids = np.array([[1, 2, 3, 4, 5]])
    full = model(input_ids=ids)
    assert sorted(full) == ["last_hidden_state", "logits"]
    out = model(input_ids=ids[:, :3], use_cache=True)
    assert len(out["past_key_values"]) == spec.n_layers
    step = model(input_ids=ids[:, 3:], past_key_values=out["past_key_values"], use_cache=True)
    assert rel(step["logits"].numpy(), full["logits"].numpy()[:, 3:]) <= 1e-12
    with pytest.raises(InputError, match="max_len"):
        model(input_ids=np.zeros((1, 8), "int64"), past_key_values=step["past_key_values"])
    clone = modules.DecoderModel.from_config(model.get_config())
    clone.build()
    assert clone.spec == spec and clone.dtype == "float64"
    be.set_weights(clone, be.get_weights(model))
    np.testing.assert_array_equal(clone(input_ids=ids)["logits"].numpy(),
                                  full["logits"].numpy())

    spec = SPECS["vaswani"]
    model, weights = built(be, spec)
    assert model.decoder_embeddings.word_embeddings is None  # shared: one table, one variable
    src, tgt = np.array([[3, 4, 5, 6]]), np.array([[0, 7, 8]])
    full = model(input_ids=src, decoder_input_ids=tgt)
    reused = model(attention_mask=np.ones((1, 4)), decoder_input_ids=tgt,
                   encoder_outputs=full["encoder_last_hidden_state"])
    np.testing.assert_array_equal(reused["logits"].numpy(), full["logits"].numpy())
    with pytest.raises(InputError, match="shares the source token table"):
        model.decoder_embeddings(input_ids=tgt)
    clone = modules.EncoderDecoderModel.from_config(model.get_config())
    clone.build()
    be.set_weights(clone, weights)
    np.testing.assert_array_equal(clone(input_ids=src, decoder_input_ids=tgt)["logits"].numpy(),
                                  full["logits"].numpy())


def test_causal_mask_and_past_length():
    allowed = modules.causal_allowed(2, 5, "float64").numpy()
    np.testing.assert_array_equal(allowed, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert modules.past_length(None) == 0
    assert modules.past_length(((tf.zeros((1, 2, 7, 4)), tf.zeros((1, 2, 7, 4))),)) == 7


@pytest.mark.parametrize("name", ["dec_post_sin", "encdec_pre_untied"])
def test_greedy_generation_matches_reference(be, name):
    """``Backend.generate`` (shared search over this backend's cache) against a greedy loop of
    full numpy reference passes."""
    spec = SPECS[name].replace(bos_token_id=1)
    model, weights = built(be, spec)
    prompts = np.random.default_rng(5).integers(0, spec.vocab_size, (2, 4))
    got = be.generate(model, prompts, max_new_tokens=4)
    for row, generated in enumerate(got):
        seq: list[int] = []
        for _ in range(4):
            if spec.architecture == "decoder":
                inputs = {"input_ids": np.array([[*prompts[row], *seq]])}
            else:
                inputs = {"input_ids": prompts[row:row + 1],
                          "decoder_input_ids": np.array([[spec.bos_token_id, *seq]])}
            seq.append(int(reference_forward(spec, weights, inputs)["logits"][0, -1].argmax()))
        assert generated == seq, row
