"""What only the PyTorch backend has: native names equal to the canonical ones, composed
activations, the caller's train mode kept, ``torch.compile`` caching, the independent references
built from PyTorch's own ``nn.TransformerEncoderLayer`` / ``nn.Transformer`` (and why they force
the slow path), and ``trace`` leaving hooks, ``.grad`` and compiled graphs alone.

The Backend contract itself is tested on every backend in test_backends.py,
test_backends_decoder.py and test_trace.py; helpers and bounds are in backend_helpers.py.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from xformer import InputError  # noqa: E402
from xformer.backend import get_backend  # noqa: E402
from xformer_torch.modules import (DecoderModel, EncoderDecoderModel, EncoderModel,  # noqa: E402
                                   gelu, gelu_tanh)
from xformer_torch.reference_nn import nn_transformer_reference  # noqa: E402
from backend_helpers import (SPECS, built, covering_params, cotangents, make_inputs,  # noqa: E402
                      max_rel, reference, rel)

BACKEND = get_backend("torch")


def test_package_exports_the_nn_reference():
    """(The package's lazy imports and other exports: test_backends.py.)"""
    import xformer_torch

    assert xformer_torch.nn_transformer_reference is nn_transformer_reference


@pytest.mark.parametrize("spec", covering_params())
def test_native_names_are_canonical(spec):
    """``state_dict`` and ``named_parameters`` keys are the canonical names, in order: a tied
    LM head and a shared target table add no second key."""
    model = BACKEND.build(spec, "float32")
    cls = {"encoder": EncoderModel, "decoder": DecoderModel,
           "encoder-decoder": EncoderDecoderModel}[spec.architecture]
    assert type(model) is cls
    names = [p.name for p in spec.parameters()]
    assert list(model.state_dict()) == names
    assert [n for n, _ in model.named_parameters()] == names
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == spec.parameter_shapes()
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_activations_composed():
    x = torch.linspace(-6, 6, 101, dtype=torch.float64)
    assert torch.allclose(gelu(x), torch.nn.functional.gelu(x), rtol=0, atol=1e-15)
    assert torch.allclose(gelu_tanh(x), torch.nn.functional.gelu(x, approximate="tanh"),
                          rtol=0, atol=1e-15)


def test_native_dtype_and_train_mode_kept():
    """The sinusoidal table follows the model dtype; ``forward`` turns dropout off and restores
    the caller's train mode."""
    spec = SPECS["vaswani_enc"]
    assert EncoderModel(spec, dtype=torch.float64).embeddings.position_table.dtype \
        == torch.float64
    model, _ = built(BACKEND, SPECS["bert"].replace(dropout=0.3), fresh=True)
    assert model.dtype == torch.float64 and model.spec.dropout == 0.3
    ids = make_inputs(model.spec)["input_ids"]
    model.train()
    out = BACKEND.forward(model, {"input_ids": ids})
    assert model.training
    model.eval()
    np.testing.assert_array_equal(out["last_hidden_state"],
                                  BACKEND.forward(model, {"input_ids": ids})["last_hidden_state"])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_inference_attention_is_the_fused_kernel_with_the_same_numbers(name, dtype, monkeypatch):
    """Eval mode under ``no_grad`` calls ``F.scaled_dot_product_attention`` (issue #11); with
    autograd on and a fully padded row it is written out. Both give the numpy reference's
    numbers, fully padded rows included: float64 to rounding, float32 within its output
    bound."""
    import torch.nn.functional as F

    model, weights = built(BACKEND, SPECS[name], dtype, fresh=True)
    inputs = make_inputs(model.spec)  # row 1 fully padded
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    model.eval()
    with torch.no_grad():
        inference = {k: v.numpy() for k, v in model(**tensors).items()
                     if isinstance(v, torch.Tensor)}
    assert len(calls) == model.spec.n_layers  # every self-attention, fused
    written = {k: v.detach().numpy() for k, v in model(**tensors).items()
               if isinstance(v, torch.Tensor)}
    assert len(calls) == model.spec.n_layers  # autograd and a fully padded row: written out
    want = reference(model.spec, weights, inputs)
    bound = 1e-12 if dtype == "float64" else 1e-5
    for key, value in inference.items():
        assert rel(value, want[key]) < bound, key
        assert rel(value, written[key]) < bound / 10, key


def _gradient_pass(model, tensors: dict, seed: int = 3) -> dict[str, np.ndarray]:
    """The outputs and the gradients of ``sum_k sum(outputs[k] * cot_k)`` (random ``cot_k``)
    with respect to every parameter, of one native pass of ``model`` in its current mode."""
    model.zero_grad(set_to_none=True)
    out = {k: v for k, v in model(**tensors).items() if isinstance(v, torch.Tensor)}
    gen = torch.Generator().manual_seed(seed)
    loss = sum((v * torch.randn(v.shape, generator=gen, dtype=v.dtype)).sum()
               for v in out.values())
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {**{k: v.detach().numpy() for k, v in out.items()},
            **{n: g.numpy() for n, g in zip(names, grads) if g is not None}}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", ["bert", "gpt2"])
def test_gradient_passes_take_the_fused_kernel_where_its_gradients_are_right(name, dtype,
                                                                           monkeypatch):
    """A training-mode pass with autograd calls ``F.scaled_dot_product_attention`` (issue #11)
    when every query row keeps an unmasked key and attention dropout is idle; its outputs and
    parameter gradients are the written-out pass's to rounding (float64 ≤ 1e-12, float32
    ≤ 1e-5, :func:`max_rel`; measured 2e-15 and 9e-7). A fully masked row (a fully padded
    sequence, a decoder's left padding), dropout at work, and the Backend protocol's calls
    (inside ``written_out_attention``) keep the written-out form: there the fused CPU
    kernel's gradients are wrong or its steps invisible (docs/pitfalls.md)."""
    import torch.nn.functional as F

    from xformer_torch.modules import written_out_attention

    model, _ = built(BACKEND, SPECS[name], dtype, fresh=True)
    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or fused(*a, **k))

    def tensors(full_pad: bool) -> dict:
        return {k: torch.from_numpy(v)
                for k, v in make_inputs(model.spec, full_pad=full_pad).items()}

    model.train()
    fast = _gradient_pass(model, tensors(full_pad=False))  # padded rows, none fully
    assert len(calls) == model.spec.n_layers
    with written_out_attention():
        written = _gradient_pass(model, tensors(full_pad=False))
    assert len(calls) == model.spec.n_layers
    bound = 1e-12 if dtype == "float64" else 1e-5
    worst = max_rel(fast, written)  # k_proj.bias (exactly 0 in theory) on v_proj.bias's scale
    assert 0 < worst[0] < bound, worst  # > 0: really two computations

    # a fully masked row: written out, bit for bit the protocol's form
    masked = _gradient_pass(model, tensors(full_pad=True))
    with written_out_attention():
        masked_written = _gradient_pass(model, tensors(full_pad=True))
    assert len(calls) == model.spec.n_layers
    for key, value in masked_written.items():
        np.testing.assert_array_equal(masked[key], value, err_msg=key)

    # the protocol's gradient calls never take the fused kernel
    inputs = make_inputs(model.spec, full_pad=False)
    BACKEND.forward_backward(model, inputs, cotangents(model.spec, inputs))
    BACKEND.trace(model, inputs, cotangents(model.spec, inputs))
    assert len(calls) == model.spec.n_layers

    # attention dropout at work (training mode, p > 0): written out; in eval mode: fused
    dropping, _ = built(BACKEND, SPECS[name].replace(dropout=0.25), dtype, fresh=True)
    _gradient_pass(dropping.train(), tensors(full_pad=False))
    assert len(calls) == model.spec.n_layers
    _gradient_pass(dropping.eval(), tensors(full_pad=False))
    assert len(calls) == 2 * model.spec.n_layers


def test_a_mask_without_padding_adds_no_bias_and_changes_no_bit():
    """An all-ones mask gives no key-padding bias (issue #11: a pass over the scores saved):
    adding its zeros would change no bit, forward or backward."""
    from xformer_torch.modules import allowed_bias

    model, _ = built(BACKEND, SPECS["bert"], fresh=True)
    ones = torch.ones(3, 7, dtype=torch.long)
    assert model.key_padding_bias(ones) is None
    assert model.key_padding_bias(ones.clone().index_fill_(1, torch.tensor([6]), 0)) is not None
    x = torch.randn(3, 7, model.spec.d_model, dtype=torch.float64, requires_grad=True)
    zeros = allowed_bias(ones[:, None, None, :], torch.float64)
    assert not zeros.any()
    with_bias, without = model.encoder(x, zeros), model.encoder(x, None)
    assert torch.equal(with_bias, without)
    g1, = torch.autograd.grad(with_bias.sum(), x)
    g2, = torch.autograd.grad(without.sum(), x)
    assert torch.equal(g1, g2)


def test_expanding_projections_are_stored_in_out():
    """In decoder layers ``(in, out)`` storage for projections at least as wide as their
    input, ``nn.Linear``'s ``(out, in)`` for contracting ones (issue #11: batch-1 decoding);
    encoder layers and the pooler keep ``(out, in)`` throughout. Every caller still sees an
    ``(out, in)`` weight, and weights go in and come out unchanged, C-ordered."""
    spec = SPECS["gpt2"]
    model, weights = built(BACKEND, spec, fresh=True)
    layer = model.decoder.layers[0]
    assert layer.ffn.linear1.weight.shape == (spec.d_ff, spec.d_model)
    assert layer.ffn.linear1.weight.stride() == (1, spec.d_ff)
    assert layer.self_attn.q_proj.weight.stride() == (1, spec.d_model)
    assert layer.ffn.linear2.weight.is_contiguous()
    out = BACKEND.get_weights(model)
    for name, value in weights.items():
        assert out[name].flags.c_contiguous, name
        np.testing.assert_array_equal(out[name], value, err_msg=name)
    BACKEND.set_weights(model, out)
    assert layer.ffn.linear1.weight.stride() == (1, spec.d_ff)  # copied in, storage kept
    untied, _ = built(BACKEND, SPECS["dec_post"], fresh=True)
    assert not untied.spec.tie_embeddings
    assert untied.lm_head.weight.shape == (untied.spec.vocab_size, untied.spec.d_model)
    assert untied.lm_head.weight.stride() == (1, untied.spec.vocab_size)
    # encoder layers and the pooler never decode: nn.Linear's (out, in) storage (faster
    # weight gradients), in an encoder and in an encoder-decoder's encoder alike
    for name, encoder in (("bert", "encoder"), ("vaswani", "encoder")):
        model, _ = built(BACKEND, SPECS[name], fresh=True)
        linears = [m for m in model.get_submodule(encoder).modules()
                   if isinstance(m, torch.nn.Linear)]
        if model.spec.head == "pooler":
            linears.append(model.pooler.dense)
        assert linears and all(m.weight.is_contiguous() for m in linears), name
    assert not model.decoder.layers[0].ffn.linear1.weight.is_contiguous()  # its decoder: (in, out)


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama-tiny"])
def test_self_attention_projects_qkv_in_one_product(name):
    """Full passes project q, k and v with one matrix product over the concatenated weights
    (issue #11): float32 outputs bit for bit the three products', its backward within
    rounding of the three products'. Float64 (where a merged product differs by rounding), a
    decoding step (fewer rows than D) and projections stored differently (grouped-query:
    contracting k/v) keep three."""
    from xformer import ModelSpec

    spec = SPECS[name] if name in SPECS else ModelSpec.preset(name)
    model = BACKEND.build(spec, "float32")
    attn = (model.encoder if spec.architecture == "encoder" else model.decoder).layers[0].self_attn
    d = spec.d_model
    gqa = spec.kv_heads != spec.n_heads and spec.kv_heads * spec.d_head < d
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        attn.to(dtype)
        x = torch.randn(2, d, d, dtype=dtype, requires_grad=True)  # B T = 2 D rows
        fused = attn._fused_qkv(x)
        assert attn._fused_qkv(x[:, :1]) is None  # B rows < D: three products
        if gqa or dtype == torch.float64:
            assert fused is None
            continue
        three = (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x))
        for got, want in zip(fused, three, strict=True):
            assert got.shape == want.shape
            assert torch.equal(got, want)
        g_fused, = torch.autograd.grad(sum(y.sum() for y in fused), x)
        g_three, = torch.autograd.grad(sum(y.sum() for y in three), x)
        assert rel(g_fused.numpy(), g_three.numpy()) < 1e-6
    attn.to(torch.float32)


@pytest.mark.parametrize("activation", ["gelu", "relu", "gelu_tanh"])
def test_feed_forward_activates_in_place_in_float32_inference(activation, monkeypatch):
    """Float32 inference (autograd off) runs GELU / ReLU in place on ``linear1``'s fresh output
    (issue #11), bit for bit the out-of-place result; float64, autograd on, a forward hook on
    ``linear1`` (which would see its output overwritten) and the other activations activate
    out of place."""
    from xformer_torch import modules

    calls = []
    for fn, op in list(modules.INPLACE_ACTIVATIONS.items()):
        monkeypatch.setitem(modules.INPLACE_ACTIVATIONS, fn,
                            lambda t, op=op: calls.append(t.data_ptr()) or op(t))
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        ffn = modules.FeedForward(SPECS["bert"].replace(activation=activation), dtype=dtype)
        x = torch.randn(2, 5, ffn.spec.d_model, dtype=dtype)
        want = ffn(x).detach()  # autograd on
        assert not calls
        seen = []
        hook = ffn.linear1.register_forward_hook(lambda m, i, out: seen.append(out))
        with torch.no_grad():
            hooked = ffn(x)
        hook.remove()
        assert not calls and torch.equal(hooked, want)
        assert torch.equal(seen[0], ffn.linear1(x))  # the hooked output left as it was
        with torch.no_grad():
            got = ffn(x)
        assert torch.equal(got, want)
        inplace = dtype == torch.float32 and activation != "gelu_tanh"
        assert len(calls) == inplace, (dtype, activation)
        calls.clear()


def test_generation_reads_a_tied_table_from_a_transposed_copy():
    """Inside ``generate`` a tied LM head multiplies by a ``(D, vocab)``-stored copy of the
    table (issue #11): the same logits to rounding, the same ids, and no copy left after."""
    from xformer.generation import generate

    model, _ = built(BACKEND, SPECS["gpt2"], fresh=True)
    head = model.lm_head
    prompt = make_inputs(model.spec, full_pad=False)["input_ids"][:2, :3]
    plain, _ = BACKEND.decode(model, {"input_ids": prompt})
    with head.decoding_table(model.target_word_embeddings()):
        assert head.tied_copy.stride() == (1, model.spec.vocab_size)
        copied, _ = BACKEND.decode(model, {"input_ids": prompt})
    assert head.tied_copy is None
    assert rel(copied, plain) < 1e-13
    seen = []
    original = type(head).forward

    def spy(self, x, tied_weight=None):
        seen.append(self.tied_copy is not None)
        return original(self, x, tied_weight)

    type(head).forward = spy
    try:
        ids = BACKEND.generate(model, prompt, max_new_tokens=4)
        assert generate(BACKEND, model, prompt, max_new_tokens=4) == ids  # no copy there
    finally:
        type(head).forward = original
    assert seen[:4] == [True] * 4 and not any(seen[4:])
    assert head.tied_copy is None


def test_generate_restores_every_modules_train_mode():
    """``generate`` runs every step in eval mode (switched once, not once per token) and gives
    each submodule back its own mode, a child left in eval mode by the caller included."""
    model, _ = built(BACKEND, SPECS["gpt2"].replace(dropout=0.5), fresh=True)
    model.train()
    model.decoder.layers[0].eval()
    prompt = make_inputs(model.spec, full_pad=False)["input_ids"][:1, :3]
    first = BACKEND.generate(model, prompt, max_new_tokens=4)
    assert first == BACKEND.generate(model, prompt, max_new_tokens=4)  # dropout was off
    assert model.training and model.decoder.training
    assert not model.decoder.layers[0].training
    assert not any(m.training for m in model.decoder.layers[0].modules())
    assert all(m.training for m in model.decoder.layers[1].modules())
    assert "_xformer_eval_held" not in model.__dict__


def test_compiled_module_is_cached():
    spec = SPECS["bert"].replace(n_layers=1)
    model, _ = built(BACKEND, spec)
    inputs = make_inputs(spec)
    BACKEND.forward(model, inputs, mode="compile")
    compiled = model.__dict__["_xformer_compiled"]
    BACKEND.forward(model, inputs, mode="compile")
    assert model.__dict__["_xformer_compiled"] is compiled  # cached, not rebuilt
    assert list(model.state_dict()) == [p.name for p in spec.parameters()]


def test_native_encoder_decoder_checks_max_len_with_a_cache():
    spec = SPECS["vaswani"]
    model, _ = built(BACKEND, spec)
    first = {"decoder_input_ids": np.zeros((2, spec.max_len), np.int64),
             "input_ids": np.zeros((2, 3), np.int64)}
    _, cache = BACKEND.decode(model, first)
    with pytest.raises(InputError, match="longer than max_len"):
        model(decoder_input_ids=torch.zeros(2, 1, dtype=torch.long),
              past_key_values=cache.past_key_values,
              attention_mask=torch.from_numpy(np.asarray(cache.encoder_attention_mask)))


# ---------------------------------------------------------------------- nn.* references
NN_SPECS = {
    "post_relu": SPECS["bert"].replace(activation="relu"),
    "post_gelu": SPECS["bert"],
    "pre_gelu": SPECS["bert"].replace(norm_position="pre", final_norm=True),
    "pre_relu_nobias": SPECS["nobias"].replace(activation="relu"),
    "pre_gelu_tanh": SPECS["pre_ln"],
    "post_gelu_tanh_sinusoidal": SPECS["vaswani_enc"].replace(activation="gelu_tanh"),
    "dec_post_relu": SPECS["dec_post"],
    "dec_pre_gelu": SPECS["gpt2"].replace(activation="gelu"),
    "dec_post_gelu_none": SPECS["dec_none"],
    "ed_post_relu": SPECS["vaswani"],
    "ed_pre_gelu": SPECS["ed_pre"],
    "ed_pre_relu_tied": SPECS["ed_tied_unshared"],
    "ed_post_gelu_tanh_none": SPECS["ed_none"],
}


@pytest.mark.parametrize("name", NN_SPECS)
def test_nn_reference_agrees(name):
    """Outputs and every gradient (incl. ``inputs_embeds`` / ``decoder_inputs_embeds``, with the
    embeddings looked up outside the reference as conformance does) <= 1e-11, float64, with a
    fully padded row on each side; then through the ids path inside the reference in eval +
    no_grad (where ``nn.TransformerEncoderLayer``'s fast path would give NaN on the fully
    padded row: the reference still takes the slow path)."""
    spec = NN_SPECS[name]
    model, weights = built(BACKEND, spec)
    ref = nn_transformer_reference(spec, weights, "float64")
    assert ref.to_canonical(ref.state_dict()).keys() == weights.keys()
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    outs, grads = BACKEND.forward_backward(model, inputs, cot)

    scale = spec.d_model ** 0.5 if spec.embed_scale else 1.0
    kwargs, embeds = {}, {}
    for prefix, table in (("", "word_embeddings"), ("decoder_", "decoder_word_embeddings")):
        if f"{prefix}input_ids" not in inputs:
            continue
        e = torch.nn.functional.embedding(torch.from_numpy(inputs[f"{prefix}input_ids"]),
                                          getattr(ref, table)) * scale
        embeds[f"{prefix}inputs_embeds"] = e
        kwargs[f"{prefix}attention_mask"] = torch.from_numpy(inputs[f"{prefix}attention_mask"])
    if "token_type_ids" in inputs:
        kwargs["token_type_ids"] = torch.from_numpy(inputs["token_type_ids"])
    ref_out = ref(**embeds, **kwargs)
    params = dict(ref.named_parameters())
    ref_grads = torch.autograd.grad([ref_out[k] for k in cot],
                                    [*embeds.values(), *params.values()],
                                    [torch.from_numpy(cot[k]) for k in cot], allow_unused=True)
    native = {n: (g if g is not None else torch.zeros_like(p))
              for (n, p), g in zip(params.items(), ref_grads[len(embeds):])}
    want = {k: v.numpy() for k, v in ref.to_canonical(native).items()}
    want.update({k: g.numpy() for k, g in zip(embeds, ref_grads)})
    err, worst = max_rel(outs, {k: v.detach().numpy() for k, v in ref_out.items()})
    assert err <= 1e-11, (worst, err)
    assert set(want) == set(grads)
    err, worst = max_rel(grads, want)
    assert err <= 1e-11, (worst, err)
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    slow = ref.train()(**tensors)  # grad enabled: the composite path
    with torch.no_grad():
        again = ref.eval()(**tensors)
    for k, v in again.items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, slow[k].detach(), rtol=0, atol=0)
    assert max_rel({k: v.numpy() for k, v in again.items()}, outs)[0] <= 1e-11


def test_nn_fast_path_nan_on_fully_padded_row_is_real():
    """Why the reference forces the slow path: torch's fused encoder layer (eval + no_grad)
    returns NaN for a fully padded row even with the finite float mask."""
    layer = torch.nn.TransformerEncoderLayer(16, 4, 24, dropout=0.0, batch_first=True,
                                             dtype=torch.float64).eval()
    x = torch.randn(2, 7, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pad = torch.zeros(2, 7, dtype=torch.float64)
    pad[1] = torch.finfo(torch.float64).min
    with torch.no_grad():
        fast = layer(x, src_key_padding_mask=pad)
    slow = layer(x, src_key_padding_mask=pad)  # grad enabled: composite path
    assert torch.isfinite(slow).all()
    torch.testing.assert_close(fast[0], slow[0].detach(), rtol=0, atol=1e-13)
    assert torch.isnan(fast[1]).all(), "torch's fast path no longer NaNs: update docs"


# ---------------------------------------------------------------------- trace
def test_trace_keeps_train_mode_and_grads():
    """``trace`` runs with dropout off but leaves train mode on, writes no ``.grad``, and
    leaves no hook."""
    spec = SPECS["bert"].replace(dropout=0.1)
    model, _ = built(BACKEND, spec, fresh=True)
    inputs = make_inputs(spec)
    model.train()
    BACKEND.trace(model, inputs, cotangents(spec, inputs))
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.skipif(not os.environ.get("XFORMER_TEST_ALL_MODES"),
                    reason="a cold torch.compile takes tens of seconds on 2 loaded cores; "
                           "set XFORMER_TEST_ALL_MODES=1")
def test_compiled_model_after_trace():
    """A model compiled before ``trace`` gives the same compiled outputs afterwards, and the
    trace (eager) agrees with them."""
    spec = SPECS["gpt2"].replace(n_layers=1)
    model, _ = built(BACKEND, spec, fresh=True)
    inputs = make_inputs(spec)
    cot = cotangents(spec, inputs)
    compiled_before = BACKEND.forward(model, inputs, mode="compile")
    fwd, _ = BACKEND.trace(model, inputs, cot)
    compiled_after = BACKEND.forward(model, inputs, mode="compile")
    for k in compiled_before:
        np.testing.assert_array_equal(compiled_after[k], compiled_before[k])
    assert max_rel({"logits": fwd["lm_head"]}, {"logits": compiled_before["logits"]})[0] <= 1e-12
    outs, _ = BACKEND.forward_backward(model, inputs, cot, mode="compile")
    assert max_rel({"logits": outs["logits"]}, {"logits": compiled_before["logits"]})[0] <= 1e-12
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
