"""xformer's native modules against each framework's own implementation of the same layer,
timed side by side (issue #11, first slice).

    python benchmarks/peers.py [--rounds 7] [--steps 5] [--threads 2] [--json FILE]
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
30522, batch 8 × 128 token ids, pooler) against Hugging Face ``BertModel`` (torch), keras-hub
``BertBackbone`` (TensorFlow) and GluonNLP ``BERTModel`` (MXNet), random weights on both sides.

Timing is interleaved: each round times ``steps`` calls of xformer's layer, then ``steps`` of
the peer's, so load on the machine hits both alike; the figure is the median over rounds of
the per-round ratio ``xformer / peer`` (absolute times here swing ±25 % between runs, ratios
measured this way hold to a few percent). Forward alone and forward + backward (the gradient
of ``sum(output)`` w.r.t. every parameter). Peers that are not installed are skipped with the
command that installs them (``benchmarks/install_peers.sh``).
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


def interleaved(ours, peer, rounds: int, steps: int, sync=lambda: None) -> dict[str, float]:
    """Median per-round ratio ``ours / peer`` and median ms per call of each, after one
    untimed warm-up block of each."""
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
    return {"ratio": statistics.median(ratios), "xformer_ms": statistics.median(mine) * 1e3,
            "peer_ms": statistics.median(theirs) * 1e3}


# ---------------------------------------------------------------------- one framework each
def bench_torch(rounds: int, steps: int, threads: int) -> list[dict]:
    import torch
    from torch import nn

    from xformer_torch.modules import EncoderLayer

    torch.set_num_threads(threads)
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
    try:
        import transformers
    except ImportError:
        return rows
    from xformer_torch.modules import EncoderModel

    spec = _minilm()
    ids = torch.randint(0, spec.vocab_size, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    ours = EncoderModel(spec).train()
    cfg = transformers.BertConfig(vocab_size=spec.vocab_size, hidden_size=spec.d_model,
                                  num_hidden_layers=spec.n_layers, num_attention_heads=spec.n_heads,
                                  intermediate_size=spec.d_ff, max_position_embeddings=spec.max_len,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                  attn_implementation="eager")
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

    for name, ours_fn, peer_fn in (
            ("forward", bert_forward(ours, "pooler_output"),
             bert_forward(peer, "pooler_output")),
            ("forward+backward", bert(ours, "pooler_output"), bert(peer, "pooler_output"))):
        rows.append({"framework": "torch", "mode": "eager", "peer": "HF BertModel (MiniLM)",
                     "pass": name, **interleaved(ours_fn, peer_fn, max(rounds // 2, 3), 2)})
    return rows


def bench_tensorflow(rounds: int, steps: int, threads: int) -> list[dict]:
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

    x = tf.random.normal((B, T, D), seed=0)
    ours = EncoderLayer(_spec(), dtype="float32")
    peer = keras_hub.layers.TransformerEncoder(intermediate_dim=F, num_heads=H, dropout=0.0,
                                               activation="gelu", layer_norm_epsilon=1e-5)
    ours(x)
    peer(x)

    def forward(layer):
        fn = tf.function(lambda: layer(x, training=False))
        return lambda: fn().numpy()

    def step(layer):
        @tf.function
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(layer(x, training=True))
            return tape.gradient(loss, layer.trainable_variables)
        return lambda: [g.numpy() for g in fn()]

    rows = [{"framework": "tensorflow", "mode": "function", "peer": "keras_hub TransformerEncoder",
             "pass": "forward", **interleaved(forward(ours), forward(peer), rounds, steps)},
            {"framework": "tensorflow", "mode": "function", "peer": "keras_hub TransformerEncoder",
             "pass": "forward+backward", **interleaved(step(ours), step(peer), rounds, steps)}]
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

    def bert_forward(model):
        fn = tf.function(lambda: calls[id(model)](False))
        return lambda: fn().numpy()

    def bert_step(model):
        @tf.function
        def fn():
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(calls[id(model)](True))
            grads = tape.gradient(loss, model.trainable_variables)
            return [tf.convert_to_tensor(g) for g in grads if g is not None]  # dense tables
        return lambda: [g.numpy() for g in fn()]

    for name, make in (("forward", bert_forward), ("forward+backward", bert_step)):
        rows.append({"framework": "tensorflow", "mode": "function",
                     "peer": "keras_hub BertBackbone (MiniLM)", "pass": name,
                     **interleaved(make(ours), make(peer), max(rounds // 2, 3), 2)})
    return rows


def bench_mxnet(rounds: int, steps: int, threads: int) -> list[dict]:
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    os.environ.setdefault("MXNET_CPU_WORKER_NTHREADS", str(threads))
    from xformer_mxnet import modules

    mx = modules.mx
    try:
        from gluonnlp.model.transformer import TransformerEncoderCell
    except ImportError:
        return [{"framework": "mxnet", "skipped": f"gluonnlp is not installed: {INSTALL}"}]
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
                     **interleaved(make(ours), make(peer), max(rounds // 2, 3), 2, sync)})
    return rows


BENCH = {"torch": bench_torch, "tensorflow": bench_tensorflow, "mxnet": bench_mxnet}


def measure(rounds: int = 7, steps: int = 5, threads: int = 2) -> list[dict]:
    """Every framework, each in a fresh process of this script."""
    rows = []
    for name in FRAMEWORKS:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "rows.json"
            r = subprocess.run([sys.executable, __file__, "--framework", name, "--rounds",
                                str(rounds), "--steps", str(steps), "--threads", str(threads),
                                "--json", str(out)], capture_output=True, text=True)
            if r.returncode != 0 or not out.exists():
                rows.append({"framework": name, "skipped": (r.stderr.strip().splitlines()
                                                            or ["failed"])[-1]})
                continue
            rows += json.loads(out.read_text())
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--framework", choices=FRAMEWORKS, help="one framework, in this process")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, str(args.threads))
    rows = (BENCH[args.framework](args.rounds, args.steps, args.threads) if args.framework
            else measure(args.rounds, args.steps, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    if not args.framework:
        for r in rows:
            if "skipped" in r:
                print(f"{r['framework']}: skipped ({r['skipped']})")
            else:
                print(f"{r['framework']}/{r['mode']} vs {r['peer']}, {r['pass']}: "
                      f"{r['ratio']:.2f}x ({r['xformer_ms']:.1f} ms vs {r['peer_ms']:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
