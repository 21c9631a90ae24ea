"""xformer's native modules against each framework's own implementation of the same layer,
timed side by side (issue #11).

    python benchmarks/peers.py [--rounds 11] [--steps 5] [--threads 2] [--json FILE] [--quick]
    python benchmarks/peers.py --framework torch      # one framework, in this process

One encoder layer (d_model 256, 4 heads, d_ff 1024, exact GELU, post-LN, eps 1e-5, no dropout),
input ``(8, 128, 256)`` float32, each framework in its own process (so no framework slows
another), its preferred mode on both sides:

* torch eager: ``xformer_torch.modules.EncoderLayer`` vs ``torch.nn.TransformerEncoderLayer``
  (forward under ``no_grad`` in eval mode, where ``nn`` takes its fused fast path);
* TensorFlow ``tf.function``: ``xformer_tensorflow.modules.EncoderLayer`` vs keras-hub
  ``TransformerEncoder``;
* MXNet hybridized: ``xformer_mxnet.modules.EncoderLayer`` vs GluonNLP 0.10
  ``TransformerEncoderCell`` (``activation="gelu"``).

And the whole all-MiniLM-L6-v2 shape (BERT: 6 layers, d_model 384, 12 heads, d_ff 1536, vocabulary
30522, batch 8 × 128 token ids, pooler) against Hugging Face ``BertModel`` (torch, its default
SDPA attention), keras-hub ``BertBackbone`` (TensorFlow) and GluonNLP ``BERTModel`` (MXNet), and
on torch the GPT-2 small shape (batch 2 × 128, logits) against Hugging Face
``GPT2LMHeadModel``; random weights on both sides.

Timing is interleaved: each round times ``steps`` calls of xformer's layer, then ``steps`` of
the peer's, so load on the machine hits both alike; the figure is the median over rounds of
the per-round ratio ``xformer / peer``, with the >= 90 % confidence interval of that median
(``ratio_lo`` .. ``ratio_hi``, :func:`median_interval`; absolute times here swing ±25 % between
runs, ratios measured this way hold to a few percent). Forward alone and forward + backward
(the gradient of ``sum(output)`` w.r.t. every parameter). Peers that are not installed are skipped with the
command that installs them (``benchmarks/install_peers.sh``).

Besides each framework's preferred mode, the compiled modes on both sides: ``torch.compile``
(xformer's model and the peer each compiled, default inductor options) and TensorFlow XLA
(``tf.function(jit_compile=True)``); ``--quick`` leaves them out. Each row also gives the
rate of xformer's side as a percentage of that framework's float32 GEMM peak (a 2048³ matrix
product in the same process, the best of 5 before the rows and 5 after them, since the
machine's speed drifts over a run; model FLOPs counted as ``2 m n k`` per matrix product:
projections, FFN, attention scores and context, pooler; forward + backward = 3 × forward).

Protocol rows (``pass = "protocol"``): ``Backend.forward`` on numpy inputs (the checks, the
conversions and the numpy outputs included) against the bare module called on native tensors,
MiniLM forward, in the preferred mode; the ratio is the protocol's overhead. (torch: both sides
with the written-out attention the protocol's forward uses, ``written_out_attention``; native
inference calls the fused kernel, compared with the peers above.)
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

B, T, D, H, F = 8, 128, 256, 4, 1024
FRAMEWORKS = ("torch", "tensorflow", "mxnet")
INSTALL = "bash benchmarks/install_peers.sh"


def _spec():
    import xformer

    return xformer.ModelSpec(vocab_size=1000, d_model=D, n_heads=H, d_ff=F, n_layers=1,
                             max_len=T, type_vocab_size=0, embedding_norm=False,
                             activation="gelu", norm_eps=1e-5)


def _minilm():
    import xformer

    return xformer.ModelSpec.preset("minilm-l6")


def forward_flops(d: int, f: int, layers: int, b: int = B, t: int = T, heads_dim: int | None = None,
                  pooler: bool = False) -> float:
    """Matrix-product FLOPs of one forward pass (``2 m n k`` each): per layer the four
    ``D x D`` projections, the two FFN products and the attention scores and context
    (``2 x 2 B T^2 D``), plus the pooler's ``D x D`` on the first position."""
    per_layer = 2 * b * t * (4 * d * d + 2 * d * f) + 2 * 2 * b * t * t * d
    return layers * per_layer + (2 * b * d * d if pooler else 0)


LAYER_FLOPS = forward_flops(D, F, 1)
MINILM_FLOPS = forward_flops(384, 1536, 6, pooler=True)
#: GPT-2 small at batch GPT2_B x T: the layers and the tied LM head over 50257 tokens.
GPT2_B = 2
GPT2_FLOPS = forward_flops(768, 3072, 12, b=GPT2_B) + 2 * GPT2_B * T * 768 * 50257


def model_flops(peer: str) -> float:
    """Forward FLOPs of the model a row's peer label names."""
    return GPT2_FLOPS if "GPT-2" in peer else MINILM_FLOPS if "MiniLM" in peer else LAYER_FLOPS


def with_peak(rows: list[dict], peak) -> list[dict]:
    """Add ``gemm_peak_gflops`` and ``pct_of_peak`` (xformer's side) to every timed row.
    ``peak`` measures the GEMM peak (:func:`gemm_peak`); it ran before the rows, runs again now,
    and the faster of the two counts."""
    peak = max(peak.first, peak())
    for r in rows:
        if "xformer_ms" in r and r.get("pass") != "protocol":
            flops = model_flops(r["peer"]) * (3 if r["pass"] == "forward+backward" else 1)
            r["gflops"] = flops / (r["xformer_ms"] * 1e-3) / 1e9
            r["pct_of_peak"] = 100 * r["gflops"] / peak
        r["gemm_peak_gflops"] = peak
    return rows


def gemm_peak(matmul, sync=lambda x: x, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of the fastest of ``repeats`` ``n x n x n`` float32 matrix products
    (``matmul()`` runs one, ``sync(result)`` waits for it)."""
    sync(matmul())
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(matmul())
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def _peak(matmul, sync=lambda x: x):
    """:func:`gemm_peak` as a callable that measures again, its first measurement (made now)
    as ``.first``: for :func:`with_peak`."""
    measure = functools.partial(gemm_peak, matmul, sync)
    measure.first = measure()
    return measure


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """Distribution-free confidence interval of the median of ``values`` (order statistics,
    Conover, *Practical Nonparametric Statistics*, §3.2): the ``j``-th smallest and ``j``-th
    largest value for the largest ``j`` with ``2 P(Binomial(n, 1/2) < j) <= 1 - confidence``;
    the smallest and largest value when ``n`` is too small for that. 11 rounds: the 3rd and
    9th of 11 (93.5 %)."""
    xs, n = sorted(values), len(values)
    cut, tail = 0, math.comb(n, 0) / 2 ** n  # tail = P(X <= cut), X ~ Binomial(n, 1/2)
    while cut + 1 < n // 2 and 2 * (tail + math.comb(n, cut + 1) / 2 ** n) <= 1 - confidence:
        cut += 1
        tail += math.comb(n, cut) / 2 ** n
    return xs[cut], xs[n - 1 - cut]


def interleaved(ours, peer, rounds: int, steps: int, sync=lambda: None) -> dict[str, float]:
    """Median per-round ratio ``ours / peer`` with its >= 90 % confidence interval
    (``ratio_lo``, ``ratio_hi``: :func:`median_interval`) and median ms per call of each, after
    one untimed warm-up block of each."""
    for fn in (ours, peer):
        for _ in range(2):
            fn()
        sync()
    ratios, mine, theirs = [], [], []
    for _ in range(rounds):
        times = []
        for fn in (ours, peer):
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            times.append((time.perf_counter() - t0) / steps)
        mine.append(times[0])
        theirs.append(times[1])
        ratios.append(times[0] / times[1])
    lo, hi = median_interval(ratios)
    return {"ratio": statistics.median(ratios), "ratio_lo": lo, "ratio_hi": hi,
            "xformer_ms": statistics.median(mine) * 1e3,
            "peer_ms": statistics.median(theirs) * 1e3}


# ---------------------------------------------------------------------- one framework each
def bench_torch(rounds: int, steps: int, threads: int, quick: bool = False) -> list[dict]:
    import torch
    from torch import nn

    from xformer_torch.modules import EncoderLayer

    torch.set_num_threads(threads)
    a2, b2 = torch.randn(2048, 2048), torch.randn(2048, 2048)
    peak = _peak(lambda: a2 @ b2)
    torch.manual_seed(0)
    x = torch.randn(B, T, D)
    ours = EncoderLayer(_spec())
    peer = nn.TransformerEncoderLayer(D, H, F, dropout=0.0, activation="gelu",
                                      layer_norm_eps=1e-5, batch_first=True)
    rows = []
    for layer in (ours, peer):
        layer.eval()

    def forward(layer):
        def run():
            with torch.no_grad():
                layer(x)
        return run

    def step(layer):
        def run():
            layer.zero_grad(set_to_none=True)
            layer(x).sum().backward()
        return run

    rows.append({"framework": "torch", "mode": "eager", "peer": "nn.TransformerEncoderLayer",
                 "pass": "forward", **interleaved(forward(ours), forward(peer), rounds, steps)})
    for layer in (ours, peer):
        layer.train()  # dropout is 0: train mode only keeps nn off its inference fast path
    rows.append({"framework": "torch", "mode": "eager", "peer": "nn.TransformerEncoderLayer",
                 "pass": "forward+backward",
                 **interleaved(step(ours), step(peer), rounds, steps)})
    layer_pair = (ours, peer)
    try:
        import transformers
    except ImportError:
        return with_peak(rows, peak)
    from xformer_torch.modules import EncoderModel

    spec = _minilm()
    ids = torch.randint(0, spec.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    ours = EncoderModel(spec).train()
    cfg = transformers.BertConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                                  num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                                  intermediate_size=spec.d_ff, max_position_embeddings=spec.max_len,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    peer = transformers.BertModel(cfg).train()

    def bert(model, key):
        def run():
            model.zero_grad(set_to_none=True)
            model(input_ids=ids, attention_mask=mask)[key].sum().backward()
        return run

    def bert_forward(model, key):
        def run():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)[key]
        return run

    for name, ours_fn, peer_fn, train in (
            ("forward", bert_forward(ours, "pooler_output"),
             bert_forward(peer, "pooler_output"), False),
            ("forward+backward", bert(ours, "pooler_output"), bert(peer, "pooler_output"),
             True)):
        for m in (ours, peer):
            m.train(train)  # forward alone in inference mode, as the layer and GPT-2 rows
        rows.append({"framework": "torch", "mode": "eager", "peer": "HF BertModel (MiniLM)",
                     "pass": name, **interleaved(ours_fn, peer_fn, rounds, 2)})
    rows.append(torch_protocol(ours, ids, mask, rounds))
    gpt2 = torch_gpt2(rounds)
    rows += gpt2["rows"]
    if not quick:
        rows += torch_compiled(layer_pair, (ours, peer), x, ids, mask, rounds, steps)
        rows += torch_compiled_gpt2(gpt2, rounds)
    return with_peak(rows, peak)


GPT2_LABEL = "HF GPT2LMHeadModel (GPT-2 small)"


def torch_gpt2(rounds: int) -> dict:
    """The GPT-2 small shape at batch ``GPT2_B`` x 128: xformer's ``DecoderModel`` against
    ``transformers.GPT2LMHeadModel`` (its default SDPA attention), logits, eager."""
    import torch
    import transformers

    from xformer import ModelSpec
    from xformer_torch.modules import DecoderModel

    spec = ModelSpec.preset("gpt2-small")
    ids = torch.randint(0, spec.vocab_size, (GPT2_B, T))
    ours = DecoderModel(spec).train()
    cfg = transformers.GPT2Config(vocab_size=spec.vocab_size, n_positions=spec.max_len,
                                  n_embd=spec.d_model, n_layer=spec.n_layers,
                                  n_head=spec.n_heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    peer = transformers.GPT2LMHeadModel(cfg).train()

    def call(model):
        return model(input_ids=ids)["logits"]

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)
        return run

    def step(model):
        def run():
            model.zero_grad(set_to_none=True)
            call(model).sum().backward()
        return run

    rows = []
    for m in (ours, peer):
        m.eval()
    rows.append({"framework": "torch", "mode": "eager", "peer": GPT2_LABEL, "pass": "forward",
                 **interleaved(forward(ours), forward(peer), rounds, 2)})
    for m in (ours, peer):
        m.train()
    rows.append({"framework": "torch", "mode": "eager", "peer": GPT2_LABEL,
                 "pass": "forward+backward",
                 **interleaved(step(ours), step(peer), rounds, 1)})
    return {"rows": rows, "models": (ours, peer), "call": call}


def torch_compiled_gpt2(gpt2: dict, rounds: int) -> list[dict]:
    import torch

    ours, peer = gpt2["models"]
    call = gpt2["call"]
    compiled = [torch.compile(m) for m in (ours, peer)]

    def forward(model):
        def run():
            with torch.no_grad():
                call(model)
        return run

    def step(model, params):
        def run():
            for p in params:
                p.grad = None
            call(model).sum().backward()
        return run

    for m in (ours, peer):
        m.eval()
    rows = [{"framework": "torch", "mode": "compile", "peer": GPT2_LABEL, "pass": "forward",
             **interleaved(forward(compiled[0]), forward(compiled[1]), rounds, 2)}]
    for m in (ours, peer):
        m.train()
    rows.append({"framework": "torch", "mode": "compile", "peer": GPT2_LABEL,
                 "pass": "forward+backward",
                 **interleaved(step(compiled[0], list(ours.parameters())),
                               step(compiled[1], list(peer.parameters())),
                               rounds, 1)})
    return rows


def torch_protocol(model, ids, mask, rounds: int) -> dict:
    """``TorchBackend.forward`` (numpy in and out) against ``model(...)`` on tensors."""
    import torch

    from xformer import get_backend
    from xformer_torch.modules import written_out_attention

    backend = get_backend("torch")
    model.eval()
    arrays = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

    def bare():  # the protocol's attention path (written out: its forward equals its trace)
        with torch.no_grad(), written_out_attention():
            model(input_ids=ids, attention_mask=mask)["pooler_output"]

    return {"framework": "torch", "mode": "eager", "peer": "bare module (MiniLM)",
            "pass": "protocol",
            **interleaved(lambda: backend.forward(model, arrays), bare, rounds, 2)}


def torch_compiled(layers, models, x, ids, mask, rounds: int, steps: int) -> list[dict]:
    """Both sides through ``torch.compile`` (default inductor options)."""
    import torch

    rows = []
    for label, (ours, peer), call, reps in (
            ("nn.TransformerEncoderLayer", layers, lambda m: m(x), steps),
            ("HF BertModel (MiniLM)", models,
             lambda m: m(input_ids=ids, attention_mask=mask)["pooler_output"], 2)):
        compiled = [torch.compile(m) for m in (ours, peer)]

        def forward(model):
            def run():
                with torch.no_grad():
                    call(model)
            return run

        def step(model, params):
            def run():
                for p in params:
                    p.grad = None
                call(model).sum().backward()
            return run

        for m in (ours, peer):
            m.eval()
        rows.append({"framework": "torch", "mode": "compile", "peer": label, "pass": "forward",
                     **interleaved(forward(compiled[0]), forward(compiled[1]),
                                   rounds, reps)})
        for m in (ours, peer):
            m.train()
        rows.append({"framework": "torch", "mode": "compile", "peer": label,
                     "pass": "forward+backward",
                     **interleaved(step(compiled[0], list(ours.parameters())),
                                   step(compiled[1], list(peer.parameters())),
                                   rounds, reps)})
    return rows


def bench_tensorflow(rounds: int, steps: int, threads: int, quick: bool = False) -> list[dict]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from xformer_tensorflow import import_tensorflow

    tf = import_tensorflow()
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    except RuntimeError:
        pass
    try:
        import keras_hub
    except ImportError:
        return [{"framework": "tensorflow", "skipped": f"keras-hub is not installed: {INSTALL}"}]
    from xformer_tensorflow.modules import EncoderLayer

    a2, b2 = tf.random.normal((2048, 2048)), tf.random.normal((2048, 2048))
    peak = _peak(tf.function(lambda: tf.linalg.matmul(a2, b2)), lambda y: y.numpy())
    x = tf.random.normal((B, T, D), seed=0)
    ours = EncoderLayer(_spec(), dtype="float32")
    peer = keras_hub.layers.TransformerEncoder(intermediate_dim=F, num_heads=H, dropout=0.0,
                                               activation="gelu", layer_norm_epsilon=1e-5)
    ours(x)
    peer(x)

    def forward(layer, jit=False):
        fn = tf.function(lambda: layer(x, training=False), jit_compile=jit)
        return lambda: fn().numpy()

    def step(layer, jit=False):
        @tf.function(jit_compile=jit)
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True))
            return tape.gradient(loss, layer.trainable_variables)
        return lambda: [g.numpy() for g in fn()]

    rows = []
    for mode, jit in (("function", False),) + ((() if quick else (("xla", True),))):
        rows += [{"framework": "tensorflow", "mode": mode,
                  "peer": "keras_hub TransformerEncoder", "pass": "forward",
                  **interleaved(forward(ours, jit), forward(peer, jit), rounds, steps)},
                 {"framework": "tensorflow", "mode": mode,
                  "peer": "keras_hub TransformerEncoder", "pass": "forward+backward",
                  **interleaved(step(ours, jit), step(peer, jit), rounds, steps)}]
    from xformer_tensorflow.modules import EncoderModel

    spec = _minilm()
    ids = tf.random.uniform((B, T), 0, spec.vocab_size, dtype="int32", seed=0)
    mask = tf.ones((B, T), "int32")
    ours = EncoderModel(spec, dtype="float32")
    peer = keras_hub.models.BertBackbone(
        vocabulary_size=spec.vocab_size, num_layers=spec.n_layers, num_heads=spec.n_heads,
        hidden_dim=spec.d_model, intermediate_dim=spec.d_ff, dropout=0.0,
        max_sequence_length=spec.max_len, num_segments=spec.type_vocab_size)
    calls = {id(ours): lambda training: ours(input_ids=ids, attention_mask=mask,
                                            training=training)["pooler_output"],
             id(peer): lambda training: peer({"token_ids": ids, "segment_ids": tf.zeros_like(ids),
                                              "padding_mask": mask},
                                             training=training)["pooled_output"]}
    for model in (ours, peer):
        calls[id(model)](False)

    def bert_forward(model, jit=False):
        fn = tf.function(lambda: calls[id(model)](False), jit_compile=jit)
        return lambda: fn().numpy()

    def bert_step(model, jit=False):
        @tf.function(jit_compile=jit)
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(calls[id(model)](True))
            grads = tape.gradient(loss, model.trainable_variables)
            return [tf.convert_to_tensor(g) for g in grads if g is not None]  # dense tables
        return lambda: [g.numpy() for g in fn()]

    for mode, jit in (("function", False),) + ((() if quick else (("xla", True),))):
        for name, make in (("forward", bert_forward), ("forward+backward", bert_step)):
            rows.append({"framework": "tensorflow", "mode": mode,
                         "peer": "keras_hub BertBackbone (MiniLM)", "pass": name,
                         **interleaved(make(ours, jit), make(peer, jit), rounds,
                                       2)})
    from xformer import get_backend

    backend = get_backend("tensorflow")
    arrays = {"input_ids": ids.numpy().astype("int64"), "attention_mask": mask.numpy()}
    bare = tf.function(lambda: ours(input_ids=ids, attention_mask=mask,
                                    training=False)["pooler_output"])
    rows.append({"framework": "tensorflow", "mode": "function", "peer": "bare module (MiniLM)",
                 "pass": "protocol",
                 **interleaved(lambda: backend.forward(ours, arrays), lambda: bare().numpy(),
                               rounds, 2)})
    return with_peak(rows, peak)


def bench_mxnet(rounds: int, steps: int, threads: int, quick: bool = False) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", str(threads))
    from xformer_mxnet import modules

    mx = modules.mx
    try:
        from gluonnlp.model.transformer import TransformerEncoderCell
    except ImportError:
        return [{"framework": "mxnet", "skipped": f"gluonnlp is not installed: {INSTALL}"}]
    a2, b2 = mx.nd.random.normal(shape=(2048, 2048)), mx.nd.random.normal(shape=(2048, 2048))
    peak = _peak(lambda: mx.nd.dot(a2, b2), lambda y: y.wait_to_read())
    mx.random.seed(0)
    x = mx.nd.random.normal(shape=(B, T, D))
    ours = modules.EncoderLayer(_spec(), "float32")
    peer = TransformerEncoderCell(units=D, hidden_size=F, num_heads=H, dropout=0.0,
                                  activation="gelu", layer_norm_eps=1e-5)
    for block in (ours, peer):
        block.initialize(mx.init.Normal(0.02))
        block.hybridize(static_alloc=True, static_shape=True)

    def out(block):
        y = block(x)
        return y[0] if isinstance(y, (tuple, list)) else y

    def forward(block):
        return lambda: out(block).wait_to_read()

    def step(block):
        params = list(block.collect_params().values())

        def run():
            with mx.autograd.record():
                loss = out(block).sum()
            loss.backward()
            for p in params:
                if p.grad_req != "null":
                    p.grad().wait_to_read()
        return run

    sync = mx.nd.waitall
    rows = [{"framework": "mxnet", "mode": "hybridize", "peer": "GluonNLP TransformerEncoderCell",
             "pass": "forward", **interleaved(forward(ours), forward(peer), rounds, steps, sync)},
            {"framework": "mxnet", "mode": "hybridize", "peer": "GluonNLP TransformerEncoderCell",
             "pass": "forward+backward",
             **interleaved(step(ours), step(peer), rounds, steps, sync)}]
    from gluonnlp.model.bert import BERTEncoder, BERTModel

    spec = _minilm()
    ids = mx.nd.random.randint(0, spec.vocab_size, shape=(B, T)).astype("int64")
    mask = mx.nd.ones((B, T))
    types = mx.nd.zeros((B, T))
    ours = modules.EncoderModel(spec, "float32")
    encoder = BERTEncoder(num_layers=spec.n_layers, units=spec.d_model, hidden_size=spec.d_ff,
                          max_length=spec.max_len, num_heads=spec.n_heads, dropout=0.0,
                          activation="gelu", layer_norm_eps=spec.norm_eps)
    peer = BERTModel(encoder, vocab_size=spec.vocab_size,
                     token_type_vocab_size=spec.type_vocab_size, units=spec.d_model,
                     embed_size=spec.d_model, use_pooler=True, use_decoder=False,
                     use_classifier=False)
    valid = mx.nd.full((B,), T)
    for block in (ours, peer):
        block.initialize(mx.init.Normal(0.02))
        block.hybridize(static_alloc=True, static_shape=True)
    pooled = {id(ours): lambda: ours(input_ids=ids, attention_mask=mask)[-1],
              id(peer): lambda: peer(ids.astype("float32"), types, valid)[-1]}

    def bert_forward(block):
        return lambda: pooled[id(block)]().wait_to_read()

    def bert_step(block):
        params = [p for p in block.collect_params().values() if p.grad_req != "null"]

        def run():
            with mx.autograd.record():
                loss = pooled[id(block)]().sum()
            loss.backward()
            for p in params:
                p.grad().wait_to_read()
        return run

    for name, make in (("forward", bert_forward), ("forward+backward", bert_step)):
        rows.append({"framework": "mxnet", "mode": "hybridize",
                     "peer": "GluonNLP BERTModel (MiniLM)", "pass": name,
                     **interleaved(make(ours), make(peer), rounds, 2, sync)})
    from xformer import get_backend

    backend = get_backend("mxnet")
    arrays = {"input_ids": ids.asnumpy(), "attention_mask": mask.asnumpy().astype("int64")}
    backend.forward(ours, arrays)  # the backend's mode bookkeeping: already hybridized
    rows.append({"framework": "mxnet", "mode": "hybridize", "peer": "bare module (MiniLM)",
                 "pass": "protocol",
                 **interleaved(lambda: backend.forward(ours, arrays),
                               lambda: [o.asnumpy() for o in ours(input_ids=ids,
                                                                   attention_mask=mask)],
                               rounds, 2, sync)})
    return with_peak(rows, peak)


BENCH = {"torch": bench_torch, "tensorflow": bench_tensorflow, "mxnet": bench_mxnet}


def measure(rounds: int = 11, steps: int = 5, threads: int = 2, quick: bool = False
            ) -> list[dict]:
    """Every framework, each in a fresh process of this script."""
    rows = []
    for name in FRAMEWORKS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            r = subprocess.run([sys.executable, __file__, "--framework", name, "--rounds",
                                str(rounds), "--steps", str(steps), "--threads", str(threads),
                                "--json", str(out)] + (["--quick"] if quick else []),
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
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--quick", action="store_true", help="leave out the compiled modes")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    rows = (BENCH[args.framework](args.rounds, args.steps, args.threads, args.quick)
            if args.framework else measure(args.rounds, args.steps, args.threads, args.quick))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.framework:
        for r in rows:
            if "skipped" in r:
                print(f"{r['framework']}: skipped ({r['skipped']})")
            else:
                print(f"{r['framework']}/{r['mode']} vs {r['peer']}, {r['pass']}: "
                      f"{r['ratio']:.2f}x ({r['xformer_ms']:.1f} ms vs {r['peer_ms']:.1f} ms)"
                      + (f", {r['pct_of_peak']:.0f}% of GEMM peak" if "pct_of_peak" in r
                         else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
