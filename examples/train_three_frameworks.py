"""The same training run on PyTorch, TensorFlow and MXNet, each with its own optimizer: the
same weights come out (docs/training.md).

    python examples/train_three_frameworks.py [--out DIR]

Ten AdamW steps with a linear warm-up, global-norm clipping, two accumulated micro-batches and
dropout 0.1 drawn from xformer's framework-neutral stream, in float64, on every installed
backend; prints each backend's loss per step and how far its final weights are from the first
backend's, and writes the first backend's weights to ``DIR/trained.safetensors`` (default: a new
temporary folder, printed).
"""

import argparse
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is imported

import numpy as np  # noqa: E402

import xformer  # noqa: E402
from xformer.backend import get_backend, is_installed  # noqa: E402
from xformer.training import TrainConfig, train  # noqa: E402

ap = argparse.ArgumentParser(description="one training run on every installed backend")
ap.add_argument("--out", metavar="DIR", help="folder for the trained weights (default: a new "
                                             "temporary folder)")
out = Path(ap.parse_args().out or tempfile.mkdtemp(prefix="xformer-train-"))
out.mkdir(parents=True, exist_ok=True)

spec = xformer.ModelSpec.preset("gpt2-tiny").replace(dropout=0.1)
weights = xformer.init_weights(spec, seed=0, dtype="float64")
tokens = np.random.default_rng(0).integers(0, spec.vocab_size, (16, 24))  # 16 rows of 24 ids
config = TrainConfig(optimizer="adamw", lr=3e-3, schedule="linear", warmup_steps=2,
                     clip_grad_norm=1.0, batch_size=4, grad_accum=2,
                     dropout="stream", seed=1)  # the same masks on every backend

final = {}
for name in [b for b in ("torch", "tensorflow", "mxnet") if is_installed(b)]:
    backend = get_backend(name)
    model = xformer.build(spec, backend=name, dtype="float64", weights=weights)  # native module
    logs = train(backend, model, tokens, config, steps=10)  # its own optimizer machinery
    print(f"{name:>10}: loss " + " ".join(f"{log.loss:.4f}" for log in logs))
    final[name] = backend.get_weights(model)

first, *others = final
for name in others:
    worst = max(float(np.abs(final[name][k] - final[first][k]).max()
                    / np.abs(final[first][k]).max()) for k in weights
                if not k.endswith("k_proj.bias"))  # a zero-gradient tensor: docs/training.md
    print(f"{name} vs {first}: largest relative difference of the weights {worst:.1e}")
xformer.save_weights(out / "trained.safetensors", final[first], spec)
print(f"weights: {out / 'trained.safetensors'}")
