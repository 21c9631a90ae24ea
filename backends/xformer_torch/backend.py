"""The PyTorch backend: :class:`xformer_torch.modules.EncoderModel`, ``DecoderModel`` and
``EncoderDecoderModel`` behind the ``Backend`` protocol.

Imports torch lazily (in ``TorchBackend.__init__``), so listing backends stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype, check_inputs
from xformer.errors import InputError
from xformer.weights import check_weights


class TorchBackend(Backend):
    """PyTorch (``torch.nn``). Modes: ``"eager"``; ``"compile"`` runs ``torch.compile(model)``,
    compiled once per model and cached on it (``model._xformer_compiled``)."""

    name = "torch"
    extra = "torch"
    modes = ("eager", "compile")
    default_modes = ("eager",)
    preferred_mode = "eager"

    def __init__(self) -> None:
        import torch

        from . import modules

        self.torch = torch
        self.modules = modules

    def build(self, spec, dtype: str = "float32"):
        cls = {"encoder": self.modules.EncoderModel, "decoder": self.modules.DecoderModel,
               "encoder-decoder": self.modules.EncoderDecoderModel}[spec.architecture]
        return cls(spec, dtype=getattr(self.torch, check_dtype(dtype)))

    def set_weights(self, model, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        dtype = self._np_dtype(model)
        model.load_state_dict({name: self.torch.from_numpy(np.array(w, dtype=dtype))
                               for name, w in weights.items()}, strict=True)

    def get_weights(self, model) -> dict[str, np.ndarray]:
        state = model.state_dict()
        return {p.name: state[p.name].detach().cpu().numpy().copy()
                for p in model.spec.parameters()}

    def forward(self, model, inputs: Mapping[str, np.ndarray], mode: str | None = None
                ) -> dict[str, np.ndarray]:
        fn = self._callable(model, self.check_mode(mode))
        x = self._tensors(model, inputs)
        with self._eval(model), self.torch.no_grad():
            out = fn(**x)
        return {k: v.detach().cpu().numpy() for k, v in out.items()}

    def forward_backward(self, model, inputs: Mapping[str, np.ndarray],
                         cotangents: Mapping[str, np.ndarray], mode: str | None = None
                         ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        torch = self.torch
        fn = self._callable(model, self.check_mode(mode))
        x = self._tensors(model, inputs)
        params = dict(model.named_parameters())
        sides = model.spec.input_embeds_names()  # inputs_embeds (, decoder_inputs_embeds)
        with self._eval(model), torch.enable_grad():
            # the lookups run eagerly, so d(loss)/d(embeds) comes with the parameter gradients
            embeds = {}
            for key in sides:
                ids = key.replace("inputs_embeds", "input_ids")
                if ids in x:
                    lookup = (model.embed_decoder_tokens if key == "decoder_inputs_embeds"
                              else model.embeddings.embed_tokens)
                    embeds[key] = lookup(x.pop(ids))
                else:
                    embeds[key] = x.pop(key).requires_grad_(True)
            out = fn(**embeds, **x)
            names, cots = self._cotangents(model, out, cotangents)
            grads = torch.autograd.grad([out[k] for k in names],
                                        [*embeds.values(), *params.values()],
                                        grad_outputs=cots, allow_unused=True)
        numpy = {k: v.detach().cpu().numpy() for k, v in out.items()}
        result = {}
        for key, e, g in zip(embeds, embeds.values(), grads):
            result[key] = (torch.zeros_like(e) if g is None else g).detach().cpu().numpy()
        for (name, p), g in zip(params.items(), grads[len(embeds):]):
            result[name] = (torch.zeros_like(p) if g is None else g).detach().cpu().numpy()
        return numpy, result

    def framework_version(self) -> str:
        return self.torch.__version__

    # -- divergence localisation ---------------------------------------------------------
    def trace(self, model, inputs: Mapping[str, np.ndarray],
              cotangents: Mapping[str, np.ndarray]
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every node of ``model.spec.nodes()``: its output and the gradient of the loss
        ``sum_k sum(outputs[k] * cotangents[k])`` with respect to it (see
        :meth:`xformer.backend.Backend.trace`).

        One eager forward + backward pass of the module itself (never the ``torch.compile``
        wrapper), dropout off. A forward hook on each node's sub-module
        (``model.get_submodule(name)``) records its output (the hidden state of an
        ``(out, (k, v))`` tuple) and returns ``output + probe``, ``probe`` a zero tensor that
        requires grad: adding an exact zero leaves every value as it was, and
        ``d loss / d probe`` is the gradient flowing into that output, whether or not the
        parameters or inputs require grad. The hooks are removed afterwards (also on error);
        no parameter's ``.grad`` is touched, and the production forward path has no hooks.
        """
        torch = self.torch
        nodes = [name for name, _ in model.spec.nodes()]
        x = self._tensors(model, inputs)
        values: dict[str, Any] = {}
        probes: dict[str, Any] = {}

        def hook_for(name: str):
            def hook(module, args, output):
                if name in values:
                    raise RuntimeError(f"trace: node {name!r} ran twice in one forward pass")
                hidden = output[0] if isinstance(output, tuple) else output
                probe = torch.zeros_like(hidden, requires_grad=True)
                values[name], probes[name] = hidden.detach(), probe
                return (hidden + probe, *output[1:]) if isinstance(output, tuple) else (
                    hidden + probe)
            return hook

        handles = [model.get_submodule(name).register_forward_hook(hook_for(name))
                   for name in nodes]
        try:
            with self._eval(model), torch.enable_grad():
                out = model(**x)
                names, cots = self._cotangents(model, out, cotangents)
                missing = [n for n in nodes if n not in probes]
                if missing:
                    raise RuntimeError(f"trace: nodes {missing} did not run")
                grads = torch.autograd.grad([out[k] for k in names],
                                            [probes[n] for n in nodes], grad_outputs=cots,
                                            allow_unused=True) if names else [None] * len(nodes)
        finally:
            for handle in handles:
                handle.remove()
        forward = {n: values[n].cpu().numpy() for n in nodes}
        backward = {n: (torch.zeros_like(probes[n]) if g is None else g).detach().cpu().numpy()
                    for n, g in zip(nodes, grads)}
        return forward, backward

    # -- incremental decoding ------------------------------------------------------------
    def decode(self, model, inputs: Mapping[str, np.ndarray], cache: "DecodingCache | None" = None
               ) -> tuple[np.ndarray, "DecodingCache"]:
        """One cached decoding step (see :meth:`xformer.backend.Backend.decode`), eager, no grad,
        dropout off (whatever mode the model ran in before). A decoded-side attention mask left
        out means the cached positions keep their mask and the new ones attend."""
        torch, spec = self.torch, model.spec
        if spec.architecture == "encoder" or spec.head != "lm":
            raise InputError(f"decode needs a decoder or an encoder-decoder with head = 'lm'; "
                             f"this is an {spec.architecture} with head = {spec.head!r}")
        enc_dec = spec.architecture == "encoder-decoder"
        past = 0 if cache is None else cache.past_length
        mask_key = "decoder_attention_mask" if enc_dec else "attention_mask"
        mask_given = inputs.get(mask_key) is not None
        checked = check_inputs(spec, inputs, self._np_dtype(model).name, past_length=past,
                               encoder=cache is None or not enc_dec)
        x = self._to_torch(model, checked)
        mask = x.pop(mask_key)
        if cache is not None:
            if mask.shape[0] != cache.batch_size:
                raise InputError(f"decode: the cache holds {cache.batch_size} rows, the inputs "
                                 f"{mask.shape[0]} (reorder_cache changes the row count)")
            if not mask_given:
                mask = torch.cat([cache.attention_mask, mask[:, past:]], dim=1)
        with self._eval(model), torch.no_grad():
            if not enc_dec:
                out = model(**x, attention_mask=mask, use_cache=True,
                            past_key_values=None if cache is None else cache.past_key_values)
                source_mask = None
            elif cache is None:
                source_mask = x.pop("attention_mask")
                out = model(**x, attention_mask=source_mask, decoder_attention_mask=mask,
                            use_cache=True)
            else:
                source_mask = cache.encoder_attention_mask
                out = model(**x, attention_mask=source_mask, decoder_attention_mask=mask,
                            past_key_values=cache.past_key_values, use_cache=True)
        new = DecodingCache(out["past_key_values"], mask, source_mask)
        return out["logits"].detach().cpu().numpy(), new

    def reorder_cache(self, model, cache: "DecodingCache", beam_idx: np.ndarray
                      ) -> "DecodingCache":
        idx = np.asarray(beam_idx)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or (
                idx.size and (idx.min() < 0 or idx.max() >= cache.batch_size)):
            raise InputError(f"beam_idx must be a 1-D integer array of rows in "
                             f"[0, {cache.batch_size}), got {idx.dtype} {idx.shape}")
        return cache.index_select(self.torch.from_numpy(idx.astype(np.int64)).to(
            cache.attention_mask.device))

    # -- helpers -------------------------------------------------------------------------
    def _cotangents(self, model, out: Mapping[str, Any], cotangents: Mapping[str, np.ndarray]
                    ) -> tuple[list[str], list[Any]]:
        """The output names that have a cotangent, and those cotangents as tensors in the model
        dtype. Raises ``InputError`` for an unknown output name or a shape mismatch."""
        unknown = set(cotangents) - set(out)
        if unknown:
            raise InputError(f"cotangents for unknown outputs {sorted(unknown)}; "
                             f"outputs: {sorted(out)}")
        names = [k for k in out if k in cotangents]
        cots = [self.torch.as_tensor(np.asarray(cotangents[k], dtype=self._np_dtype(model)),
                                     device=out[k].device)
                for k in names]
        for k, c in zip(names, cots):
            if c.shape != out[k].shape:
                raise InputError(f"cotangent {k!r} has shape {tuple(c.shape)}, the output "
                                 f"{tuple(out[k].shape)}")
        return names, cots

    def _np_dtype(self, model) -> np.dtype:
        return np.dtype(str(model.dtype).removeprefix("torch."))

    def _tensors(self, model, inputs: Mapping[str, Any]) -> dict[str, Any]:
        return self._to_torch(model, check_inputs(model.spec, inputs, self._np_dtype(model).name))

    def _to_torch(self, model, checked: Mapping[str, np.ndarray]) -> dict[str, Any]:
        device = model.embeddings.word_embeddings.weight.device
        return {k: self.torch.from_numpy(np.ascontiguousarray(v)).to(device)
                for k, v in checked.items()}

    def _callable(self, model, mode: str):
        if mode == "eager":
            return model
        compiled = model.__dict__.get("_xformer_compiled")
        if compiled is None:  # via __dict__: an nn.Module attribute would join the state_dict
            # Inductor's pattern matcher rewrites softmax(QK^T/s + bias)V into the fused CPU SDPA
            # kernel, whose backward is wrong for a fully padded row under a finfo.min mask
            # (gradients 5x off at T=5; forward fine): keep the written-out attention.
            compiled = self.torch.compile(model, options={"pattern_matcher": False})
            model.__dict__["_xformer_compiled"] = compiled
        return compiled

    def _eval(self, model):
        return _EvalMode(model)


class _EvalMode:
    """``with _EvalMode(model):`` dropout off inside, the caller's train/eval mode restored."""

    def __init__(self, model) -> None:
        self.model, self.training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc) -> None:
        self.model.train(self.training)


@dataclass(frozen=True)
class DecodingCache:
    """The key/value cache of :meth:`TorchBackend.decode` (torch tensors).

    Attributes:
        past_key_values: per decoder layer ``(k, v)`` ``(B, H, past, d_head)`` of the causal
            self-attention, plus ``(cross_k, cross_v)`` ``(B, H, S, d_head)`` for an
            encoder-decoder (projected from the encoder output once, on the first call): the
            models' ``past_key_values`` (Hugging Face's legacy tuple format).
        attention_mask: ``(B, past)`` the decoded side's mask so far, in the model dtype.
        encoder_attention_mask: ``(B, S)`` the source mask (encoder-decoder), else ``None``.
    """

    past_key_values: tuple
    attention_mask: Any
    encoder_attention_mask: Any = None

    @property
    def past_length(self) -> int:
        return int(self.attention_mask.shape[1])

    @property
    def batch_size(self) -> int:
        return int(self.attention_mask.shape[0])

    def index_select(self, rows) -> "DecodingCache":
        """Batch rows gathered by the int64 tensor ``rows`` (beam search)."""
        pkv = tuple(tuple(t.index_select(0, rows) for t in layer)
                    for layer in self.past_key_values)
        enc = (None if self.encoder_attention_mask is None
               else self.encoder_attention_mask.index_select(0, rows))
        return DecodingCache(pkv, self.attention_mask.index_select(0, rows), enc)
