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


def test_presets_match_published_parameter_counts():
    # BERT-base: 109,482,240 with its pooler (Hugging Face BertModel); GPT-2 small:
    # 124,439,808 (Hugging Face gpt2, tied LM head).
    assert ModelSpec.preset("bert-base").num_parameters() == 109_482_240
    assert ModelSpec.preset("gpt2-small").num_parameters() == 124_439_808


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
