"""Data-parallel training on each framework's own engine (issue #12): ``xformer train --nproc 2``
gives the weights of ``--nproc 1`` on the same global batch (float64, 1e-10), the three
backends' 2-worker runs agree, a killed worker ends the whole run with no process and no
checkpoint left, and bad ``--nproc`` / ``--port`` exit 2 before any worker starts.

Every run is a real ``python -m xformer train`` in subprocesses (the workers must be separate
processes), so this file imports no framework."""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xformer import ModelSpec
from xformer.backend import is_installed
from xformer.conformance.training import _worst
from xformer.distributed import ENGINES
from xformer.weights import init_weights, save_pretrained

BACKENDS = ["torch", "tensorflow", "mxnet"]
#: A GPT-2-like decoder with dropout, so the stream's masks (drawn for the global batch) are
#: sliced per worker, and every other choice of issue #10's training (AdamW, warm-up, clipping,
#: accumulation).
SPEC = ModelSpec(architecture="decoder", vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                 n_layers=2, max_len=16, head="lm", positional="learned", type_vocab_size=0,
                 dropout=0.1, bos_token_id=0, eos_token_id=0)
STEPS = 5
TRAIN = ["--steps", STEPS, "--dtype", "float64", "--optimizer", "adamw", "--lr", "1e-2",
         "--schedule", "linear", "--warmup-steps", "1", "--clip-grad-norm", "1.0",
         "--batch-size", "4", "--grad-accum", "2", "--dropout", "stream", "--json"]
BOUND = 1e-10


def installed(name):
    return pytest.param(name, marks=pytest.mark.skipif(not is_installed(name),
                                                       reason=f"{name} is not installed"))


@functools.lru_cache(maxsize=1)
def _inputs(root: str) -> tuple[Path, Path]:
    """The starting checkpoint and the token rows, written once per process."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    model, data = root / "start", root / "tokens.npy"
    if not data.exists():
        save_pretrained(model, SPEC, init_weights(SPEC, seed=0, dtype="float64"))
        np.save(data, np.random.default_rng(1).integers(0, SPEC.vocab_size, (24, 12)))
    return model, data


def xformer(*argv, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "xformer", *map(str, argv)], env=env,
                          capture_output=True, text=True, timeout=600, **kw)


@functools.lru_cache(maxsize=None)
def trained(backend: str, nproc: int, root: str) -> tuple[dict, dict[str, np.ndarray]]:
    """``(the --json report, the final weights)`` of a 5-step run with ``nproc`` workers."""
    from safetensors.numpy import load_file

    model, data = _inputs(root)
    out = Path(root) / f"{backend}-{nproc}"
    done = xformer("train", "--model", model, "--data", data, "--backend", backend,
                   "--nproc", nproc, "--out", out, *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout), load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("distributed"))


@pytest.mark.parametrize("backend", [installed(b) for b in BACKENDS])
def test_two_workers_train_as_one_process(backend, root):
    one, w1 = trained(backend, 1, root)
    two, w2 = trained(backend, 2, root)
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert (one["engine"], two["engine"]) == (None, ENGINES[backend])
    err, where = _worst(w1, w2)
    assert err <= BOUND, (err, where)
    losses1 = np.array([s["loss"] for s in one["steps"]])
    losses2 = np.array([s["loss"] for s in two["steps"]])
    np.testing.assert_allclose(losses2, losses1, rtol=BOUND, atol=0)
    norms1 = np.array([s["grad_norm"] for s in one["steps"]])
    norms2 = np.array([s["grad_norm"] for s in two["steps"]])
    np.testing.assert_allclose(norms2, norms1, rtol=BOUND, atol=0)
    assert np.isfinite(losses1).all() and losses1[-1] < losses1[0]  # it trained
    start = init_weights(SPEC, seed=0, dtype="float64")
    moved, _ = _worst(start, w2)
    assert moved > 1e-3  # and the weights moved, far beyond the bound


def test_backends_agree_with_two_workers(root):
    names = [b for b in BACKENDS if is_installed(b)]
    if len(names) < 2:
        pytest.skip("needs two installed backends")
    base = trained(names[0], 2, root)[1]
    for other in names[1:]:
        err, where = _worst(base, trained(other, 2, root)[1])
        assert err <= BOUND, (other, err, where)


def test_compare_with_workers(root, tmp_path):
    """``compare --train-steps N --nproc 2``: the 2-worker run against one process, in the
    table and the JSON report."""
    model, data = _inputs(root)
    report = tmp_path / "report.json"
    done = xformer("compare", "--model", model, "--backends", "torch", "--train-steps", 2,
                   "--nproc", 2, "--dtype", "float64", "--batch-size", 4, "--data", data,
                   "--json", report)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "2 workers against one process" in done.stdout
    (dist,) = json.loads(report.read_text())["distributed"]
    (row,) = dist["rows"]
    assert (dist["nproc"], row["target"], row["engine"]) == (2, "torch/eager", ENGINES["torch"])
    assert 0 <= row["param_error"] <= BOUND and 0 <= row["loss_error"] <= BOUND
    assert len(row["losses"]) == 2


# ---------------------------------------------------------------------- faults
def _children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            kids = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        out += [int(k) for k in kids]
        todo += [int(k) for k in kids]
    return out


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def _is_worker(env: dict[str, str], rank: int) -> bool:
    if "RANK" in env:
        return env["RANK"] == str(rank)
    if "TF_CONFIG" in env:
        return json.loads(env["TF_CONFIG"])["task"]["index"] == rank
    return env.get("DMLC_ROLE") == "worker" and env.get("XFORMER_WORKER") == str(rank)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs /proc")
@pytest.mark.parametrize("backend", [installed(b) for b in BACKENDS])
def test_killed_worker_ends_the_run(backend, root, tmp_path):
    """SIGKILL worker 1 mid-run: the launcher exits non-zero within 60 s with one line naming
    the worker and the signal, no process of the run is left, and the earlier checkpoint in
    ``--out`` is intact."""
    model, data = _inputs(root)
    out = tmp_path / "ckpt"
    save_pretrained(out, SPEC, init_weights(SPEC, seed=3, dtype="float64"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "xformer", "train", "--model", str(model), "--data", str(data),
         "--backend", backend, "--nproc", "2", "--out", str(out), "--steps", "100000",
         "--batch-size", "4"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        victim, deadline = None, time.monotonic() + 120
        while victim is None and time.monotonic() < deadline:
            time.sleep(0.5)
            victim = next((p for p in _children(launcher.pid)
                           if _is_worker(_environ(p), 1)), None)
        assert victim is not None, "worker 1 never started"
        time.sleep(15)  # into the training loop (past the imports and the rendezvous)
        assert launcher.poll() is None, launcher.communicate()
        family = _children(launcher.pid)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        _, err = launcher.communicate(timeout=60)
        assert time.monotonic() - killed < 60
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode not in (0, None)
    last = err.strip().splitlines()[-1]
    assert last.startswith("xformer: error: worker 1 of 2 was killed by SIGKILL"), err[-2000:]
    assert "nothing was written" in last
    alive = [p for p in family if Path(f"/proc/{p}").exists()
             and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not alive, alive
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_terminated_launcher_stops_its_workers(root, tmp_path):
    """SIGTERM to ``xformer train --nproc 2`` (a scheduler's cancel): exit 130, no worker
    left, nothing written."""
    model, data = _inputs(root)
    out = tmp_path / "o"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "xformer", "train", "--model", str(model), "--data", str(data),
         "--backend", "torch", "--nproc", "2", "--out", str(out), "--steps", "100000",
         "--batch-size", "4"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(_children(launcher.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        family = _children(launcher.pid)
        assert len(family) >= 2
        time.sleep(3)
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 130
    assert not [p for p in family if Path(f"/proc/{p}").exists()
                and "zombie" not in Path(f"/proc/{p}/status").read_text()]
    assert not out.exists()


def test_failing_workers_stop_the_run(tmp_path):
    """A worker that raises (here: each one's spec file is missing when it starts) ends the
    run with that worker's own exit status and its last line, prefixed."""
    from xformer.distributed import launch

    spec = tmp_path / "spec.json"
    argv = ["train", "--spec", str(spec), "--data", str(tmp_path / "t.npy"), "--steps", "1",
            "--out", str(tmp_path / "o")]
    import io

    out, err = io.StringIO(), io.StringIO()
    start = time.monotonic()
    code = launch("torch", argv, 2, stdout=out, stderr=err)
    assert time.monotonic() - start < 60
    assert code == 2
    role, message = launch.failure
    assert role.startswith("worker ") and "exited with status 2" in message
    assert "spec.json" in message
    assert all(line.startswith("[worker ") for line in err.getvalue().splitlines())


# ---------------------------------------------------------------------- bad arguments
def _error(capsys, *argv) -> str:
    from xformer.cli import main

    code = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("xformer: error: "), err
    return err[0]


@pytest.mark.parametrize("nproc, words", [(0, ">= 1"), (-2, ">= 1"), (3, "does not split")])
def test_bad_nproc(capsys, root, tmp_path, nproc, words):
    model, data = _inputs(root)
    line = _error(capsys, "train", "--model", model, "--data", data, "--backend", "torch",
                  "--steps", 1, "--batch-size", 4, "--nproc", nproc, "--out", tmp_path / "o")
    assert "--nproc" in line and words in line
    assert not (tmp_path / "o").exists()


def test_port_in_use(capsys, root, tmp_path):
    model, data = _inputs(root)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        line = _error(capsys, "train", "--model", model, "--data", data, "--backend", "torch",
                      "--steps", 1, "--batch-size", 4, "--nproc", 2, "--port", port,
                      "--out", tmp_path / "o")
    assert f"--port {port} is already in use" in line
    line = _error(capsys, "train", "--model", model, "--data", data, "--backend", "torch",
                  "--steps", 1, "--port", 1234, "--out", tmp_path / "o")
    assert "--port only applies with --nproc" in line
