"""Small random specs in which every value of every field occurs: the conformance matrix.

The values come from the spec's own declaration (:func:`xformer.spec.choices`, narrowed per
architecture), so a value added to the spec is covered without being retyped here.
"""

from __future__ import annotations

import numpy as np

from ..errors import SpecError
from ..spec import ARCHITECTURES, CONDITIONAL, ModelSpec, choices

#: Integer fields whose zero and non-zero values build different models, and the values
#: covered: ``type_vocab_size`` 0 has no segment embeddings (encoders only: the other
#: architectures must keep 0).
SWITCHES: dict[str, tuple[int, ...]] = {"type_vocab_size": (0, 2)}

#: Numeric fields whose values build different code paths, and the values each covering spec
#: cycles through: key/value heads (``"all"`` = ``None``, multi-head; ``1``, multi-query;
#: ``"half"`` = ``n_heads // 2``, grouped), a ``head_dim`` override (``"override"`` = twice
#: ``d_model // n_heads``), and with ``positional="rope"`` the rotary base and the rotated
#: fraction (``1.0`` and a partial rotation, GPT-NeoX's ``rotary_pct``).
VARIANTS: dict[str, tuple] = {
    "n_kv_heads": ("all", 1, "half"), "head_dim": (None, "override"),
    "rope_theta": (10000.0, 1e6), "rotary_fraction": (1.0, 0.5),
}


def field_values(architecture: str) -> dict[str, tuple]:
    """Every value that each field which can vary in an ``architecture`` spec takes: the
    categorical fields of :func:`xformer.spec.choices` with more than one allowed value, and
    :data:`SWITCHES` (encoders), in the spec's field order."""
    values = {k: v for k, v in choices(architecture).items() if len(v) > 1}
    if architecture == "encoder":
        values.update(SWITCHES)
    order = list(ModelSpec.__dataclass_fields__)
    return dict(sorted(values.items(), key=lambda kv: order.index(kv[0])))


#: Per architecture (issues #2 and #3's coverage lists), derived from the spec.
FIELD_VALUES: dict[str, tuple] = field_values("encoder")
DECODER_FIELD_VALUES: dict[str, tuple] = field_values("decoder")
ENCODER_DECODER_FIELD_VALUES: dict[str, tuple] = field_values("encoder-decoder")


def covering_specs(n: int = 6, seed: int = 0, architecture: str = "encoder") -> list[ModelSpec]:
    """``n`` small random specs (``n >= 4``) of ``architecture`` in which every value of every
    field in :func:`field_values` occurs at least once (each field cycles through its values
    from a random offset), and every :data:`VARIANTS` value too; sizes and ``norm_eps`` are
    drawn at random. A field of :data:`xformer.spec.CONDITIONAL` (``tie_embeddings``,
    ``rope_style``, ``parallel_residual``) keeps its default where its condition does not hold
    and cycles through its values over the specs where it does (as do ``rope_theta`` and
    ``rotary_fraction`` over the rotary specs): each value occurs once the condition has held
    as many times as the field has values."""
    if architecture not in ARCHITECTURES:
        raise SpecError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got "
                        f"{architecture!r}")
    rng = np.random.default_rng(seed)
    values = field_values(architecture)
    offsets = {k: int(rng.integers(len(v))) for k, v in {**values, **VARIANTS}.items()}
    # a field with few values steps every spec or every second one (drawn per field), so that
    # two-valued fields do not always pair the same way (rmsnorm with offset 1 and layernorm
    # with offset 0, say): more pairs of values are covered with the same n
    strides = {k: 1 if 2 * len(v) > n else int(rng.integers(1, 3)) for k, v in values.items()}
    held = dict.fromkeys([*CONDITIONAL, "rope"], 0)
    out = []
    for i in range(n):
        fields = {k: v[(i // strides[k] + offsets[k]) % len(v)] for k, v in values.items()}
        for name, (cond, wanted) in CONDITIONAL.items():
            if name not in values:
                continue
            if fields.get(cond) == wanted:
                fields[name] = values[name][(held[name] + offsets[name]) % len(values[name])]
                held[name] += 1
            else:
                fields[name] = ModelSpec.__dataclass_fields__[name].default
        variant = {k: v[(i + offsets[k]) % len(v)] for k, v in VARIANTS.items()}
        if fields.get("positional") == "rope":
            for k in ("rope_theta", "rotary_fraction"):
                fields[k] = VARIANTS[k][(held["rope"] + offsets[k]) % len(VARIANTS[k])]
            held["rope"] += 1
        if fields.get("rope_scaling") == "llama3":
            # an original context of 8 positions puts the pairs of a 4- or 8-wide head in all
            # three bands (kept, interpolated, divided by the factor)
            fields.update(rope_scaling_factor=4.0, rope_original_max_len=8)
        n_heads = int(rng.choice([2, 4]))
        d_model = n_heads * int(rng.choice([4, 8]))
        kv = variant["n_kv_heads"]
        fields["n_kv_heads"] = None if kv == "all" else (n_heads // 2 if kv == "half" else kv)
        if variant["head_dim"] == "override":
            fields["head_dim"] = 2 * (d_model // n_heads)
        extra = {}
        if architecture == "encoder-decoder":
            extra["n_decoder_layers"] = int(rng.integers(1, 3))
        out.append(ModelSpec(
            architecture=architecture,
            vocab_size=int(rng.integers(20, 100)), d_model=d_model,
            n_heads=n_heads, d_ff=int(rng.integers(8, 40)), n_layers=int(rng.integers(1, 3)),
            max_len=int(rng.integers(8, 17)), norm_eps=float(rng.choice([1e-12, 1e-6, 1e-5])),
            **extra, **fields))
    return out
