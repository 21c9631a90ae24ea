"""``xformer check`` (issue #13) on TensorFlow / Keras 3: a hand-written Keras BERT encoder with
its own names (examples/check/keras_bert.py, variables named by ``.path``) conforms in float64
through its mapping file, each classic porting bug planted in it is found at the node where it
enters, and bad node paths, native variables and shapes raise InputError with one line.
(tests/test_check.py does the same, and the CLI, for PyTorch.)

Every factory builds a fresh ``mybert`` in this one process and the mapping file is static: the
Keras paths do not get ``_1`` suffixes (explicit layer names are kept as given).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tensorflow")

import xformer  # noqa: E402
from xformer.checking import check  # noqa: E402
from xformer.errors import InputError  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EX = ROOT / "examples" / "check"
SPEC = str(EX / "bert_tiny.yaml")
MAP = str(EX / "keras_bert.yaml")
IMPL = f"tensorflow:{EX / 'keras_bert.py'}"
BUGS = {"build_eps_default": "embeddings.norm",
        "build_scale_d_model": "encoder.layers.0.self_attn",
        "build_gelu_tanh": "encoder.layers.0.ffn",
        "build_transposed_kernel": "encoder.layers.0.self_attn"}


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    import logging

    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # the lowering's tf.functions


def test_hand_written_keras_bert_conforms_in_float64():
    r = check(f"{IMPL}:build", MAP, SPEC, dtype="float64")
    assert r.conforms and r.first_divergence is None
    assert [o["against"] for o in r.outputs] == ["xformer tensorflow", "numpy reference"]
    assert all(o["max_rel"] <= 1e-11 for o in r.outputs), r.outputs
    assert len(r.grads) == 37 and all(g["max_rel"] <= 1e-11 for g in r.grads)
    assert len(r.nodes) == 18 and all(n["max_rel"] <= 1e-11 for n in r.nodes)
    assert not any(m["auto"] for m in r.mapping)
    kernels = {m["native"] for m in r.mapping if m["transposed"]}
    assert kernels == {m["native"] for m in r.mapping if m["native"].endswith("/kernel")}
    assert len(kernels) == 12  # every Dense kernel, nothing else


@pytest.mark.parametrize("factory, node", BUGS.items())
def test_each_porting_bug_is_found_where_it_enters(factory, node):
    r = check(f"{IMPL}:{factory}", MAP, SPEC, dtype="float64")
    assert r.conforms is False and r.first_divergence == node
    first = next(n for n in r.nodes if not n["ok"])
    assert first["name"] == node and first["direction"] == "forward"
    assert first["max_rel"] > 1e-8  # far past the 1e-11 bound: a bug, not rounding
    forward = [n for n in r.nodes if n["direction"] == "forward"]
    assert all(n["ok"] for n in forward[:[n["name"] for n in forward].index(node)])
    assert not all(o["ok"] for o in r.outputs)


# ---------------------------------------------------------------------- bad input: one line
def _edit_map(tmp_path, edit) -> str:
    import yaml

    doc = yaml.safe_load(Path(MAP).read_text())
    edit(doc)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def _factory(tmp_path, body: str) -> str:
    """A module whose ``build`` wraps keras_bert.py's (``kb``)."""
    path = tmp_path / "mine.py"
    example = str(EX / "keras_bert.py")
    path.write_text(f"import importlib.util, keras\n"
                    f"_s = importlib.util.spec_from_file_location('kb', {example!r})\n"
                    f"kb = importlib.util.module_from_spec(_s)\n"
                    f"_s.loader.exec_module(kb)\n"
                    f"def build(spec, dtype):\n{body}")
    return f"tensorflow:{path}:build"


POOLER = ("    model = kb.build(spec, dtype)\n"
          "    model.pooler = keras.layers.Dense(spec.d_model, name='pooler', dtype=dtype)\n"
          "    model.pooler.build((None, spec.d_model))\n"
          "    return model\n")
BAD = {
    "node-unknown-path": (None, lambda d: d["nodes"].update({"embeddings.norm": "mybert/ln"}),
                          "not a layer of the module"),
    "variable-unmapped": (lambda t: _factory(t, POOLER), None, "'pooler/bias' (32,) is not "
                                                               "mapped"),
    "variables-ambiguous": (None, lambda d: [d["params"].pop(f"encoder.layers.0.norm{i}.bias")
                                             for i in (1, 2)], "not mapped"),
    "variable-mis-shaped": (None, lambda d: d["params"].update(  # fc1 and fc2 swapped
        {"encoder.layers.0.ffn.linear1.weight": "mybert/block0/fc2/kernel",
         "encoder.layers.0.ffn.linear2.weight": "mybert/block0/fc1/kernel"}),
        "(the other layout: add it to transpose)"),
    "variable-unknown": (None, lambda d: d["params"].update(
        {"embeddings.norm.bias": "mybert/emb_ln/bias"}), "which the module does not have"),
    "wrong-dtype": (lambda t: _factory(t, "    return kb.TinyBert(spec, 'float32')\n"), None,
                    "is float32 but the check runs in float64"),
    "not-keras": (lambda t: _factory(t, "    return 3\n"), None, "not a keras.Model"),
    "wrong-keyword": (None, lambda d: d["inputs"].update({"input_ids": "ids"}),
                      "calling the module with ids, padding_mask, segment_ids raised TypeError"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_input_raises_one_line(name, tmp_path):
    impl, edit, message = BAD[name]
    impl = impl(tmp_path) if impl else f"{IMPL}:build"
    mapping = _edit_map(tmp_path, edit) if edit else MAP
    with pytest.raises(InputError) as e:
        check(impl, mapping, SPEC, dtype="float64")
    text = str(e.value)
    assert "\n" not in text and message in text, text


def test_node_wrappers_are_removed_also_on_errors():
    """Every node layer's temporary ``call`` goes away after the pass, also when the module
    raises inside it, and the layers keep working."""
    import importlib.util

    import tensorflow as tf

    from xformer.spec import ModelSpec

    s = importlib.util.spec_from_file_location("kb_wrap", EX / "keras_bert.py")
    kb = importlib.util.module_from_spec(s)
    s.loader.exec_module(kb)
    be = xformer.get_backend("tensorflow")
    spec = ModelSpec.load(SPEC)
    model = kb.build(spec, "float64")
    rng = np.random.default_rng(0)
    kwargs = {"token_ids": rng.integers(0, 100, (2, 5)), "padding_mask": np.ones((2, 5)),
              "segment_ids": np.zeros((2, 5), np.int64)}
    nodes = {"embeddings.norm": "mybert/emb_ln", "encoder.layers.0.ffn": "mybert/block0/fc2"}
    cot = rng.standard_normal((2, 5, 32))
    model(**kwargs)
    out, grads, values = be._foreign_run(model, kwargs, None, cot, nodes)
    layers = [model.emb_ln, model.blocks[0].fc2]
    assert not any("call" in vars(layer) for layer in layers)
    assert np.array_equal(out, model(**kwargs).numpy())
    assert values["encoder.layers.0.ffn"][0].shape == (2, 5, 32)
    assert np.abs(values["embeddings.norm"][1]).max() > 0  # the gradient flowing in
    assert set(grads) == {v.path for v in model.trainable_variables}

    def boom(*args, **kwargs):
        raise tf.errors.InvalidArgumentError(None, None, "boom")

    object.__setattr__(model.blocks[1], "call", boom)  # after block0's fc2 was wrapped
    try:
        with pytest.raises(InputError, match=r"InvalidArgumentError: in Block\.call\(\): boom"):
            be._foreign_run(model, kwargs, None, cot, nodes)
    finally:
        object.__delattr__(model.blocks[1], "call")
    assert not any("call" in vars(layer) for layer in layers)
    with pytest.raises(InputError, match="not a layer of the module"):
        be._foreign_run(model, kwargs, None, cot, {"embeddings.norm": "mybert/nope"})
