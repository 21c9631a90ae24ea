"""The module xformer builds is a plain torch.nn.Module: train it like any other.

    python examples/native_torch.py
"""

import torch

import xformer

spec = xformer.ModelSpec.preset("tiny").replace(dropout=0.1)
model = xformer.build(spec, backend="torch")           # xformer_torch.modules.EncoderModel
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
ids = torch.randint(0, spec.vocab_size, (4, 16))
target = torch.randn(4, spec.d_model)
for step in range(3):
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    loss = torch.nn.functional.mse_loss(out["pooler_output"], target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    print(f"step {step}: loss {loss.item():.4f}")
# the state_dict keys are the canonical names: save it for TensorFlow and MXNet
xformer.save_weights("trained.safetensors", {k: v.numpy() for k, v in
                                             model.state_dict().items()}, spec)
