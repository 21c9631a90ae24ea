"""A self-contained HTML report of a conformance run (``xformer compare --html``).

The input is the JSON document ``xformer compare --json`` writes::

    {"ok": bool, "model": str, "environment": {name: value},   # recorded by the run
     "reports": [Report.to_dict(), ...],              # one per dtype
     "nodes": [{"dtype": str, "pair": "A vs B",        # optional: divergence localisation
                "tolerance": {"output": .., "grad": ..},   # optional, default: the report's
                "rows": [{"name", "kind", "direction": "forward" | "backward",
                          "max_abs", "max_rel"}, ...]}, ...]}

The page is one file with no external asset (CSS inline, plots embedded as base64 PNG), so it
can be mailed, attached to a CI run or opened offline. It shows a verdict banner, the verdict
table of each dtype (the rows of the ``compare`` table), the per-node error plots (when
``"nodes"`` is present), timing bars, the spec and the environment (exactly what the document
holds: :func:`xformer.conformance.environment` records it when the run happens; nothing is read
from the process that renders the page).

matplotlib is imported lazily and only for the plots (Agg canvas, no pyplot state); without it
the page is written without plots and says so.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

#: Banner colours (also what the browser test looks for).
PASS_COLOR = "#1a7f37"
FAIL_COLOR = "#cf222e"
#: Line colours of the per-node plots, one per backend pair (saturated, never grey).
PAIR_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#e377c2",
               "#8c564b", "#bcbd22", "#0b3d91")
PAIR_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "*")
#: Bar colours of the timing plot: forward, forward+backward.
TIMING_COLORS = ("#9ecae1", "#3182bd")


# ---------------------------------------------------------------------- public API
def render_html(doc: Mapping[str, Any]) -> str:
    """The report page for ``doc`` (see the module docstring) as one HTML string."""
    reports = list(doc.get("reports") or [])
    model = str(doc.get("model") or "model")
    ok = bool(doc.get("ok", all(r.get("ok", False) for r in reports)))
    nodes = list(doc.get("nodes") or [])

    sections: list[tuple[str, str, str]] = []  # (id, title, body html)
    sections.append(("verdict", "Verdict", "".join(_verdict_section(r) for r in reports)
                     or "<p>No report in this document.</p>"))
    if nodes:
        sections.append(("nodes", "Per-node errors", _nodes_section(nodes, reports)))
    sections.append(("timing", "Timing", _timing_section(reports)))
    if reports:
        sections.append(("spec", "Spec", _spec_section(reports[0].get("spec") or {})))
    sections.append(("environment", "Environment",
                     _environment_section(doc.get("environment") or {})))

    title = f"xformer conformance report: {model}"
    toc = " · ".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "\n".join(f'<section id="{sid}"><h2>{_e(name)}</h2>\n{content}</section>'
                     for sid, name, content in sections)
    written = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    try:
        from . import __version__ as version
    except ImportError:  # pragma: no cover
        version = "?"
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{_e(title)}</h1>\n{_banner(ok, model, reports)}\n"
            f"<nav>{toc}</nav>\n{body}\n"
            f"<footer>Written by xformer {_e(version)} on {_e(written)}.</footer>\n"
            f"</main>\n</body>\n</html>\n")


def write_html(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """Render ``doc`` and write it to ``path`` atomically (temporary file + ``os.replace``):
    a reader never sees a half-written page, and a failure leaves no file behind."""
    from .spec import atomic_write_bytes

    text = render_html(doc)  # rendered first: an error here writes nothing at all
    atomic_write_bytes(Path(path), text.encode("utf-8"))


# ---------------------------------------------------------------------- helpers
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _n(k: int, noun: str) -> str:
    plural = noun + ("es" if noun.endswith(("s", "sh", "ch", "x")) else "s")
    return f"{k} {noun if k == 1 else plural}"


def _nan(x: Any) -> float:
    """A JSON number (``None`` stands for NaN)."""
    return math.nan if x is None else float(x)


def _badness(d: Mapping[str, Any]) -> float:
    rel = _nan(d.get("max_rel"))
    return math.inf if math.isnan(rel) else rel / float(d.get("tol") or 1.0)


def _worst(diffs: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    diffs = list(diffs)
    return max(diffs, key=_badness) if diffs else None


def _cell(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return '<td class="na">n/a</td>'
    rel = _nan(d.get("max_rel"))
    if math.isnan(rel):
        return f'<td class="bad">NaN/shape ({_e(d.get("tensor", ""))})</td>'
    cls = "ok" if d.get("ok", rel <= d.get("tol", math.inf)) else "bad"
    return (f'<td class="{cls}" title="{_e(d.get("tensor", ""))}: {_e(d.get("a"))} vs '
            f'{_e(d.get("b"))}, max abs {_nan(d.get("max_abs")):.3e}">{rel:.1e}</td>')


def _ms(x: Any) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{float(x):.1f}"


def _fmt_tol(x: Any) -> str:
    return f"{float(x):.0e}" if x is not None else "?"


def _dtype_tolerance(dtype: str, reports: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    for r in reports:
        if r.get("dtype") == dtype and r.get("tolerance"):
            return dict(r["tolerance"])
    from .conformance import TOLERANCES  # imports no framework

    tol = TOLERANCES.get(dtype)
    return {"output": tol.output, "grad": tol.grad} if tol else {"output": math.nan,
                                                                "grad": math.nan}


# ---------------------------------------------------------------------- banner + verdict
def _banner(ok: bool, model: str, reports: Sequence[Mapping[str, Any]]) -> str:
    labels = list(dict.fromkeys(run["label"] for r in reports for run in r.get("runs", [])))
    dtypes = ", ".join(str(r.get("dtype")) for r in reports)
    if ok:
        text = (f"<strong>CONFORMANT</strong>: {len(labels)} backend/mode targets agree on "
                f"{_e(model)} ({_e(dtypes)}), outputs and every gradient within tolerance.")
    else:
        bad = sum(1 for r in reports for d in r.get("diffs", []) if not d.get("ok"))
        text = (f"<strong>NOT CONFORMANT</strong>: {_n(bad, 'tensor comparison')} out of "
                f"tolerance on {_e(model)} ({_e(dtypes)}); listed under each table below.")
    cls = "pass" if ok else "fail"
    return f'<div class="banner {cls}" role="status">{text}</div>'


def verdict_rows(report: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """``(column headers, [(row name, [cell html per column])])``: the rows of the
    ``xformer compare`` table, computed from a :meth:`Report.to_dict` dict."""
    runs = list(report.get("runs", []))
    labels = [r["label"] for r in runs]
    ref = report.get("reference")
    diffs = list(report.get("diffs", []))
    ref_run = report.get("reference_run") or {}  # optional: the reference's timings
    headers = labels + ([f"{ref} (reference)"] if ref else [])
    blank = ['<td class="ref"></td>'] if ref else []

    def involving(lab: str, other: str | None = None, kind: str | None = None):
        return [d for d in diffs if lab in (d["a"], d["b"])
                and (other is None or other in (d["a"], d["b"]))
                and (kind is None or d["tensor"].startswith(kind))]

    rows: list[tuple[str, list[str]]] = []
    if ref:
        rows.append((f"outputs vs {ref}",
                     [_cell(_worst(involving(lab, ref, "output"))) for lab in labels] + blank))
        rows.append((f"gradients vs {ref}",
                     [_cell(_worst(involving(lab, ref, "grad"))) for lab in labels] + blank))
    others = []
    for lab in labels:
        pair = [d for d in involving(lab) if ref not in (d["a"], d["b"])]
        others.append(_cell(_worst(pair)) if pair else '<td class="na">n/a</td>')
    rows.append(("worst vs other targets", others + blank))
    for name, key in (("forward (ms)", "forward_ms"),
                      ("forward+backward (ms)", "forward_backward_ms")):
        cells = [f"<td>{_ms(r.get(key))}</td>" for r in runs]
        if ref:
            cells.append(f'<td class="ref">{_ms(ref_run.get(key))}</td>')
        rows.append((name, cells))
    verdicts = []
    for lab in labels:
        bad = [d for d in involving(lab) if not d.get("ok")]
        verdicts.append('<td class="ok verdict">conforms</td>' if not bad else
                        f'<td class="bad verdict">{_n(len(bad), "mismatch")}</td>')
    rows.append(("verdict", verdicts + blank))
    return headers, rows


def _verdict_section(report: Mapping[str, Any]) -> str:
    tol = report.get("tolerance") or {}
    headers, rows = verdict_rows(report)
    caption = (f"{_e(report.get('case', report.get('dtype', '')))}: max relative error "
               f"(tolerance: outputs {_fmt_tol(tol.get('output'))}, gradients "
               f"{_fmt_tol(tol.get('grad'))})")
    head = "".join(f'<th scope="col">{_e(h)}</th>' for h in headers)
    body = "".join(f'<tr><th scope="row">{_e(name)}</th>{"".join(cells)}</tr>'
                   for name, cells in rows)
    out = [f'<h3>{_e(report.get("dtype", ""))}</h3>',
           f'<div class="scroll"><table class="verdict-table"><caption>{caption}</caption>'
           f'<thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table></div>']
    diffs = list(report.get("diffs", []))
    worst = _worst(diffs)
    if worst is not None:
        out.append(f'<p class="note">Worst of {len(diffs)} comparisons: {_diff_text(worst)}</p>')
    failures = [d for d in diffs if not d.get("ok")]
    if failures:
        out.append(f'<h4 class="bad-text">{_n(len(failures), "comparison")} out of '
                   f"tolerance</h4>")
        out.append(_diff_table(failures[:50]))
        if len(failures) > 50:
            out.append(f"<p>... and {len(failures) - 50} more (all of them below).</p>")
    if diffs:
        out.append(f"<details><summary>All {len(diffs)} comparisons</summary>"
                   f"{_diff_table(diffs)}</details>")
    return "\n".join(out)


def _diff_text(d: Mapping[str, Any]) -> str:
    status = "ok" if d.get("ok") else "MISMATCH"
    return (f"{status} <code>{_e(d['tensor'])}</code>: {_e(d['a'])} vs {_e(d['b'])}, max abs "
            f"{_nan(d.get('max_abs')):.3e}, max rel {_nan(d.get('max_rel')):.3e} "
            f"(tol {_fmt_tol(d.get('tol'))}) at {_e(list(d.get('where') or []))}")


def _diff_table(diffs: Sequence[Mapping[str, Any]]) -> str:
    rows = []
    for d in diffs:
        cls = "ok" if d.get("ok") else "bad"
        rows.append(f"<tr><td><code>{_e(d['tensor'])}</code></td><td>{_e(d['a'])}</td>"
                    f"<td>{_e(d['b'])}</td><td>{_nan(d.get('max_abs')):.2e}</td>"
                    f'<td class="{cls}">{_nan(d.get("max_rel")):.2e}</td>'
                    f"<td>{_fmt_tol(d.get('tol'))}</td>"
                    f"<td>{_e(list(d.get('where') or []))}</td></tr>")
    return ('<div class="scroll"><table class="diffs"><thead><tr><th>tensor</th><th>a</th>'
            '<th>b</th><th>max abs</th><th>max rel</th><th>tol</th><th>worst at</th></tr>'
            f'</thead><tbody>{"".join(rows)}</tbody></table></div>')


# ---------------------------------------------------------------------- plots
def _matplotlib_figure(**kwargs):
    """A matplotlib ``Figure`` on an Agg canvas (no pyplot, no global backend switch), or
    ``None`` when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def _img(fig, alt: str, dpi: int = 150) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    width = int(round(fig.get_figwidth() * 100))  # shown at 100 px per inch, sharp on HiDPI
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<img class="plot" width="{width}" src="data:image/png;base64,{data}" '
            f'alt="{_e(alt)}">')


_NO_MPL = ('<p class="note">Plots need matplotlib, which is not installed here: '
           '<code>pip install matplotlib</code>.</p>')


def _node_order(entries: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Every node of the entries, ``(name, kind)``, in forward execution order (the order of
    the forward rows; backward rows come in backpropagation order, i.e. reversed)."""
    order: dict[str, str] = {}
    for e in entries:
        for row in e.get("rows", []):
            if row.get("direction", "forward") == "forward":
                order.setdefault(row["name"], row.get("kind", ""))
    for e in entries:  # nodes seen only backward: reverse backward order
        for row in reversed(e.get("rows", [])):
            if row.get("direction") == "backward":
                order.setdefault(row["name"], row.get("kind", ""))
    return list(order.items())


def _layer_of(name: str) -> str | None:
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return None


def node_figure(entries: Sequence[Mapping[str, Any]], tol: Mapping[str, float], title: str):
    """One figure, two panels (forward, backward): max relative error per node (log y), one
    line per backend pair, the tolerance dashed. ``None`` without matplotlib."""
    nodes = _node_order(entries)
    names = [n for n, _ in nodes]
    longest = max((len(n) for n in names), default=10)
    panel_h = 2.6
    label_h = 0.075 * longest + 0.3
    fig = _matplotlib_figure(figsize=(12, 2 * (panel_h + label_h) + 0.6), layout="constrained")
    if fig is None:
        return None
    axes = fig.subplots(2, 1)
    x = list(range(len(names)))
    index = {n: i for i, n in enumerate(names)}
    for ax, direction, tkey in ((axes[0], "forward", "output"), (axes[1], "backward", "grad")):
        values = [_nan(r.get("max_rel")) for e in entries for r in e.get("rows", [])
                  if r.get("direction", "forward") == direction]
        finite = [v for v in values if math.isfinite(v) and v > 0]
        t = float(tol.get(tkey, math.nan))
        lo = min(finite + ([t] if math.isfinite(t) else [1e-16]))
        floor = 10 ** (math.floor(math.log10(lo)) - 1)
        hi = max(finite + ([t] if math.isfinite(t) else [1.0]))
        top = 10 ** (math.ceil(math.log10(hi)) + 1)
        # alternate light bands per layer, so the eye finds layer boundaries
        band, last = False, None
        for i, n in enumerate(names):
            layer = _layer_of(n)
            if layer != last:
                band = not band if layer is not None else False
                last = layer
            if band:
                ax.axvspan(i - 0.5, i + 0.5, color="#f2f2f2", zorder=0, lw=0)
        for k, e in enumerate(entries):
            rows = {r["name"]: r for r in e.get("rows", [])
                    if r.get("direction", "forward") == direction}
            if not rows:
                continue
            xs = sorted(index[n] for n in rows)
            ys, bad, zero = [], [], []
            for i in xs:
                v = _nan(rows[names[i]].get("max_rel"))
                if math.isnan(v) or math.isinf(v):
                    ys.append(math.nan)
                    bad.append(i)
                else:
                    ys.append(max(v, floor))  # exact agreement (0) is drawn on the bottom
                    if v <= 0:
                        zero.append(i)
            color = PAIR_COLORS[k % len(PAIR_COLORS)]
            ax.plot(xs, ys, color=color, marker=PAIR_MARKERS[k % len(PAIR_MARKERS)],
                    markersize=4, lw=1.6, label=str(e.get("pair", f"pair {k + 1}")), zorder=3)
            if zero:
                ax.plot(zero, [floor] * len(zero), ls="none", color=color, markersize=6,
                        marker=PAIR_MARKERS[k % len(PAIR_MARKERS)], mfc="white", zorder=4)
            if bad:
                ax.plot(bad, [top / 3] * len(bad), ls="none", marker="x", color=color,
                        markersize=8, mew=2, zorder=4)
        if math.isfinite(t):
            ax.axhline(t, color="#333333", ls="--", lw=1.2, zorder=2,
                       label=f"tolerance {t:.0e}")
        ax.set_yscale("log")
        ax.set_ylim(floor / 2, top)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_xticks(x)
        ax.set_xticklabels(names, rotation=60, ha="right", rotation_mode="anchor", fontsize=7.5)
        ax.grid(axis="y", which="major", color="#dddddd", lw=0.6)
        ax.set_ylabel("max relative error")
        what = ("node output" if direction == "forward"
                else "gradient w.r.t. the node output")
        ax.set_title(f"{title}: {direction} ({what})", loc="left", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside upper center", ncols=min(len(labels), 4),
                   fontsize=8, frameon=False)
    return fig


def _first_divergence(entry: Mapping[str, Any], tol: Mapping[str, float]) -> str:
    for row in entry.get("rows", []):
        t = row.get("tol", tol.get("output" if row.get("direction", "forward") == "forward"
                                   else "grad"))
        ok = row.get("ok")
        if ok is None:
            rel = _nan(row.get("max_rel"))
            ok = not math.isnan(rel) and rel <= float(t)
        if not ok:
            rel = _nan(row.get("max_rel"))
            rel_s = "NaN" if math.isnan(rel) else f"{rel:.1e}"
            return (f'<span class="bad-text">first divergence at <code>{_e(row["name"])}</code> '
                    f'({_e(row.get("kind", ""))}, {_e(row.get("direction", "forward"))}): '
                    f"max rel {rel_s} &gt; {_fmt_tol(t)}</span>")
    return '<span class="ok-text">no divergence: every node within tolerance</span>'


def _nodes_section(nodes: Sequence[Mapping[str, Any]],
                   reports: Sequence[Mapping[str, Any]]) -> str:
    out = ['<p class="note">Max relative error of every named node (the output of each '
           "native sub-module, the same names in every backend), x in forward execution order; "
           "backpropagation visits the lower panel right to left. Exact agreement (0) is drawn "
           "as a hollow marker at the bottom edge, NaN or a missing node as a cross at the top. Shaded bands mark "
           "layers.</p>"]
    dtypes = list(dict.fromkeys(str(e.get("dtype", "")) for e in nodes))
    for dtype in dtypes:
        entries = [e for e in nodes if str(e.get("dtype", "")) == dtype]
        tol = dict(_dtype_tolerance(dtype, reports))
        for e in entries:  # an entry may carry its own tolerance
            if e.get("tolerance"):
                tol.update(e["tolerance"])
                break
        out.append(f"<h3>{_e(dtype)}</h3>")
        fig = node_figure(entries, tol, dtype)
        out.append(_NO_MPL if fig is None else
                   _img(fig, f"per-node max relative error, {dtype}, forward and backward"))
        items = "".join(f"<li>{_e(e.get('pair', ''))}: {_first_divergence(e, tol)}</li>"
                        for e in entries)
        out.append(f'<ul class="pairs">{items}</ul>')
    return "\n".join(out)


def timing_figure(reports: Sequence[Mapping[str, Any]]):
    """Horizontal bars: forward and forward+backward time of every target, one panel per
    dtype. ``None`` without matplotlib or without timings."""
    timed = []
    for r in reports:
        runs = [(run["label"], run.get("forward_ms"), run.get("forward_backward_ms"))
                for run in r.get("runs", [])]
        ref = r.get("reference_run")
        if ref and r.get("reference"):
            runs.append((f"{r['reference']} (reference)", ref.get("forward_ms"),
                         ref.get("forward_backward_ms")))
        runs = [t for t in runs if t[1] is not None or t[2] is not None]
        if runs:
            timed.append((str(r.get("dtype", "")), runs))
    if not timed:
        return None
    n = max(len(runs) for _, runs in timed)
    fig = _matplotlib_figure(figsize=(12, 0.45 * n + 1.4), layout="constrained")
    if fig is None:
        return None
    axes = fig.subplots(1, len(timed), squeeze=False)[0]
    for ax, (dtype, runs) in zip(axes, timed):
        labels = [t[0] for t in runs][::-1]
        fwd = [t[1] or 0.0 for t in runs][::-1]
        step = [t[2] or 0.0 for t in runs][::-1]
        ys = list(range(len(labels)))
        h = 0.38
        b1 = ax.barh([y + h / 2 for y in ys], fwd, height=h, color=TIMING_COLORS[0],
                     label="forward")
        b2 = ax.barh([y - h / 2 for y in ys], step, height=h, color=TIMING_COLORS[1],
                     label="forward+backward")
        for bars, vals in ((b1, fwd), (b2, step)):
            ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in vals], padding=3,
                         fontsize=7.5)
        ax.set_yticks(ys)
        ax.set_yticklabels(labels, fontsize=8.5)
        ax.set_xlabel("milliseconds (median)")
        ax.set_xlim(0, max(fwd + step + [1e-9]) * 1.18)
        ax.set_title(dtype, loc="left", fontsize=10)
        ax.grid(axis="x", color="#e5e5e5", lw=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0].legend(loc="lower right", fontsize=8, frameon=False)
    return fig


def _timing_section(reports: Sequence[Mapping[str, Any]]) -> str:
    fig = timing_figure(reports)
    if fig is None:
        has_times = any(run.get("forward_ms") is not None for r in reports
                        for run in r.get("runs", []))
        return _NO_MPL if has_times else ('<p class="note">Not timed (the run used '
                                          "<code>--repeats 0</code>).</p>")
    return ('<p class="note">Median wall time of one call after a warm-up call, per target '
            "(the same numbers as the verdict table).</p>" + _img(fig, "timing per target"))


# ---------------------------------------------------------------------- spec + environment
def _value(v: Any) -> str:
    if v is None:
        return '<span class="na">—</span>'
    if isinstance(v, bool):
        return "true" if v else "false"
    return f"<code>{_e(v)}</code>"


def _spec_section(spec: Mapping[str, Any]) -> str:
    rows = [(k, _value(v)) for k, v in spec.items()]
    try:
        from .spec import ModelSpec

        rows.append(("parameters", f"{ModelSpec.from_dict(dict(spec)).num_parameters():,}"))
    except Exception:  # noqa: BLE001 - a report of an older or odd spec still renders
        pass
    per = -(-len(rows) // 3)  # three side-by-side tables keep the page short
    tables = []
    for i in range(0, len(rows), per):
        body = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{v}</td></tr>'
                       for k, v in rows[i: i + per])
        tables.append(f'<table class="kv"><tbody>{body}</tbody></table>')
    return ('<p class="note">Every field of the <code>ModelSpec</code> (see the spec '
            f'reference for their meaning).</p><div class="columns">{"".join(tables)}</div>')


def _environment_section(env: Mapping[str, Any]) -> str:
    """The facts the run recorded (:func:`xformer.conformance.environment`), as they are."""
    body = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_e(v)}</td></tr>'
                   for k, v in env.items())
    return ('<p class="note">Recorded by the process that ran the comparison.</p>'
            f'<table class="kv"><tbody>{body}</tbody></table>')


_CSS = """
:root { --pass: %(pass)s; --fail: %(fail)s; --ink: #1f2328; --muted: #59636e;
        --line: #d1d9e0; --head: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: #ffffff; color: var(--ink);
       font: 15px/1.5 -apple-system, BlinkMacSystemFont, "Segoe UI", "Noto Sans", Helvetica,
             Arial, sans-serif; }
main { max-width: 1260px; margin: 0 auto; padding: 24px 28px 48px; }
h1 { font-size: 26px; margin: 0 0 14px; }
h2 { font-size: 21px; margin: 34px 0 10px; padding-bottom: 6px;
     border-bottom: 1px solid var(--line); }
h3 { font-size: 17px; margin: 22px 0 6px; }
h4 { font-size: 15px; margin: 14px 0 6px; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
       monospace; font-size: 0.9em; }
.banner { padding: 14px 18px; border-radius: 6px; color: #ffffff; font-size: 17px; }
.banner.pass { background: var(--pass); }
.banner.fail { background: var(--fail); }
nav { margin: 14px 0 0; color: var(--muted); }
nav a { color: #0969da; text-decoration: none; }
nav a:hover { text-decoration: underline; }
.note { color: var(--muted); font-size: 14px; margin: 6px 0 10px; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 6px 0; }
caption { text-align: left; color: var(--muted); font-size: 14px; padding: 0 0 6px; }
th, td { border: 1px solid var(--line); padding: 5px 10px; }
thead th { background: var(--head); font-weight: 600; text-align: right; white-space: nowrap; }
tbody th { background: var(--head); text-align: left; font-weight: 600; white-space: nowrap; }
.verdict-table td { text-align: right; min-width: 96px; }
td.ok, .ok-text { color: var(--pass); }
td.bad, .bad-text { color: var(--fail); }
td.bad { background: #ffebe9; font-weight: 600; }
td.verdict { font-weight: 600; }
td.ref, .na { color: var(--muted); }
table.diffs td { font-size: 13px; }
table.kv td { min-width: 160px; }
.columns { display: flex; flex-wrap: wrap; gap: 0 24px; align-items: flex-start; }
table.diffs thead th { text-align: left; }
details { margin: 8px 0; }
summary { cursor: pointer; color: #0969da; }
img.plot { display: block; max-width: 100%%; height: auto; margin: 8px 0; }
ul.pairs { margin: 4px 0 12px; padding-left: 22px; }
footer { margin-top: 40px; color: var(--muted); font-size: 13px; }
""" % {"pass": PASS_COLOR, "fail": FAIL_COLOR}


# ---------------------------------------------------------------------- training reports
def training_figure(report: Mapping[str, Any]):
    """Error against optimizer step for one training comparison (log y): the worst relative
    error of the parameters, of the optimizer state and of the loss between targets, the
    tolerances dashed. ``None`` without matplotlib."""
    fig = _matplotlib_figure(figsize=(8, 3.6), layout="constrained")
    if fig is None:
        return None
    ax = fig.subplots()
    rows = report.get("rows") or []
    steps = [r["step"] for r in rows]
    tol = report.get("tolerance") or {}
    for (key, label), color, marker in zip(
            (("param_error", "parameters"), ("state_error", "optimizer state"),
             ("loss_error", "loss")), PAIR_COLORS, PAIR_MARKERS):
        values = [max(_nan(r.get(key)), 1e-18) for r in rows]
        ax.plot(steps, values, color=color, marker=marker, label=label)
    for key, color in (("parameters", PAIR_COLORS[0]), ("loss", PAIR_COLORS[2])):
        if key in tol:
            ax.axhline(float(tol[key]), color=color, linestyle="--", linewidth=1,
                       label=f"tolerance ({key})")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("worst relative error vs baseline")
    ax.set_title(f"{report.get('name', '')}: targets {', '.join(report.get('targets', []))}",
                 fontsize=9)
    ax.legend(fontsize=8)
    return fig


def render_training_html(doc: Mapping[str, Any]) -> str:
    """The report page of ``xformer compare --train-steps``: the verdict, per dtype the step
    table and the error-against-step plot, the run's settings and the environment."""
    reports = list(doc.get("training") or [])
    model = str(doc.get("model") or "model")
    ok = bool(doc.get("ok", all(r.get("ok", False) for r in reports)))
    verdict = "CONFORMANT" if ok else "NOT CONFORMANT"
    text = (f"<strong>{verdict}</strong>: training of {_e(model)}, loss, parameters and "
            f"optimizer state compared after every step")
    parts = [f'<div class="banner {"pass" if ok else "fail"}" role="status">{text}</div>']
    for r in reports:
        first = r.get("first_divergence")
        parts.append(f"<h2>{_e(r.get('name', ''))}</h2>")
        if first:
            parts.append(f"<p>First divergence: step {_e(first['step'])}, "
                         f"<code>{_e(first['tensor'])}</code> on {_e(first['target'])}.</p>")
        fig = training_figure(r)
        parts.append(_NO_MPL if fig is None else _img(fig, f"error against step, {r['name']}"))
        head = "".join(f"<th>{h}</th>" for h in ("step", "lr", "loss err", "param err",
                                                 "state err", "worst", "ok"))
        body = "".join(
            f"<tr><td>{row['step']}</td><td>{row['lr']:.3g}</td>"
            f"<td>{_nan(row['loss_error']):.1e}</td><td>{_nan(row['param_error']):.1e}</td>"
            f"<td>{_nan(row['state_error']):.1e}</td><td><code>{_e(row['worst'])}</code> "
            f"{_e(row['worst_target'])}</td><td>{'yes' if row['ok'] else 'NO'}</td></tr>"
            for row in r.get("rows", []))
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
        config = ", ".join(f"{k}={_e(v)}" for k, v in (r.get("config") or {}).items())
        parts.append(f"<p class=\"note\">{config}</p>")
    parts.append("<h2>Environment</h2>" + _environment_section(doc.get("environment") or {}))
    title = f"xformer training conformance: {model}"
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{_e(title)}</h1>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


def write_training_html(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """:func:`render_training_html` written atomically (as :func:`write_html`)."""
    from .spec import atomic_write_bytes

    text = render_training_html(doc)
    atomic_write_bytes(Path(path), text.encode("utf-8"))


# ---------------------------------------------------------------------- xformer check
def render_check_html(doc: Mapping[str, Any]) -> str:
    """The report page of ``xformer check``: the verdict per implementation, its output and
    gradient errors against xformer's lowering and the numpy reference, the per-node plot
    (forward and backward, :func:`node_figure`) with the first divergent node, and the mapping
    used (canonical -> native, transposed, matched automatically)."""
    checks = list(doc.get("checks") or [])
    ok = all(c.get("conforms") for c in checks)
    text = (f"<strong>{'CONFORMS' if ok else 'DOES NOT CONFORM'}</strong>: "
            f"{len(checks)} implementation(s) against the spec")
    parts = [f'<div class="banner {"pass" if ok else "fail"}" role="status">{text}</div>']
    for c in checks:
        parts.append(f"<h2><code>{_e(c['impl'])}</code> ({_e(c['dtype'])}): "
                     f"{'conforms' if c['conforms'] else 'does not conform'}</h2>")
        if c.get("first_divergence"):
            parts.append(f"<p>First divergence at <code>{_e(c['first_divergence'])}</code>.</p>")
        head = "".join(f"<th>{h}</th>" for h in ("output against", "max abs", "max rel",
                                                 "tolerance", "ok"))
        body = "".join(f"<tr><td>{_e(r['against'])}</td><td>{_nan(r['max_abs']):.1e}</td>"
                       f"<td>{_nan(r['max_rel']):.1e}</td><td>{_fmt_tol(r['tol'])}</td>"
                       f"<td>{'yes' if r['ok'] else 'NO'}</td></tr>" for r in c["outputs"])
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
        if c.get("nodes"):
            entry = {"pair": f"{c['impl']} vs xformer {c['backend']}", "rows": c["nodes"]}
            fig = node_figure([entry], c.get("tolerance") or {}, c["dtype"])
            parts.append(_NO_MPL if fig is None else
                         _img(fig, f"per-node max relative error, {c['impl']}"))
        head = "".join(f"<th>{h}</th>" for h in ("gradient", "native", "max rel", "ok"))
        body = "".join(f"<tr><td><code>{_e(r['name'])}</code></td><td><code>"
                       f"{_e(r['native'])}</code></td><td>{_nan(r['max_rel']):.1e}</td>"
                       f"<td>{'yes' if r['ok'] else 'NO'}</td></tr>" for r in c["grads"])
        parts.append(f"<h3>Gradients</h3><table><tr>{head}</tr>{body}</table>")
        head = "".join(f"<th>{h}</th>" for h in ("canonical", "native", "transposed", "how"))
        body = "".join(f"<tr><td><code>{_e(m['canonical'])}</code></td><td><code>"
                       f"{_e(m['native'])}</code></td><td>{'yes' if m['transposed'] else ''}"
                       f"</td><td>{'automatic' if m['auto'] else 'mapping file'}</td></tr>"
                       for m in c["mapping"])
        parts.append(f"<details><summary>Mapping used</summary><table><tr>{head}</tr>{body}"
                     f"</table></details>")
    parts.append("<h2>Environment</h2>" + _environment_section(doc.get("environment") or {}))
    title = "xformer check"
    return (f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{title}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<main>\n"
            f"<h1>{title}</h1>\n" + "\n".join(parts) + "\n</main>\n</body>\n</html>\n")


def write_check_html(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """:func:`render_check_html` written atomically."""
    from .spec import atomic_write_bytes

    atomic_write_bytes(Path(path), render_check_html(doc).encode("utf-8"))
