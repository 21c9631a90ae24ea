"""The kernel-level measurements behind issue #11's torch choices (docs/pitfalls.md, region
``kernels``), float32, 2 threads:

* batch-1 matrix-vector products (a decoding step) and 1024-row products (a full pass) with
  the weight in ``nn.Linear``'s ``(out, in)`` storage against ``(in, out)`` storage, for the
  GPT-2 small projections and its tied ``(50257, 768)`` LM head (weights cycled through so they
  are read from memory, as in a decoding step);
* a MiniLM training step with the encoder's projections in ``(out, in)`` storage (as built)
  against ``(in, out)`` storage (what decoder layers keep), interleaved, in a fresh process;
* the token table's lookup, forward + backward, contiguous against stored transposed (the
  MiniLM table, 8 x 128 ids);
* the fused ``F.scaled_dot_product_attention`` inference path against the written-out one,
  each against the float64 numpy reference (all-MiniLM-L6-v2 and GPT-2 shapes, one row padded
  at the end and one fully padded);
* one encoder layer's forward (xformer and ``nn.TransformerEncoderLayer``) with glibc's
  default ``malloc`` and with its mmap/trim thresholds raised, each in a fresh process;
* the forward of xformer's torch encoder layer and MiniLM with the FFN's GELU in place (what
  float32 inference runs, ``INPLACE_ACTIVATIONS``) against out of place, interleaved, in a
  fresh process;
* MXNet: Gluon's ``nn.LayerNorm`` (the fused operator) against xformer's float32
  ``LayerNorm`` inside ``autograd.record`` (``LayerNorm.gemm_form``), forward + backward,
  hybridized, interleaved, and both against the float64 formula (in a fresh process).

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


def _fresh_process(script: str, **env: str):
    """Run ``script`` (its ``{bench}`` filled with this folder, for ``import peers``) in a fresh
    Python process with 2 OpenMP threads plus ``env``; the JSON of its last output line."""
    bench = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", script.format(bench=bench)],
                       env={**os.environ, "OMP_NUM_THREADS": "2", **env},
                       capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


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
    from xformer_torch.modules import written_out_attention

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
        with torch.no_grad(), written_out_attention():
            written = model(**tensors)
        for key in want:
            scale = np.abs(want[key]).max()
            err = [np.abs(o[key].detach().numpy() - want[key]).max() / scale
                   for o in (fused, written)]
            out.append([preset, key, *(re.sub(r"e([-+])0(\d)", r"e\1\2", f"{x:.1e}")
                                       for x in err)])
    return out


_ACTIVATION = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import peers
from xformer_torch import modules
torch.set_num_threads(2)
kept = dict(modules.INPLACE_ACTIVATIONS)
torch.manual_seed(0)
layer = modules.EncoderLayer(peers._spec()).eval()
model = modules.EncoderModel(peers._minilm()).eval()
x = torch.randn(peers.B, peers.T, peers.D)
ids = torch.randint(0, model.spec.vocab_size, (peers.B, peers.T))

def run(call, in_place):
    def f():
        modules.INPLACE_ACTIVATIONS.clear()
        modules.INPLACE_ACTIVATIONS.update(kept if in_place else {{}})
        with torch.no_grad():
            call()
    return f
print(json.dumps({{name: peers.interleaved(run(call, True), run(call, False), 11, steps)
                  for name, call, steps in (("layer", lambda: layer(x), 5),
                                            ("minilm", lambda: model(input_ids=ids), 2))}}))
"""


def activation_in_place() -> dict[str, dict]:
    """The forward (no gradients) of xformer's encoder layer (8 x 128, d_model 256) and MiniLM
    (8 x 128 ids) with the FFN's GELU in place (``INPLACE_ACTIVATIONS``, what torch inference
    runs) against out of place, interleaved, in a fresh process (glibc's ``malloc`` adapts its
    thresholds to what a process has freed, so the effect depends on the process's history):
    ``{"layer": ..., "minilm": ...}`` as :func:`peers.interleaved` gives them (ratio = in
    place ÷ out of place)."""
    return _fresh_process(_ACTIVATION)


_TRAINING_STORAGE = """
import json, sys, torch
sys.path.insert(0, {bench!r})
import peers
from xformer_torch import modules
torch.set_num_threads(2)
torch.manual_seed(0)
spec = peers._minilm()
ours = modules.EncoderModel(spec).train()  # encoder projections in (out, in) storage
decoding = modules.EncoderModel(spec).train()
decoding.load_state_dict(ours.state_dict())
modules._decoding_storage(decoding)  # what decoder layers keep
ids = torch.randint(0, spec.vocab_size, (peers.B, peers.T))

def step(model):
    def run():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids)["pooler_output"].sum().backward()
    return run
print(json.dumps(peers.interleaved(step(ours), step(decoding), 11, 2)))
"""


def training_storage() -> dict:
    """A MiniLM training step (8 x 128 ids, forward + backward of every parameter) as built
    (encoder projections in ``nn.Linear``'s ``(out, in)`` storage) against the same model
    with its expanding and square projections in the ``(in, out)`` storage decoder layers
    keep (``_decoding_storage``), interleaved, in a fresh process: :func:`peers.interleaved`'s dict
    (ratio = ``(out, in)`` ÷ ``(in, out)``)."""
    return _fresh_process(_TRAINING_STORAGE)


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
    return [{"malloc": label, **_fresh_process(_LAYER, **extra)}
            for label, extra in (("default", {}),
                                 ("MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_ = 1e8",
                                  {"MALLOC_MMAP_THRESHOLD_": "100000000",
                                   "MALLOC_TRIM_THRESHOLD_": "100000000"}))]


_MXNET_LAYER_NORM = """
import json, sys
import numpy as np
sys.path.insert(0, {bench!r})
import peers
from xformer_mxnet import modules
mx = modules.mx
rows = []
for d in (256, 384):
    spec = peers._spec().replace(d_model=d, n_heads=4, d_ff=4 * d)
    rng = np.random.default_rng(0)
    x64 = rng.standard_normal((8, 128, d)) * 2.0 + 0.5
    cot64 = rng.standard_normal(x64.shape)
    gamma, beta = 1 + 0.2 * rng.standard_normal(d), 0.1 * rng.standard_normal(d)
    s = np.sqrt(x64.var(-1, keepdims=True) + spec.norm_eps)
    xh = (x64 - x64.mean(-1, keepdims=True)) / s
    g = cot64 * gamma
    want = [xh * gamma + beta, (g - g.mean(-1, keepdims=True)
                                - xh * (g * xh).mean(-1, keepdims=True)) / s,
            (cot64 * xh).sum((0, 1)), cot64.sum((0, 1))]
    x, cot = mx.nd.array(x64), mx.nd.array(cot64)
    x.attach_grad()
    ours = modules.LayerNorm(spec, "float32")
    native = mx.gluon.nn.LayerNorm(epsilon=spec.norm_eps, in_channels=d)
    errors = []
    for block in (native, ours):
        block.initialize()
        block.gamma.set_data(mx.nd.array(gamma))
        block.beta.set_data(mx.nd.array(beta))
        block.hybridize(static_alloc=True, static_shape=True)
        with mx.autograd.record():
            y = block(x)
        y.backward(cot)
        got = [y, x.grad, block.gamma.grad(), block.beta.grad()]
        errors.append([float(np.abs(a.asnumpy() - w).max() / np.abs(w).max())
                       for a, w in zip(got, want)])

    def step(block):
        def run():
            with mx.autograd.record():
                y = block(x)
            y.backward(cot)
            mx.nd.waitall()
        return run
    t = peers.interleaved(step(ours), step(native), 11, 10, mx.nd.waitall)
    rows.append({{"d_model": d, **t, "native_errors": errors[0], "ours_errors": errors[1]}})
print(json.dumps(rows))
"""


def mxnet_layer_norm() -> list[dict]:
    """Per width (the layer's 256, MiniLM's 384; 8 x 128 rows): forward + backward ms of
    xformer's float32 ``LayerNorm`` under ``autograd.record`` and of Gluon's fused
    ``nn.LayerNorm``, interleaved, and both one's errors (output, d x, d gamma, d beta) against
    the float64 formula. In a fresh process (MXNet beside torch)."""
    return _fresh_process(_MXNET_LAYER_NORM, MXNET_CPU_WORKER_NTHREADS="2")


def measure() -> dict:
    import torch

    torch.set_num_threads(2)
    return {"storage": storage_ratios(), "training_storage": training_storage(),
            "lookup": lookup_ms(), "sdpa": sdpa_errors(),
            "allocator": allocator(), "activation": activation_in_place(),
            "mxnet_layer_norm": mxnet_layer_norm()}


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    print(json.dumps(measure(), indent=1))
