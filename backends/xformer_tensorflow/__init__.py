"""xformer's TensorFlow backend: encoder, decoder and encoder-decoder as Keras 3 layers
(``modules``) and :class:`TensorFlowBackend` (``backend``), found through the
``xformer.backends`` entry point.

Importing this package does not import TensorFlow; the layers are loaded on first access
(``xformer_tensorflow.EncoderModel``), the framework in ``TensorFlowBackend()``, through
:func:`import_tensorflow`, which makes TensorFlow's C++ start-up log honour
``TF_CPP_MIN_LOG_LEVEL`` (the ``xformer`` command sets it to 3 unless it is set).
"""

import contextlib
import os
import re
import sys
import tempfile

from .backend import TensorFlowBackend

_MODULE_NAMES = ("gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS", "LayerNorm", "RMSNorm",
                 "RotaryEmbedding", "Embeddings", "MultiHeadAttention", "Dropout", "FeedForward",
                 "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
                 "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel",
                 "causal_allowed", "allowed_bias", "past_length", "use_dropout_masks")

__all__ = ["TensorFlowBackend", "import_tensorflow", *_MODULE_NAMES]


def __getattr__(name):  # PEP 562: import keras only when a layer is asked for
    if name in _MODULE_NAMES:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: One line of absl's C++ log (``I0000 00:00:1796042829.59 6487 port.cc:153] ...``), severity
#: first (before ``absl::InitializeLog()`` the seconds are since the epoch).
_ABSL_LINE = re.compile(r"^([IWEF])\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] ")
_ABSL_BANNER = "WARNING: All log messages before absl::InitializeLog() is called are written to"


def import_tensorflow():
    """``import tensorflow``, its C++ start-up log filtered by ``TF_CPP_MIN_LOG_LEVEL``.

    TensorFlow 2.18+ logs through absl before anything reads ``TF_CPP_MIN_LOG_LEVEL``, so
    ``I... port.cc:153] oneDNN custom operations are on ...`` is printed twice on every import
    whatever the variable says. With a level of 1 or more, stderr (file descriptor 2) is captured
    for the import and written back without the absl lines below that level (0 INFO, 1 WARNING,
    2 ERROR, 3 FATAL) and without absl's ``before absl::InitializeLog()`` banner; everything else
    (Python warnings, other libraries) is kept. Level 0 or unset: a plain import.

    Returns:
        the ``tensorflow`` module.
    """
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL") or 0)
    except ValueError:
        level = 0
    with (_filtered_stderr(level) if level > 0 else contextlib.nullcontext()):
        import tensorflow
    return tensorflow


@contextlib.contextmanager
def _filtered_stderr(level: int):
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2: nothing to filter
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept = []
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                m = _ABSL_LINE.match(line)
                if line.startswith(_ABSL_BANNER) or (m and "IWEF".index(m.group(1)) < level):
                    continue
                kept.append(line)
            if kept:
                os.write(2, "".join(kept).encode())
