"""``xformer check`` (:func:`check`, also ``xformer.check``): does *your* module compute what the spec says, and where does it start to
differ? (issue #13)

The user gives a native module built by their own code (``IMPL`` = ``BACKEND:MODULE:FACTORY``:
a backend name, an importable module or a ``.py`` path, and a callable ``factory(spec, dtype)
-> module``) and a mapping file (YAML, :class:`CheckMap`) from xformer's canonical names to
theirs. :func:`check` loads the canonical weights into the module, runs it on a conformance
:class:`~xformer.conformance.Case` (its inputs under the module's own keyword names, dropout
off), takes the gradient of ``sum(output * cotangent)`` with respect to every mapped parameter
(brought back to canonical names and layout), and compares

* the output with xformer's own lowering on the same backend and with the numpy reference;
* every mapped parameter's gradient with the lowering's;
* with ``nodes``, every mapped node's output and the gradient flowing into it with the
  lowering's trace (:meth:`xformer.backend.Backend.trace`), in spec order, forward then
  backward: ``first_divergence`` is the first mapped node past tolerance, as in
  ``xformer diff``.

Tolerances are ``compare``'s (:data:`xformer.conformance.TOLERANCES`). The framework-specific
part (reading the module's parameters, loading them, one forward/backward pass with node hooks)
is three :class:`~xformer.backend.Backend` hooks: ``_foreign_parameters``, ``_foreign_load``,
``_foreign_run``.

Every bad input raises :class:`~xformer.errors.InputError` with one line (the CLI's exit 2): an
``IMPL`` that does not parse, a module that does not import, a missing or failing factory, a
mapping file that is not YAML or has unknown keys, a canonical name, node or input the spec does
not have, a native name the module does not have, a mis-shaped parameter, a native parameter
that nothing maps to.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .errors import InputError, XformerError, first_line, truncate

#: Keys a mapping file may have.
MAP_KEYS = ("inputs", "output", "params", "transpose", "nodes")


# ---------------------------------------------------------------------- IMPL
@dataclass(frozen=True)
class Impl:
    """A parsed ``BACKEND:MODULE:FACTORY``."""

    backend: str
    module: str
    factory: str

    @property
    def text(self) -> str:
        return f"{self.backend}:{self.module}:{self.factory}"


def parse_impl(text: str) -> Impl:
    """``BACKEND:MODULE:FACTORY`` (``MODULE`` an importable dotted name or a path to a ``.py``
    file; the last two colons split, so a Windows-style path keeps its drive colon).

    Raises:
        InputError: not three non-empty parts, or an unknown backend name.
    """
    from .backend import available_backends

    head, sep, factory = str(text).rpartition(":")
    backend, sep2, module = head.partition(":")
    if not (sep and sep2 and backend and module and factory):
        raise InputError(f"IMPL {truncate(text)} must be BACKEND:MODULE:FACTORY, e.g. "
                         f"torch:my_bert.py:build (a backend, an importable module or a .py "
                         f"file, and a callable factory(spec, dtype))")
    if backend not in available_backends():
        raise InputError(f"IMPL {truncate(text)}: unknown backend {backend!r}; backends: "
                         f"{', '.join(available_backends())}")
    if not factory.isidentifier():
        raise InputError(f"IMPL {truncate(text)}: factory {factory!r} is not a Python name")
    return Impl(backend, module, factory)


def load_factory(impl: Impl) -> Callable[..., Any]:
    """The factory callable of ``impl``, its module imported (a ``.py`` path by file location,
    its folder on ``sys.path`` meanwhile so that sibling imports work).

    Raises:
        InputError: the file is missing, the module does not import (its error's first line),
            no such attribute, or not callable.
    """
    name = impl.module
    try:
        if name.endswith(".py") or os.sep in name or "/" in name:
            path = Path(name)
            if not path.is_file():
                raise InputError(f"IMPL {impl.text}: module file {truncate(name, 200)} does not "
                                 f"exist; give a .py file or an importable module name")
            mod_name = f"xformer_check_{path.stem}_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(mod_name, path)
            if spec is None or spec.loader is None:
                raise InputError(f"IMPL {impl.text}: {truncate(name, 200)} is not a Python file")
            module = importlib.util.module_from_spec(spec)
            folder = str(path.resolve().parent)
            sys.path.insert(0, folder)
            try:
                sys.modules[mod_name] = module
                spec.loader.exec_module(module)
            finally:
                if sys.path and sys.path[0] == folder:
                    sys.path.pop(0)
        else:
            module = importlib.import_module(name)
    except InputError:
        raise
    except SyntaxError as e:
        raise InputError(f"IMPL {impl.text}: {truncate(name, 200)} has a syntax error "
                         f"(line {e.lineno}: {e.msg}); fix it") from None
    except Exception as e:  # the user's module failed to import: their error, one line
        raise InputError(f"IMPL {impl.text}: importing {truncate(name, 200)} failed "
                         f"({type(e).__name__}: {_first_line(e)})") from None
    factory = getattr(module, impl.factory, None)
    if factory is None:
        raise InputError(f"IMPL {impl.text}: {truncate(name, 200)} has no {impl.factory!r}; "
                         f"define factory(spec, dtype) returning the module")
    if not callable(factory):
        raise InputError(f"IMPL {impl.text}: {impl.factory!r} is not callable")
    return factory


def _first_line(e: BaseException) -> str:
    return truncate(first_line(e), 200)


# ---------------------------------------------------------------------- the mapping file
@dataclass(frozen=True)
class CheckMap:
    """A mapping file (YAML), checked against a spec.

    Attributes:
        inputs: ``{xformer input: the module's call keyword}`` (``input_ids``,
            ``attention_mask``, ``token_type_ids``, ...); default: the same names, for the
            inputs the spec takes.
        output: key, attribute or index of the ``(B, T, D)`` output; ``None``: the call's
            return value itself.
        params: ``{canonical parameter name: native name}`` (torch ``state_dict`` keys, Keras
            variable ``.path``, Gluon structural names).
        transpose: canonical names to transpose beyond the backend's default (Keras ``Dense``
            kernels are ``(in, out)`` and transposed by default; torch and Gluon are not).
        nodes: ``{canonical node: native sub-module path}`` for localisation.
        path: where it was read from (messages).
    """

    inputs: dict[str, str]
    output: str | int | None
    params: dict[str, str]
    transpose: tuple[str, ...]
    nodes: dict[str, str]
    path: str = ""


def load_map(path: Any, spec: Any) -> CheckMap:
    """Read and check mapping file ``path`` against ``spec``.

    Raises:
        InputError: unreadable or not YAML, not a mapping, an unknown key, a value of the wrong
            type, an xformer input the spec does not take, a canonical parameter or node the
            spec does not have, a native name mapped twice.
    """
    import yaml

    from .resources import read_capped

    shown = truncate(str(path), 200)
    if not os.path.exists(path):
        raise InputError(f"--map {shown} does not exist; give the mapping file (YAML)")
    text = read_capped(Path(path), what="mapping file").decode("utf-8", "replace")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InputError(f"--map {shown} is not valid YAML ({_first_line(e)})") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict):
        raise InputError(f"--map {shown} must be a YAML mapping with keys "
                         f"{', '.join(MAP_KEYS)}; got {type(doc).__name__}")
    unknown = [k for k in doc if k not in MAP_KEYS]
    if unknown:
        raise InputError(f"--map {shown}: unknown key {unknown[0]!r}; keys: "
                         f"{', '.join(MAP_KEYS)}")

    def str_dict(key: str) -> dict[str, str]:
        value = doc.get(key) or {}
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
            raise InputError(f"--map {shown}: {key} must map names to names (strings)")
        return dict(value)

    inputs, params, nodes = str_dict("inputs"), str_dict("params"), str_dict("nodes")
    takes = _spec_inputs(spec)
    for k in inputs:
        if k not in takes:
            raise InputError(f"--map {shown}: inputs has {k!r}, which this spec does not take; "
                             f"inputs: {', '.join(takes)}")
    inputs = {k: inputs.get(k, k) for k in takes}
    canonical = {p.name for p in spec.parameters()}
    for k in params:
        if k not in canonical:
            raise InputError(f"--map {shown}: params has {k!r}, not a parameter of this spec "
                             f"(e.g. {next(iter(sorted(canonical)))}); `xformer check "
                             f"--show-map` lists them")
    twice = _duplicate(params.values())
    if twice:
        raise InputError(f"--map {shown}: native parameter {twice!r} is mapped twice")
    known_nodes = dict(spec.nodes())
    for k in nodes:
        if k not in known_nodes:
            raise InputError(f"--map {shown}: nodes has {k!r}, not a node of this spec; nodes: "
                             f"{', '.join(list(known_nodes)[:8])}, ...")
    transpose = doc.get("transpose") or []
    if not isinstance(transpose, list) or not all(isinstance(t, str) for t in transpose):
        raise InputError(f"--map {shown}: transpose must be a list of canonical names")
    for t in transpose:
        if t not in canonical:
            raise InputError(f"--map {shown}: transpose has {t!r}, not a parameter of this "
                             f"spec")
    output = doc.get("output")
    if output is not None and (isinstance(output, bool) or not isinstance(output, (str, int))):
        raise InputError(f"--map {shown}: output must be null, a key or attribute name, or an "
                         f"index; got {truncate(output)}")
    return CheckMap(inputs, output, params, tuple(transpose), nodes, str(path))


def _duplicate(values) -> str | None:
    seen: set[str] = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def _spec_inputs(spec: Any) -> list[str]:
    names = ["input_ids", "attention_mask"]
    if spec.type_vocab_size:
        names.append("token_type_ids")
    if spec.architecture == "encoder-decoder":
        names += ["decoder_input_ids", "decoder_attention_mask"]
    return names


def select_output(out: Any, selector: str | int | None) -> Any:
    """The ``(B, T, D)`` tensor of a module's return value: ``out`` itself (``None``),
    ``out[i]`` (an int), ``out[key]`` for a mapping (or an object with that key), else
    ``getattr(out, key)``.

    Raises:
        InputError: no such index, key or attribute.
    """
    if selector is None:
        return out
    try:
        if isinstance(selector, int):
            return out[selector]
        if isinstance(out, Mapping) or (hasattr(out, "keys") and hasattr(out, "__getitem__")):
            if selector in out.keys():
                return out[selector]
        return getattr(out, selector)
    except (IndexError, KeyError, AttributeError, TypeError):
        raise InputError(f"the module's output ({type(out).__name__}) has no {selector!r}; "
                         f"set output in the mapping file to the key, attribute or index of "
                         f"the (B, T, D) tensor, or null for the return value itself") from None


# ---------------------------------------------------------------------- the resolved mapping
@dataclass(frozen=True)
class Binding:
    """One canonical parameter bound to a native one: ``transposed`` when the native layout is
    the canonical one transposed; ``auto`` when matched automatically."""

    canonical: str
    native: str
    transposed: bool
    auto: bool = False


def bind(spec: Any, cmap: CheckMap, native: Mapping[str, tuple[tuple[int, ...], bool]],
         impl: str = "") -> list[Binding]:
    """Every canonical parameter of ``spec`` bound to a native parameter of ``native``
    (``{native name: (shape, transposed by default)}``, a backend's ``_foreign_parameters``).

    The mapping file's ``params`` first; then each remaining canonical parameter is matched
    automatically when exactly one unmapped native parameter has the same name, or else
    exactly one has its shape (in the native layout) and no other unmapped canonical parameter
    has that shape: unambiguous, never a guess.

    Raises:
        InputError: a mapped native name the module does not have, a shape that does not match
            (in either layout, the transposition named), or a native parameter that nothing
            maps to (a weight the check would not control).
    """
    canon = {p.name: tuple(p.shape) for p in spec.parameters()}
    flip = set(cmap.transpose)
    where = f"{impl}: " if impl else ""

    def native_shape(name: str, default_t: bool) -> tuple[tuple[int, ...], bool]:
        shape = canon[name]
        t = default_t != (name in flip)
        return (tuple(reversed(shape)) if t and len(shape) == 2 else shape), t

    out: list[Binding] = []
    for c, n in cmap.params.items():
        if n not in native:
            close = [k for k in native if k.endswith(n.split(".")[-1].split("/")[-1])][:3]
            raise InputError(f"{where}params maps {c} to {n!r}, which the module does not have"
                             + (f" (similar: {', '.join(close)})" if close else "")
                             + "; `xformer check --show-map` lists its parameters")
        shape, t = native_shape(c, native[n][1])
        if tuple(native[n][0]) != shape:
            hint = (" (the other layout: add it to transpose)" if len(shape) == 2
                    and tuple(native[n][0]) == tuple(reversed(shape)) else "")
            layout = f", {shape} in this layout" if t else ""
            raise InputError(f"{where}{c} {canon[c]}{layout} cannot load into {n!r} of shape "
                             f"{tuple(native[n][0])}{hint}")
        out.append(Binding(c, n, t))
    used = {b.native for b in out}
    left = [c for c in canon if c not in cmap.params]
    free = {n: v for n, v in native.items() if n not in used}
    changed = True
    while changed and left:
        changed = False
        for c in list(left):
            if c in free:  # the same name
                shape, t = native_shape(c, free[c][1])
                if tuple(free[c][0]) == shape:
                    out.append(Binding(c, c, t, auto=True))
                    free.pop(c)
                    left.remove(c)
                    changed = True
                    continue
            candidates = [n for n, (s, d) in free.items()
                          if tuple(s) == native_shape(c, d)[0]]
            rivals = [o for o in left if o != c and canon[o] == canon[c]]
            if len(candidates) == 1 and not rivals:
                n = candidates[0]
                out.append(Binding(c, n, native_shape(c, free[n][1])[1], auto=True))
                free.pop(n)
                left.remove(c)
                changed = True
    if free:
        names = sorted(free)
        raise InputError(f"{where}native parameter {names[0]!r} {tuple(free[names[0]][0])} is "
                         f"not mapped ({len(names)} unmapped: the check would not control "
                         f"them); add it to params in the mapping file")
    order = {p.name: i for i, p in enumerate(spec.parameters())}
    return sorted(out, key=lambda b: order[b.canonical])


# ---------------------------------------------------------------------- the report
@dataclass
class CheckReport:
    """One implementation checked: the verdict, the first divergent node, and every row."""

    impl: str
    backend: str
    dtype: str
    conforms: bool
    first_divergence: str | None
    outputs: list[dict] = field(default_factory=list)
    grads: list[dict] = field(default_factory=list)
    nodes: list[dict] = field(default_factory=list)
    mapping: list[dict] = field(default_factory=list)
    tolerance: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check(impls: str | Sequence[str], maps: Any, spec: Any, weights: Mapping | None = None,
          dtype: str = "float64", seed: int = 0,
          on_native: Callable[[str, dict], None] | None = None
          ) -> CheckReport | list[CheckReport]:
    """Check each implementation against xformer's lowering and the numpy reference.

    Args:
        impls: one ``BACKEND:MODULE:FACTORY`` or a list. maps: one mapping file per impl
            (a path, or a list of paths in the same order).
        spec: a :class:`~xformer.spec.ModelSpec`, a spec file or a preset name.
        weights: canonical weights; ``None``: seeded random (``seed``).
        dtype: ``"float32"`` or ``"float64"``.
        on_native: called with ``(impl, {native name: (shape, transposed by default)})``
            before the mapping is resolved (``--show-map`` prints it, also when it fails).
    Returns:
        a :class:`CheckReport` for a single impl (a string), else a list.
    Raises:
        InputError / BackendError: bad input (module docstring), an uninstalled backend.
    """
    from .backend import check_dtype, get_backend
    from .conformance.case import Case
    from .spec import ModelSpec
    from .weights import check_weights

    single = isinstance(impls, str)
    impl_list = [impls] if single else list(impls)
    map_list = [maps] if isinstance(maps, (str, os.PathLike)) else list(maps)
    if len(map_list) != len(impl_list):
        raise InputError(f"give one --map per IMPL, in order: {len(impl_list)} IMPL and "
                         f"{len(map_list)} --map")
    dtype = check_dtype(dtype)
    if not isinstance(spec, ModelSpec):
        spec = ModelSpec.load(spec)
    if spec.architecture == "encoder-decoder":
        raise InputError("xformer check takes an encoder or a decoder spec (one (B, T, D) "
                         "output); encoder-decoders are not supported yet")
    parsed = [parse_impl(i) for i in impl_list]
    cmaps = [load_map(m, spec) for m in map_list]
    if weights is not None:
        weights = check_weights(spec, weights)
    case = Case.make(spec, seed=seed, dtype=dtype, batch=3, weights=weights,
                     fully_padded=False, name=f"check-{dtype}")
    reports = []
    for impl, cmap in zip(parsed, cmaps):
        be = get_backend(impl.backend)
        factory = load_factory(impl)
        reports.append(_check_one(be, impl, factory, cmap, spec, case, on_native))
    return reports[0] if single else reports


def _check_one(be, impl: Impl, factory, cmap: CheckMap, spec, case, on_native=None
               ) -> CheckReport:
    from .conformance.case import TOLERANCES
    from .conformance.compare import diff_tensors
    from .reference import forward as reference_forward

    dtype = case.dtype
    try:
        module = factory(spec, dtype)
    except Exception as e:  # the user's factory failed: their error, one line
        raise InputError(f"IMPL {impl.text}: {impl.factory}(spec, {dtype!r}) raised "
                         f"{type(e).__name__}: {_first_line(e)}") from None
    if module is None:
        raise InputError(f"IMPL {impl.text}: {impl.factory}(spec, {dtype!r}) returned None; "
                         f"return the module")
    try:
        native = be._foreign_parameters(module, case.inputs, cmap)
    except XformerError:
        raise
    except Exception as e:  # building a lazily built module ran the user's code
        raise InputError(f"IMPL {impl.text}: building the module raised {type(e).__name__}: "
                         f"{_first_line(e)}") from None
    if on_native is not None:
        on_native(impl.text, native)
    bindings = bind(spec, cmap, native, impl.text)
    arrays = {}
    for b in bindings:
        w = np.asarray(case.weights[b.canonical])
        arrays[b.native] = np.ascontiguousarray(w.T if b.transposed else w)
    be._foreign_load(module, arrays, dtype)
    kwargs = {cmap.inputs[k]: v for k, v in case.inputs.items() if k in cmap.inputs}
    out_name = "last_hidden_state"
    cot = case.cotangents[out_name]
    try:
        output, native_grads, node_values = be._foreign_run(module, kwargs, cmap.output, cot,
                                                            cmap.nodes)
    except XformerError:
        raise
    except Exception as e:  # the user's forward or backward pass failed: their error
        raise InputError(f"IMPL {impl.text}: calling the module with {sorted(kwargs)} raised "
                         f"{type(e).__name__}: {_first_line(e)} (check inputs in the mapping "
                         f"file)") from None
    output = np.asarray(output)
    if output.shape != cot.shape:
        raise InputError(f"IMPL {impl.text}: the module's output has shape {output.shape}; "
                         f"expected {cot.shape} (B, T, D): set output in the mapping file")
    # xformer's own lowering on the same backend, and the numpy reference
    model = be.build(spec, dtype)
    be.set_weights(model, case.weights)
    cots = {k: (v if k == out_name else np.zeros_like(v)) for k, v in case.cotangents.items()}
    ours_out, ours_grads = be.forward_backward(model, case.inputs, cots)
    ref = reference_forward(spec, case.weights, case.inputs, dtype)
    tol = TOLERANCES[dtype]
    rows_out = []
    for label, want in (("xformer " + be.name, ours_out[out_name]),
                        ("numpy reference", ref[out_name])):
        d = diff_tensors(impl.text, label, out_name, output, np.asarray(want), tol.output)
        rows_out.append({"against": label, "max_abs": d.max_abs, "max_rel": d.max_rel,
                         "tol": tol.output, "ok": bool(d.max_rel <= tol.output)})
    rows_grad = []
    from .conformance.compare import zero_gradient_scale

    for b in bindings:
        g = np.asarray(native_grads[b.native])
        g = g.T if b.transposed else g
        scale = zero_gradient_scale(b.canonical, ours_grads)
        d = diff_tensors(impl.text, be.name, b.canonical, g, ours_grads[b.canonical],
                         tol.grad, scale)
        rows_grad.append({"name": b.canonical, "native": b.native, "max_abs": d.max_abs,
                          "max_rel": d.max_rel, "tol": tol.grad,
                          "ok": bool(d.max_rel <= tol.grad)})
    rows_nodes = []
    first = None
    if cmap.nodes:
        fwd, bwd = be.trace(model, case.inputs, cots)
        kinds = dict(spec.nodes())
        order = [n for n, _ in spec.nodes() if n in cmap.nodes]
        for direction, names, t, ours in (("forward", order, tol.output, fwd),
                                          ("backward", order[::-1], tol.grad, bwd)):
            for name in names:
                mine = node_values[name][0 if direction == "forward" else 1]
                want = ours[name]
                if np.shape(mine) != np.shape(want):
                    row = {"name": name, "kind": kinds[name], "direction": direction,
                           "max_abs": math.nan, "max_rel": math.nan, "tol": t, "ok": False,
                           "note": f"shape {np.shape(mine)} vs {np.shape(want)}"}
                else:
                    d = diff_tensors(impl.text, be.name, name, np.asarray(mine), want, t)
                    row = {"name": name, "kind": kinds[name], "direction": direction,
                           "max_abs": d.max_abs, "max_rel": d.max_rel, "tol": t,
                           "ok": bool(d.max_rel <= t), "note": ""}
                rows_nodes.append(row)
        bad = next((r for r in rows_nodes if not r["ok"]), None)
        first = None if bad is None else bad["name"]
    conforms = (all(r["ok"] for r in rows_out) and all(r["ok"] for r in rows_grad)
                and all(r["ok"] for r in rows_nodes))
    mapping = [{"canonical": b.canonical, "native": b.native, "transposed": b.transposed,
                "auto": b.auto} for b in bindings]
    return CheckReport(impl.text, be.name, dtype, conforms, first, rows_out, rows_grad,
                       rows_nodes, mapping, {"output": tol.output, "grad": tol.grad})
