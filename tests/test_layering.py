"""The layering of the ``xformer`` package, read from its source with :mod:`ast` (nothing is
imported to check it): no import cycle among its modules, counting imports at module level and
inside functions; no framework import anywhere in it (frameworks are imported by the backend
packages and by the references that live with them); and, run in a fresh process, the registry
of references and the recorded environment import only the frameworks they are asked about."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import xformer

ROOT = Path(xformer.__file__).parent
FRAMEWORKS = ("torch", "tensorflow", "keras", "mxnet", "transformers", "jax")
#: Modules under xformer/ allowed to import a framework (lazily loaded reference adapters).
#: None today: the torch references are in backends/xformer_torch (reference_*.py).
FRAMEWORK_ADAPTERS: frozenset[str] = frozenset()


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ("xformer",) + path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, int]]:
    """Every module ``name`` imports, anywhere in its body: ``(dotted name, line)``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for a in node.names:
                sub = f"{module}.{a.name}"
                out.append((sub if sub in MODULES else module, node.lineno))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(
                node.func, "id", None)) in ("import_module", "__import__") and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.args[0].value, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {name: {m for m, _ in _imports(name, path) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_checker_sees_the_modules_and_a_cycle():
    assert {"xformer.spec", "xformer.weights", "xformer.convert", "xformer.conformance",
            "xformer.conformance.run"} <= set(MODULES)
    graph = _graph()
    assert "xformer.weights" in graph["xformer.convert"]
    assert "xformer.conformance.case" in graph["xformer.conformance.run"]
    assert "xformer.generation" in graph["xformer.backend"]  # imported inside a method
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_spec_weights_convert_layering():
    """spec -> weights (all safetensors I/O) -> convert (Hugging Face, from_pretrained)."""
    graph = _graph()
    assert "xformer.convert" not in graph["xformer.weights"]
    assert not graph["xformer.spec"] - {"xformer.errors", "xformer.resources"}
    assert not graph["xformer.resources"] - {"xformer.errors"}  # stdlib + errors only
    for name, path in MODULES.items():
        if name != "xformer.weights":
            assert not [m for m, _ in _imports(name, path) if m.startswith("safetensors")], (
                f"{name} reads or writes safetensors itself; use xformer.weights")


def test_no_framework_import_in_the_core():
    found = [f"{path.relative_to(ROOT.parent)}:{line}: {module}"
             for name, path in MODULES.items() if name not in FRAMEWORK_ADAPTERS
             for module, line in _imports(name, path)
             if module.split(".")[0] in FRAMEWORKS]
    assert not found, "framework imports under xformer/: " + "; ".join(found)


def _loaded_after(code: str) -> list[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint(' '.join(m for m in "
         f"{FRAMEWORKS!r} if m in sys.modules))"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_listing_references_imports_no_framework():
    assert _loaded_after(
        "import xformer, xformer.cli, xformer.report\n"
        "from xformer.conformance import available_references, get_reference, environment\n"
        "spec = xformer.ModelSpec.preset('gpt2-tiny')\n"
        "for name in available_references():\n"
        "    get_reference(name).expressible(spec)\n"
        "environment([], ['numpy', 'torch.nn', 'huggingface'])\n") == []


def test_environment_imports_only_the_backends_it_is_given():
    pytest.importorskip("torch")
    assert _loaded_after("from xformer.conformance import environment\n"
                         "env = environment(['torch'], 'huggingface')\n"
                         "assert 'torch' in env and 'transformers' in env, env\n") == ["torch"]
