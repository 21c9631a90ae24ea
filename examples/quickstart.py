"""Quick start: one spec, the same weights, three native modules, the same numbers.

    python examples/quickstart.py [--out DIR]

The checkpoint goes to ``DIR/tiny.safetensors`` (default: a new temporary folder, printed).
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np

import xformer
from xformer.backend import is_installed

ap = argparse.ArgumentParser(description="one spec, three backends, the same numbers")
ap.add_argument("--out", metavar="DIR", help="folder for the checkpoint (default: a new "
                                             "temporary folder)")
out = Path(ap.parse_args().out or tempfile.mkdtemp(prefix="xformer-quickstart-"))
out.mkdir(parents=True, exist_ok=True)

spec = xformer.ModelSpec.preset("tiny")                   # or ModelSpec.load("spec.yaml")
weights = xformer.init_weights(spec, seed=0)              # canonical {name: np.ndarray}
xformer.save_weights(out / "tiny.safetensors", weights, spec)  # one file for every backend
print(f"checkpoint: {out / 'tiny.safetensors'}")

spec, weights = xformer.load_weights(out / "tiny.safetensors")  # the spec travels in the file
inputs = {"input_ids": np.array([[5, 17, 42, 7], [9, 3, 0, 0]]),
          "attention_mask": np.array([[1, 1, 1, 1], [1, 1, 0, 0]])}

outputs = {}
for name in ("torch", "tensorflow", "mxnet"):
    if not is_installed(name):
        continue
    model = xformer.build(spec, backend=name, weights=weights)  # nn.Module / keras / Gluon
    print(f"{name:>10}: {type(model).__module__}.{type(model).__name__}")
    outputs[name] = xformer.get_backend(name).forward(model, inputs)["last_hidden_state"]

first = next(iter(outputs.values()))
for name, hidden in outputs.items():
    print(f"{name:>10}: max |diff| vs first backend = {np.abs(hidden - first).max():.2e}")
