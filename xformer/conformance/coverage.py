"""Small random specs in which every value of every field occurs: the conformance matrix.

The values come from the spec's own declaration (:func:`xformer.spec.choices`, narrowed per
architecture), so a value added to the spec is covered without being retyped here.
"""

from __future__ import annotations

import numpy as np

from ..errors import SpecError
from ..spec import ARCHITECTURES, ModelSpec, choices

#: Integer fields whose zero and non-zero values build different models, and the values
#: covered: ``type_vocab_size`` 0 has no segment embeddings (encoders only: the other
#: architectures must keep 0).
SWITCHES: dict[str, tuple[int, ...]] = {"type_vocab_size": (0, 2)}


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
    """``n`` small random specs (``n >= 3``) of ``architecture`` in which every value of every
    field in :func:`field_values` occurs at least once (each field cycles through its values
    from a random offset); sizes and ``norm_eps`` are drawn at random too. ``tie_embeddings``
    needs ``head="lm"``: it is false elsewhere and cycles through its values over the specs
    whose head is ``"lm"`` (both occur once ``head`` has been ``"lm"`` twice)."""
    if architecture not in ARCHITECTURES:
        raise SpecError(f"architecture must be one of {', '.join(ARCHITECTURES)}, got "
                        f"{architecture!r}")
    rng = np.random.default_rng(seed)
    values = field_values(architecture)
    offsets = {k: int(rng.integers(len(v))) for k, v in values.items()}
    out = []
    lm_heads = 0
    for i in range(n):
        fields = {k: v[(i + offsets[k]) % len(v)] for k, v in values.items()}
        if fields.get("head") == "lm" and "tie_embeddings" in values:
            ties = values["tie_embeddings"]
            fields["tie_embeddings"] = ties[(lm_heads + offsets["tie_embeddings"]) % len(ties)]
            lm_heads += 1
        else:
            fields["tie_embeddings"] = False
        n_heads = int(rng.choice([1, 2, 4]))
        extra = {}
        if architecture == "encoder-decoder":
            extra["n_decoder_layers"] = int(rng.integers(1, 3))
        out.append(ModelSpec(
            architecture=architecture,
            vocab_size=int(rng.integers(20, 100)), d_model=n_heads * int(rng.choice([4, 8])),
            n_heads=n_heads, d_ff=int(rng.integers(8, 40)), n_layers=int(rng.integers(1, 3)),
            max_len=int(rng.integers(8, 17)), norm_eps=float(rng.choice([1e-12, 1e-6, 1e-5])),
            **extra, **fields))
    return out
