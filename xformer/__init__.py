"""xformer: one Transformer spec, three native lowerings (PyTorch, TensorFlow/Keras 3, MXNet
Gluon), shared weights, and proof that they compute the same thing.

Quick start::

    import xformer
    spec, weights = xformer.from_pretrained("path/to/bert")      # or ModelSpec.preset("tiny")
    model = xformer.build(spec, backend="torch", weights=weights)  # a torch.nn.Module
"""

from .backend import Backend, available_backends, build, get_backend, resolve_backend_name
from .errors import BackendError, CheckpointError, InputError, SpecError, XformerError
from .spec import PRESETS, ModelSpec, ParamSpec
from .convert import from_pretrained
from .weights import (check_weights, init_weights, load_pretrained, load_weights, random_weights,
                      save_pretrained, save_weights)
from .checking import check

__version__ = "0.1.0"

__all__ = [
    "Backend", "BackendError", "CheckpointError", "check", "InputError", "ModelSpec", "PRESETS",
    "ParamSpec", "SpecError", "XformerError", "available_backends", "build", "check_weights",
    "from_pretrained", "get_backend", "init_weights", "load_pretrained", "load_weights",
    "random_weights", "resolve_backend_name", "save_pretrained", "save_weights", "__version__",
]
