"""The HTML report (xformer.report): built from a real small run plus synthetic per-node rows,
self-contained, written atomically, and (with Chromium installed) it renders in a real browser:
the verdict banner, the tables and the plot lines are on the screen."""

from __future__ import annotations

import base64
import copy
import os
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest

from xformer import report as rep
from xformer.backend import is_installed
from xformer.conformance import Case, Target, default_targets, environment, run_case
from xformer.spec import ModelSpec

SPEC = ModelSpec(vocab_size=40, d_model=16, n_heads=2, d_ff=32, n_layers=1, max_len=8,
                 type_vocab_size=2, head="pooler")


def _targets() -> list[Target]:
    """Default modes of the installed backends that import fast (TensorFlow only if it is the
    only one): keeps the real run well under 20 s."""
    fast = [b for b in ("torch", "mxnet") if is_installed(b)]
    names = fast or [b for b in ("tensorflow",) if is_installed(b)]
    if not names:
        pytest.skip("no backend installed: pip install 'xformer[all]'")
    return default_targets(names)


def _nodes(dtype: str, pairs: list[str], tol: dict) -> dict:
    """Synthetic per-node rows in the shape divergence localisation produces."""
    rng = np.random.default_rng(0)
    out = []
    base = 1e-15 if dtype == "float64" else 1e-7
    for k, pair in enumerate(pairs):
        rows = []
        for direction, names in (("forward", SPEC.nodes()), ("backward", SPEC.nodes()[::-1])):
            for i, (name, kind) in enumerate(names):
                v = float(base * (i + 1) * (k + 1) * rng.uniform(0.5, 2.0))
                rows.append({"name": name, "kind": kind, "direction": direction,
                             "max_abs": v, "max_rel": v})
        rows[2]["max_rel"] = 0.0  # exact agreement: drawn at the bottom edge
        out.append({"dtype": dtype, "pair": pair, "tolerance": tol, "rows": rows})
    return out


@pytest.fixture(scope="module")
def doc() -> dict:
    targets = _targets()
    reports = []
    for dtype in ("float64", "float32"):
        case = Case.make(SPEC, seed=0, dtype=dtype, batch=2, seq_len=6, name=f"small {dtype}")
        reports.append(run_case(case, targets, reference="numpy", repeats=1).to_dict())
    labels = [t.label for t in targets]
    pairs = ([f"{a} vs {b}" for i, a in enumerate(labels) for b in labels[i + 1:]]
             or [f"{labels[0]} vs numpy"])
    pairs = (pairs + ["numpy vs torch.nn"])[:3]
    nodes = [n for r in reports for n in _nodes(r["dtype"], pairs, r["tolerance"])]
    return {"ok": all(r["ok"] for r in reports), "model": "small test spec",
            "environment": environment(targets, "numpy"),
            "reports": reports, "nodes": nodes}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in
            re.findall(r'<img[^>]+src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def _external_refs(page: str) -> list[str]:
    """Every src/href/url()/@import that points off the page (http, https, protocol-relative,
    file)."""
    pat = (r"""(?:\b(?:src|href|action|poster|data)\s*=\s*["']?\s*|url\(\s*["']?|@import\s+["']?)"""
           r"""((?:https?:|file:)?//[^"'\s)>]*)""")
    return re.findall(pat, page, flags=re.I)


# ---------------------------------------------------------------------- the page
def test_page_has_verdict_table_plots_spec_environment(doc):
    page = rep.render_html(doc)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert doc["ok"], "the small real run must conform"
    assert 'class="banner pass"' in page and "CONFORMANT" in page
    r = doc["reports"][0]
    labels = [run["label"] for run in r["runs"]]
    for label in labels:
        assert f'<th scope="col">{label}</th>' in page
    assert '<th scope="col">numpy (reference)</th>' in page
    for row in ("outputs vs numpy", "worst vs other targets", "forward (ms)",
                "forward+backward (ms)", "verdict"):
        assert f'<th scope="row">{row}</th>' in page
    # the table's cells are computed from the diffs: the worst output error of the first
    # target against the reference is in the page, formatted as the CLI formats it
    outs = [d for d in r["diffs"] if labels[0] in (d["a"], d["b"]) and "numpy" in (d["a"], d["b"])
            and d["tensor"].startswith("output")]
    worst = max(outs, key=lambda d: d["max_rel"] / d["tol"])
    assert f">{worst['max_rel']:.1e}</td>" in page
    assert page.count('<td class="ok verdict">conforms</td>') == len(labels) * len(doc["reports"])
    assert f"<td>{r['runs'][0]['forward_ms']:.1f}</td>" in page
    # plots: per dtype one per-node figure, plus the timing figure, all valid embedded PNGs
    pngs = _pngs(page)
    assert len(pngs) == len(doc["reports"]) + 1
    assert all(p.startswith(b"\x89PNG\r\n\x1a\n") and len(p) > 10_000 for p in pngs)
    assert "Per-node errors" in page and "no divergence" in page
    # spec and environment
    assert '<th scope="row">d_model</th><td><code>16</code></td>' in page
    assert '<th scope="row">parameters</th>' in page
    assert '<th scope="row">python</th>' in page
    assert f'<th scope="row">cpu_count</th><td>{os.cpu_count()}</td>' in page
    backend = targets_of(doc)[0].partition("/")[0]
    assert f'<th scope="row">{backend}</th>' in page  # the framework version, as recorded
    # self-contained: nothing is fetched from anywhere
    assert _external_refs(page) == []
    assert "<script" not in page and "<link" not in page


def targets_of(doc: dict) -> list[str]:
    return [run["label"] for run in doc["reports"][0]["runs"]]


def test_page_shows_only_the_recorded_environment(doc):
    """Environment facts come from the document (recorded by the run), never from the process
    that renders the page."""
    page = rep.render_html({**doc, "environment": {"python": "3.0.1", "torch": "9.9"}})
    env = page[page.index('<section id="environment">'):]
    env = env[:env.index("</section>")]
    assert re.findall(r'<th scope="row">([^<]*)</th>', env) == ["python", "torch"]
    assert "<td>3.0.1</td>" in env and "cpu_count" not in env and "threads" not in env


def test_external_reference_detector_works():
    assert _external_refs('<img src="https://x.org/a.png"><a href=//cdn.x/y>') == [
        "https://x.org/a.png", "//cdn.x/y"]
    assert _external_refs("<style>@import 'http://f.com/c.css'; a{background:url(x.png)}</style>"
                          ) == ["http://f.com/c.css"]


def test_mismatch_makes_a_red_page_and_lists_the_failures(doc):
    bad = copy.deepcopy(doc)
    bad["ok"] = False
    d = bad["reports"][1]["diffs"][0]
    d.update(ok=False, max_rel=None, tensor=d["tensor"] + " (non-finite)")
    bad["nodes"][0]["rows"][1].update(max_rel=None)
    page = rep.render_html(bad)
    assert 'class="banner fail"' in page and "NOT CONFORMANT" in page
    assert "1 tensor comparison out of tolerance" in page
    assert "NaN/shape" in page and "1 comparison out of tolerance" in page
    assert "first divergence at" in page
    assert len(_pngs(page)) == len(doc["reports"]) + 1


def test_without_nodes_or_timings_or_matplotlib(doc, monkeypatch):
    plain = {k: v for k, v in doc.items() if k != "nodes"}
    page = rep.render_html(plain)
    assert "Per-node errors" not in page and len(_pngs(page)) == 1  # timing only
    untimed = copy.deepcopy(plain)
    for r in untimed["reports"]:
        for run in r["runs"]:
            run["forward_ms"] = run["forward_backward_ms"] = None
    assert "Not timed" in rep.render_html(untimed)
    monkeypatch.setattr(rep, "_matplotlib_figure", lambda **kw: None)
    page = rep.render_html(doc)
    assert _pngs(page) == [] and "Plots need matplotlib" in page
    assert 'class="banner pass"' in page


def test_write_html_is_atomic(doc, tmp_path, monkeypatch):
    doc = {k: v for k, v in doc.items() if k != "nodes"}  # fewer plots: faster
    out = tmp_path / "report.html"
    rep.write_html(out, doc)
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    # a failure while rendering leaves the old page untouched and nothing else behind
    out.write_text("old page")

    def boom(_doc):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rep, "render_html", boom)
    with pytest.raises(RuntimeError):
        rep.write_html(out, doc)
    with pytest.raises(RuntimeError):
        rep.write_html(tmp_path / "new.html", doc)
    assert out.read_text() == "old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    monkeypatch.undo()
    # a failure while writing (here: at the final rename) leaves no partial file either
    import xformer.spec

    def no_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(xformer.spec.os, "replace", no_replace)
    with pytest.raises(OSError):
        rep.write_html(out, doc)
    assert out.read_text() == "old page"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]


# ---------------------------------------------------------------------- a real browser
def _chromium() -> str | None:
    for name in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _near(img: np.ndarray, hex_color: str, tol: int = 24) -> np.ndarray:
    rgb = np.array([int(hex_color[i: i + 2], 16) for i in (1, 3, 5)])
    return (np.abs(img.astype(int) - rgb) <= tol).all(axis=-1)


def test_page_renders_in_headless_chromium(doc, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Chromium not installed: apt-get install chromium (Debian) to run the "
                    "browser check")
    import matplotlib.image

    html_path = tmp_path / "report.html"
    png = tmp_path / "shot.png"
    rep.write_html(html_path, doc)
    profile = tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path)
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", f"--user-data-dir={profile}", "--hide-scrollbars",
           "--window-size=1400,2400", f"--screenshot={png}", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert png.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    img = np.round(matplotlib.image.imread(str(png))[..., :3] * 255).astype(np.uint8)
    assert img.shape[:2] == (2400, 1400)

    non_white = (img < 245).any(axis=-1)
    assert non_white.mean() > 0.05, "the page is (nearly) blank"

    banner = _near(img, rep.PASS_COLOR, tol=6)
    assert banner.sum() > 20_000, "no verdict banner in the banner colour"
    rows = np.flatnonzero(banner.sum(axis=1) > 500)
    assert rows.min() < 300, "the banner is not at the top of the page"
    below = rows.max() + 1

    # plot lines: saturated colours of the first two backend pairs, under the banner
    area = img[below:]
    for color in rep.PAIR_COLORS[:2]:
        assert _near(area, color).sum() > 300, f"no plot line of colour {color} on the page"
    sat = area.max(axis=-1).astype(int) - area.min(axis=-1)
    assert (sat > 80).mean() > 0.002, "no coloured (non-grey) pixels in the plot area"
