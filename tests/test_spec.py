"""ModelSpec: validation, serialisation round trips, presets, canonical parameters."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xformer import ModelSpec, SpecError
from xformer.conformance import covering_specs, field_values
from xformer.spec import (ARCHITECTURES, CHOICES, CONDITIONAL, PRESETS, choices,
                          sinusoidal_table)


@st.composite
def specs(draw):
    n_heads = draw(st.integers(1, 4))
    return ModelSpec(
        vocab_size=draw(st.integers(1, 500)), d_model=n_heads * 2 * draw(st.integers(1, 8)),
        n_heads=n_heads, d_ff=draw(st.integers(1, 64)), n_layers=draw(st.integers(1, 3)),
        max_len=draw(st.integers(1, 64)),
        norm_position=draw(st.sampled_from(["post", "pre"])),
        norm_eps=draw(st.floats(1e-12, 0.5)),
        activation=draw(st.sampled_from(["relu", "gelu", "gelu_tanh"])),
        positional=draw(st.sampled_from(["learned", "sinusoidal"])),
        type_vocab_size=draw(st.integers(0, 3)), embedding_norm=draw(st.booleans()),
        final_norm=draw(st.booleans()), embed_scale=draw(st.booleans()), bias=draw(st.booleans()),
        head=draw(st.sampled_from(["none", "pooler"])), dropout=draw(st.floats(0, 0.9)))


@settings(max_examples=60, deadline=None)
@given(specs())
def test_json_and_yaml_round_trip(spec):
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec
    assert ModelSpec.from_dict(json.loads(spec.to_json())).parameters() == spec.parameters()


@settings(max_examples=40, deadline=None)
@given(specs())
def test_parameters_are_unique_and_count_matches(spec):
    params = spec.parameters()
    names = [p.name for p in params]
    assert len(names) == len(set(names))
    per_layer = 4 * (1 + spec.bias) + 2 * (1 + spec.bias) + 2 * (1 + spec.bias)
    assert sum(n.startswith("encoder.layers.0.") for n in names) == per_layer
    d, f = spec.d_model, spec.d_ff
    linear = 4 * (d * d + spec.bias * d) + (f * d + spec.bias * f) + (d * f + spec.bias * d)
    norms = 2 * d * (1 + spec.bias)
    emb = (spec.vocab_size + spec.type_vocab_size
           + (spec.max_len if spec.positional == "learned" else 0)) * d
    extra = (d * (1 + spec.bias) if spec.embedding_norm else 0) + (
        d * (1 + spec.bias) if spec.final_norm else 0) + (
        d * d + spec.bias * d if spec.head == "pooler" else 0)
    assert spec.num_parameters() == emb + spec.n_layers * (linear + norms) + extra


@st.composite
def llama_specs(draw):
    n_kv = draw(st.integers(1, 3))
    n_heads = n_kv * draw(st.integers(1, 3))
    head_dim = draw(st.one_of(st.none(), st.integers(1, 6).map(lambda k: 2 * k)))
    d_model = n_heads * draw(st.integers(1, 4)) * (2 if head_dim is None else 1)
    return ModelSpec(
        architecture="decoder", vocab_size=draw(st.integers(1, 300)), d_model=d_model,
        n_heads=n_heads, n_kv_heads=draw(st.sampled_from([None, n_kv])), head_dim=head_dim,
        d_ff=draw(st.integers(1, 40)), n_layers=draw(st.integers(1, 3)),
        max_len=draw(st.integers(1, 64)), norm=draw(st.sampled_from(["layernorm", "rmsnorm"])),
        norm_position="pre", norm_scale_offset=draw(st.sampled_from([0.0, 1.0])),
        activation=draw(st.sampled_from(["silu", "gelu_tanh"])),
        ffn=draw(st.sampled_from(["mlp", "glu"])), positional="rope",
        rope_theta=draw(st.floats(2.0, 1e7)), rope_style=draw(st.sampled_from(
            ["half", "interleaved"])), embedding_norm=False, final_norm=draw(st.booleans()),
        bias=draw(st.booleans()), qkv_bias=draw(st.sampled_from([None, True, False])),
        out_proj_bias=draw(st.sampled_from([None, True, False])),
        mlp_bias=draw(st.sampled_from([None, True, False])),
        parallel_residual=draw(st.booleans()), head="lm", tie_embeddings=draw(st.booleans()))


@settings(max_examples=60, deadline=None)
@given(llama_specs())
def test_llama_family_round_trips_and_counts(spec):
    """The new fields survive JSON and YAML, and the parameter count is the closed form of
    grouped-query attention (``H d_head`` query rows, ``H_kv d_head`` key and value rows), the
    FFN (two or three matrices) and the bias switches."""
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert ModelSpec.from_yaml(spec.to_yaml()) == spec
    d, f, dh = spec.d_model, spec.d_ff, spec.d_head
    h, hkv = spec.n_heads, spec.n_kv_heads or spec.n_heads
    qkv, out, mlp = (spec.bias if b is None else b for b in (spec.qkv_bias, spec.out_proj_bias,
                                                           spec.mlp_bias))
    attn = (h + 2 * hkv) * dh * (d + qkv) + d * h * dh + out * d
    ffn = (3 if spec.ffn == "glu" else 2) * d * f + mlp * (
        (2 if spec.ffn == "glu" else 1) * f + d)
    norm = d * (1 + (spec.bias and spec.norm == "layernorm"))
    total = spec.vocab_size * d * (1 if spec.tie_embeddings else 2) + spec.n_layers * (
        attn + ffn + 2 * norm) + norm * spec.final_norm
    assert spec.num_parameters() == total


def test_presets_match_published_parameter_counts():
    # BERT-base: 109,482,240 with its pooler (Hugging Face BertModel); GPT-2 small:
    # 124,439,808 (Hugging Face gpt2, tied LM head).
    assert ModelSpec.preset("bert-base").num_parameters() == 109_482_240
    assert ModelSpec.preset("gpt2-small").num_parameters() == 124_439_808
    # The Llama family: the parameter counts Hugging Face reports for each published
    # checkpoint (sum of numel over model.parameters(), tied heads counted once).
    published = {"llama-3.2-1b": 1_235_814_400, "mistral-7b": 7_241_732_096,
                 "qwen2-0.5b": 494_032_768, "gemma-2b": 2_506_172_416,
                 "pythia-160m": 162_322_944}
    assert {k: ModelSpec.preset(k).num_parameters() for k in published} == published


def test_llama_family_parameter_shapes():
    """GQA, a head_dim override, the gated FFN, RMSNorm (no bias) and the bias switches give
    the shapes of Hugging Face's Llama / Qwen2 / Gemma / GPT-NeoX modules."""
    gemma = ModelSpec.preset("gemma-2b").replace(n_layers=1)
    shapes = gemma.parameter_shapes()
    p = "decoder.layers.0"
    assert shapes[f"{p}.self_attn.q_proj.weight"] == (8 * 256, 2048)  # head_dim 256
    assert shapes[f"{p}.self_attn.k_proj.weight"] == (256, 2048)  # one kv head (MQA)
    assert shapes[f"{p}.self_attn.out_proj.weight"] == (2048, 8 * 256)
    assert shapes[f"{p}.ffn.gate_proj.weight"] == shapes[f"{p}.ffn.up_proj.weight"] == (16384,
                                                                                         2048)
    assert shapes[f"{p}.ffn.down_proj.weight"] == (2048, 16384)
    assert f"{p}.norm1.bias" not in shapes and shapes[f"{p}.norm1.weight"] == (2048,)
    assert not any(n.endswith(".bias") for n in shapes)
    # Gemma stores scale - 1: its norm weights start at zero
    assert {q.init for q in gemma.parameters() if "norm" in q.name} == {"zeros"}
    qwen = ModelSpec.preset("qwen2-tiny").replace(n_layers=1).parameter_shapes()
    assert {n.rsplit(".", 2)[-2] for n in qwen if n.endswith(".bias")} == {
        "q_proj", "k_proj", "v_proj"}
    pythia = ModelSpec.preset("pythia-tiny")
    assert pythia.rotary_dim == 4 and pythia.has_bias("norm") and pythia.has_bias("mlp")
    assert "embeddings.position_embeddings.weight" not in pythia.parameter_shapes()


@pytest.mark.parametrize("style", ["half", "interleaved"])
def test_rotary_embedding_is_a_complex_rotation(style):
    """RoPE (Su et al. 2021 §3.2): each pair of dimensions, read as a complex number, is
    multiplied by ``exp(i p theta_j)``, ``theta_j = base^(-2j / rotary_dim)``; ``half`` pairs
    ``(j, j + r/2)``, ``interleaved`` pairs ``(2j, 2j + 1)``; dimensions past ``rotary_dim``
    pass through. Checked against numpy complex arithmetic, independently of
    ``reference.rotate``'s real formula."""
    from xformer.reference import rotate
    from xformer.spec import rotary_table

    rng = np.random.default_rng(0)
    r, d, base, t = 6, 10, 500.0, 7
    x = rng.standard_normal((2, 3, t, d))
    cos, sin = rotary_table(t, r, base)
    out = rotate(x, cos, sin, style)
    angle = np.arange(t)[:, None] * base ** (-np.arange(0, r, 2) / r)[None, :]
    if style == "half":
        z = x[..., : r // 2] + 1j * x[..., r // 2: r]
        zr = z * np.exp(1j * angle)
        expect = np.concatenate([zr.real, zr.imag, x[..., r:]], axis=-1)
    else:
        z = x[..., 0:r:2] + 1j * x[..., 1:r:2]
        zr = z * np.exp(1j * angle)
        expect = x.copy()
        expect[..., 0:r:2], expect[..., 1:r:2] = zr.real, zr.imag
    np.testing.assert_allclose(out, expect, rtol=0, atol=1e-14)
    # the relative-position property: <R_p q, R_s k> depends on p - s only
    q, k = rng.standard_normal(d), rng.standard_normal(d)
    cos, sin = rotary_table(20, r, base)
    dots = [rotate(q[None], cos[[p]], sin[[p]], style) @ rotate(k[None], cos[[p - 3]],
                                                                sin[[p - 3]], style).T
            for p in (3, 9, 17)]
    np.testing.assert_allclose(np.ravel(dots), np.ravel(dots)[0], rtol=1e-12)


def test_decoder_parameter_names():
    dec = ModelSpec(architecture="decoder", n_layers=1, head="lm", tie_embeddings=True)
    names = [p.name for p in dec.parameters()]
    assert "lm_head.weight" not in names and "decoder.layers.0.norm2.weight" in names
    assert dec.lm_head_name() == "embeddings.word_embeddings.weight"
    ed = ModelSpec(architecture="encoder-decoder", n_layers=1, n_decoder_layers=2, head="lm")
    names = [p.name for p in ed.parameters()]
    assert "decoder.layers.1.cross_attn.k_proj.weight" in names
    assert "decoder.layers.1.norm3.bias" in names and "decoder.layers.2.norm1.bias" not in names
    assert ed.word_embedding_name("decoder") == "decoder_embeddings.word_embeddings.weight"
    shared = ed.replace(share_embeddings=True, tie_embeddings=True)
    assert "decoder_embeddings.word_embeddings.weight" not in shared.parameter_shapes()
    assert shared.lm_head_name() == "embeddings.word_embeddings.weight"
    assert ed.output_names() == ("last_hidden_state", "encoder_last_hidden_state", "logits")


def test_linear_layout_is_out_by_in():
    shapes = ModelSpec(d_model=8, n_heads=2, d_ff=24).parameter_shapes()
    assert shapes["encoder.layers.0.ffn.linear1.weight"] == (24, 8)
    assert shapes["encoder.layers.0.ffn.linear2.weight"] == (8, 24)


@pytest.mark.parametrize("changes, words", [
    ({"d_model": 10, "n_heads": 3}, ["d_model", "n_heads", "divisible"]),
    ({"norm_position": "middle"}, ["norm_position", "post, pre", "middle"]),
    ({"activation": "swish"}, ["activation", "swish"]),
    ({"norm_eps": 0}, ["norm_eps", "(0, 1)"]),
    ({"n_layers": 0}, ["n_layers", ">= 1"]),
    ({"vocab_size": 3.5}, ["vocab_size", "integer"]),
    ({"bias": "yes"}, ["bias", "true or false"]),
    ({"dropout": 1.0}, ["dropout"]),
    ({"positional": "sinusoidal", "d_model": 9, "n_heads": 3}, ["even"]),
    ({"architecture": "decoder", "head": "pooler"}, ["head", "pooler", "encoders"]),
    ({"architecture": "decoder", "type_vocab_size": 2}, ["type_vocab_size", "encoders"]),
    ({"architecture": "decoder", "n_decoder_layers": 2}, ["n_decoder_layers", "n_layers"]),
    ({"share_embeddings": True}, ["share_embeddings", "encoder-decoders"]),
    ({"architecture": "decoder", "tie_embeddings": True}, ["tie_embeddings", "head = 'lm'"]),
    ({"eos_token_id": 1000}, ["eos_token_id", "vocab_size=1000"]),
    ({"architecture": "transformer"}, ["architecture", "encoder-decoder"]),
    ({"head": "lm"}, ["head", "lm"]),
    ({"n_head": 4}, ["unknown spec field", "n_heads"]),
    ({"n_kv_heads": 3}, ["n_kv_heads", "divide", "n_heads"]),
    ({"n_kv_heads": 0}, ["n_kv_heads", ">= 1"]),
    ({"d_model": 10, "n_heads": 3, "head_dim": 0}, ["head_dim", ">= 1"]),
    ({"norm": "batchnorm"}, ["norm", "layernorm, rmsnorm"]),
    ({"norm_scale_offset": 0.5}, ["norm_scale_offset", "Gemma"]),
    ({"ffn": "moe"}, ["ffn", "mlp, glu"]),
    ({"qkv_bias": "no"}, ["qkv_bias", "true or false or null"]),
    ({"rope_theta": 5e5}, ["rope_theta", "positional = 'rope'"]),
    ({"rope_style": "interleaved"}, ["rope_style", "positional = 'rope'"]),
    ({"positional": "rope", "rope_theta": 1.0}, ["rope_theta", "> 1"]),
    ({"positional": "rope", "rope_theta": float("inf")}, ["rope_theta", "finite"]),
    ({"positional": "rope", "rope_style": "gptj"}, ["rope_style", "half, interleaved"]),
    ({"positional": "rope", "rotary_fraction": 0.0}, ["rotary_fraction", "(0, 1]"]),
    ({"positional": "rope", "d_model": 12, "n_heads": 2, "rotary_fraction": 0.5},
     ["rotary_dim", "= 3", "even"]),
    ({"parallel_residual": True}, ["parallel_residual", "norm_position = 'pre'"]),
    ({"rope_scaling": "llama3"}, ["rope_scaling", "positional = 'rope'"]),
    ({"positional": "rope", "rope_scaling": "yarn"}, ["rope_scaling", "none, llama3"]),
    ({"positional": "rope", "rope_scaling_factor": 32.0},
     ["rope_scaling_factor", "rope_scaling = 'llama3'"]),
    ({"positional": "rope", "rope_scaling": "llama3", "rope_scaling_factor": 0.5},
     ["rope_scaling_factor >= 1"]),
    ({"positional": "rope", "rope_scaling": "llama3", "rope_low_freq_factor": 4.0},
     ["rope_low_freq_factor < rope_high_freq_factor"]),
    ({"positional": "rope", "rope_scaling": "llama3", "rope_original_max_len": 0},
     ["rope_original_max_len", ">= 1"]),
    ({"architecture": "encoder-decoder", "norm_position": "pre", "parallel_residual": True},
     ["parallel_residual", "encoder-decoder"]),
])
def test_bad_specs_name_the_field(changes, words):
    with pytest.raises(SpecError) as e:
        ModelSpec.from_dict({**ModelSpec().to_dict(), **changes})
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg


def test_malformed_text_is_a_spec_error():
    with pytest.raises(SpecError, match="JSON"):
        ModelSpec.from_json("{not json")
    with pytest.raises(SpecError, match="mapping"):
        ModelSpec.from_yaml("- a\n- b\n")


def test_omitted_fields_take_defaults_and_files_load(tmp_path):
    (tmp_path / "s.yaml").write_text("d_model: 32\nn_heads: 2\n")
    spec = ModelSpec.load(tmp_path / "s.yaml")
    assert spec == ModelSpec(d_model=32, n_heads=2)
    spec.save(tmp_path / "s.json")
    assert ModelSpec.load(tmp_path / "s.json") == spec
    assert ModelSpec.load("bert-mini") == ModelSpec.preset("bert-mini")
    with pytest.raises(SpecError, match="does not exist"):
        ModelSpec.load(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", list(PRESETS))
def test_presets_are_valid(name):
    spec = ModelSpec.preset(name)
    assert spec.d_model % spec.n_heads == 0


def test_sinusoidal_table_follows_vaswani():
    table = sinusoidal_table(50, 16)
    pos, i = 7, 3
    assert table[pos, 2 * i] == pytest.approx(np.sin(pos / 10000 ** (2 * i / 16)), abs=1e-15)
    assert table[pos, 2 * i + 1] == pytest.approx(np.cos(pos / 10000 ** (2 * i / 16)), abs=1e-15)
    assert table[0, 0::2].max() == 0 and table[0, 1::2].min() == 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_choices_are_what_validation_accepts(arch):
    """:func:`choices` (the declared values, narrowed per architecture) agrees with
    validation: every value it lists is accepted, every other declared value refused."""
    base = ModelSpec(architecture=arch, head="none")
    allowed = choices(arch)
    assert set(allowed) == set(CHOICES) - {"architecture"}
    for field, values in CHOICES.items():
        if field == "architecture":
            continue
        for value in values:
            changes = {field: value}
            if field in CONDITIONAL and CONDITIONAL[field][1] in allowed[CONDITIONAL[field][0]]:
                changes[CONDITIONAL[field][0]] = CONDITIONAL[field][1]
            try:
                base.replace(**changes)
                accepted = True
            except SpecError:
                accepted = False
            assert accepted == (value in allowed[field]), (arch, field, value)


@pytest.mark.parametrize("seed", [0, 1, 2026])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_covering_specs_cover_every_declared_value(arch, seed):
    """Every value of every categorical field the spec declares for ``arch`` occurs in the
    conformance matrix's specs: a value added to ``xformer.spec.CHOICES`` cannot be left out."""
    specs = covering_specs(6, seed=seed, architecture=arch)
    assert all(s.architecture == arch for s in specs)
    for field, values in choices(arch).items():
        assert {getattr(s, field) for s in specs} == set(values), (arch, field)
    for field, values in field_values(arch).items():
        assert {getattr(s, field) for s in specs} == set(values), (arch, field)
    if arch == "encoder":
        assert {s.type_vocab_size for s in specs} == {0, 2}
