"""Speed of one encoder layer on every backend and mode, against PyTorch's own layer.

The configuration of docs/design.md §7: d_model 256, 4 heads, d_ff 1024, T 128, B 8, float32,
forward + backward, median of 20 steps after 3 warm-up steps. Steps go through the Backend
protocol (`forward_backward`: numpy in, gradients of every parameter out as numpy), which is what
`xformer compare` times; the torch.nn row is `nn.TransformerEncoderLayer` with autograd alone.

    python benchmarks/bench_layer.py [--steps 20] [--threads 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def measure(steps: int = 20, threads: int = 2, all_modes: bool = False
            ) -> tuple[float, list[tuple[str, float]]]:
    """``(GFLOP per step, [(implementation, median seconds per step)])``."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MXNET_CPU_WORKER_NTHREADS"):
        os.environ[var] = str(threads)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    import xformer
    from xformer.conformance import Case, default_targets

    spec = xformer.ModelSpec(vocab_size=1000, d_model=256, n_heads=4, d_ff=1024, n_layers=1,
                             max_len=128, positional="sinusoidal", type_vocab_size=0,
                             embedding_norm=False, activation="gelu", norm_eps=1e-5)
    b, t, d, f = 8, 128, spec.d_model, spec.d_ff
    # forward: 4 projections + 2 FFN matmuls + QK^T and PV; backward ~2x forward
    flop = 3 * (2 * b * t * (4 * d * d + 2 * d * f) + 2 * 2 * b * t * t * d)
    case = Case.make(spec, dtype="float32", batch=b, seq_len=t, fully_padded=False)
    rows = []
    for target in default_targets(all_modes=all_modes):
        be = xformer.get_backend(target.backend)
        if target.backend == "torch":
            import torch

            torch.set_num_threads(threads)
        if target.backend == "tensorflow":
            import tensorflow as tf

            try:
                tf.config.threading.set_intra_op_parallelism_threads(threads)
            except RuntimeError:
                pass
        model = be.build(spec, "float32")
        be.set_weights(model, case.weights)
        rows.append((target.label, _time(lambda: be.forward_backward(
            model, case.inputs, case.cotangents, mode=target.mode), steps)))
    import torch
    from torch import nn

    layer = nn.TransformerEncoderLayer(d, spec.n_heads, f, dropout=0.0, activation="gelu",
                                       batch_first=True)
    x = torch.randn(b, t, d, requires_grad=True)

    def native_step():
        layer.zero_grad()
        layer(x).sum().backward()

    rows.append(("`nn.TransformerEncoderLayer` (autograd only)", _time(native_step, steps)))
    return flop / 1e9, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--all-modes", action="store_true", help="also torch compile and XLA")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    from rich.console import Console
    from rich.table import Table

    gflop, rows = measure(args.steps, args.threads, args.all_modes)
    table = Table(title=f"one encoder layer, fwd+bwd, B=8 T=128 D=256 d_ff=1024, float32, "
                        f"{args.threads} threads, median of {args.steps} ({gflop:.2f} GFLOP)")
    for col in ("implementation", "ms/step", "GFLOP/s"):
        table.add_column(col, justify="right" if col != "implementation" else "left")
    for label, sec in rows:
        table.add_row(label, f"{sec * 1e3:.1f}", f"{gflop / sec:.0f}")
    Console().print(table)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"gflop": gflop, "ms": {k: v * 1e3 for k, v in rows}}, fh, indent=2)


def _time(fn, steps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


if __name__ == "__main__":
    main()
