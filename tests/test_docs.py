"""Every Python block of docs/examples.md runs, and the three backends print the same numbers
for the same example (the page claims they agree)."""

import contextlib
import io
import re
import textwrap
from pathlib import Path

import pytest

from xformer.backend import is_installed

PAGE = Path(__file__).resolve().parent.parent / "docs" / "examples.md"
BLOCKS = [textwrap.dedent(b) for b in
          re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)]


def _backend(code: str) -> str:
    return re.search(r'backend="(\w+)"', code).group(1)


def _run(code: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        exec(compile(code, str(PAGE), "exec"), {"__name__": "__docs__"})
    return buf.getvalue()


SECTIONS = ["encoder", "decoder", "encoder-decoder", "llama-family"]


def test_page_has_one_block_per_section_and_backend():
    assert len(BLOCKS) == 3 * len(SECTIONS)
    assert [_backend(b) for b in BLOCKS] == ["torch", "tensorflow", "mxnet"] * len(SECTIONS)


@pytest.mark.parametrize("section", range(len(SECTIONS)), ids=SECTIONS)
def test_blocks_run_and_generation_agrees(section):
    outputs = {}
    for code in BLOCKS[3 * section: 3 * section + 3]:
        if is_installed(_backend(code)):
            outputs[_backend(code)] = _run(code)
    assert outputs
    if section == 3:  # every line: shapes (kv heads in the cache) and generated ids
        assert len({o for o in outputs.values()}) == 1, outputs
        assert "(1, 2, 3, 16)" in next(iter(outputs.values()))  # llama-tiny: 2 kv heads
    elif section:  # the generated token lists (last two lines) are identical across backends
        tails = {b: o.strip().splitlines()[-2:] for b, o in outputs.items()}
        assert len({tuple(t) for t in tails.values()}) == 1, tails


# ---------------------------------------------------------------------- generated figures
ROOT = PAGE.parent.parent
#: Pages whose figure tables are measurements of this project (benchmarks/figures.py).
FIGURE_PAGES = ["README.md", "docs/index.md", "docs/conformance.md", "docs/benchmarks.md",
                "docs/getting-started.md", "docs/examples.md", "docs/training.md"]
#: A measured figure: a mantissa with decimals and an exponent (2.7e-14), unlike a bound (1e-11).
FIGURE = re.compile(r"\b\d\.\d+e[-+]?\d+\b")


def _tables_outside_markers(text: str) -> list[str]:
    """The first line of every markdown table with a measured figure outside
    ``<!-- figures:NAME -->`` ... ``<!-- /figures:NAME -->``."""
    bad, inside, table = [], None, []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table and inside is None and any(FIGURE.search(row) for row in table):
            bad.append(table[0])
        table = []
        m = re.match(r"<!-- (/?)figures:([\w-]+) -->$", line.strip())
        if m:
            assert (inside is None) != bool(m.group(1)), f"unbalanced marker: {line}"
            inside = None if m.group(1) else m.group(2)
    assert inside is None, f"figures:{inside} is not closed"
    return bad


@pytest.mark.parametrize("page", FIGURE_PAGES)
def test_every_figure_table_is_generated(page):
    """A table of measured figures typed by hand goes stale: each one sits between markers
    that `python benchmarks/figures.py` rewrites from a fresh measurement."""
    assert _tables_outside_markers((ROOT / page).read_text()) == []


def test_the_marker_check_catches_a_hand_typed_table():
    typed = "| a | b |\n|---|---|\n| x | 2.7e-14 |\n"
    assert _tables_outside_markers(typed) == ["| a | b |"]
    assert _tables_outside_markers(f"<!-- figures:x -->\n{typed}<!-- /figures:x -->\n") == []
    assert _tables_outside_markers("| tolerance |\n|---|\n| 1e-11 |\n") == []


def test_every_region_the_script_writes_exists_and_is_filled():
    import importlib.util

    spec = importlib.util.spec_from_file_location("figures", ROOT / "benchmarks" / "figures.py")
    figures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figures)
    for files in figures.REGIONS.values():
        for page, names in files.items():
            text = (ROOT / page).read_text()
            for name in names:
                body = re.search(figures._REGION.format(name=re.escape(name)), text, re.S)
                assert body, f"{page}: no region figures:{name}"
                assert body.group(2).strip(), f"{page}: figures:{name} is empty: run " \
                                              f"{figures.COMMAND}"
    assert "benchmarks/figures.py" in (ROOT / "README.md").read_text()
    assert "benchmarks/figures.py" in (ROOT / "docs" / "conformance.md").read_text()
