"""Fixtures of the backend tests: ``backend``, session-scoped and parametrized over the backends
whose framework is installed (every registered one: ``torch``, ``tensorflow``, ``mxnet``; test
ids are the names). A
framework is imported the first time a test asks for its backend, once per process. The shared
helpers (specs, inputs, error measures, cached models) are in backend_helpers.py.
"""

from __future__ import annotations

import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before anything imports TensorFlow

import pytest  # noqa: E402

from xformer.backend import available_backends, get_backend, is_installed  # noqa: E402

#: Every registered backend (built-in and entry points): a new backend's package is tested by
#: every ``backend`` test (the contract, the behaviours) without an edit here.
BACKENDS = tuple(available_backends())


@pytest.fixture(scope="session", params=BACKENDS)
def backend(request):
    """Each installed backend in turn (ids: the names); uninstalled ones are skipped."""
    name = request.param
    if not is_installed(name):
        pytest.skip(f"{name} is not installed: pip install 'xformer[{name}]'")
    if name == "tensorflow":  # per-model tf.functions trip the retracing warning
        logging.getLogger("tensorflow").setLevel(logging.ERROR)  # = tf.get_logger()
    return get_backend(name)
