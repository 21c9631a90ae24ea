"""The Llama family against Hugging Face, and the pitfalls a port meets, measured.

    python benchmarks/llama_family.py

For each of Llama, Mistral, Qwen2, Gemma and GPT-NeoX, a tiny random checkpoint written by
transformers' own ``save_pretrained`` (no hub is reachable) with that family's knobs (grouped or
multi-query attention, a ``head_dim`` override, tied or untied heads, a large ``rope_theta``,
partial rotation, q/k/v-only biases, Gemma's ``1 + w`` norms) is imported and run:

* ``conformance``: every default target of every installed backend against the checkpoint's own
  Hugging Face class (``run_case`` with ``reference="huggingface"``), float64 and float32,
  outputs and gradients: the worst max relative error, between targets and against Hugging
  Face; greedy ``generate()`` of Hugging Face (float64) against every backend.
* ``pitfalls``: what Hugging Face computes in float32 inside a float64 model (its unchanged
  float64 logits against exact float64), and how far the logits move when a port rotates in
  the other RoPE convention (half vs interleaved), with another base, or drops Llama 3's
  frequency scaling.

``benchmarks/figures.py --only llama`` writes both tables into docs/conformance.md and
docs/pitfalls.md.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conformance"))
from test_llama_family import FAMILIES, PROMPT, hf_model  # noqa: E402  (the suite's checkpoints)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), np.abs(b).max()))


def measure() -> tuple[list[list[str]], list[list[str]]]:
    """``(conformance rows, pitfall rows)``: one row per family."""
    import torch
    import transformers

    from xformer import ModelSpec, from_pretrained
    from xformer.backend import get_backend
    from xformer.conformance import Case, default_targets, run_case, run_generation
    from xformer.reference import forward
    from xformer.spec import LLAMA3_ROPE_FIELDS

    targets = default_targets()
    one_per_backend = [t for t in targets if t.mode == get_backend(t.backend).modes[0]]
    conf, pits = [], []
    for family in FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            hf_model(family).save_pretrained(tmp)
            spec, weights = from_pretrained(tmp)
            hf = transformers.AutoModelForCausalLM.from_pretrained(
                tmp, dtype=torch.float64).eval()
        ids = np.random.default_rng(0).integers(0, spec.vocab_size, (3, 10))
        mask = np.ones((3, 10), np.int64)
        mask[1, 7:] = 0
        cells = []
        for dtype in ("float64", "float32"):
            case = Case.make(spec, dtype=dtype, weights=weights, input_ids=ids,
                             attention_mask=mask, model_type=family, name=f"{family}-{dtype}")
            report = run_case(case, targets, reference="huggingface")
            ref = [d for d in report.diffs if "huggingface" in (d.a, d.b)]
            pair = [d for d in report.diffs if "huggingface" not in (d.a, d.b)]
            cells += [max(d.max_rel for d in pair), max(d.max_rel for d in ref)]
        with torch.no_grad():
            expect = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                                 attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long)
                                 )[0, len(PROMPT):].tolist()
        got = run_generation(spec, weights, np.array([PROMPT]), one_per_backend,
                             dtype="float64", max_new_tokens=8)
        same = sum(rows[0] == expect for rows in got.values())
        conf.append([family, *(f"{x:.1e}" for x in cells), f"{same}/{len(got)}"])

        # pitfalls: Hugging Face's own float64 model (float32 inside) vs exact float64 numpy
        inputs = {"input_ids": ids[:1], "attention_mask": mask[:1]}
        exact = forward(spec, weights, inputs)["logits"]
        with torch.no_grad():
            hf64 = hf(input_ids=torch.as_tensor(ids[:1])).logits.numpy()
        style = "interleaved" if spec.rope_style == "half" else "half"
        swapped = forward(spec.replace(rope_style=style), weights, inputs)["logits"]
        theta = forward(spec.replace(rope_theta=spec.rope_theta * 2), weights,
                        inputs)["logits"]
        unscaled = "n/a"
        if spec.rope_scaling != "none":
            plain = spec.replace(rope_scaling="none", **{
                f: ModelSpec.__dataclass_fields__[f].default for f in LLAMA3_ROPE_FIELDS})
            unscaled = f"{_rel(forward(plain, weights, inputs)['logits'], exact):.1e}"
        pits.append([family, f"{_rel(hf64, exact):.1e}", f"{_rel(swapped, exact):.1e}",
                     f"{_rel(theta, exact):.1e}", unscaled])
    return conf, pits


if __name__ == "__main__":
    conf, pits = measure()
    for row in conf + pits:
        print(" | ".join(row), file=sys.stdout)
    sys.exit(0)
