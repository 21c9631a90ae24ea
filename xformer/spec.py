"""``ModelSpec``: the framework-neutral definition of a Transformer.

Every numerical choice lives here, never in a framework default: LayerNorm ``norm_eps``, the GELU
form (``activation``), positional encodings, embedding scale, biases. A spec is a frozen dataclass,
validated at construction, and round-trips through JSON and YAML. :meth:`ModelSpec.parameters`
is the single source of canonical parameter names, shapes and initialisers that every backend
maps to (DESIGN.md §2).

Example::

    >>> from xformer import ModelSpec
    >>> spec = ModelSpec.preset("bert-mini").replace(n_layers=2)
    >>> spec.d_head
    64
    >>> ModelSpec.from_json(spec.to_json()) == spec
    True
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from .errors import SpecError

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
SUPPORTED_ARCHITECTURES = ("encoder",)
NORM_POSITIONS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
POSITIONALS = ("sinusoidal", "learned")
HEADS = ("none", "lm", "pooler")


@dataclass(frozen=True)
class ParamSpec:
    """One canonical parameter.

    Attributes:
        name: dotted canonical name, e.g. ``encoder.layers.0.self_attn.q_proj.weight``.
        shape: canonical shape; Linear weights are ``(out_features, in_features)``.
        init: ``"normal"`` (mean 0, standard deviation ``std``), ``"zeros"`` or ``"ones"``.
        std: standard deviation for ``"normal"``; BERT's ``initializer_range`` (0.02) by default.
    """

    name: str
    shape: tuple[int, ...]
    init: str = "normal"
    std: float = 0.02


@dataclass(frozen=True)
class ModelSpec:
    """A Transformer, defined once for every backend.

    Args:
        architecture: ``"encoder"`` (BERT-like). ``"decoder"`` and ``"encoder-decoder"`` are
            reserved for the decoder work and rejected for now.
        vocab_size: number of token ids; ids must be in ``[0, vocab_size)``.
        d_model: hidden size ``D``.
        n_heads: attention heads ``H``; ``d_model % n_heads == 0`` and ``d_head = D // H``.
        d_ff: inner size of the position-wise feed-forward network.
        n_layers: number of encoder layers.
        max_len: longest sequence accepted; a longer input raises ``InputError`` (no silent
            truncation). Also the number of rows of the learned position table.
        norm_position: ``"post"`` (Vaswani 2017 §3.1, BERT: ``x = LN(x + f(x))``) or ``"pre"``
            (GPT-2, Xiong et al. 2020: ``x = x + f(LN(x))``).
        norm_eps: LayerNorm epsilon, always explicit (torch defaults to 1e-5, Keras to 1e-3,
            BERT uses 1e-12).
        activation: ``"relu"``, ``"gelu"`` (exact: ``0.5 x (1 + erf(x / sqrt 2))``, Hendrycks &
            Gimpel 2016) or ``"gelu_tanh"`` (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``).
        positional: ``"learned"`` (BERT) or ``"sinusoidal"`` (Vaswani 2017 §3.5: ``sin`` on even
            dimensions, ``cos`` on odd ones).
        type_vocab_size: number of BERT segment (token type) embeddings; 0 for none.
        embedding_norm: LayerNorm after summing embeddings (BERT).
        final_norm: LayerNorm after the last layer (pre-LN models).
        embed_scale: multiply token embeddings by ``sqrt(d_model)`` (Vaswani 2017 §3.4).
        bias: additive biases in every Linear and LayerNorm (as ``nn.TransformerEncoderLayer``'s
            and nanoGPT's ``bias`` flag).
        tie_embeddings: share the LM head's weight with the token embeddings (decoder work).
        head: ``"none"`` or ``"pooler"`` (BERT: ``tanh(W h[:, 0] + b)``); ``"lm"`` is reserved.
        dropout: dropout probability, used in training mode only; conformance runs without it.

    Raises:
        SpecError: a field has a wrong type or a value out of range; the message names the field,
            the value and what is allowed.
    """

    architecture: str = "encoder"
    vocab_size: int = 1000
    d_model: int = 64
    n_heads: int = 4
    d_ff: int = 256
    n_layers: int = 2
    max_len: int = 128
    norm_position: str = "post"
    norm_eps: float = 1e-12
    activation: str = "gelu"
    positional: str = "learned"
    type_vocab_size: int = 2
    embedding_norm: bool = True
    final_norm: bool = False
    embed_scale: bool = False
    bias: bool = True
    tie_embeddings: bool = False
    head: str = "none"
    dropout: float = 0.0

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        ints = {"vocab_size": 1, "d_model": 1, "n_heads": 1, "d_ff": 1, "n_layers": 1,
                "max_len": 1, "type_vocab_size": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"spec field {name!r} must be an integer, got {value!r}")
            if value < low:
                raise SpecError(f"spec field {name!r} must be >= {low}, got {value}")
        enums = {"architecture": ARCHITECTURES, "norm_position": NORM_POSITIONS,
                 "activation": ACTIVATIONS, "positional": POSITIONALS, "head": HEADS}
        for name, allowed in enums.items():
            value = getattr(self, name)
            if value not in allowed:
                raise SpecError(f"spec field {name!r} must be one of {', '.join(allowed)}; "
                                f"got {value!r}")
        for name in ("embedding_norm", "final_norm", "embed_scale", "bias", "tie_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise SpecError(f"spec field {name!r} must be true or false, got {value!r}")
        for name in ("norm_eps", "dropout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"spec field {name!r} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0.0 < self.norm_eps < 1.0:
            raise SpecError(f"spec field 'norm_eps' must be in (0, 1), got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"spec field 'dropout' must be in [0, 1), got {self.dropout}")
        if self.d_model % self.n_heads:
            raise SpecError(f"spec field 'd_model' ({self.d_model}) must be divisible by "
                            f"'n_heads' ({self.n_heads})")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise SpecError(f"spec field 'd_model' must be even for sinusoidal positions, "
                            f"got {self.d_model}")
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise SpecError(f"spec field 'architecture' = {self.architecture!r} is not built yet; "
                            f"this version builds: {', '.join(SUPPORTED_ARCHITECTURES)}")
        if self.head == "lm":
            raise SpecError("spec field 'head' = 'lm' is not built for encoders yet; "
                            "use 'none' or 'pooler'")
        if self.tie_embeddings and self.head != "lm":
            raise SpecError("spec field 'tie_embeddings' needs head = 'lm'; set it to false")

    # ------------------------------------------------------------------ derived
    @property
    def d_head(self) -> int:
        """Size of one attention head, ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    def replace(self, **changes: Any) -> "ModelSpec":
        """A copy with ``changes`` applied and validated (raises ``SpecError``)."""
        return self.from_dict({**self.to_dict(), **changes})

    # ------------------------------------------------------------------ parameters
    def parameters(self) -> list[ParamSpec]:
        """Canonical parameters in a fixed order: names, shapes and initialisers.

        Names follow PyTorch's dotted module paths; Linear weights are ``(out, in)``, LayerNorm
        has ``weight``/``bias``, embeddings are ``(num, d_model)``.
        """
        d, f = self.d_model, self.d_ff
        out: list[ParamSpec] = []

        def linear(prefix: str, n_out: int, n_in: int) -> None:
            out.append(ParamSpec(f"{prefix}.weight", (n_out, n_in)))
            if self.bias:
                out.append(ParamSpec(f"{prefix}.bias", (n_out,), "zeros"))

        def norm(prefix: str) -> None:
            out.append(ParamSpec(f"{prefix}.weight", (d,), "ones"))
            if self.bias:
                out.append(ParamSpec(f"{prefix}.bias", (d,), "zeros"))

        out.append(ParamSpec("embeddings.word_embeddings.weight", (self.vocab_size, d)))
        if self.positional == "learned":
            out.append(ParamSpec("embeddings.position_embeddings.weight", (self.max_len, d)))
        if self.type_vocab_size:
            out.append(ParamSpec("embeddings.token_type_embeddings.weight",
                                 (self.type_vocab_size, d)))
        if self.embedding_norm:
            norm("embeddings.norm")
        for i in range(self.n_layers):
            p = f"encoder.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
                linear(f"{p}.self_attn.{proj}", d, d)
            norm(f"{p}.norm1")
            linear(f"{p}.ffn.linear1", f, d)
            linear(f"{p}.ffn.linear2", d, f)
            norm(f"{p}.norm2")
        if self.final_norm:
            norm("encoder.final_norm")
        if self.head == "pooler":
            linear("pooler.dense", d, d)
        return out

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{canonical name: shape}`` in canonical order."""
        return {p.name: p.shape for p in self.parameters()}

    def num_parameters(self) -> int:
        """Total number of scalars in the canonical parameters."""
        return sum(math.prod(p.shape) for p in self.parameters())

    def output_names(self) -> tuple[str, ...]:
        """Names of the model outputs: ``last_hidden_state`` ``(B, T, D)``, and
        ``pooler_output`` ``(B, D)`` when ``head == "pooler"``."""
        return ("last_hidden_state", "pooler_output") if self.head == "pooler" else (
            "last_hidden_state",)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """Every field, in declaration order (JSON-compatible)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        """Build from a mapping whose keys are field names; omitted fields take the defaults.

        Raises:
            SpecError: not a mapping, an unknown key (with the closest field name), or a bad
                value.
        """
        if not isinstance(data, Mapping):
            raise SpecError(f"a spec must be a mapping of field names to values, "
                            f"got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in data if k not in names]
        if unknown:
            key = unknown[0]
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(names)}"
            raise SpecError(f"unknown spec field {key!r}{hint}")
        return cls(**dict(data))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"spec is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ModelSpec":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SpecError(f"spec is not valid YAML: {str(e).splitlines()[0]}") from None
        return cls.from_dict(data if data is not None else {})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelSpec":
        """Read a ``.json``, ``.yaml`` or ``.yml`` spec file, or a preset name.

        Raises:
            SpecError: the file is missing or malformed.
        """
        p = Path(path)
        if not p.exists():
            if str(path) in PRESETS:
                return cls.preset(str(path))
            raise SpecError(f"spec file {str(path)!r} does not exist (give a .json/.yaml file "
                            f"or a preset: {', '.join(PRESETS)})")
        text = p.read_text()
        if p.suffix.lower() == ".json":
            return cls.from_json(text)
        return cls.from_yaml(text)  # YAML is a superset of JSON

    def save(self, path: str | os.PathLike) -> None:
        """Write JSON (``.json``) or YAML (otherwise), atomically."""
        p = Path(path)
        text = self.to_json() + "\n" if p.suffix.lower() == ".json" else self.to_yaml()
        atomic_write_bytes(p, text.encode())

    # ------------------------------------------------------------------ presets
    @classmethod
    def preset(cls, name: str) -> "ModelSpec":
        """A named spec: ``xformer.spec.PRESETS`` lists them with their sources.

        Raises:
            SpecError: unknown preset name.
        """
        if name not in PRESETS:
            raise SpecError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and
    ``os.replace``, so a reader never sees a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_BERT = dict(architecture="encoder", vocab_size=30522, max_len=512, norm_position="post",
             norm_eps=1e-12, activation="gelu", positional="learned", type_vocab_size=2,
             embedding_norm=True, final_norm=False, embed_scale=False, bias=True, head="pooler")

#: Named specs. BERT sizes from Devlin et al. 2019 and Turc et al. 2019 ("Well-read students");
#: MiniLM-L6-H384 from sentence-transformers/all-MiniLM-L6-v2's config.json; the pre-LN encoder
#: follows Xiong et al. 2020; ``tiny`` is the built-in spec of ``xformer compare``.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1000, d_model=64, n_heads=4, d_ff=256, n_layers=2, max_len=64,
                 norm_eps=1e-12, head="pooler"),
    "bert-tiny": {**_BERT, "d_model": 128, "n_heads": 2, "d_ff": 512, "n_layers": 2},
    "bert-mini": {**_BERT, "d_model": 256, "n_heads": 4, "d_ff": 1024, "n_layers": 4},
    "bert-small": {**_BERT, "d_model": 512, "n_heads": 8, "d_ff": 2048, "n_layers": 4},
    "bert-base": {**_BERT, "d_model": 768, "n_heads": 12, "d_ff": 3072, "n_layers": 12},
    "minilm-l6": {**_BERT, "d_model": 384, "n_heads": 12, "d_ff": 1536, "n_layers": 6},
    "vaswani-base-encoder": dict(vocab_size=37000, d_model=512, n_heads=8, d_ff=2048,
                                 n_layers=6, max_len=512, norm_position="post", norm_eps=1e-5,
                                 activation="relu", positional="sinusoidal", type_vocab_size=0,
                                 embedding_norm=False, final_norm=False, embed_scale=True,
                                 head="none"),
    "pre-ln-encoder-small": dict(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_layers=4,
                                 max_len=256, norm_position="pre", norm_eps=1e-5,
                                 activation="gelu_tanh", positional="learned", type_vocab_size=0,
                                 embedding_norm=False, final_norm=True, head="none"),
}


def sinusoidal_table(max_len: int, d_model: int):
    """The fixed positional encodings of Vaswani et al. 2017 §3.5, as a float64 numpy array.

    ``PE[pos, 2i] = sin(pos / 10000^(2i / d_model))``, ``PE[pos, 2i + 1] = cos(...)``, shape
    ``(max_len, d_model)``. Every backend takes this table (cast to its compute dtype) rather than
    computing its own, so the constant is bit-identical everywhere.
    """
    import numpy as np

    pos = np.arange(max_len, dtype=np.float64)[:, None]
    two_i = np.arange(0, d_model, 2, dtype=np.float64)[None, :]
    angle = pos / np.power(10000.0, two_i / d_model)
    table = np.empty((max_len, d_model), dtype=np.float64)
    table[:, 0::2] = np.sin(angle)
    table[:, 1::2] = np.cos(angle)
    return table
