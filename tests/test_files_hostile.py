"""Hostile files and resources (issue #8): every spec, config, tokenizer and checkpoint that a
hostile user can hand xformer gives one short ``XformerError`` line, in bounded time, before
any large read or allocation; saves are atomic, fsync-ed, and leave no temporary file after
SIGTERM/SIGINT, nor after SIGKILL once the next save in the folder has run."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xformer import ModelSpec
from xformer.convert import from_pretrained, read_hf_config, spec_from_bert_config, \
    spec_from_gpt2_config
from xformer.errors import CheckpointError, InputError, SpecError, XformerError, truncate
from xformer.resources import GiB, check_memory, estimate_memory, read_capped
from xformer.spec import TMP_MARKER, atomic_write_bytes, clean_stale_temps
from xformer.text import load_tokenizer
from xformer.weights import (check_finite, init_weights, load_weights, safetensors_bytes,
                             safetensors_header, save_pretrained, save_weights)

SPEC = ModelSpec(vocab_size=50, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_len=8)
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _one_line(e: BaseException, limit: int = 300) -> str:
    msg = str(e)
    assert "\n" not in msg and 0 < len(msg) < limit, msg
    return msg


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARKER in p.name or ".xformer-old-"
                  in p.name)


# ---------------------------------------------------------------------- truncate
def test_truncate_cuts_long_values_and_bounds_huge_ones():
    assert truncate("abc") == "'abc'" and truncate(12) == "12" and truncate(None) == "None"
    long = truncate("x" * 500)
    assert long.startswith("'xxx") and long.endswith("…(502 chars)") and len(long) < 100
    assert truncate(10**5000) == "<an integer of ~5001 digits>"  # repr() itself would raise
    bomb: list = [1] * 9
    for _ in range(9):
        bomb = [bomb] * 9  # 9**10 leaves, shared
    t = time.perf_counter()
    out = truncate(bomb)
    assert time.perf_counter() - t < 0.1 and len(out) < 100


# ---------------------------------------------------------------------- spec files
def test_spec_that_is_a_directory(tmp_path):
    with pytest.raises(InputError, match="is not a regular file \\(a directory\\)") as e:
        ModelSpec.load(tmp_path)
    _one_line(e.value)


def test_spec_that_is_a_fifo_does_not_block(tmp_path):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    t = time.perf_counter()
    with pytest.raises(InputError, match="FIFO"):
        ModelSpec.load(fifo)
    assert time.perf_counter() - t < 1


def test_spec_that_is_dev_zero():
    with pytest.raises(InputError, match="not a regular file \\(a character device\\)"):
        ModelSpec.load("/dev/zero")


def test_spec_over_the_size_cap(tmp_path):
    big = tmp_path / "big.yaml"
    with open(big, "wb") as fh:
        fh.truncate(17 << 20)  # sparse: nothing is written, nothing should be read
    with pytest.raises(InputError, match="17.0 MiB, over the 16.0 MiB limit"):
        ModelSpec.load(big)
    assert read_capped(big, limit=18 << 20)[:4] == b"\0\0\0\0"


@pytest.mark.parametrize("data, suffix", [
    (bytes(range(256)) * 4, ".yaml"),          # binary
    ("d_model: 64\nname: caf\xe9\n".encode("latin-1"), ".yaml"),
    (b'{"d_model": 64}\x00', ".json"),         # valid UTF-8, but a NUL byte: binary
])
def test_spec_that_is_not_utf8_text(tmp_path, data, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_bytes(data)
    with pytest.raises(SpecError, match="is not UTF-8 text") as e:
        ModelSpec.load(path)
    _one_line(e.value)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_with_a_5001_digit_integer(tmp_path, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text('{"d_model": 1' + "0" * 5000 + "}")
    with pytest.raises(SpecError, match="4300 digits") as e:
        ModelSpec.load(path)
    _one_line(e.value)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_spec_with_100k_nested_brackets(tmp_path, suffix):
    path = tmp_path / f"spec{suffix}"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SpecError, match="nests too deeply") as e:
        ModelSpec.load(path)
    _one_line(e.value)


def _alias_bomb() -> str:
    """Anchors on real fields, each level nine aliases of the one before: 9**9 values."""
    fields = ["vocab_size", "d_ff", "n_layers", "max_len", "n_heads", "type_vocab_size",
              "norm_eps", "dropout"]
    text = f"{fields[0]}: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
    for i, name in enumerate(fields[1:], 1):
        text += f"{name}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]\n"
    return text + f"d_model: *l{len(fields) - 1}\n"


def test_yaml_alias_bomb_is_refused_fast(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb())
    assert path.stat().st_size < 500
    t = time.perf_counter()
    with pytest.raises(SpecError, match="aliases expand to more than") as e:
        ModelSpec.load(path)
    assert time.perf_counter() - t < 2
    _one_line(e.value)


def test_small_alias_expansion_still_echoes_a_short_value():
    # 9**3 values: under the node cap, so the field check speaks, and truncates the value
    text = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [" + ", ".join(["*a"] * 9) + "]\n"
            "d_model: [" + ", ".join(["*b"] * 9) + "]\n")
    with pytest.raises(SpecError) as e:
        ModelSpec.from_yaml(text.replace("a: &a", "vocab_size: &a").replace("b: &b",
                                                                            "d_ff: &b"))
    assert "must be an integer" in _one_line(e.value)


def test_recursive_yaml_alias():
    with pytest.raises(SpecError, match="refers to itself"):
        ModelSpec.from_yaml("d_model: &x [*x]\n")


def test_long_unknown_key_is_truncated():
    with pytest.raises(SpecError, match="unknown spec field") as e:
        ModelSpec.from_dict({"q" * 10_000: 1})
    _one_line(e.value, 400)  # the list of known fields follows the key


@pytest.mark.parametrize("changes, words", [
    ({"d_model": 2**40}, ["'d_model'", "<= 2147483647"]),
    ({"n_layers": 10**9}, ["'n_layers'", "<= 10000"]),
    ({"d_model": -(10**5000)}, ["'d_model'", "~5001 digits"]),
    ({"norm_eps": 10**400}, ["'norm_eps'", "number in range"]),
    ({"vocab_size": 2**31 - 1, "d_model": 65536, "n_heads": 4}, ["parameters", "over the"]),
])
def test_absurd_sizes_are_refused_cleanly(changes, words):
    t = time.perf_counter()
    with pytest.raises(SpecError) as e:
        ModelSpec(**{**SPEC.to_dict(), **changes})
    assert time.perf_counter() - t < 1
    msg = _one_line(e.value)
    assert all(w in msg for w in words), msg


def test_unreadable_spec_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "spec.json"
    path.write_text(SPEC.to_json())
    path.chmod(0)
    if IS_ROOT:  # root reads a mode-000 file anyway: it is then a valid spec
        assert ModelSpec.load(path) == SPEC

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("xformer.resources.open", denied, raising=False)
    with pytest.raises(InputError, match="permission denied; make it readable \\(chmod \\+r\\)"):
        ModelSpec.load(path)


def test_dangling_symlink_spec_says_no_such_file(tmp_path):
    (tmp_path / "spec.json").symlink_to(tmp_path / "gone.json")
    with pytest.raises(InputError, match="no such file"):
        ModelSpec.load(tmp_path / "spec.json")


@settings(max_examples=150, deadline=5000, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.dictionaries(st.sampled_from(list(SPEC.to_dict())), st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=50),
        st.lists(st.integers(), max_size=5)), max_size=6).map(json.dumps),
))
def test_hostile_spec_text_gives_one_line_errors(data):
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    for parse in (ModelSpec.from_json, ModelSpec.from_yaml):
        try:
            parse(text)
        except XformerError as e:
            _one_line(e, 600)


# ---------------------------------------------------------------------- Hugging Face configs
BERT_CONFIG = dict(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                   num_hidden_layers=1, max_position_embeddings=8, type_vocab_size=2)


@pytest.mark.parametrize("key", ["hidden_size", "num_attention_heads", "intermediate_size",
                                 "num_hidden_layers", "vocab_size"])
def test_bert_config_missing_size(key):
    config = {k: v for k, v in BERT_CONFIG.items() if k != key}
    with pytest.raises(SpecError, match=f"config.json has no '{key}'"):
        spec_from_bert_config(config)


@pytest.mark.parametrize("value", ["abc", None, 32.7, True, [16], -4])
def test_bert_config_bad_size(value):
    with pytest.raises(SpecError, match="config.json hidden_size = ") as e:
        spec_from_bert_config({**BERT_CONFIG, "hidden_size": value})
    _one_line(e.value)


def test_bert_config_integral_float_is_accepted():
    assert spec_from_bert_config({**BERT_CONFIG, "hidden_size": 16.0}).d_model == 16


@pytest.mark.parametrize("key, value, match", [
    ("n_embd", 32.7, "n_embd = 32.7 is not an integer"),
    ("n_head", "abc", "n_head = 'abc' is not an integer"),
    ("n_layer", None, "n_layer = None is not an integer"),
    ("layer_norm_epsilon", "x", "layer_norm_epsilon = 'x' is not a number"),
    ("resid_pdrop", float("nan"), "resid_pdrop = nan is not a finite number"),
    ("activation_function", ["gelu"], "activation_function \\['gelu'\\] is not supported"),
])
def test_gpt2_config_bad_values(key, value, match):
    with pytest.raises(SpecError, match=match):
        spec_from_gpt2_config({"n_embd": 16, "n_head": 2, "n_layer": 1, "vocab_size": 50,
                               "n_positions": 8, "bos_token_id": 0, "eos_token_id": 0,
                               key: value})


def test_config_json_hostile_files(tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": "caf\xe9"}')
    with pytest.raises(CheckpointError, match="is not UTF-8 text"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match="nests too deeply"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 1' + "0" * 5000 + "}")
    with pytest.raises(CheckpointError, match="4300 digits"):
        read_hf_config(tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        read_hf_config(tmp_path)


def test_from_pretrained_with_a_config_missing_hidden_size(tmp_path):
    save_pretrained(tmp_path / "m", SPEC, init_weights(SPEC))
    config = {k: v for k, v in BERT_CONFIG.items() if k != "hidden_size"}
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert", **config}))
    with pytest.raises(SpecError, match="config.json has no 'hidden_size'"):
        from_pretrained(tmp_path / "m")


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 12}')
    with pytest.raises(CheckpointError, match="is not a tokenizers tokenizer.json") as e:
        load_tokenizer(tmp_path)
    _one_line(e.value)
    (tmp_path / "tokenizer.json").write_bytes(b"\xff\xfe")
    with pytest.raises(CheckpointError, match="not UTF-8"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(InputError, match="not a regular file"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------- checkpoints
def _sparse_checkpoint(path: Path, tensors: dict[str, tuple[str, list[int]]],
                       size: int | None = None, metadata: dict | None = None) -> int:
    """A safetensors file whose header claims ``tensors`` ({name: (dtype, shape)}) and whose
    data section is a hole (``truncate``): no tensor byte is written. Returns the file size."""
    item = {"F32": 4, "F64": 8}
    header: dict = {"__metadata__": metadata or {"format": "np"}}
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = item[dtype] * int(np.prod(shape))
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.truncate(8 + len(raw) + offset if size is None else size)
    return path.stat().st_size


def test_sparse_checkpoint_claiming_gigabytes_is_refused_from_its_header(tmp_path):
    path = tmp_path / "w.safetensors"
    tensors = {p.name: ("F32", list(p.shape)) for p in SPEC.parameters()}
    tensors["extra.weight"] = ("F32", [3_150_000_000])  # 12.6 GB
    size = _sparse_checkpoint(path, tensors, metadata={"xformer_spec": SPEC.to_json()})
    assert size > 12_000_000_000 and path.stat().st_blocks * 512 < 1_000_000  # sparse
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="extra 1: extra.weight") as e:
        load_weights(path)
    assert time.perf_counter() - t < 1
    _one_line(e.value)


def test_checkpoint_claiming_more_than_the_file_holds(tmp_path):
    path = tmp_path / "w.safetensors"
    _sparse_checkpoint(path, {"a": ("F32", [1000, 1000])}, size=680_000)
    with pytest.raises(CheckpointError, match="tensor 'a' lies at bytes .* the file is "
                                              "truncated"):
        load_weights(path, SPEC)
    path.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match="bad header size"):
        safetensors_header(path)
    path.write_bytes(b"\x01")
    with pytest.raises(CheckpointError, match="fewer than the 8"):
        safetensors_header(path)


@pytest.mark.parametrize("entry, match", [
    ({"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 15]}, "needs 16 bytes"),
    ({"dtype": "Q99", "shape": [2], "data_offsets": [0, 8]}, "unknown dtype"),
    ({"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}, "bad shape"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}, "bad data_offsets"),
    ("x", "no dtype/shape/data_offsets"),
])
def test_malformed_header_entries(tmp_path, entry, match):
    raw = json.dumps({"a": entry}).encode()
    path = tmp_path / "w.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    with pytest.raises(CheckpointError, match=match):
        load_weights(path, SPEC)


def test_header_matches_a_real_file(tmp_path):
    w = init_weights(SPEC)
    path = tmp_path / "w.safetensors"
    path.write_bytes(safetensors_bytes(w, {"format": "np"}))
    header = safetensors_header(path)
    assert {k for k in header if not k.startswith("__")} == set(w)
    with open(path, "ab") as fh:
        fh.write(b"\0" * 8)  # trailing bytes no tensor owns
    with pytest.raises(CheckpointError, match="the header does not describe the file"):
        load_weights(path, SPEC)


def test_unreadable_checkpoint_says_permission_denied(tmp_path, monkeypatch):
    path = tmp_path / "w.safetensors"
    save_weights(path, init_weights(SPEC), SPEC)
    path.chmod(0)
    if IS_ROOT:
        assert load_weights(path)[0] == SPEC

        def denied(*a, **k):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("xformer.weights.open", denied, raising=False)
    with pytest.raises(CheckpointError, match="permission denied") as e:
        load_weights(path)
    assert "No such file" not in str(e.value)


def test_check_finite_names_the_first_bad_tensor():
    w = init_weights(SPEC)
    check_finite(w)  # finite: no error
    names = list(w)
    w[names[2]] = w[names[2]].copy()
    w[names[2]].flat[[3, 5]] = [np.nan, np.inf]
    w[names[4]] = np.full_like(w[names[4]], -np.inf)
    with pytest.raises(CheckpointError) as e:
        check_finite(w, "tensors in w.safetensors")
    msg = _one_line(e.value)
    n4 = w[names[4]].size
    assert msg.startswith(f"tensors in w.safetensors hold {2 + n4} non-finite values: "
                          f"'{names[2]}'[3] = nan (and 1 more tensors)")
    assert e.value.details == [f"non-finite: {names[2]} (2)", f"non-finite: {names[4]} ({n4})"]


# ---------------------------------------------------------------------- memory
def test_memory_estimate_refuses_a_15_gib_model_without_allocating():
    big = ModelSpec.preset("bert-base").replace(d_model=65536, n_heads=16, d_ff=4 * 65536)
    t = time.perf_counter()
    need = estimate_memory(big)
    assert need >= big.num_parameters() * 4 > 15 * GiB
    with pytest.raises(InputError) as e:
        check_memory(big, available=int(5.2 * GiB))
    assert time.perf_counter() - t < 1
    msg = _one_line(e.value)
    assert msg.endswith(f"needs {need / GiB:.1f} GiB; 5.2 GiB available; use --force to try")
    assert check_memory(big, available=int(5.2 * GiB), force=True) == need


def test_memory_estimate_terms():
    spec = ModelSpec.preset("gpt2-tiny")
    base = estimate_memory(spec, seq_len=16)
    assert estimate_memory(spec, "float64", seq_len=16) == 2 * base
    assert estimate_memory(spec, seq_len=16, backward=True) == 3 * base
    params = spec.num_parameters() * 4
    per_row = base - params
    assert estimate_memory(spec, seq_len=16, num_beams=4) == params + 4 * per_row
    assert estimate_memory(spec, seq_len=16, batch=2) == params + 2 * per_row
    beams = estimate_memory(spec, seq_len=16, num_beams=100_000_000)
    with pytest.raises(InputError, match="100000000 beams.*use --force to try"):
        check_memory(spec, seq_len=16, num_beams=100_000_000, available=beams - 1)
    assert check_memory(SPEC) == estimate_memory(SPEC)  # tiny: fits the real machine
    with pytest.raises(InputError, match="num_beams must be a positive integer"):
        estimate_memory(spec, num_beams=0)


# ---------------------------------------------------------------------- atomic saves
def test_atomic_write_fsyncs_file_and_folder_and_names_its_temp(tmp_path, monkeypatch):
    synced, made = [], []
    real_fsync, real_open = os.fsync, os.open

    def fsync(fd):
        synced.append(os.path.isdir(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def opener(path, *a, **k):
        made.append(os.path.basename(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "open", opener)
    atomic_write_bytes(tmp_path / "r.json", b"{}")
    assert synced == [False, True]  # the file, then its folder after the rename
    assert made[0].startswith(f".r.json{TMP_MARKER}{os.getpid()}-") and made[0].endswith(".tmp")
    assert (tmp_path / "r.json").read_bytes() == b"{}" and _temps(tmp_path) == []


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_next_save_removes_temps_of_dead_processes(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    stale = tmp_path / f".w.safetensors{TMP_MARKER}{dead}-0123abcd.tmp"
    stale.write_bytes(b"x" * 1000)
    stale_dir = tmp_path / f".m{TMP_MARKER}{dead}-0123abcd.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.safetensors").write_bytes(b"x")
    live = tmp_path / f".w.safetensors{TMP_MARKER}{alive}-0123abcd.tmp"
    live.write_bytes(b"y")
    other = tmp_path / ".w.safetensors.abc.tmp"  # not ours: left alone
    other.write_bytes(b"z")
    save_weights(tmp_path / "w.safetensors", init_weights(SPEC), SPEC)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [live.name, other.name, "w.safetensors"])


def test_a_directory_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    dead = _dead_pid()
    save_pretrained(tmp_path / "m", SPEC, init_weights(SPEC))
    os.replace(tmp_path / "m", tmp_path / f".m.xformer-old-{dead}-0123abcd.old")
    assert clean_stale_temps(tmp_path) == [f".m.xformer-old-{dead}-0123abcd.old"]
    assert load_weights(tmp_path / "m" / "model.safetensors")[0] == SPEC


_SAVER = textwrap.dedent("""
    import sys, numpy as np
    from xformer.spec import atomic_write_bytes
    path, mark = sys.argv[1], sys.argv[2]
    data = [np.full(40_000_000, i % 256, np.uint8).tobytes() for i in range(2)]
    atomic_write_bytes(path, data[0])
    open(mark, "w").close()
    i = 1
    while True:
        atomic_write_bytes(path, data[i % 2])
        i += 1
""")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_saves_leaves_old_or_new_and_no_temp(tmp_path, sig):
    target, mark = tmp_path / "big.bin", tmp_path / "started"
    child = subprocess.Popen([sys.executable, "-c", _SAVER, str(target), str(mark)],
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not mark.exists():
        assert child.poll() is None and time.monotonic() < deadline, child.stderr.read()
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the loop of saves, most likely mid-write
    child.send_signal(sig)
    child.wait(timeout=60)
    child.stderr.close()
    assert child.returncode in (-sig, 1 if sig == signal.SIGINT else -sig)  # KeyboardInterrupt
    data = target.read_bytes()
    assert len(data) == 40_000_000 and data.count(data[:1]) == len(data)  # whole: old or new
    if sig == signal.SIGKILL:  # nothing can clean up after SIGKILL... until the next save
        atomic_write_bytes(tmp_path / "other.bin", b"x")
    assert _temps(tmp_path) == []


_SELF_SIGNAL = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import xformer.spec as spec_module
    from xformer.weights import atomic_write_dir
    path, sig, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    real = os.fsync

    def fsync(fd):  # the temporary file is written, not yet renamed: the worst moment
        os.kill(os.getpid(), sig)
        return real(fd)

    os.fsync = fsync
    if kind == "file":
        spec_module.atomic_write_bytes(Path(path), b"new")
    else:
        atomic_write_dir(path, {"a.txt": b"new"})
    print("not reached")
""")


@pytest.mark.parametrize("kind", ["file", "dir"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_save_removes_its_temp_and_keeps_the_old(tmp_path, sig, kind):
    target = tmp_path / "out"
    if kind == "file":
        target.write_bytes(b"old")
    else:
        target.mkdir()
        (target / "a.txt").write_bytes(b"old")
    out = subprocess.run([sys.executable, "-c", _SELF_SIGNAL, str(target), str(int(sig)), kind],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode in (-sig, 1), out.stderr  # the signal's own default action
    assert "not reached" not in out.stdout
    assert (target if kind == "file" else target / "a.txt").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_hugging_face_import_checks_shapes_from_the_header(tmp_path):
    from xformer.convert import gpt2_config_dict, gpt2_tensor_shapes

    spec = ModelSpec.preset("gpt2-tiny")
    shapes = {k: ("F32", list(v)) for k, v in gpt2_tensor_shapes(spec, "transformer.").items()}
    shapes["transformer.wte.weight"] = ("F32", [spec.vocab_size, 3_000_000])  # 12 GB, sparse
    _sparse_checkpoint(tmp_path / "model.safetensors", shapes)
    (tmp_path / "config.json").write_text(json.dumps(gpt2_config_dict(spec)))
    t = time.perf_counter()
    with pytest.raises(CheckpointError, match="mis-shaped 1: wte.weight \\(1000, 3000000\\)"):
        from_pretrained(tmp_path)
    assert time.perf_counter() - t < 1
