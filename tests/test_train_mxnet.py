"""Native training on the MXNet Gluon backend (issue #10): ``gluon.Trainer`` with the
``torch.optim``-semantics optimizers of ``xformer_mxnet.optimizers``, an ``mx.lr_scheduler``
schedule, global-norm clipping, gradient accumulation and the dropout stream, checked against
:func:`xformer.training.oracle_train` (``forward_backward`` + the numpy optimizers) in float64,
in both modes; and the MXNet semantics that the corrections exist for, measured.

Relative error is ``max|a - b| / max|b|`` per tensor; a ``k_proj.bias`` (whose gradient is 0 in
exact arithmetic, so its value and state are rounding noise) is measured against the largest
``|value|`` of its attention block's q/k/v/out_proj weights (tests/backend_helpers.py).
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

if importlib.util.find_spec("mxnet") is None:
    pytest.skip("mxnet is not installed: pip install 'xformer[mxnet]'", allow_module_level=True)

from xformer import ModelSpec, init_weights, training  # noqa: E402
from xformer.backend import get_backend  # noqa: E402
from xformer.conformance import zero_gradient_scale  # noqa: E402
from xformer.errors import InputError  # noqa: E402
from xformer_mxnet import modules  # noqa: E402
from xformer_mxnet import optimizers  # noqa: E402

mx = modules.mx
BE = get_backend("mxnet")
STEPS = 10
CLIP = 2.0  # gpt2-tiny's pre-clip norms here are 1.9 .. 5: some steps clip, some do not

GPT2 = ModelSpec.preset("gpt2-tiny")
LLAMA = ModelSpec.preset("llama-tiny")
VASWANI = ModelSpec.preset("vaswani-tiny")

OPTIMIZERS = {
    "sgd-momentum": dict(optimizer="sgd", lr=0.05, momentum=0.9),
    "sgd-nesterov": dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True),
    # eps 1e-4, not 1e-8: with L2 decay a k_proj.bias (gradient 0 up to ~1e-19 of rounding)
    # sees g = wd * p, and while |g| << eps Adam steps p -= lr * wd / eps * p: a factor
    # 1 - 3000 per step at eps 1e-8 (lr 3e-3, wd 0.01), which blows the rounding noise up to
    # O(lr) in a few steps, in the oracle as in any implementation; 1 - 0.3 at eps 1e-4
    "adam-l2": dict(optimizer="adam", lr=3e-3, weight_decay=0.01, eps=1e-4),
    "adamw": dict(optimizer="adamw", lr=3e-3, weight_decay=0.1),
    "adamw-no-decay": dict(optimizer="adamw", lr=3e-3, weight_decay=0.1,
                           no_decay_bias_and_norm=True),
}
SCHEDULES = {"constant": dict(schedule="constant"),
             "linear": dict(schedule="linear", warmup_steps=2),
             "cosine": dict(schedule="cosine", warmup_steps=2)}


def _config(opt: str, schedule: str, clip: float = CLIP, **extra) -> training.TrainConfig:
    return training.TrainConfig(**OPTIMIZERS[opt], **SCHEDULES[schedule], batch_size=4,
                                grad_accum=2, clip_grad_norm=clip, **extra)


def _data(spec: ModelSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    if spec.architecture == "encoder-decoder":
        return {"source": rng.integers(0, spec.vocab_size, (16, 10)),
                "target": rng.integers(0, spec.vocab_size, (16, 8))}
    return rng.integers(0, spec.vocab_size, (16, 12))


def _model(spec: ModelSpec, dtype: str = "float64", seed: int = 0):
    model = BE.build(spec, dtype)
    BE.set_weights(model, init_weights(spec, seed, dtype))
    return model


def _scale(name: str, values: dict) -> float:
    """The denominator of the relative error of ``values[name]``: its own magnitude, or for a
    key bias (and its state) its block's weights' (:func:`zero_gradient_scale`)."""
    scale = zero_gradient_scale(name, values)
    return float(np.abs(values[name]).max()) if scale is None else scale


def _max_rel(got: dict, want: dict) -> tuple[float, str]:
    assert set(got) == set(want)
    errs = {n: float(np.abs(got[n] - want[n]).max()) / max(_scale(n, want), 1e-300)
            for n in want}
    worst = max(errs, key=errs.get)
    return errs[worst], worst


def _oracle_state(opt) -> dict:
    return {f"{name}:{key}": value for name, entry in opt.state.items()
            for key, value in entry.items() if key != "step" and value is not None}


_ORACLE: dict = {}


def _oracle(spec: ModelSpec, config: training.TrainConfig):
    """``oracle_train`` of ``(spec, config)`` in float64, cached (it is mode-independent)."""
    key = (repr(spec), repr(config))
    if key not in _ORACLE:
        _ORACLE[key] = training.oracle_train(BE, _model(spec), _data(spec), config, STEPS)
    return _ORACLE[key]


def _run_with_state(spec, config, mode, dtype="float64"):
    """Train ``STEPS`` steps with one trainer, step by step; ``(weights, logs, state)``."""
    model = _model(spec, dtype)
    rows = training.check_data(spec, _data(spec))
    trainer = BE.make_trainer(model, config, STEPS)
    logs = [BE.train_step(model, trainer, training.micro_batches(spec, rows, config, s), s,
                          mode) for s in range(STEPS)]
    return BE.get_weights(model), logs, BE.optimizer_state(model, trainer)


def _check_against_oracle(spec, config, mode, tol=1e-10):
    weights, logs, state = _run_with_state(spec, config, mode)
    want_w, want_logs, opt = _oracle(spec, config)
    err, worst = _max_rel(weights, want_w)
    assert err <= tol, f"weights: {worst} off by {err:.3g}"
    for got, want in zip(logs, want_logs, strict=True):
        assert got.lr == want.lr, (got.step, got.lr, want.lr)
        assert abs(got.loss - want.loss) <= tol * abs(want.loss), (got.step, got.loss, want.loss)
        assert abs(got.grad_norm - want.grad_norm) <= tol * want.grad_norm
    clip = config.clip_grad_norm
    assert any(log.grad_norm > clip for log in want_logs), "the clip never clipped"
    assert any(log.grad_norm < clip for log in want_logs), "the clip always clipped"
    want_state = _oracle_state(opt)
    err, worst = _max_rel(state, want_state)
    assert err <= tol, f"optimizer state: {worst} off by {err:.3g}"
    return logs, want_logs


# ---------------------------------------------------------------------- against the oracle
#: Each optimizer and schedule once (conformance/test_training.py runs the full optimizer ×
#: schedule matrix across backends).
PREFERRED = [("sgd-momentum", "constant"), ("adam-l2", "linear"), ("adamw", "cosine"),
             ("sgd-nesterov", "cosine"), ("adamw-no-decay", "linear")]


@pytest.mark.parametrize("opt,schedule", PREFERRED)
def test_gpt2_hybridized_matches_the_oracle(opt, schedule):
    """All optimizer x schedule combinations in the preferred mode (hybridize), float64, with
    clipping that clips and two micro-batches per step: every weight, the loss, the rate and
    the norm of every step and the final optimizer state within 1e-10 of the numpy oracle."""
    _check_against_oracle(GPT2, _config(opt, schedule), "hybridize")


@pytest.mark.parametrize("spec,opt,schedule,mode,clip", [  # clips: measured norms straddle them
    (GPT2, "adamw-no-decay", "cosine", "imperative", CLIP),
    (VASWANI, "adam-l2", "linear", "hybridize", 1.03),   # norms 0.97 .. 1.05
    (VASWANI, "sgd-momentum", "cosine", "imperative", 1.03),
    (LLAMA, "adamw", "cosine", "hybridize", 1.3),        # norms 1.05 .. 1.66
], ids=["gpt2-imperative-adamw-nodecay", "vaswani-hybridize-adam", "vaswani-imperative-sgd",
        "llama-hybridize-adamw"])
def test_other_modes_and_specs_match_the_oracle(spec, opt, schedule, mode, clip):
    """The imperative mode, an encoder-decoder (seq2seq loss, no shift; shared/tied tables)
    and a Llama-family decoder (RMSNorm, gated FFN, rotary, grouped-query attention)."""
    _check_against_oracle(spec, _config(opt, schedule, clip), mode)


def test_no_decay_excludes_biases_and_norms_only():
    """``Parameter.wd_mult`` after make_trainer: 1 everywhere by default, 0 exactly on the
    names ``no_decay_bias_and_norm`` picks when asked; the optimizer's wd is the config's."""
    model = _model(GPT2)
    params = modules.canonical_parameters(model)
    run = BE.make_trainer(model, _config("adamw-no-decay", "constant"), STEPS).native
    assert {n: p.wd_mult for n, p in params.items()} == {
        n: 0.0 if training.no_decay_bias_and_norm(n) else 1.0 for n in params}
    assert run.trainer.optimizer.wd == 0.1
    assert any(p.wd_mult == 0.0 for p in params.values())
    BE.make_trainer(model, _config("adamw", "constant"), STEPS)  # resets every multiplier
    assert {p.wd_mult for p in params.values()} == {1.0}


@pytest.mark.parametrize("opt,schedule", [("adam-l2", "cosine"), ("sgd-momentum", "linear")])
def test_float32_tracks_the_float64_oracle(opt, schedule):
    """A float32 model trained natively stays within 1e-5 (loss) and 1e-4 (weights) of the
    float64 oracle over 10 steps. (Not AdamW at eps 1e-8: a k_proj.bias's float32 rounding
    noise, ~1e-9, is not small against eps, and Adam normalises it into 1.6e-4 steps.)"""
    config = _config(opt, schedule)
    model = _model(GPT2, "float32")
    logs = training.train(BE, model, _data(GPT2), config, STEPS, "hybridize")
    want_w, want_logs, _ = _oracle(GPT2, config)
    for got, want in zip(logs, want_logs, strict=True):
        assert abs(got.loss - want.loss) <= 1e-5 * abs(want.loss), (got.step, got.loss,
                                                                     want.loss)
    got_w = {n: v.astype(np.float64) for n, v in BE.get_weights(model).items()}
    assert all(v.dtype == np.float32 for v in BE.get_weights(model).values())
    err, worst = _max_rel(got_w, want_w)
    assert err <= 1e-4, f"{worst} off by {err:.3g}"


def test_float64_state_is_float64():
    """No float32 rounding in a float64 run: the state and the weights stay float64."""
    model = _model(GPT2)
    config = _config("adam-l2", "linear")
    trainer = BE.make_trainer(model, config, STEPS)
    rows = training.check_data(GPT2, _data(GPT2))
    BE.train_step(model, trainer, training.micro_batches(GPT2, rows, config, 0), 0, "hybridize")
    state = BE.optimizer_state(model, trainer)
    assert state and {v.dtype for v in state.values()} == {np.dtype(np.float64)}
    assert {v.dtype for v in BE.get_weights(model).values()} == {np.dtype(np.float64)}


# ---------------------------------------------------------------------- the dropout stream
DROPPY = GPT2.replace(dropout=0.1)
DROPPY_ED = VASWANI.replace(dropout=0.1)


def test_dropout_block_applies_the_given_mask_exactly():
    rng = np.random.default_rng(3)
    x = mx.nd.array(rng.standard_normal((2, 3, 5)), dtype="float64")
    mask = (rng.random((2, 3, 5)) >= 0.25) / 0.75
    block = modules.Dropout(0.25)
    block.initialize()
    block.mask = mx.nd.array(mask, dtype="float64")
    with mx.autograd.record(train_mode=True):
        y = block(x)
    np.testing.assert_array_equal(y.asnumpy(), x.asnumpy() * mask)
    with mx.autograd.predict_mode():  # a given mask applies in predict mode too
        np.testing.assert_array_equal(block(x).asnumpy(), x.asnumpy() * mask)
    block.mask = mx.nd.array(mask[:, :1], dtype="float64")  # a broadcastable mask is refused
    with pytest.raises(InputError, match="exact shape"):
        block(x)
    block.mask = None  # native again: identity when not training, draws when training
    np.testing.assert_array_equal(block(x).asnumpy(), x.asnumpy())
    x = mx.nd.array(rng.standard_normal((40, 50)), dtype="float64")  # 0.75**2000: never all kept
    with mx.autograd.record(train_mode=True):
        drawn = block(x).asnumpy()
    assert (drawn == 0).any() and not np.array_equal(drawn, x.asnumpy())


def test_a_hybridized_dropout_refuses_a_mask():
    block = modules.Dropout(0.5)
    block.initialize()
    block.hybridize()
    x = mx.nd.ones((2, 3), dtype="float64")
    block(x)  # traced without a mask
    block.mask = mx.nd.zeros((2, 3), dtype="float64")
    with pytest.raises(RuntimeError, match="imperatively"):
        block._clear_cached_op() or block(x)
    with modules.imperative(block):
        np.testing.assert_array_equal(block(x).asnumpy(), np.zeros((2, 3)))


@pytest.mark.parametrize("spec", [DROPPY, DROPPY_ED], ids=["decoder", "encoder-decoder"])
def test_every_dropout_block_is_a_stream_site(spec):
    """The model's Dropout blocks are exactly the sites of ``training.dropout_sites`` (each
    receives its mask), and an unknown site is refused."""
    model = BE.build(spec, "float64")
    blocks = {path for path, b in modules._named_blocks(model) if isinstance(b, modules.Dropout)}
    rows = training.check_data(spec, _data(spec))
    batch = training.micro_batches(spec, rows, _config("adamw", "constant"), 0)[0]
    sites = set(training.dropout_sites(spec, batch))
    # a decoder-only DecoderLayer owns a dropout3 that never runs (no cross-attention)
    unused = set() if spec.architecture == "encoder-decoder" else {
        f"decoder.layers.{i}.dropout3" for i in range(spec.decoder_layers)}
    assert blocks == sites | unused and not sites & unused
    assert not any(type(b) is mx.gluon.nn.Dropout for _, b in modules._named_blocks(model))
    with pytest.raises(InputError, match="not a Dropout"):
        with modules.use_dropout_masks(model, {"decoder.layers.0.norm1": mx.nd.ones((1,))}):
            pass


def _stream_run(spec, mode, seed=0, dropout="stream"):
    config = training.TrainConfig(optimizer="adamw", lr=3e-3, batch_size=4, grad_accum=2,
                                  clip_grad_norm=CLIP, dropout=dropout, seed=seed)
    model = _model(spec)
    logs = training.train(BE, model, _data(spec), config, 4, mode)
    return BE.get_weights(model), logs


@pytest.mark.parametrize("spec", [DROPPY, DROPPY_ED], ids=["decoder", "encoder-decoder"])
def test_the_stream_is_reproducible_and_used_in_every_mode(spec):
    """Same seed: identical weights; another seed: different ones; the imperative and the
    hybridized run agree to 1e-12 (so the hybridized run used the stream's masks, not MXNet's
    draws); and the stream really drops (it differs from a run without dropout)."""
    imperative, logs_i = _stream_run(spec, "imperative")
    again, _ = _stream_run(spec, "imperative")
    assert all(np.array_equal(imperative[n], again[n]) for n in imperative)
    hybrid, logs_h = _stream_run(spec, "hybridize")
    err, worst = _max_rel(hybrid, imperative)
    assert err <= 1e-12, f"{worst}: {err:.3g}"
    assert [round(l.loss, 12) for l in logs_h] == [round(l.loss, 12) for l in logs_i]
    other, _ = _stream_run(spec, "hybridize", seed=1)
    assert _max_rel(other, imperative)[0] > 1e-6
    off, _ = _stream_run(spec, "hybridize", dropout="off")
    assert _max_rel(off, imperative)[0] > 1e-6
    native, _ = _stream_run(spec, "hybridize", dropout="native")
    assert _max_rel(native, imperative)[0] > 1e-6


def test_the_hybridized_graph_survives_a_stream_step():
    """Stream steps run imperatively but keep the cached graph: a later forward still goes
    through it and matches the imperative forward."""
    model = _model(DROPPY)
    config = training.TrainConfig(optimizer="sgd", lr=0.01, batch_size=4, dropout="stream")
    training.train(BE, model, _data(DROPPY), config, 1, "hybridize")
    assert model._active  # hybridized again after the imperative stream step
    inputs = {"input_ids": _data(DROPPY)[:2]}
    a = BE.forward(model, inputs, "hybridize")["logits"]
    assert model._cached_op is not None
    b = BE.forward(model, inputs, "imperative")["logits"]
    assert np.abs(a - b).max() <= 1e-12 * np.abs(b).max()
    assert all(b.mask is None for _, b in modules._named_blocks(model)
               if isinstance(b, modules.Dropout))


# ---------------------------------------------------------------------- MXNet's own semantics
def _native_steps(opt, grads, w0, index=0):
    """Run MXNet optimizer ``opt`` on one float64 weight through its Updater."""
    updater = mx.optimizer.get_updater(opt)
    w = mx.nd.array(w0, dtype="float64")
    for g in grads:
        updater(index, mx.nd.array(g, dtype="float64"), w)
    return w.asnumpy()


def _numpy_steps(opt, grads, w0, lrs=None):
    w = {"w": w0.copy()}
    for i, g in enumerate(grads):
        w = opt.step(w, {"w": g}, lr=None if lrs is None else lrs[i])
    return w["w"]


def test_native_adam_puts_eps_before_the_bias_correction():
    """``mx.optimizer.Adam`` adds ``epsilon`` to the uncorrected ``sqrt(v)``: with gradients of
    the size of eps (1e-3) its first update is ~10x smaller than torch's (off by 0.91 of
    torch's update: optimizers.py); ``epsilon = eps * sqrt(1 - beta2^t)`` corrects it exactly
    up to float32 operator parameters; the registered ``Adam`` matches torch to rounding."""
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(50)
    grads = [1e-3 * rng.standard_normal(50) for _ in range(3)]
    want = _numpy_steps(training.Adam(lr=0.1, eps=1e-3), grads[:1], w0)
    native = _native_steps(mx.optimizer.Adam(learning_rate=0.1, epsilon=1e-3), grads[:1], w0)
    size = np.abs(want - w0).max()
    assert 0.85 < np.abs(native - want).max() / size < 0.95
    corrected = _native_steps(mx.optimizer.Adam(learning_rate=0.1, epsilon=1e-3 * math.sqrt(
        1 - 0.999)), grads[:1], w0)  # float32 lr / epsilon parameters of adam_update
    assert 1e-8 < np.abs(corrected - want).max() / size < 1e-4  # 4.6e-6: float32 parameters
    ours = _native_steps(optimizers.Adam(learning_rate=0.1, epsilon=1e-3), grads[:1], w0)
    assert np.abs(ours - want).max() <= 1e-15 * np.abs(want).max()
    # three steps, L2 decay: still exact
    want = _numpy_steps(training.Adam(lr=0.1, eps=1e-3, weight_decay=0.01), grads, w0)
    ours = _native_steps(optimizers.Adam(learning_rate=0.1, epsilon=1e-3, wd=0.01), grads, w0)
    assert np.abs(ours - want).max() <= 1e-14 * np.abs(want).max()


def test_native_sgd_keeps_the_rate_in_its_velocity():
    """``mx.optimizer.SGD`` stores ``-lr * buf``: under a warm-up (rates 0, 1/4, 2/4, 3/4 of
    0.1) it is off by ~0.6 of the total update (optimizers.py); the registered ``SGD`` under
    the same ``Schedule`` matches torch's."""
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(50)
    grads = [rng.standard_normal(50) for _ in range(4)]
    schedule = dict(schedule="linear", warmup_steps=4, total_steps=8)
    lrs = [training.lr_at(k, 0.1, **schedule) for k in range(4)]
    want = _numpy_steps(training.SGD(lr=0.1, momentum=0.9), grads, w0, lrs)
    size = np.abs(want - w0).max()
    native = _native_steps(mx.optimizer.SGD(momentum=0.9, lr_scheduler=optimizers.Schedule(
        0.1, **schedule)), grads, w0)
    assert 0.5 < np.abs(native - want).max() / size < 0.7
    ours = _native_steps(optimizers.SGD(momentum=0.9, lr_scheduler=optimizers.Schedule(
        0.1, **schedule)), grads, w0)
    assert np.abs(ours - want).max() <= 1e-15 * np.abs(want).max()


def test_fused_update_ops_round_the_rate_to_float32():
    """``sgd_update`` takes ``lr`` as a C++ float: 1.7e-9 relative error in a float64 weight
    (lr 1/30), the reason the optimizers use ``mx.nd`` arithmetic; the registered ``SGD``
    without momentum is exact."""
    rng = np.random.default_rng(2)
    w0, g = rng.standard_normal(1000), rng.standard_normal(1000)
    lr = 0.1 / 3
    want = w0 - lr * g
    fused = mx.nd.array(w0, dtype="float64")
    mx.nd.sgd_update(fused, mx.nd.array(g, dtype="float64"), lr=lr, wd=0.0, out=fused)
    err = np.abs(fused.asnumpy() - want).max() / np.abs(want).max()
    assert 1e-10 < err < 1e-8
    ours = _native_steps(optimizers.SGD(learning_rate=lr), [g], w0)
    assert np.abs(ours - want).max() == 0.0


def test_named_optimizers_skip_decay_on_biases_but_the_trainer_does_not():
    """``set_wd_mult``'s naming rule: given ``param_idx2name``, a ``*_bias`` gets wd 0; a
    ``gluon.Trainer`` passes ``param_dict`` and every Parameter decays (wd_mult 1)."""
    named = mx.optimizer.SGD(wd=0.1, param_idx2name={0: "dense0_weight", 1: "dense0_bias"})
    assert named._get_wds([0, 1]) == [0.1, 0.0]
    model = _model(GPT2)
    run = BE.make_trainer(model, _config("adamw", "constant"), STEPS).native
    n = len(run.params)
    assert run.trainer.optimizer._get_wds(list(range(n))) == [0.1] * n


def test_trainer_step_rescales_by_the_batch_size():
    """``Trainer.step(batch_size)`` multiplies the gradient by ``1 / batch_size`` (so training
    steps with ``step(1)`` and a mean loss)."""
    p = mx.gluon.Parameter("w", shape=(3,), dtype="float64", init=mx.init.Zero())
    p.initialize()
    trainer = mx.gluon.Trainer([p], optimizers.SGD(learning_rate=1.0), kvstore=None)
    with mx.autograd.record():
        loss = (p.data() * mx.nd.array([1.0, 2.0, 3.0], dtype="float64")).sum()
    loss.backward()
    trainer.step(4)
    np.testing.assert_array_equal(p.data().asnumpy(), -np.array([1.0, 2.0, 3.0]) / 4)


def test_clip_follows_torch_not_gluon():
    """``clip_grad_norm`` uses torch's ``1e-6`` (``clip_global_norm``: ``1e-8``) and matches the
    oracle's :func:`xformer.training.clip_grad_norm` exactly in float64; below the limit the
    arrays are unchanged."""
    rng = np.random.default_rng(4)
    arrays = [rng.standard_normal(s) * 1e-3 for s in ((3, 4), (5,), (2, 2, 2))]
    want, want_norm = training.clip_grad_norm({str(i): a for i, a in enumerate(arrays)}, 1e-3)
    ours = [mx.nd.array(a, dtype="float64") for a in arrays]
    norm = optimizers.clip_grad_norm(ours, 1e-3)
    assert abs(norm - want_norm) <= 1e-15 * want_norm
    for i, a in enumerate(ours):
        np.testing.assert_allclose(a.asnumpy(), want[str(i)], rtol=1e-15, atol=0)
    with pytest.raises(mx.base.MXNetError, match="Non-uniform data type"):  # float32 only
        mx.gluon.utils.clip_global_norm([mx.nd.array(a, dtype="float64") for a in arrays], 1e-3)
    gluon = [mx.nd.array(a, dtype="float32") for a in arrays]
    mx.gluon.utils.clip_global_norm(gluon, 1e-3)
    diff = max(np.abs(g.asnumpy() - o.asnumpy()).max() / np.abs(o.asnumpy()).max()
               for g, o in zip(gluon, ours))
    assert math.isclose(diff, (1e-6 - 1e-8) / want_norm, rel_tol=0.05)  # 2e-4 here
    small = [mx.nd.array(a, dtype="float64") for a in arrays]
    optimizers.clip_grad_norm(small, 10.0)
    assert all(np.array_equal(s.asnumpy(), a) for s, a in zip(small, arrays))
    with pytest.raises(InputError, match="max_norm"):
        optimizers.clip_grad_norm(small, 0.0)


def test_schedule_maps_num_update_to_the_step():
    """``num_update`` n (1 on the first update) gets ``lr_at(n - 1)``, bit for bit."""
    config = training.TrainConfig(lr=0.3, schedule="cosine", warmup_steps=3)
    schedule = optimizers.Schedule.from_config(config, 12)
    assert schedule(0) == schedule(1) == config.lr_at(0, 12) == 0.0
    assert [schedule(n + 1) for n in range(12)] == [config.lr_at(k, 12) for k in range(12)]
    assert isinstance(schedule, mx.lr_scheduler.LRScheduler)
    assert mx.optimizer.create("xformer_adamw").__class__ is optimizers.AdamW
    assert mx.optimizer.create("sgd").__class__ is mx.optimizer.SGD  # MXNet's own kept


def test_lm_loss_float32_gradient_is_float32_accurate():
    """The float32 gradient of :func:`xformer_mxnet.backend.lm_loss` (logsumexp written out)
    against the float64 numpy gradient: median relative error ~2e-7 per logit; MXNet's
    ``log_softmax`` + ``pick`` gives ~1.7e-6 (10x more), which Adam passes on to the updates of
    components near ``eps`` (backend.py's docstring)."""
    from xformer_mxnet.backend import lm_loss

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 16, 1000)) * 3).astype(np.float32)
    labels = rng.integers(0, 1000, (4, 16))
    want = training.causal_lm_loss_grad(x.astype(np.float64), labels)

    def grad(fn):
        a = mx.nd.array(x, dtype="float32")
        a.attach_grad()
        with mx.autograd.record():
            loss = fn(a)
        loss.backward()
        return a.grad.asnumpy()

    def log_softmax_pick(a):
        y = mx.nd.array(labels[:, 1:], dtype="float32")
        logp = mx.nd.log_softmax(mx.nd.slice_axis(a, axis=1, begin=0, end=-1), axis=-1)
        return -mx.nd.sum(mx.nd.pick(logp, y, axis=-1)) / float(labels[:, 1:].size)

    def median_rel(g):
        return float(np.median(np.abs(g - want) / np.maximum(np.abs(want), 1e-30)))

    ours, native = median_rel(grad(lambda a: lm_loss(a, labels, True))), median_rel(
        grad(log_softmax_pick))
    assert ours < 5e-7 and native > 4 * ours, (ours, native)
