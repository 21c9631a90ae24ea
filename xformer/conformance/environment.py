"""The facts of the machine and frameworks a run used, recorded by the process that ran it
(``xformer compare --json`` stores them; the HTML report renders only what the document holds).
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Iterable

from ..backend import get_backend
from ..errors import BackendError
from .run import Target

#: Environment variables that set the frameworks' thread pools, recorded when set.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TF_NUM_INTRAOP_THREADS",
                    "TF_NUM_INTEROP_THREADS", "MXNET_CPU_WORKER_NTHREADS")


def environment(backends: Iterable[str | Target] = (),
                references: str | Iterable[str | None] | None = ()) -> dict[str, str]:
    """Python, platform, CPU and thread settings, plus each backend's
    :meth:`~xformer.backend.Backend.environment` (framework version and threads) for the
    ``backends`` a run used (names or :class:`Target` s), and the installed versions of what
    the ``references`` it used need (names; ``None`` is skipped).

    Only those backends are asked: a command that ran on torch alone imports neither TensorFlow
    nor MXNet for this. Call it after the run, from the process that ran it (thread settings
    are the framework's own, as it ran).
    """
    if references is None or isinstance(references, str):
        references = [references]
    env = {"python": platform.python_version(), "platform": platform.platform(),
           "processor": platform.processor() or platform.machine()}
    cpu = _cpu_model()
    if cpu:
        env["cpu"] = cpu
    env["cpu_count"] = str(os.cpu_count())
    if hasattr(os, "sched_getaffinity"):
        env["usable cpus"] = str(len(os.sched_getaffinity(0)))
    env.update({var: os.environ[var] for var in THREAD_VARIABLES if os.environ.get(var)})
    for name in dict.fromkeys(getattr(b, "backend", b) for b in backends):
        env.update(_backend_facts(name))
    for name in dict.fromkeys(r for r in references if r):
        env.update(_reference_facts(name))
    return env


def _backend_facts(name: str) -> dict[str, str]:
    try:
        be = get_backend(name)
    except BackendError as e:
        return {name: f"unavailable ({e})"}
    try:
        return {k: str(v) for k, v in be.environment().items()}
    except (AttributeError, NotImplementedError):  # a backend without environment()
        return {be.name: be.framework_version()}


def _reference_facts(name: str) -> dict[str, str]:
    from .references import get_reference

    try:
        requires = get_reference(name).requires
    except BackendError:
        return {}
    out = {}
    for dist in requires:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
