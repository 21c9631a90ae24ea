"""``ModelSpec``: the framework-neutral definition of a Transformer.

Every numerical choice lives here, never in a framework default: LayerNorm ``norm_eps``, the GELU
form (``activation``), positional encodings, embedding scale, biases. A spec is a frozen dataclass,
validated at construction, and round-trips through JSON and YAML. :meth:`ModelSpec.parameters`
is the single source of canonical parameter names, shapes and initialisers that every backend
maps to (docs/design.md §2).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import SpecError, truncate
from .resources import DEFAULT_LIMIT, read_capped

ARCHITECTURES = ("encoder", "decoder", "encoder-decoder")
NORM_POSITIONS = ("post", "pre")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
POSITIONALS = ("learned", "sinusoidal", "rope")
NORMS = ("layernorm", "rmsnorm")
FFNS = ("mlp", "glu")
ROPE_STYLES = ("half", "interleaved")
ROPE_SCALINGS = ("none", "llama3")
HEADS = ("pooler", "lm", "none")
BOOLEAN = (True, False)
#: The numbers of ``rope_scaling="llama3"``, in Hugging Face's order.
LLAMA3_ROPE_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                      "rope_original_max_len")
#: A bias switch that defaults to ``bias`` (``None``) or overrides it.
OPTIONAL_BOOLEAN = (None, True, False)
#: ``norm_scale_offset``: ``0.0`` (``y * weight``) or ``1.0`` (Gemma: ``y * (1 + weight)``).
NORM_SCALE_OFFSETS = (0.0, 1.0)

#: Bounds that keep every size computation finite and every message short: each size field
#: (``vocab_size``, ``d_model``, ``n_heads``, ``d_ff``, ``max_len``, ``type_vocab_size``) is at
#: most ``MAX_SIZE`` (int32), a stack at most ``MAX_LAYERS`` layers, and the model at most
#: ``MAX_PARAMETERS`` scalars (4 TiB in float32). Whether a smaller model fits in memory is
#: :func:`xformer.resources.check_memory`'s question.
MAX_SIZE = 2**31 - 1
MAX_LAYERS = 10_000
MAX_PARAMETERS = 2**40
#: A YAML spec may expand (aliases followed) to at most this many nodes (a real spec has ~25).
YAML_MAX_NODES = 10_000

#: The allowed values of every categorical field, declared once: validation checks them, and
#: conformance covers every value of every field (:func:`choices`,
#: :func:`xformer.conformance.covering_specs`). A new value added here is a new case there.
CHOICES: dict[str, tuple] = {
    "architecture": ARCHITECTURES, "norm": NORMS, "norm_position": NORM_POSITIONS,
    "norm_scale_offset": NORM_SCALE_OFFSETS, "activation": ACTIVATIONS, "ffn": FFNS,
    "positional": POSITIONALS, "rope_style": ROPE_STYLES, "rope_scaling": ROPE_SCALINGS,
    "embedding_norm": BOOLEAN,
    "final_norm": BOOLEAN, "embed_scale": BOOLEAN, "bias": BOOLEAN,
    "qkv_bias": OPTIONAL_BOOLEAN, "out_proj_bias": OPTIONAL_BOOLEAN,
    "mlp_bias": OPTIONAL_BOOLEAN, "parallel_residual": BOOLEAN, "tie_embeddings": BOOLEAN,
    "share_embeddings": BOOLEAN, "head": HEADS,
}

#: Fields whose other values need another field's value: ``rope_style`` (and the numeric
#: ``rope_theta``, ``rotary_fraction``) only with ``positional="rope"``; ``tie_embeddings`` only
#: with ``head="lm"``; ``parallel_residual`` only pre-LN. Coverage cycles them over the specs
#: where they apply.
CONDITIONAL: dict[str, tuple[str, Any]] = {
    "rope_style": ("positional", "rope"), "rope_scaling": ("positional", "rope"),
    "tie_embeddings": ("head", "lm"),
    "parallel_residual": ("norm_position", "pre"),
}

#: The heads each architecture takes.
ARCHITECTURE_HEADS: dict[str, tuple[str, ...]] = {
    "encoder": ("pooler", "none"), "decoder": ("lm", "none"), "encoder-decoder": ("lm", "none"),
}


def choices(architecture: str) -> dict[str, tuple]:
    """The values each categorical field (:data:`CHOICES`, ``architecture`` left out) can take
    in a valid spec of ``architecture``: its heads (:data:`ARCHITECTURE_HEADS`),
    ``tie_embeddings`` only where a head is ``"lm"``, ``share_embeddings`` only in an
    encoder-decoder and ``parallel_residual`` only outside one (``(False,)`` otherwise)."""
    heads = ARCHITECTURE_HEADS[architecture]
    narrowed = {"head": heads,
                "tie_embeddings": BOOLEAN if "lm" in heads else (False,),
                "share_embeddings": BOOLEAN if architecture == "encoder-decoder" else (False,),
                "parallel_residual": BOOLEAN if architecture != "encoder-decoder" else (False,)}
    return {k: narrowed.get(k, v) for k, v in CHOICES.items() if k != "architecture"}


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
        architecture: ``"encoder"`` (BERT-like, bidirectional), ``"decoder"`` (GPT-like: causal
            self-attention) or ``"encoder-decoder"`` (Vaswani 2017: encoder stack, decoder stack
            with causal self-attention and cross-attention over the encoder output).
        vocab_size: number of token ids; ids must be in ``[0, vocab_size)``.
        d_model: hidden size ``D``.
        n_heads: attention (query) heads ``H``; ``d_model % n_heads == 0`` unless ``head_dim``
            is given; ``d_head = head_dim or D // H``.
        n_kv_heads: key/value heads ``H_kv`` of grouped-query attention (Ainslie et al. 2023;
            ``1`` = multi-query, Shazeer 2019); ``None`` = ``n_heads`` (multi-head). ``n_heads``
            must be a multiple; query head ``h`` reads key/value head ``h // (H / H_kv)``
            (Hugging Face ``repeat_kv``). ``k_proj``/``v_proj`` are ``(H_kv d_head, D)`` and
            a decoding cache holds ``H_kv`` heads.
        head_dim: size of one head when it is not ``d_model // n_heads`` (Gemma-7B: 16 heads of
            256 on ``d_model`` 3072); ``q_proj`` is then ``(H head_dim, D)`` and ``out_proj``
            ``(D, H head_dim)``. ``None`` = ``d_model // n_heads``.
        d_ff: inner size of the position-wise feed-forward network.
        n_layers: number of layers of the encoder (``encoder``, ``encoder-decoder``) or of the
            decoder (``decoder``).
        n_decoder_layers: decoder layers of an ``encoder-decoder``; ``None`` = ``n_layers``.
            Must be ``None`` for the other architectures.
        max_len: longest sequence accepted; a longer input raises ``InputError`` (no silent
            truncation). Also the number of rows of the learned position table.
        norm: ``"layernorm"`` (Ba et al. 2016: ``(x - mean) / sqrt(var + eps) * w + b``) or
            ``"rmsnorm"`` (Zhang & Sennrich 2019: ``x / sqrt(mean(x^2) + eps) * w``, no bias
            and no centring; Llama, Mistral, Qwen2, Gemma); every norm of the model (embedding,
            layer and final norms) is of this kind.
        norm_position: ``"post"`` (Vaswani 2017 §3.1, BERT: ``x = LN(x + f(x))``) or ``"pre"``
            (GPT-2, Xiong et al. 2020: ``x = x + f(LN(x))``).
        norm_eps: LayerNorm epsilon, always explicit (torch defaults to 1e-5, Keras to 1e-3,
            BERT uses 1e-12).
        norm_scale_offset: ``0.0`` (the norm multiplies by its ``weight``) or ``1.0`` (Gemma:
            by ``1 + weight``; the stored weight is then initialised to zeros, and Hugging Face
            ``GemmaRMSNorm`` adds the 1 at run time).
        activation: ``"relu"``, ``"gelu"`` (exact: ``0.5 x (1 + erf(x / sqrt 2))``, Hendrycks &
            Gimpel 2016), ``"gelu_tanh"`` (``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``)
            or ``"silu"`` (``x sigmoid(x)``, Elfwing et al. 2018; Hugging Face ``"silu"``).
        ffn: ``"mlp"`` (Vaswani 2017 §3.3: ``linear2(act(linear1(x)))``) or ``"glu"`` (Shazeer
            2020: ``down_proj(act(gate_proj(x)) * up_proj(x))``; SwiGLU with ``"silu"``, GeGLU
            with ``"gelu_tanh"``, as Llama's and Gemma's ``mlp``).
        positional: ``"learned"`` (BERT), ``"sinusoidal"`` (Vaswani 2017 §3.5: ``sin`` on even
            dimensions, ``cos`` on odd ones) or ``"rope"`` (rotary embeddings, Su et al. 2021:
            no position table; the queries and keys of self-attention are rotated by their
            absolute position, so cached decoding continues at ``past_length``; cross-attention
            is not rotated).
        rope_theta: the rotary base ``theta``: pair ``i`` of a head turns by ``p * theta^(-2i /
            rotary_dim)`` at position ``p`` (Llama 2: 1e4, Llama 3: 5e5, Qwen2: 1e6).
            ``positional="rope"`` only.
        rope_style: which dimensions form a rotating pair: ``"half"`` (``i`` with ``i +
            rotary_dim / 2``: GPT-NeoX, Hugging Face Llama's ``rotate_half``) or
            ``"interleaved"`` (``2i`` with ``2i + 1``: Su et al. 2021, GPT-J's
            ``rotate_every_two``, Meta's original Llama code). ``positional="rope"`` only.
        rotary_fraction: the fraction of each head that rotates: the first ``rotary_dim =
            int(d_head * rotary_fraction)`` dimensions (even, >= 2), the rest pass through
            (GPT-NeoX ``rotary_pct``; Pythia 0.25). ``positional="rope"`` only.
        rope_scaling: ``"none"`` or ``"llama3"``: Llama 3.1's long-context frequency scaling
            (Hugging Face ``_compute_llama3_parameters``): with ``L = rope_original_max_len``,
            a pair whose wavelength ``2 pi / f`` exceeds ``L / rope_low_freq_factor`` turns at
            ``f / rope_scaling_factor``, one shorter than ``L / rope_high_freq_factor`` at
            ``f``, and one in between at ``(1 - s) f / factor + s f`` with ``s = (L / wavelength
            - low) / (high - low)``. ``positional="rope"`` only.
        rope_scaling_factor, rope_low_freq_factor, rope_high_freq_factor, rope_original_max_len:
            the four numbers of ``rope_scaling="llama3"`` (``factor``, ``low_freq_factor``,
            ``high_freq_factor``, ``original_max_position_embeddings``; Llama 3.2: 32, 1, 4,
            8192); they keep their defaults otherwise.
        type_vocab_size: number of BERT segment (token type) embeddings; 0 for none; encoders
            only.
        embedding_norm: LayerNorm after summing embeddings (BERT).
        final_norm: LayerNorm after the last layer (pre-LN models).
        embed_scale: multiply token embeddings by ``sqrt(d_model)`` (Vaswani 2017 §3.4).
        bias: additive biases in every Linear and LayerNorm (as ``nn.TransformerEncoderLayer``'s
            and nanoGPT's ``bias`` flag); the default of the three switches below. RMSNorm
            never has a bias.
        qkv_bias: biases of ``q_proj``, ``k_proj``, ``v_proj`` (Qwen2: true with ``bias``
            false); ``None`` = ``bias``.
        out_proj_bias: bias of the attention output projection; ``None`` = ``bias``.
        mlp_bias: biases of the feed-forward projections (``linear1``/``linear2`` or
            ``gate_proj``/``up_proj``/``down_proj``); ``None`` = ``bias``.
        parallel_residual: ``x + attn(norm1(x)) + ffn(norm2(x))`` in one step (GPT-J,
            GPT-NeoX ``use_parallel_residual``) instead of two sequential sub-layers; pre-LN
            encoders and decoders only.
        tie_embeddings: the LM head's weight *is* the (target-side) token embedding table
            (GPT-2; Vaswani 2017 §3.4); needs ``head="lm"``.
        share_embeddings: ``encoder-decoder`` only: source and target share one token
            embedding table (Vaswani 2017 §3.4, a shared source-target vocabulary).
        head: ``"none"``; ``"pooler"`` (encoders; BERT: ``tanh(W h[:, 0] + b)``); ``"lm"``
            (decoders and encoder-decoders: ``logits = h W^T``, ``W`` ``(vocab_size, D)``,
            no bias, as GPT-2's ``lm_head``).
        bos_token_id: first token of generation: the decoder start token of an
            encoder-decoder; ``None`` if unknown.
        eos_token_id: end-of-sequence token that stops generation; ``None`` for none.
        dropout: dropout probability at every site (the embeddings' output, the attention
            probabilities, the FFN's hidden activation, each residual branch), training mode
            only: forward and gradient conformance runs without it; training conformance draws
            the masks from one framework-neutral stream (:func:`xformer.training.dropout_masks`,
            docs/training.md).

    Raises:
        SpecError: a field has a wrong type or a value out of range; the message names the field,
            the value (cut to 80 characters, :func:`xformer.errors.truncate`) and what is
            allowed. Sizes are bounded (:data:`MAX_SIZE`, :data:`MAX_LAYERS`,
            :data:`MAX_PARAMETERS`) so that no size computation overflows.
    """

    architecture: str = "encoder"
    vocab_size: int = 1000
    d_model: int = 64
    n_heads: int = 4
    n_kv_heads: int | None = None
    head_dim: int | None = None
    d_ff: int = 256
    n_layers: int = 2
    n_decoder_layers: int | None = None
    max_len: int = 128
    norm: str = "layernorm"
    norm_position: str = "post"
    norm_eps: float = 1e-12
    norm_scale_offset: float = 0.0
    activation: str = "gelu"
    ffn: str = "mlp"
    positional: str = "learned"
    rope_theta: float = 10000.0
    rope_style: str = "half"
    rotary_fraction: float = 1.0
    rope_scaling: str = "none"
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    type_vocab_size: int = 0
    embedding_norm: bool = True
    final_norm: bool = False
    embed_scale: bool = False
    bias: bool = True
    qkv_bias: bool | None = None
    out_proj_bias: bool | None = None
    mlp_bias: bool | None = None
    parallel_residual: bool = False
    tie_embeddings: bool = False
    share_embeddings: bool = False
    head: str = "none"
    dropout: float = 0.0
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        ints = {"vocab_size": 1, "d_model": 1, "n_heads": 1, "d_ff": 1, "n_layers": 1,
                "max_len": 1, "type_vocab_size": 0, "rope_original_max_len": 1}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"spec field {name!r} must be an integer, got {truncate(value)}")
            high = MAX_LAYERS if name == "n_layers" else MAX_SIZE
            if value < low:
                raise SpecError(f"spec field {name!r} must be >= {low}, got {truncate(value)}")
            if value > high:
                raise SpecError(f"spec field {name!r} must be <= {high}, got {truncate(value)}")
        for name, high in (("n_kv_heads", None), ("head_dim", None),
                           ("n_decoder_layers", None), ("bos_token_id", self.vocab_size),
                           ("eos_token_id", self.vocab_size)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise SpecError(f"spec field {name!r} must be an integer or null, "
                                f"got {truncate(value)}")
            low = 1 if high is None else 0
            top = MAX_LAYERS if name == "n_decoder_layers" else MAX_SIZE
            if value < low or (high is None and value > top) or (
                    high is not None and value >= high):
                allowed = (f">= {low}" if value < low else f"<= {top}") if (
                    high is None) else f"in [0, vocab_size={high})"
                raise SpecError(f"spec field {name!r} must be {allowed}, got {truncate(value)}")
        for name in ("norm_eps", "dropout", "norm_scale_offset", "rope_theta",
                     "rotary_fraction", "rope_scaling_factor", "rope_low_freq_factor",
                     "rope_high_freq_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise SpecError(f"spec field {name!r} must be a number, got {truncate(value)}")
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:
                raise SpecError(f"spec field {name!r} must be a number in range, "
                                f"got {truncate(value)}") from None
            if not math.isfinite(getattr(self, name)):
                raise SpecError(f"spec field {name!r} must be finite, got {truncate(value)}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if allowed is BOOLEAN or allowed is OPTIONAL_BOOLEAN:
                if not (isinstance(value, bool) or (value is None and allowed is not BOOLEAN)):
                    nullable = " or null (= bias)" if allowed is OPTIONAL_BOOLEAN else ""
                    raise SpecError(f"spec field {name!r} must be true or false{nullable}, "
                                    f"got {truncate(value)}")
            elif allowed is NORM_SCALE_OFFSETS:
                if value not in allowed:
                    raise SpecError(f"spec field {name!r} must be 0 (norm * weight) or 1 "
                                    f"(Gemma: norm * (1 + weight)), got {truncate(value)}")
            elif not isinstance(value, str) or value not in allowed:
                raise SpecError(f"spec field {name!r} must be one of {', '.join(allowed)}; "
                                f"got {truncate(value)}")
        if not 0.0 < self.norm_eps < 1.0:
            raise SpecError(f"spec field 'norm_eps' must be in (0, 1), got {self.norm_eps}")
        if not 0.0 <= self.dropout < 1.0:
            raise SpecError(f"spec field 'dropout' must be in [0, 1), got {self.dropout}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise SpecError(f"spec field 'd_model' ({self.d_model}) must be divisible by "
                            f"'n_heads' ({self.n_heads}), or give 'head_dim'")
        if self.n_kv_heads is not None and (self.n_kv_heads > self.n_heads
                                            or self.n_heads % self.n_kv_heads):
            raise SpecError(f"spec field 'n_kv_heads' ({self.n_kv_heads}) must divide "
                            f"'n_heads' ({self.n_heads}): each key/value head serves the same "
                            f"number of query heads")
        if self.positional == "rope":
            if self.rope_theta <= 1.0:
                raise SpecError(f"spec field 'rope_theta' must be > 1, got {self.rope_theta}")
            if not 0.0 < self.rotary_fraction <= 1.0:
                raise SpecError(f"spec field 'rotary_fraction' must be in (0, 1], got "
                                f"{self.rotary_fraction}")
            if self.rotary_dim < 2 or self.rotary_dim % 2:
                raise SpecError(f"spec fields 'rotary_fraction' ({self.rotary_fraction}) and "
                                f"head size ({self.d_head}) give rotary_dim = "
                                f"int(d_head * rotary_fraction) = {self.rotary_dim}; it must be "
                                f"even and >= 2")
            if self.rope_scaling == "llama3" and not (
                    self.rope_scaling_factor >= 1.0
                    and 0.0 < self.rope_low_freq_factor < self.rope_high_freq_factor):
                raise SpecError(f"spec fields of rope_scaling 'llama3' must have "
                                f"rope_scaling_factor >= 1 and 0 < rope_low_freq_factor < "
                                f"rope_high_freq_factor, got {self.rope_scaling_factor}, "
                                f"{self.rope_low_freq_factor}, {self.rope_high_freq_factor}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        if self.positional != "rope":
            for name in ("rope_theta", "rope_style", "rotary_fraction", "rope_scaling"):
                if getattr(self, name) != defaults[name]:
                    raise SpecError(f"spec field {name!r} is for positional = 'rope' (this "
                                    f"spec has {self.positional!r}); remove it or set "
                                    f"positional: rope")
        if self.rope_scaling != "llama3":
            for name in LLAMA3_ROPE_FIELDS:
                if getattr(self, name) != defaults[name]:
                    raise SpecError(f"spec field {name!r} is for rope_scaling = 'llama3' (this "
                                    f"spec has {self.rope_scaling!r}); remove it or set "
                                    f"rope_scaling: llama3")
        if self.parallel_residual and self.norm_position != "pre":
            raise SpecError("spec field 'parallel_residual' needs norm_position = 'pre' "
                            "(GPT-J, GPT-NeoX: x + attn(norm1(x)) + ffn(norm2(x)))")
        if self.positional == "sinusoidal" and self.d_model % 2:
            raise SpecError(f"spec field 'd_model' must be even for sinusoidal positions, "
                            f"got {self.d_model}")
        arch = self.architecture
        heads = ARCHITECTURE_HEADS[arch]
        if self.head not in heads:
            users = " and ".join(f"{a}s" for a, h in ARCHITECTURE_HEADS.items() if self.head in h)
            raise SpecError(f"spec field 'head' = {truncate(self.head)} is for {users}; "
                            f"{'an' if arch[0] in 'aeiou' else 'a'} {arch} takes "
                            f"{' or '.join(repr(h) for h in heads)}")
        if arch != "encoder" and self.type_vocab_size:
            raise SpecError(f"spec field 'type_vocab_size' must be 0 for a {arch} (segment "
                            f"embeddings are for encoders), got {self.type_vocab_size}")
        if arch != "encoder-decoder" and self.n_decoder_layers is not None:
            raise SpecError(f"spec field 'n_decoder_layers' is for encoder-decoders; a {arch} "
                            f"uses n_layers (set n_decoder_layers to null)")
        if arch != "encoder-decoder" and self.share_embeddings:
            raise SpecError("spec field 'share_embeddings' is for encoder-decoders; set it to "
                            "false")
        if arch == "encoder-decoder" and self.parallel_residual:
            raise SpecError("spec field 'parallel_residual' is for encoders and decoders (GPT-J, "
                            "GPT-NeoX); an encoder-decoder layer has three sub-layers: set it "
                            "to false")
        if self.tie_embeddings and self.head != "lm":
            raise SpecError("spec field 'tie_embeddings' needs head = 'lm'; set it to false")
        n = self.num_parameters()
        if n > MAX_PARAMETERS:
            raise SpecError(f"this spec has {n:.3g} parameters, over the {MAX_PARAMETERS:.3g} "
                            f"that xformer accepts ({n * 4 / 2**40:.0f} TiB in float32); check "
                            f"d_model, d_ff, vocab_size and n_layers")

    # ------------------------------------------------------------------ derived
    @property
    def d_head(self) -> int:
        """Size of one attention head: ``head_dim``, else ``d_model // n_heads``."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads ``H_kv``: ``n_kv_heads``, else ``n_heads``."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    def rotary_tables(self):
        """``(cos, sin)`` of this spec's rotary embedding, float64 ``(max_len, rotary_dim /
        2)`` (:func:`rotary_table` with ``rope_theta`` and the ``rope_scaling`` numbers)."""
        llama3 = tuple(getattr(self, f) for f in LLAMA3_ROPE_FIELDS) if (
            self.rope_scaling == "llama3") else None
        return rotary_table(self.max_len, self.rotary_dim, self.rope_theta, llama3)

    @property
    def rotary_dim(self) -> int:
        """Rotated dimensions of each head, ``int(d_head * rotary_fraction)`` (GPT-NeoX
        ``rotary_ndims``); 0 unless ``positional="rope"``."""
        return int(self.d_head * self.rotary_fraction) if self.positional == "rope" else 0

    def has_bias(self, part: str) -> bool:
        """Whether the Linear layers of ``part`` have biases: ``"qkv"`` (``q_proj``, ``k_proj``,
        ``v_proj``), ``"out_proj"`` or ``"mlp"`` (the feed-forward projections): the part's
        switch (``qkv_bias``, ``out_proj_bias``, ``mlp_bias``), or ``bias`` when it is
        ``None``; ``"norm"``: ``bias`` with LayerNorm, never with RMSNorm."""
        if part == "norm":
            return self.bias and self.norm == "layernorm"
        value = getattr(self, f"{part}_bias")
        return self.bias if value is None else value

    @property
    def decoder_layers(self) -> int:
        """Decoder layers: ``n_decoder_layers`` or ``n_layers`` (0 for an encoder)."""
        if self.architecture == "encoder":
            return 0
        if self.architecture == "decoder":
            return self.n_layers
        return self.n_decoder_layers or self.n_layers

    @property
    def encoder_layers(self) -> int:
        """Encoder layers: ``n_layers`` (0 for a decoder)."""
        return 0 if self.architecture == "decoder" else self.n_layers

    @property
    def is_causal(self) -> bool:
        """Whether the model has a decoder (causal self-attention, incremental decoding)."""
        return self.architecture != "encoder"

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

        def linear(prefix: str, n_out: int, n_in: int, bias: bool = self.bias) -> None:
            out.append(ParamSpec(f"{prefix}.weight", (n_out, n_in)))
            if bias:
                out.append(ParamSpec(f"{prefix}.bias", (n_out,), "zeros"))

        def norm(prefix: str) -> None:
            # with norm_scale_offset 1 (Gemma) the stored weight is the scale minus 1
            out.append(ParamSpec(f"{prefix}.weight", (d,),
                                 "zeros" if self.norm_scale_offset else "ones"))
            if self.has_bias("norm"):
                out.append(ParamSpec(f"{prefix}.bias", (d,), "zeros"))

        def embeddings(prefix: str, word: bool = True) -> None:
            if word:
                out.append(ParamSpec(f"{prefix}.word_embeddings.weight", (self.vocab_size, d)))
            if self.positional == "learned":
                out.append(ParamSpec(f"{prefix}.position_embeddings.weight", (self.max_len, d)))
            if self.type_vocab_size:
                out.append(ParamSpec(f"{prefix}.token_type_embeddings.weight",
                                     (self.type_vocab_size, d)))
            if self.embedding_norm:
                norm(f"{prefix}.norm")

        def attention(prefix: str) -> None:
            inner, kv = self.n_heads * self.d_head, self.kv_heads * self.d_head
            qkv = self.has_bias("qkv")
            linear(f"{prefix}.q_proj", inner, d, qkv)
            linear(f"{prefix}.k_proj", kv, d, qkv)
            linear(f"{prefix}.v_proj", kv, d, qkv)
            linear(f"{prefix}.out_proj", d, inner, self.has_bias("out_proj"))

        def ffn(prefix: str) -> None:
            mlp = self.has_bias("mlp")
            if self.ffn == "glu":
                linear(f"{prefix}.gate_proj", f, d, mlp)
                linear(f"{prefix}.up_proj", f, d, mlp)
                linear(f"{prefix}.down_proj", d, f, mlp)
            else:
                linear(f"{prefix}.linear1", f, d, mlp)
                linear(f"{prefix}.linear2", d, f, mlp)

        def stack(name: str, n: int, cross: bool) -> None:
            for i in range(n):
                p = f"{name}.layers.{i}"
                attention(f"{p}.self_attn")
                norm(f"{p}.norm1")
                if cross:
                    attention(f"{p}.cross_attn")
                    norm(f"{p}.norm2")
                ffn(f"{p}.ffn")
                norm(f"{p}.norm3" if cross else f"{p}.norm2")
            if self.final_norm:
                norm(f"{name}.final_norm")

        arch = self.architecture
        embeddings("embeddings")
        if arch == "encoder-decoder":
            embeddings("decoder_embeddings", word=not self.share_embeddings)
        if arch != "decoder":
            stack("encoder", self.n_layers, cross=False)
        if arch != "encoder":
            stack("decoder", self.decoder_layers, cross=arch == "encoder-decoder")
        if self.head == "pooler":
            linear("pooler.dense", d, d)
        if self.head == "lm" and not self.tie_embeddings:
            out.append(ParamSpec("lm_head.weight", (self.vocab_size, d)))
        return out

    def nodes(self) -> list[tuple[str, str]]:
        """The named nodes of the forward pass, in execution order: ``(name, kind)``.

        A node's name is the attribute path of the native sub-module whose output it is (the
        same in all three backends); kinds are ``embeddings``, ``norm``, ``attention``,
        ``ffn``, ``layer``, ``head``. ``embeddings`` is the summed (and normalised) embedding
        output, ``embeddings.norm`` its LayerNorm; ``...norm1`` etc. are LayerNorm outputs; a
        layer node is the layer's output. Used by divergence localisation (``xformer diff``).
        """
        out: list[tuple[str, str]] = []

        def embeddings(prefix: str) -> None:
            if self.embedding_norm:
                out.append((f"{prefix}.norm", "norm"))
            out.append((prefix, "embeddings"))

        def stack(name: str, n: int, cross: bool) -> None:
            for i in range(n):
                p = f"{name}.layers.{i}"
                subs = [("self_attn", "attention", "norm1")]
                if cross:
                    subs.append(("cross_attn", "attention", "norm2"))
                subs.append(("ffn", "ffn", "norm3" if cross else "norm2"))
                for sub, kind, norm in subs:
                    pair = [(f"{p}.{sub}", kind), (f"{p}.{norm}", "norm")]
                    out.extend(pair if self.norm_position == "post" else pair[::-1])
                out.append((p, "layer"))  # parallel_residual: norm1, self_attn, norm2, ffn too
            if self.final_norm:
                out.append((f"{name}.final_norm", "norm"))

        arch = self.architecture
        embeddings("embeddings")
        if arch != "decoder":
            stack("encoder", self.n_layers, cross=False)
        if arch == "encoder-decoder":
            embeddings("decoder_embeddings")
        if arch != "encoder":
            stack("decoder", self.decoder_layers, cross=arch == "encoder-decoder")
        if self.head == "pooler":
            out.append(("pooler", "head"))
        if self.head == "lm":
            out.append(("lm_head", "head"))
        return out

    def word_embedding_name(self, side: str = "encoder") -> str:
        """Canonical name of the token table that ``side`` (``"encoder"`` or ``"decoder"``)
        looks up, and that a tied LM head (decoder side) multiplies by."""
        if side == "decoder" and self.architecture == "encoder-decoder" and (
                not self.share_embeddings):
            return "decoder_embeddings.word_embeddings.weight"
        return "embeddings.word_embeddings.weight"

    def lm_head_name(self) -> str:
        """Canonical name of the LM head's ``(vocab_size, D)`` weight (the tied table if
        ``tie_embeddings``)."""
        return self.word_embedding_name("decoder") if self.tie_embeddings else "lm_head.weight"

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """``{canonical name: shape}`` in canonical order."""
        return {p.name: p.shape for p in self.parameters()}

    def num_parameters(self) -> int:
        """Total number of scalars in the canonical parameters."""
        return sum(math.prod(p.shape) for p in self.parameters())

    def output_names(self) -> tuple[str, ...]:
        """Names of the model outputs, in order:

        * ``last_hidden_state`` ``(B, T, D)``: the encoder's (encoder) or the decoder's;
        * ``pooler_output`` ``(B, D)`` with ``head="pooler"``;
        * ``encoder_last_hidden_state`` ``(B, S, D)`` for an encoder-decoder;
        * ``logits`` ``(B, T, vocab_size)`` with ``head="lm"``.
        """
        names = ["last_hidden_state"]
        if self.head == "pooler":
            names.append("pooler_output")
        if self.architecture == "encoder-decoder":
            names.append("encoder_last_hidden_state")
        if self.head == "lm":
            names.append("logits")
        return tuple(names)

    def input_embeds_names(self) -> tuple[str, ...]:
        """Inputs whose gradients conformance compares: ``inputs_embeds`` (encoder or decoder
        tokens) and, for an encoder-decoder, ``decoder_inputs_embeds``."""
        if self.architecture == "encoder-decoder":
            return ("inputs_embeds", "decoder_inputs_embeds")
        return ("inputs_embeds",)

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
            hint = f" (did you mean {close[0]!r}?)" if close else (
                f"; known: {', '.join(names[:10])}, ... ({len(names)} fields, listed in "
                f"docs/spec.md)")
            raise SpecError(f"unknown spec field {truncate(key)}{hint}")
        return cls(**dict(data))

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "ModelSpec":
        """Parse a JSON spec (:meth:`from_dict`; ``SpecError`` for malformed JSON)."""
        return cls._from_text(text, "JSON")

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "ModelSpec":
        """Parse a YAML spec (an empty document is the default spec; ``SpecError`` for
        malformed YAML)."""
        return cls._from_text(text, "YAML")

    @classmethod
    def _from_text(cls, text: str, fmt: str) -> "ModelSpec":
        import yaml

        try:
            data = json.loads(text) if fmt == "JSON" else _safe_yaml(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise SpecError(f"spec is not valid {fmt}: {truncate(first, 200)}") from None
        except RecursionError:
            raise SpecError(f"spec is not a plain {fmt} mapping: it nests too deeply; a spec "
                            f"is one flat mapping of field names to values") from None
        except SpecError:
            raise
        except ValueError as e:  # e.g. an integer over Python's 4300-digit limit
            why = (str(e).splitlines() or [type(e).__name__])[0].split(";")[0]
            raise SpecError(f"spec holds a value xformer cannot read ({why[:120]}); "
                            f"a spec field is a small number, a string or true/false"
                            ) from None
        return cls.from_dict({} if data is None and fmt == "YAML" else data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelSpec":
        """Read a ``.json``, ``.yaml`` or ``.yml`` spec file, or a preset name.

        Raises:
            SpecError: the file is missing, not UTF-8 text, or malformed (not JSON/YAML, too
                deeply nested, an alias bomb, an unreadable value, a bad field).
            InputError: the path is not a regular file (directory, FIFO, device), is over
                16 MiB (:data:`xformer.resources.DEFAULT_LIMIT`), or cannot be read
                (permission denied).
        """
        p = Path(path)
        if not os.path.lexists(p):
            if str(path) in PRESETS:
                return cls.preset(str(path))
            raise SpecError(f"spec file {truncate(str(path), 200)} does not exist (give a "
                            f".json/.yaml file or a preset: {', '.join(PRESETS)})")
        data = read_capped(p, limit=DEFAULT_LIMIT, what="spec file")
        try:
            if b"\x00" in data:
                raise UnicodeDecodeError("utf-8", data, data.index(b"\x00"),
                                         data.index(b"\x00") + 1, "NUL byte")
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(f"spec file {truncate(str(path), 200)} is not UTF-8 text (byte "
                            f"{e.start}: {data[e.start:e.start + 1]!r}); save it as UTF-8 "
                            f"JSON or YAML") from None
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
            raise SpecError(f"unknown preset {truncate(name)}; presets: {', '.join(PRESETS)}")
        return cls.from_dict(PRESETS[name])


def _safe_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, refusing, before any Python object is built, a document that
    expands (aliases followed) to more than :data:`YAML_MAX_NODES` nodes or refers to itself:
    a 500-byte alias bomb would otherwise build (and an error message print) 9**9 values."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_yaml_size(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_yaml_size(root: Any) -> None:
    """Raise ``SpecError`` if the composed YAML graph under ``root`` expands to more than
    :data:`YAML_MAX_NODES` nodes or holds a cycle (iterative, memoised: linear in the nodes
    written, whatever they expand to)."""
    def children(node: Any) -> list:
        if isinstance(node.value, list):
            return [c for item in node.value
                    for c in (item if isinstance(item, tuple) else (item,))]
        return []

    sizes: dict[int, int] = {}
    entered: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            entered.discard(key)
            sizes[key] = 1 + sum(sizes[id(c)] for c in children(node))
            if sizes[key] > YAML_MAX_NODES:
                raise SpecError(f"spec is not a plain YAML mapping: its aliases expand to more "
                                f"than {YAML_MAX_NODES:,} values (a spec has ~25); write the "
                                f"fields out")
            continue
        if key in sizes:
            continue
        if key in entered:
            raise SpecError("spec is not a plain YAML mapping: an alias refers to itself; "
                            "write the fields out")
        entered.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in children(node) if id(c) not in sizes)


# ---------------------------------------------------------------------- atomic saves
#: Temporary files and folders of atomic saves are named ``.{name}.xformer-tmp-{pid}-{hex}.tmp``
#: (a folder moved aside while a directory is replaced: ``.{name}.xformer-old-{pid}-{hex}.old``),
#: next to the target, so that a later save can recognise those left by a killed process.
TMP_MARKER = ".xformer-tmp-"
OLD_MARKER = ".xformer-old-"


def temp_path(path: Path, marker: str = TMP_MARKER) -> Path:
    """A fresh temporary sibling of ``path``: ``.{name}.xformer-tmp-{pid}-{8 hex}.tmp``
    (``.xformer-old-...old`` with ``marker=OLD_MARKER``)."""
    import secrets

    suffix = ".tmp" if marker == TMP_MARKER else ".old"
    return path.parent / f".{path.name}{marker}{os.getpid()}-{secrets.token_hex(4)}{suffix}"


def clean_stale_temps(folder: str | os.PathLike) -> list[str]:
    """Remove the temporary files and folders of atomic saves in ``folder`` whose process is
    gone (``os.kill(pid, 0)`` raises ``ProcessLookupError``), as a SIGKILL leaves them. A folder
    moved aside during a directory save (``.xformer-old-``) is put back if its target is
    missing, else removed. Returns the names removed or restored; errors are ignored (this is
    housekeeping, never a reason for a save to fail)."""
    import shutil

    done: list[str] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return done
    for entry in entries:
        name = entry.name
        marker = TMP_MARKER if TMP_MARKER in name else OLD_MARKER if OLD_MARKER in name else None
        if not name.startswith(".") or marker is None:
            continue
        target, _, tail = name[1:].rpartition(marker)
        pid = tail.partition("-")[0]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (or reused pid): not ours to touch
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError, OSError):
            continue
        try:
            target_path = os.path.join(folder, target)
            if marker == OLD_MARKER and target and not os.path.lexists(target_path):
                os.replace(entry.path, target_path)
            elif entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
            done.append(name)
        except OSError:
            pass
    return done


def fsync_dir(folder: str | os.PathLike) -> None:
    """``fsync`` a folder, so a rename in it survives a crash (ignored where unsupported)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _Interrupted(BaseException):
    """Raised by :class:`cleanup_on_signal`'s handler inside an armed save."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class cleanup_on_signal:
    """Context manager for one save: while it is *armed* (``guard.armed = True`` as the first
    statement of the save's ``try``, ``False`` as the last and first thing in its
    ``except``), SIGTERM, SIGINT and SIGHUP raise inside the save, so its cleanup removes the
    temporary file; outside the armed part (a bytecode or two) the signal is only recorded. On
    exit the previous handlers are restored and the signal is delivered again to them: a
    default SIGTERM then ends the process, SIGINT raises ``KeyboardInterrupt``; a handler that
    returns leaves an ``InterruptedError`` (the save did not happen). Outside the main thread,
    and for a signal whose handler is ``SIG_IGN``, nothing is installed."""

    SIGNALS = ("SIGTERM", "SIGINT", "SIGHUP")

    def __enter__(self) -> "cleanup_on_signal":
        import signal
        import threading

        self.previous: dict[int, Any] = {}
        self.armed = False
        self.pending: int | None = None
        if threading.current_thread() is not threading.main_thread():
            return self

        def handler(signum: int, frame: Any) -> None:
            if self.armed:
                self.armed = False
                raise _Interrupted(signum)
            self.pending = self.pending or signum

        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is None:
                continue
            prev = signal.getsignal(sig)
            if prev is signal.SIG_IGN or prev is None:
                continue
            self.previous[sig] = prev
            signal.signal(sig, handler)
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> bool:
        import signal

        self.armed = False
        for sig, prev in self.previous.items():
            signal.signal(sig, prev)
        signum = exc.signum if isinstance(exc, _Interrupted) else self.pending
        if signum is not None:
            signal.raise_signal(signum)  # the previous handler: default SIGTERM ends here
            if isinstance(exc, _Interrupted):
                raise InterruptedError(f"the save was interrupted by signal "
                                       f"{signal.Signals(signum).name}") from None
        return False


def atomic_write_bytes(path: Path, data: bytes | Callable[[Path], None]) -> None:
    """Write ``data`` to ``path`` atomically (``data`` is bytes, or a function that writes the
    file it is given: a large file is then never held in memory whole): a temporary sibling
    ``.{name}.xformer-tmp-{pid}-{hex}.tmp`` is written and ``fsync``-ed, renamed over ``path``
    (``os.replace``) and the folder ``fsync``-ed, so a reader sees the old file or the new
    one, never a part. The temporary file is removed on any error and on SIGTERM/SIGINT
    (:class:`cleanup_on_signal`); those a SIGKILL left are removed by the next save in the same
    folder (:func:`clean_stale_temps`). The file gets the permissions ``0o666 & ~umask``.

    Raises:
        OSError: the folder is missing or not writable, the disk is full (nothing is left
            behind).
    """
    path = Path(path)
    folder = path.parent
    clean_stale_temps(folder)
    tmp = temp_path(path)
    with cleanup_on_signal() as guard:
        try:
            guard.armed = True
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            with os.fdopen(fd, "wb") as fh:
                if callable(data):
                    data(tmp)  # the writer reopens the (empty) temporary file
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            fsync_dir(folder)
            guard.armed = False
        except BaseException:
            guard.armed = False
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise


_BERT = dict(architecture="encoder", vocab_size=30522, max_len=512, norm_position="post",
             norm_eps=1e-12, activation="gelu", positional="learned", type_vocab_size=2,
             embedding_norm=True, final_norm=False, embed_scale=False, bias=True, head="pooler")

_GPT2 = dict(architecture="decoder", vocab_size=50257, d_model=768, n_heads=12, d_ff=3072,
             n_layers=12, max_len=1024, norm_position="pre", norm_eps=1e-5,
             activation="gelu_tanh", positional="learned", type_vocab_size=0,
             embedding_norm=False, final_norm=True, embed_scale=False, bias=True,
             tie_embeddings=True, head="lm", bos_token_id=50256, eos_token_id=50256)
_VASWANI = dict(architecture="encoder-decoder", vocab_size=37000, d_model=512, n_heads=8,
                d_ff=2048, n_layers=6, n_decoder_layers=6, max_len=512, norm_position="post",
                norm_eps=1e-5, activation="relu", positional="sinusoidal", type_vocab_size=0,
                embedding_norm=False, final_norm=False, embed_scale=True, bias=True,
                share_embeddings=True, tie_embeddings=True, head="lm", dropout=0.1,
                bos_token_id=0, eos_token_id=1)

_LLAMA = dict(architecture="decoder", norm="rmsnorm", norm_position="pre", activation="silu",
              ffn="glu", positional="rope", rope_style="half", type_vocab_size=0,
              embedding_norm=False, final_norm=True, embed_scale=False, bias=False, head="lm")
_LLAMA_32_1B = {**_LLAMA, "vocab_size": 128256, "d_model": 2048, "n_heads": 32,
                "n_kv_heads": 8, "d_ff": 8192, "n_layers": 16, "max_len": 131072,
                "norm_eps": 1e-5, "rope_theta": 500000.0, "rope_scaling": "llama3",
                "rope_scaling_factor": 32.0, "tie_embeddings": True,
                "bos_token_id": 128000, "eos_token_id": 128001}
_MISTRAL_7B = {**_LLAMA, "vocab_size": 32000, "d_model": 4096, "n_heads": 32, "n_kv_heads": 8,
               "d_ff": 14336, "n_layers": 32, "max_len": 4096, "norm_eps": 1e-5,
               "rope_theta": 10000.0, "tie_embeddings": False, "bos_token_id": 1,
               "eos_token_id": 2}
_QWEN2_05B = {**_LLAMA, "vocab_size": 151936, "d_model": 896, "n_heads": 14, "n_kv_heads": 2,
              "d_ff": 4864, "n_layers": 24, "max_len": 131072, "norm_eps": 1e-6,
              "rope_theta": 1000000.0, "qkv_bias": True, "tie_embeddings": True,
              "bos_token_id": 151643, "eos_token_id": 151643}
_GEMMA_2B = {**_LLAMA, "vocab_size": 256000, "d_model": 2048, "n_heads": 8, "n_kv_heads": 1,
             "d_ff": 16384, "n_layers": 18, "max_len": 8192, "norm_eps": 1e-6,
             "norm_scale_offset": 1.0, "activation": "gelu_tanh", "embed_scale": True,
             "rope_theta": 10000.0, "tie_embeddings": True, "bos_token_id": 2,
             "eos_token_id": 1}
_PYTHIA_160M = dict(architecture="decoder", vocab_size=50304, d_model=768, n_heads=12,
                    d_ff=3072, n_layers=12, max_len=2048, norm="layernorm", norm_position="pre",
                    norm_eps=1e-5, activation="gelu", ffn="mlp", positional="rope",
                    rope_theta=10000.0, rope_style="half", rotary_fraction=0.25,
                    type_vocab_size=0, embedding_norm=False, final_norm=True,
                    embed_scale=False, bias=True, parallel_residual=True,
                    tie_embeddings=False, head="lm", bos_token_id=0, eos_token_id=0)
_TINY = dict(vocab_size=1000, d_model=64, n_heads=4, d_ff=128, n_layers=2, max_len=128,
             bos_token_id=0, eos_token_id=0)

#: Named specs. BERT sizes from Devlin et al. 2019 and Turc et al. 2019 ("Well-read students");
#: MiniLM-L6-H384 from sentence-transformers/all-MiniLM-L6-v2's config.json; the pre-LN encoder
#: follows Xiong et al. 2020; ``tiny`` is the built-in spec of ``xformer compare``. GPT-2 small
#: from Radford et al. 2019 / Hugging Face ``gpt2`` config.json (124,439,808 parameters);
#: ``vaswani-base`` is the base model of Vaswani et al. 2017 Table 3 (shared 37000-token BPE
#: vocabulary, shared and tied embeddings §3.4, dropout 0.1 §5.4; eps 1e-5 as
#: ``nn.Transformer``, the paper gives none). The Llama family from the config.json of each
#: published checkpoint: ``llama-3.2-1b`` (meta-llama/Llama-3.2-1B, 1,235,814,400 parameters,
#: ``llama3`` rope scaling with factor 32),
#: ``mistral-7b`` (mistralai/Mistral-7B-v0.1, 7,241,732,096; ``max_len`` is its 4096-token
#: ``sliding_window``, within which sliding-window attention is plain causal attention),
#: ``qwen2-0.5b`` (Qwen/Qwen2-0.5B, 494,032,768), ``gemma-2b`` (google/gemma-2b,
#: 2,506,172,416), ``pythia-160m`` (EleutherAI/pythia-160m, GPT-NeoX, 162,322,944).
#: ``*-tiny`` are small variants for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(vocab_size=1000, d_model=64, n_heads=4, d_ff=256, n_layers=2, max_len=64,
                 norm_eps=1e-12, type_vocab_size=2, head="pooler"),
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
    "gpt2-small": _GPT2,
    "gpt2-tiny": {**_GPT2, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "d_ff": 256,
                  "n_layers": 2, "max_len": 128, "bos_token_id": 0, "eos_token_id": 0},
    "vaswani-base": _VASWANI,
    "vaswani-tiny": {**_VASWANI, "vocab_size": 1000, "d_model": 64, "n_heads": 4, "d_ff": 256,
                     "n_layers": 2, "n_decoder_layers": 2, "max_len": 128, "dropout": 0.0},
    "llama-3.2-1b": _LLAMA_32_1B,
    "llama-tiny": {**_LLAMA_32_1B, **_TINY, "n_kv_heads": 2},
    "mistral-7b": _MISTRAL_7B,
    "mistral-tiny": {**_MISTRAL_7B, **_TINY, "n_kv_heads": 2},
    "qwen2-0.5b": _QWEN2_05B,
    "qwen2-tiny": {**_QWEN2_05B, **_TINY, "n_kv_heads": 2},
    "gemma-2b": _GEMMA_2B,
    "gemma-tiny": {**_GEMMA_2B, **_TINY, "n_kv_heads": 1, "head_dim": 32},
    "pythia-160m": _PYTHIA_160M,
    "pythia-tiny": {**_PYTHIA_160M, **_TINY},
    "pre-ln-encoder-small": dict(vocab_size=8000, d_model=256, n_heads=4, d_ff=1024, n_layers=4,
                                 max_len=256, norm_position="pre", norm_eps=1e-5,
                                 activation="gelu_tanh", positional="learned", type_vocab_size=0,
                                 embedding_norm=False, final_norm=True, head="none"),
}


def rotary_table(max_len: int, rotary_dim: int, theta: float,
                 llama3: tuple[float, float, float, int] | None = None):
    """The rotary angles' ``(cos, sin)`` of Su et al. 2021 (RoFormer eq. 34), float64 numpy,
    each ``(max_len, rotary_dim // 2)``: pair ``i`` at position ``p`` turns by
    ``p * f_i``, ``f_i = theta^(-2i / rotary_dim)``; with ``llama3 = (factor, low_freq_factor,
    high_freq_factor, original_max_len)`` the frequencies are first rescaled as Llama 3.1 does
    (:class:`ModelSpec` ``rope_scaling``; Hugging Face ``_compute_llama3_parameters``, here in
    float64). Every backend takes these tables (:meth:`ModelSpec.rotary_tables`, cast to its
    compute dtype; ``rope_style`` says which dimensions form pair ``i``), as it takes
    :func:`sinusoidal_table`, so the constants are bit-identical everywhere. Hugging Face
    computes the angles in float32 whatever the model's dtype (docs/pitfalls.md).
    """
    import numpy as np

    inv_freq = 1.0 / np.power(float(theta),
                              np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    if llama3 is not None:
        factor, low, high, old_len = llama3
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    angle = np.arange(max_len, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angle), np.sin(angle)


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
