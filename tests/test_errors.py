"""Bad input on every installed backend gives one clear xformer error, never a framework
traceback or a silent clip (MXNet's Embedding clips out-of-range ids on its own)."""

import numpy as np
import pytest

import xformer
from xformer import CheckpointError, InputError, ModelSpec

SPEC = ModelSpec(vocab_size=30, d_model=8, n_heads=2, d_ff=16, n_layers=1, max_len=6)
NATIVE = {"torch": "torch.nn.Module", "tensorflow": "keras.layers.Layer",
          "mxnet": "mxnet.gluon.HybridBlock"}


@pytest.fixture(scope="module")
def built(backend):
    weights = xformer.random_weights(SPEC, seed=0, dtype="float32")
    return backend, xformer.build(SPEC, backend=backend.name, dtype="float32", weights=weights)


def test_build_returns_the_native_class(built):
    be, model = built
    module, _, cls = NATIVE[be.name].rpartition(".")
    import importlib

    assert isinstance(model, getattr(importlib.import_module(module), cls))


def test_token_id_out_of_range(built):
    be, model = built
    with pytest.raises(InputError, match=r"token id 30 is outside \[0, vocab_size=30\)"):
        be.forward(model, {"input_ids": np.array([[1, 2, 30]])})
    with pytest.raises(InputError, match="token id -1"):
        be.forward(model, {"input_ids": np.array([[1, -1]])})


def test_sequence_longer_than_max_len(built):
    be, model = built
    with pytest.raises(InputError, match="longer than max_len=6"):
        be.forward(model, {"input_ids": np.ones((1, 7), np.int64)})


def test_wrong_input_shapes(built):
    be, model = built
    with pytest.raises(InputError, match="input_ids must be an integer array"):
        be.forward(model, {"input_ids": np.ones((2, 3), np.float32)})
    with pytest.raises(InputError, match="attention_mask must have shape"):
        be.forward(model, {"input_ids": np.ones((2, 3), np.int64),
                           "attention_mask": np.ones((2, 4))})
    with pytest.raises(InputError, match="exactly one of"):
        be.forward(model, {"attention_mask": np.ones((2, 4))})


def test_mismatched_weights(built):
    be, model = built
    w = xformer.random_weights(SPEC, dtype="float32")
    w.pop("embeddings.norm.bias")
    with pytest.raises(CheckpointError, match="missing 1: embeddings.norm.bias"):
        be.set_weights(model, w)


def test_bad_dtype():
    with pytest.raises(InputError, match="float32 or float64"):
        xformer.build(SPEC, backend="torch", dtype="float16")


def test_cotangents_for_unknown_or_missing_outputs(built):
    be, model = built
    inputs = {"input_ids": np.array([[1, 2, 3]])}
    with pytest.raises(InputError, match="cotangent"):
        be.forward_backward(model, inputs, {"logits": np.ones((1, 3, 8))})
