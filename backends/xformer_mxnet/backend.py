"""The MXNet backend: Apache MXNet 1.9.1 Gluon blocks behind the
:class:`xformer.backend.Backend` contract (imports MXNet lazily).

Modes: ``"imperative"`` (plain Gluon blocks) and ``"hybridize"`` (one cached graph,
``hybridize(static_alloc=True, static_shape=True)``). Only the framework-specific hooks live
here; :class:`~xformer.backend.Backend` validates the inputs, cotangents, caches and beam
indices once for every backend.

The gradient w.r.t. ``inputs_embeds`` (and ``decoder_inputs_embeds``) splits the chain rule:
the looked-up (scaled) token embeddings enter the model as a leaf with ``attach_grad()``, and
their gradient is then backpropagated through the lookup into the token table and added to what
the model gave it (the tied LM head's part, or the other side's lookup with
``share_embeddings``).

Cached decoding runs imperatively whatever the mode (:func:`xformer_mxnet.modules.imperative`):
the hybridized graph of full-sequence calls is kept. Divergence localisation (:meth:`trace`)
also runs imperatively, with a zero "probe" added to each node's output for the one pass, so
``mx.autograd.grad`` gives the gradient flowing into every node.

Data-parallel training (issue #12, :mod:`xformer.distributed`) goes through MXNet's parameter
server: the worker joins the ``dist_sync`` kvstore (:meth:`MXNetBackend._init_distributed`),
the ``gluon.Trainer`` reduces the gradients through it (``update_on_kvstore=False``) and every
worker clips and updates its own copy; the scheduler and the servers are
``python -m xformer_mxnet.ps`` (:mod:`xformer_mxnet.ps`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import socket
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from xformer.backend import Backend, check_dtype
from xformer.weights import check_weights


#: Seconds a data-parallel worker waits for the scheduler to listen before it gives up.
SCHEDULER_WAIT = 120.0


@contextlib.contextmanager
def _quiet():
    """Hybridizing the ``inputs_embeds`` graph warns that ``word_embeddings`` is unused: true."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Parameter .* is not used", UserWarning)
        yield


@dataclass
class _Run:
    """What :meth:`MXNetBackend._make_trainer` returns: the ``gluon.Trainer``, the canonical
    parameters it updates (its index order, = their kvstore keys) and the run's config; in a
    data-parallel run also the ``dist_sync`` kvstore and ``{micro-batch count: kvstore key}``
    of the loss vectors (:meth:`MXNetBackend._global_loss`)."""

    trainer: Any
    params: dict
    config: Any
    kvstore: Any = None
    loss_keys: dict = field(default_factory=dict)


def lm_loss(logits, labels: np.ndarray, shift: bool):
    """The language-model objective in MXNet (Hugging Face ``ForCausalLMLoss`` /
    ``CrossEntropyLoss(ignore_index=-100)``; :func:`xformer.training.causal_lm_loss` and
    :func:`~xformer.training.seq2seq_lm_loss` are its numpy statement): the mean over the
    positions whose label is not ``-100`` of ``logsumexp(logits) - logits[label]``, in the
    logits' dtype; with ``shift`` (causal LM) ``logits[:, :-1]`` against ``labels[:, 1:]``.

    Written as ``x - max(x)`` (the max detached), ``log(sum(exp(.)))`` and ``pick`` rather than
    ``mx.nd.log_softmax`` + ``pick``: in float32 the backward of ``log_softmax`` is about 10x
    noisier (measured: a tied-embedding gradient component of 3e-8 came back 5% off, where
    torch's ``cross_entropy`` is 0.5% off), and Adam, which divides each component by its own
    size, turns such a component's error into the same relative error of its update
    (tests/test_train_mxnet.py, docs/pitfalls.md). float64 is exact either way.

    Args:
        logits: ``(B, T, V)`` NDArray (inside ``autograd.record`` for a backward pass).
        labels: ``(B, T)`` int64 numpy, values in ``[0, V)`` or ``-100``, at least one scored
            (the Backend template checks).
        shift: ``True`` for a causal LM, ``False`` for seq2seq.
    Returns:
        a ``(1,)`` NDArray of the logits' dtype.
    """
    from .modules import mx  # imported already: logits is an NDArray

    if shift:
        logits = mx.nd.slice_axis(logits, axis=1, begin=0, end=-1)
        labels = labels[:, 1:]
    keep = labels != -100
    dtype = logits.dtype
    targets = mx.nd.array(np.where(keep, labels, 0), ctx=logits.context, dtype=dtype)
    weights = mx.nd.array(keep, ctx=logits.context, dtype=dtype)
    shifted = logits - mx.nd.max(logits, axis=-1, keepdims=True).detach()
    lse = mx.nd.log(mx.nd.sum(mx.nd.exp(shifted), axis=-1))  # (B, T)
    picked = mx.nd.pick(shifted, targets, axis=-1) - lse  # log p(label)
    return -mx.nd.sum(picked * weights).reshape((1,)) / float(keep.sum())


def _free_kvstore(kv, barrier: bool = True) -> None:
    """Free ``kv``'s C++ ``KVStore`` now, as its ``__del__`` would (``MXKVStoreFree``), and
    leave it a NULL handle, which a later ``__del__`` (or call) frees as nothing
    (``delete nullptr``).

    A ``dist_sync`` worker's destructor waits for every worker (``barrier_before_exit``), has
    rank 0 stop the servers and finalises ps-lite with a last barrier of all nodes: the clean
    end of a run. ``barrier=False`` (``MXKVStoreSetBarrierBeforeExit(0)``) leaves without
    waiting for anyone, for a worker that fails while the others are still training: with the
    barrier it would hang at exit, its failure unseen by the launcher."""
    from mxnet.base import _LIB, KVStoreHandle, check_call

    if not kv.handle:
        return
    if not barrier:
        check_call(_LIB.MXKVStoreSetBarrierBeforeExit(kv.handle, ctypes.c_int(0)))
    handle, kv.handle = kv.handle, KVStoreHandle()
    check_call(_LIB.MXKVStoreFree(handle))


class MXNetBackend(Backend):
    """Builds :class:`xformer_mxnet.modules.EncoderModel`, ``DecoderModel`` or
    ``EncoderDecoderModel`` (Gluon ``HybridBlock`` s) from ``spec.architecture`` and runs them.
    Canonical names map to Gluon parameters through
    :func:`xformer_mxnet.modules.canonical_parameters`."""

    name = "mxnet"
    modes = ("imperative", "hybridize")
    default_modes = ("imperative", "hybridize")
    preferred_mode = "hybridize"
    #: The ``dist_sync`` kvstore of a data-parallel run (:meth:`_init_distributed`), else None.
    _kv: Any = None

    def __init__(self) -> None:
        from . import modules  # imports mxnet, after restoring numpy's np.bool alias

        self._modules = modules
        self._mx = modules.mx

    # -- the model -----------------------------------------------------------------------
    def build(self, spec, dtype: str = "float32") -> Any:
        cls = {"encoder": self._modules.EncoderModel, "decoder": self._modules.DecoderModel,
               "encoder-decoder": self._modules.EncoderDecoderModel}[spec.architecture]
        model = cls(spec, check_dtype(dtype))
        model.initialize(self._mx.init.Normal(0.02))  # LayerNorm and bias inits: ones / zeros
        return model

    def set_weights(self, model, weights: Mapping[str, np.ndarray]) -> None:
        weights = check_weights(model.spec, weights)
        for name, param in self._modules.canonical_parameters(model).items():
            param.set_data(self._mx.nd.array(weights[name], dtype=model.dtype))

    def get_weights(self, model) -> dict[str, np.ndarray]:
        return {name: param.data().asnumpy()
                for name, param in self._modules.canonical_parameters(model).items()}

    def model_dtype(self, model) -> str:
        return np.dtype(model.dtype).name

    # -- the hooks -----------------------------------------------------------------------
    def _forward(self, model, inputs: dict[str, np.ndarray], mode: str
                 ) -> dict[str, np.ndarray]:
        args = self._call_args(model, inputs, mode)
        with self._mx.autograd.predict_mode(), _quiet():  # predict_mode: dropout off
            out = model(**args)
        return self._outputs(model, out)

    def _forward_backward(self, model, inputs: dict[str, np.ndarray],
                          cotangents: dict[str, np.ndarray], mode: str
                          ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        mx = self._mx
        spec = model.spec
        args = self._call_args(model, inputs, mode)
        params = self._modules.canonical_parameters(model)
        for param in params.values():
            param.zero_grad()
        sides = [("input_ids", "inputs_embeds", "encoder", model.embed_tokens)]
        if spec.architecture == "encoder-decoder":
            sides.append(("decoder_input_ids", "decoder_inputs_embeds", "decoder",
                          model.embed_decoder_tokens))
        lookups = []
        for ids_key, embeds_key, side, embed in sides:
            ids = args.pop(ids_key, None)
            if ids is not None:  # detached lookup: a leaf whose gradient we read
                args[embeds_key] = embed(ids)
                lookups.append((ids, embeds_key, side, embed))
            args[embeds_key].attach_grad()
        with mx.autograd.record(train_mode=False), _quiet():  # train_mode=False: dropout off
            out = model(**args)
        heads = list(out) if isinstance(out, (tuple, list)) else [out]
        mx.autograd.backward(heads, head_grads=[
            mx.nd.array(cotangents[n], dtype=model.dtype) for n in spec.output_names()])
        grads = {name: param.grad().asnumpy() for name, param in params.items()}
        for ids, embeds_key, side, embed in lookups:
            # d loss / d token table through the lookup (and the scale), added to the part the
            # model gave it (a tied LM head; the other side with share_embeddings)
            with mx.autograd.record(train_mode=False):
                looked_up = embed(ids)
            looked_up.backward(args[embeds_key].grad)
            name = spec.word_embedding_name(side)
            grads[name] = grads[name] + params[name].grad().asnumpy()
        for _, embeds_key, _, _ in sides:
            grads[embeds_key] = args[embeds_key].grad.asnumpy()
        return self._outputs(model, out), grads

    def _probed_forward(self, name: str, block, values: dict, probes: dict,
                        once: bool = False):
        """``block.forward`` (the instance's or the class's) wrapped so that its output (the
        first, for a tuple) gets an exact zero ``probe`` added, created outside the recording
        and marked with ``attach_grad()``: ``d loss / d probe`` is the gradient flowing into
        that output. Records ``values[name]`` (the output) and ``probes[name]``; a call that
        returns no NDArray is passed through unrecorded. ``once``: a second call in the same
        pass is a RuntimeError (:meth:`_trace`'s nodes run once; a user's block may run more
        often, and its last call counts)."""
        mx = self._mx
        original = block.forward

        def forward(*call_args):
            out = original(*call_args)
            if once and name in values:
                raise RuntimeError(f"trace: node {name!r} ran twice in one forward pass")
            hidden = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(hidden, mx.nd.NDArray):
                return out
            with mx.autograd.pause():
                probe = mx.nd.zeros(hidden.shape, ctx=hidden.context, dtype=hidden.dtype)
            probe.attach_grad()
            values[name], probes[name] = hidden, probe
            hidden = hidden + probe
            return (hidden, *out[1:]) if isinstance(out, (tuple, list)) else hidden
        return forward

    def _trace(self, model, inputs: dict[str, np.ndarray], cotangents: dict[str, np.ndarray]
               ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Every node of ``model.spec.nodes()``: its output and the gradient of the loss
        ``sum_k sum(outputs[k] * cotangents[k])`` with respect to it (see
        :meth:`xformer.backend.Backend.trace`).

        One imperative forward pass inside ``autograd.record(train_mode=False)`` (dropout off),
        whatever the mode: a hybridized model runs block by block
        (:func:`xformer_mxnet.modules.imperative`) and keeps its cached graph. Gluon's forward
        hooks cannot change an output, so each node's block gets, for the pass only, an
        instance-level ``forward`` that records the output (the hidden state of an
        ``(out, (k, v))`` tuple) and returns ``output + probe``, ``probe`` a zero NDArray
        marked with ``attach_grad()``: adding an exact zero leaves every value as it was, and
        ``d loss / d probe`` is the gradient flowing into that output.
        ``mx.autograd.grad`` returns those gradients as new arrays, so no parameter's
        ``.grad`` is written. The wrappers are removed afterwards (also on error); the
        production forward path has no hook.

        Raises:
            RuntimeError: a node that did not run, or ran twice (a bug).
        """
        mx = self._mx
        spec = model.spec
        nodes = [name for name, _ in spec.nodes()]
        args = self._ndarrays(inputs)
        values: dict[str, Any] = {}
        probes: dict[str, Any] = {}
        blocks = [self._submodule(model, name) for name in nodes]
        try:
            for name, block in zip(nodes, blocks):
                object.__setattr__(block, "forward", self._probed_forward(
                    name, block, values, probes, once=True))
            with self._modules.imperative(model), mx.autograd.record(train_mode=False), \
                    _quiet():
                out = model(**args)
            missing = [n for n in nodes if n not in probes]
            if missing:
                raise RuntimeError(f"trace: nodes {missing} did not run")
            heads = list(out) if isinstance(out, (tuple, list)) else [out]
            cots = [mx.nd.array(cotangents[n], dtype=model.dtype) for n in spec.output_names()]
            grads = mx.autograd.grad(heads, [probes[n] for n in nodes], head_grads=cots,
                                     train_mode=False)
        finally:
            for block in blocks:
                vars(block).pop("forward", None)
        forward = {n: values[n].asnumpy() for n in nodes}
        backward = {n: g.asnumpy() for n, g in zip(nodes, grads)}
        return forward, backward

    def _decode_step(self, model, inputs: dict[str, np.ndarray], past_key_values, mode: str
                     ) -> tuple[np.ndarray, tuple]:
        """Imperative whatever ``mode`` (the models run cached calls block by block and keep
        their hybridized graph), dropout off."""
        args = self._ndarrays(inputs)
        with self._mx.autograd.predict_mode():
            out = model(**args, past_key_values=past_key_values, use_cache=True)
        return out[-2].asnumpy(), out[-1]  # (..., logits, past_key_values)

    def _reorder_past(self, past_key_values: tuple, beam_idx: np.ndarray) -> tuple:
        return self._modules.reorder_cache(past_key_values,
                                           self._mx.nd.array(beam_idx, dtype="int64"))

    # -- training ------------------------------------------------------------------------
    def _make_trainer(self, model, config, steps: int) -> "_Run":
        """A ``gluon.Trainer`` over the canonical parameters with the optimizer and schedule of
        ``config`` (:func:`xformer_mxnet.optimizers.make_optimizer`: MXNet optimizers with
        ``torch.optim`` semantics, an ``mx.lr_scheduler`` subclass). In a data-parallel run
        (:meth:`_init_distributed`, more than one worker) the Trainer reduces the gradients
        through the ``dist_sync`` kvstore; a float64 model first checks that the servers keep
        float64 (:meth:`_check_float64`)."""
        from . import optimizers

        mx = self._mx
        params = self._modules.canonical_parameters(model)
        kv = self._kv if self.world is not None and self.world.size > 1 else None
        if kv is not None and np.dtype(model.dtype) == np.float64:
            self._check_float64(kv, key=len(params))
        trainer = optimizers.make_optimizer(params, config, steps, kvstore=kv)
        if kv is not None:
            # Gluon initialises parameter i's key with rank 0's weights and pulls them back
            # (kvstore.broadcast) at the first allreduce_grads(), then pushpulls the gradient
            # under the same key. The pull and the push are independent engine operations
            # (the weights' and the gradient's arrays), so ps-lite may deliver this worker's
            # push first: once every worker has pushed, the server's value is the gradient
            # sum, and a pull still in flight returns that as the weights (seen under load:
            # a bias off by 150%). Broadcasting here, and waiting for it, orders them.
            trainer._init_kvstore()
            trainer._init_params()
            mx.nd.waitall()
        return _Run(trainer, params, config, kvstore=kv)

    def _train_step(self, model, trainer: "_Run", micro: list[dict[str, np.ndarray]],
                    masks: list[dict[str, np.ndarray]] | None, dropout: str, step: int,
                    mode: str, shares: list[float] | None = None) -> tuple[float, float, float]:
        """One optimizer step. Each micro-batch runs inside ``autograd.record`` (train mode
        unless ``dropout == "off"``), its loss (:func:`lm_loss`) divided by ``len(micro)``
        before ``backward``; the gradients are summed across micro-batches (each backward
        overwrites ``param.grad()``: ``grad_req="write"``, so a later
        :meth:`forward_backward` is not affected), reduced by ``trainer.allreduce_grads()``
        (a no-op in one process), clipped (:func:`xformer_mxnet.optimizers.clip_grad_norm`)
        and applied by ``trainer.update(1)`` (``rescale_grad`` 1: the loss is already a mean).

        ``mode`` ``"hybridize"`` trains through the cached graph with native or no dropout; with
        the dropout stream every mode runs the model imperatively
        (:func:`xformer_mxnet.modules.use_dropout_masks`: a hybridized graph cannot take the
        per-step mask NDArrays), keeping the cached graph for later calls.

        Data-parallel (``shares``, :mod:`xformer.distributed`): ``micro`` and ``masks`` are
        this worker's rows; micro-batch ``i``'s loss is scaled by ``shares[i]`` too, the
        summed local gradients go through the ``dist_sync`` kvstore once (``pushpull``: the
        server sums them over the workers, so every worker gets the gradient of the global
        mean), and clipping and the optimizer see that same reduced gradient on every worker.
        The returned loss is the global one (:meth:`_global_loss`)."""
        from xformer.training import objective

        from .optimizers import clip_grad_norm, global_norm

        mx = self._mx
        params = trainer.params
        shift = objective(model.spec) == "causal_lm"  # t predicts t + 1; seq2seq: no shift
        k = len(micro)
        total: dict[str, Any] = {}
        losses = []
        for i, batch in enumerate(micro):
            inputs = {key: v for key, v in batch.items() if key != "labels"}
            args = self._call_args(model, inputs, mode)
            site_masks = None if masks is None else {
                site: mx.nd.array(m, dtype=model.dtype) for site, m in masks[i].items()}
            with mx.autograd.record(train_mode=dropout != "off"), _quiet(), \
                    self._modules.use_dropout_masks(model, site_masks):
                out = model(**args)
                logits = out[-1]  # (..., logits): head="lm"
                loss = lm_loss(logits, batch["labels"], shift)
                scaled = loss / k if shares is None else loss * shares[i] / k
            scaled.backward()
            losses.append(loss.asnumpy()[0])
            for name, param in params.items():
                grad = param.grad()
                total[name] = grad.copy() if i == 0 else total[name] + grad
        grads = []
        for name, param in params.items():
            if k > 1:
                param.grad()[:] = total[name]
            grads.append(param.grad())
        trainer.trainer.allreduce_grads()  # dist_sync: each grad := its sum over the workers
        losses = np.array(losses, dtype=model.dtype)
        if shares is not None:
            losses = self._global_loss(trainer, losses * np.array(shares, dtype=model.dtype))
        clip = trainer.config.clip_grad_norm
        norm = global_norm(grads) if clip is None else clip_grad_norm(grads, clip)
        trainer.trainer.update(1)
        lr = trainer.trainer.learning_rate  # the Schedule at num_update = step + 1
        return float(np.mean(losses)), lr, norm

    def _global_loss(self, trainer: "_Run", weighted: np.ndarray) -> np.ndarray:
        """``(K,)`` per-micro-batch losses of the global batch: the sum over the workers of
        ``shares[i] * local mean loss[i]`` (``weighted``, this worker's), through the run's
        kvstore itself (``pushpull`` of one more key: the server sums, as for the gradients).
        Key ``len(params) + K``, initialised (to zeros, by rank 0, with MXNet's barrier) the
        first time a step has ``K`` micro-batches; every worker has the same ``K``."""
        mx = self._mx
        kv = trainer.kvstore
        k = len(weighted)
        key = trainer.loss_keys.get(k)
        if key is None:
            key = trainer.loss_keys[k] = len(trainer.params) + k
            kv.init(key, mx.nd.zeros((k,), dtype=weighted.dtype))
        value = mx.nd.array(weighted, dtype=weighted.dtype)
        kv.pushpull(key, value)  # in place: the sum over the workers
        return value.asnumpy()

    def _check_float64(self, kv, key: int) -> None:
        """Check that the kvstore's servers store and sum float64 as float64: initialise key
        ``key`` (reserved for this) with ``1 + 2**-40`` and pull it back.

        Raises:
            BackendError: it came back rounded to float32. MXNet 1.9.1's server leaves its
                ``multi_precision_`` flag uninitialised and, when the byte happens to be
                non-zero, keeps float32 copies of float64 keys (:mod:`xformer_mxnet.ps`, which
                starts its servers so that it reads false).
        """
        from xformer.backend import BackendError

        from .ps import SERVER_TUNABLES

        mx = self._mx
        want = 1.0 + 2.0 ** -40
        kv.init(key, mx.nd.array([want], dtype="float64"))
        back = mx.nd.zeros((1,), dtype="float64")
        kv.pull(key, out=back)
        got = float(back.asnumpy()[0])
        if got != want:
            raise BackendError(
                f"the MXNet kvstore server rounds float64 to float32 (1 + 2**-40 came back as "
                f"{got!r}): MXNet 1.9.1's KVStoreDistServer leaves multi_precision_ "
                f"uninitialised, so a server may keep float32 copies of float64 gradients; start "
                f"the servers with `DMLC_ROLE=server python -m xformer_mxnet.ps` (it runs them "
                f"with GLIBC_TUNABLES={SERVER_TUNABLES}), or train in float32")

    def _init_distributed(self):
        """Join the parameter-server run of ps-lite's environment (``DMLC_ROLE=worker``,
        ``DMLC_PS_ROOT_URI``, ``DMLC_PS_ROOT_PORT``, ``DMLC_NUM_SERVER``,
        ``DMLC_NUM_WORKER``): ``mx.kv.create("dist_sync")``, kept for :meth:`_make_trainer`
        and :meth:`_finish_distributed`.

        The world's rank (which rows this worker trains on, and rank 0 writes the checkpoint
        and the report) is the launcher's ``XFORMER_WORKER`` when it is set
        (:func:`xformer.distributed.launch`, which passes worker 0's standard output through),
        else the kvstore's. ps-lite's scheduler numbers the workers in the order they
        register (``DMLC_RANK`` is not read), so ``kv.rank`` is worker 0's only about half the
        time; MXNet's own use of its rank (rank 0 pushes the initial values of every key) needs
        nothing from ours, as every worker holds the same weights.

        Raises:
            BackendError: a variable missing or not a number (``XFORMER_WORKER`` outside
                ``[0, DMLC_NUM_WORKER)`` included), no scheduler listening at
                ``DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT`` within :data:`SCHEDULER_WAIT` seconds
                (ps-lite itself would wait forever), or MXNet refusing the kvstore.
        """
        from xformer.backend import BackendError
        from xformer.distributed import ENGINES, World
        from xformer.errors import first_line

        env = os.environ
        names = ("DMLC_PS_ROOT_URI", "DMLC_PS_ROOT_PORT", "DMLC_NUM_SERVER", "DMLC_NUM_WORKER")
        missing = [n for n in names if not env.get(n)]
        if missing:
            raise BackendError(f"this MXNet worker (DMLC_ROLE=worker) has no "
                               f"{', '.join(missing)}; set them as for the scheduler and the "
                               f"servers (docs/distributed.md), or use xformer train --nproc N")
        for n in names[1:]:
            if not env[n].isdigit() or int(env[n]) < 1:
                raise BackendError(f"{n} must be a positive integer, got {env[n]!r}")
        rank = env.get("XFORMER_WORKER")
        if rank is not None and not (rank.isdigit() and int(rank) < int(env["DMLC_NUM_WORKER"])):
            raise BackendError(f"XFORMER_WORKER must be a worker index in [0, DMLC_NUM_WORKER="
                               f"{env['DMLC_NUM_WORKER']}), got {rank!r}; leave it unset to use "
                               f"the rank MXNet's scheduler assigns")
        host, port = env["DMLC_PS_ROOT_URI"], int(env["DMLC_PS_ROOT_PORT"])
        deadline = time.monotonic() + SCHEDULER_WAIT
        while True:  # the scheduler may still be starting; ps-lite would block without a word
            try:
                socket.create_connection((host, port), timeout=5).close()
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise BackendError(f"no MXNet scheduler answered at {host}:{port} "
                                       f"(DMLC_PS_ROOT_URI:DMLC_PS_ROOT_PORT) within "
                                       f"{SCHEDULER_WAIT:.0f} s ({e.strerror or e}); start one "
                                       f"with DMLC_ROLE=scheduler python -m xformer_mxnet.ps")
                time.sleep(0.5)
        try:
            kv = self._mx.kv.create("dist_sync")
        except self._mx.base.MXNetError as e:
            raise BackendError(f"MXNet could not join the parameter-server run "
                               f"({first_line(e)}); this wheel needs USE_DIST_KVSTORE (every "
                               f"PyPI mxnet wheel has it)") from None
        self._kv = kv
        # a worker that fails before _finish_distributed leaves without the exit barrier
        atexit.register(_free_kvstore, kv, barrier=False)  # after it: frees nothing
        return World(ENGINES["mxnet"], kv.rank if rank is None else int(rank), kv.num_workers)

    def _finish_distributed(self) -> None:
        """Wait for every worker (``kv._barrier()``: each has finished its last step), then
        leave the run: free the kvstore now (:func:`_free_kvstore`: ``KVStoreDist``'s
        destructor waits for the engine, barriers the workers, has rank 0 stop the servers and
        finalises ps-lite), after which the scheduler and the servers exit 0. Left to the
        garbage collector, that would happen only when the last reference goes, the Trainer's
        among them (the model's parameters hold it), if at all before the interpreter's
        teardown."""
        kv, self._kv = self._kv, None
        if kv is None:
            return
        kv._barrier()
        _free_kvstore(kv)

    def _optimizer_state(self, model, trainer: "_Run") -> dict[str, np.ndarray]:
        """The ``gluon.Trainer``'s updater states (per parameter index, created on the first
        update) in ``torch.optim`` names: :class:`~xformer_mxnet.optimizers.SGD`'s buffer is
        ``momentum_buffer`` (``None`` without momentum: left out), ``Adam`` / ``AdamW``'s
        ``(m, v)`` are ``exp_avg`` / ``exp_avg_sq``. Gluon parameters are in canonical layout
        already."""
        states = trainer.trainer._updaters[0].states  # {parameter index: state}; no getter
        adam = trainer.config.optimizer != "sgd"
        out = {}
        for index, name in enumerate(trainer.params):
            state = states.get(index)
            if state is None:
                continue
            if adam:
                out[f"{name}:exp_avg"] = state[0].asnumpy()
                out[f"{name}:exp_avg_sq"] = state[1].asnumpy()
            else:
                out[f"{name}:momentum_buffer"] = state.asnumpy()
        return out

    # -- foreign modules (xformer check) ---------------------------------------------------
    def _foreign_parameters(self, module, inputs, cmap):
        """Gluon structural names (``block._collect_params_with_prefix()``, what
        ``save_parameters`` writes: ``blocks.0.wq.weight``, ``emb_ln.gamma``), a parameter
        shared between blocks once (its first name), ``Constant`` s left out (values, like
        torch buffers); Gluon's ``Dense`` weight is the canonical ``(out, in)``: nothing
        transposed by default.

        Parameters not initialized yet get Gluon's ``initialize()`` (their own initializer, or
        ``Uniform``); shapes still deferred (a ``Dense`` without ``in_units``) are inferred by
        one imperative call on ``inputs`` (under ``cmap.inputs``' names, dropout off), as a
        Gluon user's first call would.

        Raises:
            InputError: not a Gluon ``Block``; that first call failed (its error's first line).
        """
        from xformer.checking import _first_line
        from xformer.errors import InputError

        mx = self._mx
        if not isinstance(module, mx.gluon.Block):
            raise InputError(f"the factory returned {type(module).__name__}, not a Gluon "
                             f"Block (mxnet.gluon.Block / HybridBlock)")
        params = self._foreign_params(module)
        for p in params.values():
            if p._data is None and not p._deferred_init:
                p.initialize()  # a shape still unknown: deferred (Gluon's own layers allow it)
        if any(p._data is None for p in params.values()):
            kwargs = {cmap.inputs[k]: v for k, v in inputs.items() if k in cmap.inputs}
            call = self._foreign_call(module, self._ndarrays(kwargs))
            try:
                with self._modules.imperative(module), mx.autograd.predict_mode(), _quiet():
                    call()
            except InputError:
                raise
            except Exception as e:  # the user's module failed: their error, one line
                raise InputError(f"calling the module once to finish Gluon's deferred "
                                 f"initialization failed ({type(e).__name__}: "
                                 f"{_first_line(e)})") from None
            mx.nd.waitall()
        return {name: (tuple(p.shape), False) for name, p in params.items()}

    def _foreign_load(self, module, arrays, dtype: str) -> None:
        """``Parameter.set_data`` for each native name (shapes checked by
        :func:`xformer.checking.bind`).

        Raises:
            InputError: a parameter whose dtype is not ``dtype`` (the factory ignored it: give
                ``Dense`` / ``Embedding`` ``dtype=``, or ``cast`` the block).
        """
        from xformer.errors import InputError

        params = self._foreign_params(module)
        for name, value in arrays.items():
            p = params[name]
            if np.dtype(p.dtype) != np.dtype(dtype):
                raise InputError(f"parameter {name!r} is {np.dtype(p.dtype).name} but the check "
                                 f"runs in {dtype}; build the module in the dtype the factory "
                                 f"is given (dtype= or block.cast(dtype))")
            p.set_data(self._mx.nd.array(value, dtype=dtype))

    def _foreign_run(self, module, kwargs, output, cotangent, nodes):
        """One imperative pass inside ``autograd.record(train_mode=False)`` (dropout off),
        whatever the module's state: a hybridized module runs block by block
        (:func:`xformer_mxnet.modules.imperative`) and keeps its cached graph.

        The call: Gluon blocks take positional arguments only, so a block whose class keeps
        ``Block.__call__`` gets each input at the position of its argument name in
        ``hybrid_forward(self, F, ...)`` (or ``forward(self, ...)`` when that is overridden),
        skipped arguments given their defaults; ``forward(self, *args)`` takes them in the
        mapping file's ``inputs`` order. A block with its own ``__call__`` gets keywords.

        The gradient of ``sum(output * cotangent)`` (``cotangent`` as the head gradient):
        every parameter's gradient is zeroed first, so one the pass does not reach (or a
        ``grad_req="null"`` one) comes back as zeros; the parameters' ``.grad()`` hold this
        pass's gradients afterwards, as after any ``backward``. Nodes: as :meth:`_trace`, each
        mapped block gets, for the pass only, an instance ``forward`` that records its output
        (the first element of a tuple) and returns ``output + probe``, ``probe`` a zero NDArray
        with ``attach_grad()``, whose gradient is the one flowing into that output (a block
        called more than once: its last call). The wrappers and the blocks' ``_active`` flags
        are restored afterwards, also on error.

        Raises:
            InputError: a node path that is not a child block (``_children`` names, joined by
                dots), a node block that was not called, an input the module's call does not
                take, an output that is not an NDArray.
        """
        from xformer.checking import select_output
        from xformer.errors import InputError

        mx = self._mx
        blocks = {}
        for node, path in nodes.items():
            block, parts = module, path.split(".")
            for i, part in enumerate(parts):
                children = getattr(block, "_children", {})
                if part not in children:
                    at = ".".join(parts[:i]) or "the module"
                    raise InputError(f"nodes maps {node} to {path!r}, which is not a child "
                                     f"block of the module ({at} has "
                                     f"{', '.join(list(children)[:8]) or 'no children'})")
                block = children[part]
            blocks[node] = block
        params = self._foreign_params(module)
        for p in params.values():
            if p.grad_req != "null":
                p.zero_grad()
        values: dict[str, Any] = {}
        probes: dict[str, Any] = {}
        missing = object()
        saved = []
        call = self._foreign_call(module, self._ndarrays(kwargs))
        try:
            for node, block in blocks.items():
                saved.append((block, vars(block).get("forward", missing)))
                object.__setattr__(block, "forward",
                                   self._probed_forward(node, block, values, probes))
            with self._modules.imperative(module), mx.autograd.record(train_mode=False), \
                    _quiet():
                y = select_output(call(), output)
            if not isinstance(y, mx.nd.NDArray):
                raise InputError(f"the module's output is a {type(y).__name__}, not an "
                                 f"NDArray; set output in the mapping file")
            if tuple(y.shape) == cotangent.shape:
                mx.autograd.backward([y], head_grads=[mx.nd.array(cotangent, dtype=y.dtype)])
        finally:
            for block, forward in reversed(saved):
                if forward is missing:
                    vars(block).pop("forward", None)
                else:
                    object.__setattr__(block, "forward", forward)
        grads = {name: (np.zeros(tuple(p.shape), cotangent.dtype) if p.grad_req == "null"
                        else p.grad().asnumpy())
                 for name, p in params.items()}
        out = {}
        for node in nodes:
            if node not in values:
                raise InputError(f"node {node}'s block {nodes[node]!r} was not called in the "
                                 f"forward pass (or returned no NDArray)")
            g = probes[node].grad
            out[node] = (values[node].asnumpy(), np.zeros(values[node].shape, cotangent.dtype)
                         if g is None else g.asnumpy())
        return y.asnumpy(), grads, out

    def _foreign_params(self, module) -> dict:
        """``{structural name: Parameter}`` of a Gluon block, a shared Parameter under its
        first name, ``Constant`` s left out."""
        from mxnet.gluon.parameter import Constant

        out, seen = {}, set()
        for name, p in module._collect_params_with_prefix().items():
            if isinstance(p, Constant) or id(p) in seen:
                continue
            seen.add(id(p))
            out[name] = p
        return out

    def _foreign_call(self, module, x: dict):
        """A no-argument callable running ``module`` on ``x`` (``{call keyword: NDArray}``),
        positionally for a plain Gluon block (see :meth:`_foreign_run`).

        Raises:
            InputError: a keyword that is not an argument of the block's ``hybrid_forward`` /
                ``forward``, or an argument without a default that ``x`` does not give.
        """
        import inspect

        from xformer.errors import InputError

        gluon = self._mx.gluon
        cls = type(module)
        if cls.__call__ is not gluon.Block.__call__:  # its own __call__ (xformer's models)
            return lambda: module(**x)
        if isinstance(module, gluon.HybridBlock) and cls.forward is gluon.HybridBlock.forward:
            fn, skip, what = cls.hybrid_forward, 2, "hybrid_forward(self, F, "  # self, F
        else:
            fn, skip, what = cls.forward, 1, "forward(self, "
        try:
            sig = list(inspect.signature(fn).parameters.values())[skip:]
        except (TypeError, ValueError):  # no signature: the mapping's order
            return lambda: module(*x.values())
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        named = [p for p in sig if p.kind in kinds]
        if not named and any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig):
            return lambda: module(*x.values())
        names = [p.name for p in named]
        shown = f"{cls.__name__}.{what}{', '.join(names)})"
        unknown = [k for k in x if k not in names]
        if unknown:
            raise InputError(f"{shown} takes no {unknown[0]!r}; set inputs in the mapping file "
                             f"to its argument names (Gluon blocks are called positionally)")
        last = max(names.index(k) for k in x) if x else -1
        args = []
        for p in named[:last + 1]:
            if p.name in x:
                args.append(x[p.name])
            elif p.default is not inspect.Parameter.empty:
                args.append(p.default)
            else:
                raise InputError(f"{shown} needs {p.name!r}, which the mapping file's inputs "
                                 f"do not give")
        return lambda: module(*args)

    # -- the environment -----------------------------------------------------------------
    def framework_version(self) -> str:
        return self._mx.__version__

    def environment(self) -> dict[str, str]:
        # MXNet 1.9 has no getter for its thread pools: these variables set them at start-up
        workers = os.environ.get("MXNET_CPU_WORKER_NTHREADS") or "1"
        omp = os.environ.get("OMP_NUM_THREADS") or "default"
        return {"mxnet": self._mx.__version__,
                "mxnet threads": f"{workers} engine CPU workers, OpenMP {omp}"}

    # -- helpers -------------------------------------------------------------------------
    def _call_args(self, model, checked: Mapping[str, np.ndarray], mode: str) -> dict:
        """Checked inputs as NDArrays, and the model (un)hybridized for ``mode``."""
        if getattr(model, "_xformer_mode", None) != mode:
            model.hybridize(active=mode == "hybridize", static_alloc=True, static_shape=True)
            model._xformer_mode = mode
        return self._ndarrays(checked)

    def _ndarrays(self, checked: Mapping[str, np.ndarray]) -> dict:
        return {key: self._mx.nd.array(value, dtype=value.dtype)
                for key, value in checked.items()}

    @staticmethod
    def _submodule(model, name: str):
        """The child block at attribute path ``name`` (``"encoder.layers.0.self_attn"``),
        through Gluon's registered children (``nn.HybridSequential`` names them ``"0"``,
        ``"1"``, ...)."""
        block = model
        for part in name.split("."):
            children = block._children
            if part not in children:
                raise RuntimeError(f"trace: {type(model).__name__} has no block {name!r}")
            block = children[part]
        return block

    def _outputs(self, model, out) -> dict[str, np.ndarray]:
        heads = out if isinstance(out, (tuple, list)) else [out]
        return {name: h.asnumpy() for name, h in zip(model.spec.output_names(), heads)}
