"""``xformer check`` on MXNet Gluon (issue #13): the hand-written tiny BERT of
``examples/check/gluon_bert.py`` (tutorial-style ``HybridBlock`` s, shapes inferred at the first
call) conforms in float64, each of its four planted porting bugs is caught and localised to the
node where it enters, and bad mappings fail with one line.

The Gluon hooks (``MXNetBackend._foreign_parameters`` / ``_foreign_load`` / ``_foreign_run``)
finish Gluon's deferred initialization, call the block positionally by argument name, and run
it imperatively (a hybridized block too, its cached graph kept).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import yaml

pytest.importorskip("xformer_mxnet")  # restores numpy's np.bool, then imports mxnet
pytest.importorskip("mxnet")

from xformer.checking import check  # noqa: E402
from xformer.errors import InputError  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "check"
SPEC = str(EXAMPLES / "bert_tiny.yaml")
MAP = str(EXAMPLES / "gluon_bert.yaml")
MODULE = str(EXAMPLES / "gluon_bert.py")


def run(factory: str = "build", cmap: str = MAP, dtype: str = "float64", module: str = MODULE):
    return check(f"mxnet:{module}:{factory}", cmap, SPEC, dtype=dtype)


def write_map(tmp_path, edit) -> str:
    """The example's mapping, changed by ``edit(doc)``, written under ``tmp_path``."""
    doc = yaml.safe_load(Path(MAP).read_text())
    edit(doc)
    path = tmp_path / "map.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def one_line_error(call) -> str:
    with pytest.raises(InputError) as e:
        call()
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


def test_the_gluon_bert_conforms_in_float64():
    r = run()
    assert r.conforms and r.first_divergence is None
    assert len(r.outputs) == 2 and all(o["max_rel"] <= 1e-11 for o in r.outputs), r.outputs
    assert len(r.grads) == 37 and all(g["max_rel"] <= 1e-11 for g in r.grads)
    assert len(r.nodes) == 18 and all(n["ok"] for n in r.nodes)  # 9 nodes, both directions
    assert {m["native"] for m in r.mapping} >= {"emb_ln.gamma", "blocks.1.fc2.bias"}
    assert not any(m["transposed"] or m["auto"] for m in r.mapping)


@pytest.mark.parametrize("factory, node", [
    ("build_eps_default", "embeddings.norm"),
    ("build_scale_d_model", "encoder.layers.0.self_attn"),
    ("build_gelu_tanh", "encoder.layers.0.ffn"),
    ("build_transposed_kernel", "encoder.layers.0.self_attn"),
])
def test_each_planted_bug_is_found_where_it_enters(factory, node):
    r = run(factory)
    assert not r.conforms
    assert r.first_divergence == node
    assert all(not o["ok"] for o in r.outputs)
    first = next(n for n in r.nodes if not n["ok"])
    assert first["direction"] == "forward"


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> str:
    """A module of factories built on the example: hybridized, uninitialized, float32."""
    path = tmp_path_factory.mktemp("check") / "gluon_variants.py"
    path.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(EXAMPLES)!r})
        import gluon_bert

        made = []

        def hybridized(spec, dtype):
            net = gluon_bert.build(spec, dtype)
            net.hybridize(static_alloc=True)
            made.append(net)
            return net

        def uninitialized(spec, dtype):  # the hooks call initialize()
            return gluon_bert.TinyBert(spec, dtype)

        def float32(spec, dtype):  # ignores its dtype
            return gluon_bert.build(spec, "float32")
    """))
    return str(path)


def test_a_hybridized_block_is_checked_imperatively_and_keeps_its_graph(variants):
    """A user's ``hybridize()`` does not get in the way: the pass runs block by block, and
    afterwards no node wrapper is left and every block is active again."""
    r = run("hybridized", module=variants)
    assert r.conforms and r.first_divergence is None
    factories = next(m for name, m in sys.modules.items()
                     if name.startswith("xformer_check_gluon_variants"))
    blocks = []
    factories.made[-1].apply(blocks.append)
    assert all("forward" not in vars(b) for b in blocks)
    assert all(b._active for b in blocks)


def test_an_uninitialized_block_is_initialized_first(variants):
    assert run("uninitialized", module=variants).conforms


def test_a_module_in_the_wrong_dtype_is_one_line(variants):
    message = one_line_error(lambda: run("float32", module=variants))
    assert "is float32 but the check runs in float64" in message


def test_an_unknown_node_path_is_one_line(tmp_path):
    path = write_map(tmp_path, lambda d: d["nodes"].update(
        {"encoder.layers.0.ffn": "blocks.0.mlp"}))
    message = one_line_error(lambda: run(cmap=path))
    assert "'blocks.0.mlp'" in message and "fc2" in message


def test_an_unmapped_native_parameter_is_one_line(tmp_path):
    """Two (32,) parameters left out: neither can be matched automatically (by name or a
    unique shape), so the check would not control them."""
    def drop(d):
        for name in ("encoder.layers.0.norm1.weight", "encoder.layers.0.norm1.bias"):
            del d["params"][name]
    message = one_line_error(lambda: run(cmap=write_map(tmp_path, drop)))
    assert "'blocks.0.ln1.beta'" in message and "not mapped" in message


def test_one_left_out_parameter_is_matched_by_its_unique_shape(tmp_path):
    path = write_map(tmp_path, lambda d: d["params"].pop("encoder.layers.0.norm1.weight"))
    r = run(cmap=path)
    assert r.conforms
    auto = [m for m in r.mapping if m["auto"]]
    assert [(m["canonical"], m["native"]) for m in auto] == [
        ("encoder.layers.0.norm1.weight", "blocks.0.ln1.gamma")]


def test_a_mis_shaped_parameter_is_one_line(tmp_path):
    def swap(d):
        p = d["params"]
        p["encoder.layers.0.ffn.linear1.weight"], p["encoder.layers.0.ffn.linear2.weight"] = (
            p["encoder.layers.0.ffn.linear2.weight"], p["encoder.layers.0.ffn.linear1.weight"])
    message = one_line_error(lambda: run(cmap=write_map(tmp_path, swap)))
    assert "'blocks.0.fc2.weight'" in message and "cannot load" in message


def test_an_input_the_block_does_not_take_is_one_line(tmp_path):
    path = write_map(tmp_path, lambda d: d["inputs"].update({"token_type_ids": "segments"}))
    message = one_line_error(lambda: run(cmap=path))
    assert "hybrid_forward(self, F, ids, mask, types)" in message and "'segments'" in message
