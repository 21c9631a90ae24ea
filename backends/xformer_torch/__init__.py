"""xformer's PyTorch backend: native ``torch.nn`` modules (:mod:`xformer_torch.modules`) and
:class:`TorchBackend`.

``import xformer_torch`` does not import torch; the module classes (``EncoderModel``,
``DecoderModel``, ``EncoderDecoderModel``, ...) and :func:`nn_transformer_reference` load it on
first access.
"""

from __future__ import annotations

from .backend import TorchBackend

_MODULES = ("gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS", "LayerNorm", "RMSNorm",
            "RotaryEmbedding", "Embeddings", "MultiHeadAttention", "Dropout", "FeedForward",
            "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel",
            "DecoderLayer", "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel",
            "causal_allowed", "allowed_bias", "use_dropout_masks")

__all__ = ["TorchBackend", "nn_transformer_reference", *_MODULES]


def __getattr__(name: str):  # PEP 562: import torch only when a module class is asked for
    if name in _MODULES:
        from . import modules

        return getattr(modules, name)
    if name == "nn_transformer_reference":
        from .reference_nn import nn_transformer_reference

        return nn_transformer_reference
    raise AttributeError(f"module 'xformer_torch' has no attribute {name!r}")
