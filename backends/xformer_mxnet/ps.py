"""``python -m xformer_mxnet.ps``: an MXNet parameter-server node, the scheduler or a server of a
``dist_sync`` data-parallel run (issue #12; :mod:`xformer.distributed` starts one of each next to
the workers, docs/distributed.md shows them started by hand).

The role and the rendezvous come from ps-lite's environment: ``DMLC_ROLE`` (``scheduler`` or
``server``), ``DMLC_PS_ROOT_URI``, ``DMLC_PS_ROOT_PORT``, ``DMLC_NUM_SERVER``,
``DMLC_NUM_WORKER`` (and ``DMLC_NODE_HOST``). MXNet runs the node inside ``import mxnet``
(``mxnet/kvstore/kvstore_server.py``, ``_init_kvstore_server_module``: a process that is not a
worker creates ``kvstore.create("dist")`` and blocks in ``MXKVStoreRunServer``), and calls
``sys.exit()`` when the workers have finalised (each worker's ``KVStoreDist`` destructor:
barrier, rank 0 stops the servers, ``ps::Finalize``): this module imports ``mxnet``, after
the ``np.bool`` alias MXNet 1.9.1 still uses (:mod:`xformer_mxnet`), and exits 0 once the
workers it was started next to have exited (:func:`_outlive_local_workers`: xformer's workers
finalise after their last step, before rank 0 writes the checkpoint).

A server first re-executes itself with :data:`SERVER_TUNABLES` in ``GLIBC_TUNABLES``: MXNet
1.9.1's ``KVStoreDistServer`` constructor never initialises its ``multi_precision_`` flag
(``src/kvstore/kvstore_dist_server.h``; in the wheel's ``libmxnet.so`` the constructor writes
``sync_mode_`` and ``log_verbose_`` but not the byte ``DataHandleDefault`` tests, measured
non-zero here), so the server reads heap garbage as "multi-precision" and keeps a float32 master
copy of every key pushed in another dtype: float64 gradients are summed, and float64 weights
broadcast, through float32 (2.4e-7 relative). glibc's ``perturb`` tunable fills every block
``malloc`` returns with ``perturb ^ 0xff`` (0 here) and ``tcache_count=0`` routes every
allocation through that path, so the flag reads ``false`` as MXNet intends, and float64 keys
are stored and summed in float64. The workers check this on every float64 run
(:meth:`xformer_mxnet.backend.MXNetBackend._make_trainer`).
"""

from __future__ import annotations

import os
import sys

#: glibc tunables a server runs with: zero-filled heap blocks (see the module docstring).
SERVER_TUNABLES = "glibc.malloc.tcache_count=0:glibc.malloc.perturb=255"
ROLES = ("scheduler", "server")


def _server_environment(environ: dict[str, str]) -> dict[str, str] | None:
    """The environment to re-execute a server with, or ``None`` when it has it already."""
    have = environ.get("GLIBC_TUNABLES", "")
    if SERVER_TUNABLES in have:
        return None
    return {**environ, "GLIBC_TUNABLES": f"{have}:{SERVER_TUNABLES}" if have
            else SERVER_TUNABLES}


def main() -> int:
    """Run this process's node (``DMLC_ROLE``) until the workers finish; 0 then, 2 when the
    environment names no scheduler or server role (nothing started)."""
    role = os.environ.get("DMLC_ROLE")
    if role not in ROLES:
        print(f"xformer: error: python -m xformer_mxnet.ps runs an MXNet scheduler or server, "
              f"but DMLC_ROLE is {role!r}; set DMLC_ROLE=scheduler or DMLC_ROLE=server (and "
              f"DMLC_PS_ROOT_URI, DMLC_PS_ROOT_PORT, DMLC_NUM_SERVER, DMLC_NUM_WORKER); "
              f"workers run `xformer train` with DMLC_ROLE=worker", file=sys.stderr)
        return 2
    if role == "server":
        env = _server_environment(dict(os.environ))
        if env is not None:  # same pid: the launcher's process (and its session) stays it
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, "-m", "xformer_mxnet.ps"], env)
    import xformer_mxnet  # noqa: F401  (restores np.bool before mxnet needs it)
    import mxnet  # noqa: F401  (runs the node, then sys.exit())
    return 0  # not reached for a scheduler or server: kvstore_server.py exits first


if __name__ == "__main__":
    sys.exit(main())
