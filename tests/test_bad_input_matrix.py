"""The published bad-input matrix (docs/bad-input.md): every class of hostile input of issue #8
and every input the CLI and the public API accept, each with the expected exit status (or
exception class) and the one-line message.

* CLI rows run ``xformer.cli.main(argv)`` in-process: the exit status, exactly one stderr line
  (``xformer: error: ...``) for exit 2, the message matching a regex, no traceback (nothing
  escapes ``main``), and every file that existed before the call byte-for-byte unchanged.
* API rows call the public function and expect the :class:`~xformer.errors.XformerError`
  subclass and the message.
* The hypothesis tests at the end throw generated hostile specs and argument lists at ``main``
  and assert the contract: no exception escapes, exit status in {0, 1, 2}, at most one stderr
  line, bounded time. ``XFORMER_NIGHTLY=1`` runs the ``nightly`` variants with more examples.

Rows whose unfixed behaviour would exhaust the machine (``/dev/zero``, a FIFO, a 15 GiB model,
10**8 beams) are not run (``xfail(run=False)``) until the guard they need exists
(``xformer.resources.read_capped`` / ``check_memory``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import time
from pathlib import Path

import numpy as np
import pytest

import xformer
from xformer import cli
from xformer.backend import check_inputs, resolve_backend
from xformer.errors import (BackendError, CheckpointError, InputError, SpecError,
                            XformerError)
from xformer.spec import ModelSpec

try:
    from xformer import resources as _resources
except ImportError:  # HB's module not there yet
    _resources = None

HAS_READ_CAPPED = hasattr(_resources, "read_capped")
HAS_CHECK_MEMORY = hasattr(_resources, "check_memory")
ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0

TINY = ModelSpec.preset("tiny")          # encoder, vocab 1000, d_model 64, max_len 64
GPT = ModelSpec.preset("gpt2-tiny")      # decoder with an LM head


def _needs(flag: bool, why: str):
    """Rows that would hang or exhaust memory before their guard exists: not run until then."""
    return () if flag else (pytest.mark.xfail(run=False, strict=True, reason=why),)


def _root_skip():
    return (pytest.mark.skipif(ROOT_USER, reason="root reads and writes files whatever "
                                                 "their mode"),)


# ---------------------------------------------------------------------- shared inputs
@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict[str, str]:
    """Valid files the rows start from: a tiny spec (JSON), a gpt2-tiny checkpoint that stores
    its spec, a tiny checkpoint, a Hugging Face GPT-2 directory."""
    from xformer.convert import export_gpt2
    from xformer.weights import init_weights, save_weights

    d = tmp_path_factory.mktemp("shared")
    (d / "tiny.json").write_text(TINY.to_json() if hasattr(TINY, "to_json")
                                 else json.dumps(TINY.to_dict()))
    save_weights(d / "gpt.safetensors", init_weights(GPT, seed=0), GPT)
    save_weights(d / "tiny.safetensors", init_weights(TINY, seed=0), TINY)
    export_gpt2(d / "gpt_hf", GPT, init_weights(GPT, seed=0))
    return {"dir": str(d), "spec": str(d / "tiny.json"), "gpt": str(d / "gpt.safetensors"),
            "tinyw": str(d / "tiny.safetensors"), "gpt_hf": str(d / "gpt_hf")}


# ---------------------------------------------------------------------- row builders
# Each ``make`` takes (tmp: Path, shared: dict) and writes what the row needs under tmp,
# returning extra placeholders for the argv ({tmp}, {spec}, {gpt}, ... are always there).
def _write(name: str, data: bytes | str):
    def make(tmp: Path, shared) -> dict:
        p = tmp / name
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return {"f": str(p)}
    return make


def _npy(name: str, array, **save):
    """A ``.npy`` training data file (``np.save``; ``allow_pickle`` for object arrays)."""
    def make(tmp: Path, shared) -> dict:
        p = tmp / name
        with open(p, "wb") as f:
            np.save(f, array, **save)
        return {"f": str(p)}
    return make


def _spec_with(**fields):
    def make(tmp: Path, shared) -> dict:
        p = tmp / "s.json"
        p.write_text(json.dumps({**TINY.to_dict(), **fields}))
        return {"f": str(p)}
    return make


def _spec_dir(tmp: Path, shared) -> dict:
    (tmp / "specdir.json").mkdir()
    return {"f": str(tmp / "specdir.json")}


def _fifo(tmp: Path, shared) -> dict:
    os.mkfifo(tmp / "fifo.json")
    return {"f": str(tmp / "fifo.json")}


def _chmod0(name: str, data: bytes):
    def make(tmp: Path, shared) -> dict:
        p = tmp / name
        p.write_bytes(data)
        p.chmod(0)
        return {"f": str(p)}
    return make


def _alias_bomb(levels: int = 6, width: int = 9) -> str:
    """A YAML alias bomb on a real field: ``width ** levels`` leaves in a few hundred bytes."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for i in range(1, levels):
        refs = ", ".join([f"*a{i - 1}"] * width)
        lines.append(f"a{i}: &a{i} [{refs}]")
    spec = TINY.to_dict()
    body = "\n".join(f"{k}: {json.dumps(v)}" for k, v in spec.items() if k != "d_model")
    return "\n".join(lines) + f"\n{body}\nd_model: *a{levels - 1}\n"


def _hf_bert(**overrides):
    """A Hugging Face BERT directory (config.json + a placeholder model.safetensors) whose
    config has ``overrides`` (``_DROP`` removes a key); no overrides: config.json is not JSON
    (and the directory is ``tmp`` itself)."""
    def make(tmp: Path, shared) -> dict:
        from xformer.convert import bert_config_dict
        from xformer.weights import safetensors_bytes

        d = tmp / "hf" if overrides else tmp
        d.mkdir(exist_ok=True)
        config = {**bert_config_dict(ModelSpec.preset("bert-tiny")), "model_type": "bert"}
        for k, v in overrides.items():
            if v is _DROP:
                config.pop(k, None)
            else:
                config[k] = v
        (d / "config.json").write_text(json.dumps(config) if overrides else "{]")
        (d / "model.safetensors").write_bytes(
            safetensors_bytes({"x": np.zeros(1, np.float32)}, {"format": "pt"}))
        return {"f": str(d)}
    return make


_DROP = object()


def _nan_weights(tmp: Path, shared) -> dict:
    from xformer.weights import init_weights, save_weights

    w = init_weights(TINY, seed=0, dtype="float64")
    name = next(iter(w))
    w[name] = w[name].copy()
    w[name].flat[3] = np.nan
    save_weights(tmp / "nan.safetensors", w, TINY)
    return {"f": str(tmp / "nan.safetensors")}


def _sparse_header(tmp: Path, shared) -> dict:
    """A safetensors file whose header claims 12 GB of data in a 200-byte file."""
    header = json.dumps({"x": {"dtype": "F32", "shape": [3_000_000_000],
                               "data_offsets": [0, 12_000_000_000]}}).encode()
    p = tmp / "sparse.safetensors"
    p.write_bytes(len(header).to_bytes(8, "little") + header)
    return {"f": str(p)}


def _bad_tokenizer(tmp: Path, shared) -> dict:
    import shutil

    d = tmp / "hf_tok"
    shutil.copytree(shared["gpt_hf"], d)
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": 42')
    return {"f": str(d)}


def _pickle(tmp: Path, shared) -> dict:
    """A pickle that would create a marker file if it were ever unpickled."""
    import pickle

    marker = tmp / "PWNED"

    class Boom:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (tmp / "w.bin").write_bytes(pickle.dumps(Boom()))
    (tmp / "w.pt").write_bytes(pickle.dumps(Boom()))
    return {"f": str(tmp / "w.bin"), "fpt": str(tmp / "w.pt")}


def _yaml_tag(tmp: Path, shared) -> dict:
    marker = tmp / "PWNED"
    p = tmp / "s.yaml"
    p.write_text(f"!!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path "
                 f"['{marker}']]\n")
    return {"f": str(p)}


def _copy_spec(tmp: Path, shared) -> dict:
    p = tmp / "s.json"
    p.write_text(Path(shared["spec"]).read_text())
    w = tmp / "w.safetensors"
    w.write_bytes(Path(shared["tinyw"]).read_bytes())
    return {"f": str(p), "w": str(w)}


def _existing_dir(tmp: Path, shared) -> dict:
    (tmp / "outdir.safetensors").mkdir()
    return {"f": str(tmp / "outdir.safetensors")}


def _readonly_dir(tmp: Path, shared) -> dict:
    (tmp / "ro").mkdir()
    (tmp / "ro").chmod(0o555)
    return {"f": str(tmp / "ro" / "out.safetensors")}


def _nothing(tmp: Path, shared) -> dict:
    return {}


def _toml(data: bytes | None = None, *, directory: bool = False, mode: int | None = None):
    def make(tmp: Path, shared) -> dict:
        p = tmp / "xformer.toml"
        if directory:
            p.mkdir()
        else:
            p.write_bytes(data or b"")
            if mode is not None:
                p.chmod(mode)
        return {"f": str(p)}
    return make


# ---------------------------------------------------------------------- the CLI matrix
E2 = 2
INIT_F = ["init", "--spec", "{f}", "--out", "{tmp}/o.safetensors"]  # init on the row's file
TRAIN_F = ["train", "--model", "{gpt}", "--backend", "torch", "--data", "{f}", "--steps", "2",
           "--out", "{tmp}/trained"]  # train gpt2-tiny on the row's data file
HA = "HA (cli.py): "
HB = "HB (files & resources): "

#: xformer check's hand-written PyTorch example (examples/check/)
_CHECK = Path(__file__).resolve().parent.parent / "examples" / "check"
CHECK_IMPL, CHECK_MAP = f"torch:{_CHECK / 'torch_bert.py'}", str(_CHECK / "torch_bert.yaml")
CHECK_SPEC = str(_CHECK / "bert_tiny.yaml")

CLI_ROWS = [
    # ---- specs (--spec of init: the cheapest command that reads one)
    pytest.param(_nothing, ["init", "--spec", "{tmp}/missing.json", "--out", "{tmp}/o.safetensors"],
                 E2, r"does not exist", id="spec-missing"),
    pytest.param(_spec_dir, INIT_F,
                 E2, r"directory|not a (regular )?file", id="spec-directory"),
    pytest.param(_write("bin.json", bytes(range(256)) * 4),
                 INIT_F,
                 E2, r"UTF-8|not valid JSON|binary", id="spec-binary"),
    pytest.param(_write("latin1.yaml", "architecture: 'enc\xe9der'\n".encode("latin-1")),
                 INIT_F,
                 E2, r"UTF-8", id="spec-latin1"),
    pytest.param(_write("big.json", '{"d_model": ' + "9" * 5001 + "}"),
                 INIT_F,
                 E2, r"d_model|digits|integer", id="spec-5001-digit-int"),
    pytest.param(_write("deep.json", "[" * 100_000 + "]" * 100_000),
                 INIT_F,
                 E2, r"nest|deep|object", id="spec-100k-nested-brackets"),
    pytest.param(_write("bomb.yaml", _alias_bomb()),
                 INIT_F,
                 E2, r"^xformer: error: .{0,400}$", id="spec-yaml-alias-bomb"),
    pytest.param(_yaml_tag, INIT_F,
                 E2, r"yaml|YAML|tag", id="spec-yaml-python-tag-not-run"),
    pytest.param(_write("list.json", "[1, 2]"),
                 INIT_F,
                 E2, r"object|mapping|dict", id="spec-json-list"),
    pytest.param(_write("bad.json", "{not json"),
                 INIT_F,
                 E2, r"JSON", id="spec-invalid-json"),
    pytest.param(_spec_with(d_model="abc"), INIT_F,
                 E2, r"d_model", id="spec-field-string"),
    pytest.param(_spec_with(n_layers=-1), INIT_F,
                 E2, r"n_layers", id="spec-field-negative"),
    pytest.param(_spec_with(vocab_size=10**30), INIT_F,
                 E2, r"vocab_size", id="spec-field-huge-int"),
    pytest.param(_spec_with(d_model=64.5), INIT_F,
                 E2, r"d_model", id="spec-field-float"),
    pytest.param(_spec_with(d_model=True), INIT_F,
                 E2, r"d_model", id="spec-field-bool"),
    pytest.param(_spec_with(colour="blue"), INIT_F,
                 E2, r"colour", id="spec-unknown-field"),
    pytest.param(_spec_with(d_model=65536, n_heads=64, d_ff=262144, vocab_size=30000),
                 INIT_F,
                 E2, r"needs [\d.]+ [GMT]iB; [\d.]+ [GMT]iB available; use --force",
                 id="spec-15GiB-refused-before-allocating",
                 marks=_needs(HAS_CHECK_MEMORY, HB + "xformer.resources.check_memory missing; "
                              "unguarded this allocates 15 GiB")),
    pytest.param(_nothing, ["init", "--spec", "/dev/zero", "--out", "{tmp}/o.safetensors"],
                 E2, r"/dev/zero", id="spec-dev-zero",
                 marks=_needs(HAS_READ_CAPPED, HB + "xformer.resources.read_capped missing; "
                              "unguarded this reads until MemoryError")),
    pytest.param(_fifo, INIT_F,
                 E2, r"regular file|FIFO|pipe", id="spec-fifo",
                 marks=_needs(HAS_READ_CAPPED, HB + "xformer.resources.read_capped missing; "
                              "unguarded a FIFO blocks forever")),
    pytest.param(_chmod0("s.json", b"{}"), INIT_F,
                 E2, r"[Pp]ermission denied", id="spec-unreadable", marks=_root_skip()),
    pytest.param(_nothing, ["init", "--spec", "no-such-preset", "--out", "{tmp}/o.safetensors"],
                 E2, r"preset", id="spec-unknown-preset"),
    # ---- weights
    pytest.param(_nothing, ["compare", "--weights", "{tmp}/missing.safetensors"],
                 E2, r"does not exist", id="weights-missing"),
    pytest.param(_write("junk.safetensors", b"\x00" * 64),
                 ["compare", "--weights", "{f}"], E2, r"safetensors|checkpoint",
                 id="weights-not-safetensors"),
    pytest.param(_sparse_header, ["compare", "--weights", "{f}"],
                 E2, r"size|bytes|truncated|larger", id="weights-header-past-end-of-file"),
    pytest.param(_pickle, ["compare", "--weights", "{f}"],
                 E2, r"safetensors|checkpoint|pickle", id="weights-pickle-not-run"),
    pytest.param(_nothing, ["compare", "--spec", "gpt2-tiny", "--weights", "{tinyw}"],
                 E2, r"do not match|missing|extra", id="weights-for-another-spec"),
    pytest.param(_nan_weights, ["compare", "--weights", "{f}", "--backends", "torch",
                                "--dtype", "float64", "--repeats", "0"],
                 E2, r"NaN|non-finite|not finite", id="weights-nan"),
    pytest.param(_chmod0("w.safetensors", b"\x00" * 64), ["compare", "--weights", "{f}"],
                 E2, r"[Pp]ermission denied", id="weights-unreadable", marks=_root_skip()),
    # ---- Hugging Face directories
    pytest.param(_hf_bert(hidden_size=_DROP), ["compare", "--model", "{f}"],
                 E2, r"hidden_size", id="hf-missing-hidden_size"),
    pytest.param(_hf_bert(hidden_size="abc"), ["compare", "--model", "{f}"],
                 E2, r"hidden_size", id="hf-hidden_size-string"),
    pytest.param(_hf_bert(hidden_size=None), ["compare", "--model", "{f}"],
                 E2, r"hidden_size", id="hf-hidden_size-null"),
    pytest.param(_hf_bert(hidden_size=32.7), ["compare", "--model", "{f}"],
                 E2, r"hidden_size", id="hf-hidden_size-float-not-truncated"),
    pytest.param(_hf_bert(), ["compare", "--model", "{tmp}"], E2,
                 r"config\.json is not valid JSON", id="hf-invalid-config-json"),
    pytest.param(_write("model.safetensors", b"\x00" * 8), ["compare", "--model", "{tmp}"],
                 E2, r"safetensors", id="hf-directory-without-config"),
    pytest.param(_write("pytorch_model.bin", b"\x80\x04K\x01."), ["compare", "--model", "{tmp}"],
                 E2, r"no model\.safetensors .*pickle", id="hf-only-pickle-not-run"),
    pytest.param(_nothing, ["compare", "--model", "{tmp}/nowhere"],
                 E2, r"does not exist|not found|no such", id="hf-missing-directory"),
    pytest.param(_bad_tokenizer, ["compare", "--model", "{f}", "--backends", "torch"],
                 E2, r"tokenizer", id="hf-bad-tokenizer-json"),
    pytest.param(_nothing, ["compare", "--model", "{gpt_hf}", "--weights", "{tinyw}"],
                 E2, r"--model.*--weights|--weights.*--model", id="model-with-weights-conflict"),
    # ---- token ids (generate --prompt-ids)
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "a,b"],
                 E2, r"--prompt-ids", id="ids-not-integers"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", str(10**30)],
                 E2, r"10{30}|outside|range", id="ids-10e30"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1,-5"],
                 E2, r"-5", id="ids-negative"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1,1000"],
                 E2, r"1000.*vocab_size", id="ids-over-vocab"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", ","],
                 E2, r"empty", id="ids-empty"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1.5"],
                 E2, r"--prompt-ids", id="ids-float"),
    # ---- sizes and counts
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--max-new-tokens", "0"], E2, r"max_new_tokens|--max-new-tokens",
                 id="max-new-tokens-0"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--max-new-tokens", "2.5"], E2, r"--max-new-tokens",
                 id="max-new-tokens-float"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--max-new-tokens", "1000"], E2, r"max_len",
                 id="max-new-tokens-over-max_len"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--num-beams", "0"], E2, r"num_beams|--num-beams", id="num-beams-0"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--num-beams", "100000000"], E2, r"needs .*available.*--force",
                 id="num-beams-1e8-refused",
                 marks=_needs(HAS_CHECK_MEMORY, HA + "the beam-search memory check needs "
                              "xformer.resources.check_memory; unguarded this allocates "
                              "without bound")),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--length-penalty", "nan"], E2, r"length_penalty|--length-penalty",
                 id="length-penalty-nan"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1",
                            "--eos-token-id", "5000"], E2, r"eos_token_id|--eos-token-id",
                 id="eos-token-over-vocab"),
    pytest.param(_nothing, ["compare", "--batch", "0"], E2, r"--batch", id="batch-0"),
    pytest.param(_nothing, ["compare", "--seq-len", "-3"], E2, r"--seq-len", id="seq-len-negative"),
    pytest.param(_nothing, ["compare", "--seq-len", "100000", "--backends", "torch"],
                 E2, r"max_len|--seq-len", id="seq-len-over-max_len"),
    pytest.param(_nothing, ["compare", "--repeats", "-1"], E2, r"--repeats", id="repeats-negative"),
    pytest.param(_nothing, ["init", "--spec", "tiny", "--seed", "-1", "--out",
                            "{tmp}/o.safetensors"],
                 E2, r"--seed", id="seed-negative"),
    pytest.param(_nothing, ["init", "--spec", "tiny", "--seed", str(2**70), "--out",
                            "{tmp}/o.safetensors"], E2, r"--seed", id="seed-huge"),
    pytest.param(_nothing, ["compare", "--dtype", "float16"], E2, r"--dtype|float16",
                 id="dtype-unknown"),
    # ---- output paths (checked before the work; never over an input)
    pytest.param(_copy_spec, ["compare", "--spec", "{f}", "--weights", "{w}", "--backends", "torch",
                              "--json", "{w}"], E2, r"--json .* is the input --weights",
                 id="out-json-over-weights"),
    pytest.param(_copy_spec, ["compare", "--spec", "{f}", "--backends", "torch",
                              "--html", "{f}"], E2, r"--html .* is the input --spec",
                 id="out-html-over-spec"),
    pytest.param(_copy_spec, ["init", "--spec", "{f}", "--out", "{f}"],
                 E2, r"--out .* is the input --spec", id="out-init-over-spec"),
    pytest.param(_copy_spec, ["diff", "--spec", "{f}", "--backends", "torch,torch",
                              "--json", "{f}"], E2, r"--json .* is the input --spec",
                 id="out-diff-json-over-spec"),
    pytest.param(_nothing, ["compare", "--backends", "torch", "--json", "/nonexistent/r.json"],
                 E2, r"/nonexistent", id="out-missing-folder-before-work"),
    pytest.param(_nothing, ["init", "--spec", "tiny", "--out", "/nonexistent/o.safetensors"],
                 E2, r"/nonexistent", id="out-init-missing-folder"),
    pytest.param(_existing_dir, ["init", "--spec", "tiny", "--out", "{f}"],
                 E2, r"directory", id="out-existing-directory"),
    pytest.param(_nothing, ["compare", "--backends", "torch", "--json", "/proc/xformer.json"],
                 E2, r"/proc", id="out-under-proc"),
    pytest.param(_readonly_dir, ["init", "--spec", "tiny", "--out", "{f}"],
                 E2, r"writ|[Pp]ermission", id="out-read-only-folder", marks=_root_skip()),
    # ---- backends
    pytest.param(_nothing, ["compare", "--backends", "torch,,torch"], E2, r"--backends",
                 id="backends-duplicate"),
    pytest.param(_nothing, ["compare", "--backends", "torch,torch"], E2,
                 r"--backends.*(twice|duplicate|more than once)",
                 id="backends-same-twice"),
    pytest.param(_nothing, ["compare", "--backends", ""], E2, r"--backends", id="backends-empty"),
    pytest.param(_nothing, ["compare", "--backends", ",,"], E2, r"--backends",
                 id="backends-only-commas"),
    pytest.param(_nothing, ["compare", "--backends", "nope"], E2, r"nope", id="backends-unknown"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1", "--backend",
                            "nope"], E2, r"unknown backend 'nope'", id="backend-unknown"),
    pytest.param(_nothing, ["diff", "--spec", "tiny", "--backends", "torch"], E2,
                 r"--backends takes two", id="diff-one-backend"),
    # ---- embed
    pytest.param(_nothing, ["embed", "--model", "{gpt_hf}", "--json", "caf\udce9"],
                 E2, r"UTF-8|utf-8|encod", id="embed-non-utf8-argument"),
    # ---- valid inputs that must work (exit 0)
    pytest.param(_nothing, ["init", "--spec", "tiny", "--out", "{tmp}/o.safetensors"], 0, None,
                 id="ok-init-preset"),
    pytest.param(_nothing, ["generate", "--model", "{gpt}", "--prompt-ids", "1,2",
                            "--max-new-tokens", "2", "--backend", "torch", "--json"], 0, None,
                 id="ok-generate"),
    # ---- training data and options (xformer train; issue #10): refused before any step
    pytest.param(_npy("v.npy", np.full((4, 8), 1000)), TRAIN_F,
                 E2, r"token id 1000 at row 0, column 0, outside \[0, vocab_size=1000\)",
                 id="train-token-over-vocab"),
    pytest.param(_npy("long.npy", np.zeros((4, 129), np.int64)), TRAIN_F,
                 E2, r"129 tokens, more than max_len=128", id="train-rows-over-max_len"),
    pytest.param(_write("empty.npy", b""), TRAIN_F,
                 E2, r"not a valid \.npy file", id="train-empty-data-file"),
    pytest.param(_npy("f.npy", np.zeros((4, 8))), TRAIN_F,
                 E2, r"integer array of token ids", id="train-float-data"),
    pytest.param(_npy("o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True), TRAIN_F,
                 E2, r"not a valid \.npy file", id="train-pickled-data-not-run"),
    pytest.param(_write("t.txt", "1 2 3"), TRAIN_F,
                 E2, r"must be a \.npy array", id="train-data-not-npy"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)), [*TRAIN_F, "--lr", "-0.1"],
                 E2, r"--lr must be a finite number >= 0", id="train-negative-lr"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)), [*TRAIN_F, "--optimizer", "lion"],
                 E2, r"invalid choice: 'lion'", id="train-unknown-optimizer"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)), [*TRAIN_F, "--steps", "0"],
                 E2, r"--steps must be >= 1", id="train-zero-steps"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)), [*TRAIN_F, "--nproc", "0"],
                 E2, r"--nproc must be an integer >= 1", id="train-zero-workers"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)),
                 [*TRAIN_F, "--batch-size", "4", "--nproc", "3"],
                 E2, r"--nproc 3 does not split --batch-size 4", id="train-workers-split-unevenly"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)), [*TRAIN_F, "--port", "29500"],
                 E2, r"--port only applies with --nproc", id="train-port-without-workers"),
    pytest.param(_npy("ok.npy", np.ones((4, 8), np.int64)),
                 ["train", "--spec", "{spec}", "--data", "{f}", "--steps", "1", "--out",
                  "{tmp}/trained"],
                 E2, r"head='lm'", id="train-encoder-has-no-objective"),
    # ---- xformer check: the IMPL, the user's module and factory, the mapping file
    pytest.param(_nothing, ["check", "torch:only", "--map", CHECK_MAP, "--spec", CHECK_SPEC],
                 E2, r"must be BACKEND:MODULE:FACTORY", id="check-impl-not-three-parts"),
    pytest.param(_write("mine.py", "raise RuntimeError('broken import')"),
                 ["check", "torch:{f}:build", "--map", CHECK_MAP, "--spec", CHECK_SPEC],
                 E2, r"importing .* failed \(RuntimeError", id="check-module-raises"),
    pytest.param(_nothing, ["check", f"{CHECK_IMPL}:nothing", "--map", CHECK_MAP, "--spec",
                            CHECK_SPEC],
                 E2, r"has no 'nothing'", id="check-factory-missing"),
    pytest.param(_write("m.yaml", "param: {}\n"),
                 ["check", f"{CHECK_IMPL}:build", "--map", "{f}", "--spec", CHECK_SPEC],
                 E2, r"unknown key 'param'", id="check-map-unknown-key"),
    pytest.param(_write("m.yaml", "nodes: {embeddings.norm: emb.norm}\n"),
                 ["check", f"{CHECK_IMPL}:build", "--map", "{f}", "--spec", CHECK_SPEC],
                 E2, r"not mapped", id="check-native-parameters-unmapped"),
]


def _snapshot(root: Path) -> dict[str, str]:
    out = {}
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and os.access(p, os.R_OK):
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        except OSError:
            pass
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, list[str], str]:
    """``(exit status, non-empty stderr lines, stdout)`` of ``main(argv)`` in-process; an
    exception escaping main fails the test (that is a traceback for the user)."""
    capsys.readouterr()
    try:
        rc = cli.main(argv)
    except SystemExit as e:  # main must return, but count it rather than crash pytest
        rc = e.code if isinstance(e.code, int) else 1
    captured = capsys.readouterr()
    return rc, [ln for ln in captured.err.splitlines() if ln.strip()], captured.out


@pytest.mark.parametrize("make, argv, code, message", CLI_ROWS)
def test_cli_matrix(make, argv, code, message, shared, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XFORMER_BACKEND", raising=False)
    values = {**shared, "tmp": str(tmp_path), **make(tmp_path, shared)}
    argv = [a.format(**values) for a in argv]
    before = {**_snapshot(tmp_path), **_snapshot(Path(shared["dir"]))}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    t0 = time.perf_counter()
    rc, err, _ = run_cli(argv, capsys)
    elapsed = time.perf_counter() - t0
    # the process's peak memory may not grow by 2 GiB (it already holds the frameworks): an
    # input that makes xformer allocate before refusing shows here
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 2**20
    assert grown < 2, f"peak memory grew by {grown:.1f} GiB"
    assert rc == code, f"exit {rc}, expected {code}; stderr: {err[:3]}"
    if code == 2:
        assert len(err) == 1, f"expected one stderr line, got {len(err)}: {err[:4]}"
        assert err[0].startswith("xformer: error: "), err[0]
        assert len(err[0]) <= 500, f"message of {len(err[0])} chars: {err[0][:200]}..."
        assert re.search(message, err[0]), f"{message!r} not in {err[0]!r}"
    assert "Traceback" not in "\n".join(err)
    after = {**_snapshot(tmp_path), **_snapshot(Path(shared["dir"]))}
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"inputs changed or removed: {changed}"
    assert not (tmp_path / "PWNED").exists(), "a pickle or YAML tag was executed"
    assert not list(tmp_path.rglob("*.tmp*")), "a temporary file was left behind"
    assert elapsed < 30, f"took {elapsed:.1f} s"


# ---------------------------------------------------------------------- environment
ENV_ROWS = [
    pytest.param({"XFORMER_BACKEND": "nope"}, _nothing, r"nope.*\$XFORMER_BACKEND",
                 id="env-XFORMER_BACKEND-unknown"),
    pytest.param({}, _toml(b"backend = [unclosed"), r"xformer\.toml.*TOML",
                 id="config-invalid-toml"),
    pytest.param({}, _toml(b'backend = "caf\xe9"'), r"xformer\.toml.*UTF-8",
                 id="config-not-utf8"),
    pytest.param({}, _toml(directory=True), r"xformer\.toml.*regular file|directory",
                 id="config-is-directory"),
    pytest.param({}, _toml(b"backend = 3"), r"xformer\.toml.*backend must be",
                 id="config-backend-not-string"),
    pytest.param({}, _toml(b'backend = "nope"'), r"nope.*xformer\.toml",
                 id="config-backend-unknown"),
    pytest.param({}, _toml(b'backend = "torch"', mode=0), r"[Pp]ermission denied",
                 id="config-unreadable", marks=_root_skip()),
]


@pytest.mark.parametrize("env, make, message", ENV_ROWS)
def test_environment_matrix(env, make, message, shared, tmp_path, monkeypatch, capsys):
    """``XFORMER_BACKEND`` and config files, through a command that resolves the backend:
    exit 2, one line naming the source."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XFORMER_BACKEND", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    make(tmp_path, shared)
    rc, err, _ = run_cli(["generate", "--model", shared["gpt"], "--prompt-ids", "1"], capsys)
    assert rc == 2 and len(err) == 1, (rc, err[:4])
    assert re.search(message, err[0]), f"{message!r} not in {err[0]!r}"


def test_config_in_home_is_checked_too(tmp_path, monkeypatch):
    """~/.config/xformer/config.toml follows the same rules as ./xformer.toml."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XFORMER_BACKEND", raising=False)
    home = tmp_path / "home"
    (home / ".config" / "xformer").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    (home / ".config" / "xformer" / "config.toml").write_bytes(b"\xff\xfe")
    with pytest.raises(BackendError, match=r"config\.toml is not UTF-8"):
        resolve_backend()
    (home / ".config" / "xformer" / "config.toml").write_text('backend = "mxnet"\n')
    assert resolve_backend() == ("mxnet", "~/.config/xformer/config.toml")


def test_docs_page_lists_every_row():
    """docs/bad-input.md publishes the matrix: every row id of this file is in its tables."""
    page = (Path(__file__).resolve().parent.parent / "docs" / "bad-input.md").read_text(
        encoding="utf-8")
    for rows in (CLI_ROWS, ENV_ROWS, API_ROWS):
        assert len({p.id for p in rows}) == len(rows), "duplicate row ids"
    ids = [p.id for p in CLI_ROWS + ENV_ROWS + API_ROWS]
    missing = [i for i in ids if f"| `{i}` |" not in page]
    assert not missing, f"rows missing from docs/bad-input.md: {missing}"
    for line in ("| 2 | bad input or environment", "| 3 | internal error"):
        assert line in page


# ---------------------------------------------------------------------- the exit-code contract
def test_internal_error_exit_3(monkeypatch, capsys):
    """A bug (an exception that is not an XformerError) exits 3 with a short "please report"
    line and no traceback; ``--debug`` adds the traceback."""
    def boom(args):
        raise RuntimeError("synthetic bug")

    monkeypatch.setattr(cli, "cmd_backends", boom)
    rc, err, _ = run_cli(["backends"], capsys)
    assert rc == 3, (rc, err[:4])
    assert len(err) <= 2 and re.search(r"please report", "\n".join(err)), err
    assert "Traceback" not in "\n".join(err)
    rc, err, _ = run_cli(["backends", "--debug"], capsys)
    assert rc == 3 and "Traceback" in "\n".join(err), (rc, err[-3:])


# ---------------------------------------------------------------------- the Python API
def _gen(**kwargs):
    def call():
        be = xformer.get_backend("torch")
        model = _gpt_model()
        return be.generate(model, np.array([[1, 2]]), **kwargs)
    return call


_MODEL = {}


def _gpt_model():
    if "gpt" not in _MODEL:
        from xformer.weights import init_weights

        _MODEL["gpt"] = xformer.build(GPT, backend="torch",
                                      weights=init_weights(GPT, seed=0))
    return _MODEL["gpt"]


def _inputs(**inputs):
    return lambda: check_inputs(TINY, inputs)


API_ROWS = [
    # attention masks: only 0 and 1
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=[[1, 2]]), InputError,
                 r"attention_mask must hold only 0 .* got 2 at \(0, 1\)", id="mask-2"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=[[-1, 1]]), InputError,
                 r"got -1 at \(0, 0\)", id="mask-minus-1"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=np.array([[1, np.nan]])),
                 InputError, r"got nan at \(0, 1\)", id="mask-nan"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=np.array([[np.inf, 1]])),
                 InputError, r"got inf", id="mask-inf"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=[["a", "b"]]),
                 InputError, r"attention_mask must hold 0/1", id="mask-strings"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=[[1, 1], [1]]),
                 InputError, r"attention_mask .*ragged", id="mask-ragged"),
    pytest.param(_inputs(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]]),
                 InputError, r"attention_mask must have shape", id="mask-wrong-shape"),
    # token ids
    pytest.param(_inputs(input_ids=[[1, 2], [3]]), InputError,
                 r"input_ids must be a rectangular array .*ragged", id="ids-ragged"),
    pytest.param(_inputs(input_ids=[[10**30]]), InputError,
                 r"does not fit in int64", id="ids-10e30"),
    pytest.param(_inputs(input_ids=np.array([[1.0, 2.0]])), InputError,
                 r"integer array .*float64.*astype", id="ids-float"),
    pytest.param(_inputs(input_ids=np.array([[True, False]])), InputError,
                 r"integer array .*bool", id="ids-bool"),
    pytest.param(_inputs(input_ids=[["1", "2"]]), InputError, r"integer array", id="ids-strings"),
    pytest.param(_inputs(input_ids=[[1, 1000]]), InputError,
                 r"token id 1000 is outside \[0, vocab_size=1000\)", id="ids-over-vocab"),
    pytest.param(_inputs(input_ids=np.array([[1, 2]], np.uint64) * 2**63), InputError,
                 r"outside", id="ids-uint64-huge"),
    pytest.param(_inputs(input_ids=np.zeros((1, 0), np.int64)), InputError,
                 r"sequence length 0", id="ids-empty"),
    pytest.param(_inputs(input_ids=np.zeros((1, 65), np.int64)), InputError,
                 r"longer than max_len=64", id="ids-over-max_len"),
    pytest.param(_inputs(input_ids=[[1]], token_type_ids=[[0.5]]), InputError,
                 r"token_type_ids must be an integer array", id="token-types-float"),
    # embeddings
    pytest.param(_inputs(inputs_embeds=np.full((1, 2, 64), np.nan)), InputError,
                 r"inputs_embeds holds nan", id="embeds-nan"),
    pytest.param(_inputs(inputs_embeds=np.full((1, 2, 64), np.inf)), InputError,
                 r"inputs_embeds holds inf", id="embeds-inf"),
    pytest.param(_inputs(inputs_embeds=np.full((1, 2, 64), 1e300)), InputError,
                 r"inputs_embeds holds inf .*after the cast to float32", id="embeds-overflow-f32"),
    pytest.param(_inputs(inputs_embeds=np.zeros((1, 2, 63))), InputError,
                 r"d_model=64", id="embeds-wrong-width"),
    # build
    pytest.param(lambda: xformer.build(TINY.to_dict(), backend="torch"), SpecError,
                 r"build takes a ModelSpec, got dict .*ModelSpec\.from_dict", id="build-dict"),
    pytest.param(lambda: xformer.build("tiny", backend="torch"), SpecError,
                 r"got str 'tiny'.*ModelSpec\.load.*ModelSpec\.preset", id="build-str"),
    pytest.param(lambda: xformer.build(None), SpecError, r"got NoneType", id="build-none"),
    pytest.param(lambda: xformer.build(TINY, backend="torch", dtype="float16"), InputError,
                 r"float32 or float64", id="build-dtype"),
    pytest.param(lambda: xformer.build(TINY, backend="torch", weights=[1, 2]), CheckpointError,
                 r"weights must be a mapping", id="build-weights-list"),
    pytest.param(lambda: xformer.build(TINY, backend="nope"), BackendError,
                 r"unknown backend 'nope'", id="build-backend-unknown"),
    # generate
    pytest.param(_gen(max_new_tokens=2.5), InputError,
                 r"max_new_tokens must be an integer >= 1, got float 2\.5", id="gen-max-new-float"),
    pytest.param(_gen(max_new_tokens=-1), InputError, r"max_new_tokens .* got -1",
                 id="gen-max-new-negative"),
    pytest.param(_gen(max_new_tokens=True), InputError, r"max_new_tokens .* got bool",
                 id="gen-max-new-bool"),
    pytest.param(_gen(num_beams=0), InputError, r"num_beams must be an integer >= 1, got 0",
                 id="gen-beams-0"),
    pytest.param(_gen(num_beams=2.5), InputError, r"num_beams .* got float 2\.5",
                 id="gen-beams-float"),
    pytest.param(_gen(length_penalty=float("nan")), InputError, r"length_penalty",
                 id="gen-length-penalty-nan"),
    pytest.param(_gen(eos_token_id=10**30), InputError, r"eos_token_id .*outside",
                 id="gen-eos-huge"),
    pytest.param(_gen(eos_token_id="2"), InputError, r"eos_token_id must be a token id",
                 id="gen-eos-string"),
    pytest.param(_gen(attention_mask=np.array([[1, np.nan]])), InputError,
                 r"attention_mask .* got nan", id="gen-mask-nan"),
    # spec and weight files through the API
    pytest.param(lambda: ModelSpec.from_dict({"d_model": "abc"}), SpecError, r"d_model",
                 id="spec-from-dict-bad"),
    pytest.param(lambda: xformer.load_weights("/nonexistent.safetensors"), CheckpointError,
                 r"does not exist", id="load-weights-missing"),
]


@pytest.mark.parametrize("call, error, message", API_ROWS)
def test_api_matrix(call, error, message):
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, XformerError)
    text = str(info.value)
    assert "\n" not in text and len(text) <= 400, text[:300]
    assert re.search(message, text), f"{message!r} not in {text!r}"


@pytest.mark.parametrize("ids", [
    pytest.param([[1, 64]], id="python-ints"),
    pytest.param(np.array([[1, 64]], np.int64), id="int64"),
    pytest.param(np.array([[1, 64]], np.int32), id="int32"),
    pytest.param(np.array([[1, 64]], np.uint16), id="uint16"),
    pytest.param([[np.int64(1), np.int64(64)]], id="numpy-scalars"),
])
def test_api_accepts_any_integer_ids(ids):
    """Every integer dtype (and Python ints, numpy scalars) is fine; masks may be bools."""
    out = check_inputs(TINY, {"input_ids": ids, "attention_mask": np.array([[True, False]])})
    assert out["input_ids"].dtype == np.int64
    np.testing.assert_array_equal(out["input_ids"], [[1, 64]])
    np.testing.assert_array_equal(out["attention_mask"], [[1.0, 0.0]])
    assert out["attention_mask"].dtype == np.float32


def test_api_generate_accepts_numpy_counts():
    """``np.int64`` counts and token ids are integers: the same tokens as Python ints."""
    be = xformer.get_backend("torch")
    model = _gpt_model()
    a = be.generate(model, np.array([[1, 2]]), max_new_tokens=np.int64(3),
                    num_beams=np.int32(2), eos_token_id=np.int64(7))
    b = be.generate(model, [[1, 2]], max_new_tokens=3, num_beams=2, eos_token_id=7)
    assert a == b and 1 <= len(a[0]) <= 3


# ---------------------------------------------------------------------- hypothesis
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

NIGHTLY = os.environ.get("XFORMER_NIGHTLY") == "1"


def nightly(test):
    """The ``nightly`` variant: more examples, run only with ``XFORMER_NIGHTLY=1``."""
    return pytest.mark.nightly(pytest.mark.skipif(
        not NIGHTLY, reason="nightly: set XFORMER_NIGHTLY=1")(test))

SPEC_FIELDS = list(TINY.to_dict()) + ["colour", ""]
SIZE_FIELDS = {"vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "max_len",
               "type_vocab_size"}

json_leaf = st.one_of(
    st.none(), st.booleans(),
    st.integers(-3, 70),                                       # small, mostly valid sizes
    st.sampled_from([0, -1, 2**31, 2**63, 10**30, 10**100]),   # hostile, all absurd
    st.floats(allow_nan=False, allow_infinity=False), st.just(64.5),
    st.text(max_size=12), st.sampled_from(["encoder", "decoder", "pre", "gelu", "lm", "1e3"]),
)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8)


def _mutated_spec():
    """A tiny spec with 1-3 fields replaced by hostile values (so examples get past the first
    check), or an arbitrary JSON value."""
    base = TINY.to_dict()
    mutate = st.dictionaries(st.sampled_from(SPEC_FIELDS), json_value, min_size=1, max_size=3)
    return st.one_of(mutate.map(lambda m: {**base, **m}),
                     st.dictionaries(st.sampled_from(SPEC_FIELDS), json_value, max_size=6),
                     json_value)


def _safe(spec) -> bool:
    """Specs whose valid sizes are small (<= 70) or absurd (>= 2**31, refused or failing to
    allocate at once): never a slow, medium-sized model."""
    if not isinstance(spec, dict):
        return True
    for k in SIZE_FIELDS:
        v = spec.get(k)
        if isinstance(v, int) and not isinstance(v, bool) and 70 < v < 2**31:
            return False
    return True


def _check_spec_example(tmp: Path, spec, fmt: str) -> None:
    import yaml

    path = tmp / f"s.{fmt}"
    text = json.dumps(spec) if fmt == "json" else yaml.safe_dump(spec)
    path.write_text(text)
    out = tmp / "o.safetensors"
    out.unlink(missing_ok=True)
    import contextlib
    import io

    err = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["init", "--spec", str(path), "--out", str(out)])
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    assert rc in (0, 2), (rc, lines[:3], spec)
    assert len(lines) <= (0 if rc == 0 else 1), (lines[:3], spec)
    assert path.read_text() == text  # the input is untouched
    assert time.perf_counter() - t0 < 5


def _spec_test(examples: int):
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(spec=_mutated_spec().filter(_safe), fmt=st.sampled_from(["json", "yaml"]))
    def test(tmp_path, spec, fmt):
        _check_spec_example(tmp_path, spec, fmt)
    return test


test_hypothesis_hostile_specs = _spec_test(500)
test_hypothesis_hostile_specs_nightly = nightly(_spec_test(5000))

# Real subcommands and flags, hostile values; cheap commands only (init, generate on the
# gpt2-tiny file with few tokens, compare/diff only with an invalid value so no comparison runs)
_VALUES = st.one_of(st.sampled_from(["0", "-1", "1", "2", "3", "1.5", "nan", "inf", "", ",",
                                     "a,b", "1,,2", str(10**30), "-" , "--", "torch", "nope",
                                     "torch,,torch", "/dev/null", "/proc/x", "/nonexistent/x",
                                     "tiny", "gpt2-tiny", "caf\udce9"]),
                    st.text(max_size=8))


@st.composite
def _argv(draw, gpt: str, tmp: str):
    cmd = draw(st.sampled_from(["init", "generate", "compare", "diff", "show", "nope", ""]))
    if cmd == "init":
        argv = ["init", "--spec", draw(st.sampled_from(["tiny", "gpt2-tiny", "nope", ""])),
                "--out", draw(st.sampled_from([f"{tmp}/o.safetensors", f"{tmp}/o",
                                               "/nonexistent/o", tmp, "/proc/o"]))]
        flags = {"--seed": _VALUES, "--dtype": _VALUES}
    elif cmd == "generate":
        argv = ["generate", "--model", gpt, "--backend", "torch", "--prompt-ids",
                draw(st.sampled_from(["1", "1,2", "a", "", "-1", "999", "1000", str(10**30)]))]
        flags = {"--max-new-tokens": st.sampled_from(["0", "-1", "1", "3", "1.5", "x",
                                                      str(10**30), "70"]),
                 "--num-beams": st.sampled_from(["0", "-1", "1", "2", "2.5", "x"]),
                 "--length-penalty": _VALUES, "--eos-token-id": _VALUES, "--dtype": _VALUES}
    elif cmd in ("compare", "diff"):
        # always one invalid value, so no comparison runs
        bad = draw(st.sampled_from([("--batch", "0"), ("--seq-len", "-1"), ("--repeats", "-2"),
                                    ("--dtype", "f16"), ("--backends", "nope"),
                                    ("--backends", ",,"), ("--spec", "/nonexistent"),
                                    ("--weights", "/nonexistent")]))
        if cmd == "diff" and bad[0] in ("--batch", "--seq-len", "--repeats"):
            bad = ("--spec", "/nonexistent")
        argv = [cmd, *bad] + (["--backends", "torch,torch"] if cmd == "diff"
                              and bad[0] != "--backends" else [])
        flags = {"--seed": _VALUES}
    else:
        argv = [cmd] if cmd else []
        flags = {"--x": _VALUES}
    for flag in draw(st.lists(st.sampled_from(sorted(flags)), max_size=2, unique=True)):
        argv += [flag, draw(flags[flag])]
    return argv


def _argv_test(examples: int):
    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(data=st.data())
    def test(shared, tmp_path, capsys, monkeypatch, data):
        monkeypatch.delenv("XFORMER_BACKEND", raising=False)
        argv = data.draw(_argv(shared["gpt"], str(tmp_path)))
        before = _snapshot(Path(shared["dir"]))
        t0 = time.perf_counter()
        rc, err, _ = run_cli(argv, capsys)
        assert rc in (0, 1, 2), (rc, argv, err[:3])
        extra = 1 if rc == 0 else 0  # the "xformer: backend torch (from ...)" note
        assert len(err) <= 1 + extra, (argv, err[:4])
        assert "Traceback" not in "\n".join(err)
        assert time.perf_counter() - t0 < 5, argv
        assert _snapshot(Path(shared["dir"])) == before
    return test


test_hypothesis_hostile_argv = _argv_test(500)
test_hypothesis_hostile_argv_nightly = nightly(_argv_test(5000))
