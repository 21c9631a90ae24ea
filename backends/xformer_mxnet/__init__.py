"""xformer's Apache MXNet (Gluon) backend: the native ``HybridBlock`` classes and
:class:`MXNetBackend`.

The native classes live in :mod:`xformer_mxnet.modules` (twin of ``xformer_torch.modules`` and
``xformer_tensorflow.modules``: same class names, same order). They are loaded lazily, so
``import xformer_mxnet.backend`` (done by xformer's backend registry) does not import MXNet::

    >>> from xformer import ModelSpec
    >>> from xformer_mxnet import EncoderModel          # imports mxnet here
    >>> model = EncoderModel(ModelSpec.preset("tiny"), dtype="float64")
    >>> model.initialize()
    >>> model.hybridize(static_alloc=True, static_shape=True)

MXNet 1.9.1 still refers to ``np.bool``, which numpy >= 1.24 removed; this package restores the
alias (``np.bool = np.bool_``, only where it is missing) before anything imports ``mxnet``
(docs/design.md §5).
"""

from __future__ import annotations

import warnings

import numpy as _np

with warnings.catch_warnings():  # numpy 1.24-1.26 warn on the *lookup* of the removed alias
    warnings.simplefilter("ignore", FutureWarning)
    if not hasattr(_np, "bool"):
        _np.bool = _np.bool_

from .backend import MXNetBackend  # noqa: E402  (imports no framework)

_NATIVE = ("LayerNorm", "RMSNorm", "RotaryEmbedding", "Embeddings", "MultiHeadAttention",
           "Dropout", "FeedForward", "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler",
           "EncoderModel", "DecoderLayer", "Decoder", "LMHead", "DecoderModel",
           "EncoderDecoderModel", "gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS",
           "erf_exact_grad", "causal_allowed", "allowed_bias", "imperative", "cache_length",
           "reorder_cache", "canonical_parameters", "use_dropout_masks")

__all__ = ["MXNetBackend", *_NATIVE]


def __getattr__(name: str):  # PEP 562: import mxnet only when a native class is asked for
    if name in _NATIVE:
        from . import modules

        return getattr(modules, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
