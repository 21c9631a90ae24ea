"""The xformer Transformers (encoder, decoder, encoder-decoder) as native PyTorch modules
(``torch.nn``).

One of three twins with ``xformer_tensorflow/modules.py`` (Keras 3) and
``xformer_mxnet/modules.py`` (Gluon): the same classes in the same order, the same constructor
and call parameters (``tests/test_twins.py`` checks both), computing
:func:`xformer.reference.forward` (docs/design.md §3)::

    Embeddings -> Encoder( EncoderLayer( MultiHeadAttention, FeedForward ) x n_layers ) -> Pooler
    \\______________________________ EncoderModel ______________________________________/

    Embeddings -> Decoder( DecoderLayer( causal MultiHeadAttention, FeedForward ) x n ) -> LMHead
    \\______________________________ DecoderModel ______________________________________/

    Embeddings -> Encoder ----------------------------------.  (encoder_hidden_states)
    decoder_embeddings -> Decoder( DecoderLayer( causal self-attention, cross-attention,
                                                 FeedForward ) x n_decoder_layers ) -> LMHead
    \\____________________________ EncoderDecoderModel _________________________________/

    every norm: LayerNorm or RMSNorm (spec.norm); FeedForward or GatedFeedForward (spec.ffn);
    self-attention owns a RotaryEmbedding with spec.positional = "rope"

The inner blocks take the additive mask as ``attention_bias`` (``(B, 1, T_q, T_k)``
broadcastable, padding and causality already combined, finite), cross-attention inputs as
``encoder_hidden_states`` / ``encoder_attention_bias``, a layer's cache as ``past_key_value``
and a stack's as ``past_key_values``; the three top-level models build the biases from Hugging
Face's 0/1 ``attention_mask``.

Module paths mirror the canonical parameter names of :meth:`xformer.ModelSpec.parameters`, so
``EncoderModel(spec).state_dict().keys()`` *are* the canonical names (Linear weights
``(out_features, in_features)``, LayerNorm ``weight``/``bias``, RMSNorm ``weight``) and loading a
canonical checkpoint is ``load_state_dict``. Constants (sinusoidal and rotary tables) are
non-persistent buffers, never in the ``state_dict``.

PyTorch specifics (docs/design.md §3, §5):

* every sub-module gets ``dtype`` (``torch.float32`` or ``torch.float64``) explicitly, and every
  constant (sinusoidal and rotary tables, mask bias) is made in that dtype from the float64
  tables of :mod:`xformer.spec` (:func:`~xformer.spec.sinusoidal_table`,
  :func:`~xformer.spec.rotary_table`);
* :class:`LayerNorm` is ``nn.LayerNorm(eps=spec.norm_eps, bias=spec.has_bias("norm"))``, never
  torch's default 1e-5; :class:`RMSNorm` calls ``F.rms_norm`` (as ``nn.RMSNorm`` does) with
  ``eps=spec.norm_eps``; both scale by ``spec.norm_scale_offset + weight``;
* GELU and SiLU are composed from ``torch.erf`` / ``torch.tanh`` / ``torch.sigmoid``
  (:func:`gelu`, :func:`gelu_tanh`, :func:`silu`) instead of ``F.gelu`` / ``F.silu``, except
  exact GELU in float32: the fused ``F.gelu`` (float32-grade, one kernel);
* every dropout site is a :class:`Dropout` (``nn.Dropout`` that applies a given mask instead
  of drawing: the framework-neutral stream of :func:`xformer.training.dropout_masks`, set for
  a call with :func:`use_dropout_masks`); its module path is the canonical site name;
* attention calls the fused ``F.scaled_dot_product_attention`` (one kernel forward and one
  backward; the ``(B, H, T, S)`` probabilities never stored; issue #11) in inference, and in
  passes autograd records or training mode where its gradients are right and nothing needs
  the written-out steps (:meth:`MultiHeadAttention._fused`): on CPU (torch 2.13) the fused
  kernel's backward is wrong for a fully masked row with the finite ``finfo.min`` mask (its
  log-sum-exp absorbs ``log(T)``, so every such query's weights come back as 1 instead of
  ``1/T``), while its forward is right. Elsewhere (a fully masked row, attention dropout at
  work) attention is written out, ``softmax(Q K^T / sqrt(d_head) + bias) V`` (Hugging Face
  ``BertSelfAttention``'s eager path), and always inside :func:`written_out_attention`: the
  Backend protocol's ``forward``, ``forward_backward``, ``trace`` and training steps, whose
  numbers the conformance suite checks;
* in decoder layers, projections whose output is at least as wide as their input keep their
  ``nn.Linear`` weight in ``(in, out)`` storage (:func:`_decoding_storage`), as does an untied
  LM head: batch-1 decoding reads them faster; encoder layers and the pooler, which never
  decode, keep ``nn.Linear``'s ``(out, in)``, whose weight gradients train faster
  (docs/pitfalls.md);
* in a full float32 pass self-attention projects q, k and v with one matrix product over the
  three weights concatenated (:meth:`MultiHeadAttention._fused_qkv`; outputs bit for bit the
  three products'), and scales and masks the written-out scores in place (issue #11).

Incremental decoding uses Hugging Face's legacy cache format: per decoder layer a tuple
``(k, v)`` of ``(B, H_kv, T_past, d_head)`` tensors (``H_kv = spec.kv_heads`` key/value heads,
not their repeated copies; the keys already rotated with ``positional="rope"``), plus
``(cross_k, cross_v)`` ``(B, H_kv, S, d_head)`` for an encoder-decoder.

Example::

    >>> import torch
    >>> from xformer import ModelSpec
    >>> from xformer_torch.modules import EncoderModel
    >>> spec = ModelSpec.preset("tiny")
    >>> model = EncoderModel(spec, dtype=torch.float64).eval()
    >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[1, 1, 0]]))
    >>> out["last_hidden_state"].shape, out["pooler_output"].dtype
    (torch.Size([1, 3, 64]), torch.float64)
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xformer.errors import InputError
from xformer.spec import ModelSpec, sinusoidal_table

__all__ = [
    "gelu", "gelu_tanh", "relu", "silu", "ACTIVATIONS", "INPLACE_ACTIVATIONS", "LayerNorm",
    "RMSNorm", "RotaryEmbedding", "Embeddings", "MultiHeadAttention", "Dropout", "FeedForward",
    "GatedFeedForward", "EncoderLayer", "Encoder", "Pooler", "EncoderModel", "DecoderLayer",
    "Decoder", "LMHead", "DecoderModel", "EncoderDecoderModel", "causal_allowed", "allowed_bias",
    "use_dropout_masks", "written_out_attention",
]


# ---------------------------------------------------------------------- activations
def gelu(x: Tensor) -> Tensor:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))`` (Hendrycks & Gimpel 2016, eq. 1), in ``x``'s
    dtype. float64: composed from ``torch.erf``, the formula the three backends share (exact to
    rounding); float32: torch's fused ``F.gelu`` (the same erf formula in one kernel, float32-grade:
    8.2e-8 of the largest value, 2.5e-7 for the gradient, docs/pitfalls.md), one pass over the
    ``(B, T, d_ff)`` activation instead of five (issue #11)."""
    if x.dtype == torch.float64:
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return F.gelu(x)


def gelu_tanh(x: Tensor) -> Tensor:
    """Tanh GELU, ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (Hendrycks & Gimpel 2016
    §2; GPT-2's ``gelu_new``), in ``x``'s dtype."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def relu(x: Tensor) -> Tensor:
    """``max(x, 0)`` (``F.relu``)."""
    return F.relu(x)


def silu(x: Tensor) -> Tensor:
    """SiLU (swish), ``x sigmoid(x)`` (Elfwing et al. 2018, eq. 1; Hugging Face ``"silu"``), in
    ``x``'s dtype. Composed from ``torch.sigmoid`` as the other backends compose it."""
    return x * torch.sigmoid(x)


#: ``spec.activation`` -> function.
ACTIVATIONS = {"relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh, "silu": silu}
#: The float32 activations that have an in-place kernel, bit for bit the out-of-place one:
#: what :class:`FeedForward` runs on its fresh ``(B, T, d_ff)`` product in inference.
INPLACE_ACTIVATIONS = {gelu: torch.ops.aten.gelu_, relu: torch.relu_}


# ---------------------------------------------------------------------- helpers
def _check_dtype(dtype: torch.dtype) -> None:
    """Raise ``InputError`` unless ``dtype`` is ``torch.float32`` or ``torch.float64``."""
    if dtype not in (torch.float32, torch.float64):
        raise InputError(f"dtype must be torch.float32 or torch.float64, got {dtype}")


def _norm(spec: ModelSpec, dtype: torch.dtype, device) -> LayerNorm | RMSNorm:
    """The norm of ``spec.norm``: a :class:`LayerNorm` or an :class:`RMSNorm`."""
    cls = RMSNorm if spec.norm == "rmsnorm" else LayerNorm
    return cls(spec, dtype=dtype, device=device)


def _residual(x: Tensor, sublayer: Callable[[Tensor], Tensor], norm: nn.Module,
              dropout: Dropout, norm_first: bool) -> Tensor:
    """One residual sub-layer of an encoder or decoder layer: ``x + dropout(sublayer(norm(x)))``
    when ``norm_first`` (pre-LN: GPT-2, Xiong et al. 2020), else ``norm(x + dropout(
    sublayer(x)))`` (post-LN: Vaswani 2017 §3.1, BERT)."""
    if norm_first:
        return x + dropout(sublayer(norm(x)))
    return norm(x + dropout(sublayer(x)))


def causal_allowed(t_q: int, t_k: int, device: torch.device | str | None = None) -> Tensor:
    """``(t_q, t_k)`` 0/1 int64: query ``i`` (absolute position ``t_k - t_q + i``: the cached
    positions come first) may attend to key ``j`` iff ``j <= t_k - t_q + i``."""
    keys = torch.arange(t_k, device=device)[None, :]
    return (keys <= (t_k - t_q) + torch.arange(t_q, device=device)[:, None]).long()


def allowed_bias(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """``(1 - allowed) * finfo(dtype).min`` in ``dtype``: ONE additive bias from a 0/1 mask that
    is already the product of padding and causality (docs/design.md §3; two ``finfo.min`` biases
    would add up to ``-inf``). Finite, so a fully padded row attends uniformly, never NaN."""
    return (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min


def _compiling() -> bool:
    """Whether Dynamo is tracing (``torch.compiler.is_compiling``, torch >= 2.3; a
    data-dependent branch there would break the graph)."""
    is_compiling = getattr(torch.compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


#: Set inside :func:`written_out_attention`.
_WRITTEN_OUT = False


@contextlib.contextmanager
def written_out_attention() -> Iterator[None]:
    """Inside, attention is always written out (never the fused
    ``F.scaled_dot_product_attention``, :meth:`MultiHeadAttention._fused`): a no-grad forward
    then computes bit for bit what a gradient pass computes, whatever the masks. The Backend
    protocol's ``forward``, ``forward_backward``, ``trace`` and training steps run inside it,
    so that its outputs equal each other exactly and are the numbers the conformance suite
    checks (docs/design.md §3, §8); the fused kernel agrees with it to rounding, values and
    gradients (``tests/test_backend_torch.py``). Not thread-safe: one flag for the process."""
    global _WRITTEN_OUT
    previous, _WRITTEN_OUT = _WRITTEN_OUT, True
    try:
        yield
    finally:
        _WRITTEN_OUT = previous


def _decoding_storage(module: nn.Module) -> None:
    """Store the weight of every ``nn.Linear`` of ``module`` whose output is at least as wide
    as its input *transposed*, ``(in, out)`` row-major (``weight.stride() == (1,
    out_features)``; Hugging Face GPT-2's ``Conv1D`` layout), values kept: for the layers that
    run batch-1 decoding steps (:class:`DecoderLayer`). The parameter is still ``nn.Linear``'s
    ``(out, in)`` weight to every caller.

    Why (issue #11): a decoding step multiplies one row by every weight, a matrix-vector
    product that streams the weight from memory once. On CPU (torch 2.13, MKL, 2 threads) that
    product reads expanding and square weights markedly faster from ``(in, out)`` storage,
    contracting ones slightly faster from ``(out, in)``. With batch x length rows a forward
    pass reads either about as fast, but a training step computes an ``(in, out)``-stored
    weight's gradient more slowly (autograd computes a weight's gradient in its storage: the
    ``(in, out)``-shaped product ``x^T g`` instead of ``g^T x``), so layers that never decode
    (encoder layers, the pooler) keep ``nn.Linear``'s storage (docs/pitfalls.md, figures from
    ``benchmarks/kernels.py``). ``F.linear`` takes either layout: the same numbers. Copying
    weights in (``load_state_dict``, ``weight.copy_``) keeps the storage; ``state_dict()``
    hands out the transposed view (``.contiguous()`` it for a library that requires contiguous
    tensors, such as ``safetensors.torch.save_file``;
    :meth:`xformer.backend.Backend.get_weights` returns C-ordered numpy arrays)."""
    for linear in module.modules():
        if isinstance(linear, nn.Linear) and linear.in_features <= linear.out_features:
            linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())


class _SpecLayer(nn.Module):
    """A block configured by a :class:`~xformer.ModelSpec` (kept as ``.spec``)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec


# ---------------------------------------------------------------------- norms, positions
class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last axis as the spec says (Ba et al. 2016):
    ``(x - mean) / sqrt(var + eps) * (offset + weight) + bias``, biased variance.

    ``eps = spec.norm_eps`` (never torch's default 1e-5), a ``bias`` iff
    ``spec.has_bias("norm")``, ``offset = spec.norm_scale_offset``: 0 is exactly
    ``nn.LayerNorm`` (``F.layer_norm(x, (D,), weight, bias, eps)``); 1 scales by ``1 + weight``
    (Gemma's convention, there on RMSNorm: Hugging Face ``GemmaRMSNorm`` adds the 1 at run
    time), the stored ``weight`` then initialised to zeros as
    :meth:`xformer.ModelSpec.parameters` says. Still an
    ``nn.LayerNorm``: ``weight`` / ``bias`` ``(D,)`` are the canonical ``...norm.weight`` /
    ``...norm.bias``.

    Args:
        spec: uses ``d_model, norm_eps, norm_scale_offset, bias, norm``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(..., D)`` -> ``(..., D)`` in ``dtype``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec.d_model, eps=spec.norm_eps, bias=spec.has_bias("norm"),
                         dtype=dtype, device=device)
        self.scale_offset = spec.norm_scale_offset
        if self.scale_offset:
            nn.init.zeros_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight + self.scale_offset if self.scale_offset else self.weight
        return F.layer_norm(x, self.normalized_shape, weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale_offset={self.scale_offset}"


class RMSNorm(_SpecLayer):
    """Root-mean-square norm (Zhang & Sennrich 2019, eq. 4; Hugging Face ``LlamaRMSNorm``, and
    ``GemmaRMSNorm`` with the offset): ``x / sqrt(mean(x^2) + eps) * (offset + weight)`` over the
    last axis, no centring and no bias, computed by ``F.rms_norm`` (as ``nn.RMSNorm``) in the
    model dtype (Hugging Face computes in float32 whatever the dtype).

    Args:
        spec: uses ``d_model, norm_eps, norm_scale_offset``; ``offset = norm_scale_offset``.
        dtype, device: as :class:`Embeddings`.

    One parameter, ``weight`` ``(D,)`` (canonical ``...norm.weight``), initialised to ones, or
    to zeros when ``norm_scale_offset`` is 1 (:meth:`xformer.ModelSpec.parameters`).

    Shapes: ``x`` ``(..., D)`` -> ``(..., D)`` in ``dtype``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.eps = spec.norm_eps
        self.scale_offset = spec.norm_scale_offset
        init = torch.zeros if self.scale_offset else torch.ones
        self.weight = nn.Parameter(init(spec.d_model, dtype=dtype, device=device))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight + self.scale_offset if self.scale_offset else self.weight
        return F.rms_norm(x, self.weight.shape, weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, scale_offset={self.scale_offset}"


class RotaryEmbedding(_SpecLayer):
    """Rotary position embedding (Su et al. 2021, RoFormer eq. 34) of the queries or keys of
    self-attention: at absolute position ``p`` pair ``i`` of the first ``rotary_dim`` dimensions
    of each head turns by ``p * theta^(-2i / rotary_dim)``, ``(a, b) -> (a cos - b sin,
    b cos + a sin)``; the other ``d_head - rotary_dim`` dimensions pass through (GPT-NeoX
    ``rotary_pct``). Pair ``i`` is ``(i, i + rotary_dim / 2)`` for ``spec.rope_style="half"``
    (GPT-NeoX, Hugging Face Llama's ``rotate_half``) or ``(2i, 2i + 1)`` for ``"interleaved"``
    (GPT-J's ``rotate_every_two``, Meta's Llama); :func:`xformer.reference.rotate`.

    The angles are ``spec.rotary_tables()`` (:func:`xformer.spec.rotary_table`: ``rope_theta``,
    ``rope_scaling``) ``(max_len, rotary_dim / 2)``, computed
    once in float64 and cast to ``dtype``: the non-persistent buffers ``cos`` and ``sin``
    (constants, not parameters, not in the ``state_dict``).

    Args:
        spec: uses ``max_len, rotary_dim`` (``d_head, rotary_fraction``), ``rope_theta,
            rope_style``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, heads, T, d_head)`` -> the same shape and dtype, positions
    ``past_length .. past_length + T - 1`` (a Python ``int``: the cached length in decoding);
    ``past_length + T <= max_len`` (checked by :class:`Embeddings`). Differentiable in ``x``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.rotary_dim, self.style = spec.rotary_dim, spec.rope_style
        cos, sin = spec.rotary_tables()
        self.register_buffer("cos", torch.as_tensor(cos, dtype=dtype, device=device),
                             persistent=False)
        self.register_buffer("sin", torch.as_tensor(sin, dtype=dtype, device=device),
                             persistent=False)

    def forward(self, x: Tensor, past_length: int = 0) -> Tensor:
        t = x.shape[-2]
        cos = self.cos[past_length:past_length + t]  # (T, rotary_dim / 2)
        sin = self.sin[past_length:past_length + t]
        rot, rest = x[..., :self.rotary_dim], x[..., self.rotary_dim:]
        if self.style == "half":
            a, b = rot.chunk(2, dim=-1)
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        else:  # "interleaved": (a0, b0, a1, b1, ...)
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot

    def extra_repr(self) -> str:
        return f"rotary_dim={self.rotary_dim}, style={self.style!r}"


# ---------------------------------------------------------------------- blocks
class Embeddings(_SpecLayer):
    """Token + position (+ segment) embeddings, then the norm if ``spec.embedding_norm``, then
    ``dropout`` (a :class:`Dropout` of ``spec.dropout``, training mode only; Hugging Face
    ``BertEmbeddings``, Vaswani 2017 §5.4 "dropout to the sums of the embeddings and the
    positional encodings"; the site ``embeddings.dropout`` / ``decoder_embeddings.dropout``).

    ``x = word_embeddings[input_ids] * s + positions[:T] + token_type_embeddings[token_type_ids]``
    with ``s = sqrt(d_model)`` if ``spec.embed_scale`` (Vaswani 2017 §3.4) else 1; positions are
    the learned table ``position_embeddings`` (BERT, Devlin 2019 §3.2), the fixed table of
    Vaswani 2017 §3.5 (:func:`xformer.spec.sinusoidal_table`, the non-persistent buffer
    ``position_table``, not a parameter), or nothing with ``positional="rope"`` (the positions
    rotate the queries and keys instead: :class:`RotaryEmbedding`).

    Args:
        spec: the model; uses ``vocab_size, d_model, max_len, positional, type_vocab_size,
            embedding_norm, embed_scale`` and the norm's fields (:class:`LayerNorm`,
            :class:`RMSNorm`).
        word_embeddings: whether to own a token table; ``False`` for the target side of an
            encoder-decoder with ``share_embeddings``, which looks up the source side's table
            (passed to :meth:`embed_tokens` as ``weight``).
        dtype: parameter and compute dtype, ``torch.float32`` or ``torch.float64``.
        device: where to create the parameters.

    Shapes: ``input_ids`` / ``token_type_ids`` ``(B, T)`` int64, or ``inputs_embeds``
    ``(B, T, D)`` (already scaled); returns ``(B, T, D)`` in ``dtype``. With ``past_length``
    (cached decoding) the positions are ``past_length .. past_length + T - 1``.

    Raises:
        InputError: ``past_length + T > spec.max_len``; ``token_type_ids`` without segment
            embeddings.
    """

    def __init__(self, spec: ModelSpec, *, word_embeddings: bool = True,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device}
        self.max_len = spec.max_len
        self.scale = math.sqrt(spec.d_model) if spec.embed_scale else None
        self.word_embeddings = (nn.Embedding(spec.vocab_size, spec.d_model, **factory)
                                if word_embeddings else None)
        self.position_embeddings = (nn.Embedding(spec.max_len, spec.d_model, **factory)
                                    if spec.positional == "learned" else None)
        table = (torch.as_tensor(sinusoidal_table(spec.max_len, spec.d_model), **factory)
                 if spec.positional == "sinusoidal" else None)
        self.register_buffer("position_table", table, persistent=False)
        self.token_type_embeddings = (
            nn.Embedding(spec.type_vocab_size, spec.d_model, **factory)
            if spec.type_vocab_size else None)
        self.norm = _norm(spec, dtype, device) if spec.embedding_norm else None
        self.dropout = Dropout(spec.dropout)

    def embed_tokens(self, input_ids: Tensor, weight: Tensor | None = None) -> Tensor:
        """``word_embeddings[input_ids]`` times ``sqrt(d_model)`` if ``embed_scale``: what
        ``inputs_embeds`` stands for. ``(B, T)`` int64 -> ``(B, T, D)``. ``weight``: a shared
        table to look up instead of this module's own (``share_embeddings``)."""
        x = F.embedding(input_ids, self.word_embeddings.weight if weight is None else weight)
        return x * self.scale if self.scale is not None else x

    def forward(self, input_ids: Tensor | None = None, token_type_ids: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_length: int = 0) -> Tensor:
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        t = inputs_embeds.shape[1]
        if past_length + t > self.max_len:
            what = f"sequence length {t}" if not past_length else (
                f"{past_length} cached + {t} new positions")
            raise InputError(f"{what} is longer than max_len={self.max_len}; "
                             f"shorten the input (xformer does not truncate silently)")
        positions = (self.position_embeddings.weight if self.position_embeddings is not None
                     else self.position_table)  # None with rope
        x = (inputs_embeds if positions is None
             else inputs_embeds + positions[past_length:past_length + t])
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros(inputs_embeds.shape[:2], dtype=torch.long,
                                             device=inputs_embeds.device)
            x = x + self.token_type_embeddings(token_type_ids)
        elif token_type_ids is not None:
            raise InputError("token_type_ids given but the spec has type_vocab_size = 0")
        return self.dropout(self.norm(x) if self.norm is not None else x)


class MultiHeadAttention(_SpecLayer):
    """Multi-head attention (Vaswani 2017 §3.2.2), scaled as Hugging Face
    ``BertSelfAttention``: ``softmax(Q K^T / sqrt(d_head) + attention_bias) V``, heads split as
    ``(B, T, H, d_head)``, then ``out_proj``. Self-attention by default; cross-attention
    (queries from ``x``, keys and values from ``key_value_states``) when built with
    ``cross_attention=True``.

    Grouped-query attention (Ainslie et al. 2023; multi-query with ``H_kv = 1``, Shazeer 2019):
    ``k_proj`` / ``v_proj`` give ``H_kv = spec.kv_heads`` heads, and query head ``h`` reads
    key/value head ``h // (H / H_kv)`` (each key/value head repeated ``H / H_kv`` times
    consecutively, Hugging Face ``repeat_kv``); the cache keeps the ``H_kv`` heads. With
    ``spec.positional="rope"`` self-attention owns ``rotary`` (a :class:`RotaryEmbedding`,
    else ``None``; never for cross-attention) and rotates the new queries and keys at their
    absolute positions ``past .. past + T - 1`` (``past`` = the cached length) before the keys
    join the cache, so the cache holds rotated keys (Su et al. 2021; Hugging Face
    ``LlamaAttention``).

    Args:
        spec: uses ``d_model, n_heads, n_kv_heads, head_dim`` (``d_head``), ``qkv_bias,
            out_proj_bias`` (``has_bias``), ``dropout``, and ``positional`` with the rotary
            fields.
        cross_attention: the cached keys/values (``past_key_value``) are the projected encoder
            output, reused as they are; self-attention appends the new keys/values to them.
        dtype, device: as :class:`Embeddings`.

    Parameters: ``q_proj`` ``(H d_head, D)``, ``k_proj`` / ``v_proj`` ``(H_kv d_head, D)``
    (biases iff ``spec.has_bias("qkv")``), ``out_proj`` ``(D, H d_head)`` (bias iff
    ``spec.has_bias("out_proj")``). A full self-attention pass multiplies by the three
    projection weights in one product (:meth:`_fused_qkv`) without calling ``q_proj``,
    ``k_proj`` or ``v_proj``, so forward hooks on those three do not fire in such a pass;
    hook the attention module itself (as :meth:`xformer.backend.Backend.trace` does).

    Shapes: ``x`` ``(B, T, D)``; ``key_value_states`` ``(B, S, D)`` (cross-attention; default
    ``x``); ``attention_bias`` additive, broadcastable to ``(B, H, T, S_total)`` (``(B, 1, 1, S)``
    from :meth:`EncoderModel.key_padding_bias`, ``(B, 1, T, past + T)`` causal) or ``None``;
    ``past_key_value`` ``(k, v)`` each ``(B, H_kv, S_past, d_head)`` or ``None``. Returns
    ``(B, T, D)``, or ``((B, T, D), (k, v))`` with ``use_cache`` (the keys/values to cache,
    ``(B, H_kv, S_total, d_head)``). Dropout (``spec.dropout``) acts on the attention
    probabilities in training mode only.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device}
        d, qkv_bias = spec.d_model, spec.has_bias("qkv")
        self.cross_attention = cross_attention
        self.n_heads, self.n_kv_heads, self.d_head = spec.n_heads, spec.kv_heads, spec.d_head
        inner, kv = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        self.q_proj = nn.Linear(d, inner, bias=qkv_bias, **factory)
        self.k_proj = nn.Linear(d, kv, bias=qkv_bias, **factory)
        self.v_proj = nn.Linear(d, kv, bias=qkv_bias, **factory)
        self.out_proj = nn.Linear(inner, d, bias=spec.has_bias("out_proj"), **factory)
        self.rotary = (RotaryEmbedding(spec, **factory)
                       if spec.positional == "rope" and not cross_attention else None)
        self.dropout = Dropout(spec.dropout)

    def _split_heads(self, y: Tensor, heads: int) -> Tensor:
        # (B, S, heads d_head) -> (B, heads, S, d_head)
        return y.view(y.shape[0], y.shape[1], heads, self.d_head).transpose(1, 2)

    def _repeat_kv(self, y: Tensor) -> Tensor:
        # (B, H_kv, S, d_head) -> (B, H, S, d_head): kv head j serves query heads j*g .. j*g+g-1
        groups = self.n_heads // self.n_kv_heads
        return y if groups == 1 else y.repeat_interleave(groups, dim=1)

    def _fused_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """``(q_proj(x), k_proj(x), v_proj(x))`` as ONE matrix product with the three weights
        concatenated (``(H d_head + 2 H_kv d_head, D)``, in the storage the three share), split
        back into ``(B, T, ·)`` views; ``None`` where that is not worth it or not exact.

        Why (issue #11): one product with three times the columns runs nearer the GEMM peak
        than three, and its backward is one product for the input's gradient instead of three
        plus two sums. The concatenation copies the three weights each call, so it is taken
        only for full passes (``B T >= D`` rows; a decoding step multiplies one row per
        sequence and keeps the three products). Only when the three weights share one storage
        layout (``nn.Linear``'s, or :func:`_decoding_storage`'s): then MKL's float32 product
        computes each output column as the same dot product in the same order as its own
        product does, so the outputs are bit for bit those of ``q_proj``, ``k_proj`` and
        ``v_proj`` (every shape measured, ``tests/test_backend_torch.py``). Only in float32:
        float64 products block differently by width, so a merged product differs from the
        three by rounding (measured up to ~5e-16 of the largest value, depending on the
        weights), and float64 is the dtype that proves a port, not the fast one. The input's
        gradient sums the three contributions inside the product: it differs from three
        products plus two sums by rounding only."""
        b, t, d = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        strides = {p.weight.stride() for p in projections}
        if b * t < d or len(strides) != 1 or x.dtype != torch.float32:
            return None
        if self.q_proj.weight.stride(0) == 1:  # (in, out) storage: concatenate the columns
            weight = torch.cat([p.weight.t() for p in projections], dim=1).t()
        else:
            weight = torch.cat([p.weight for p in projections])
        bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projections])
        sizes = [p.out_features for p in projections]
        return F.linear(x, weight, bias).split(sizes, dim=-1)

    def _fused(self, attention_bias: Tensor | None) -> bool:
        """Whether this call computes attention with the fused
        ``F.scaled_dot_product_attention`` rather than written out (``softmax(Q K^T /
        sqrt(d_head) + bias) V``, whose steps a hook or a dropout mask can see).

        * Never inside :func:`written_out_attention` (the Backend protocol).
        * Inference (autograd off, eval mode): always; its forward is exact to rounding, fully
          masked rows included.
        * A pass autograd records, or training mode (issue #11; one kernel forward and one
          backward instead of four and six, and no ``(B, H, T, S)`` probabilities kept for
          the backward): only where the fused CPU kernel's gradients are right and nothing
          needs the written-out steps:

          - every query row keeps a key whose bias is not negative (an unmasked key of the
            finite-mask convention, docs/design.md §3). The kernel's backward recomputes the
            probabilities from a log-sum-exp that loses ``log(S)`` when all of a row's logits
            are hugely negative, so a fully masked row (a fully padded sequence, a
            left-padded decoder position) would get weights 1 instead of ``1/S``
            (docs/pitfalls.md). Checked on the bias (a ``(B, 1, 1, S)`` or ``(B, 1, T, S)``
            reduction); ``None`` needs no check. Under ``torch.compile`` a bias is not
            inspected (a data-dependent branch) and attention is written out;
          - the bias does not require grad (the fused CPU kernel does not differentiate it);
          - the attention-probability dropout does nothing: eval mode or ``p = 0``, no mask
            given (:func:`use_dropout_masks`), and no hook on it.
        """
        if _WRITTEN_OUT:
            return False
        if not (torch.is_grad_enabled() or self.training):
            return True
        dropout = self.dropout
        if (dropout.mask is not None or (self.training and dropout.p > 0)
                or dropout._forward_hooks or dropout._forward_pre_hooks):
            return False
        if attention_bias is None:
            return True
        if attention_bias.requires_grad or _compiling():
            return False
        return bool(attention_bias.amax(dim=-1).ge(0).all())

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                key_value_states: Tensor | None = None,
                past_key_value: tuple[Tensor, Tensor] | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple[Tensor, Tensor]]:
        b, t, _ = x.shape
        if self.cross_attention and past_key_value is not None:  # the encoder's, projected once
            q = self._split_heads(self.q_proj(x), self.n_heads)
            k, v = past_key_value
        else:
            projected = self._fused_qkv(x) if key_value_states is None else None
            if projected is None:
                source = x if key_value_states is None else key_value_states
                projected = (self.q_proj(x), self.k_proj(source), self.v_proj(source))
            q = self._split_heads(projected[0], self.n_heads)
            k, v = (self._split_heads(y, self.n_kv_heads) for y in projected[1:])
            if self.rotary is not None:  # the new positions come after the cached ones
                past = 0 if past_key_value is None else past_key_value[0].shape[2]
                q, k = self.rotary(q, past), self.rotary(k, past)
            if past_key_value is not None:  # self-attention: append to the cache
                k = torch.cat((past_key_value[0], k), dim=2)
                v = torch.cat((past_key_value[1], v), dim=2)
        if self._fused(attention_bias):
            context = F.scaled_dot_product_attention(
                q, self._repeat_kv(k), self._repeat_kv(v), attn_mask=attention_bias,
                scale=1.0 / math.sqrt(self.d_head))
        else:  # written out (see _fused for when and why)
            # the scale and the bias in place on the fresh scores: the same numbers, two
            # (B, H, T, S) buffers fewer (the product's backward needs only q and k)
            scores = (q @ self._repeat_kv(k).transpose(-2, -1)).div_(math.sqrt(self.d_head))
            if attention_bias is not None:
                scores = scores.add_(attention_bias)
            context = self.dropout(scores.softmax(dim=-1)) @ self._repeat_kv(v)
        context = context.transpose(1, 2).reshape(b, t, -1)
        out = self.out_proj(context)
        return (out, (k, v)) if use_cache else out


class Dropout(nn.Dropout):
    """``nn.Dropout`` that can be handed the mask to apply instead of drawing its own: the
    framework-neutral dropout stream of :func:`xformer.training.dropout_masks`, so that a
    training step computes the same numbers on every backend (docs/design.md; issue #10).

    With ``mask`` set (a tensor, see :func:`use_dropout_masks`) the forward pass is
    ``x * mask``: the mask already holds ``keep / (1 - p)`` in the model dtype (inverted
    dropout, as ``F.dropout`` scales), so nothing is drawn and nothing rescaled, in training and
    eval mode alike (a mask is only given during a training step). With ``mask`` ``None`` (the
    default) it is exactly ``nn.Dropout(rate)``: ``F.dropout(x, rate, self.training)``, torch's
    own random draws in training mode, the identity in eval mode. ``mask`` is a plain tensor
    attribute, not a buffer: never in the ``state_dict``; under ``torch.compile`` Dynamo lifts
    it as a graph input (inlined ``nn.Module`` attributes), so a new mask each step neither
    recompiles nor is baked in as a constant (tests/test_train_torch.py checks both).

    Args:
        rate: the drop probability ``p`` in ``[0, 1]`` (``nn.Dropout``'s ``p``; the spec's
            ``dropout``).

    Shapes: ``x`` any shape, returned in its shape and dtype; ``mask`` exactly ``x``'s shape
    (the site's shape, :func:`xformer.training.dropout_sites`) and dtype.

    Raises:
        InputError: a mask whose shape is not ``x``'s (a broadcast would silently reuse it).
    """

    #: The scaled keep mask of the current call, or ``None`` (draw natively).
    mask: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        mask = self.mask
        if mask is None:
            return super().forward(x)
        if mask.shape != x.shape:
            raise InputError(f"dropout mask of shape {tuple(mask.shape)} for an input of shape "
                             f"{tuple(x.shape)}; give the site's exact shape")
        return x * mask


@contextlib.contextmanager
def use_dropout_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> Iterator[None]:
    """``with use_dropout_masks(model, masks):`` every :class:`Dropout` named in ``masks`` (its
    module path in ``model``, the canonical site name: ``embeddings.dropout``,
    ``decoder.layers.0.self_attn.dropout``, ...; :func:`xformer.training.dropout_sites`)
    applies its mask instead of drawing; on exit (also on error) every mask is cleared and the
    layers draw natively again. ``masks`` ``None`` or empty: nothing changes.

    The autograd graph keeps the mask tensors it multiplied by, so ``backward()`` may run after
    the ``with`` block.

    Args:
        model: an :class:`EncoderModel`, :class:`DecoderModel` or :class:`EncoderDecoderModel`
            (any module whose dropout layers are :class:`Dropout`).
        masks: ``{site: tensor}`` in the model's dtype and device.
    Raises:
        InputError: a site that is not a :class:`Dropout` of ``model`` (a wiring bug, so it is
            loud rather than a silently native draw).
    """
    layers = []
    for site, mask in (masks or {}).items():
        try:
            layer = model.get_submodule(site)
        except AttributeError:
            layer = None
        if not isinstance(layer, Dropout):
            raise InputError(f"dropout site {site!r} is not a Dropout layer of the model")
        layers.append((layer, mask))
    try:
        for layer, mask in layers:
            layer.mask = mask
        yield
    finally:
        for layer, _ in layers:
            layer.mask = None


class FeedForward(_SpecLayer):
    """Position-wise feed-forward network (Vaswani 2017 §3.3):
    ``linear2(dropout(act(linear1(x))))``, ``act`` from ``spec.activation``.

    Args:
        spec: uses ``d_model, d_ff, activation, mlp_bias`` (``has_bias("mlp")``), ``dropout``.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``(B, T, D)`` -> ``(B, T, D)`` (inner ``(B, T, d_ff)``).

    In float32 inference (autograd off) a GELU or ReLU overwrites ``linear1``'s fresh output
    (:data:`INPLACE_ACTIVATIONS`, the same values bit for bit): a new ``(B, T, d_ff)``
    buffer has its pages faulted in afresh on every call, which makes a whole layer's forward
    markedly slower (docs/pitfalls.md), and ``nn.TransformerEncoderLayer``'s fast path
    activates in place too. Not while ``linear1`` has a forward hook, which would see
    its output overwritten.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device, "bias": spec.has_bias("mlp")}
        self.linear1 = nn.Linear(spec.d_model, spec.d_ff, **factory)
        self.activation = ACTIVATIONS[spec.activation]
        self.dropout = Dropout(spec.dropout)
        self.linear2 = nn.Linear(spec.d_ff, spec.d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        h = self.linear1(x)
        inplace = INPLACE_ACTIVATIONS.get(self.activation)
        if (inplace is not None and h.dtype == torch.float32 and not torch.is_grad_enabled()
                and not self.linear1._forward_hooks):
            return self.linear2(self.dropout(inplace(h)))
        return self.linear2(self.dropout(self.activation(h)))


class GatedFeedForward(_SpecLayer):
    """Gated linear unit feed-forward network (Shazeer 2020, "GLU Variants Improve
    Transformer", eq. 5-6; Hugging Face ``LlamaMLP``): ``down_proj(dropout(act(gate_proj(x)) *
    up_proj(x)))``, ``act`` from ``spec.activation`` (SwiGLU with ``"silu"``: Llama, Mistral,
    Qwen2; GeGLU with ``"gelu_tanh"``: Gemma). Used for ``spec.ffn="glu"``.

    Args:
        spec: uses ``d_model, d_ff, activation, mlp_bias`` (``has_bias("mlp")``), ``dropout``.
        dtype, device: as :class:`Embeddings`.

    Parameters: ``gate_proj`` / ``up_proj`` ``(d_ff, D)``, ``down_proj`` ``(D, d_ff)``, biases iff
    ``spec.has_bias("mlp")``.

    Shapes: ``(B, T, D)`` -> ``(B, T, D)`` (inner ``(B, T, d_ff)``).
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        factory = {"dtype": dtype, "device": device, "bias": spec.has_bias("mlp")}
        self.gate_proj = nn.Linear(spec.d_model, spec.d_ff, **factory)
        self.up_proj = nn.Linear(spec.d_model, spec.d_ff, **factory)
        self.activation = ACTIVATIONS[spec.activation]
        self.dropout = Dropout(spec.dropout)
        self.down_proj = nn.Linear(spec.d_ff, spec.d_model, **factory)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.dropout(self.activation(self.gate_proj(x)) * self.up_proj(x)))


class EncoderLayer(_SpecLayer):
    """One encoder layer: self-attention (``self_attn``, ``norm1``) and feed-forward (``ffn``,
    ``norm2``) sub-layers, each through :func:`_residual` (post- or pre-LN per
    ``spec.norm_position``; residual branches go through dropout in training mode only), or
    with ``spec.parallel_residual`` both on the same input in one step, ``x + dropout1(
    self_attn(norm1(x))) + dropout2(ffn(norm2(x)))`` (GPT-J; GPT-NeoX
    ``use_parallel_residual``). ``ffn`` is a :class:`GatedFeedForward` with ``spec.ffn="glu"``,
    else a :class:`FeedForward`; the norms are :class:`LayerNorm` or :class:`RMSNorm`
    (``spec.norm``).

    Args:
        spec: uses ``norm_position, parallel_residual, ffn, dropout`` and the fields of the
            norms and sub-layers.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``, ``attention_bias`` as :class:`MultiHeadAttention`; returns
    ``(B, T, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.norm_first = spec.norm_position == "pre"
        self.parallel_residual = spec.parallel_residual
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, device=device)
        self.norm1 = _norm(spec, dtype, device)
        self.ffn = (GatedFeedForward if spec.ffn == "glu" else FeedForward)(
            spec, dtype=dtype, device=device)
        self.norm2 = _norm(spec, dtype, device)
        self.dropout1 = Dropout(spec.dropout)
        self.dropout2 = Dropout(spec.dropout)

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        if self.parallel_residual:
            return (x + self.dropout1(self.self_attn(self.norm1(x), attention_bias))
                    + self.dropout2(self.ffn(self.norm2(x))))
        x = _residual(x, lambda y: self.self_attn(y, attention_bias), self.norm1,
                      self.dropout1, self.norm_first)
        return _residual(x, self.ffn, self.norm2, self.dropout2, self.norm_first)


class Encoder(_SpecLayer):
    """``n_layers`` :class:`EncoderLayer` s (``layers.{i}``), then ``final_norm`` if
    ``spec.final_norm`` (pre-LN models: GPT-2, Xiong et al. 2020).

    Shapes: ``(B, T, D)`` -> ``(B, T, D)``; ``attention_bias`` as :class:`MultiHeadAttention`.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.layers = nn.ModuleList(
            EncoderLayer(spec, dtype=dtype, device=device) for _ in range(spec.n_layers))
        self.final_norm = _norm(spec, dtype, device) if spec.final_norm else None

    def forward(self, x: Tensor, attention_bias: Tensor | None = None) -> Tensor:
        for layer in self.layers:
            x = layer(x, attention_bias)
        return self.final_norm(x) if self.final_norm is not None else x


class Pooler(_SpecLayer):
    """BERT's pooler (Devlin 2019 §3; Hugging Face ``BertPooler``): ``tanh(dense(x[:, 0]))``.

    Shapes: ``(B, T, D)`` -> ``(B, D)``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.dense = nn.Linear(spec.d_model, spec.d_model, bias=spec.bias, dtype=dtype,
                               device=device)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class _SpecModel(nn.Module):
    """What the three top-level models share: ``.spec``, the dtype check, ``.dtype`` and the
    key-padding bias."""

    embeddings: Embeddings

    def __init__(self, spec: ModelSpec, dtype: torch.dtype) -> None:
        super().__init__()
        _check_dtype(dtype)
        self.spec = spec

    @property
    def dtype(self) -> torch.dtype:
        """The parameter and compute dtype."""
        return self.embeddings.word_embeddings.weight.dtype

    def key_padding_bias(self, attention_mask: Tensor | None) -> Tensor | None:
        """``(B, 1, 1, S)`` additive key-padding bias of a ``(B, S)`` 0/1 ``attention_mask``
        (encoder self-attention, cross-attention), in the model dtype; ``None`` for ``None``
        and, outside ``torch.compile``, for a mask without padding: its bias is all zeros,
        and adding zeros changes no bit, so attention skips a pass over the ``(B, H, T, S)``
        scores (Hugging Face drops such a mask too; issue #11)."""
        if attention_mask is None:
            return None
        if not _compiling() and bool(attention_mask.all()):
            return None
        return allowed_bias(attention_mask[:, None, None, :], self.dtype)


class EncoderModel(_SpecModel):
    """The whole encoder (BERT-like): :class:`Embeddings` -> :class:`Encoder` ->
    (:class:`Pooler`), called with Hugging Face's argument names.

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``, in that order.

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="encoder"``); kept as ``.spec``.
        dtype: ``torch.float32`` or ``torch.float64`` for every parameter, buffer and activation
            (``.dtype`` reports it).
        device: where to create the parameters.

    Call with:
        input_ids: ``(B, T)`` int64 token ids in ``[0, vocab_size)``, or
        inputs_embeds: ``(B, T, D)`` token embeddings already multiplied by the embedding
            scale, instead of ``input_ids``.
        attention_mask: ``(B, T)``, 1 = attend, 0 = padding; default all ones.
        token_type_ids: ``(B, T)`` int64 segment ids; default zeros (only with
            ``type_vocab_size > 0``).

    Returns:
        ``{"last_hidden_state": (B, T, D)}`` plus ``"pooler_output": (B, D)`` with
        ``head="pooler"``, in ``dtype``.

    Raises:
        InputError: neither or both of ``input_ids`` / ``inputs_embeds``; ``T > max_len``;
            ``token_type_ids`` with ``type_vocab_size = 0``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.encoder = Encoder(spec, dtype=dtype, device=device)
        self.pooler = Pooler(spec, dtype=dtype, device=device) if spec.head == "pooler" else None

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, inputs_embeds: Tensor | None = None
                ) -> dict[str, Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        hidden = self.encoder(self.embeddings(input_ids, token_type_ids, inputs_embeds),
                              self.key_padding_bias(attention_mask))
        if self.pooler is None:
            return {"last_hidden_state": hidden}
        return {"last_hidden_state": hidden, "pooler_output": self.pooler(hidden)}


# ---------------------------------------------------------------------- decoders
class DecoderLayer(_SpecLayer):
    """One decoder layer: causal self-attention (``self_attn``, ``norm1``), cross-attention over
    the encoder output (``cross_attn``, ``norm2``; encoder-decoders only) and the feed-forward
    network (``ffn``, ``norm2``, or ``norm3`` after cross-attention), each sub-layer through
    :func:`_residual` as in :class:`EncoderLayer` (``nn.TransformerDecoderLayer``'s order and
    names, Vaswani 2017 §3.1); with ``spec.parallel_residual`` (no cross-attention) self-attention
    and ``ffn`` read the same input, ``x + dropout1(self_attn(norm1(x))) +
    dropout2(ffn(norm2(x)))`` (GPT-NeoX). ``ffn`` and the norms as in :class:`EncoderLayer`.

    Args:
        spec: as :class:`EncoderLayer`.
        cross_attention: with a cross-attention sub-layer (the decoder of an encoder-decoder).
        dtype, device: as :class:`Embeddings`.

    Shapes: ``x`` ``(B, T, D)``; ``attention_bias`` ``(B or 1, 1, T, past + T)`` (causal and
    padding, :func:`allowed_bias`); ``encoder_hidden_states`` ``(B, S, D)`` and
    ``encoder_attention_bias`` ``(B, 1, 1, S)`` (cross-attention); ``past_key_value``
    ``(k, v)`` or ``(k, v, cross_k, cross_v)``, each ``(B, H_kv, past or S, d_head)``. Returns
    ``(B, T, D)``, or ``((B, T, D), present_key_value)`` with ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.norm_first = spec.norm_position == "pre"
        self.parallel_residual = spec.parallel_residual
        self.self_attn = MultiHeadAttention(spec, dtype=dtype, device=device)
        self.norm1 = _norm(spec, dtype, device)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(spec, cross_attention=True, dtype=dtype,
                                                 device=device)
            self.norm2 = _norm(spec, dtype, device)
        else:
            self.cross_attn = None
        self.ffn = (GatedFeedForward if spec.ffn == "glu" else FeedForward)(
            spec, dtype=dtype, device=device)
        # the FFN's norm: norm3 after cross-attention, else norm2 (GPT-2's ln_2)
        setattr(self, "norm3" if cross_attention else "norm2", _norm(spec, dtype, device))
        self.dropout1 = Dropout(spec.dropout)
        self.dropout2 = Dropout(spec.dropout)
        self.dropout3 = Dropout(spec.dropout)
        _decoding_storage(self)  # decoding multiplies one row at a time by these weights

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None,
                encoder_attention_bias: Tensor | None = None,
                past_key_value: tuple | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple]:
        past = past_key_value or ()
        present: list[Tensor] = []

        def attend(attn: MultiHeadAttention, bias, states, cached):
            def sublayer(y: Tensor) -> Tensor:
                y, kv = attn(y, bias, states, cached or None, use_cache=True)
                present.extend(kv)
                return y
            return sublayer

        self_attention = attend(self.self_attn, attention_bias, None, past[:2])
        if self.parallel_residual:  # the spec allows it only without cross-attention
            x = (x + self.dropout1(self_attention(self.norm1(x)))
                 + self.dropout2(self.ffn(self.norm2(x))))
            return (x, tuple(present)) if use_cache else x
        x = _residual(x, self_attention, self.norm1, self.dropout1, self.norm_first)
        ffn_norm, ffn_dropout = self.norm2, self.dropout2
        if self.cross_attn is not None:
            x = _residual(x, attend(self.cross_attn, encoder_attention_bias,
                                    encoder_hidden_states, past[2:]),
                          self.norm2, self.dropout2, self.norm_first)
            ffn_norm, ffn_dropout = self.norm3, self.dropout3
        x = _residual(x, self.ffn, ffn_norm, ffn_dropout, self.norm_first)
        return (x, tuple(present)) if use_cache else x


class Decoder(_SpecLayer):
    """``spec.decoder_layers`` :class:`DecoderLayer` s (``layers.{i}``), then ``final_norm`` if
    ``spec.final_norm``.

    Shapes: as :class:`DecoderLayer`; ``past_key_values`` one entry per layer. Returns
    ``(B, T, D)``, or ``((B, T, D), past_key_values)`` with ``use_cache``.
    """

    def __init__(self, spec: ModelSpec, *, cross_attention: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        self.layers = nn.ModuleList(
            DecoderLayer(spec, cross_attention=cross_attention, dtype=dtype, device=device)
            for _ in range(spec.decoder_layers))
        self.final_norm = _norm(spec, dtype, device) if spec.final_norm else None

    def forward(self, x: Tensor, attention_bias: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None,
                encoder_attention_bias: Tensor | None = None,
                past_key_values: tuple | None = None, use_cache: bool = False
                ) -> Tensor | tuple[Tensor, tuple]:
        presents = []
        for i, layer in enumerate(self.layers):
            past = past_key_values[i] if past_key_values is not None else None
            x, present = layer(x, attention_bias, encoder_hidden_states, encoder_attention_bias,
                               past, use_cache=True)
            presents.append(present)
        x = self.final_norm(x) if self.final_norm is not None else x
        return (x, tuple(presents)) if use_cache else x


class LMHead(_SpecLayer):
    """Language-model head (GPT-2's ``lm_head``): ``logits = x W^T``, no bias, no scale.

    Args:
        spec: uses ``vocab_size, d_model``.
        tied: hold no parameter: the caller passes the (target-side) token table as
            ``tied_weight`` (``tie_embeddings``), so the tied table is one parameter with one
            ``state_dict`` key.
        dtype, device: as :class:`Embeddings`.

    Shapes: ``(B, T, D)`` -> ``(B, T, vocab_size)``.
    """

    def __init__(self, spec: ModelSpec, *, tied: bool = False,
                 dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec)
        # (vocab, D) in (D, vocab) storage, as :func:`_decoding_storage` keeps expanding ones
        self.weight = (None if tied else
                       nn.Parameter(torch.empty(spec.d_model, spec.vocab_size, dtype=dtype,
                                                device=device).t()))
        if self.weight is not None:
            nn.init.normal_(self.weight, std=0.02)
        #: Set by :meth:`decoding_table` for its duration: the tied table in (D, vocab) storage.
        self.tied_copy: Tensor | None = None

    def forward(self, x: Tensor, tied_weight: Tensor | None = None) -> Tensor:
        if tied_weight is not None and self.tied_copy is not None \
                and not torch.is_grad_enabled():
            tied_weight = self.tied_copy
        return F.linear(x, self.weight if tied_weight is None else tied_weight)

    @contextlib.contextmanager
    def decoding_table(self, table: Tensor) -> Iterator[None]:
        """Inside, no-grad calls multiply by a ``(D, vocab)``-stored copy of the tied ``table``
        (the same numbers to rounding): torch's batch-1 matrix-vector product reads the
        ``(vocab, D)`` table markedly slower (docs/pitfalls.md, ``benchmarks/kernels.py``).
        The copy (``vocab x D`` values) lives only inside:
        :meth:`xformer.backend.Backend.generate` holds it for one generation."""
        self.tied_copy = table.detach().t().contiguous().t()
        try:
            yield
        finally:
            self.tied_copy = None


class _CausalModel(_SpecModel):
    """What :class:`DecoderModel` and :class:`EncoderDecoderModel` share: the causal
    self-attention bias and the LM head over the target side's token table."""

    lm_head: LMHead | None

    def self_attention_bias(self, attention_mask: Tensor | None, t: int, past_length: int = 0,
                            device=None) -> Tensor:
        """Causal self-attention bias ``(B or 1, 1, T, past + T)``: padding (``attention_mask``
        ``(B, past + T)``, 1 = attend) times causality, then one :func:`allowed_bias`."""
        allowed = causal_allowed(t, past_length + t, device)[None, None]
        if attention_mask is not None:
            allowed = attention_mask.to(self.dtype)[:, None, None, :] * allowed
        return allowed_bias(allowed, self.dtype)

    def target_word_embeddings(self) -> Tensor:
        """The ``(vocab_size, D)`` token table of the target side: what target tokens look up
        and what a tied LM head multiplies by."""
        return self.embeddings.word_embeddings.weight

    def decoding_tables(self) -> contextlib.AbstractContextManager:
        """A context for a run of no-grad decoding steps: a tied LM head multiplies by a
        transposed copy of the table inside (:meth:`LMHead.decoding_table`); otherwise
        nothing."""
        if self.lm_head is None or not self.spec.tie_embeddings:
            return contextlib.nullcontext()
        return self.lm_head.decoding_table(self.target_word_embeddings())

    def _outputs(self, hidden: Tensor, presents: tuple, use_cache: bool,
                 **extra: Tensor) -> dict[str, Tensor]:
        """The output dict: ``last_hidden_state``, ``extra``, ``logits`` (LM head), and
        ``past_key_values`` with ``use_cache``."""
        out = {"last_hidden_state": hidden, **extra}
        if self.lm_head is not None:
            tied = self.target_word_embeddings() if self.spec.tie_embeddings else None
            out["logits"] = self.lm_head(hidden, tied)
        if use_cache:
            out["past_key_values"] = presents
        return out


class DecoderModel(_CausalModel):
    """The whole decoder (GPT-like): :class:`Embeddings` -> :class:`Decoder` (causal
    self-attention) -> (:class:`LMHead`), called with Hugging Face's argument names.

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``, in that order (a tied LM
    head adds no key: it multiplies by ``embeddings.word_embeddings.weight``).

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="decoder"``); kept as ``.spec``.
        dtype, device: as :class:`EncoderModel`.

    Call with:
        input_ids: ``(B, T)`` int64, or inputs_embeds: ``(B, T, D)`` (already scaled).
        attention_mask: ``(B, past + T)``, 1 = attend, 0 = padding; default all ones.
        past_key_values: the ``"past_key_values"`` of the previous call (cached decoding):
            per layer ``(k, v)`` ``(B, H_kv, past, d_head)``; positions then start at ``past``.
        use_cache: also return ``"past_key_values"`` (now ``past + T`` long).

    Returns:
        ``{"last_hidden_state": (B, T, D)}``, ``"logits": (B, T, vocab_size)`` with
        ``head="lm"``, ``"past_key_values"`` with ``use_cache``.

    Raises:
        InputError: neither or both of ``input_ids`` / ``inputs_embeds``; ``past + T > max_len``.

    Example::

        >>> spec = ModelSpec.preset("gpt2-tiny")
        >>> model = DecoderModel(spec, dtype=torch.float64).eval()
        >>> out = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        >>> step = model(input_ids=torch.tensor([[4]]), past_key_values=out["past_key_values"])
        >>> step["logits"].shape
        torch.Size([1, 1, 1000])
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.decoder = Decoder(spec, dtype=dtype, device=device)
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, device=device)
                        if spec.head == "lm" else None)

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """``inputs_embeds`` for ``input_ids`` (the scaled token embeddings)."""
        return self.embeddings.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, past_key_values: tuple | None = None,
                use_cache: bool = False) -> dict[str, Tensor]:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("give exactly one of input_ids (B, T) and inputs_embeds (B, T, D)")
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        x = self.embeddings(input_ids, None, inputs_embeds, past_length=past)
        bias = self.self_attention_bias(attention_mask, x.shape[1], past, x.device)
        x, presents = self.decoder(x, bias, past_key_values=past_key_values, use_cache=True)
        return self._outputs(x, presents, use_cache)


class EncoderDecoderModel(_CausalModel):
    """The encoder-decoder (Vaswani 2017): source :class:`Embeddings` (``embeddings``) ->
    :class:`Encoder`; target :class:`Embeddings` (``decoder_embeddings``) -> :class:`Decoder`
    (causal self-attention, cross-attention over the encoder output) -> (:class:`LMHead`).

    ``state_dict()`` keys equal ``[p.name for p in spec.parameters()]``: with
    ``share_embeddings`` the target side looks up ``embeddings.word_embeddings.weight`` (and
    ``decoder_embeddings`` has no token table); a tied LM head multiplies by the target side's
    table and adds no key.

    Args:
        spec: the :class:`~xformer.ModelSpec` (``architecture="encoder-decoder"``).
        dtype, device: as :class:`EncoderModel`.

    Call with:
        input_ids / inputs_embeds, attention_mask: the source, as :class:`EncoderModel`.
        decoder_input_ids / decoder_inputs_embeds, decoder_attention_mask: the target, as
            :class:`DecoderModel` (mask ``(B, past + T)``).
        encoder_outputs: ``(B, S, D)`` encoder output to reuse instead of running the encoder.
        past_key_values: per decoder layer ``(k, v, cross_k, cross_v)``; with it the encoder
            is not needed (the cross keys/values are cached), but ``attention_mask`` (the
            source's) still is if the source has padding.
        use_cache: also return ``"past_key_values"``.

    Returns:
        ``{"last_hidden_state": (B, T, D)}`` (the decoder's), ``"encoder_last_hidden_state":
        (B, S, D)`` (when the encoder ran or ``encoder_outputs`` was given), ``"logits"`` with
        ``head="lm"``, ``"past_key_values"`` with ``use_cache``.

    Raises:
        InputError: neither or both of ids / embeddings on a side; a sequence over ``max_len``.
    """

    def __init__(self, spec: ModelSpec, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__(spec, dtype)
        self.embeddings = Embeddings(spec, dtype=dtype, device=device)
        self.decoder_embeddings = Embeddings(spec, word_embeddings=not spec.share_embeddings,
                                             dtype=dtype, device=device)
        self.encoder = Encoder(spec, dtype=dtype, device=device)
        self.decoder = Decoder(spec, cross_attention=True, dtype=dtype, device=device)
        self.lm_head = (LMHead(spec, tied=spec.tie_embeddings, dtype=dtype, device=device)
                        if spec.head == "lm" else None)

    def target_word_embeddings(self) -> Tensor:
        side = self.embeddings if self.spec.share_embeddings else self.decoder_embeddings
        return side.word_embeddings.weight

    def decoder_word_embeddings(self) -> Tensor:
        """The target side's token table (the source's with ``share_embeddings``)."""
        return self.target_word_embeddings()

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Source ``inputs_embeds`` for ``input_ids``."""
        return self.embeddings.embed_tokens(input_ids)

    def embed_decoder_tokens(self, decoder_input_ids: Tensor) -> Tensor:
        """Target ``decoder_inputs_embeds`` for ``decoder_input_ids``."""
        return self.decoder_embeddings.embed_tokens(decoder_input_ids,
                                                    self.target_word_embeddings())

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                inputs_embeds: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None,
                decoder_inputs_embeds: Tensor | None = None,
                encoder_outputs: Tensor | None = None, past_key_values: tuple | None = None,
                use_cache: bool = False) -> dict[str, Tensor]:
        if (decoder_input_ids is None) == (decoder_inputs_embeds is None):
            raise InputError("give exactly one of decoder_input_ids (B, T) and "
                             "decoder_inputs_embeds (B, T, D)")
        source_bias = self.key_padding_bias(attention_mask)
        memory = encoder_outputs
        cached_cross = bool(past_key_values) and len(past_key_values[0]) == 4
        if memory is None and not cached_cross:
            if (input_ids is None) == (inputs_embeds is None):
                raise InputError("give exactly one of input_ids (B, S) and inputs_embeds "
                                 "(B, S, D)")
            memory = self.encoder(self.embeddings(input_ids, None, inputs_embeds), source_bias)
        if decoder_inputs_embeds is None:
            decoder_inputs_embeds = self.embed_decoder_tokens(decoder_input_ids)
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        y = self.decoder_embeddings(inputs_embeds=decoder_inputs_embeds, past_length=past)
        bias = self.self_attention_bias(decoder_attention_mask, y.shape[1], past, y.device)
        y, presents = self.decoder(y, bias, memory, source_bias, past_key_values, use_cache=True)
        extra = {} if memory is None else {"encoder_last_hidden_state": memory}
        return self._outputs(y, presents, use_cache, **extra)
