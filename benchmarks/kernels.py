"""The kernel-level measurements behind issue #11's torch choices (docs/pitfalls.md, region
``kernels``), float32, 2 threads:

* batch-1 matrix-vector products (a decoding step) and 1024-row products (a full pass) with
  the weight in ``nn.Linear``'s ``(out, in)`` storage against ``(in, out)`` storage, for the
  GPT-2 small projections and its tied ``(50257, 768)`` LM head (weights cycled through so they
  are read from memory, as in a decoding step);
* the token table's lookup, forward + backward, contiguous against stored transposed (the
  MiniLM table, 8 x 128 ids);
* the fused ``F.scaled_dot_product_attention`` inference path against the written-out one,
  each against the float64 numpy reference (all-MiniLM-L6-v2 and GPT-2 shapes, one row padded
  at the end and one fully padded);
* one encoder layer's forward (xformer and ``nn.TransformerEncoderLayer``) with glibc's
  default ``malloc`` and with its mmap/trim thresholds raised, each in a fresh process.

    python benchmarks/kernels.py
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time


def _median_ms(fn, rounds: int = 9, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        times.append((time.perf_counter() - t0) / reps)
    return statistics.median(times) * 1e3


def storage_ratios() -> list[list[str]]:
    """``[product, rows, (out, in) ms, (in, out) ms, ratio]`` for each projection shape."""
    import torch
    import torch.nn.functional as F

    out = []
    for label, (i, o), copies in (("768 -> 3072 (expanding)", (768, 3072), 16),
                                  ("768 -> 768 (square)", (768, 768), 48),
                                  ("3072 -> 768 (contracting)", (3072, 768), 16),
                                  ("768 -> 50257 (tied LM head)", (768, 50257), 1)):
        weights = [torch.randn(o, i) for _ in range(copies)]
        stored = [w.t().contiguous().t() for w in weights]
        for rows in (1, 1024):
            x = torch.randn(rows, i)

            def run(ws):
                def f():
                    for w in ws:
                        F.linear(x, w)
                return f
            with torch.no_grad():
                ratios, a_ms, b_ms = [], [], []
                for _ in range(5):  # alternate the two storages
                    a = _median_ms(run(weights), rounds=3, reps=1 if rows > 1 else 3)
                    b = _median_ms(run(stored), rounds=3, reps=1 if rows > 1 else 3)
                    ratios.append(a / b)
                    a_ms.append(a / copies)
                    b_ms.append(b / copies)
            out.append([label, str(rows), f"{statistics.median(a_ms):.2f}",
                        f"{statistics.median(b_ms):.2f}", f"{statistics.median(ratios):.2f}x"])
    return out


def lookup_ms() -> tuple[float, float]:
    """Token-table lookup, forward + backward, ms: contiguous ``(V, D)`` and ``(D, V)``-stored."""
    import torch
    import torch.nn.functional as F

    ids = torch.randint(0, 30522, (8, 128))
    tables = [torch.nn.Parameter(torch.randn(30522, 384)),
              torch.nn.Parameter(torch.randn(384, 30522).t())]

    def step(w):
        def run():
            w.grad = None
            F.embedding(ids, w).sum().backward()
        return run
    return tuple(_median_ms(step(w)) for w in tables)


def sdpa_errors() -> list[list[str]]:
    """``[model, output, fused error, written-out error]``: float32 against float64 numpy."""
    import numpy as np
    import torch

    from xformer import ModelSpec, get_backend, random_weights
    from xformer.reference import forward as reference

    backend = get_backend("torch")
    out = []
    for preset in ("minilm-l6", "gpt2-tiny"):
        spec = ModelSpec.preset(preset)
        weights = random_weights(spec, seed=0)
        rng = np.random.default_rng(0)
        mask = np.ones((3, 16), np.int64)
        mask[1, 10:] = 0
        mask[2] = 0
        inputs = {"input_ids": rng.integers(0, spec.vocab_size, (3, 16)),
                  "attention_mask": mask}
        want = reference(spec, weights, inputs)
        model = backend.build(spec, "float32")
        backend.set_weights(model, weights)
        model.eval()
        tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
        with torch.no_grad():
            fused = model(**tensors)
        written = model(**tensors)  # autograd on: written out
        for key in want:
            scale = np.abs(want[key]).max()
            err = [np.abs(o[key].detach().numpy() - want[key]).max() / scale
                   for o in (fused, written)]
            out.append([preset, key, *(re.sub(r"e([-+])0(\d)", r"e\1\2", f"{x:.1e}")
                                       for x in err)])
    return out


_LAYER = """
import json, statistics, sys, time, torch
sys.path.insert(0, {bench!r})
import peers
from xformer_torch.modules import EncoderLayer
torch.set_num_threads(2)
x = torch.randn(8, 128, 256)
ours = EncoderLayer(peers._spec()).eval()
peer = torch.nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, activation="gelu",
                                        layer_norm_eps=1e-5, batch_first=True).eval()
with torch.no_grad():
    print(json.dumps(peers.interleaved(lambda: ours(x), lambda: peer(x), 9, 10)))
"""


def allocator() -> list[dict]:
    """The layer-forward timing in a fresh process, glibc defaults and raised thresholds."""
    out = []
    bench = os.path.dirname(os.path.abspath(__file__))
    for label, extra in (("default", {}),
                         ("MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 1e8",
                          {"MALLOC_MMAP_THRESHOLD_": "100000000",
                           "MALLOC_TRIM_THRESHOLD_": "100000000"})):
        env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
        r = subprocess.run([sys.executable, "-c", _LAYER.format(bench=bench)], env=env,
                           capture_output=True, text=True, check=True)
        out.append({"malloc": label, **json.loads(r.stdout.strip().splitlines()[-1])})
    return out


def measure() -> dict:
    import torch

    torch.set_num_threads(2)
    return {"storage": storage_ratios(), "lookup": lookup_ms(), "sdpa": sdpa_errors(),
            "allocator": allocator()}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    print(json.dumps(measure(), indent=1))
