"""The Llama family's checkpoints (issue #9): a Hugging Face ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``, ``GemmaForCausalLM`` and ``GPTNeoXForCausalLM``
directory each (random weights from a random config, written by transformers' own
``save_pretrained``: no hub is reachable), with unusual but legal knobs: grouped and
multi-query attention, a ``head_dim`` override, tied and untied heads, a large ``rope_theta``,
partial rotation, Llama 3's frequency scaling, biases on q/k/v only, Gemma's ``1 + w`` norms.

For each family: ``xformer compare --model DIR`` exits 0 with the checkpoint's own Hugging
Face class as the reference (outputs and gradients, float64 and float32); ``xformer generate
--json`` prints, on every backend, the ids of the Hugging Face model's own ``generate()``
(greedy); beam search gives the same rows on every backend.
"""

import json

import numpy as np
import pytest

from xformer import from_pretrained
from xformer.backend import get_backend
from xformer.cli import main
from xformer.conformance import run_generation

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

COMMON = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
              max_position_embeddings=32, bos_token_id=1, eos_token_id=95)
#: family -> (config class, model class, config knobs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",  # Llama 3's frequency scaling, all 3 bands
              dict(num_attention_heads=4, num_key_value_heads=2,
                   rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=4.0,
                                        low_freq_factor=1.0, high_freq_factor=4.0,
                                        original_max_position_embeddings=8),
                   tie_word_embeddings=True, attention_bias=True, mlp_bias=True,
                   rms_norm_eps=1e-5)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                     sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-6)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6,
                   tie_word_embeddings=True, rms_norm_eps=1e-6)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM",
              dict(num_attention_heads=2, num_key_value_heads=1, head_dim=24,
                   hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(num_attention_heads=4, rotary_pct=0.5, use_parallel_residual=True,
                      tie_word_embeddings=False, layer_norm_eps=1e-5)),
}
PROMPT = [5, 17, 33, 8]
MAX_NEW = 8


def hf_model(family, dtype=None):
    """The family's tiny ``*ForCausalLM`` (random weights; norm scales moved off their init).
    Also the checkpoints of ``benchmarks/llama_family.py``."""
    import torch
    import transformers

    dtype = dtype or torch.float32
    config_cls, model_cls, knobs = FAMILIES[family]
    torch.manual_seed(sum(map(ord, family)))
    config = getattr(transformers, config_cls)(**COMMON, **knobs)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():  # transformers' init (std 0.02 everywhere) leaves the residual
        # stream ~ the token's embedding, so a tied model greedily repeats its last token, which
        # any port, right or wrong, reproduces: the layers get 1/sqrt(fan_in) weights
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
            elif "embed" not in name and "lm_head" not in name:
                p.normal_(0.0, p.shape[-1] ** -0.5)
    return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    model = hf_model(family)
    path = tmp_path_factory.mktemp(family)
    model.save_pretrained(path)
    return family, path


def test_import_reads_the_family(checkpoint):
    family, path = checkpoint
    spec, weights = from_pretrained(path)
    assert spec.architecture == "decoder" and spec.positional == "rope"
    assert spec.rope_style == "half"  # Hugging Face's rotate_half convention
    knobs = FAMILIES[family][2]
    assert spec.kv_heads == knobs.get("num_key_value_heads", knobs["num_attention_heads"])
    if "head_dim" in knobs:
        assert spec.d_head == knobs["head_dim"]
    assert spec.norm == ("layernorm" if family == "gpt_neox" else "rmsnorm")
    assert spec.parallel_residual == (family == "gpt_neox")
    assert spec.norm_scale_offset == (1.0 if family == "gemma" else 0.0)
    assert spec.rope_scaling == ("llama3" if family == "llama" else "none")
    assert set(weights) == set(spec.parameter_shapes())


def test_compare_model_dir_exits_0_against_its_huggingface_class(checkpoint, tmp_path,
                                                                  capsys):
    family, path = checkpoint
    out = tmp_path / "report.json"
    code = main(["compare", "--model", str(path), "--dtype", "both", "--repeats", "0",
                 "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
    doc = json.loads(out.read_text())
    assert doc["ok"] is True
    assert "huggingface" in json.dumps(doc)


def _cli_generate(path, backend, dtype, capsys):
    code = main(["generate", "--backend", backend, "--model", str(path), "--prompt-ids",
                 ",".join(map(str, PROMPT)), "--max-new-tokens", str(MAX_NEW), "--dtype",
                 dtype, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    return json.loads(captured.out.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("backend", ["torch", "tensorflow", "mxnet"])
def test_generate_equals_huggingface_generate(checkpoint, backend, dtype, capsys):
    """Greedy ids of `xformer generate --json` = Hugging Face's own `generate()` in the same
    dtype (float32: the CLI's default; these checkpoints have no step near a tie)."""
    family, path = checkpoint
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype)).eval()
    with torch.no_grad():
        hf = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_NEW, do_sample=False,
                            num_beams=1, attention_mask=torch.ones(1, len(PROMPT),
                                                                    dtype=torch.long))
    expected = hf[0, len(PROMPT):].tolist()
    assert len(expected) == MAX_NEW and len(set(expected)) > 1  # not a degenerate repeat
    got = _cli_generate(path, backend, dtype, capsys)
    assert got == expected, f"{family} on {backend}: {got} != Hugging Face {expected}"


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_identical_across_backends(checkpoint, num_beams, targets):
    family, path = checkpoint
    spec, weights = from_pretrained(path)
    prompts = np.random.default_rng(1).integers(3, spec.vocab_size, (2, 4))
    one_per_backend = [t for t in targets if t.mode == get_backend(t.backend).modes[0]]
    got = run_generation(spec, weights, prompts, one_per_backend, dtype="float64",
                         max_new_tokens=8, num_beams=num_beams)
    first = next(iter(got.values()))
    assert len(got) == len(one_per_backend) and all(len(s) >= 1 for s in first)
    for label, seqs in got.items():
        assert seqs == first, f"{family} {label}: {seqs} != {first}"
