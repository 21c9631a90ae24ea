"""GPT-2 checkpoints: a Hugging Face GPT-2 directory (random weights, written by
transformers' own save_pretrained, since no hub is reachable) imported into the canonical
layout, run on every backend and compared with GPT2LMHeadModel, outputs and gradients."""

import numpy as np
import pytest

from conftest import assert_conformant
from xformer import from_pretrained
from xformer.conformance import Case, run_case

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def gpt2_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=211, n_positions=24, n_embd=48, n_layer=2,
                                     n_head=4, tie_word_embeddings=request.param,
                                     bos_token_id=210, eos_token_id=210)
    model = transformers.GPT2LMHeadModel(config)
    path = tmp_path_factory.mktemp("gpt2")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gpt2_checkpoint_conforms_on_every_target(gpt2_dir, dtype, targets):
    spec, weights = from_pretrained(gpt2_dir)
    assert spec.architecture == "decoder" and spec.activation == "gelu_tanh"
    ids = np.random.default_rng(0).integers(0, spec.vocab_size, (3, 10))
    mask = np.ones((3, 10), np.int64)
    mask[1, 7:] = 0  # right padding: the first token of every row is real
    case = Case.make(spec, dtype=dtype, weights=weights, input_ids=ids, attention_mask=mask,
                     name=f"gpt2-{dtype}")
    report = run_case(case, targets, reference="huggingface")
    assert report.reference.label == "huggingface"
    assert "logits" in report.reference.outputs
    assert_conformant(report)
