"""``xformer train`` and ``xformer compare --train-steps`` on the command line (issue #10): a
checkpoint that loads back, the JSON log, and bad training input refused with exit 2 and one line
before any step runs (a token id outside the vocabulary, rows longer than ``max_len``, an empty
or non-integer data file, a negative learning rate, an unknown optimizer, ...); an interrupted
run leaves no checkpoint and no input file is touched."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xformer import ModelSpec, from_pretrained
from xformer.cli import main
from xformer.weights import init_weights, save_pretrained

DECODER = ModelSpec(architecture="decoder", vocab_size=30, d_model=8, n_heads=2, d_ff=16,
                    n_layers=1, max_len=12, head="lm", positional="learned", type_vocab_size=0,
                    bos_token_id=0, eos_token_id=0)
SEQ2SEQ = ModelSpec(architecture="encoder-decoder", vocab_size=30, d_model=8, n_heads=2, d_ff=16,
                    n_layers=1, max_len=12, head="lm", type_vocab_size=0, bos_token_id=0,
                    eos_token_id=1)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(capsys, *argv):
    """Run ``argv``; assert exit 2 and exactly one ``xformer: error:`` line; return it."""
    code, _, err = run(capsys, *argv)
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("xformer: error:"), err
    return lines[0]


@pytest.fixture
def files(tmp_path):
    spec = tmp_path / "decoder.json"
    DECODER.save(spec)
    data = tmp_path / "tokens.npy"
    np.save(data, np.random.default_rng(0).integers(0, 30, (8, 10)))
    return {"spec": spec, "data": data, "dir": tmp_path}


def test_train_writes_a_checkpoint_that_loads_back(files, capsys):
    out = files["dir"] / "trained"
    code, stdout, err = run(capsys, "train", "--spec", files["spec"], "--backend", "torch",
                            "--data", files["data"], "--steps", 3, "--batch-size", 4,
                            "--lr", 1e-2, "--dtype", "float64", "--out", out, "--json")
    assert code == 0, err
    doc = json.loads(stdout)
    assert [s["step"] for s in doc["steps"]] == [0, 1, 2]
    assert doc["steps"][2]["loss"] < doc["steps"][0]["loss"]  # lr 1e-2 AdamW learns
    assert doc["backend"] == "torch" and doc["config"]["optimizer"] == "adamw"
    spec, weights = from_pretrained(out)
    assert spec == DECODER
    start = init_weights(DECODER, seed=0, dtype="float64")
    moved = [n for n in start if not np.array_equal(start[n], weights[n])]
    assert len(moved) == len(start)  # every tensor took AdamW steps (decay moves all)
    assert weights["decoder.layers.0.ffn.linear1.weight"].dtype == np.float64


def test_train_from_model_continues_the_checkpoint(files, capsys):
    ckpt = files["dir"] / "start"
    save_pretrained(ckpt, DECODER, init_weights(DECODER, seed=3))
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    out = files["dir"] / "next"
    code, stdout, err = run(capsys, "train", "--model", ckpt, "--backend", "torch",
                            "--data", files["data"], "--steps", 1, "--optimizer", "sgd",
                            "--lr", 0.0, "--out", out)
    assert code == 0, err
    assert "trained 1 steps on torch/eager" in stdout
    _, w0 = from_pretrained(ckpt)
    _, w1 = from_pretrained(out)
    for name in w0:  # lr 0: the weights come back unchanged
        np.testing.assert_array_equal(w0[name], w1[name])
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before


@pytest.mark.parametrize("case, make, extra, needle", [
    ("token id outside the vocabulary", lambda: np.full((4, 6), 30), (),
     "token id 30 at row 0, column 0, outside [0, vocab_size=30)"),
    ("negative token id", lambda: np.full((4, 6), -1), (), "token id -1"),
    ("rows longer than max_len", lambda: np.zeros((4, 13), np.int64), (),
     "more than max_len=12"),
    ("non-integer data", lambda: np.zeros((4, 6)), (), "integer array of token ids"),
    ("1-D data", lambda: np.zeros(6, np.int64), (), "2-D array of token rows"),
    ("no rows", lambda: np.zeros((0, 6), np.int64), (), "non-empty"),
    ("one-token rows", lambda: np.zeros((4, 1), np.int64), (), "at least 2"),
    ("negative learning rate", None, ("--lr", "-0.001"), "--lr must be a finite number >= 0"),
    ("nan learning rate", None, ("--lr", "nan"), "--lr must be a finite number"),
    ("unknown optimizer", None, ("--optimizer", "lion"), "invalid choice: 'lion'"),
    ("bad betas", None, ("--betas", "0.9"), "--betas must be two numbers"),
    ("beta of 1", None, ("--betas", "0.9,1.0"), "--betas B2 must be"),
    ("nesterov without momentum", None, ("--optimizer", "sgd", "--nesterov"), "nesterov"),
    ("zero batch", None, ("--batch-size", "0"), "--batch-size must be"),
    ("zero accumulation", None, ("--grad-accum", "0"), "--grad-accum must be"),
    ("clip of 0", None, ("--clip-grad-norm", "0"), "--clip-grad-norm must be"),
    ("warm-up past the run", None, ("--warmup-steps", "9"), "--warmup-steps must be <="),
    ("zero steps", None, ("--steps", "0"), "--steps must be >= 1"),
])
def test_bad_training_input_exits_2_before_any_work(files, capsys, case, make, extra, needle):
    data = files["data"]
    if make is not None:
        data = files["dir"] / "bad.npy"
        np.save(data, make())
    before = data.read_bytes()
    out = files["dir"] / "never"
    argv = ["train", "--spec", files["spec"], "--backend", "torch", "--data", data,
            "--steps", 3, "--out", out, *extra]  # a repeated --steps: the last one counts
    line = error_line(capsys, *argv)
    assert needle in line, line
    assert not out.exists()
    assert data.read_bytes() == before


def test_bad_data_files(files, capsys):
    empty = files["dir"] / "empty.npy"
    empty.write_bytes(b"")
    assert "is not a valid .npy file" in error_line(
        capsys, "train", "--spec", files["spec"], "--data", empty, "--steps", 1, "--out",
        files["dir"] / "o")
    pickled = files["dir"] / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "is not a valid .npy file" in error_line(
        capsys, "train", "--spec", files["spec"], "--data", pickled, "--steps", 1, "--out",
        files["dir"] / "o")
    text = files["dir"] / "tokens.txt"
    text.write_text("1 2 3")
    assert "must be a .npy array" in error_line(
        capsys, "train", "--spec", files["spec"], "--data", text, "--steps", 1, "--out",
        files["dir"] / "o")
    assert "No such file" in error_line(
        capsys, "train", "--spec", files["spec"], "--data", files["dir"] / "missing.npy",
        "--steps", 1, "--out", files["dir"] / "o")
    assert "train needs --data" in error_line(
        capsys, "train", "--spec", files["spec"], "--steps", 1, "--out", files["dir"] / "o")


def test_out_may_not_be_the_data_or_an_encoder(files, capsys):
    assert "destroy the input" in error_line(
        capsys, "train", "--spec", files["spec"], "--data", files["data"], "--steps", 1,
        "--out", files["dir"])
    assert "head='lm'" in error_line(
        capsys, "train", "--spec", "tiny", "--data", files["data"], "--steps", 1, "--out",
        files["dir"] / "o")


def test_encoder_decoder_data(tmp_path, capsys):
    spec = tmp_path / "s2s.json"
    SEQ2SEQ.save(spec)
    rng = np.random.default_rng(0)
    npz = tmp_path / "pairs.npz"
    np.savez(npz, source=rng.integers(0, 30, (6, 7)), target=rng.integers(0, 30, (5, 5)))
    assert "source has 6 rows but target has 5" in error_line(
        capsys, "train", "--spec", spec, "--data", npz, "--steps", 1, "--out", tmp_path / "o")
    npy = tmp_path / "rows.npy"
    np.save(npy, rng.integers(0, 30, (6, 7)))
    assert "'source' (N, S) and 'target' (N, T)" in error_line(
        capsys, "train", "--spec", spec, "--data", npy, "--steps", 1, "--out", tmp_path / "o")
    np.savez(npz, source=rng.integers(0, 30, (6, 7)), target=rng.integers(0, 30, (6, 5)))
    code, _, err = run(capsys, "train", "--spec", spec, "--data", npz, "--steps", 2,
                       "--batch-size", 3, "--backend", "torch", "--out", tmp_path / "o")
    assert code == 0, err
    assert from_pretrained(tmp_path / "o")[0] == SEQ2SEQ


def test_training_options_need_train_steps(files, capsys):
    assert "only apply with --train-steps" in error_line(
        capsys, "compare", "--spec", files["spec"], "--lr", "0.1")


def test_interrupted_train_leaves_no_checkpoint(files):
    """Ctrl-C in the middle of training: exit 130, no --out directory, no temporary left."""
    data = files["dir"] / "many.npy"
    np.save(data, np.random.default_rng(1).integers(0, 30, (64, 12)))
    out = files["dir"] / "interrupted"
    marker = files["dir"] / "started"
    code = ("import sys, pathlib; import xformer.training as t\n"
            "orig = t.micro_batches\n"
            "def slow(*a, **k):\n"
            f"    pathlib.Path({str(marker)!r}).touch()\n"
            "    import time; time.sleep(0.05)\n"
            "    return orig(*a, **k)\n"
            "t.micro_batches = slow\n"
            "from xformer.cli import main\n"
            f"sys.exit(main(['train', '--spec', {str(files['spec'])!r}, '--backend', 'torch',"
            f" '--data', {str(data)!r}, '--steps', '100000', '--out', {str(out)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=files["dir"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()
    time.sleep(0.5)  # some steps done
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert not out.exists()
    assert sorted(p.name for p in files["dir"].iterdir()) == sorted(
        ["decoder.json", "tokens.npy", "many.npy", "started"])


@pytest.mark.parametrize("steps", [3])
def test_compare_train_steps_json_and_html(files, capsys, steps):
    js, page = files["dir"] / "t.json", files["dir"] / "t.html"
    code, stdout, err = run(capsys, "compare", "--spec", files["spec"], "--train-steps", steps,
                            "--backends", "torch/eager,mxnet/imperative", "--dtype", "float64",
                            "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.1",
                            "--schedule", "linear", "--warmup-steps", 1, "--json", js,
                            "--html", page)
    assert code == 0, stdout + err
    assert "CONFORMANT" in stdout
    doc = json.loads(js.read_text())
    (report,) = doc["training"]
    assert report["ok"] and report["first_divergence"] is None
    assert [r["step"] for r in report["rows"]] == list(range(steps))
    assert report["rows"][0]["lr"] == 0.0 and report["rows"][1]["lr"] == 0.1
    assert all(r["param_error"] <= 1e-10 for r in report["rows"])
    assert "data:image/png;base64," in page.read_text()
