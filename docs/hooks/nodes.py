"""mkdocs hook: one page per node class, generated at build time from the installed backends'
``modules.py`` (``xformer.show``, which parses the source with ``ast`` and imports no
framework), so the pages show exactly the code that runs and never go stale.

* ``on_config`` fills the ``Nodes`` section of the nav: ``nodes/index.md`` then one page per
  class of ``xformer_torch/modules.py``, in file order (the same order in all three backends).
* ``on_files`` adds those pages as generated (virtual) files: a one-line intro (the first
  paragraph of the PyTorch class's docstring), then the three implementations in content tabs
  labelled as on the examples page, so a reader's choice of framework carries across pages.
"""

from __future__ import annotations

import ast
import re

from mkdocs.structure.files import File

from xformer.show import PACKAGES, class_source, modules_file, node_classes, sources

#: Tab labels, in tab order (the same labels as docs/examples.md, so linked tabs sync).
TABS = {"torch": "PyTorch", "tensorflow": "TensorFlow (Keras 3)", "mxnet": "MXNet (Gluon)"}
SECTION = "Nodes"
FOLDER = "nodes"


def _classes() -> list[str]:
    return node_classes("torch")


def on_config(config):
    """Replace the ``Nodes`` nav section with the index and one entry per node class."""
    pages = [{"Overview": f"{FOLDER}/index.md"}] + [{name: f"{FOLDER}/{name}.md"}
                                                    for name in _classes()]
    nav = config.get("nav") or []
    for i, item in enumerate(nav):
        if isinstance(item, dict) and SECTION in item:
            nav[i] = {SECTION: pages}
            break
    else:
        nav.append({SECTION: pages})
    config["nav"] = nav
    return config


def intro(name: str, classes: list[str] | None = None) -> str:
    """The first paragraph of the PyTorch class's docstring, as Markdown (RST roles turned into
    code spans, and into links for the other node classes)."""
    classes = classes if classes is not None else _classes()
    src, _ = class_source("torch", name)
    node = ast.parse(src).body[0]
    doc = ast.get_docstring(node) or ""
    text = " ".join(doc.split("\n\n")[0].split())

    def role(m: re.Match) -> str:
        target = m.group(1).lstrip("~").split(".")[-1]
        plural = "s" if m.group(2) else ""
        if target in classes and target != name:
            return f"[{target}{plural}]({target}.md)"
        return f"`{target}`{plural}"

    text = re.sub(r":(?:class|func|meth|attr):`([^`]+)`( s\b)?", role, text)
    return text.replace("``", "`")


def _fence(code: str) -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", code)), default=0)
    return "`" * max(3, longest + 1)


def page(name: str, classes: list[str]) -> str:
    """The Markdown of one node page."""
    found = sources(name)
    lines = [f"# {name}", "", intro(name, classes), "",
             f"The three implementations below are read from the installed backend packages "
             f"when this site is built. `xformer show {name}` prints them side by side; each "
             f"`modules.py` defines the same classes in the same order, so they diff line by "
             f"line.", ""]
    for be, label in TABS.items():
        lines.append(f'=== "{label}"')
        lines.append("")
        if be not in found:
            lines += [f'    !!! warning "{PACKAGES[be]} is not installed"',
                      "",
                      f"        Install it (`pip install 'xformer[{be}]'`) and rebuild the site "
                      f"to see this implementation.", ""]
            continue
        src, first = found[be]
        fence = _fence(src)
        path = f"{PACKAGES[be]}/{modules_file(be).name}"
        lines.append(f'    {fence}python title="{path}" linenums="{first}"')
        lines += [("    " + line) if line.strip() else "" for line in src.splitlines()]
        lines += [f"    {fence}", ""]
    return "\n".join(lines)


def index_page(classes: list[str]) -> str:
    cells = {n: intro(n, classes).replace("|", "\\|") for n in classes}  # no | in a table cell
    rows = "\n".join(f"| [{n}]({n}.md) | {cells[n]} |" for n in classes)
    return (f"# Nodes\n\nThe native classes every backend defines, in the order of their "
            f"`modules.py` (the same in PyTorch, Keras 3 and Gluon). Each page shows the three "
            f"implementations of one class in framework tabs, generated from the installed "
            f"source when this site is built.\n\n| class | what it computes |\n|---|---|\n"
            f"{rows}\n")


def on_files(files, config):
    classes = _classes()
    files.append(File.generated(config, f"{FOLDER}/index.md", content=index_page(classes)))
    for name in classes:
        files.append(File.generated(config, f"{FOLDER}/{name}.md", content=page(name, classes)))
    return files
