"""The ``xformer`` command line.

``xformer compare``  run one model on every backend and mode, compare outputs and gradients.
``xformer embed``    sentence embeddings of a BERT checkpoint on one backend.
``xformer generate`` greedy or beam-search generation.
``xformer diff``     where two runs diverge, node by node.
``xformer show``     the three implementations of one node class.
``xformer init``     random canonical weights for a spec (a checkpoint directory or one file).
``xformer train``    optimizer steps on one backend with its own optimizer; writes a checkpoint;
                     ``--nproc N``: data-parallel on the framework's own engine.
``xformer backends`` the registered backends, installed or not.

Exit status, one contract for every command (:func:`main`):

* **0** success (``compare``/``diff``: every backend conforms, no divergence);
* **1** ``compare`` or ``diff`` ran and found a mismatch (NOT CONFORMANT, a divergence);
  ``train --nproc N``: a worker died (killed, or a status other than 2 / 3, which pass
  through) and the launcher stopped the run;
* **2** bad input or environment: an :class:`~xformer.errors.XformerError`, a usage error, an
  ``OSError`` (missing, unreadable or unwritable path, full disk), an argument that is not
  UTF-8, input nested too deeply (``RecursionError``) or too large (``MemoryError``);
* **3** internal error (a bug): one line ``xformer: internal error: <Type>: <message> (please
  report it with --debug output)``; the traceback only with ``--debug``;
* **130** interrupted (Ctrl-C).

Every error is exactly one line on stderr, ``xformer: error: <problem>; <fix>`` (``--verbose``
adds the full list when the line summarises one, e.g. every tensor of a checkpoint that does
not match its spec). Everything is checked before the work starts: output paths (``--json``,
``--html``, ``init --out``: the folder exists and is writable, the path is not a directory, not
under /proc, /sys or /dev, and not any input of the same command nor inside an input
directory), conflicting options (``--model`` with ``--weights``), backend lists (no empty or
duplicate entry), seeds (``[0, 2**32)``), prompt ids (``[0, vocab_size)``), non-finite weights
(NaN/inf, named by tensor) and the memory a model needs (refused with "needs 14.9 GiB; 5.2 GiB
available; use --force to try"). Framework log noise (TensorFlow's C++ and Python loggers, absl)
is silenced for the whole process.

Output fits the terminal: tables and panels take the width of the terminal, or ``$COLUMNS``
(80 when neither is known), never more.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Sequence

from .errors import BackendError, InputError, XformerError, truncate

DEMO_SENTENCES = ("The quick brown fox jumps over the lazy dog.",
                  "Does my Transformer compute the same thing on PyTorch, TensorFlow and MXNet?")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"xformer: error: {_one_line(message, 300)} (see '{self.prog} --help')",
              file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xformer", description="One Transformer spec on PyTorch, TensorFlow and "
                                            "MXNet: build, load shared weights, compare.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="on an error that summarises a list (a checkpoint's tensors), "
                             "print the whole list")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on an internal error (exit 3), print the traceback")
    p.add_argument("--debug", action="store_true",
                   help="on an internal error (exit 3), print the traceback")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help: str, *parents: argparse.ArgumentParser
            ) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common, *parents], help=help)

    # the optimizer, schedule and batching of a training run (train, compare --train-steps);
    # None = xformer.training.TrainConfig's default
    opt = argparse.ArgumentParser(add_help=False)
    opt.add_argument("--data", metavar="FILE",
                     help="token rows: a .npy integer array (N, T); an encoder-decoder's .npz "
                          "with source (N, S) and target (N, T)")
    opt.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default=None,
                     help="torch.optim semantics on every backend (default adamw)")
    opt.add_argument("--lr", type=float, default=None, help="base learning rate (default 1e-3)")
    opt.add_argument("--betas", metavar="B1,B2", default=None,
                     help="Adam/AdamW betas (default 0.9,0.999)")
    opt.add_argument("--eps", type=float, default=None, help="Adam/AdamW eps (default 1e-8)")
    opt.add_argument("--momentum", type=float, default=None, help="SGD momentum (default 0)")
    opt.add_argument("--nesterov", action="store_true", default=None,
                     help="SGD Nesterov momentum")
    opt.add_argument("--weight-decay", type=float, default=None,
                     help="AdamW: decoupled (default 0.01); SGD/Adam: L2 (default 0)")
    opt.add_argument("--no-decay-bias-norm", action="store_true", default=None,
                     help="exclude biases and norm weights from weight decay (BERT's choice)")
    opt.add_argument("--clip-grad-norm", type=float, default=None, metavar="C",
                     help="clip gradients by global L2 norm C (torch.nn.utils.clip_grad_norm_)")
    opt.add_argument("--schedule", choices=("constant", "linear", "cosine"), default=None,
                     help="learning-rate schedule with warm-up, as transformers' "
                          "get_*_schedule_with_warmup (default constant)")
    opt.add_argument("--warmup-steps", type=int, default=None, help="(default 0)")
    opt.add_argument("--batch-size", type=int, default=None,
                     help="rows per micro-batch (default 8)")
    opt.add_argument("--grad-accum", type=int, default=None, metavar="K",
                     help="micro-batches per optimizer step (default 1)")

    c = add("compare", "compare outputs, gradients and speed across backends", opt)
    src = c.add_mutually_exclusive_group()
    src.add_argument("--model", metavar="PATH",
                     help="a Hugging Face BERT, GPT-2, Llama, Mistral, Qwen2, Gemma or "
                          "GPT-NeoX directory (config.json + model.safetensors), an xformer "
                          "checkpoint directory or .safetensors file")
    src.add_argument("--spec", metavar="FILE", help="a spec (.json/.yaml) or preset name")
    c.add_argument("--weights", metavar="FILE", help="canonical safetensors weights "
                   "(default: random from --seed)")
    c.add_argument("--backends", metavar="A,B",
                   help="backends or backend/mode targets (default: every installed backend, "
                        "its default modes)")
    c.add_argument("--all-modes", action="store_true",
                   help="also the opt-in modes (torch compile, TensorFlow XLA)")
    c.add_argument("--dtype", choices=("float32", "float64", "both"), default="both")
    c.add_argument("--reference", default="auto",
                   choices=("auto", "huggingface", "torch.nn", "numpy", "none"),
                   help="independent reference (auto: the checkpoint's own Hugging Face class "
                        "for --model DIR; else PyTorch nn.TransformerEncoderLayer where it "
                        "expresses the spec, else a Hugging Face class that does, else numpy)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch", type=int, default=3, help="batch size of random inputs")
    c.add_argument("--seq-len", type=int, default=None, help="length of random inputs")
    c.add_argument("--repeats", type=int, default=3,
                   help="timed calls per measurement, after one warm-up call (median; 0: no "
                        "timing)")
    c.add_argument("--json", metavar="FILE", help="also write the full report as JSON")
    c.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")
    c.add_argument("--html", metavar="FILE",
                   help="also write a self-contained HTML report (verdict table, per-node "
                        "error plots, timings, spec, environment)")
    c.add_argument("--train-steps", type=int, default=None, metavar="N",
                   help="compare N optimizer steps instead of one pass: per step the loss and "
                        "the worst error of parameters and optimizer state between targets "
                        "(data: --data, or seeded random token rows)")

    c.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="with --train-steps: also train every target data-parallel on N "
                        "workers (xformer train --nproc N) and compare with one process")

    t = add("train", "train with one backend's own optimizer; write a checkpoint", opt)
    tsrc = t.add_mutually_exclusive_group(required=True)
    tsrc.add_argument("--model", metavar="PATH",
                      help="a checkpoint directory (Hugging Face or xformer) or .safetensors "
                           "file to start from")
    tsrc.add_argument("--spec", metavar="FILE",
                      help="a spec (.json/.yaml) or preset name (weights: --weights, else "
                           "fresh from --seed)")
    t.add_argument("--weights", metavar="FILE", help="canonical safetensors weights")
    t.add_argument("--backend", help="torch, tensorflow or mxnet (default: $XFORMER_BACKEND, "
                                     "./xformer.toml, else torch)")
    t.add_argument("--mode", help="the backend's execution mode (default: its preferred one)")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps")
    t.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    t.add_argument("--dropout", choices=("native", "stream", "off"), default="native",
                   help="native: the framework's own dropout; stream: xformer's seeded masks, "
                        "the same on every backend; off")
    t.add_argument("--seed", type=int, default=0,
                   help="seeds fresh weights and the dropout stream")
    t.add_argument("--out", metavar="DIR", required=True,
                   help="the checkpoint directory to write (spec.json + model.safetensors)")
    t.add_argument("--json", action="store_true",
                   help="print the run (per-step loss, learning rate, gradient norm) as JSON")
    t.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")
    t.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="data-parallel on N local workers through the framework's own engine "
                        "(torch DDP/gloo, TF MultiWorkerMirroredStrategy, MXNet kvstore "
                        "dist_sync); --batch-size is the global batch, split evenly")
    t.add_argument("--port", type=int, default=None,
                   help="with --nproc: the rendezvous port on 127.0.0.1 (default: a free one)")

    e = add("embed", "sentence embeddings (mean-pooled, L2-normalised)")
    e.add_argument("--model", metavar="DIR", required=True,
                   help="a BERT directory with tokenizer.json")
    e.add_argument("--backend", help="torch, tensorflow or mxnet (default: $XFORMER_BACKEND, "
                                     "config file, torch)")
    e.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    e.add_argument("--json", action="store_true",
                   help="print one JSON array with one vector per sentence")
    e.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")
    e.add_argument("sentences", nargs="+", metavar="SENTENCE")

    g = add("generate", "greedy or beam-search generation (decoder, encoder-decoder)")
    g.add_argument("--model", metavar="PATH", required=True,
                   help="a Hugging Face GPT-2 or Llama-family directory, an xformer "
                        "checkpoint directory, or an xformer .safetensors file (as `xformer "
                        "init` writes them)")
    g.add_argument("--backend", help="torch, tensorflow or mxnet (default: $XFORMER_BACKEND, "
                                     "config file, torch)")
    g.add_argument("--prompt-ids", metavar="I,J,...", required=True,
                   help="prompt token ids (decoder) or source token ids (encoder-decoder)")
    g.add_argument("--max-new-tokens", type=int, default=20)
    g.add_argument("--num-beams", type=int, default=1, help="1: greedy; K > 1: beam search")
    g.add_argument("--length-penalty", type=float, default=1.0)
    g.add_argument("--eos-token-id", type=int, default=None,
                   help="default: the spec's eos_token_id")
    g.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    g.add_argument("--json", action="store_true",
                   help="print the generated ids (prompt excluded) as one JSON array")
    g.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")

    d = add("diff", "locate where two runs diverge, node by node")
    d.add_argument("--spec", metavar="FILE", required=True, help="side A's spec (file or preset)")
    d.add_argument("--weights", metavar="FILE",
                   help="side A's weights (default: random from --seed)")
    d.add_argument("--backends", metavar="A,B", required=True,
                   help="the backend of side A and of side B (may be the same)")
    d.add_argument("--spec-b", metavar="FILE", help="side B's spec (default: --spec)")
    d.add_argument("--weights-b", metavar="FILE", help="side B's weights (default: --weights)")
    d.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    d.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")

    sh = add("show", "the torch, Keras and Gluon code of one node class, side by side")
    sh.add_argument("node", metavar="NODE", nargs="?",
                    help="a class such as MultiHeadAttention (omit to list them)")

    i = add("init", "write random canonical weights for a spec")
    i.add_argument("--spec", metavar="FILE", required=True, help="spec file or preset name")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    i.add_argument("--out", metavar="PATH", required=True,
                   help="a checkpoint directory to write (spec.json + model.safetensors, what "
                        "--model reads), or one file if PATH ends in .safetensors (the spec "
                        "in its metadata)")
    i.add_argument("--force", action="store_true",
                   help="build the model even if it needs more memory than is available")

    ck = add("check", "check your own module (torch, Keras, Gluon) against the spec; find "
                      "where it diverges")
    ck.add_argument("impls", nargs="+", metavar="IMPL",
                    help="BACKEND:MODULE:FACTORY, e.g. torch:my_bert.py:build; "
                         "factory(spec, dtype) returns the native module")
    ck.add_argument("--map", dest="maps", action="append", metavar="MAP.yaml", required=True,
                    help="the mapping file of each IMPL, in order (canonical -> native names)")
    ck.add_argument("--spec", metavar="FILE", required=True, help="spec file or preset name")
    ck.add_argument("--weights", metavar="FILE",
                    help="canonical safetensors weights (default: random from --seed)")
    ck.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ck.add_argument("--seed", type=int, default=0)
    ck.add_argument("--show-map", action="store_true",
                    help="print the full mapping used (automatic matches included)")
    ck.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ck.add_argument("--html", metavar="FILE",
                    help="also write a self-contained HTML report with the per-node plot")

    add("backends", "list backends, their modes and framework versions")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``xformer`` command; returns the exit status of the contract in the module
    docstring (0, 1, 2, 3 or 130). Every error is one line on stderr."""
    _quiet_frameworks()
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # usage error (2) or --help (0), already printed
        return int(e.code or 0)
    debug = bool(getattr(args, "debug", False))
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            _check_arguments(args)
            _check_outputs(args)
            args.argv = list(sys.argv[1:] if argv is None else argv)  # --nproc's workers run it
            return {"compare": cmd_compare, "embed": cmd_embed, "init": cmd_init,
                    "train": cmd_train,
                    "generate": cmd_generate, "diff": cmd_diff, "show": cmd_show,
                    "check": cmd_check,
                    "backends": cmd_backends}[args.command](args)
        except XformerError as e:
            _error(str(e))
            if args.verbose:
                for line in getattr(e, "details", ()):
                    print(f"  {line}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except OSError as e:  # the environment: a path, a permission, a full disk
            _error(_os_message(e))
            return 2
        except UnicodeError as e:
            _error(f"text that is not valid UTF-8 ({getattr(e, 'reason', None) or e}); give "
                   f"UTF-8 text and files")
            return 2
        except RecursionError:
            _error("the input is nested too deeply to process; simplify it")
            return 2
        except MemoryError:
            _error("out of memory on this input; use a smaller model, batch or sequence")
            return 2
        except Exception as e:  # a bug: short line, traceback only with --debug
            if debug:
                import traceback

                traceback.print_exc()
            print(f"xformer: internal error: {type(e).__name__}: "
                  f"{_one_line(str(e), 300)} (please report it with --debug output)",
                  file=sys.stderr)
            return 3


#: Longest error line the CLI prints (a message that echoes a huge value is cut).
ERROR_LINE_LIMIT = 2000


def _one_line(message: str, limit: int = ERROR_LINE_LIMIT) -> str:
    """``message`` on one line (newlines become ``" | "``), cut to ``limit`` characters."""
    text = " | ".join(line.strip() for line in message.splitlines() if line.strip())
    if len(text) > limit:
        text = f"{text[:limit]}…({len(text)} chars)"
    return text


def _error(message: str) -> None:
    print(f"xformer: error: {_one_line(message)}", file=sys.stderr)


def _os_message(e: OSError) -> str:
    """One line for an ``OSError``: the path, the reason and a fix."""
    import errno

    name = f"{truncate(str(e.filename), 200)}: " if e.filename is not None else ""
    reason = e.strerror or _one_line(str(e), 200) or type(e).__name__
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free some space or write elsewhere"
    else:
        fix = {PermissionError: "check its permissions", FileNotFoundError: "check the path",
               IsADirectoryError: "give a file, not a directory"}.get(
                   type(e), "check the path and its permissions")
    return f"{name}{reason}; {fix}"


def _quiet_frameworks() -> None:
    """Silence framework log noise for the whole process: TensorFlow's C++ start-up log
    (``xformer_tensorflow.import_tensorflow`` makes it honour ``TF_CPP_MIN_LOG_LEVEL``, set to
    3 unless the user set it), and the Python loggers of TensorFlow, Keras and absl (retracing
    notes and the like are about our many short-lived models, not the user's input;
    ``tf.get_logger()`` is the ``tensorflow`` one); if absl is already imported, its verbosity
    too."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    for name in ("tensorflow", "keras", "absl", "h5py", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if "absl.logging" in sys.modules:
        try:
            sys.modules["absl.logging"].set_verbosity("error")
        except Exception:  # pragma: no cover - an absl without set_verbosity
            pass


# ---------------------------------------------------------------------- argument checks
#: Options that name inputs (files or directories) and outputs, per command.
_INPUTS = ("model", "spec", "weights", "spec_b", "weights_b", "data", "maps")
_OUTPUTS = {"compare": ("json", "html"), "diff": ("json",), "init": ("out",),
            "check": ("json", "html"),
            "train": ("out",)}
_SYSTEM_DIRS = ("/proc", "/sys", "/dev")


def _option(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def _check_arguments(args) -> None:
    """Cheap checks of the arguments before any work.

    Raises:
        InputError: an argument that is not UTF-8 (surrogate escapes from undecodable bytes
            in ``sys.argv``) or holds a NUL; a seed outside ``[0, 2**32)``; ``--model`` with
            ``--weights``.
    """
    for dest, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str):
                if "\x00" in v:
                    raise InputError(f"{_option(dest)} contains a NUL character; remove it")
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    what = "an argument" if dest == "sentences" else _option(dest)
                    raise InputError(f"{what} is not valid UTF-8 text ({truncate(v)}); pass "
                                     f"UTF-8 (check the terminal's or the file's encoding)"
                                     ) from None
    seed = getattr(args, "seed", None)
    if seed is not None and not 0 <= seed < 2**32:
        raise InputError(f"--seed must be an integer in [0, 2**32), got {truncate(seed)}")
    if getattr(args, "model", None) is not None and getattr(args, "weights", None) is not None:
        raise InputError("give either --model (which holds its weights) or --spec/--weights, "
                         "not both")


def _check_outputs(args) -> None:
    """Every output path of the command, checked before any work (:func:`check_output_path`
    against every input path of the same command); two outputs may not be the same file."""
    inputs = {}
    for d in _INPUTS:
        value = getattr(args, d, None)
        for i, v in enumerate(value if isinstance(value, list) else [value] if value else []):
            inputs[_option(d) + (f" #{i + 1}" if isinstance(value, list) else "")] = v
    seen: dict[str, str] = {}
    for dest in _OUTPUTS.get(args.command, ()):
        path = getattr(args, dest, None)
        if path is None:
            continue
        option = _option(dest)
        check_output_path(path, inputs, option=option,
                          directory=(args.command == "init" and
                                     not str(path).endswith(".safetensors"))
                          or args.command == "train")
        key = os.path.realpath(path)
        if key in seen:
            raise InputError(f"{seen[key]} and {option} are the same file {truncate(path)}; "
                             f"give two paths")
        seen[key] = option


def check_output_path(path: str, inputs: dict[str, str] | None = None, *, option: str = "output",
                      directory: bool = False) -> Path:
    """Check, before any work, that ``path`` can take an output of a command.

    Args:
        path: the output path. inputs: ``{option: path}`` of the command's inputs (files or
            directories; names that are not paths, such as presets, are skipped).
        option: the option, for the message (``"--json"``). directory: the output is a
            directory (``init --out DIR``), which may exist.
    Returns:
        ``Path(path)``.
    Raises:
        InputError: empty path; the parent folder missing, not a folder or not writable; the
            path an existing directory (for a file output) or an existing file (for a
            directory output) or not a regular file; under /proc, /sys or /dev; the same file as
            an input, or inside an input directory, or (a directory output) holding an input.
    """
    if not path:
        raise InputError(f"{option} is empty; give a file path")
    shown = truncate(str(path), 200)
    real = os.path.realpath(path)
    system = next((d for d in _SYSTEM_DIRS if real == d or real.startswith(d + os.sep)), None)
    if system is not None:
        raise InputError(f"{option} {shown} is under {system}, a system folder; write to a "
                         f"normal folder")
    for name, inp in (inputs or {}).items():
        if not inp or not os.path.exists(inp):
            continue  # a preset name, or missing (the loader says so)
        inp_real = os.path.realpath(inp)
        same = inp_real == real or (os.path.exists(path) and os.path.samefile(path, inp))
        if same or (os.path.isdir(inp_real) and real.startswith(inp_real + os.sep)):
            where = "is" if same else "is inside"
            raise InputError(f"{option} {shown} {where} the input {name} {truncate(inp, 200)}; "
                             f"writing it would destroy the input: give another path")
        if directory and inp_real.startswith(real + os.sep):
            raise InputError(f"{option} {shown} holds the input {name} {truncate(inp, 200)}; "
                             f"writing it would destroy the input: give another directory")
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.exists(parent):
        raise InputError(f"{option} {shown}: folder {truncate(parent, 200)} does not exist; "
                         f"create it first")
    if not os.path.isdir(parent):
        raise InputError(f"{option} {shown}: {truncate(parent, 200)} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {shown}: folder {truncate(parent, 200)} is not writable; "
                         f"choose another folder or fix its permissions")
    if os.path.lexists(path):
        st = os.stat(path) if os.path.exists(path) else None
        if directory:
            if st is not None and not os.path.isdir(path):
                raise InputError(f"{option} {shown} exists and is not a directory; give a new "
                                 f"directory name (or a path ending in .safetensors for one "
                                 f"file)")
        elif st is not None and os.path.isdir(path):
            raise InputError(f"{option} {shown} is an existing directory; give a file path")
        elif st is not None and not os.path.isfile(path):
            raise InputError(f"{option} {shown} exists and is not a regular file; give a file "
                             f"path")
    return Path(path)


def _split_backends(value: str, option: str = "--backends", *, unique: bool = True
                    ) -> list[str]:
    """The names of a comma-separated ``--backends`` list.

    Raises:
        InputError: the list is empty, has an empty entry (``"torch,,tf"``), or (``unique``) a
            duplicate.
    """
    items = [s.strip() for s in value.split(",")]
    if not any(items):
        raise InputError(f"{option} is empty ({truncate(value)}); name backends such as "
                         f"torch,tensorflow (omit {option} for every installed backend)")
    if not all(items):
        raise InputError(f"{option} {truncate(value)} has an empty entry; separate names by "
                         f"single commas, e.g. torch,tensorflow")
    if unique:
        dup = next((b for i, b in enumerate(items) if b in items[:i]), None)
        if dup is not None:
            raise InputError(f"{option} {truncate(value)} names {dup!r} twice; name each "
                             f"backend once")
    return items


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """xformer's own warnings as one line, ``xformer: warning: ...``; others as Python does."""
    if filename.startswith(str(Path(__file__).resolve().parent)):
        print(f"xformer: warning: {message}", file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def _console():
    """A rich Console as wide as the terminal, else ``$COLUMNS``, else 80 columns (rich's own
    rule; a pipe or a log never gets a wider table)."""
    from rich.console import Console

    return Console()


def _get_backend(name: str | None):
    """``(backend, note)`` for ``--backend`` (or the environment, a config file, the default):
    the note, ``"xformer: backend torch (from $XFORMER_BACKEND)"``, goes to stderr once the
    command has succeeded; an unknown or uninstalled backend's error names the source."""
    from .backend import get_backend, resolve_backend

    name, source = resolve_backend(name)
    try:
        be = get_backend(name)
    except BackendError as e:
        raise BackendError(f"{e} (backend {name!r} from {source})") from None
    return be, f"xformer: backend {be.name} (from {source})"


# ---------------------------------------------------------------------- commands
def cmd_init(args) -> int:
    from .spec import ModelSpec
    from .weights import init_weights, save_pretrained, save_weights

    from .resources import check_memory

    spec = ModelSpec.load(args.spec)
    out = Path(args.out)  # checked by _check_outputs before
    check_memory(spec, args.dtype, batch=1, seq_len=1, force=args.force)
    weights = init_weights(spec, seed=args.seed, dtype=args.dtype)
    if out.suffix == ".safetensors":
        save_weights(out, weights, spec)
        what = "(the spec in its metadata)"
    else:
        save_pretrained(out, spec, weights)
        what = "(spec.json + model.safetensors)"
    print(f"wrote {spec.num_parameters():,} parameters ({len(spec.parameters())} tensors, "
          f"{args.dtype}, seed {args.seed}) to {out} {what}; use it with --model {out}")
    return 0


def cmd_backends(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .backend import available_backends, get_backend, is_installed

    table = Table(title="xformer backends")
    for col in ("backend", "installed", "version", "modes (default first)"):
        table.add_column(col)
    for name in available_backends():
        if is_installed(name):
            be = get_backend(name)
            modes = ", ".join(be.default_modes) + "".join(
                f", ({m})" for m in be.modes if m not in be.default_modes)
            table.add_row(name, "yes", be.framework_version(), modes)
        else:
            table.add_row(name, f"no: pip install 'xformer[{name}]'", "", "")
    Console().print(table)
    return 0


def cmd_embed(args) -> int:
    """:func:`xformer.text.embed`, step by step, so that the weights are checked for NaN/inf
    and the memory estimated (``--force``) before the model is built."""
    from . import text
    from .backend import build
    from .convert import from_pretrained
    from .resources import check_memory
    from .weights import check_finite

    be, note = _get_backend(args.backend)
    spec, weights = from_pretrained(args.model)
    check_finite(weights, f"--model {Path(args.model).name}")
    inputs = text.encode(text.load_tokenizer(args.model), args.sentences, spec)
    check_memory(spec, args.dtype, batch=len(args.sentences),
                 seq_len=inputs["input_ids"].shape[1], force=args.force)
    model = build(spec, backend=be.name, dtype=args.dtype, weights=weights)
    out = be.forward(model, inputs)
    emb = text.mean_pool(out["last_hidden_state"], inputs["attention_mask"])
    if args.json:
        print(json.dumps(emb.tolist()))
        print(note, file=sys.stderr)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"embeddings ({emb.shape[1]} dims, L2-normalised)")
    table.add_column("sentence")
    table.add_column("first 6 dims")
    for s, v in zip(args.sentences, emb):
        table.add_row(s, " ".join(f"{x:+.4f}" for x in v[:6]) + " ...")
    Console().print(table)
    print(note, file=sys.stderr)
    return 0


def cmd_check(args) -> int:
    """``xformer check``: each IMPL against xformer's lowering and the numpy reference
    (:func:`xformer.checking.check`); one table per IMPL, the per-node table with ``nodes``;
    exit 0 when every IMPL conforms, 1 when one does not."""
    from rich.table import Table

    from .checking import check
    from .conformance import environment
    from .spec import ModelSpec, atomic_write_bytes
    from .weights import load_weights

    if len(args.maps) != len(args.impls):
        raise InputError(f"give one --map per IMPL, in order: {len(args.impls)} IMPL and "
                         f"{len(args.maps)} --map")
    spec = ModelSpec.load(args.spec)
    weights = None
    if args.weights:
        spec, weights = load_weights(args.weights, spec)
    console = _console()

    def show_native(impl: str, native: dict) -> None:
        table = Table(title=f"{impl}: the module's parameters", title_justify="left")
        for col in ("native name", "shape", "transposed by default"):
            table.add_column(col)
        for name, (shape, transposed) in native.items():
            table.add_row(name, str(tuple(shape)), "yes" if transposed else "")
        console.print(table)

    reports = check(list(args.impls), list(args.maps), spec, weights=weights, dtype=args.dtype,
                    seed=args.seed, on_native=show_native if args.show_map else None)
    for r in reports:
        table = Table(title=f"{r.impl} ({r.dtype})", title_justify="left")
        for col in ("compared", "against", "max rel", "tolerance", "ok"):
            table.add_column(col, justify="right" if col in ("max rel", "tolerance") else "left")
        for row in r.outputs:
            table.add_row("output", row["against"], f"{row['max_rel']:.1e}",
                          f"{row['tol']:.0e}", "yes" if row["ok"] else "[red]NO[/]")
        worst = max(r.grads, key=lambda g: g["max_rel"] if g["max_rel"] == g["max_rel"]
                    else math.inf, default=None)
        if worst is not None:
            table.add_row(f"{len(r.grads)} gradients (worst: {worst['name']})",
                          f"xformer {r.backend}", f"{worst['max_rel']:.1e}",
                          f"{worst['tol']:.0e}",
                          "yes" if all(g["ok"] for g in r.grads) else "[red]NO[/]")
        console.print(table)
        if r.nodes:
            nodes = Table(title="per node (forward, then backward)", title_justify="left")
            for col in ("node", "direction", "max rel", "ok"):
                nodes.add_column(col)
            for row in r.nodes:
                nodes.add_row(row["name"], row["direction"], f"{row['max_rel']:.1e}",
                              "yes" if row["ok"] else "[red]NO[/]")
            console.print(nodes)
        if args.show_map:
            used = Table(title="mapping used", title_justify="left")
            for col in ("canonical", "native", "transposed", "how"):
                used.add_column(col)
            for m in r.mapping:
                used.add_row(m["canonical"], m["native"], "yes" if m["transposed"] else "",
                             "automatic" if m["auto"] else "mapping file")
            console.print(used)
        verdict = ("[bold green]CONFORMS[/]" if r.conforms else "[bold red]DOES NOT CONFORM[/]")
        where = (f"; first divergence: {r.first_divergence}" if r.first_divergence else "")
        console.print(f"{verdict}: {r.impl}{where}")
    docs = [r.to_dict() for r in reports]
    doc = {"conforms": all(r.conforms for r in reports), "checks": docs,
           "environment": environment([], None)}
    if args.json:
        body = _json_safe(docs[0] if len(docs) == 1 else docs)
        atomic_write_bytes(Path(args.json), json.dumps(body, indent=2).encode())
    if args.html:
        from .report import write_check_html

        write_check_html(Path(args.html), doc)
    return 0 if doc["conforms"] else 1


def _json_safe(value):
    """``value`` with NaN / inf floats as ``None`` (JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def cmd_diff(args) -> int:
    from rich.table import Table

    from .conformance import Case, diff_traces, first_divergence, trace_run
    from .spec import ModelSpec, atomic_write_bytes
    from .weights import check_finite, load_weights, random_weights

    from .resources import check_memory

    names = _split_backends(args.backends, unique=False)  # the same twice is fine
    if len(names) != 2:
        raise InputError(f"--backends takes two backends A,B (the same twice is fine), got "
                         f"{args.backends!r}")
    spec_a = ModelSpec.load(args.spec)
    spec_b = ModelSpec.load(args.spec_b) if args.spec_b else spec_a
    for spec in {id(s): s for s in (spec_a, spec_b)}.values():
        check_memory(spec, args.dtype, backward=True, force=args.force)
    if args.weights:
        spec_a, w_a = load_weights(args.weights, spec_a)
        check_finite(w_a, f"--weights {Path(args.weights).name}")
    else:
        w_a = random_weights(spec_a, seed=args.seed)
    if args.weights_b:
        spec_b, w_b = load_weights(args.weights_b, spec_b)
        check_finite(w_b, f"--weights-b {Path(args.weights_b).name}")
    elif spec_b.parameter_shapes() == spec_a.parameter_shapes():
        w_b = w_a
    else:
        raise InputError("side B's spec has other parameters than side A's: give --weights-b")
    for field in ("architecture", "vocab_size", "d_model", "max_len", "type_vocab_size"):
        if getattr(spec_a, field) != getattr(spec_b, field):
            raise InputError(f"the two specs differ in {field!r}, so no input fits both; "
                             f"diff compares runs on the same inputs")
    case = Case.make(spec_a, seed=args.seed, dtype=args.dtype, weights=w_a)
    a = trace_run(spec_a, w_a, case, names[0])
    b = trace_run(spec_b, w_b, case, names[1])
    a.label, b.label = f"A:{a.label}", f"B:{b.label}"
    rows = diff_traces(a, b, args.dtype)
    first = first_divergence(rows)
    console = _console()
    table = Table(title=f"xformer diff: A = {names[0]} {Path(args.spec).name}, B = {names[1]} "
                        f"{Path(args.spec_b or args.spec).name}, {args.dtype}",
                  title_justify="left")
    for col in ("", "node", "kind", "max abs", "max rel", "tolerance", ""):
        table.add_column(col, justify="right" if col.startswith("max") else "left")
    for r in rows:
        mark = "[bold red]<- first divergence[/]" if r is first else (
            "" if r.ok else "[red]diverged[/]")
        rel = "n/a" if math.isnan(r.max_rel) else f"{r.max_rel:.1e}"
        absv = "n/a" if math.isnan(r.max_abs) else f"{r.max_abs:.1e}"
        style = "green" if r.ok else "red"
        table.add_row("fwd" if r.direction == "forward" else "bwd", r.name, r.kind,
                      absv, f"[{style}]{rel}[/]", f"{r.tol:.0e}", mark + (
                          f" ({r.note})" if r.note else ""))
    console.print(table)
    if first is None:
        console.print("[bold green]no divergence[/]: every node agrees within tolerance")
    else:
        console.print(f"[bold red]first divergence[/]: {first.name} ({first.kind}, "
                      f"{first.direction}): max rel {first.max_rel:.2e} > {first.tol:.0e}")
    if args.json:
        doc = {"backends": names, "dtype": args.dtype,
               "rows": [r.to_dict() for r in rows],
               "first_divergence": first.name if first else None}
        atomic_write_bytes(Path(args.json), json.dumps(doc, indent=2).encode())
    return 0 if first is None else 1


def cmd_show(args) -> int:
    from rich.panel import Panel
    from rich.syntax import Syntax
    from rich.table import Table

    from .show import TITLES, modules_file, node_classes, sources

    console = _console()
    if not args.node:
        console.print("node classes: " + ", ".join(node_classes("torch")))
        return 0
    found = sources(args.node)
    panels = [Panel(Syntax(src, "python", line_numbers=True, start_line=line, word_wrap=True,
                           theme="ansi_dark"),
                    title=f"{TITLES[be]}: {modules_file(be).parent.name}/modules.py:{line}")
              for be, (src, line) in found.items()]
    # side by side when each panel gets SHOW_COLUMN_WIDTH columns, else one under the other
    side_by_side = console.width >= SHOW_COLUMN_WIDTH * len(panels)
    grid = Table.grid(expand=True, padding=(0, 1))
    for _ in panels if side_by_side else panels[:1]:
        grid.add_column(ratio=1)
    if side_by_side:
        grid.add_row(*panels)
    else:
        for panel in panels:
            grid.add_row(panel)
    console.print(grid)
    return 0


#: The narrowest panel ``xformer show`` puts side by side with the others: line numbers and
#: 80 columns of code.
SHOW_COLUMN_WIDTH = 90


def cmd_generate(args) -> int:
    """Prompt ids (each in ``[0, vocab_size)``), finite weights and the memory of
    ``--num-beams`` beams are checked before the model is built."""
    import re

    import numpy as np

    from .backend import build
    from .convert import from_pretrained
    from .resources import check_memory
    from .weights import check_finite

    items = [x.strip() for x in args.prompt_ids.split(",")]
    if not any(items):
        raise InputError("--prompt-ids is empty; give token ids such as 0,5,7")
    if not all(re.fullmatch(r"[+-]?[0-9]+", x) for x in items):
        raise InputError(f"--prompt-ids must be comma-separated integers such as 0,5,7, got "
                         f"{truncate(args.prompt_ids)}")
    spec, weights = from_pretrained(args.model)
    # 100+ digits are out of any vocabulary; int() of them is not needed (nor, past 4300, legal)
    prompt = [int(x) if len(x) < 100 else spec.vocab_size for x in items]
    bad = next((k for k, i in enumerate(prompt) if not 0 <= i < spec.vocab_size), None)
    if bad is not None:
        shown = items[bad] if len(items[bad]) <= 40 else truncate(items[bad], 40)
        raise InputError(f"--prompt-ids: token id {shown} is outside "
                         f"[0, vocab_size={spec.vocab_size}) of the model")
    check_finite(weights, f"--model {Path(args.model).name}")
    seq_len = min(len(prompt) + max(args.max_new_tokens, 1), spec.max_len)
    check_memory(spec, args.dtype, batch=1, seq_len=seq_len, num_beams=max(args.num_beams, 1),
                 force=args.force)
    be, note = _get_backend(args.backend)
    model = build(spec, backend=be.name, dtype=args.dtype, weights=weights)
    ids = be.generate(model, np.asarray([prompt], np.int64), max_new_tokens=args.max_new_tokens,
                      num_beams=args.num_beams, length_penalty=args.length_penalty,
                      eos_token_id=args.eos_token_id)[0]
    if args.json:
        print(json.dumps(ids))
    else:
        search = "greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams"
        print(f"{be.name} ({search}, {args.dtype}): {ids}")
    print(note, file=sys.stderr)
    return 0


def _load_model(args):
    """``(spec, weights, inputs or None, model dir or None)`` from the compare arguments."""
    import numpy as np

    from .convert import from_pretrained
    from .spec import ModelSpec
    from .weights import check_finite, load_weights, random_weights

    if args.model:
        spec, weights = from_pretrained(args.model)
        check_finite(weights, f"--model {Path(args.model).name}")
        inputs = None
        if (Path(args.model) / "tokenizer.json").is_file():
            from .text import encode, load_tokenizer

            enc = encode(load_tokenizer(args.model), DEMO_SENTENCES, spec)
            # a third, fully padded row: the case that gives NaN with -inf masks
            inputs = {k: np.concatenate([v, np.zeros_like(v[:1])]) for k, v in enc.items()}
        path = Path(args.model).resolve()
        label = f"{path.parent.name}/{path.name}" if path.name == "model" else path.name
        return spec, weights, inputs, label
    if args.spec:
        spec = ModelSpec.load(args.spec)
        if args.weights:
            spec, weights = load_weights(args.weights, spec)
            check_finite(weights, f"--weights {Path(args.weights).name}")
        else:
            _check_compare_memory(args, spec)
            weights = random_weights(spec, seed=args.seed)
        return spec, weights, None, Path(args.spec).stem
    if args.weights:
        spec, weights = load_weights(args.weights)
        check_finite(weights, f"--weights {Path(args.weights).name}")
        return spec, weights, None, Path(args.weights).stem
    spec = ModelSpec.preset("tiny")
    _check_compare_memory(args, spec)
    return spec, random_weights(spec, seed=args.seed), None, "tiny (built-in, random weights)"


def _check_compare_memory(args, spec) -> None:
    """``compare`` holds a model, its gradients and activations (float64 when compared)."""
    from .resources import check_memory

    dtype = "float32" if args.dtype == "float32" else "float64"
    check_memory(spec, dtype, batch=args.batch, seq_len=min(args.seq_len or spec.max_len,
                                                            spec.max_len),
                 backward=True, force=args.force)


def _targets(args):
    """The targets of ``--backends`` (default: every installed backend, its default modes).

    Raises:
        InputError: ``--backends`` empty, with an empty entry, or naming a backend or target
            twice (``torch,torch/eager``); BackendError: an unknown or uninstalled backend.
    """
    from .conformance import Target, default_targets

    if args.backends is None:
        targets = default_targets(all_modes=args.all_modes)
        if not targets:
            raise InputError("no backend is installed: pip install 'xformer[all]'")
        return targets
    out = []
    for item in _split_backends(args.backends):
        if "/" in item:
            out.append(Target.parse(item))
        else:
            out += default_targets([item], all_modes=args.all_modes)
    labels = [t.label for t in out]
    dup = next((lab for i, lab in enumerate(labels) if lab in labels[:i]), None)
    if dup is not None:
        raise InputError(f"--backends {truncate(args.backends)} names the target {dup!r} twice; "
                         f"name each target once")
    if not out:
        raise InputError("--backends names no backend")
    return out


def _hf_unexpressible(spec) -> str | None:
    """Why the Hugging Face reference cannot run ``spec`` (``None``: it can):
    :func:`xformer.convert.huggingface_expressible` (BERT, GPT-2, the Llama family)."""
    from .convert import huggingface_expressible

    return huggingface_expressible(spec)


def _reference(args, spec, from_hf: bool) -> str | None:
    """The reference of ``compare``: ``--reference`` (refused with the reason when it cannot
    express ``spec``), or for ``auto`` Hugging Face for a checkpoint it expresses, else
    ``torch.nn`` where torch is installed and it expresses ``spec``, else Hugging Face where it
    expresses ``spec`` (the Llama family: outputs and gradients), else ``numpy`` (outputs
    only)."""
    from .backend import is_installed
    from .conformance import available_references, get_reference

    if args.reference == "none":
        return None
    refs = available_references()
    if args.reference != "auto":
        if args.reference not in refs:
            raise InputError(f"reference {args.reference!r} is not installed here "
                             f"(available: {', '.join(refs)})")
        why = (_hf_unexpressible(spec) if args.reference == "huggingface"
               else get_reference(args.reference).expressible(spec))
        if why:
            raise InputError(f"reference {args.reference} cannot express this spec: {why}")
        return args.reference
    if from_hf and "huggingface" in refs and _hf_unexpressible(spec) is None:
        return "huggingface"
    if is_installed("torch") and "torch.nn" in refs and (
            get_reference("torch.nn").expressible(spec) is None):
        return "torch.nn"
    if "huggingface" in refs and _hf_unexpressible(spec) is None:
        return "huggingface"
    return "numpy"


def cmd_compare(args) -> int:

    from .conformance import Case, environment, run_case
    from .convert import checkpoint_model_type
    from .spec import atomic_write_bytes

    if args.batch < 1 or (args.seq_len is not None and args.seq_len < 1) or args.repeats < 0:
        raise InputError("--batch and --seq-len must be >= 1 and --repeats >= 0")
    spec, weights, inputs, label = _load_model(args)
    if args.model or args.weights:  # --spec alone was checked before the weights were made
        _check_compare_memory(args, spec)
    targets = _targets(args)
    if args.train_steps is not None:
        return cmd_compare_training(args, spec, weights, label, targets)
    given = [_option(k) for k in ("data", *_TRAIN_OPTIONS, "betas", "no_decay_bias_norm",
                                  "nproc")
             if getattr(args, k, None) is not None]
    if given:
        raise InputError(f"{', '.join(given)} only apply with --train-steps N")
    reference = _reference(args, spec, from_hf=bool(args.model))
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    console = _console()
    reports = []
    for dtype in dtypes:
        case = Case.make(spec, seed=args.seed, dtype=dtype, batch=args.batch,
                         seq_len=args.seq_len, weights=weights,
                         input_ids=None if inputs is None else inputs["input_ids"],
                         attention_mask=None if inputs is None else inputs["attention_mask"],
                         name=f"{label} {dtype}",
                         # a Mistral checkpoint is compared against MistralForCausalLM
                         model_type=checkpoint_model_type(args.model) if args.model else None)
        if inputs is not None and "token_type_ids" in inputs:
            case.inputs["token_type_ids"] = inputs["token_type_ids"]
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
                "{task.completed}/{task.total}"), TimeElapsedColumn(), console=console,
                transient=True) as bar:
            task = bar.add_task(f"{label} ({dtype})", total=len(targets) + bool(reference))
            report = run_case(case, targets, reference=reference, repeats=args.repeats,
                              progress=lambda lab: bar.update(
                                  task, advance=1, description=f"{label} ({dtype}): {lab} done"))
        reports.append(report)
        console.print(render_report(report))
    ok = all(r.ok for r in reports)
    doc = {"ok": ok, "model": label, "environment": environment(targets, reference),
           "reports": [r.to_dict() for r in reports]}
    if args.html:
        from .report import write_html

        doc["nodes"] = _node_errors(reports, console)
        write_html(Path(args.html), doc)
        console.print(f"wrote {args.html}")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(doc, indent=2).encode())
    n = len(targets)
    if ok:
        console.print(f"[bold green]CONFORMANT[/]: {n} backend/mode targets agree on {label} "
                      f"({', '.join(dtypes)}), outputs and every gradient within tolerance.")
    else:
        bad = sum(len(r.failures) for r in reports)
        console.print(f"[bold red]NOT CONFORMANT[/]: {bad} tensor comparisons out of "
                      f"tolerance (listed above).")
    return 0 if ok else 1


# ---------------------------------------------------------------------- training
#: ``TrainConfig`` fields set by the training options (``None``: TrainConfig's default).
_TRAIN_OPTIONS = ("optimizer", "lr", "eps", "momentum", "nesterov", "weight_decay",
                  "clip_grad_norm", "schedule", "warmup_steps", "batch_size", "grad_accum")


def _train_config(args, steps: int, **fixed):
    """The :class:`~xformer.training.TrainConfig` of the training options (every value checked
    there: a negative learning rate, an unknown optimizer, ... raise InputError)."""
    from .training import TrainConfig

    if steps is None or steps < 1:
        raise InputError(f"--steps must be >= 1, got {steps}")
    opts = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k, None) is not None}
    if getattr(args, "no_decay_bias_norm", None):
        opts["no_decay_bias_and_norm"] = True
    if args.betas is not None:
        parts = [x.strip() for x in args.betas.split(",")]
        try:
            if len(parts) != 2:
                raise ValueError
            opts["betas"] = (float(parts[0]), float(parts[1]))
        except ValueError:
            raise InputError(f"--betas must be two numbers B1,B2 such as 0.9,0.999, got "
                             f"{truncate(args.betas)}") from None
    for name in ("lr", "eps", "momentum", "weight_decay", "clip_grad_norm"):
        value = opts.get(name)
        if value is not None and not math.isfinite(value):
            raise InputError(f"{_option(name)} must be a finite number, got {value}")
    try:
        config = TrainConfig(**opts, **fixed)
        config.lr_at(0, steps)  # warmup_steps within the run
    except InputError as e:  # name the flag, not the TrainConfig field
        import re

        message = re.sub(r"^(betas\[[01]\]|[a-z_]+)(?= must)",
                         lambda m: _TRAIN_FLAGS.get(m.group(1), m.group(1)), str(e))
        raise InputError(message) from None
    return config


#: TrainConfig fields as the flags that set them, for error messages.
_TRAIN_FLAGS = {"lr": "--lr", "eps": "--eps", "momentum": "--momentum",
                "weight_decay": "--weight-decay", "clip_grad_norm": "--clip-grad-norm",
                "batch_size": "--batch-size", "grad_accum": "--grad-accum",
                "warmup_steps": "--warmup-steps", "betas[0]": "--betas B1",
                "betas[1]": "--betas B2", "seed": "--seed"}


def _train_data(args, spec, config, steps: int):
    """``--data`` loaded and checked, or (compare without it) seeded random token rows."""
    from .conformance.training import random_token_rows
    from .training import check_data, load_data

    if args.data is None:
        rows = config.batch_size * config.grad_accum * min(steps, 4)
        data = random_token_rows(spec, rows, args.seq_len or 16, args.seed)
    else:
        data = load_data(args.data)
    check_data(spec, data)
    return data


def _data_length(data) -> int:
    """The longest row of training data (for the memory check)."""
    if isinstance(data, dict):
        return max(a.shape[1] for a in data.values())
    return data.shape[1]


def cmd_train(args) -> int:
    """Everything (spec, weights, data, optimizer options, memory, the backend) is checked before
    the first step; the checkpoint is written once, atomically, after the last step, so an
    interrupted run leaves nothing behind."""
    import numpy as np

    from .backend import build
    from .convert import from_pretrained
    from .resources import check_memory
    from .spec import ModelSpec
    from .training import objective, train
    from .weights import check_finite, init_weights, load_weights, save_pretrained

    if args.model:
        spec, weights = from_pretrained(args.model)
        source = f"--model {Path(args.model).name}"
    else:
        spec = ModelSpec.load(args.spec)
        weights = None
        source = f"--spec {args.spec}"
        if args.weights:
            spec, weights = load_weights(args.weights, spec)
            source = f"--weights {Path(args.weights).name}"
    objective(spec)
    if args.data is None:
        raise InputError("train needs --data: a .npy array of token rows (N, T) (an "
                         "encoder-decoder: a .npz with source and target)")
    config = _train_config(args, args.steps, dropout=args.dropout, seed=args.seed)
    data = _train_data(args, spec, config, args.steps)
    check_memory(spec, args.dtype, batch=config.batch_size, seq_len=_data_length(data),
                 backward=True, force=args.force)
    if weights is None:
        weights = init_weights(spec, seed=args.seed, dtype=args.dtype)
    else:
        check_finite(weights, source)
    from . import distributed

    if args.nproc is not None:
        distributed.check_nproc(args.nproc, config.batch_size)
    if args.port is not None and args.nproc is None:
        raise InputError("--port only applies with --nproc N")
    be, note = _get_backend(args.backend)
    mode = be.check_mode(args.mode)
    worker = distributed.requested(be.name)
    if args.nproc is not None and args.nproc > 1 and not worker:
        if be.name not in distributed.ENGINES:
            raise InputError(f"backend {be.name!r} has no data-parallel engine; use torch, "
                             f"tensorflow or mxnet")
        port = distributed.check_port(args.port) if args.port is not None else None
        code = distributed.launch(be.name, args.argv, args.nproc, port)
        if code:
            _error(f"{distributed.launch.failure[1]}; the run stopped, every worker with it, "
                   f"and nothing was written to {args.out}")
        return code
    world = be.init_distributed() if worker else None
    if world is not None and args.nproc is not None and args.nproc != world.size:
        raise InputError(f"--nproc {args.nproc} but the launcher started {world.size} workers; "
                         f"give the same number or leave --nproc out")
    if world is not None:
        distributed.check_nproc(world.size, config.batch_size)
    model = build(spec, backend=be.name, dtype=args.dtype, weights=weights)
    console = _console()
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=_console_err(), transient=True) as bar:
        task = bar.add_task(f"training on {be.name}/{mode}", total=args.steps)
        ticks = [time.perf_counter()]
        logs = train(be, model, data, config, args.steps, mode=mode, callback=lambda log: (
            ticks.append(time.perf_counter()),
            bar.update(task, advance=1, description=f"step {log.step}: loss {log.loss:.4f}")))
    final = be.get_weights(model)
    bad = [n for n, w in final.items() if not np.isfinite(w).all()]
    if bad:
        raise InputError(f"training diverged: {len(bad)} tensors hold NaN/inf after "
                         f"{args.steps} steps (e.g. {bad[0]}); lower --lr or clip with "
                         f"--clip-grad-norm; nothing was written")
    be.finish_distributed()  # every worker has finished its last step
    if world is not None and world.rank != 0:
        return 0  # rank 0 writes the checkpoint and the report
    save_pretrained(Path(args.out), spec, final)
    if args.json:
        print(json.dumps({"backend": be.name, "mode": mode, "dtype": args.dtype,
                          "engine": world.engine if world else None,
                          "world_size": world.size if world else 1,
                          "config": config.to_dict(), "out": str(args.out),
                          "steps": [{**log.__dict__, "seconds": round(b - a, 6)}
                                    for log, a, b in zip(logs, ticks, ticks[1:])]}))
    else:
        console.print(f"trained {args.steps} steps on {be.name}/{mode} ({args.dtype}, "
                      f"{config.optimizer}): loss {logs[0].loss:.6g} -> {logs[-1].loss:.6g}; "
                      f"wrote {args.out} (spec.json + model.safetensors); use it with --model "
                      f"{args.out}")
    print(note, file=sys.stderr)
    return 0


def _console_err():
    """A rich Console on stderr (progress bars: stdout stays the command's output)."""
    from rich.console import Console

    return Console(stderr=True)


def _compare_distributed(args, spec, weights, data, config, targets, dtype, report, console):
    """``compare --train-steps N --nproc W``: every target trained by ``xformer train --nproc
    W`` against its single-process run in ``report`` and against the first target's
    ``W``-worker run (:func:`xformer.conformance.distributed.run_distributed`); one table."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from .conformance.distributed import run_distributed
    from .distributed import SHORT_ENGINES

    with Progress(TextColumn("{task.description}"), BarColumn(),
                  TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task(f"{dtype}: {args.nproc} workers per target", total=len(targets))
        dist = run_distributed(spec, weights, data, config, args.train_steps, targets, dtype,
                               args.nproc, report.final,
                               progress=lambda label: bar.update(task, advance=1))
    table = Table(title=f"{dtype}: {args.nproc} workers against one process, "
                        f"{args.train_steps} steps", title_justify="left")
    for col in ("target", "engine", "loss err", "param err vs 1 process",
                f"param err vs {dist.rows[0].target}", "s"):
        table.add_column(col, justify="right" if "err" in col or col == "s" else "left")
    for r in dist.rows:
        mark = "" if r.ok else " [red]✗[/]"
        engine = SHORT_ENGINES[r.target.partition("/")[0]]
        table.add_row(f"{r.target}{mark}", engine, f"{r.loss_error:.1e}",
                      f"{r.param_error:.1e}", f"{r.cross_error:.1e}", f"{r.seconds:.1f}")
    console.print(table)
    return dist


def cmd_compare_training(args, spec, weights, label, targets) -> int:
    """``compare --train-steps N``: :func:`xformer.conformance.training.run_training` per
    dtype, one table per dtype (per step: the loss, the worst relative error of the loss, the
    parameters and the optimizer state between targets), exit 0 / 1."""
    from rich.table import Table

    from .conformance import environment
    from .conformance.training import run_training
    from .spec import atomic_write_bytes
    from .training import objective

    objective(spec)
    config = _train_config(args, args.train_steps, seed=args.seed)
    data = _train_data(args, spec, config, args.train_steps)
    if args.nproc is not None:
        from .distributed import ENGINES, check_nproc

        check_nproc(args.nproc, config.batch_size)
        no_engine = [t.label for t in targets if t.backend not in ENGINES]
        if no_engine:
            raise InputError(f"--nproc: {', '.join(no_engine)} has no data-parallel engine")
        if spec.dropout and config.dropout != "stream":
            import dataclasses

            config = dataclasses.replace(config, dropout="stream")
    dtypes = ("float64", "float32") if args.dtype == "both" else (args.dtype,)
    console = _console()
    reports, dist_reports = [], []
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    for dtype in dtypes:
        with Progress(TextColumn("{task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(),
                      console=console, transient=True) as bar:
            task = bar.add_task(f"{label} ({dtype}): training", total=args.train_steps)
            report = run_training(spec, weights, data, config, args.train_steps, targets,
                                  dtype, name=f"{label} {dtype}",
                                  progress=lambda step: bar.update(task, advance=1))
        reports.append(report)
        tol_loss, tol_param = report.tolerance
        table = Table(title=f"{label}, {dtype}: {args.train_steps} {config.optimizer} steps, "
                            f"baseline {report.targets[0]}", title_justify="left")
        for col in ("step", "lr", "loss", "loss err", "param err", "state err"):
            table.add_column(col, justify="right")
        for r in report.rows:
            mark = "" if r.ok else " [red]✗[/]"
            table.add_row(f"{r.step}{mark}", f"{r.lr:.3g}", f"{r.losses[report.targets[0]]:.6g}",
                          f"{r.loss_error:.1e}", f"{r.param_error:.1e}", f"{r.state_error:.1e}")
        console.print(table)
        worst = max(report.rows, key=lambda r: max(r.param_error, r.state_error)
                    if r.ok else math.inf)
        if worst.worst:
            console.print(f"largest error: {worst.worst} on {worst.worst_target} at step "
                          f"{worst.step}")
        console.print(f"tolerance: loss {tol_loss:.0e}, parameters and state {tol_param:.0e} "
                      f"(relative, vs {report.targets[0]})")
        if args.nproc is not None:
            dist_reports.append(_compare_distributed(args, spec, weights, data, config, targets,
                                                     dtype, report, console))
    ok = all(r.ok for r in reports) and all(r.ok for r in dist_reports)
    doc = {"ok": ok, "model": label, "environment": environment(targets, None),
           "training": [r.to_dict() for r in reports]}
    if dist_reports:
        doc["distributed"] = [r.to_dict() for r in dist_reports]
    if args.html:
        from .report import write_training_html

        write_training_html(Path(args.html), doc)
        console.print(f"wrote {args.html}")
    if args.json:
        atomic_write_bytes(Path(args.json), json.dumps(doc, indent=2).encode())
    if ok:
        console.print(f"[bold green]CONFORMANT[/]: {len(targets)} backend/mode targets train "
                      f"alike on {label} ({', '.join(dtypes)}): loss, parameters and optimizer "
                      f"state within tolerance at every step.")
        return 0
    for r in dist_reports:
        for row in r.rows:
            if not row.ok:
                console.print(f"[bold red]NOT CONFORMANT[/] ({r.dtype}, {r.nproc} workers): "
                              f"{row.target}: loss {row.loss_error:.1e}, parameters "
                              f"{row.param_error:.1e} ({row.param_worst}) vs one process, "
                              f"{row.cross_error:.1e} vs {r.rows[0].target}")
    for r in reports:
        first = r.first_divergence
        if first is not None:
            console.print(f"[bold red]NOT CONFORMANT[/] ({r.dtype}): first diverged at step "
                          f"{first.step}: {first.worst} on {first.worst_target} (parameters "
                          f"{first.param_error:.1e}, state {first.state_error:.1e}, loss "
                          f"{first.loss_error:.1e})")
    return 1


def _node_errors(reports, console) -> list[dict]:
    """Per-node errors between every pair of backends (traced eagerly, one run per backend),
    for the HTML report's plots."""
    import itertools

    from .conformance import diff_traces, trace_run

    out = []
    for report in reports:
        case = report.case
        backends = list(dict.fromkeys(r.label.split("/")[0] for r in report.runs))
        with console.status(f"tracing nodes ({case.dtype})"):
            traces = [trace_run(case.spec, case.weights, case, b) for b in backends]
        for a, b in itertools.combinations(traces, 2):
            rows = diff_traces(a, b, case.dtype)
            out.append({"dtype": case.dtype, "pair": f"{a.label} vs {b.label}",
                        "rows": [r.to_dict() for r in rows]})
    return out


# ---------------------------------------------------------------------- rendering
def _fmt(d) -> str:
    if d is None:
        return "n/a"
    if math.isnan(d.max_rel):
        return f"[red]NaN/shape ({d.tensor})[/]"
    color = "green" if d.ok else "red"
    return f"[{color}]{d.max_rel:.1e}[/]"


def render_report(report):
    """A rich ``Table``, one row per target (+ the reference): max relative error of the outputs
    and of the gradients against the reference, the worst against the other targets, the time
    of a forward and of a forward+backward pass, and the verdict. Rows, not columns, per
    target, so that the table fits an 80-column terminal with every target of ``--all-modes``.
    """
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from .conformance import TOLERANCES

    tol = TOLERANCES[report.case.dtype]
    ref = report.reference
    ref_label = ref.label if ref else None
    title = (f"{report.case.name}: max relative error"
             + (f" vs the {ref_label} reference and" if ref else "") + " between targets "
             f"(tolerance: outputs {tol.output:.0e}, gradients {tol.grad:.0e})")
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  collapse_padding=True)
    table.add_column("target", style="bold", no_wrap=True)
    if ref is not None:
        table.add_column("outputs\nvs ref.", justify="right")
        table.add_column("gradients\nvs ref.", justify="right")
    table.add_column("vs other\ntargets", justify="right")
    table.add_column("forward\n(ms)", justify="right")
    table.add_column("fwd+bwd\n(ms)", justify="right")
    table.add_column("verdict")
    for run in report.runs:
        lab = run.label
        cells = []
        if ref is not None:
            cells += [_fmt(report.worst(lab, ref_label, "output")),
                      _fmt(report.worst(lab, ref_label, "grad"))]
        pair = [d for d in report.diffs if lab in (d.a, d.b) and ref_label not in (d.a, d.b)]
        cells.append(_fmt(max(pair, key=lambda d: math.inf if math.isnan(d.max_rel)
                              else d.max_rel / d.tol)) if pair else "n/a")
        bad = [d for d in report.diffs if lab in (d.a, d.b) and not d.ok]
        verdict = "[green]conforms[/]" if not bad else f"[red]{len(bad)} mismatches[/]"
        table.add_row(lab, *cells, _ms(run.forward_s), _ms(run.step_s), verdict)
    if ref is not None:
        table.add_row(f"{ref.label} (ref.)", "", "", "", _ms(ref.forward_s), _ms(ref.step_s),
                      "", style="dim")
    parts = [table]
    worst = report.worst()
    if worst is not None:
        parts.append(Text(f"worst of {len(report.diffs)} comparisons: {worst.message()}"))
    for d in report.failures[:12]:
        parts.append(Text(d.message(), style="red"))
    if len(report.failures) > 12:
        parts.append(Text(f"... and {len(report.failures) - 12} more", style="red"))
    return Group(*parts)


def _ms(seconds: float) -> str:
    return "" if seconds is None or math.isnan(seconds) else f"{seconds * 1e3:.1f}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
