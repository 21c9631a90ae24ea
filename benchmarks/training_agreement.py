"""Training conformance, measured: how far apart the backends end after 10 optimizer steps.

    python benchmarks/training_agreement.py

For each optimizer × schedule (SGD with momentum, SGD Nesterov with L2 decay, Adam with L2
decay, AdamW with biases and norms excluded; constant, linear and cosine with 2 warm-up
steps), with global-norm clipping (0.5) and 2 accumulated micro-batches of 3 rows, every
backend/mode target (opt-in modes included: torch.compile, XLA) trains the small decoders of
``conformance/test_training.py`` in lockstep from the same weights
(:func:`xformer.conformance.training.run_training`): the worst relative error of the
parameters, the optimizer state and the loss against the first target over all 10 steps, in
float64 and float32; then a spec with dropout 0.1 on the dropout stream; then ``xformer train``'s
loop on each backend against a plain Hugging Face + ``torch.optim.AdamW`` loop
(``train_huggingface``). ``benchmarks/figures.py --only training`` writes the table into
docs/training.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "conformance"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from figures import e as _e  # noqa: E402  (the figures' number format)
from test_training import (GPT2, LLAMA, OPTIMIZERS, SCHEDULES, SPEC_OF, STEPS,  # noqa: E402
                           config, data, targets)


def measure() -> list[list[str]]:
    from xformer import init_weights
    from xformer.backend import get_backend
    from xformer.conformance.training import _worst, run_training
    from xformer.training import TrainConfig, train

    rows = []
    every = targets(True)
    for opt in OPTIMIZERS:
        for schedule in SCHEDULES:
            spec = SPEC_OF.get(opt, GPT2)
            cells = [f"{opt} / {schedule}", "llama-like" if spec is LLAMA else "gpt2-like"]
            for dtype in ("float64", "float32"):
                r = run_training(spec, init_weights(spec, 0, dtype), data(spec),
                                 config(opt, schedule), STEPS, every, dtype)
                cells += [_e(max(x.param_error for x in r.rows)),
                          _e(max(x.state_error for x in r.rows)),
                          _e(max(x.loss_error for x in r.rows))]
            rows.append(cells)
    spec = GPT2.replace(dropout=0.1)
    r = run_training(spec, init_weights(spec, 0, "float64"), data(spec),
                     config("adamw", "linear", dropout="stream", seed=7), STEPS, every,
                     "float64")
    rows.append(["adamw / linear, dropout 0.1 (stream)", "gpt2-like",
                 _e(max(x.param_error for x in r.rows)), _e(max(x.state_error for x in r.rows)),
                 _e(max(x.loss_error for x in r.rows)), "", "", ""])
    from xformer_torch.reference_hf import train_huggingface

    cfg = TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.01, schedule="linear",
                      warmup_steps=2, clip_grad_norm=0.5, batch_size=3, grad_accum=2)
    for spec, label in ((GPT2, "GPT2LMHeadModel"), (LLAMA, "LlamaForCausalLM")):
        weights = init_weights(spec, 0, "float64")
        want, _ = train_huggingface(spec, weights, data(spec), cfg, STEPS, "float64")
        worst = 0.0
        for t in every:
            be = get_backend(t.backend)
            model = be.build(spec, "float64")
            be.set_weights(model, weights)
            train(be, model, data(spec), cfg, STEPS, mode=t.mode)
            worst = max(worst, _worst(want, be.get_weights(model))[0])
        rows.append([f"every target vs Hugging Face {label} + torch.optim.AdamW",
                     "gpt2-like" if spec is GPT2 else "llama-like", _e(worst), "", "", "", "",
                     ""])
    return rows


if __name__ == "__main__":
    for row in measure():
        print(" | ".join(row))
