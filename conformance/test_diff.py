"""Divergence localisation (`xformer diff`): a single perturbed weight or a changed
hyper-parameter in one backend is found at the node where it enters (issue #4)."""

import json

import pytest

from xformer import ModelSpec, random_weights
from xformer.backend import is_installed
from xformer.cli import main
from xformer.conformance import Case, diff_traces, first_divergence, trace_run

BACKENDS = [b for b in ("torch", "tensorflow", "mxnet") if is_installed(b)]
SPEC = ModelSpec(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_len=12,
                 norm_eps=1e-5, activation="gelu", embedding_norm=True, type_vocab_size=2,
                 head="pooler")
W = random_weights(SPEC, seed=1)


def _other(backend):
    """Run the unchanged side on another backend, so the comparison also crosses frameworks."""
    rest = [b for b in BACKENDS if b != backend]
    return rest[0] if rest else backend


def _first(spec_b=SPEC, w_b=W, backend="torch", spec_a=SPEC, dtype="float64"):
    case = Case.make(spec_a, seed=3, dtype=dtype, weights=W)
    a = trace_run(spec_a, W, case, _other(backend))
    b = trace_run(spec_b, w_b, case, backend)
    rows = diff_traces(a, b, dtype)
    return first_divergence(rows), rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_divergence_between_backends(backend):
    first, rows = _first(backend=backend)
    assert first is None, first
    assert {r.name for r in rows} == {n for n, _ in SPEC.nodes()}
    assert len(rows) == 2 * len(SPEC.nodes())


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_perturbed_weight(backend):
    w = {k: v.copy() for k, v in W.items()}
    w["encoder.layers.1.ffn.linear2.weight"][3, 5] += 1e-4
    first, rows = _first(w_b=w, backend=backend)
    assert first.name == "encoder.layers.1.ffn" and first.direction == "forward"
    before = [r for r in rows if r.direction == "forward"][: [r.name for r in rows].index(
        first.name)]
    assert all(r.max_rel < 1e-13 for r in before)  # clean up to the node, not just "ok"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change, node", [
    ({"norm_eps": 1e-3}, "embeddings.norm"),
    ({"activation": "gelu_tanh"}, "encoder.layers.0.ffn"),
    ({"embed_scale": True}, "embeddings.norm"),
    ({"norm_position": "pre"}, "encoder.layers.0.self_attn"),
], ids=["eps", "gelu", "embed_scale", "pre-ln"])
def test_changed_hyperparameter(backend, change, node):
    """(The scale enters the Embeddings module before its LayerNorm, the first node recorded
    inside it; without an embedding norm the node is ``embeddings`` itself, below.)"""
    first, _ = _first(spec_b=SPEC.replace(**change), backend=backend)
    assert first is not None and first.name == node, first


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_embed_scale_without_embedding_norm(backend):
    spec = SPEC.replace(embedding_norm=False, embed_scale=True)
    case = Case.make(spec, seed=3, dtype="float64", weights=random_weights(spec, seed=1))
    w = random_weights(spec, seed=1)
    rows = diff_traces(trace_run(spec, w, case, _other(backend)),
                       trace_run(spec.replace(embed_scale=False), w, case, backend), "float64")
    assert first_divergence(rows).name == "embeddings"


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_attention_weight_in_an_encoder_decoder(backend):
    spec = ModelSpec(architecture="encoder-decoder", vocab_size=40, d_model=16, n_heads=2,
                     d_ff=24, n_layers=1, n_decoder_layers=2, max_len=10, head="lm",
                     embedding_norm=False)
    w = random_weights(spec, seed=2)
    w2 = {k: v.copy() for k, v in w.items()}
    w2["decoder.layers.1.cross_attn.v_proj.weight"][0, 0] += 1e-3
    case = Case.make(spec, seed=0, dtype="float64", weights=w)
    rows = diff_traces(trace_run(spec, w, case, _other(backend)),
                       trace_run(spec, w2, case, backend), "float64")
    assert first_divergence(rows).name == "decoder.layers.1.cross_attn"


LLAMA = ModelSpec.preset("llama-tiny").replace(vocab_size=60, d_model=32, n_layers=2, max_len=12)
LLAMA_W = random_weights(LLAMA, seed=6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", [{"rope_style": "interleaved"}, {"rope_theta": 10000.0},
                                    {"rotary_fraction": 0.5}],
                         ids=["rope-style", "rope-theta", "rotary-fraction"])
def test_rotary_mismatch_enters_at_the_first_self_attention(backend, change):
    """A port that rotates in the other convention (half vs interleaved, the classic
    Llama-from-Meta vs Hugging Face mistake), with another base (5e5 vs 1e4) or on another
    fraction of the head, diverges at the first self-attention, and nothing before it."""
    case = Case.make(LLAMA, seed=3, dtype="float64", weights=LLAMA_W)
    rows = diff_traces(trace_run(LLAMA, LLAMA_W, case, _other(backend)),
                       trace_run(LLAMA.replace(**change), LLAMA_W, case, backend), "float64")
    first = first_divergence(rows)
    assert first is not None and first.name == "decoder.layers.0.self_attn", first
    forward = [r for r in rows if r.direction == "forward"]
    before = forward[: [r.name for r in forward].index(first.name)]
    assert before and all(r.max_rel < 1e-13 for r in before)


def test_cli_diff_json_and_exit_codes(tmp_path, capsys):
    from xformer import save_weights

    SPEC.save(tmp_path / "a.yaml")
    SPEC.replace(norm_eps=1e-3).save(tmp_path / "b.yaml")
    save_weights(tmp_path / "w.safetensors", W, SPEC)
    pair = ",".join([BACKENDS[0], BACKENDS[-1]])
    code = main(["diff", "--spec", str(tmp_path / "a.yaml"), "--weights",
                 str(tmp_path / "w.safetensors"), "--backends", pair, "--json",
                 str(tmp_path / "same.json")])
    assert code == 0
    doc = json.loads((tmp_path / "same.json").read_text())
    assert doc["first_divergence"] is None and all(r["ok"] for r in doc["rows"])
    code = main(["diff", "--spec", str(tmp_path / "a.yaml"), "--spec-b",
                 str(tmp_path / "b.yaml"), "--backends", pair, "--json",
                 str(tmp_path / "eps.json")])
    out = capsys.readouterr().out
    assert code == 1 and "first divergence" in out
    doc = json.loads((tmp_path / "eps.json").read_text())
    assert doc["first_divergence"] == "embeddings.norm"
    row = doc["rows"][0]
    assert set(row) >= {"name", "kind", "max_abs", "max_rel", "direction"}
    assert main(["diff", "--spec", str(tmp_path / "a.yaml"), "--backends", "torch"]) == 2
