"""The command line under hostile input (issue #8): one exit-code contract (0 / 1 / 2 / 3),
one stderr line per error, output paths checked before any work and never an input, verdicts
that cannot lie, argument sanity. Every test also checks that its input files are untouched."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import xformer.backend as xb
import xformer.cli as cli
from xformer import ModelSpec
from xformer.cli import main
from xformer.errors import InputError
from xformer.weights import init_weights, save_pretrained, save_weights

SPEC = ModelSpec(vocab_size=40, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_len=10,
                 head="pooler")
DECODER = ModelSpec(architecture="decoder", vocab_size=30, d_model=8, n_heads=2, d_ff=16,
                    n_layers=1, max_len=12, head="lm", positional="learned", type_vocab_size=0,
                    bos_token_id=0, eos_token_id=0)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(capsys, *argv, code=2, prefix="xformer: error:"):
    """Run ``argv``; assert the exit code and exactly one stderr line; return that line."""
    got, _, err = run(capsys, *argv)
    lines = err.splitlines()
    assert got == code, err
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    return lines[0]


def snapshot(*paths):
    """``{path: bytes}`` of every file under ``paths``, to check that nothing was touched."""
    out = {}
    for p in map(Path, paths):
        for f in [p] if p.is_file() else sorted(p.rglob("*")):
            if f.is_file():
                out[str(f)] = f.read_bytes()
    return out


@pytest.fixture
def files(tmp_path):
    """A spec file, a weights file, a checkpoint directory and a decoder checkpoint."""
    spec = tmp_path / "s.json"
    SPEC.save(spec)
    weights = tmp_path / "w.safetensors"
    save_weights(weights, init_weights(SPEC, seed=1), SPEC)
    ckpt = tmp_path / "ckpt"
    save_pretrained(ckpt, SPEC, init_weights(SPEC, seed=2))
    dec = tmp_path / "dec"
    save_pretrained(dec, DECODER, init_weights(DECODER, seed=3))
    return {"spec": spec, "weights": weights, "ckpt": ckpt, "dec": dec, "dir": tmp_path}


@pytest.fixture
def no_work(monkeypatch):
    """Commands that fail the test if they are reached: the checks must come first."""
    def reached(args):
        raise AssertionError(f"{args.command} ran before its arguments were checked")

    for name in ("cmd_compare", "cmd_diff", "cmd_init", "cmd_generate", "cmd_embed"):
        monkeypatch.setattr(cli, name, reached)


# ---------------------------------------------------------------------- 1. exit codes
def test_exit_1_is_only_a_verdict(files, capsys):
    """diff of two different checkpoints on the same backend: a real divergence, exit 1, no
    stderr line."""
    other = files["dir"] / "w2.safetensors"
    save_weights(other, init_weights(SPEC, seed=9), SPEC)
    before = snapshot(files["dir"])
    code, out, err = run(capsys, "diff", "--spec", files["spec"], "--weights", files["weights"],
                         "--weights-b", other, "--backends", "torch,torch")
    assert code == 1 and "first divergence" in out and err == ""
    assert snapshot(files["dir"]) == before


@pytest.mark.parametrize("debug", [False, True])
def test_internal_error_is_exit_3_with_a_report_line(capsys, monkeypatch, debug):
    def boom(args):
        raise RuntimeError("boom " + "x" * 5000)

    monkeypatch.setattr(cli, "cmd_show", boom)
    code, _, err = run(capsys, *(["--debug"] if debug else []), "show")
    assert code == 3
    last = err.splitlines()[-1]
    assert last.startswith("xformer: internal error: RuntimeError: boom xxx")
    assert last.endswith("(please report it with --debug output)") and len(last) < 500
    if debug:
        assert "Traceback (most recent call last)" in err and "boom" in err
    else:
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    # --debug also after the command
    code, _, err = run(capsys, "show", "--debug")
    assert code == 3 and "Traceback" in err


@pytest.mark.parametrize("exc, code, words", [
    (PermissionError(13, "Permission denied", "/data/x.json"), 2, "Permission denied"),
    (OSError(28, "No space left on device", "/data/r.json"), 2,
     "'/data/r.json': No space left on device; free some space"),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), 2, "UTF-8"),
    (UnicodeError("bad text"), 2, "not valid UTF-8 (bad text)"),
    (RecursionError("maximum recursion depth exceeded"), 2, "nested too deeply"),
    (MemoryError(), 2, "out of memory"),
    (InputError("bad\nsecond line"), 2, "bad | second line"),
])
def test_environment_errors_are_exit_2(capsys, monkeypatch, exc, code, words):
    def fail(args):
        raise exc

    monkeypatch.setattr(cli, "cmd_show", fail)
    assert words in error_line(capsys, "show", code=code)


def test_a_huge_number_in_a_usage_error_is_cut(capsys):
    line = error_line(capsys, "compare", "--seed", "9" * 5001)
    assert "invalid int value" in line and len(line) < 400


def test_keyboard_interrupt_is_130(capsys, monkeypatch):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_show", interrupt)
    assert run(capsys, "show")[0] == 130


def test_a_huge_message_is_cut(capsys, monkeypatch):
    def fail(args):
        raise InputError("value " + "y" * 100_000)

    monkeypatch.setattr(cli, "cmd_show", fail)
    line = error_line(capsys, "show")
    assert len(line) < cli.ERROR_LINE_LIMIT + 100 and line.endswith("chars)")


# ---------------------------------------------------------------------- 2. output paths
@pytest.mark.parametrize("argv, words", [
    (["compare", "--weights", "{weights}", "--json", "{weights}"], "is the input --weights"),
    (["compare", "--weights", "{weights}", "--html", "{weights}"], "is the input --weights"),
    (["compare", "--spec", "{spec}", "--weights", "{weights}", "--json", "{spec}"],
     "is the input --spec"),
    (["compare", "--model", "{ckpt}", "--json", "{ckpt}/model.safetensors"],
     "is inside the input --model"),
    (["compare", "--model", "{ckpt}", "--html", "{ckpt}/report.html"], "is inside the input"),
    (["compare", "--weights", "{weights}", "--json", "{link}"], "is the input --weights"),
    (["diff", "--spec", "{spec}", "--backends", "torch,torch", "--json", "{spec}"],
     "is the input --spec"),
    (["diff", "--spec", "{spec}", "--weights-b", "{weights}", "--backends", "torch,torch",
      "--json", "{weights}"], "is the input --weights-b"),
    (["init", "--spec", "{spec}", "--out", "{spec}"], "is the input --spec"),
    (["init", "--spec", "{ckpt}/spec.json", "--out", "{ckpt}"], "holds the input --spec"),
    (["compare", "--json", "{dir}/r.json", "--html", "{dir}/r.json"], "the same file"),
])
def test_an_output_is_never_an_input(files, capsys, no_work, argv, words):
    link = files["dir"] / "link.json"
    link.symlink_to(files["weights"])
    before = snapshot(files["dir"])
    names = {k: str(v) for k, v in files.items()} | {"link": str(link)}
    line = error_line(capsys, *[a.format(**names) for a in argv])
    assert words in line, line
    assert snapshot(files["dir"]) == before


@pytest.mark.parametrize("out, words", [
    ("/nonexistent-folder/r.json", "does not exist; create it first"),
    ("/proc/r.json", "under /proc"),
    ("/sys/r.json", "under /sys"),
    ("/dev/null", "under /dev"),
    ("{dir}", "is an existing directory"),
    ("{weights}/r.json", "is not a folder"),
    ("", "is empty"),
])
def test_output_paths_are_checked_before_the_work(files, capsys, no_work, out, words):
    before = snapshot(files["dir"])
    out = out.format(**{k: str(v) for k, v in files.items()})
    for option in ("--json", "--html"):
        assert words in error_line(capsys, "compare", option, out)
    assert words in error_line(capsys, "diff", "--spec", files["spec"], "--backends",
                               "torch,torch", "--json", out)
    if out and not out.endswith("r.json") and out != files["dir"].as_posix():
        assert words in error_line(capsys, "init", "--spec", files["spec"], "--out", out)
    assert snapshot(files["dir"]) == before


def test_an_unwritable_folder_is_refused(files, capsys, no_work, monkeypatch):
    ro = files["dir"] / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    real_access = os.access
    # root may write anywhere: make the check see the folder as others would
    monkeypatch.setattr(cli.os, "access", lambda p, mode: False if str(p) == str(ro)
                        else real_access(p, mode))
    assert "is not writable" in error_line(capsys, "compare", "--json", ro / "r.json")
    assert "is not writable" in error_line(capsys, "init", "--spec", files["spec"], "--out",
                                           ro / "w.safetensors")


def test_a_fifo_output_is_refused(files, capsys, no_work):
    fifo = files["dir"] / "pipe.json"
    os.mkfifo(fifo)
    assert "not a regular file" in error_line(capsys, "compare", "--json", fifo)


def test_init_over_its_own_spec_leaves_it_intact_and_legal_outputs_work(files, capsys):
    spec = files["spec"]
    before = spec.read_bytes()
    error_line(capsys, "init", "--spec", spec, "--out", spec)
    assert spec.read_bytes() == before
    # the legitimate uses still work: a new file, and rewriting a previous checkpoint directory
    code, out, err = run(capsys, "init", "--spec", spec, "--out", files["dir"] / "n.safetensors")
    assert code == 0 and (files["dir"] / "n.safetensors").is_file(), err
    code, out, err = run(capsys, "init", "--spec", spec, "--seed", "5", "--out", files["ckpt"])
    assert code == 0, err
    assert spec.read_bytes() == before


# ---------------------------------------------------------------------- 3. verdicts
def test_model_with_weights_is_refused(files, capsys, no_work):
    before = snapshot(files["dir"])
    line = error_line(capsys, "compare", "--model", files["ckpt"], "--weights", files["weights"])
    assert "give either --model" in line
    # --model with --spec: argparse's one-line usage error, also exit 2
    assert "not allowed with" in error_line(capsys, "compare", "--model", files["ckpt"],
                                            "--spec", files["spec"])
    assert snapshot(files["dir"]) == before


@pytest.mark.parametrize("backends, words", [
    ("torch,,torch", "has an empty entry"),
    ("torch,", "has an empty entry"),
    (",,", "is empty"),
    ("", "is empty"),
    (" ", "is empty"),
    ("torch,torch", "names 'torch' twice"),
    ("torch, torch", "names 'torch' twice"),
    ("torch,torch/eager", "names the target 'torch/eager' twice"),
])
def test_empty_or_duplicate_backends_are_refused(capsys, backends, words):
    assert words in error_line(capsys, "compare", "--backends", backends, "--repeats", "0")


def test_diff_backends_need_two_non_empty_names(files, capsys):
    for value in ("torch,", ",torch", ",", ""):
        error_line(capsys, "diff", "--spec", files["spec"], "--backends", value)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_named_before_any_comparison(files, capsys, monkeypatch, value):
    import xformer.conformance as conformance

    def no_run(*a, **k):
        raise AssertionError("a comparison ran on non-finite weights")

    monkeypatch.setattr(conformance, "run_case", no_run)
    w = init_weights(SPEC, seed=1)
    w["encoder.layers.0.ffn.linear1.weight"][3, 2] = value
    bad = files["dir"] / "bad.safetensors"
    save_weights(bad, w, SPEC)
    bad_dir = files["dir"] / "bad_dir"
    save_pretrained(bad_dir, SPEC, w)
    before = snapshot(files["dir"])
    for argv in (["compare", "--weights", bad, "--backends", "torch"],
                 ["compare", "--spec", files["spec"], "--weights", bad, "--backends", "torch"],
                 ["compare", "--model", bad_dir, "--backends", "torch"],
                 ["diff", "--spec", files["spec"], "--weights", bad, "--backends",
                  "torch,torch"],
                 ["diff", "--spec", files["spec"], "--weights-b", bad, "--backends",
                  "torch,torch"]):
        line = error_line(capsys, *argv)
        assert "'encoder.layers.0.ffn.linear1.weight'" in line and "non-finite" in line, line
    assert snapshot(files["dir"]) == before


def test_non_finite_weights_refused_by_generate(files, capsys):
    w = init_weights(DECODER, seed=3)
    name = next(n for n in w if n.endswith("ffn.linear2.bias"))
    w[name][0] = np.nan
    bad = files["dir"] / "bad_dec"
    save_pretrained(bad, DECODER, w)
    line = error_line(capsys, "generate", "--model", bad, "--prompt-ids", "1,2")
    assert f"'{name}'" in line and "non-finite" in line


def _bert_dir(path, weights):
    """An xformer checkpoint directory of SPEC with a word-level ``tokenizer.json``."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    save_pretrained(path, SPEC, weights)
    words = ["[PAD]", "[UNK]", "a", "man", "plays", "guitar", "hello"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return path


def test_embed_checks_weights_and_memory_before_building(files, capsys, monkeypatch):
    import xformer.resources as resources

    good = _bert_dir(files["dir"] / "bert", init_weights(SPEC, seed=4))
    code, out, err = run(capsys, "embed", "--model", good, "--backend", "torch", "--json",
                         "a man plays guitar", "hello")
    assert code == 0, err
    vectors = np.array(json.loads(out))
    assert vectors.shape == (2, SPEC.d_model)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
    w = init_weights(SPEC, seed=4)
    w["embeddings.word_embeddings.weight"][0, 0] = np.inf
    bad = _bert_dir(files["dir"] / "bad_bert", w)
    line = error_line(capsys, "embed", "--model", bad, "--backend", "torch", "hello")
    assert "'embeddings.word_embeddings.weight'" in line and "non-finite" in line
    monkeypatch.setattr(resources, "available_memory", lambda: 1000)
    line = error_line(capsys, "embed", "--model", good, "--backend", "torch", "hello")
    assert "available; use --force to try" in line
    code, _, err = run(capsys, "embed", "--model", good, "--backend", "torch", "--force",
                       "--json", "hello")
    assert code == 0, err


# ---------------------------------------------------------------------- 4. arguments
@pytest.mark.parametrize("seed", ["-1", str(2**32), str(10**30)])
def test_seeds_outside_32_bits_are_refused(files, capsys, no_work, seed):
    for argv in (["compare"], ["init", "--spec", files["spec"], "--out", files["dir"] / "x"],
                 ["diff", "--spec", files["spec"], "--backends", "torch,torch"]):
        assert "--seed must be an integer in [0, 2**32)" in error_line(capsys, *argv, "--seed",
                                                                       seed)


def test_the_largest_seed_is_fine(files, capsys):
    out = files["dir"] / "s.safetensors"
    code, _, err = run(capsys, "init", "--spec", files["spec"], "--seed", str(2**32 - 1),
                       "--out", out)
    assert code == 0 and out.is_file(), err


@pytest.mark.parametrize("ids, words", [
    (str(10**30), "token id 1000000000000000000000000000000 is outside [0, vocab_size=30)"),
    ("1,-1", "outside [0, vocab_size=30)"),
    ("1,30", "token id 30 is outside"),
    ("9" * 5001, "…(5003 chars) is outside [0, vocab_size=30)"),
    ("1,x", "comma-separated integers"),
    ("1,,2", "comma-separated integers"),
    ("1,2.5", "comma-separated integers"),
    (",", "is empty"),
])
def test_bad_prompt_ids(files, capsys, ids, words):
    line = error_line(capsys, "generate", "--model", files["dec"], "--prompt-ids", ids)
    assert words in line and len(line) < 300, line


def test_huge_beam_search_is_refused_before_allocating(files, capsys, monkeypatch):
    before = snapshot(files["dec"])
    line = error_line(capsys, "generate", "--model", files["dec"], "--prompt-ids", "1,2",
                      "--num-beams", "100000000", "--max-new-tokens", "8")
    assert "needs" in line and "GiB available; use --force to try" in line
    assert "100000000 beams" in line
    assert "longer than max_len=12" in error_line(
        capsys, "generate", "--model", files["dec"], "--prompt-ids", "1,2", "--max-new-tokens",
        str(10**12))
    # --force reaches the estimate as force=True (not run for real: it would allocate)
    import xformer.resources as resources

    seen = {}

    def check_memory(*a, **k):
        seen.update(k)
        raise InputError("stop here")

    monkeypatch.setattr(resources, "check_memory", check_memory)
    error_line(capsys, "generate", "--model", files["dec"], "--prompt-ids", "1,2",
               "--num-beams", "100000000", "--force")
    assert seen["force"] is True and seen["num_beams"] == 100000000
    assert snapshot(files["dec"]) == before


def test_a_huge_spec_is_refused_with_force_hint(files, capsys, monkeypatch):
    """d_model 65536: about 15 GiB of parameters, refused before anything is allocated (the
    machine is made to have 4 GiB available, so the test does not depend on this one)."""
    import xformer.resources as resources

    monkeypatch.setattr(resources, "available_memory", lambda: 4 << 30)
    big = files["dir"] / "big.json"
    big.write_text('{"d_model": 65536, "n_heads": 64}')
    for argv in (["init", "--spec", big, "--out", files["dir"] / "big.safetensors"],
                 ["compare", "--spec", big, "--backends", "torch"],
                 ["diff", "--spec", big, "--backends", "torch,torch"]):
        line = error_line(capsys, *argv)
        assert "GiB; 4.0 GiB available; use --force to try" in line, line
    # a huge batch of the built-in spec, too
    line = error_line(capsys, "compare", "--batch", "100000000", "--backends", "torch")
    assert "GiB; 4.0 GiB available; use --force to try" in line, line
    assert not (files["dir"] / "big.safetensors").exists()


@pytest.mark.parametrize("argument", ["\udcff", "caf\udce9", "a\x00b"])
def test_embed_with_a_non_utf8_argument(files, capsys, no_work, argument):
    line = error_line(capsys, "embed", "--model", files["ckpt"], argument)
    assert "UTF-8" in line or "NUL" in line


def test_non_utf8_path_argument(files, capsys, no_work):
    assert "--spec is not valid UTF-8" in error_line(capsys, "compare", "--spec",
                                                     str(files["dir"] / "s\udcff.json"))


@pytest.mark.parametrize("kind", ["directory", "fifo", "binary", "dev-zero"])
def test_a_spec_that_is_not_a_spec_file(files, capsys, kind):
    path = {"directory": files["dir"], "dev-zero": Path("/dev/zero")}.get(kind)
    if kind == "fifo":
        path = files["dir"] / "spec.yaml"
        os.mkfifo(path)
    elif kind == "binary":
        path = files["dir"] / "spec.json"
        path.write_bytes(bytes(range(256)) * 4)
    error_line(capsys, "compare", "--spec", path, "--backends", "torch")
    error_line(capsys, "init", "--spec", path, "--out", files["dir"] / "o.safetensors")


# ---------------------------------------------------------------------- 5. framework noise
@pytest.mark.skipif(not xb.is_installed("tensorflow"), reason="TensorFlow not installed")
def test_one_line_after_tensorflow_was_loaded(files):
    """A bad-input error raised after TensorFlow built the model is still one stderr line."""
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    code = ("import sys; from xformer.cli import main; sys.exit(main(['generate', '--backend', "
            f"'tensorflow', '--model', {str(files['dec'])!r}, '--prompt-ids', '1,2,3', "
            "'--max-new-tokens', '11']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=environ, cwd=files["dir"])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and "longer than max_len=12" in lines[0], r.stderr


# ---------------------------------------------------------------------- generated
@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(alphabet="torch,/eagmpil x", max_size=24))
def test_generated_backend_lists(value):
    """Any ``--backends`` text gives targets without duplicates, or one xformer error."""
    import argparse

    from xformer.errors import XformerError

    args = argparse.Namespace(backends=value, all_modes=False)
    try:
        targets = cli._targets(args)
    except XformerError as e:
        assert "\n" not in str(e)
        return
    names = [s.strip() for s in value.split(",")]
    assert all(names) and len(set(names)) == len(names)
    labels = [t.label for t in targets]
    assert labels and len(set(labels)) == len(labels)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.text(alphabet="0123456789,-+ x.e", max_size=30))
def test_generated_prompt_ids(files, capsys, ids):
    """Any ``--prompt-ids`` text: ids from the vocabulary (exit 0) or one error line (exit
    2); never a traceback."""
    code, out, err = run(capsys, "generate", "--model", files["dec"], "--prompt-ids", ids,
                         "--max-new-tokens", "2", "--json")
    assert code in (0, 2), err
    if code == 2:
        assert len(err.splitlines()) == 1 and err.startswith("xformer: error:"), err
    else:
        assert all(0 <= int(i) < DECODER.vocab_size for i in ids.split(","))
        assert 1 <= len(json.loads(out)) <= 2
