"""The conformance engine: run one :class:`Case` on several (backend, mode) targets and on an
independent reference, and compare outputs and gradients tensor by tensor.

One concern per module (every public name is importable from here):

* :mod:`~xformer.conformance.case`: :class:`Case`, :class:`RunResult`, :data:`TOLERANCES`;
* :mod:`~xformer.conformance.compare`: :class:`Diff`, :func:`diff_tensors`, :func:`compare_runs`;
* :mod:`~xformer.conformance.references`: :class:`Reference`, :func:`available_references`,
  :func:`run_reference` (the framework-specific references live with their backend);
* :mod:`~xformer.conformance.run`: :class:`Target`, :func:`run_target`, :func:`run_case`,
  :class:`Report`;
* :mod:`~xformer.conformance.coverage`: :func:`covering_specs`, :func:`field_values`;
* :mod:`~xformer.conformance.generation`: :func:`run_generation`, :func:`greedy_margins`;
* :mod:`~xformer.conformance.trace`: divergence localisation (:func:`trace_run`,
  :func:`diff_traces`, :func:`first_divergence`);
* :mod:`~xformer.conformance.environment`: :func:`environment`, recorded by the run.

No module here imports a framework; a backend or a reference imports its own when it runs.
"""

from .case import TOLERANCES, Case, RunResult, Tolerance
from .compare import ZERO_GRADIENTS, Diff, compare_runs, diff_tensors, zero_gradient_scale
from .coverage import (DECODER_FIELD_VALUES, ENCODER_DECODER_FIELD_VALUES, FIELD_VALUES,
                       SWITCHES, VARIANTS, covering_specs, field_values)
from .environment import environment
from .generation import greedy_margins, run_generation
from .references import Reference, available_references, get_reference, run_reference
from .run import Report, Target, default_targets, run_case, run_target
from .trace import NodeDiff, NodeTrace, diff_traces, first_divergence, trace_run

__all__ = [
    "Case", "DECODER_FIELD_VALUES", "Diff", "ENCODER_DECODER_FIELD_VALUES", "FIELD_VALUES",
    "NodeDiff", "NodeTrace", "Reference", "Report", "RunResult", "SWITCHES", "TOLERANCES",
    "VARIANTS", "Target", "Tolerance", "ZERO_GRADIENTS", "available_references", "compare_runs",
    "covering_specs", "default_targets", "diff_tensors", "diff_traces", "environment",
    "field_values", "first_divergence", "get_reference", "greedy_margins", "run_case",
    "run_generation", "run_reference", "run_target", "trace_run", "zero_gradient_scale",
]
