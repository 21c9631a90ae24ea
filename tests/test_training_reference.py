"""The numpy training oracle (xformer/training.py) against the code it restates: ``torch.optim``
(SGD, Nesterov, Adam, AdamW with and without excluded names), ``transformers``' schedules through
``LambdaLR``, ``torch.nn.utils.clip_grad_norm_``, ``torch.nn.functional.cross_entropy`` and its
autograd, Hugging Face GPT-2 losses and ``shift_tokens_right``, and finite differences; plus the
statistics of the seeded 80/10/10 masking and the one-line errors of bad arguments.

Bounds: float64 ``<= 1e-12`` relative (``max |a - b| / max(max |a|, max |b|)``, as
xformer/conformance/compare.py), schedules exact. torch and transformers are imported inside the
tests only; the ``_*_error`` helpers return the measured errors (the test asserts the bound)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xformer import training as tr
from xformer.errors import InputError

F64 = 1e-12  # float64 bound of this file: the oracle restates the upstream arithmetic
FD = 1e-8    # finite differences (central, h = 1e-6): truncation ~h^2, rounding ~1e-16 / h


def rel(a, b) -> float:
    """``max |a - b| / max(max |a|, max |b|)`` (0 for two zero arrays)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    scale = max(np.abs(a).max(initial=0.0), np.abs(b).max(initial=0.0))
    return 0.0 if scale == 0 else float(np.abs(a - b).max() / scale)


def _torch():
    torch = pytest.importorskip("torch")
    return torch


# ----------------------------------------------------------------------------- fixtures

NAMES_SHAPES = {
    "embeddings.word_embeddings.weight": (11, 4),
    "encoder.layers.0.self_attn.q_proj.weight": (4, 4),
    "encoder.layers.0.self_attn.q_proj.bias": (4,),
    "encoder.layers.0.norm1.weight": (4,),
    "encoder.layers.0.norm1.bias": (4,),
    "decoder.final_norm.weight": (4,),
}


def _params_and_grads(seed: int, steps: int):
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s) for n, s in NAMES_SHAPES.items()}
    grads = [{n: rng.standard_normal(s) * 10.0 ** rng.integers(-3, 2)
              for n, s in NAMES_SHAPES.items()} for _ in range(steps)]
    return params, grads


OPTIMIZER_CASES = {
    "sgd": ("sgd", {}),
    "sgd-momentum": ("sgd", {"momentum": 0.9}),
    "sgd-momentum-wd": ("sgd", {"momentum": 0.8, "weight_decay": 0.1}),
    "sgd-nesterov": ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}),
    "adam": ("adam", {"betas": (0.9, 0.999), "eps": 1e-8}),
    "adam-l2": ("adam", {"betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.1}),
    "adamw": ("adamw", {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}),
    "adamw-no-decay": ("adamw", {"weight_decay": 0.1,
                                 "no_decay": tr.no_decay_bias_and_norm}),
}


def _torch_optimizer(torch, kind, options, tensors, lr):
    no_decay = options.get("no_decay")
    opts = {k: v for k, v in options.items() if k != "no_decay"}
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[kind]
    if no_decay is None:
        groups = [{"params": list(tensors.values())}]
    else:
        groups = [{"params": [t for n, t in tensors.items() if not no_decay(n)]},
                  {"params": [t for n, t in tensors.items() if no_decay(n)],
                   "weight_decay": 0.0}]
    return cls(groups, lr=lr, **opts)


def _optimizer_error(case: str, steps: int = 6) -> float:
    """Worst relative error of parameters and state over ``steps`` updates vs ``torch.optim``,
    with a different learning rate at each step (as a schedule sets it)."""
    torch = _torch()
    kind, options = OPTIMIZER_CASES[case]
    params, grads = _params_and_grads(1, steps)
    tensors = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    ref = _torch_optimizer(torch, kind, options, tensors, lr=0.05)
    ours = tr.make_optimizer(kind, 0.05, **options)
    worst = 0.0
    for k in range(steps):
        lr = 0.05 * (k + 1) / steps
        for group in ref.param_groups:
            group["lr"] = lr
        for n, t in tensors.items():
            t.grad = torch.tensor(grads[k][n])
        ref.step()
        params = ours.step(params, grads[k], lr)
        for n, t in tensors.items():
            worst = max(worst, rel(params[n], t.detach().numpy()))
            state, mine = ref.state[t], ours.state[n]
            if kind == "sgd":
                buf = state.get("momentum_buffer")
                assert (buf is None) == (mine["momentum_buffer"] is None)
                if buf is not None:
                    worst = max(worst, rel(mine["momentum_buffer"], buf.numpy()))
            else:
                assert mine["step"] == int(state["step"].item()) == k + 1
                worst = max(worst, rel(mine["exp_avg"], state["exp_avg"].numpy()),
                            rel(mine["exp_avg_sq"], state["exp_avg_sq"].numpy()))
    return worst


@pytest.mark.parametrize("case", list(OPTIMIZER_CASES))
def test_optimizer_matches_torch_optim(case):
    assert _optimizer_error(case) <= F64


def test_no_decay_predicate_picks_biases_and_norms():
    excluded = sorted(n for n in NAMES_SHAPES if tr.no_decay_bias_and_norm(n))
    assert excluded == ["decoder.final_norm.weight", "encoder.layers.0.norm1.bias",
                        "encoder.layers.0.norm1.weight",
                        "encoder.layers.0.self_attn.q_proj.bias"]
    assert not tr.no_decay_bias_and_norm("embeddings.word_embeddings.weight")


def test_optimizer_skips_missing_gradients_and_copies():
    params, grads = _params_and_grads(2, 1)
    name = "encoder.layers.0.norm1.bias"
    grads[0][name] = None
    opt = tr.Adam(0.1)
    before = {n: p.copy() for n, p in params.items()}
    new = opt.step(params, grads[0])
    assert all(np.array_equal(params[n], before[n]) for n in params)  # inputs untouched
    assert np.array_equal(new[name], params[name]) and new[name] is not params[name]
    assert name not in opt.state and len(opt.state) == len(params) - 1


# ----------------------------------------------------------------------------- schedules

SCHEDULE_CASES = [("constant", 0, 10), ("constant", 3, 10), ("linear", 0, 10),
                  ("linear", 4, 10), ("linear", 10, 10), ("linear", 1, 1), ("cosine", 0, 12),
                  ("cosine", 5, 12), ("cosine", 12, 12)]


def _schedule_error(schedule: str, warmup: int, total: int, base_lr: float = 3e-4) -> float:
    """Worst relative error of ``lr_at(k)`` against the rate a ``torch.optim`` step ``k`` uses
    under the ``transformers`` scheduler (read before ``optimizer.step()``), k = 0..total."""
    torch = _torch()
    import transformers

    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=base_lr)
    if schedule == "constant":
        sched = transformers.get_constant_schedule_with_warmup(opt, warmup)
    elif schedule == "linear":
        sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    else:
        sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, total)
    worst = 0.0
    for k in range(total + 1):
        used = opt.param_groups[0]["lr"]
        ours = tr.lr_at(k, base_lr, schedule, warmup, total)
        worst = max(worst, abs(ours - used) / max(abs(used), 1e-300))
        param.grad = torch.ones(1)
        opt.step()
        sched.step()
    return worst


@pytest.mark.parametrize("schedule, warmup, total", SCHEDULE_CASES)
def test_schedule_matches_transformers(schedule, warmup, total):
    assert _schedule_error(schedule, warmup, total) == 0.0  # exact: the same float operations


def test_first_step_of_a_warm_up_has_rate_zero():
    assert tr.lr_at(0, 1e-3, "linear", 5, 50) == 0.0
    assert tr.lr_at(0, 1e-3, "linear", 0, 50) == 1e-3
    assert tr.lr_at(5, 1e-3, "cosine", 5, 50) == 1e-3
    assert tr.lr_at(50, 1e-3, "linear", 5, 50) == 0.0
    assert tr.lr_at(7, 2e-5) == 2e-5


# ----------------------------------------------------------------------------- clip, accumulate

def _clip_error(scale: float, max_norm: float) -> float:
    torch = _torch()
    _, grads = _params_and_grads(3, 1)
    grads = {n: g * scale for n, g in grads[0].items()}
    tensors = [torch.zeros(g.shape, dtype=torch.float64, requires_grad=True)
               for g in grads.values()]
    for t, g in zip(tensors, grads.values()):
        t.grad = torch.tensor(g)
    total_ref = torch.nn.utils.clip_grad_norm_(tensors, max_norm)
    clipped, total = tr.clip_grad_norm(grads, max_norm)
    worst = rel(total, total_ref.item())
    for t, n in zip(tensors, grads):
        worst = max(worst, rel(clipped[n], t.grad.numpy()))
    return worst


@pytest.mark.parametrize("scale, max_norm", [(1.0, 1.0), (1e-3, 1.0), (100.0, 0.5)])
def test_clip_grad_norm_matches_torch(scale, max_norm):
    assert _clip_error(scale, max_norm) <= F64


def test_clip_grad_norm_leaves_small_gradients_alone():
    grads = {"a": np.array([3e-3, 4e-3]), "b": None}
    clipped, total = tr.clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(5e-3, rel=1e-15) and clipped["b"] is None
    assert np.array_equal(clipped["a"], grads["a"])


def _accumulate_error(k: int = 3) -> float:
    """``accumulate`` of the per-micro-batch gradients of a linear LM head against torch's
    ``(loss / K).backward()`` accumulated in ``.grad`` (Hugging Face ``Trainer``)."""
    torch = _torch()
    import torch.nn.functional as F

    rng = np.random.default_rng(4)
    w = rng.standard_normal((9, 5))  # (V, D)
    xs = [rng.standard_normal((2, 3, 5)) for _ in range(k)]
    ys = [rng.integers(0, 9, (2, 3)) for _ in range(k)]
    ys[1][0, :2] = -100  # micro-batches with different token counts
    tw = torch.tensor(w, requires_grad=True)
    for x, y in zip(xs, ys):
        logits = torch.tensor(x) @ tw.T
        (F.cross_entropy(logits.reshape(-1, 9), torch.tensor(y).reshape(-1)) / k).backward()
    micro = []
    for x, y in zip(xs, ys):
        dlogits = tr.masked_lm_loss_grad(x @ w.T, y)
        micro.append({"w": np.einsum("btv,btd->vd", dlogits, x)})
    return rel(tr.accumulate(micro)["w"], tw.grad.numpy())


def test_accumulate_matches_trainer_loss_scaling():
    assert _accumulate_error() <= F64


def test_accumulate_is_the_mean_in_order():
    a, b = np.array([1.0, 2.0]), np.array([3.0, 5.0])
    out = tr.accumulate([{"w": a, "n": None}, {"w": b, "n": None}])
    assert np.array_equal(out["w"], a / 2 + b / 2) and out["n"] is None


# ----------------------------------------------------------------------------- a whole loop

def _loop_error(kind: str = "adamw", schedule: str = "linear", steps: int = 10, k: int = 2,
                max_norm: float = 0.5) -> float:
    """``steps`` updates of a tiny causal LM (``logits = (x * norm.weight) @ lm.weight^T +
    lm.bias``), ``k`` micro-batches each, clipping, BERT's no-decay names: this module against
    the Hugging Face loop (``(loss / k).backward()``, ``clip_grad_norm_``, ``optimizer.step()``,
    ``scheduler.step()``) with ``torch.optim`` and ``transformers``' schedule. Worst relative
    error of the parameters after each step."""
    torch = _torch()
    import torch.nn.functional as F
    import transformers

    rng = np.random.default_rng(9)
    v, d = 7, 5
    params = {"lm.weight": rng.standard_normal((v, d)), "lm.bias": rng.standard_normal(v),
              "norm.weight": 1 + 0.1 * rng.standard_normal(d)}
    batches = [[(rng.standard_normal((2, 4, d)), rng.integers(0, v, (2, 4)))
                for _ in range(k)] for _ in range(steps)]
    batches[3][1][1][0, 2:] = -100  # padding in one micro-batch
    options = {"sgd": {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
               "adam": {"weight_decay": 0.01}, "adamw": {"weight_decay": 0.1}}[kind]
    options["no_decay"] = tr.no_decay_bias_and_norm
    base_lr, warmup = 0.1, 3
    tensors = {n: torch.tensor(p, requires_grad=True) for n, p in params.items()}
    opt = _torch_optimizer(torch, kind, options, tensors, base_lr)
    sched = {"constant": lambda o: transformers.get_constant_schedule_with_warmup(o, warmup),
             "linear": lambda o: transformers.get_linear_schedule_with_warmup(o, warmup, steps),
             "cosine": lambda o: transformers.get_cosine_schedule_with_warmup(o, warmup, steps),
             }[schedule](opt)
    ours = tr.make_optimizer(kind, base_lr, **options)
    worst = 0.0
    for step, micro in enumerate(batches):
        for x, y in micro:  # the Hugging Face loop
            h = torch.tensor(x) * tensors["norm.weight"]
            logits = h @ tensors["lm.weight"].T + tensors["lm.bias"]
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, v),
                                   torch.tensor(y)[:, 1:].reshape(-1), ignore_index=-100)
            (loss / k).backward()
        torch.nn.utils.clip_grad_norm_(list(tensors.values()), max_norm)
        opt.step()
        sched.step()
        opt.zero_grad()
        grads = []
        for x, y in micro:  # this module, with the chain rule written out
            h = x * params["norm.weight"]
            dl = tr.causal_lm_loss_grad(h @ params["lm.weight"].T + params["lm.bias"], y)
            dh = dl @ params["lm.weight"]
            grads.append({"lm.weight": np.einsum("btv,btd->vd", dl, h),
                          "lm.bias": dl.sum((0, 1)), "norm.weight": (dh * x).sum((0, 1))})
        clipped, _ = tr.clip_grad_norm(tr.accumulate(grads), max_norm)
        params = ours.step(params, clipped, tr.lr_at(step, base_lr, schedule, warmup, steps))
        worst = max(worst, *(rel(params[n], t.detach().numpy()) for n, t in tensors.items()))
    return worst


@pytest.mark.parametrize("kind", list(tr.OPTIMIZERS))
@pytest.mark.parametrize("schedule", tr.SCHEDULES)
def test_a_training_loop_matches_hugging_face_and_torch_optim(kind, schedule):
    assert _loop_error(kind, schedule) <= F64


# ----------------------------------------------------------------------------- objectives

def _logits_labels(seed=5, shape=(3, 6, 13), ignore=((0, 0), (1, 4), (2, 5))):
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(shape) * 3.0
    labels = rng.integers(0, shape[-1], shape[:2])
    for b, t in ignore:
        labels[b, t] = -100
    return logits, labels


LOSSES = {
    "causal": (tr.causal_lm_loss, tr.causal_lm_loss_grad, True),
    "seq2seq": (tr.seq2seq_lm_loss, tr.seq2seq_lm_loss_grad, False),
    "masked": (tr.masked_lm_loss, tr.masked_lm_loss_grad, False),
}


def _loss_vs_torch_error(kind: str, dtype=np.float64) -> tuple[float, float]:
    """(loss, grad) relative errors against ``F.cross_entropy(ignore_index=-100)`` and its
    autograd, the causal case on the shifted logits and labels."""
    torch = _torch()
    import torch.nn.functional as F

    loss_fn, grad_fn, shift = LOSSES[kind]
    logits, labels = _logits_labels()
    logits = logits.astype(dtype)
    x = torch.tensor(logits, requires_grad=True)
    y = torch.tensor(labels)
    xs, ys = (x[:, :-1], y[:, 1:]) if shift else (x, y)
    ref = F.cross_entropy(xs.reshape(-1, xs.shape[-1]), ys.reshape(-1), ignore_index=-100)
    ref.backward()
    loss, grad = loss_fn(logits, labels), grad_fn(logits, labels)
    assert loss.dtype == dtype and grad.dtype == dtype
    return rel(loss, ref.item()), rel(grad, x.grad.numpy())


@pytest.mark.parametrize("kind", list(LOSSES))
def test_loss_and_grad_match_torch_cross_entropy(kind):
    loss_err, grad_err = _loss_vs_torch_error(kind)
    assert loss_err <= F64 and grad_err <= F64
    loss_err, grad_err = _loss_vs_torch_error(kind, np.float32)
    assert loss_err <= 1e-6 and grad_err <= 1e-6


def _finite_difference_error(kind: str, h: float = 1e-6) -> float:
    loss_fn, grad_fn, _ = LOSSES[kind]
    logits, labels = _logits_labels(6, (2, 4, 7), ((0, 1), (1, 3)))
    grad = grad_fn(logits, labels)
    numeric = np.zeros_like(logits)
    for idx in np.ndindex(logits.shape):
        up, down = logits.copy(), logits.copy()
        up[idx] += h
        down[idx] -= h
        numeric[idx] = (loss_fn(up, labels) - loss_fn(down, labels)) / (2 * h)
    return rel(grad, numeric)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_grad_matches_finite_differences(kind):
    assert _finite_difference_error(kind) <= FD


def test_loss_is_stable_and_ignores_what_it_should():
    logits, labels = _logits_labels()
    big = logits + 1e4  # log-sum-exp: a constant shift changes nothing
    assert rel(tr.masked_lm_loss(big, labels), tr.masked_lm_loss(logits, labels)) <= 1e-11
    changed = logits.copy()
    changed[:, -1] = 99.0  # the last position predicts nothing in the causal loss
    assert tr.causal_lm_loss(changed, labels) == tr.causal_lm_loss(logits, labels)
    assert not tr.causal_lm_loss_grad(logits, labels)[:, -1].any()
    none = np.full(labels.shape, -100)
    with np.errstate(invalid="ignore"):
        assert math.isnan(tr.masked_lm_loss(logits, none))  # 0 / 0, as torch
    assert not tr.masked_lm_loss_grad(logits, none).any()  # torch's backward gives zeros too


def _gpt2_errors() -> dict[str, float]:
    """Our causal loss on a tiny random float64 GPT-2's logits (padded rows, labels from the
    attention mask) against the model's own ``labels=`` losses: ``GPT2LMHeadModel`` (its
    ``ForCausalLMLoss`` upcasts the logits to float32 first) and ``GPT2DoubleHeadsModel`` (inline
    float64 ``CrossEntropyLoss`` on the shifted logits)."""
    torch = _torch()
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=37, n_positions=16, n_embd=16, n_layer=1,
                                     n_head=2, bos_token_id=None, eos_token_id=None,
                                     loss_type="ForCausalLM")
    rng = np.random.default_rng(7)
    ids = rng.integers(0, 37, (3, 8))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    labels = tr.labels_from_inputs(ids, mask)
    out = {}
    for cls in (transformers.GPT2LMHeadModel, transformers.GPT2DoubleHeadsModel):
        model = cls(config).double().eval()
        with torch.no_grad():
            res = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                        labels=torch.tensor(labels))
        logits = res.logits.numpy()
        out[cls.__name__] = rel(tr.causal_lm_loss(logits, labels), res.loss.item())
        out[cls.__name__ + "(dtype)"] = str(res.loss.dtype)
        if cls is transformers.GPT2LMHeadModel:
            out["GPT2LMHeadModel vs our float32"] = rel(
                tr.causal_lm_loss(logits.astype(np.float32), labels), res.loss.item())
    return out


def test_causal_loss_matches_hugging_face_gpt2():
    errors = _gpt2_errors()
    assert errors["GPT2DoubleHeadsModel(dtype)"] == "torch.float64"
    assert errors["GPT2DoubleHeadsModel"] <= F64
    # GPT2LMHeadModel's loss is float32 even for a float64 model (logits.float() upcast): it
    # agrees with ours only to float32 precision, computed in float32 or float64.
    assert errors["GPT2LMHeadModel vs our float32"] <= 1e-6
    assert errors["GPT2LMHeadModel"] <= 1e-6


def test_labels_and_decoder_inputs_follow_hugging_face():
    torch = _torch()
    from transformers.models.bart.modeling_bart import shift_tokens_right

    ids = np.array([[5, 6, 7, 1], [8, 9, 1, 1]])
    labels = tr.labels_from_inputs(ids, np.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    assert labels.tolist() == [[5, 6, 7, 1], [8, 9, -100, -100]]
    assert tr.labels_from_inputs(ids).tolist() == ids.tolist()
    ours = tr.shift_tokens_right(labels, 2, 1)
    ref = shift_tokens_right(torch.tensor(labels), 1, 2)
    assert ours.tolist() == ref.tolist() == [[2, 5, 6, 7], [2, 8, 9, 1]]


# ----------------------------------------------------------------------------- masking

def test_mask_tokens_is_seeded_and_follows_80_10_10():
    vocab, mask_id = 30522, 103
    rng = np.random.default_rng(8)
    ids = rng.integers(1000, vocab, (1000, 1000))
    special = np.zeros(ids.shape, dtype=bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    masked, labels = tr.mask_tokens(ids, vocab, mask_id, 123, special_tokens_mask=special)
    again = tr.mask_tokens(ids, vocab, mask_id, 123, special_tokens_mask=special)
    assert np.array_equal(masked, again[0]) and np.array_equal(labels, again[1])
    assert not np.array_equal(tr.mask_tokens(ids, vocab, mask_id, 124)[1], labels)
    assert masked.dtype == labels.dtype == np.int64 and ids.max() < vocab

    selected = labels != -100
    assert not selected[special].any()
    assert np.array_equal(labels[selected], ids[selected])
    assert np.array_equal(masked[~selected], ids[~selected])  # unselected: untouched
    eligible = (~special).sum()
    n = selected.sum()
    p = n / eligible
    assert abs(p - 0.15) <= 6 * math.sqrt(0.15 * 0.85 / eligible)
    to_mask = (masked[selected] == mask_id).mean()
    kept = (masked[selected] == ids[selected]).mean()
    randomised = 1 - to_mask - kept
    sigma = math.sqrt(0.8 * 0.2 / n)
    slack = 2 / vocab  # a random id may be the original or the mask id
    assert abs(to_mask - 0.8) <= 6 * sigma + slack
    assert abs(kept - 0.1) <= 6 * math.sqrt(0.1 * 0.9 / n) + slack
    assert abs(randomised - 0.1) <= 6 * math.sqrt(0.1 * 0.9 / n) + slack
    ids_random = masked[selected & (masked != mask_id) & (masked != ids)]
    assert ids_random.min() >= 0 and ids_random.max() < vocab and ids_random.min() < 1000


def test_mask_tokens_probability_edges():
    ids = np.arange(20).reshape(2, 10)
    assert (tr.mask_tokens(ids, 20, 3, 0, 0.0)[1] == -100).all()
    masked, labels = tr.mask_tokens(ids, 20, 3, 0, 1.0)
    assert np.array_equal(labels, ids)


# ----------------------------------------------------------------------------- bad input

BAD = {
    "negative lr (schedule)": (lambda: tr.lr_at(0, -1e-3, "linear", 0, 10), "lr"),
    "negative lr (optimizer)": (lambda: tr.AdamW(-1e-3), "lr"),
    "negative lr (step)": (lambda: tr.SGD(0.1).step({"w": np.ones(2)}, {"w": np.ones(2)},
                                                    -0.5), "lr"),
    "nan lr": (lambda: tr.lr_at(0, float("nan")), "lr"),
    "unknown schedule": (lambda: tr.lr_at(0, 1e-3, "exponential", 0, 10), "schedule"),
    "unknown optimizer": (lambda: tr.make_optimizer("lamb", 1e-3), "optimizer"),
    "unknown option": (lambda: tr.make_optimizer("sgd", 1e-3, betas=(0.9, 0.9)), "betas"),
    "warmup > total": (lambda: tr.lr_at(0, 1e-3, "cosine", 11, 10), "warmup_steps"),
    "no total": (lambda: tr.lr_at(0, 1e-3, "linear", 2), "total_steps"),
    "negative step": (lambda: tr.lr_at(-1, 1e-3), "step"),
    "labels past vocab": (lambda: tr.causal_lm_loss(np.zeros((1, 3, 5)),
                                                    np.array([[1, 5, 2]])), "labels"),
    "negative label": (lambda: tr.masked_lm_loss_grad(np.zeros((1, 3, 5)),
                                                      np.array([[1, -3, 2]])), "labels"),
    "float labels": (lambda: tr.seq2seq_lm_loss(np.zeros((1, 3, 5)),
                                                np.array([[1.0, 2.0, 0.0]])), "labels"),
    "label shape": (lambda: tr.masked_lm_loss(np.zeros((1, 3, 5)), np.zeros((1, 4), int)),
                    "labels"),
    "int logits": (lambda: tr.masked_lm_loss(np.zeros((1, 3, 5), int),
                                             np.zeros((1, 3), int)), "logits"),
    "ids past vocab": (lambda: tr.mask_tokens(np.array([[1, 9]]), 5, 3, 0), "input_ids"),
    "mask id past vocab": (lambda: tr.mask_tokens(np.array([[1, 2]]), 5, 5, 0),
                           "mask_token_id"),
    "probability": (lambda: tr.mask_tokens(np.array([[1, 2]]), 5, 3, 0, 1.5),
                    "mlm_probability"),
    "beta 1": (lambda: tr.Adam(1e-3, betas=(1.0, 0.999)), "betas"),
    "nesterov": (lambda: tr.SGD(0.1, nesterov=True), "nesterov"),
    "max_norm": (lambda: tr.clip_grad_norm({"w": np.ones(2)}, 0.0), "max_norm"),
    "empty accumulation": (lambda: tr.accumulate([]), "micro_grads"),
    "grad shape": (lambda: tr.Adam().step({"w": np.ones(2)}, {"w": np.ones(3)}), "grads"),
    "unknown grad": (lambda: tr.Adam().step({"w": np.ones(2)}, {"v": np.ones(2)}), "grads"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_naming_the_argument(case):
    call, argument = BAD[case]
    with pytest.raises(InputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and argument in message, message
