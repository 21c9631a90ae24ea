"""Data-parallel training, measured (issue #12): conformance with 4 workers, and scaling.

    python benchmarks/distributed.py [--backends torch,tensorflow,mxnet] [--quick]

1. **Conformance, 4 workers**: for every installed backend, ``xformer train --nproc 4`` against
   ``--nproc 1`` on the same global batch (float64, 5 AdamW steps with a linear warm-up,
   global-norm clipping, 2 accumulated micro-batches of 8 rows, dropout 0.1 on the stream): the
   worst relative error of the final parameters and of the per-step losses; and every backend's
   4-worker weights against the first backend's.
2. **Scaling**: samples/s of ``xformer train --nproc N`` for N = 1, 2, 4 (float32, a GPT-2-like
   decoder d_model 128, 2 layers, T 64, global batch 16, 12 steps; the first step, which
   compiles and warms up, is not counted), from the per-step times rank 0 reports
   (``--json``: ``steps[k].seconds``), so start-up and imports are not counted either; the
   best of 2 alternating rounds. Each worker gets ``OMP_NUM_THREADS = cores / N`` (as
   torchrun sets it).

This machine has 2 cores: with 2 workers each gets one core, with 4 two workers share a core,
so the figures show the engines' overhead on one host, not a cluster's speed-up.
``benchmarks/figures.py --only distributed`` writes the tables into docs/distributed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "tensorflow", "mxnet")


def _run(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "xformer", *map(str, argv), "--json"],
                          capture_output=True, text=True, timeout=1800,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if done.returncode != 0:
        raise RuntimeError(f"xformer {' '.join(map(str, argv[:8]))} ... failed: "
                           f"{done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout)


def conformance(backends, tmp: Path) -> list[dict]:
    from safetensors.numpy import load_file

    from xformer import ModelSpec, init_weights, save_pretrained
    from xformer.conformance.training import _worst

    spec = ModelSpec(architecture="decoder", vocab_size=50, d_model=16, n_heads=2, d_ff=32,
                     n_layers=2, max_len=16, head="lm", positional="learned",
                     type_vocab_size=0, dropout=0.1, bos_token_id=0, eos_token_id=0)
    save_pretrained(tmp / "start", spec, init_weights(spec, seed=0, dtype="float64"))
    np.save(tmp / "tokens.npy", np.random.default_rng(1).integers(0, 50, (48, 12)))
    common = ["--model", tmp / "start", "--data", tmp / "tokens.npy", "--steps", 5,
              "--dtype", "float64", "--optimizer", "adamw", "--lr", "1e-2", "--schedule",
              "linear", "--warmup-steps", 1, "--clip-grad-norm", 1.0, "--batch-size", 8,
              "--grad-accum", 2, "--dropout", "stream"]
    rows, first = [], None
    for be in backends:
        runs = {}
        for n in (1, 4):
            out = tmp / f"{be}-{n}"
            doc = _run(["train", *common, "--backend", be, "--nproc", n, "--out", out])
            runs[n] = (doc, load_file(out / "model.safetensors"))
        err, where = _worst(runs[1][1], runs[4][1])
        losses = [(a["loss"], b["loss"]) for a, b in zip(runs[1][0]["steps"],
                                                          runs[4][0]["steps"])]
        loss_err = max(abs(a - b) / abs(a) for a, b in losses)
        cross = 0.0
        if first is None:
            first = (be, runs[4][1])
        else:
            cross = _worst(first[1], runs[4][1])[0]
        rows.append({"backend": be, "engine": runs[4][0]["engine"], "param_error": err,
                     "worst": where, "loss_error": loss_err, "cross_error": cross,
                     "against": first[0]})
        print(f"{be}: 4 workers vs 1: parameters {err:.1e} ({where}), loss {loss_err:.1e}, "
              f"vs {first[0]} {cross:.1e}", file=sys.stderr)
    return rows


def scaling(backends, tmp: Path, steps: int = 12, workers=(1, 2, 4),
            rounds: int = 2) -> list[dict]:
    from xformer import ModelSpec, init_weights, save_pretrained

    spec = ModelSpec(architecture="decoder", vocab_size=1000, d_model=128, n_heads=4,
                     d_ff=512, n_layers=2, max_len=64, head="lm", positional="learned",
                     type_vocab_size=0, bos_token_id=0, eos_token_id=0)
    save_pretrained(tmp / "gpt", spec, init_weights(spec, seed=0, dtype="float32"))
    np.save(tmp / "long.npy", np.random.default_rng(2).integers(0, 1000, (64, 64)))
    batch = 16
    rows = []
    for be in backends:
        best: dict[int, tuple[float, str]] = {}
        for _ in range(rounds):  # alternating, best of the rounds (this machine's noise)
            for n in workers:
                doc = _run(["train", "--model", tmp / "gpt", "--data", tmp / "long.npy",
                            "--steps", steps, "--batch-size", batch, "--backend", be,
                            "--nproc", n, "--dropout", "off", "--out", tmp / f"s-{be}-{n}"])
                timed = [s["seconds"] for s in doc["steps"][1:]]
                rate = batch * len(timed) / sum(timed)
                best[n] = max(best.get(n, (0.0, "")), (rate, doc["engine"] or ""))
        for n in workers:
            rate, engine = best[n]
            rows.append({"backend": be, "engine": engine, "workers": n,
                         "samples_per_s": rate, "speedup": rate / best[workers[0]][0]})
            print(f"{be} x{n}: {rate:.1f} samples/s ({rows[-1]['speedup']:.2f}x)",
                  file=sys.stderr)
    return rows


def measure(backends=None, quick: bool = False) -> dict:
    from xformer.backend import is_installed

    backends = [b for b in (backends or BACKENDS) if is_installed(b)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        return {"conformance": conformance(backends, tmp),
                "scaling": scaling(backends, tmp, steps=4 if quick else 12,
                                   rounds=1 if quick else 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--quick", action="store_true", help="4 timed steps instead of 12")
    args = ap.parse_args()
    print(json.dumps(measure(args.backends.split(","), args.quick), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
