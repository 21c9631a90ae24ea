"""The three ``modules.py`` are twins: the same classes in the same order, the same base classes
and, for every class, the same constructor and call parameters (names and order).

The files are parsed with :mod:`ast` (no framework is imported). Framework plumbing is left out
of the parameter lists: ``self``; torch's ``device``; Keras' ``training`` and ``**kwargs``;
Gluon's ``F`` and the block's own parameters that Gluon passes to ``hybrid_forward`` as keywords
(``self.x = self.params.get(...)`` / ``self.params.get_constant("x", ...)``). The framework base
classes (``nn.Module``, ``keras.layers.Layer``, ``keras.Model``, ``HybridBlock``) read as one
label, ``<framework>``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "backends"
FILES = {name: ROOT / f"xformer_{name}" / "modules.py" for name in ("torch", "tensorflow", "mxnet")}
FRAMEWORK_BASES = {"nn.Module", "keras.layers.Layer", "keras.Model", "HybridBlock"}
#: The frameworks' own LayerNorm layers (torch and Gluon ``nn.LayerNorm``, Keras
#: ``LayerNormalization``), which xformer's ``LayerNorm`` extends: one label,
#: ``<framework LayerNorm>``; Gluon passes such a block its ``gamma`` / ``beta``.
FRAMEWORK_LAYER_NORMS = {"nn.LayerNorm", "keras.layers.LayerNormalization"}
#: The frameworks' own dropout layers (torch and Gluon ``nn.Dropout``, Keras
#: ``keras.layers.Dropout``), which xformer's ``Dropout`` extends (the dropout stream of
#: issue #10): one label, ``<framework Dropout>``.
FRAMEWORK_DROPOUTS = {"nn.Dropout", "keras.layers.Dropout"}
GLUON_LAYER_NORM_PARAMETERS = {"gamma", "beta"}
PLUMBING = {"self", "device", "training", "F"}
CALL_METHODS = ("forward", "call", "hybrid_forward")
GLUON_DECLARATIONS = ("self.params.get", "self.params.get_constant")


def _gluon_parameters(cls: ast.ClassDef) -> set[str]:
    """Names of the parameters a Gluon block declares (what Gluon passes to hybrid_forward):
    ``self.<name> = self.params.get(...)`` and ``self.params.get_constant("<name>", ...)``."""
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and (
                ast.unparse(node.value.func) in GLUON_DECLARATIONS):
            names.update(t.attr for t in node.targets if isinstance(t, ast.Attribute))
        if (isinstance(node, ast.Call) and ast.unparse(node.func) == "self.params.get_constant"
                and node.args):
            names.add(ast.literal_eval(node.args[0]))
    return names


def _parameters(fn: ast.FunctionDef, drop: set[str]) -> list[str]:
    """Positional and keyword-only parameter names of ``fn``, without ``*args`` / ``**kwargs``
    and without the names in ``drop``."""
    args = fn.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return [n for n in names if n not in drop]


def describe(source: str) -> list[tuple[str, tuple[str, ...], list[str], list[str] | None]]:
    """``[(class, bases, constructor parameters, call parameters or None)]`` of the public
    classes of a ``modules.py`` and of the private classes they derive from, in file order."""
    classes = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    by_name = {c.name: c for c in classes}
    wanted = {c.name for c in classes if not c.name.startswith("_")}
    frontier = list(wanted)
    while frontier:  # private bases of the public classes, transitively
        for base in by_name[frontier.pop()].bases:
            name = ast.unparse(base)
            if name in by_name and name not in wanted:
                wanted.add(name)
                frontier.append(name)
    out = []
    for cls in classes:
        if cls.name not in wanted:
            continue
        labels = {**dict.fromkeys(FRAMEWORK_BASES, "<framework>"),
                  **dict.fromkeys(FRAMEWORK_LAYER_NORMS, "<framework LayerNorm>"),
                  **dict.fromkeys(FRAMEWORK_DROPOUTS, "<framework Dropout>")}
        bases = tuple(labels.get(ast.unparse(b), ast.unparse(b)) for b in cls.bases)
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        drop = PLUMBING | _gluon_parameters(cls)
        if "<framework LayerNorm>" in bases:
            drop |= GLUON_LAYER_NORM_PARAMETERS
        init = _parameters(methods["__init__"], drop) if "__init__" in methods else None
        call = next((_parameters(methods[m], drop) for m in CALL_METHODS if m in methods), None)
        out.append((cls.name, bases, init, call))
    return out


@pytest.fixture(scope="module")
def twins():
    return {name: describe(path.read_text()) for name, path in FILES.items()}


def test_the_same_classes_in_the_same_order(twins):
    names = {be: [c[0] for c in classes] for be, classes in twins.items()}
    assert names["torch"][:6] == ["_SpecLayer", "LayerNorm", "RMSNorm", "RotaryEmbedding",
                                  "Embeddings", "MultiHeadAttention"]
    assert "EncoderDecoderModel" in names["torch"]
    assert names["tensorflow"] == names["torch"]
    assert names["mxnet"] == names["torch"]


@pytest.mark.parametrize("backend", ["tensorflow", "mxnet"])
def test_the_same_bases_and_parameters_as_torch(twins, backend):
    for mine, theirs in zip(twins["torch"], twins[backend], strict=True):
        assert mine == theirs, f"{backend}: {theirs} differs from torch's {mine}"


def test_agreed_names(twins):
    """The argument names the twins agreed on (Hugging Face style)."""
    table = {c[0]: c for c in twins["torch"]}
    assert table["MultiHeadAttention"][2:] == (
        ["spec", "cross_attention", "dtype"],
        ["x", "attention_bias", "key_value_states", "past_key_value", "use_cache"])
    assert table["DecoderLayer"][3] == ["x", "attention_bias", "encoder_hidden_states",
                                        "encoder_attention_bias", "past_key_value", "use_cache"]
    assert table["Decoder"][3][-2:] == ["past_key_values", "use_cache"]
    assert table["LMHead"][2] == ["spec", "tied", "dtype"]
    assert table["EncoderModel"][3] == ["input_ids", "attention_mask", "token_type_ids",
                                        "inputs_embeds"]
    for name in ("DecoderModel", "EncoderDecoderModel"):
        assert table[name][1] == ("_CausalModel",)
    assert {table[n][1] for n in ("Embeddings", "Encoder", "LMHead", "RMSNorm",
                                  "RotaryEmbedding", "GatedFeedForward")} == {("_SpecLayer",)}
    assert table["LayerNorm"][1] == ("<framework LayerNorm>",)
    assert table["RotaryEmbedding"][3] == ["x", "past_length"]
    assert table["GatedFeedForward"][2:] == table["FeedForward"][2:]


def test_mxnet_call_matches_hybrid_forward():
    """The MXNet models take keywords in ``__call__``: the same names as ``hybrid_forward``."""
    tree = ast.parse(FILES["mxnet"].read_text())
    checked = 0
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        methods = {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
        if "__call__" in methods:
            assert (_parameters(methods["__call__"], PLUMBING)
                    == _parameters(methods["hybrid_forward"], PLUMBING)), cls.name
            checked += 1
    assert checked == 3


def test_a_drifted_twin_is_caught(twins):
    """The comparison fails on a renamed argument, a reordered one, a renamed base class and a
    moved class."""
    source = FILES["tensorflow"].read_text()
    drifts = [
        source.replace("encoder_attention_bias=None, past_key_value=None",
                       "encoder_attention_mask=None, past_key_value=None", 1),
        source.replace("def __init__(self, spec: ModelSpec, cross_attention: bool = False, "
                       "dtype=None",
                       "def __init__(self, spec: ModelSpec, dtype=None, cross_attention: bool = "
                       "False", 1),
        source.replace("class Decoder(_SpecLayer)", "class Decoder(keras.layers.Layer)", 1),
        source.replace("class Pooler(", "class _Pooler(", 1),
    ]
    for drifted in drifts:
        assert drifted != source, "the drift did not apply: update this test"
        assert describe(drifted) != twins["torch"]
    assert describe(source) == twins["torch"]


def test_gluon_parameters_are_plumbing():
    cls = ast.parse("class LMHead(HybridBlock):\n"
                    "    def __init__(self, spec, tied=False, dtype='float32', **kwargs):\n"
                    "        self.weight = self.params.get('weight', shape=(2, 2))\n"
                    "        self.table = self.params.get_constant('table', None)\n"
                    "    def hybrid_forward(self, F, x, tied_weight=None, weight=None,"
                    " table=None):\n"
                    "        pass\n").body[0]
    assert _gluon_parameters(cls) == {"weight", "table"}
    assert describe(ast.unparse(cls)) == [
        ("LMHead", ("<framework>",), ["spec", "tied", "dtype"], ["x", "tied_weight"])]
