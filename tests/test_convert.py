"""Hugging Face GPT-2 import / export (xformer.convert), xformer checkpoint directories
(save_pretrained / from_pretrained) and the GPT-2 reference of xformer_torch.reference_hf.

The GPT-2 checkpoints are written here by transformers' own ``save_pretrained`` (no hub): a
random ``GPT2LMHeadModel`` with every tensor redrawn at a scale where each one shows in the
logits (HF's 0.02 init would let a wrong bias or a swapped q/k hide)."""

import copy
import json
import math
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from xformer import CheckpointError, ModelSpec, SpecError, reference
from xformer.convert import export_gpt2, from_pretrained, import_gpt2
from xformer.weights import random_weights, save_pretrained, save_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

D, N_LAYER, N_HEAD, V, P = 32, 2, 4, 100, 32
VARIANTS = {
    # tied: the GPT-2 defaults (gelu_new, n_inner = 4 D, eps 1e-5)
    "tied": dict(tie_word_embeddings=True),
    # untied: lm_head.weight in the file, exact gelu, n_inner != 4 D, another eps
    "untied": dict(tie_word_embeddings=False, activation_function="gelu", n_inner=48,
                   layer_norm_epsilon=1e-6),
}


def _config(**kw):
    base = dict(n_embd=D, n_layer=N_LAYER, n_head=N_HEAD, vocab_size=V, n_positions=P,
                bos_token_id=V - 1, eos_token_id=V - 1, attn_implementation="eager")
    return transformers.GPT2Config(**{**base, **kw})


def _randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if p.ndim == 1:
                p.copy_(1 + 0.2 * r if name.endswith("weight") else 0.1 * r)
            elif name.endswith(("wte.weight", "wpe.weight")):
                p.copy_(0.5 * r)
            else:  # Conv1D (in, out); lm_head is an nn.Linear (out, in)
                fan_in = p.shape[1] if name.startswith("lm_head") else p.shape[0]
                p.copy_(r / math.sqrt(fan_in))
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """``{variant: (directory, GPT2LMHeadModel)}`` written by ``save_pretrained``."""
    out = {}
    for i, (name, kw) in enumerate(VARIANTS.items()):
        model = _randomise(transformers.GPT2LMHeadModel(_config(**kw)), seed=i)
        path = tmp_path_factory.mktemp(f"gpt2-{name}")
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


def _inputs(pad: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, V, (3, 12))
    mask = np.ones((3, 12), np.int64)
    if pad:  # right padding: the first token of every row is real
        mask[1, 8:] = 0
        mask[2, 3:] = 0
    return ids, mask


def _rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(b)))


def _hand_map(spec, sd):
    """The mapping written out by hand from modeling_gpt2 (independent of xformer.convert)."""
    g = {k.removeprefix("transformer."): v.detach().numpy() for k, v in sd.items()}
    out = {"embeddings.word_embeddings.weight": g["wte.weight"],
           "embeddings.position_embeddings.weight": g["wpe.weight"],
           "decoder.final_norm.weight": g["ln_f.weight"],
           "decoder.final_norm.bias": g["ln_f.bias"]}
    for i in range(spec.n_layers):
        p, h = f"decoder.layers.{i}", f"h.{i}"
        for j, proj in enumerate(["q_proj", "k_proj", "v_proj"]):
            out[f"{p}.self_attn.{proj}.weight"] = g[f"{h}.attn.c_attn.weight"][:, j * D:(j + 1) * D].T
            out[f"{p}.self_attn.{proj}.bias"] = g[f"{h}.attn.c_attn.bias"][j * D:(j + 1) * D]
        for ours, theirs in [("self_attn.out_proj", "attn.c_proj"), ("ffn.linear1", "mlp.c_fc"),
                             ("ffn.linear2", "mlp.c_proj")]:
            out[f"{p}.{ours}.weight"] = g[f"{h}.{theirs}.weight"].T
            out[f"{p}.{ours}.bias"] = g[f"{h}.{theirs}.bias"]
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            out[f"{p}.{ours}.weight"] = g[f"{h}.{theirs}.weight"]
            out[f"{p}.{ours}.bias"] = g[f"{h}.{theirs}.bias"]
    if not spec.tie_embeddings:
        out["lm_head.weight"] = g["lm_head.weight"]
    return out


# ---------------------------------------------------------------------- import
@pytest.mark.parametrize("variant", VARIANTS)
def test_import_maps_every_tensor(hf, variant):
    path, model = hf[variant]
    spec, w = import_gpt2(path)
    assert from_pretrained(path)[0] == spec  # from_pretrained dispatches on model_type
    kw = VARIANTS[variant]
    assert (spec.architecture, spec.norm_position, spec.positional, spec.head) == (
        "decoder", "pre", "learned", "lm")
    assert spec.final_norm and not spec.embedding_norm and spec.type_vocab_size == 0
    assert (spec.d_model, spec.n_heads, spec.n_layers, spec.vocab_size, spec.max_len) == (
        D, N_HEAD, N_LAYER, V, P)
    assert spec.d_ff == kw.get("n_inner", 4 * D)
    assert spec.norm_eps == kw.get("layer_norm_epsilon", 1e-5)
    assert spec.activation == {"tied": "gelu_tanh", "untied": "gelu"}[variant]
    assert spec.tie_embeddings == kw["tie_word_embeddings"]
    assert (spec.bos_token_id, spec.eos_token_id, spec.dropout) == (V - 1, V - 1, 0.1)
    assert list(w) == list(spec.parameter_shapes())
    expected = _hand_map(spec, model.state_dict())
    assert set(expected) == set(w)
    for name, arr in w.items():
        assert arr.shape == spec.parameter_shapes()[name] and arr.dtype == np.float32, name
        assert np.array_equal(arr, expected[name]), name


@pytest.mark.parametrize("pad", [False, True], ids=["full", "right-padded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_reference_logits_match_gpt2lmheadmodel(hf, variant, pad):
    path, model = hf[variant]
    spec, w = import_gpt2(path)
    ids, mask = _inputs(pad)
    errors = {}
    for dtype, tol in [("float32", 1e-5), ("float64", 1e-12)]:
        m = model if dtype == "float32" else copy.deepcopy(model).double()
        with torch.no_grad():
            want = m(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)
                     ).logits.numpy()
        got = reference.forward(spec, w, {"input_ids": ids, "attention_mask": mask},
                                dtype)["logits"]
        assert got.dtype == want.dtype == np.dtype(dtype)
        errors[dtype] = _rel(got, want)
        assert errors[dtype] < tol, (dtype, errors[dtype])
    print(f"{variant} pad={pad}: max|a-b|/max|b| {errors}")


def test_openai_style_file_without_prefix_with_buffers(hf, tmp_path):
    """The original OpenAI ``gpt2`` layout: no ``transformer.`` prefix, causal-mask buffers."""
    path, _ = hf["tied"]
    raw = load_file(str(path / "model.safetensors"))
    flat = {k.removeprefix("transformer."): v for k, v in raw.items()}
    for i in range(N_LAYER):
        flat[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, P, P), np.float32))
        flat[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    save_file(flat, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    spec, w = from_pretrained(tmp_path)
    spec0, w0 = import_gpt2(path)
    assert spec == spec0 and all(np.array_equal(w[k], w0[k]) for k in w0)


def test_gpt2model_directory_imports_headless(tmp_path):
    model = _randomise(transformers.GPT2Model(_config()), seed=5)
    model.save_pretrained(tmp_path / "hf")
    spec, w = import_gpt2(tmp_path / "hf")
    assert spec.head == "none" and not spec.tie_embeddings and "lm_head.weight" not in w
    export_gpt2(tmp_path / "out", spec, w)
    a, b = load_file(str(tmp_path / "hf/model.safetensors")), load_file(
        str(tmp_path / "out/model.safetensors"))
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "out/config.json").read_text())["architectures"] == [
        "GPT2Model"]
    assert import_gpt2(tmp_path / "out")[0] == spec


# ---------------------------------------------------------------------- export
def _same_tensors(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_round_trip_is_bit_exact_and_reproduces_the_hf_file(hf, variant, tmp_path):
    path, model = hf[variant]
    spec, w = import_gpt2(path)
    export_gpt2(tmp_path / "out", spec, w)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["config.json",
                                                                     "model.safetensors"]
    spec2, w2 = import_gpt2(tmp_path / "out")
    assert spec2 == spec and list(w2) == list(w)
    for k in w:
        assert w2[k].dtype == w[k].dtype and w2[k].tobytes() == w[k].tobytes(), k
    _same_tensors(load_file(str(path / "model.safetensors")),
                  load_file(str(tmp_path / "out/model.safetensors")))
    # transformers itself loads the export and computes the very same logits
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out",
                                                        attn_implementation="eager").eval()
    assert (back.lm_head.weight is back.transformer.wte.weight) == spec.tie_embeddings
    ids, mask = _inputs(pad=True)
    with torch.no_grad():
        args = dict(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask))
        assert torch.equal(back(**args).logits, model(**args).logits)


@pytest.mark.parametrize("dtype", ["float16", "float64"])
def test_round_trip_keeps_other_dtypes(hf, dtype, tmp_path):
    path, _ = hf["untied"]
    raw = {k: v.astype(dtype) for k, v in load_file(str(path / "model.safetensors")).items()}
    (tmp_path / "hf").mkdir()
    save_file(raw, str(tmp_path / "hf/model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "hf/config.json")
    spec, w = import_gpt2(tmp_path / "hf")
    assert all(v.dtype == np.dtype(dtype) for v in w.values())
    export_gpt2(tmp_path / "out", spec, w)
    _same_tensors(raw, load_file(str(tmp_path / "out/model.safetensors")))
    assert json.loads((tmp_path / "out/config.json").read_text())["dtype"] == dtype


def test_bfloat16_is_widened_exactly(hf, tmp_path):
    from safetensors.torch import save_file as save_torch

    path, model = hf["tied"]
    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()
          if k != "lm_head.weight"}
    save_torch(sd, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(path / "config.json", tmp_path / "config.json")
    _, w = import_gpt2(tmp_path)
    want = torch.as_tensor(sd["transformer.h.1.attn.c_attn.weight"]).float().numpy()
    assert w["decoder.layers.1.self_attn.v_proj.weight"].dtype == np.float32
    assert np.array_equal(w["decoder.layers.1.self_attn.v_proj.weight"], want[:, 2 * D:].T)


def test_export_of_a_native_spec_loads_in_transformers(tmp_path):
    spec = ModelSpec.preset("gpt2-tiny").replace(d_model=32, vocab_size=50, max_len=16,
                                                 bos_token_id=0, eos_token_id=1,
                                                 tie_embeddings=False, activation="relu")
    w = random_weights(spec, seed=2, dtype="float64")
    export_gpt2(tmp_path / "g", spec, w)
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "g",
                                                         attn_implementation="eager")
    assert model.dtype == torch.float64 and model.config.activation_function == "relu"
    ids, mask = _inputs(pad=True)
    ids = ids % 50
    with torch.no_grad():
        want = model.eval()(input_ids=torch.as_tensor(ids[:, :10]),
                            attention_mask=torch.as_tensor(mask[:, :10])).logits.numpy()
    got = reference.forward(spec, w, {"input_ids": ids[:, :10],
                                      "attention_mask": mask[:, :10]})["logits"]
    assert _rel(got, want) < 1e-12


def test_export_is_atomic_and_never_clobbers_other_files(hf, tmp_path, monkeypatch):
    spec, w = import_gpt2(hf["tied"][0])
    out = tmp_path / "out"
    export_gpt2(out, spec, w)
    before = (out / "model.safetensors").read_bytes()
    w2 = {k: v + 1 for k, v in w.items()}
    export_gpt2(out, spec, w2)  # a previous export is replaced
    assert (out / "model.safetensors").read_bytes() != before
    before = (out / "model.safetensors").read_bytes()

    real = os.replace

    def boom(src, dst):
        if str(src).endswith(".tmp"):  # moving the new directory in fails
            raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        export_gpt2(out, spec, w)
    monkeypatch.undo()
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left
    (out / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"holds other files \(tokenizer.json\)"):
        export_gpt2(out, spec, w)
    assert (out / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------------- errors
def _copy(src, dst, config=None, drop=(), edit=None):
    dst.mkdir()
    raw = load_file(str(src / "model.safetensors"))
    for k in drop:
        del raw[k]
    if edit:
        edit(raw)
    save_file(raw, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _one_line(excinfo):
    assert "\n" not in str(excinfo.value)
    return str(excinfo.value)


def test_import_errors(hf, tmp_path):
    tied, untied = hf["tied"][0], hf["untied"][0]
    d = _copy(tied, tmp_path / "missing", drop=["transformer.h.1.mlp.c_fc.bias"])
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d)
    assert "missing 1: h.1.mlp.c_fc.bias" in _one_line(e)

    def bad_shape(raw):
        raw["transformer.h.0.attn.c_attn.weight"] = raw["transformer.h.0.attn.c_attn.weight"].T
    d = _copy(tied, tmp_path / "shape", edit=bad_shape)
    with pytest.raises(CheckpointError) as e:
        import_gpt2(d)
    assert "h.0.attn.c_attn.weight (96, 32) (expected (32, 96))" in _one_line(e)

    d = _copy(tied, tmp_path / "extra", edit=lambda raw: raw.update(
        {"transformer.h.0.attn.surprise": np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected 1: h.0.attn.surprise"):
        import_gpt2(d)

    d = _copy(untied, tmp_path / "nohead", drop=["lm_head.weight"])
    with pytest.raises(CheckpointError) as e:
        import_gpt2(d)
    assert "tie_word_embeddings is false but lm_head.weight is missing" in _one_line(e)

    d = _copy(tied, tmp_path / "t5", config={"model_type": "t5"})
    with pytest.raises(CheckpointError) as e:
        from_pretrained(d)
    assert ("model_type 't5' is not supported (supported: bert, gpt2, llama, mistral, qwen2, "
            "gemma, gpt_neox)") in _one_line(e)
    with pytest.raises(CheckpointError, match="is not a GPT-2"):
        import_gpt2(d)


@pytest.mark.parametrize("key,value", [
    ("scale_attn_weights", False), ("scale_attn_by_inverse_layer_idx", True),
    ("add_cross_attention", True), ("activation_function", "swish"),
    ("bos_token_id", "<s>"), ("eos_token_id", [5, 7])])  # out of range: tests/test_cli.py
def test_unsupported_config_keys_are_named(hf, tmp_path, key, value):
    d = _copy(hf["tied"][0], tmp_path / "d", config={key: value})
    with pytest.raises(SpecError) as e:
        from_pretrained(d)
    assert f"config.json {key}" in _one_line(e)


def test_reorder_and_upcast_attn_is_accepted(hf, tmp_path):
    """Only the float order of the score computation changes: the same function."""
    d = _copy(hf["tied"][0], tmp_path / "d", config={"reorder_and_upcast_attn": True})
    assert import_gpt2(d)[0] == import_gpt2(hf["tied"][0])[0]


@pytest.mark.parametrize("change,field", [
    (dict(architecture="encoder", head="none", tie_embeddings=False), "architecture"),
    (dict(norm_position="post"), "norm_position"), (dict(positional="sinusoidal"), "positional"),
    (dict(embedding_norm=True), "embedding_norm"), (dict(final_norm=False), "final_norm"),
    (dict(embed_scale=True), "embed_scale"), (dict(bias=False), "bias")])
def test_export_rejects_specs_gpt2_cannot_express(tmp_path, change, field):
    spec = ModelSpec.preset("gpt2-tiny").replace(**change)
    with pytest.raises(SpecError) as e:
        export_gpt2(tmp_path / "g", spec, random_weights(spec))
    assert f"spec field {field!r}" in _one_line(e)
    assert not (tmp_path / "g").exists()


def test_export_checks_weights(tmp_path):
    spec = ModelSpec.preset("gpt2-tiny")
    w = random_weights(spec)
    del w["decoder.layers.0.norm1.bias"]
    with pytest.raises(CheckpointError, match="missing 1: decoder.layers.0.norm1.bias"):
        export_gpt2(tmp_path / "g", spec, w)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- xformer directories
def test_save_pretrained_round_trip(tmp_path):
    spec = ModelSpec.preset("vaswani-tiny")
    w = random_weights(spec, seed=1)
    save_pretrained(tmp_path / "m", spec, w)
    assert ModelSpec.load(tmp_path / "m/spec.json") == spec
    spec2, w2 = from_pretrained(tmp_path / "m")
    assert spec2 == spec and all(w2[k].tobytes() == w[k].tobytes() for k in w)


def test_xformer_directory_with_a_spec_file_only(tmp_path):
    spec = ModelSpec.preset("gpt2-tiny").replace(n_layers=1)
    w = random_weights(spec, seed=1)
    (tmp_path / "m").mkdir()
    save_weights(tmp_path / "m/model.safetensors", w)  # no spec in the metadata
    with pytest.raises(CheckpointError, match="no config.json, no spec file"):
        from_pretrained(tmp_path / "m")
    spec.save(tmp_path / "m/spec.yaml")
    assert from_pretrained(tmp_path / "m")[0] == spec
    save_weights(tmp_path / "m/model.safetensors", w, spec.replace(norm_eps=1e-6))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path / "m")
    assert "spec.yaml and model.safetensors metadata hold different specs (norm_eps" in (
        _one_line(e))


# ---------------------------------------------------------------------- the HF reference
@pytest.mark.parametrize("variant", VARIANTS)
def test_gpt2_reference_gradients_are_canonical(hf, variant):
    from xformer.convert import gpt2_expressible, gpt2_to_canonical
    from xformer_torch.reference_hf import gpt2_reference

    spec = import_gpt2(hf[variant][0])[0]
    assert gpt2_expressible(spec) is None
    assert "norm_position" in gpt2_expressible(spec.replace(norm_position="post"))
    w = random_weights(spec, seed=3, dtype="float64")
    model = gpt2_reference(spec, w, "float64")
    assert model.training and model.config._attn_implementation == "eager"
    assert all(m.p == 0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    wte = model.transformer.wte.weight
    assert (model.lm_head.weight is wte) == spec.tie_embeddings
    # parameters map back bit-exactly, from named_parameters() and from a tied state_dict()
    for native in (dict(model.named_parameters()), model.state_dict()):
        back = gpt2_to_canonical(native)
        assert set(back) == set(w)
        assert all(np.array_equal(back[k].detach().numpy(), w[k]) for k in w)

    ids, mask = _inputs(pad=True, seed=1)
    rng = np.random.default_rng(4)
    cot = {k: rng.standard_normal(s) for k, s in
           [("logits", ids.shape + (V,)), ("last_hidden_state", ids.shape + (D,))]}
    emb = torch.nn.functional.embedding(torch.as_tensor(ids), wte)  # as conformance does
    out = model(inputs_embeds=emb, attention_mask=torch.as_tensor(mask))
    ref = reference.forward(spec, w, {"input_ids": ids, "attention_mask": mask})
    for k in cot:
        assert _rel(out[k].detach().numpy(), ref[k]) < 1e-12, k
    sum((out[k] * torch.as_tensor(cot[k])).sum() for k in cot).backward()
    grads = {k: v.numpy() for k, v in
             gpt2_to_canonical({n: p.grad for n, p in model.named_parameters()}).items()}
    assert {k: v.shape for k, v in grads.items()} == spec.parameter_shapes()

    def loss(weights):
        o = reference.forward(spec, weights, {"input_ids": ids, "attention_mask": mask})
        return sum(float((o[k] * cot[k]).sum()) for k in cot)

    probes = [("decoder.layers.0.self_attn.q_proj.weight", (3, 7)),
              ("decoder.layers.0.self_attn.k_proj.weight", (5, 1)),
              ("decoder.layers.1.self_attn.v_proj.weight", (2, 9)),
              ("decoder.layers.1.self_attn.k_proj.bias", (4,)),
              ("decoder.layers.0.self_attn.out_proj.weight", (1, 30)),
              ("decoder.layers.1.ffn.linear1.weight", (7, 2)),
              ("decoder.layers.0.ffn.linear2.weight", (3, 11)),
              ("embeddings.word_embeddings.weight", (int(ids[0, 0]), 6)),
              ("embeddings.position_embeddings.weight", (2, 5)),
              ("decoder.final_norm.weight", (8,))]
    if not spec.tie_embeddings:
        probes.append(("lm_head.weight", (int(ids[0, 1]), 3)))
    eps, worst = 1e-5, 0.0
    for name, idx in probes:
        plus, minus = dict(w), dict(w)
        plus[name], minus[name] = w[name].copy(), w[name].copy()
        plus[name][idx] += eps
        minus[name][idx] -= eps
        fd = (loss(plus) - loss(minus)) / (2 * eps)
        worst = max(worst, abs(grads[name][idx] - fd) / max(1.0, abs(fd)))
        assert abs(grads[name][idx] - fd) <= 1e-6 * max(1.0, abs(fd)), (name, grads[name][idx],
                                                                         fd)
    print(f"{variant}: worst |autograd - finite difference| / max(1, |fd|) = {worst:.1e}")


def test_gpt2_reference_without_head_is_a_gpt2model():
    from xformer.convert import gpt2_to_canonical
    from xformer_torch.reference_hf import gpt2_reference

    spec = ModelSpec.preset("gpt2-tiny").replace(head="none", tie_embeddings=False, d_model=32,
                                                 vocab_size=V, max_len=P, bos_token_id=None,
                                                 eos_token_id=None)
    w = random_weights(spec, seed=6)
    model = gpt2_reference(spec, w, "float64")
    assert type(model) is transformers.GPT2Model
    assert set(gpt2_to_canonical(dict(model.named_parameters()))) == set(w)
    ids, mask = _inputs(pad=True)
    with torch.no_grad():
        emb = torch.nn.functional.embedding(torch.as_tensor(ids), model.wte.weight)
        out = model(inputs_embeds=emb, attention_mask=torch.as_tensor(mask))
    ref = reference.forward(spec, w, {"input_ids": ids, "attention_mask": mask})
    assert _rel(out["last_hidden_state"].numpy(), ref["last_hidden_state"]) < 1e-12
