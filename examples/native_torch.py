"""The module xformer builds is a plain torch.nn.Module: train it like any other.

    python examples/native_torch.py [--out DIR]

The trained weights go to ``DIR/trained.safetensors`` (default: a new temporary folder,
printed), ready for TensorFlow and MXNet.
"""

import argparse
import tempfile
from pathlib import Path

import torch

import xformer

ap = argparse.ArgumentParser(description="train xformer's torch module with plain torch")
ap.add_argument("--out", metavar="DIR", help="folder for the trained weights (default: a new "
                                             "temporary folder)")
out = Path(ap.parse_args().out or tempfile.mkdtemp(prefix="xformer-native-torch-"))
out.mkdir(parents=True, exist_ok=True)

spec = xformer.ModelSpec.preset("tiny").replace(dropout=0.1)
model = xformer.build(spec, backend="torch")           # xformer_torch.modules.EncoderModel
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, spec.vocab_size, (4, 16))
target = torch.randn(4, spec.d_model)
for step in range(3):
    outputs = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    loss = torch.nn.functional.mse_loss(outputs["pooler_output"], target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
# the state_dict keys are the canonical names: save it for TensorFlow and MXNet
xformer.save_weights(out / "trained.safetensors", {k: v.numpy() for k, v in
                                                   model.state_dict().items()}, spec)
print(f"weights: {out / 'trained.safetensors'}")
