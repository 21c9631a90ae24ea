"""MXNet's parameter-server data parallelism (issue #12), beyond tests/test_distributed.py: the
scheduler, the server and both workers of a run end with status 0 on their own; the float64
guard (a server that keeps float32 copies of float64 keys is refused, one line); a worker that
fails mid-run leaves without MXNet's exit barrier, so the launcher sees its own status; and
``python -m xformer_mxnet.ps``'s own checks.

Every run is real processes (:func:`xformer.distributed.launch`, ``gpt2-tiny`` in float64);
faults are injected into the workers only, by a ``sitecustomize`` module on their
``PYTHONPATH``."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer import distributed  # noqa: E402
from xformer_mxnet.ps import SERVER_TUNABLES, _server_environment  # noqa: E402

#: Worker-side faults, chosen by XFORMER_TEST_FAULT (the scheduler and server run untouched).
SITECUSTOMIZE = textwrap.dedent('''
    import os

    fault = os.environ.get("XFORMER_TEST_FAULT")
    if os.environ.get("DMLC_ROLE") == "worker" and fault:
        from xformer_mxnet import backend

        if fault == "multi-precision":  # what MXNet 1.9.1's uninitialised flag may amount to
            joined = backend.MXNetBackend._init_distributed

            def _init_distributed(self):
                world = joined(self)
                self._kv._send_command_to_servers(1, "")  # kSetMultiPrecision
                return world

            backend.MXNetBackend._init_distributed = _init_distributed
        elif fault == "fail" and os.environ.get("XFORMER_WORKER") == "1":
            stepped = backend.MXNetBackend._train_step

            def _train_step(self, *args, **kwargs):
                if args[5] == 2:  # step
                    raise RuntimeError("injected failure at step 2")
                return stepped(self, *args, **kwargs)

            backend.MXNetBackend._train_step = _train_step
''')


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("distributed_mxnet") / "tokens.npy"
    np.save(path, np.random.default_rng(0).integers(0, 100, (16, 12)))
    return path


def _launch(data, out, monkeypatch, fault=None, tmp_path=None, steps=3):
    """``xformer train`` on 2 MXNet workers (gpt2-tiny, float64): ``(status, stderr,
    {role: status when the launcher stopped the run})``."""
    if fault is not None:
        (tmp_path / "sitecustomize.py").write_text(SITECUSTOMIZE)
        path = os.environ.get("PYTHONPATH")
        monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{path}" if path else
                           str(tmp_path))
        monkeypatch.setenv("XFORMER_TEST_FAULT", fault)
    seen = {}
    stop = distributed._stop

    def spy(procs, grace=distributed.GRACE):
        seen.update({p.role: p.popen.poll() for p in procs})
        return stop(procs, grace)

    monkeypatch.setattr(distributed, "_stop", spy)
    err = io.StringIO()
    argv = ["train", "--spec", "gpt2-tiny", "--data", str(data), "--backend", "mxnet",
            "--steps", str(steps), "--dtype", "float64", "--batch-size", "4",
            "--out", str(out), "--json"]
    code = distributed.launch("mxnet", argv, 2, stdout=io.StringIO(), stderr=err)
    return code, err.getvalue(), seen


def test_every_process_ends_with_status_0(data, tmp_path, monkeypatch):
    """The workers finalise ps-lite after their last step, the scheduler and the server then
    end on their own (after the workers: the launcher would take them for a failure) with 0,
    before the launcher's grace period; float64 passed the server check on the way."""
    start = time.monotonic()
    code, err, seen = _launch(data, tmp_path / "out", monkeypatch)
    assert code == 0, err[-2000:]
    assert seen == {"scheduler": 0, "server": 0, "worker 0": 0, "worker 1": 0}, err[-2000:]
    assert time.monotonic() - start < 60
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_server_that_keeps_float32_copies_is_refused(data, tmp_path, monkeypatch):
    """A server in MXNet's multi-precision mode stores float64 keys as float32: a float64 run
    stops before the first step with one line that names it and the fix."""
    code, err, _ = _launch(data, tmp_path / "out", monkeypatch, fault="multi-precision",
                           tmp_path=tmp_path)
    assert code == 2, err[-2000:]
    role, message = distributed.launch.failure
    assert role.startswith("worker ") and "exited with status 2" in message
    assert "rounds float64 to float32" in message and "xformer_mxnet.ps" in message
    assert not (tmp_path / "out").exists()


def test_a_failing_worker_ends_the_run_with_its_status(data, tmp_path, monkeypatch):
    """Worker 1 raises at step 2 while worker 0 waits on the server for its gradients: worker 1
    leaves without MXNet's exit barrier (it would hang there), and the launcher reports its
    own status (3, internal error) and stops the rest."""
    start = time.monotonic()
    code, err, seen = _launch(data, tmp_path / "out", monkeypatch, fault="fail",
                              tmp_path=tmp_path, steps=5)
    assert time.monotonic() - start < 60
    assert code == 3, err[-2000:]
    role, message = distributed.launch.failure
    assert role == "worker 1" and "exited with status 3" in message
    assert "injected failure at step 2" in message
    assert seen["worker 1"] == 3
    assert not (tmp_path / "out").exists()


def test_ps_runs_only_a_scheduler_or_a_server():
    env = {**os.environ, "DMLC_ROLE": "worker"}
    done = subprocess.run([sys.executable, "-m", "xformer_mxnet.ps"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("xformer: error: ")
    assert "DMLC_ROLE=scheduler" in lines[0] and "'worker'" in lines[0]


def test_server_environment():
    """A server re-executes itself once with the tunables, keeping any others."""
    assert _server_environment({"A": "1"}) == {"A": "1", "GLIBC_TUNABLES": SERVER_TUNABLES}
    assert _server_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2"})["GLIBC_TUNABLES"] == \
        f"glibc.rtld.nns=2:{SERVER_TUNABLES}"
    assert _server_environment({"GLIBC_TUNABLES": SERVER_TUNABLES}) is None
