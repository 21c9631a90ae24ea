"""The three implementations of one node class, read from the installed backends' source.

The source is parsed with :mod:`ast` (no framework is imported), straight from the files of the
installed backend packages, so what is shown is what runs and never goes stale.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

from .errors import BackendError, InputError

#: Backend name -> the package holding its ``modules.py``.
PACKAGES = {"torch": "xformer_torch", "tensorflow": "xformer_tensorflow",
            "mxnet": "xformer_mxnet"}
#: Display names of the frameworks, in column order.
TITLES = {"torch": "PyTorch (torch.nn)", "tensorflow": "TensorFlow (Keras 3)",
          "mxnet": "MXNet (Gluon)"}


def modules_file(backend: str) -> Path:
    """The ``modules.py`` of an installed backend package (found without importing it).

    Raises:
        BackendError: unknown backend or package not found.
    """
    if backend not in PACKAGES:
        raise BackendError(f"unknown backend {backend!r}; backends: {', '.join(PACKAGES)}")
    spec = importlib.util.find_spec(PACKAGES[backend])
    if spec is None or not spec.submodule_search_locations:
        raise BackendError(f"backend package {PACKAGES[backend]} is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "modules.py"


def node_classes(backend: str = "torch") -> list[str]:
    """Public classes of a backend's ``modules.py``, in file order (the same in all three)."""
    tree = ast.parse(modules_file(backend).read_text())
    return [n.name for n in tree.body if isinstance(n, ast.ClassDef)
            and not n.name.startswith("_")]


def class_source(backend: str, name: str) -> tuple[str, int]:
    """``(source, first line number)`` of class ``name`` in a backend's ``modules.py``.

    Raises:
        InputError: no such class (lists the classes there).
    """
    path = modules_file(backend)
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = text.splitlines()[start - 1: node.end_lineno]
            return "\n".join(lines), start
    raise InputError(f"no node class {name!r} in {PACKAGES[backend]}; classes: "
                     f"{', '.join(node_classes(backend))}")


def sources(name: str, backends: tuple[str, ...] = tuple(PACKAGES)) -> dict[str, tuple[str, int]]:
    """``{backend: (source, first line)}`` of node class ``name`` for every backend whose
    package is installed."""
    out = {}
    for be in backends:
        try:
            out[be] = class_source(be, name)
        except BackendError:
            continue
    if not out:
        raise BackendError("no backend package is installed: pip install 'xformer[all]'")
    return out
