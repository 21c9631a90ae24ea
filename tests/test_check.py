"""``xformer check`` (issue #13) on PyTorch: a hand-written BERT encoder with its own names
(examples/check/torch_bert.py) conforms in float64 through its mapping file, each classic
porting bug planted in it gives exit 1 and ``first_divergence`` at the node where it enters,
and every bad input of the IMPL, the factory and the mapping file exits 2 with one line.
(tests/test_check_tensorflow.py and tests/test_check_mxnet.py do the same for Keras and
Gluon.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from xformer.checking import check, parse_impl  # noqa: E402
from xformer.cli import main  # noqa: E402
from xformer.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples" / "check"
SPEC = str(EX / "bert_tiny.yaml")
MAP = str(EX / "torch_bert.yaml")
IMPL = f"torch:{EX / 'torch_bert.py'}"
BUGS = {"build_eps_default": "embeddings.norm",
        "build_scale_d_model": "encoder.layers.0.self_attn",
        "build_gelu_tanh": "encoder.layers.0.ffn",
        "build_transposed_kernel": "encoder.layers.0.self_attn"}


def test_hand_written_bert_conforms_in_float64():
    r = check(f"{IMPL}:build", MAP, SPEC, dtype="float64")
    assert r.conforms and r.first_divergence is None
    assert [o["against"] for o in r.outputs] == ["xformer torch", "numpy reference"]
    assert all(o["max_rel"] <= 1e-11 for o in r.outputs)
    assert len(r.grads) == 37 and all(g["max_rel"] <= 1e-11 for g in r.grads)
    assert len(r.nodes) == 18 and all(n["max_rel"] <= 1e-11 for n in r.nodes)
    assert not any(m["auto"] for m in r.mapping)


def test_float32_conforms_within_float32_bounds():
    r = check(f"{IMPL}:build", MAP, SPEC, dtype="float32")
    assert r.conforms, (r.outputs, [g for g in r.grads if not g["ok"]])
    assert max(o["max_rel"] for o in r.outputs) > 1e-9  # really float32 arithmetic


@pytest.mark.parametrize("factory, node", BUGS.items())
def test_each_porting_bug_is_found_where_it_enters(factory, node, tmp_path, capsys):
    out = tmp_path / "r.json"
    code = main(["check", f"{IMPL}:{factory}", "--map", MAP, "--spec", SPEC, "--json",
                 str(out)])
    assert code == 1
    doc = json.loads(out.read_text())
    assert doc["conforms"] is False and doc["first_divergence"] == node
    first = next(r for r in doc["nodes"] if not r["ok"])
    assert first["name"] == node and first["direction"] == "forward"
    assert first["max_rel"] > 1e-8  # far past the 1e-11 bound: a bug, not rounding
    before = [r for r in doc["nodes"] if r["direction"] == "forward"]
    before = before[:[r["name"] for r in before].index(node)]
    assert all(r["ok"] for r in before)  # every node before it still agrees
    assert f"first divergence: {node}" in capsys.readouterr().out.replace("\n", "")


def test_automatic_matching_and_show_map(tmp_path, capsys):
    """Leaving out every parameter whose name or shape is unambiguous: they are matched
    automatically (the embeddings' distinct shapes), and --show-map prints them."""
    import yaml

    doc = yaml.safe_load(Path(MAP).read_text())
    for name in ("embeddings.word_embeddings.weight", "embeddings.token_type_embeddings.weight"):
        del doc["params"][name]
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    code = main(["check", f"{IMPL}:build", "--map", str(path), "--spec", SPEC, "--show-map"])
    out = capsys.readouterr().out
    assert code == 0 and "automatic" in out and "tok.weight" in out


def test_several_impls_and_html(tmp_path):
    out, html = tmp_path / "r.json", tmp_path / "r.html"
    code = main(["check", f"{IMPL}:build", f"{IMPL}:build_gelu_tanh", "--map", MAP, "--map",
                 MAP, "--spec", SPEC, "--json", str(out), "--html", str(html)])
    assert code == 1
    doc = json.loads(out.read_text())
    assert [d["conforms"] for d in doc] == [True, False]
    assert [d["first_divergence"] for d in doc] == [None, "encoder.layers.0.ffn"]
    page = html.read_text()
    assert "data:image/png;base64" in page and "encoder.layers.0.ffn" in page


# ---------------------------------------------------------------------- bad input: exit 2
def _edit_map(tmp_path, edit) -> str:
    import yaml

    doc = yaml.safe_load(Path(MAP).read_text())
    edit(doc)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _module(tmp_path, text: str) -> str:
    path = tmp_path / "mine.py"
    path.write_text(text)
    return str(path)


FAILING = f"""
import sys
sys.path.insert(0, {str(EX)!r})
from torch_bert import TinyBert


class Failing(TinyBert):
    def forward(self, ids, mask, types):
        raise ValueError("shapes do not line up")


def build(spec, dtype):
    return Failing(spec, dtype)
"""

BAD = {
    "impl-not-three-parts": (lambda t: ["torch:only"], None, "must be BACKEND:MODULE:FACTORY"),
    "impl-unknown-backend": (lambda t: [f"jax:{EX / 'torch_bert.py'}:build"], None,
                             "unknown backend 'jax'"),
    "module-missing": (lambda t: [f"torch:{t / 'nope.py'}:build"], None, "does not exist"),
    "module-not-importable": (lambda t: ["torch:no_such_module_xyz:build"], None,
                              "ModuleNotFoundError"),
    "module-raises": (lambda t: [f"torch:{_module(t, 'raise RuntimeError(1)')}:build"], None,
                      "RuntimeError"),
    "factory-missing": (lambda t: [f"{IMPL}:nothing"], None, "has no 'nothing'"),
    "factory-raises": (lambda t: [f"torch:{_module(t, 'def build(s, d):  1 / 0')}:build"],
                       None, "ZeroDivisionError"),
    "factory-not-a-module": (lambda t: [f"torch:{_module(t, 'def build(s, d): return 3')}:build"],
                             None, "not a torch.nn.Module"),
    "forward-raises": (lambda t: [f"torch:{_module(t, FAILING)}:build"], None,
                       "calling the module"),
    "param-unmapped": (None, lambda d: [d["params"].pop(f"encoder.layers.0.norm{i}.bias")
                                        for i in (1, 2)],  # two (D,) left: ambiguous
                       "not mapped"),
    "param-mis-shaped": (None, lambda d: d["params"].update(  # fc1 and fc2 swapped
        {"encoder.layers.0.ffn.linear1.weight": "blocks.0.fc2.weight",
         "encoder.layers.0.ffn.linear2.weight": "blocks.0.fc1.weight"}), "cannot load into"),
    "param-unknown-native": (None, lambda d: d["params"].update(
        {"embeddings.norm.bias": "emb_ln.beta"}), "which the module does not have"),
    "param-unknown-canonical": (None, lambda d: d["params"].update({"pooler.dense.weight": "x"}),
                                "not a parameter of this spec"),
    "node-unknown-native": (None, lambda d: d["nodes"].update({"embeddings.norm": "emb.norm"}),
                            "not a sub-module"),
    "node-unknown-canonical": (None, lambda d: d["nodes"].update({"decoder.layers.0": "x"}),
                               "not a node of this spec"),
    "map-unknown-key": (None, lambda d: d.update({"param": {}}), "unknown key 'param'"),
    "map-unknown-input": (None, lambda d: d["inputs"].update({"pixel_values": "x"}),
                          "does not take"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_exits_2_with_one_line(name, tmp_path, capsys):
    impls, edit, message = BAD[name]
    impls = impls(tmp_path) if impls else [f"{IMPL}:build"]
    mapping = _edit_map(tmp_path, edit) if edit else MAP
    code = main(["check", *impls, "--map", mapping, "--spec", SPEC])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("xformer: error: "), err
    assert message in err[0], err[0]


def test_one_map_per_impl(capsys):
    code = main(["check", f"{IMPL}:build", f"{IMPL}:build", "--map", MAP, "--spec", SPEC])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "one --map per IMPL" in err[0]


def test_api_raises_input_error():
    with pytest.raises(InputError, match="BACKEND:MODULE:FACTORY"):
        parse_impl("torch")
