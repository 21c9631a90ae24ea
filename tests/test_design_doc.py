"""docs/design.md is the design in the repository: it has its numbered sections (citations like
"design §3" name them), nothing cites the DESIGN.md that is not in the repository, and every
repository path it names in backticks exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"

#: The section headings, by number. Their numbers are cited from code and docs; never renumber.
SECTIONS = {
    1: "The pieces and the data flow",
    2: "The spec, canonical names and layout",
    3: "Numerical semantics",
    4: "Conformance",
    5: "Framework pitfalls",
    6: "Code we follow",
    7: "Speed",
    8: "The Backend boundary",
    9: "How to add a spec field",
    10: "How to add a backend",
    11: "Pitfalls: where to look",
    12: "Training",
    13: "Data-parallel training",
}
#: Top-level folders of this repository: a backticked path starting with one of them is a path
#: into the repository (others, such as einops' ``einops/_backends.py``, name other projects).
REPO_ROOTS = ("xformer", "backends", "tests", "conformance", "docs", "examples", "benchmarks",
              ".ci")
SKIP_DIRS = {".git", ".venv", "node_modules", "__pycache__", ".pytest_cache", "site",
             "build", "dist"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".yml", ".yaml", ".txt", ".cfg", ".ini", ".json",
                 ".html", ".css", ".sh", ""}


def _text() -> str:
    return DESIGN.read_text(encoding="utf-8")


def _prose(text: str) -> str:
    """The page without its fenced code blocks (diagrams are drawn, not cited)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_design_page_exists_with_numbered_sections():
    assert DESIGN.is_file(), "docs/design.md is missing"
    headings = re.findall(r"^## (\d+)\. (.+?)\s*$", _prose(_text()), flags=re.M)
    assert [(int(n), title) for n, title in headings] == list(SECTIONS.items())


def test_section_anchors_used_by_the_docs_exist():
    """Links such as ``design.md#3-numerical-semantics`` in docs/*.md point at a heading."""
    slugs = {f"{n}-" + re.sub(r"[^\w\s-]", "", title.lower()).strip().replace(" ", "-")
             for n, title in SECTIONS.items()}
    links = []
    for page in (ROOT / "docs").glob("*.md"):
        links += [(page.name, a) for a in re.findall(r"design\.md#([\w-]+)",
                                                       page.read_text(encoding="utf-8"))]
    assert links, "no page links to design.md"
    bad = [(page, a) for page, a in links if a not in slugs]
    assert not bad, f"links to missing design.md sections: {bad}; sections: {sorted(slugs)}"


def _repository_files():
    """Text files of the working tree, without .git, .venv and build output."""
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in TEXT_SUFFIXES:
                yield path.relative_to(ROOT), path


def test_nothing_cites_the_design_file_outside_the_repository():
    """The first contract, DESIGN.md, is not in the repository; citations name docs/design.md
    (in code: ``docs/design.md §3``)."""
    citing = []
    for rel, path in _repository_files():
        if path == Path(__file__).resolve():  # this file names it to look for it
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        citing += [f"{rel}:{i}" for i, line in enumerate(text.splitlines(), 1)
                   if "DESIGN.md" in line]
    assert not citing, f"{len(citing)} lines cite DESIGN.md, which is not in the repository: " \
        + ", ".join(citing)


def _named_paths(text: str) -> list[str]:
    """Backticked spans of ``text`` (outside code blocks) that are repository paths: a relative
    path with a ``/`` whose first part is a repository folder; wildcards and placeholders
    (``backends/*/modules.py``, ``tests/test_backend_<name>.py``) are skipped."""
    spans = re.findall(r"`([^`\n]+)`", _prose(text))
    paths = []
    for span in spans:
        if not re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", span) or "/" not in span:
            continue
        if span.split("/")[0] in REPO_ROOTS:
            paths.append(span)
    return paths


def test_design_names_paths_that_exist():
    paths = _named_paths(_text())
    assert len(paths) >= 20  # the page names its files; the pattern above must keep finding them
    missing = sorted({p for p in paths if not (ROOT / p).exists()})
    assert not missing, f"docs/design.md names paths that do not exist: {missing}"


@pytest.mark.parametrize("span, found", [
    ("xformer/spec.py", True), ("xformer/conformance/", True), ("einops/_backends.py", False),
    ("backends/*/modules.py", False), ("tests/test_backend_<name>.py", False),
    ("torch/eager", False),
])
def test_which_backticked_spans_count_as_repository_paths(span, found):
    text = f"A `{span}` here.\n```\ndrawn `xformer/not_cited.py`\n```\n"
    assert _named_paths(text) == ([span] if found else [])


#: The code files of the "add a spec field" checklist (docs/design.md §9), and the reference
#: adapters that say which specs they can express.
FIELD_FILES = {"xformer/spec.py", "xformer/reference.py", "xformer/convert.py",
               "backends/xformer_torch/modules.py", "backends/xformer_tensorflow/modules.py",
               "backends/xformer_mxnet/modules.py", "backends/xformer_torch/reference_nn.py",
               "backends/xformer_torch/reference_hf.py", "backends/xformer_torch/references.py"}


def _field_readers() -> dict[str, set[str]]:
    """``{spec field: code files under xformer/ and backends/ that read it}`` (an attribute
    access ``spec.FIELD`` / ``self.spec.FIELD``)."""
    import dataclasses

    from xformer.spec import ModelSpec

    code = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8")
            for folder in ("xformer", "backends") for p in (ROOT / folder).rglob("*.py")}
    readers = {}
    for field in dataclasses.fields(ModelSpec):
        pattern = re.compile(rf"\bspec\.{field.name}\b")
        readers[field.name] = {path for path, text in code.items() if pattern.search(text)}
    return readers


def test_adding_a_spec_field_touches_only_the_checklist_files():
    """Every spec field is read only by the code files that §9's checklist names, and the
    count it states ("Measured: N code files") is the most any field needs today."""
    readers = _field_readers()
    from xformer.spec import CHOICES

    numerical = [f for f in readers if f in CHOICES and f not in ("architecture", "head")]
    extra = {f: sorted(readers[f] - FIELD_FILES)
             for f in numerical}
    assert not any(extra.values()), f"fields read outside the §9 checklist: " \
        f"{ {f: p for f, p in extra.items() if p} }"
    section = _text().split("## 9.")[1].split("## 10.")[0]
    for path in FIELD_FILES:
        assert f"`{path}`" in section, f"§9 does not name {path}"
    stated = re.search(r"Measured: (\d+) code files", section)
    assert stated, "§9 states no measured file count"
    most = max(len(readers[f] | {"xformer/spec.py"}) for f in numerical)  # + where it is declared
    assert int(stated.group(1)) == most, readers
