"""Data-parallel training on each framework's own distributed engine (issue #12).

xformer has no process group, all-reduce or parameter server of its own. A data-parallel run is
``xformer train`` started once per worker with the environment of the framework's launcher, and
the backend (:meth:`xformer.backend.Backend.init_distributed`) hands the gradients to that
framework's engine:

========== ================================================ ===================================
backend    engine                                           the worker's environment
========== ================================================ ===================================
torch      ``torch.distributed`` + ``DistributedDataParallel`` ``MASTER_ADDR``, ``MASTER_PORT``,
           (gloo on CPU), averaged gradients                ``RANK``, ``WORLD_SIZE`` (torchrun's)
tensorflow ``tf.distribute.MultiWorkerMirroredStrategy``,   ``TF_CONFIG`` (cluster + task)
           summed gradients (collective all-reduce)
mxnet      kvstore ``dist_sync`` (parameter server) with a  ``DMLC_ROLE=worker``,
           Gluon ``Trainer``, summed gradients              ``DMLC_PS_ROOT_URI`` / ``_PORT``,
                                                            ``DMLC_NUM_WORKER``, ``DMLC_NUM_SERVER``
========== ================================================ ===================================

``xformer train --nproc N`` on one machine is :func:`launch`: it starts the ``N`` workers (and,
for MXNet, the scheduler and one server) on ``127.0.0.1`` with those variables, prefixes every
line a worker writes with ``[worker r]``, passes rank 0's standard output through (the
``--json`` document), and stops the whole run as soon as one process fails. On several
machines the framework's own launcher starts the same command (docs/distributed.md).

What makes ``N`` workers compute what one process computes (:func:`shard`): every worker reads
the whole data and builds the same global micro-batches; worker ``r`` keeps rows ``[r b/N,
(r+1) b/N)`` of each (and the same rows of the dropout stream's masks, drawn for the global
batch); its loss is its mean scaled by ``share = (its scored labels) / (the micro-batch's)``,
so that summing over workers gives the global mean (torch's DDP averages: its workers scale by
``share * N``, exactly 1 for an even split). Clipping and the optimizer then see the reduced,
identical gradient on every worker, and the weights stay identical without a broadcast.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .errors import InputError

#: The engine of each backend, as reports name it.
ENGINES = {
    "torch": "torch.distributed DistributedDataParallel (gloo)",
    "tensorflow": "tf.distribute.MultiWorkerMirroredStrategy",
    "mxnet": "mxnet kvstore dist_sync (parameter server)",
}
#: The engine in a few words, for tables.
SHORT_ENGINES = {"torch": "DDP (gloo)", "tensorflow": "MultiWorkerMirrored",
                 "mxnet": "kvstore dist_sync"}
#: Seconds a stopped process gets between SIGTERM and SIGKILL.
GRACE = 5.0


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel run: ``rank`` in ``[0, size)`` and the
    ``engine`` (:data:`ENGINES`) that reduces the gradients."""

    engine: str
    rank: int
    size: int


def requested(backend: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment asks this process to be a worker of ``backend``'s engine (the
    variables its launcher sets, module docstring), with more than one worker."""
    env = os.environ if environ is None else environ
    if backend == "torch":
        return int(env.get("WORLD_SIZE", "1") or 1) > 1
    if backend == "tensorflow":
        if not env.get("TF_CONFIG"):
            return False
        try:
            cluster = json.loads(env["TF_CONFIG"]).get("cluster", {})
        except (ValueError, AttributeError):
            raise InputError("TF_CONFIG is not valid JSON; give {\"cluster\": {\"worker\": "
                             "[\"host:port\", ...]}, \"task\": {\"type\": \"worker\", "
                             "\"index\": i}}") from None
        return len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1
    if backend == "mxnet":
        return env.get("DMLC_ROLE") == "worker"
    return False


def check_nproc(nproc: Any, batch_size: int) -> int:
    """``nproc`` as an int that splits ``batch_size`` rows evenly.

    Raises:
        InputError: not an integer, below 1, or not a divisor of ``batch_size``.
    """
    if isinstance(nproc, bool) or not isinstance(nproc, (int, np.integer)) or nproc < 1:
        raise InputError(f"--nproc must be an integer >= 1, got {nproc!r}")
    if batch_size % nproc:
        raise InputError(f"--nproc {nproc} does not split --batch-size {batch_size} evenly; "
                         f"give a batch size that is a multiple of {nproc} (each worker takes "
                         f"batch_size / nproc rows of every micro-batch)")
    return int(nproc)


def shard(world: World, micro: Sequence[Mapping[str, np.ndarray]],
          masks: Sequence[Mapping[str, np.ndarray]] | None
          ) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]] | None, list[float]]:
    """This worker's part of each global micro-batch: ``(micro, masks, shares)``.

    ``micro[i]`` (every array batch-first, ``labels`` included) and ``masks[i]`` (the dropout
    stream, drawn for the global batch) keep rows ``[rank b/N, (rank+1) b/N)``;
    ``shares[i]`` is this worker's scored labels (``!= -100``) over the micro-batch's.

    Raises:
        InputError: a micro-batch whose rows do not split evenly over the workers.
    """
    n, r = world.size, world.rank
    out, out_masks, shares = [], [] if masks is not None else None, []
    for i, batch in enumerate(micro):
        b = len(batch["labels"])
        if b % n:
            raise InputError(f"a micro-batch of {b} rows does not split over {n} workers; give "
                             f"a batch size that is a multiple of {n}")
        rows = slice(r * b // n, (r + 1) * b // n)
        local = {k: v[rows] for k, v in batch.items()}
        scored = int(np.count_nonzero(batch["labels"] != -100))
        shares.append(int(np.count_nonzero(local["labels"] != -100)) / scored)
        out.append(local)
        if masks is not None:
            out_masks.append({k: v[rows] for k, v in masks[i].items()})
    return out, out_masks, shares


# ---------------------------------------------------------------------- the local launcher
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_port(port: Any, host: str = "127.0.0.1") -> int:
    """``port`` if it is a valid TCP port that nothing listens on.

    Raises:
        InputError: out of ``[1, 65535]`` or already in use.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InputError(f"--port must be a TCP port in [1, 65535], got {port!r}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            raise InputError(f"--port {port} is already in use on {host}; give another port, "
                             f"or leave --port out for a free one") from None
    return port


@dataclass
class Process:
    """One launched process: its ``role`` (``"worker 0"``, ``"server"``...) and ``Popen``."""

    role: str
    popen: subprocess.Popen
    last_line: str = ""


def process_envs(backend: str, nproc: int, port: int | None = None,
                 threads: int | None = None) -> list[tuple[str, dict[str, str], list[str] | None]]:
    """``[(role, extra environment, argv or None)]`` of a local run: ``None`` argv = the
    ``xformer`` command itself (a worker); MXNet adds its scheduler and one server
    (``python -m xformer_mxnet.ps``). ``port``: the first port (rendezvous, TF's worker 0,
    MXNet's scheduler); the others are free ports. ``threads``: each process's
    ``OMP_NUM_THREADS`` (default: the cores over ``nproc``, as torchrun does)."""
    port = port or free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // nproc)
    common = {"OMP_NUM_THREADS": str(threads)}
    out: list[tuple[str, dict[str, str], list[str] | None]] = []
    if backend == "torch":
        for r in range(nproc):
            out.append((f"worker {r}", {**common, "XFORMER_WORKER": str(r),
                                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                        "RANK": str(r),
                                        "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                                        "LOCAL_WORLD_SIZE": str(nproc)}, None))
    elif backend == "tensorflow":
        ports = [port] + [free_port() for _ in range(nproc - 1)]
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        for r in range(nproc):
            cfg = {"cluster": cluster, "task": {"type": "worker", "index": r}}
            out.append((f"worker {r}", {**common, "XFORMER_WORKER": str(r),
                                        "TF_CONFIG": json.dumps(cfg)}, None))
    elif backend == "mxnet":
        ps = {"DMLC_PS_ROOT_URI": "127.0.0.1", "DMLC_PS_ROOT_PORT": str(port),
              "DMLC_NODE_HOST": "127.0.0.1", "DMLC_NUM_SERVER": "1",
              "DMLC_NUM_WORKER": str(nproc)}
        server = [sys.executable, "-m", "xformer_mxnet.ps"]
        out.append(("scheduler", {**common, **ps, "DMLC_ROLE": "scheduler"}, server))
        out.append(("server", {**common, **ps, "DMLC_ROLE": "server"}, server))
        for r in range(nproc):
            out.append((f"worker {r}", {**common, **ps, "XFORMER_WORKER": str(r),
                                        "DMLC_ROLE": "worker"}, None))
    else:
        raise InputError(f"backend {backend!r} has no data-parallel engine; use torch, "
                         f"tensorflow or mxnet")
    return out


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _stop(procs: Sequence[Process], grace: float = GRACE) -> None:
    """SIGTERM every live process (its session: children too), SIGKILL what is left after
    ``grace`` seconds, and reap them all."""
    live = [p for p in procs if p.popen.poll() is None]
    for p in live:
        try:
            os.killpg(p.popen.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + grace
    for p in live:
        try:
            p.popen.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        if p.popen.poll() is None:
            try:
                os.killpg(p.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        p.popen.wait()


def _pump(stream, sink, prefix: str, proc: Process) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if not line.strip():
            continue
        proc.last_line = line.strip()
        sink.write(f"{prefix}{line}\n" if prefix else f"{line}\n")
        sink.flush()
    stream.close()


def launch(backend: str, argv: Sequence[str], nproc: int, port: int | None = None,
           stdout=None, stderr=None, poll: float = 0.05) -> int:
    """Run ``xformer <argv>`` as ``nproc`` data-parallel workers of ``backend``'s engine on
    this machine, and wait for them.

    Args:
        argv: the worker's command line (``train ...`` without ``--nproc`` / ``--port``).
        port: the rendezvous port (:func:`check_port`'d by the caller), else a free one.
        stdout, stderr: where rank 0's standard output and every prefixed line go (default
            ``sys.stdout`` / ``sys.stderr``).
    Returns:
        0 when every worker succeeded. Otherwise, as soon as one process fails, every other is
        stopped (SIGTERM, SIGKILL after :data:`GRACE` s) and the failed worker's own status is
        returned when it is an xformer exit status (2 bad input, 3 internal error), else 1;
        ``(role, message)`` of the failure is in ``launch.failure``.
    """
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    procs: list[Process] = []
    threads: list[threading.Thread] = []
    worker_cmd = [sys.executable, "-m", "xformer", *argv]
    launch.failure = None
    previous = None
    if threading.current_thread() is threading.main_thread():
        # a SIGTERM to the launcher stops its workers too (they run in their own sessions)
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        for role, extra, cmd in process_envs(backend, nproc, port):
            env = {**os.environ, **extra, "PYTHONUNBUFFERED": "1"}
            popen = subprocess.Popen(cmd or worker_cmd, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
            proc = Process(role, popen)
            procs.append(proc)
            rank0 = role == "worker 0"
            for stream, sink, prefix in ((popen.stdout, stdout if rank0 else stderr,
                                          "" if rank0 else f"[{role}] "),
                                         (popen.stderr, stderr, f"[{role}] ")):
                t = threading.Thread(target=_pump, args=(stream, sink, prefix, proc),
                                     daemon=True)
                t.start()
                threads.append(t)
        workers = [p for p in procs if p.role.startswith("worker")]
        while True:
            # a scheduler or server exits 0 once every worker has left the kvstore (ps-lite's
            # finalisation), which may be before rank 0 has written the checkpoint: only a
            # non-zero status is a failure
            failed = next((p for p in procs if p.popen.poll() not in (None, 0)), None)
            if failed is not None:
                _stop(procs)
                for t in threads:
                    t.join(1.0)
                code = failed.popen.returncode
                why = _describe_exit(code)
                detail = f" ({failed.last_line})" if failed.last_line else ""
                launch.failure = (failed.role, f"{failed.role} of {nproc} {why}{detail}")
                return code if code in (2, 3) else 1
            if all(w.popen.poll() == 0 for w in workers):
                break
            time.sleep(poll)
        # the workers are done: MXNet's scheduler and server end when their workers
        # finalise; they get the grace period before they are stopped
        deadline = time.monotonic() + GRACE
        while any(p.popen.poll() is None for p in procs) and time.monotonic() < deadline:
            time.sleep(poll)
        _stop(procs)
        for t in threads:
            t.join(5.0)
        return 0
    except BaseException:
        _stop(procs, grace=1.0)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _terminated(signum, frame):
    raise KeyboardInterrupt  # the CLI's interrupted path: exit 130, workers stopped


launch.failure = None
