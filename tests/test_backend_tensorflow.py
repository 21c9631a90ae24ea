"""What only the TensorFlow (Keras 3) backend has: the variable table (Keras kernels are stored
transposed), every sublayer's dtype policy, the sinusoidal table as a constant, exactly composed
activations, ``get_config`` round trips, ``tf.function`` retracing with relaxed shapes, and the
native layers' own helpers.

The Backend contract itself is tested on every backend in test_backends.py,
test_backends_decoder.py and test_trace.py; helpers and bounds are in backend_helpers.py.
"""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import xformer  # noqa: E402
from xformer import InputError  # noqa: E402
from xformer.reference import forward as reference_forward  # noqa: E402
from xformer_tensorflow import modules  # noqa: E402
from backend_helpers import SPECS, built, covering_params, make_inputs, rel  # noqa: E402

BE = xformer.get_backend("tensorflow")
tf.get_logger().setLevel("ERROR")  # per-model tf.functions trip the retracing warning


@pytest.mark.parametrize("spec", covering_params())
def test_variable_table_and_dtypes(spec):
    """The walk reaches every trainable variable exactly once (a tied head or a shared table
    adds none) and nothing else holds state; kernels are stored transposed; every sublayer has
    the model's dtype policy."""
    model = BE.build(spec, "float64")
    cls = {"encoder": modules.EncoderModel, "decoder": modules.DecoderModel,
           "encoder-decoder": modules.EncoderDecoderModel}[spec.architecture]
    assert isinstance(model, cls) and isinstance(model, keras.Model)
    assert model.spec == spec and model.dtype == "float64"
    table = BE.variables(model)
    assert list(table) == [p.name for p in spec.parameters()]
    assert sorted(id(v) for v, _ in table.values()) == sorted(id(v) for v in
                                                              model.trainable_variables)
    assert model.non_trainable_variables == []
    for p in spec.parameters():
        var, transposed = table[p.name]
        assert tuple(var.shape) == (p.shape[::-1] if transposed else p.shape), p.name
        assert var.dtype == "float64", p.name
    layers = model._flatten_layers(include_self=True, recursive=True)
    assert len(layers) > 10 * spec.n_layers  # every sublayer, not only the top ones
    assert {layer.dtype_policy.name for layer in layers} == {"float64"}


def test_sinusoidal_table_is_a_constant_not_a_weight():
    spec = SPECS["vaswani_enc"]
    model = BE.build(spec, "float64")
    assert all("position" not in v.path for v in model.variables)
    x = np.zeros((1, 5, spec.d_model))
    emb = model.embeddings(inputs_embeds=tf.constant(x)).numpy()
    np.testing.assert_array_equal(emb[0], xformer.spec.sinusoidal_table(spec.max_len,
                                                                        spec.d_model)[:5])


def test_activations_are_composed_exactly():
    from scipy.special import erf

    x = np.linspace(-6, 6, 1001)
    want = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    assert rel(modules.gelu(tf.constant(x)).numpy(), want) <= 1e-15
    want = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
    assert rel(modules.gelu_tanh(tf.constant(x)).numpy(), want) <= 1e-15
    assert modules.gelu(tf.constant(x, tf.float32)).dtype == tf.float32


@pytest.mark.parametrize("name", ["nobias", "dec_post", "vaswani"])
def test_get_config_round_trip(name):
    spec = SPECS[name]
    model, weights = built(BE, spec)
    clone = type(model).from_config(model.get_config())
    clone.build()
    assert clone.spec == spec and clone.dtype == "float64"
    BE.set_weights(clone, weights)
    inputs = make_inputs(spec)
    for k, v in BE.forward(model, inputs, mode="eager").items():
        np.testing.assert_array_equal(BE.forward(clone, inputs, mode="eager")[k], v)


@pytest.mark.parametrize("name", ["pre_ln", "gpt2", "vaswani"])
def test_function_mode_relaxes_shapes_and_caches(name):
    """``reduce_retracing``: the third call with new lengths traces with ``T = None``; later
    lengths reuse it (at most 3 traces)."""
    spec = SPECS[name]
    model, weights = built(BE, spec, fresh=True)
    for s, t in ((7, 6), (5, 4), (6, 6), (9, 3)):
        inputs = make_inputs(spec, s=s, t=t)
        ref = reference_forward(spec, weights, inputs, "float64")
        out = BE.forward(model, inputs, mode="function")
        for k in ref:
            assert rel(out[k], ref[k]) <= 1e-12, (s, t, k)
    fn = BE._compiled(model, "forward", "function")
    assert fn is BE._compiled(model, "forward", "function")
    assert fn.experimental_get_tracing_count() <= 3


def test_native_encoder_decoder():
    """A shared table is one variable (the target side has none and says so); a precomputed
    ``encoder_outputs`` gives the same logits."""
    spec = SPECS["vaswani"]
    model, _ = built(BE, spec)
    assert model.decoder_embeddings.word_embeddings is None
    src, tgt = np.array([[3, 4, 5, 6]]), np.array([[0, 7, 8]])
    full = model(input_ids=src, decoder_input_ids=tgt)
    reused = model(attention_mask=np.ones((1, 4)), decoder_input_ids=tgt,
                   encoder_outputs=full["encoder_last_hidden_state"])
    np.testing.assert_array_equal(reused["logits"].numpy(), full["logits"].numpy())
    with pytest.raises(InputError, match="shares the source token table"):
        model.decoder_embeddings(input_ids=tgt)


def test_causal_mask_and_past_length():
    allowed = modules.causal_allowed(2, 5, "float64").numpy()
    np.testing.assert_array_equal(allowed, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert modules.past_length(None) == 0
    assert modules.past_length(((tf.zeros((1, 2, 7, 4)), tf.zeros((1, 2, 7, 4))),)) == 7
