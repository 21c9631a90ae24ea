"""Training conformance (issue #10): the same optimizer steps on every backend and mode give the
same weights, and the torch, TensorFlow and MXNet backends reproduce a plain Hugging Face +
``torch.optim`` loop.

* float64: 10 steps of each optimizer × schedule (SGD with momentum, SGD Nesterov, Adam with L2
  decay, AdamW; constant, linear and cosine with warm-up), with global-norm clipping that
  really clips and gradient accumulation over 2 micro-batches: every parameter and every
  optimizer state tensor agrees to ≤ 1e-10 relative across all targets after every step.
* float32: every step's loss to ≤ 1e-5 and the parameters to ≤ 1e-4 after 10 steps.
* dropout 0.1: the framework-neutral stream makes the three backends train identically (same
  float64 bound), and the stream is really applied (the run differs from one without dropout).
* ``xformer train`` on each backend = a Hugging Face ``GPT2LMHeadModel`` / ``LlamaForCausalLM``
  + ``torch.optim.AdamW`` loop with ``get_linear_schedule_with_warmup`` and
  ``clip_grad_norm_``, ≤ 1e-9 relative in float64.

Every comparison goes through :func:`xformer.conformance.training.run_training` (lockstep, the
first target the baseline) or the same error measure.
"""

from __future__ import annotations

import numpy as np
import pytest

from xformer import ModelSpec, init_weights
from xformer.backend import get_backend, is_installed
from xformer.conformance import Target, default_targets
from xformer.conformance.training import _worst, random_token_rows, run_training
from xformer.training import TrainConfig

BACKENDS = [b for b in ("torch", "tensorflow", "mxnet") if is_installed(b)]
if len(BACKENDS) < 2:
    pytest.skip("training conformance needs two installed backends", allow_module_level=True)

#: A small GPT-2-like decoder (learned positions, GELU-tanh, tied head, pre-LN) and a
#: Llama-like one (RoPE, RMSNorm, gated SiLU FFN, grouped-query attention, untied head).
GPT2 = ModelSpec.preset("gpt2-tiny").replace(d_model=32, d_ff=64, vocab_size=97, max_len=16)
LLAMA = ModelSpec.preset("llama-tiny").replace(d_model=32, d_ff=48, vocab_size=97, max_len=16)
SEQ2SEQ = ModelSpec.preset("vaswani-tiny").replace(d_model=32, d_ff=48, vocab_size=97,
                                                   max_len=16)
STEPS = 10
#: clip_grad_norm 0.5 clips most steps of these runs (asserted below).
OPTIMIZERS = {
    "sgd-momentum": dict(optimizer="sgd", lr=0.5, momentum=0.9),
    "sgd-nesterov": dict(optimizer="sgd", lr=0.5, momentum=0.9, nesterov=True,
                         weight_decay=0.01),
    "adam-l2": dict(optimizer="adam", lr=3e-3, weight_decay=0.01),
    "adamw": dict(optimizer="adamw", lr=3e-3, weight_decay=0.1, no_decay_bias_and_norm=True),
}
#: Adam with L2 decay is unstable at a zero parameter whose gradient is zero (a key bias):
#: there Adam's step is ``lr·g/(|g|+eps)`` with ``g = wd·p + noise``, i.e.
#: ``p·(1 − lr·wd/eps)`` (a factor −3000 here), so each backend's rounding noise grows to the size of ``lr`` and the
#: runs part (docs/pitfalls.md). It trains the Llama-like spec, which has no biases.
SPEC_OF = {"adam-l2": LLAMA}
SCHEDULES = {"constant": dict(schedule="constant"),
             "linear": dict(schedule="linear", warmup_steps=2),
             "cosine": dict(schedule="cosine", warmup_steps=2)}


def config(opt: str, schedule: str, **extra) -> TrainConfig:
    return TrainConfig(**OPTIMIZERS[opt], **SCHEDULES[schedule], clip_grad_norm=0.5,
                       batch_size=3, grad_accum=2, **extra)


def targets(all_modes: bool) -> list[Target]:
    return default_targets(BACKENDS, all_modes=all_modes)


def data(spec: ModelSpec) -> np.ndarray:
    return random_token_rows(spec, 9, 12, seed=1)  # 9 rows: batches wrap around


def assert_trains_alike(report):
    first = report.first_divergence
    assert report.ok, (f"{report.name}: step {first.step} diverged at {first.worst} on "
                       f"{first.worst_target}: params {first.param_error:.2e}, state "
                       f"{first.state_error:.2e}, loss {first.loss_error:.2e}")


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_float64_every_optimizer_and_schedule_on_every_default_target(opt, schedule):
    spec = SPEC_OF.get(opt, GPT2)
    report = run_training(spec, init_weights(spec, 0, "float64"), data(spec),
                          config(opt, schedule), STEPS, targets(False), "float64",
                          name=f"{opt}/{schedule}")
    assert_trains_alike(report)
    assert max(r.param_error for r in report.rows) <= 1e-10
    losses = [r.losses[report.targets[0]] for r in report.rows]
    assert losses[-1] < losses[0]  # it trains


def test_float64_every_mode():
    """Every mode, the opt-in torch.compile and XLA included, on AdamW with a linear warm-up."""
    report = run_training(GPT2, init_weights(GPT2, 0, "float64"), data(GPT2),
                          config("adamw", "linear"), STEPS, targets(True), "float64",
                          name="every mode")
    assert_trains_alike(report)
    assert len(report.targets) == len(targets(True)) > len(targets(False))


def test_float64_encoder_decoder():
    """The teacher-forced seq2seq objective (no shift; shared, tied tables) on an
    encoder-decoder."""
    report = run_training(SEQ2SEQ, init_weights(SEQ2SEQ, 0, "float64"), data(SEQ2SEQ),
                          config("adamw", "cosine"), STEPS, targets(False), "float64",
                          name="encoder-decoder")
    assert_trains_alike(report)


@pytest.mark.parametrize("opt", OPTIMIZERS)
def test_float32_loss_and_parameters(opt):
    """Every optimizer at a constant rate (no warm-up: Adam's first step is the most sensitive,
    docs/training.md), on the default targets."""
    # AdamW on the Llama-like spec too: on the GPT-2-like one float32 AdamW ends ~9e-5 apart,
    # a tied table's components near eps carrying their float32 error into their updates
    spec = LLAMA if opt.startswith("adam") else GPT2
    report = run_training(spec, init_weights(spec, 0, "float32"), data(spec),
                          config(opt, "constant"), STEPS, targets(False), "float32",
                          name=f"{opt} float32")
    assert report.tolerance == (1e-5, 1e-4)
    assert_trains_alike(report)


def test_clipping_really_clips():
    """The clip of :func:`config` is active: the pre-clip norm exceeds it on most steps."""
    be = get_backend(BACKENDS[0])
    spec = GPT2
    model = be.build(spec, "float64")
    be.set_weights(model, init_weights(spec, 0, "float64"))
    from xformer.training import train

    logs = train(be, model, data(spec), config("adamw", "constant"), STEPS)
    assert sum(log.grad_norm > 0.5 for log in logs) >= STEPS // 2


def test_dropout_stream_trains_identically_on_every_backend():
    spec = GPT2.replace(dropout=0.1)
    weights = init_weights(spec, 0, "float64")
    cfg = config("adamw", "linear", dropout="stream", seed=7)
    report = run_training(spec, weights, data(spec), cfg, STEPS, targets(False), "float64",
                          name="dropout 0.1")
    assert report.config.dropout == "stream"
    assert_trains_alike(report)
    # the masks are applied: without dropout the same run ends elsewhere
    plain = run_training(GPT2, weights, data(spec), cfg, STEPS, targets(False)[:1], "float64")
    assert abs(plain.rows[0].losses[plain.targets[0]]
               - report.rows[0].losses[report.targets[0]]) > 1e-3


@pytest.mark.parametrize("spec", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_xformer_train_reproduces_a_hugging_face_torch_optim_loop(spec, tmp_path, capsys):
    """``xformer train`` (the CLI, each backend in its preferred mode) against a plain
    ``transformers`` + ``torch.optim.AdamW`` loop: linear warm-up, clipping, accumulation."""
    pytest.importorskip("transformers")
    from xformer_torch.reference_hf import train_huggingface

    from xformer import from_pretrained, save_pretrained
    from xformer.cli import main

    weights = init_weights(spec, 0, "float64")
    start = tmp_path / "start"
    save_pretrained(start, spec, weights)
    tokens = data(spec)
    np.save(tmp_path / "tokens.npy", tokens)
    cfg = TrainConfig(optimizer="adamw", lr=3e-3, weight_decay=0.01, schedule="linear",
                      warmup_steps=2, clip_grad_norm=0.5, batch_size=3, grad_accum=2)
    want, losses = train_huggingface(spec, weights, tokens, cfg, STEPS, "float64")
    assert losses[-1] < losses[0]
    for name in BACKENDS:
        out = tmp_path / name
        code = main(["train", "--model", str(start), "--backend", name, "--dtype", "float64",
                     "--data", str(tmp_path / "tokens.npy"), "--steps", str(STEPS),
                     "--optimizer", "adamw", "--lr", "3e-3", "--weight-decay", "0.01",
                     "--schedule", "linear", "--warmup-steps", "2", "--clip-grad-norm", "0.5",
                     "--batch-size", "3", "--grad-accum", "2", "--out", str(out)])
        assert code == 0, capsys.readouterr().err
        _, got = from_pretrained(out)
        err, where = _worst(want, got)
        assert err <= 1e-9, f"{name}: {where} differs from Hugging Face by {err:.2e}"
