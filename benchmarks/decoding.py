"""Cached greedy decoding, tokens per second, on every backend against Hugging Face
``generate()`` (issue #11).

    python benchmarks/decoding.py [--rounds 6] [--new-tokens 64] [--prompt 32] [--json FILE]
    python benchmarks/decoding.py --framework torch      # one framework, in this process

The GPT-2 small shape (``gpt2-small``: 12 layers, d_model 768, 12 heads, vocabulary 50257,
tanh GELU), float32, batch 1, a 32-token prompt, 64 new tokens (EOS never stops a row early on
either side), random weights (seed 0). The peer is ``transformers.GPT2LMHeadModel`` loaded
with ``from_pretrained`` from the same weights exported by ``xformer.convert.export_gpt2``, so it
runs with Hugging Face's defaults (eval mode, SDPA attention, its dynamic cache), and
``generate(do_sample=False, min_new_tokens=N, max_new_tokens=N)``.

Each framework runs in its own process with the peer beside it (the peer is a torch model, so
the TensorFlow and MXNet processes import torch as well; torch is idle while they decode).
Timing is interleaved: each round times one whole ``xformer generate`` on the backend and
one Hugging Face ``generate``, in alternating order; the figure is the median over rounds of ``xformer tokens/s ÷
Hugging Face tokens/s`` (> 1: xformer is faster). Every backend decodes in its preferred
mode (torch eager, TensorFlow ``tf.function``, MXNet imperative blocks) through the public
``Backend.generate``, protocol included. The generated ids are compared too, and the row
says how many of the ``N`` tokens agree with Hugging Face's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FRAMEWORKS = ("torch", "tensorflow", "mxnet")


def bench(framework: str, rounds: int, new_tokens: int, prompt_len: int, threads: int
          ) -> list[dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np

    from xformer import ModelSpec, get_backend, random_weights
    from xformer.convert import export_gpt2

    spec = ModelSpec.preset("gpt2-small")
    weights = random_weights(spec, seed=0)
    prompt = np.random.default_rng(0).integers(0, spec.vocab_size - 1, (1, prompt_len))
    backend = get_backend(framework)
    if framework == "tensorflow":
        tf = backend.tf
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:
            pass
    model = backend.build(spec, "float32")
    backend.set_weights(model, weights)

    import torch
    import transformers

    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        export_gpt2(tmp, spec, weights)
        peer = transformers.GPT2LMHeadModel.from_pretrained(tmp, torch_dtype=torch.float32)
    peer.eval()
    peer_ids = torch.from_numpy(prompt)
    # a token no greedy step can pick as a stop: both sides decode exactly new_tokens
    never = spec.vocab_size - 1

    def ours() -> list[int]:
        return backend.generate(model, prompt, max_new_tokens=new_tokens,
                                eos_token_id=None)[0]

    def theirs() -> list[int]:
        with torch.no_grad():
            out = peer.generate(peer_ids, attention_mask=torch.ones_like(peer_ids),
                                do_sample=False, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, pad_token_id=never,
                                eos_token_id=never)
        return out[0, prompt_len:].tolist()

    ours()  # warm-up: traces, allocator, caches
    theirs()
    ratios, mine, peer_rate = [], [], []
    for r in range(rounds):  # alternate which side goes first, against order effects
        first, second = (ours, theirs) if r % 2 == 0 else (theirs, ours)
        t0 = time.perf_counter()
        a = first()
        t1 = time.perf_counter()
        b = second()
        t2 = time.perf_counter()
        (got, t_ours), (ref, t_peer) = (((a, t1 - t0), (b, t2 - t1)) if r % 2 == 0
                                        else ((b, t2 - t1), (a, t1 - t0)))
        mine.append(len(got) / t_ours)
        peer_rate.append(len(ref) / t_peer)
        ratios.append(mine[-1] / peer_rate[-1])
    agree = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got),
                                                                                len(ref)))
    return [{"framework": framework, "mode": backend.preferred_mode,
             "peer": "HF GPT2LMHeadModel.generate", "new_tokens": new_tokens,
             "prompt": prompt_len, "ratio": statistics.median(ratios),
             "xformer_tok_s": statistics.median(mine), "peer_tok_s": statistics.median(peer_rate),
             "same_tokens": f"{agree}/{len(ref)}", "ratios": ratios}]


def measure(rounds: int = 6, new_tokens: int = 64, prompt_len: int = 32, threads: int = 2,
            frameworks=FRAMEWORKS) -> list[dict]:
    """Every framework, each in a fresh process of this script."""
    rows = []
    for name in frameworks:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            r = subprocess.run([sys.executable, __file__, "--framework", name, "--rounds",
                                str(rounds), "--new-tokens", str(new_tokens), "--prompt",
                                str(prompt_len), "--threads", str(threads), "--json", str(out)],
                               capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                rows.append({"framework": name, "skipped": (r.stderr.strip().splitlines()
                                                            or ["failed"])[-1]})
                continue
            rows += json.loads(out.read_text())
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=FRAMEWORKS, help="one framework, in this process")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    if args.framework:
        rows = bench(args.framework, args.rounds, args.new_tokens, args.prompt, args.threads)
    else:
        rows = measure(args.rounds, args.new_tokens, args.prompt, args.threads)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    for r in rows:
        if "skipped" in r:
            print(f"{r['framework']}: skipped ({r['skipped']})")
        else:
            print(f"{r['framework']}/{r['mode']} vs {r['peer']}: {r['ratio']:.2f}x the peer's "
                  f"tokens/s ({r['xformer_tok_s']:.1f} vs {r['peer_tok_s']:.1f}), same tokens "
                  f"{r['same_tokens']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
