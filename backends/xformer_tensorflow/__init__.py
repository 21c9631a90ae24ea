"""xformer's TensorFlow backend: encoder, decoder and encoder-decoder as Keras 3 layers
(``modules``) and :class:`TensorFlowBackend` (``backend``), found through the
``xformer.backends`` entry point.

Importing this package does not import TensorFlow; the layers are loaded on first access
(``xformer_tensorflow.EncoderModel``), the framework in ``TensorFlowBackend()``.
"""

from .backend import TensorFlowBackend

_MODULE_NAMES = ("gelu", "gelu_tanh", "relu", "ACTIVATIONS", "Embeddings", "MultiHeadAttention",
                 "FeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
                 "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel",
                 "causal_allowed", "past_length")

__all__ = ["TensorFlowBackend", *_MODULE_NAMES]


def __getattr__(name):  # PEP 562: import keras only when a layer is asked for
    if name in _MODULE_NAMES:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
