"""`xformer show`: every node class, the three implementations side by side, straight from the
installed source."""

import pytest

from xformer.cli import main
from xformer.show import class_source, node_classes, sources

CLASSES = node_classes("torch")


def test_the_three_backends_define_the_same_node_classes_in_the_same_order():
    assert CLASSES[:11] == ["LayerNorm", "RMSNorm", "RotaryEmbedding", "Embeddings",
                            "MultiHeadAttention", "Dropout", "FeedForward", "GatedFeedForward",
                            "EncoderLayer", "Encoder", "Pooler"]
    for backend in ("tensorflow", "mxnet"):
        theirs = [c for c in node_classes(backend) if c in CLASSES]
        assert theirs == CLASSES, backend


@pytest.mark.parametrize("name", CLASSES)
def test_show_prints_every_implementation(name, capsys):
    assert main(["show", name]) == 0
    out = capsys.readouterr().out
    found = sources(name)
    assert set(found) == {"torch", "tensorflow", "mxnet"}
    for backend, (src, line) in found.items():
        assert src.lstrip().startswith(("class", "@"))
        assert f"modules.py:{line}" in out
    assert out.count(f"class {name}") == 3


def test_source_is_the_file_on_disk():
    src, line = class_source("torch", "FeedForward")
    import xformer_torch.modules as m
    from pathlib import Path

    lines = Path(m.__file__).read_text().splitlines()
    assert lines[line - 1].startswith("class FeedForward")
    assert src.splitlines()[-1] == lines[line - 1 + len(src.splitlines()) - 1]


def test_unknown_class_is_a_one_line_error(capsys):
    assert main(["show", "Transformer"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no node class 'Transformer'" in err[0] and "FeedForward" in err[0]


@pytest.mark.parametrize("columns", [80, 100, 300])
def test_show_honours_columns(columns, capsys, monkeypatch):
    """Piped output takes $COLUMNS (rich's rule); panels sit side by side only when each gets
    SHOW_COLUMN_WIDTH columns, else one under the other."""
    from xformer.cli import SHOW_COLUMN_WIDTH

    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["show", "FeedForward"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines) <= columns
    titles_on_one_line = max(line.count("modules.py:") for line in lines)
    assert titles_on_one_line == (3 if columns >= 3 * SHOW_COLUMN_WIDTH else 1)
