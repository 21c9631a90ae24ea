"""How often generation agrees across backends, float64 and float32, and how often the top two
float32 logits are within float32 noise (the figures of docs/conformance.md).

    python benchmarks/generation_agreement.py [--seeds 4]
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np


def measure(seeds: int = 4) -> list[list[str]]:
    """Rows ``[architecture, search, identical float64, identical float32, near-tie steps]``."""
    from xformer import ModelSpec, get_backend, random_weights
    from xformer.conformance import (TOLERANCES, default_targets, greedy_margins,
                                     run_generation)

    targets = [t for t in default_targets() if t.mode == get_backend(t.backend).modes[0]]
    noise = 2 * TOLERANCES["float32"].output
    out = []
    for arch, preset in (("decoder", "gpt2-tiny"), ("encoder-decoder", "vaswani-tiny")):
        spec = ModelSpec.preset(preset).replace(vocab_size=50, max_len=24, bos_token_id=0,
                                                eos_token_id=1)
        for beams in (1, 3):
            same = {"float64": 0, "float32": 0}
            rows = ties = steps = 0
            for seed in range(seeds):
                weights = random_weights(spec, seed=seed)
                prompts = np.random.default_rng(seed).integers(2, 50, (6, 3))
                for dtype in same:
                    got = run_generation(spec, weights, prompts, targets, dtype=dtype,
                                         max_new_tokens=12, num_beams=beams)
                    seqs = list(got.values())
                    same[dtype] += sum(all(s[r] == seqs[0][r] for s in seqs)
                                       for r in range(len(prompts)))
                    if dtype == "float64" and beams == 1:
                        margins = greedy_margins(spec, weights, prompts, seqs[0])
                        ties += sum(int((m < noise).sum()) for m in margins)
                        steps += sum(len(m) for m in margins)
                rows += len(prompts)
            out.append([arch, "greedy" if beams == 1 else f"beam {beams}",
                        f"{same['float64']}/{rows}", f"{same['float32']}/{rows}",
                        f"{ties}/{steps}" if beams == 1 else ""])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=4)
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    from rich.console import Console
    from rich.table import Table

    from xformer.conformance import default_targets

    table = Table(title=f"generation across {', '.join(t.label for t in default_targets())}: "
                        f"rows whose token sequences are identical on every backend")
    for col in ("architecture", "search", "float64", "float32", "float32 near-tie steps"):
        table.add_column(col)
    for row in measure(args.seeds):
        table.add_row(*row)
    Console().print(table)


if __name__ == "__main__":
    main()
