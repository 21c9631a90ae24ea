"""Independent references: implementations that are not one of the backends, run on the same
case (weights, inputs, cotangents) for every target to be compared against.

A reference is a :class:`Reference` record: its name, the packages it needs, which specs it can
express (:attr:`Reference.expressible`, plain Python) and how to run a case. The registry maps
names to ``"module:attribute"`` of such records, as the backend registry does, so that listing
references and asking what they express imports no framework; only :meth:`Reference.run` does.
The built-in ones:

* ``"numpy"``: :mod:`xformer.reference` (float64 numpy), forward only; every spec.
* ``"torch.nn"``: PyTorch's own layers (``nn.TransformerEncoderLayer`` stacks,
  ``nn.Transformer``), outputs and gradients; every spec those layers can build (not the Llama
  family's RMSNorm, RoPE, gated FFN, grouped-query attention, parallel residual, SiLU)
  (``xformer_torch.references``).
* ``"huggingface"``: ``transformers.BertModel`` (BERT-shaped encoders), ``GPT2LMHeadModel`` /
  ``GPT2Model`` (GPT-2-shaped decoders) or the Llama family's ``*ForCausalLM`` (Llama, Mistral,
  Qwen2, Gemma, GPT-NeoX; the checkpoint's own class when ``Case.model_type`` names it),
  outputs and gradients (``xformer_torch.references``).

A package adds one with an entry point in the group ``xformer.references``
(``name = "module:attribute"``).
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from importlib import metadata
from typing import Callable

from ..errors import BackendError
from ..spec import ModelSpec
from .case import Case, RunResult

ENTRY_POINT_GROUP = "xformer.references"


@dataclass(frozen=True)
class Reference:
    """An independent implementation that conformance compares every target against.

    Attributes:
        name: registry name, also the label of its :class:`RunResult`.
        summary: one line: what it is.
        expressible: ``spec -> None`` if this reference can run ``spec``, else the reason
            (never imports a framework).
        runner: ``(case, repeats) -> RunResult``; ``repeats > 0`` also times each call (median
            after one warm-up call). It may import its framework.
        requires: distributions it needs (``("torch", "transformers")``); it is available when
            each is importable.
    """

    name: str
    summary: str
    expressible: Callable[[ModelSpec], str | None]
    runner: Callable[[Case, int], RunResult]
    requires: tuple[str, ...] = ()

    def available(self) -> bool:
        """Whether every package in :attr:`requires` can be imported (none is imported)."""
        try:
            return all(importlib.util.find_spec(m) is not None for m in self.requires)
        except (ImportError, ValueError):
            return False

    def run(self, case: Case, repeats: int = 0) -> RunResult:
        """Run ``case``.

        Raises:
            BackendError: the reference cannot express ``case.spec`` (says why) or is not
                installed (names what to install).
        """
        why = self.expressible(case.spec)
        if why:
            raise BackendError(f"the {self.name} reference cannot express this spec: {why}")
        if not self.available():
            raise BackendError(f"the {self.name} reference needs {', '.join(self.requires)}: "
                               f"pip install 'xformer[test]'")
        return self.runner(case, repeats)


def _run_numpy(case: Case, repeats: int = 0) -> RunResult:
    from .. import reference

    return RunResult("numpy", reference.forward(case.spec, case.weights, case.inputs,
                                                case.dtype), {})


NUMPY = Reference("numpy", "xformer.reference: float64 numpy, forward only",
                  expressible=lambda spec: None, runner=_run_numpy)

_BUILTIN = {
    "numpy": "xformer.conformance.references:NUMPY",
    "torch.nn": "xformer_torch.references:TORCH_NN",
    "huggingface": "xformer_torch.references:HUGGINGFACE",
}


def _registry() -> dict[str, str]:
    found = {ep.name: ep.value for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    return {**_BUILTIN, **found}


def get_reference(name: str) -> Reference:
    """The :class:`Reference` registered as ``name`` (its module is imported; no framework).

    Raises:
        BackendError: unknown name (lists the known ones) or its package is not installed.
    """
    entries = _registry()
    if name not in entries:
        raise BackendError(f"unknown reference {name!r}; references: {', '.join(entries)}")
    module, _, attr = entries[name].partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:
        raise BackendError(f"reference {name!r} could not be imported ({e})") from None


def available_references() -> list[str]:
    """Names of the references whose packages are installed (imports no framework)."""
    out = []
    for name in _registry():
        try:
            if get_reference(name).available():
                out.append(name)
        except BackendError:
            pass
    return out


def run_reference(case: Case, name: str, repeats: int = 0) -> RunResult:
    """Run the reference ``name`` on ``case`` (:meth:`Reference.run`)."""
    return get_reference(name).run(case, repeats)
