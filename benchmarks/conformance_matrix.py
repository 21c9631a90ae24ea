"""Measure the conformance matrix and print the worst errors per dtype (the figures of
docs/conformance.md): the specs of conformance/test_matrix.py and test_family.py on every
default target. ``benchmarks/figures.py`` writes these figures into the docs.

    python benchmarks/conformance_matrix.py [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import zlib
from pathlib import Path


def measure(specs) -> tuple[dict, int, int]:
    """``({(architecture, dtype, kind): worst Diff}, comparisons, targets)`` over ``specs``
    (``[(label, spec)]``) on every default target, against the numpy reference."""
    from rich.progress import track

    from xformer.conformance import Case, default_targets, run_case

    targets = default_targets()
    worst: dict[tuple[str, str, str], object] = {}
    n_cmp = 0
    jobs = [(label, spec, dtype) for label, spec in specs for dtype in ("float64", "float32")]
    for label, spec, dtype in track(jobs, description="conformance matrix"):
        case = Case.make(spec, seed=zlib.crc32(label.encode()) % 1000, dtype=dtype, batch=3)
        report = run_case(case, targets, reference="numpy")
        n_cmp += len(report.diffs)
        for d in report.diffs:
            ref = "numpy" in (d.a, d.b)
            kind = ("outputs vs numpy" if ref else "outputs, pairs") if d.tensor.startswith(
                "output") else "gradients, pairs"
            key = (spec.architecture, dtype, kind)
            if key not in worst or d.max_rel > worst[key].max_rel:
                worst[key] = d
    return worst, n_cmp, len(targets)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "conformance"))
    from rich.console import Console
    from rich.table import Table
    from test_family import SPECS as FAMILY
    from test_matrix import SPECS as ENCODERS

    from xformer.conformance import TOLERANCES

    specs = ENCODERS + FAMILY
    worst, n_cmp, n_targets = measure(specs)
    table = Table(title=f"worst max relative error over {len(specs)} specs x "
                        f"{n_targets} targets ({n_cmp} comparisons)")
    for col in ("architecture", "dtype", "what", "worst", "bound", "where"):
        table.add_column(col)
    out = {}
    for (arch, dtype, kind), d in sorted(worst.items()):
        tol = TOLERANCES[dtype]
        bound = tol.grad if kind.startswith("grad") else tol.output
        table.add_row(arch, dtype, kind, f"{d.max_rel:.1e}", f"{bound:.0e}",
                      f"{d.tensor} ({d.a} vs {d.b})")
        out[f"{arch} {dtype} {kind}"] = {"max_rel": d.max_rel, "tensor": d.tensor, "a": d.a,
                                         "b": d.b}
    Console().print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
