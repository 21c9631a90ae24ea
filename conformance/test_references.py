"""Our torch backend against PyTorch's own nn.TransformerEncoderLayer (same weights), and every
backend against Hugging Face BertModel on BERT-shaped specs (outputs and gradients)."""

import pytest

from conftest import assert_conformant
from xformer import ModelSpec
from xformer.conformance import Case, Target, run_case

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("activation", ["relu", "gelu", "gelu_tanh"])
def test_torch_matches_nn_transformer_encoder_layer(norm_position, activation):
    spec = ModelSpec(vocab_size=60, d_model=16, n_heads=4, d_ff=24, n_layers=2, max_len=12,
                     norm_position=norm_position, activation=activation, norm_eps=1e-5,
                     final_norm=norm_position == "pre", head="pooler")
    case = Case.make(spec, seed=7, dtype="float64")
    report = run_case(case, [Target("torch", "eager")], reference="torch.nn")
    assert report.reference.grads, "the nn reference must give gradients"
    assert_conformant(report)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_every_backend_matches_huggingface_bert(dtype, targets):
    pytest.importorskip("transformers")
    spec = ModelSpec.preset("bert-tiny").replace(vocab_size=200, max_len=16, d_model=32, d_ff=64)
    case = Case.make(spec, seed=11, dtype=dtype)
    report = run_case(case, targets, reference="huggingface")
    assert set(report.reference.grads) >= {p.name for p in spec.parameters()}
    assert_conformant(report)


@pytest.mark.parametrize("arch", ["decoder", "encoder-decoder"])
@pytest.mark.parametrize("norm_position", ["post", "pre"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_torch_matches_pytorch_own_layers_for_decoders(arch, norm_position, activation):
    """Decoder-only: nn.TransformerEncoderLayer + causal mask; encoder-decoder: nn.Transformer
    (nn.TransformerDecoderLayer inside), same weights, outputs and every gradient."""
    spec = ModelSpec(architecture=arch, vocab_size=60, d_model=16, n_heads=4, d_ff=24,
                     n_layers=2, max_len=12, norm_position=norm_position,
                     activation=activation, norm_eps=1e-5, type_vocab_size=0,
                     embedding_norm=False, final_norm=norm_position == "pre",
                     embed_scale=arch == "encoder-decoder", head="lm",
                     tie_embeddings=arch == "decoder",
                     positional="sinusoidal" if arch == "encoder-decoder" else "learned",
                     **({"n_decoder_layers": 3} if arch == "encoder-decoder" else {}))
    case = Case.make(spec, seed=3, dtype="float64")
    report = run_case(case, [Target("torch", "eager")], reference="torch.nn")
    assert set(report.reference.grads) >= {p.name for p in spec.parameters()}
    assert_conformant(report)
