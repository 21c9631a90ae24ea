"""The docs site builds with ``mkdocs build --strict`` (no broken link, no page left out of the
nav), and its Nodes pages, generated at build time by docs/hooks/nodes.py, show every node
class of every installed backend, in framework tabs, as the source currently reads."""

from __future__ import annotations

import html
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from xformer.show import PACKAGES, class_source, node_classes

ROOT = Path(__file__).resolve().parent.parent
NODES = ["LayerNorm", "RMSNorm", "RotaryEmbedding", "Embeddings", "MultiHeadAttention",
         "Dropout", "FeedForward", "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
         "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel"]
TABS = ["PyTorch", "TensorFlow (Keras 3)", "MXNet (Gluon)"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    missing = [m for m in ("mkdocs", "material") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed: pip install mkdocs mkdocs-material "
                    f"to build the docs site")
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out),
         "--config-file", str(ROOT / "mkdocs.yml")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    return out


def _text(page: Path) -> str:
    """The page's visible text (tags dropped, entities decoded)."""
    return html.unescape(re.sub(r"<[^>]+>", "", page.read_text(encoding="utf-8")))


def _tab_labels(page: Path) -> list[str]:
    return [html.unescape(m) for m in re.findall(r'<label for="__tabbed_[^"]*">([^<]*)</label>',
                                                 page.read_text(encoding="utf-8"))]


def test_site_has_the_manual(site):
    for page in ("index.html", "getting-started/index.html", "spec/index.html",
                 "examples/index.html", "conformance/index.html", "pitfalls/index.html",
                 "benchmarks/index.html", "design/index.html", "nodes/index.html",
                 "bad-input/index.html"):
        assert (site / page).is_file(), page
    assert not (site / "hooks").exists(), "the build hook must not be published"
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Does my Transformer compute the same thing" in home
    assert "fonts.googleapis.com" not in home  # system fonts: the site works offline
    for name in NODES:
        assert f'href="nodes/{name}/"' in home, f"{name} missing from the nav"
    examples = site / "examples" / "index.html"
    assert _tab_labels(examples) == TABS * 4  # encoder, decoder, enc-dec, Llama family
    assert 'backend="mxnet"' in _text(examples)
    design = _text(site / "design" / "index.html")
    assert "How to add a spec field" in design and "How to add a backend" in design


def test_one_node_page_per_class_with_three_framework_tabs(site):
    assert node_classes("torch") == NODES  # the nav and the pages follow modules.py
    for name in NODES:
        page = site / "nodes" / name / "index.html"
        assert page.is_file(), name
        assert _tab_labels(page) == TABS, name
        text = _text(page)
        assert f"class {name}" in text
        for be in PACKAGES:  # what is shown is the installed source as it reads now
            if importlib.util.find_spec(PACKAGES[be]) is None:
                continue
            src, _ = class_source(be, name)
            assert src.splitlines()[0].strip() in text, (name, be)
            assert src.splitlines()[-1].strip() in text, (name, be)
    index = _text(site / "nodes" / "index.html")
    assert all(name in index for name in NODES)
    assert "Multi-head attention" in index
