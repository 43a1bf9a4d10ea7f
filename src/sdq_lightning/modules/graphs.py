"""CUDA graphs for the quantized network's training step, without a compiler.

A quantized training step on a GPU is bound by kernel launches: a searched ResNet20 runs about 10,000 small kernels per
step (``benchmarks/count_ops.py``), so the host, not the GPU, sets its pace. :class:`GraphedNetwork` captures the
network's training-mode forward AND backward once as two CUDA graphs
(:func:`torch.cuda.make_graphed_callables`) and replays them: two launches instead of thousands. It needs no
compiler (capture takes a few forward/backward passes, not minutes of Inductor), and it is correct for SDQ because
the quantizers' training forward never reads the device from the host: the live level, the DBPs, the draw counter
and the temperature are device tensors changed in place, so a replay sees the values of this step (see
:mod:`sdq_lightning.quantizers.sdq`).

What changes the captured work, and is therefore checked on every call (a Python key; no device read):

* the frozen bitwidth of each weight quantizer (the freeze) and the activation quantizers' initialised flags;
* which parameters require gradients, and the module's train/eval mode;
* the input's shape, dtype and device, and the autocast dtype.

A call that matches the captured key replays; a changed quantizer state or ``requires_grad`` re-captures; any
other call (evaluation, no-grad, the smaller last batch, another autocast dtype) runs the module's own forward.
Capture runs ``warmup`` untimed passes plus one captured pass; the buffers they move (BatchNorm running statistics,
draw counters) are restored afterwards, so a graphed run sees the same buffer values as an eager one.

Limits: CUDA only, one device (not under data parallelism), the network's output must be a tensor or a tuple of
tensors, and forward hooks INSIDE the network do not run on replay (``on_output`` receives the network's output
instead: this is how the SDQ callback takes the classifier's output for KD).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.sdq import structure_key

__all__ = ["GraphedCall", "GraphedNetwork", "GraphedOptimizerStep", "capture_eagerly"]

CaptureFn = Callable[..., nn.Module]


@contextmanager
def _capturing(device_type: str, restore: list[Tensor]):
    """Around a capture: this call's autocast without its weight cache (captures refuse it), and ``restore`` put back
    afterwards (the warm-up passes run for real and move BatchNorm statistics, draw counters, optimizer state)."""
    dtype = GraphedNetwork._autocast_dtype(device_type)
    saved = [t.detach().clone() for t in restore]
    try:
        with torch.autocast(device_type, dtype=dtype, cache_enabled=False) if dtype is not None else nullcontext():
            yield
    finally:
        with torch.no_grad():
            for t, v in zip(restore, saved):
                t.copy_(v)


def _make_graphed(net: nn.Module, sample: tuple[Tensor, ...], warmup: int) -> nn.Module:
    return torch.cuda.make_graphed_callables(net, sample, num_warmup_iters=warmup, allow_unused_input=True)


class GraphedNetwork:
    """Install on ``net`` (replacing its ``forward``): see the module docstring.

    Args:
        net: the network (e.g. ``SDQClassifier.model``), already on its CUDA device.
        warmup: untimed passes before the capture (cuDNN and allocator warm-up).
        on_output: called with the network's output on every training call with gradients (graphed or not).
        capture_fn: how to capture (default :func:`torch.cuda.make_graphed_callables`); tests pass a CPU stand-in.
        fallback: a capture that fails warns once and leaves the network eager (True), or raises (False, default).
    """

    def __init__(self, net: nn.Module, warmup: int = 3, on_output: Callable[[Any], None] | None = None,
                 capture_fn: CaptureFn | None = None, fallback: bool = False) -> None:
        from sdq_lightning.modules.batched import BatchedWeights

        inner = vars(net).get("forward")
        if inner is not None and not isinstance(inner, BatchedWeights):
            raise ValueError(f"{type(net).__name__}.forward is already replaced on the instance (another graph or "
                             f"wrapper); GraphedNetwork needs the class's own forward (or the batched weights)")
        # the batched weight pass (sdq_lightning.modules.batched), when installed, is captured with the network
        self._inner: Callable[..., Any] | None = inner
        self.net, self.warmup, self.on_output = net, int(warmup), on_output
        self._capture_fn = capture_fn or _make_graphed
        self._graphed: Callable[..., Any] | None = None
        self._key: tuple | None = None
        self.captures = 0  # how many times the step was captured (a re-capture follows a freeze)
        self.replays = 0
        self.fallback = bool(fallback)
        self.failed: str | None = None  # why the capture failed (then every call runs eager)
        from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer

        self._weight_q = [m for m in net.modules() if isinstance(m, SDQWeightQuantizer)]
        self._act_q = [m for m in net.modules() if isinstance(m, ActQuantizer)]
        self._params = list(net.parameters())
        net.forward = self  # an instance attribute: nn.Module.__call__ finds it first

    # ---------------------------------------------------------------- keys
    def _state_key(self) -> tuple:
        return structure_key(self._weight_q + self._act_q), tuple(p.requires_grad for p in self._params)

    @staticmethod
    def _autocast_dtype(device_type: str) -> torch.dtype | None:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None

    def _call_key(self, args: tuple) -> tuple | None:
        """The key of a call that may be graphed (training, gradients on, tensor inputs), else None."""
        if not (self.net.training and torch.is_grad_enabled()) or not args or \
                not all(isinstance(a, Tensor) for a in args):
            return None
        dev = args[0].device.type
        return (tuple((a.shape, a.dtype, a.device, a.requires_grad) for a in args), self._autocast_dtype(dev),
                self._state_key())

    # ---------------------------------------------------------------- call
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = None if kwargs or self.failed else self._call_key(args)
        if key is not None and (self._graphed is None or key[-1] != self._key[-1]):
            try:
                self.capture(*args)
            except Exception as err:  # noqa: BLE001 - reported, then eager (fallback) or raised
                if not self.fallback:
                    raise
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"CUDA-graph capture of {type(self.net).__name__} failed ({self.failed}); it runs "
                              f"eager from now on", RuntimeWarning, stacklevel=2)
                key = None
        if key is None:
            out = self._eager(*args, **kwargs)
        else:
            if key == self._key:
                out = self._graphed(*args)
                self.replays += 1
            else:  # a shape, dtype or autocast the graph was not captured for (e.g. the smaller last batch)
                out = self._eager(*args)
        if self.on_output is not None and self.net.training and torch.is_grad_enabled():
            self.on_output(out)
        return out

    def _eager(self, *args: Any, **kwargs: Any) -> Any:
        if self._inner is not None:
            return self._inner(*args, **kwargs)
        return type(self.net).forward(self.net, *args, **kwargs)

    def capture(self, *args: Tensor) -> None:
        """(Re-)capture the training forward and backward for inputs shaped like ``args``."""
        net = self.net
        del net.forward  # the capture wraps the class's own forward, or the batched weights around it
        if self._inner is not None:
            net.forward = self._inner
        self._graphed = None
        sample = tuple(a.detach().clone() for a in args)
        if self._inner is not None:  # the batched weights' index tensors are built eagerly, never inside a capture
            self._inner.groups()
        try:
            with _capturing(sample[0].device.type, list(net.buffers())):
                graphed_net = self._capture_fn(net, sample, self.warmup)
            graphed = vars(graphed_net).get("forward")
            if graphed is None:
                raise RuntimeError("the capture did not install a graphed forward on the network")
        finally:
            vars(net).pop("forward", None)
            net.forward = self
        self._graphed = graphed
        self._key = self._call_key(args)
        self.captures += 1

    def remove(self) -> None:
        """Give the network its own forward back, or the batched weights it wrapped (and drop the graphs)."""
        if vars(self.net).get("forward") is self:
            del self.net.forward
            if self._inner is not None:
                self.net.forward = self._inner
        self._graphed, self._key = None, None


# ===================================================================== the eager work around the graphed network
ReplayFn = Callable[[], Any]
CallCaptureFn = Callable[[Callable[..., Any], tuple, int], ReplayFn]


def _capture_call(fn: Callable[..., Any], inputs: tuple, warmup: int) -> ReplayFn:
    """Capture ``fn(*inputs)`` as one CUDA graph after ``warmup`` passes on a side stream; return the replay, which
    returns the graph's static output (overwritten by the next replay)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA calls of other threads (a data loader's pin-memory thread) do not invalidate the capture
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn(*inputs)

    def replay() -> Any:
        graph.replay()
        return out

    return replay


def capture_eagerly(fn: Callable[..., Any], inputs: tuple, warmup: int) -> ReplayFn:
    """A stand-in for :func:`_capture_call` without CUDA, with the same contract: ``warmup`` passes and one
    "captured" pass run ``fn`` for real, then each replay recomputes ``fn`` on the STATIC inputs and writes the result
    into the static outputs of the capture, returning those same tensors (as a CUDA graph overwrites its outputs).
    For tests of the dispatch and of the replayed values on the CPU, and for ``benchmarks/count_app_ops.py``."""
    from torch.utils._pytree import tree_flatten

    for _ in range(warmup):
        fn(*inputs)
    static_out = fn(*inputs)
    static, _ = tree_flatten(static_out)

    def replay() -> Any:
        fresh, _ = tree_flatten(fn(*inputs))
        with torch.no_grad():
            for s, f in zip(static, fresh):
                if s is not None:
                    s.copy_(f)
        return static_out

    return replay


class GraphedCall:
    """Replay ``fn(*inputs)`` as one CUDA graph: for the work that runs eager next to a :class:`GraphedNetwork` each
    step, where a graph of its own turns dozens of launches into one (the KD teacher's forward and the EBR term with
    its weight gradients in :class:`~sdq_lightning.core.losses.AddedLosses`; the DBP step in
    :class:`~sdq_lightning.core.search.BitSearch`; the step-size optimizer, :class:`GraphedOptimizerStep`).

    ``fn`` takes tensors and returns a tensor or a (nested) tuple/list of tensors and Nones. Each call copies its
    inputs into the graph's static inputs and replays; what it returns is the graph's static output, valid until the
    next call (clone what must outlive it). ``fn`` must read every other tensor in place (parameters updated by an
    optimizer in place are seen by the replay) and must not synchronise with the host.

    One graph is kept per call key (the last ``max_graphs``, default 4: so the smaller last batch of an epoch is
    captured once per run, not twice per epoch); a new key is captured when the inputs' shapes, dtypes or devices,
    the autocast dtype, the grad mode or ``key()`` change (``key``: a Python value describing the state ``fn`` depends on, e.g. the frozen bitwidths);
    never from a device read; Python numbers that ``fn`` passes to kernels (a learning rate) are baked into the graph,
    so they belong in the key. A capture that fails warns once and leaves the call eager for the rest of the run.
    The capture runs ``fn`` ``warmup`` times for real: when ``fn`` changes state (an optimizer step), ``state()``
    lists the tensors it changes, restored after the capture, so that every call is exactly one ``fn``.

    Args:
        fn: the work to capture.
        key: a zero-argument function returning a hashable Python value (default: none).
        state: a zero-argument function returning the tensors ``fn`` changes in place (default: none).
        name: for messages.
        warmup: untimed passes before the capture.
        capture_fn: how to capture (default: a side-stream warm-up and :class:`torch.cuda.CUDAGraph`); tests pass a
            CPU stand-in ``(fn, inputs, warmup) -> replay``.
        max_graphs: graphs kept (least recently used dropped first).
    """

    def __init__(self, fn: Callable[..., Any], key: Callable[[], Any] | None = None, name: str = "call",
                 warmup: int = 2, capture_fn: CallCaptureFn | None = None,
                 state: Callable[[], list[Tensor]] | None = None, max_graphs: int = 4) -> None:
        self.fn, self.key, self.name, self.warmup, self.state = fn, key, name, int(warmup), state
        self._capture_fn = capture_fn or _capture_call
        self.max_graphs = max(int(max_graphs), 1)
        self._graphs: OrderedDict[tuple, tuple[tuple[Tensor, ...], ReplayFn]] = OrderedDict()
        self.captures = 0
        self.replays = 0
        self.failed: str | None = None

    def _call_key(self, args: tuple) -> tuple:
        dev = args[0].device.type if args else "cuda"
        return (tuple((a.shape, a.dtype, a.device) for a in args), GraphedNetwork._autocast_dtype(dev),
                torch.is_grad_enabled(), self.key() if self.key is not None else None)

    def __call__(self, *args: Tensor) -> Any:
        if self.failed:
            return self.fn(*args)
        key = self._call_key(args)
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self.capture(*args, key=key)
            except Exception as err:  # noqa: BLE001 - reported once, then eager for the rest of the run
                self.failed = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                warnings.warn(f"CUDA-graph capture of {self.name} failed ({self.failed}); it runs eager from now on",
                              RuntimeWarning, stacklevel=2)
                self._graphs.clear()
                return self.fn(*args)
        else:
            self._graphs.move_to_end(key)
        inputs, replay = entry
        if len(args) > 1:  # one multi-tensor copy (a few kernels), not one per input
            torch._foreach_copy_(list(inputs), list(args))
        elif args:
            inputs[0].copy_(args[0])
        self.replays += 1
        return replay()

    def capture(self, *args: Tensor, key: tuple | None = None) -> tuple[tuple[Tensor, ...], ReplayFn]:
        """Capture ``fn`` for inputs shaped like ``args`` (kept under ``key``, default this call's key)."""
        key = self._call_key(args) if key is None else key
        inputs = tuple(a.detach().clone() for a in args)
        with _capturing(args[0].device.type if args else "cuda", list(self.state()) if self.state else []):
            replay = self._capture_fn(self.fn, inputs, self.warmup)
        self.captures += 1
        self._graphs[key] = (inputs, replay)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return inputs, replay

    def reset(self) -> None:
        """Drop the graphs (the next call captures again)."""
        self._graphs.clear()


class GraphedOptimizerStep:
    """An optimizer's step replayed as a CUDA graph (:class:`GraphedCall`), this step's gradients as its inputs.

    For an optimizer with one parameter group and ``step_grads(params, grads)`` / ``has_state(params)`` (the LSQ
    step sizes' :class:`~sdq_lightning.quantizers.optim.LogStepAdam`). :meth:`step` replays from the optimizer's
    second step (its first makes the state, eagerly) and runs ``optimizer.step()`` eagerly when it cannot replay
    (several groups, no gradients). The parameters with a gradient are part of the graph's key.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, capture_fn: CallCaptureFn | None = None,
                 name: str = "the step-size optimizer") -> None:
        self.optimizer = optimizer
        self._params: list[Tensor] = []
        self.graph = GraphedCall(self._step, key=self._key, name=name, capture_fn=capture_fn, state=self._state)

    def _key(self) -> tuple:
        groups = self.optimizer.param_groups
        return tuple(id(p) for p in self._params), tuple(tuple(sorted((k, v) for k, v in g.items() if k != "params"))
                                                         for g in groups)

    def _step(self, *grads: Tensor) -> None:
        self.optimizer.step_grads(self._params, list(grads))

    def _state(self) -> list[Tensor]:
        return self._params + [t for p in self._params for t in self.optimizer.state[p].values()
                               if isinstance(t, Tensor)]

    def step(self) -> None:
        """One step of the optimizer from the gradients in ``.grad``."""
        opt = self.optimizer
        if len(opt.param_groups) == 1:
            ps = [p for p in opt.param_groups[0]["params"] if p.grad is not None]
            if ps and opt.has_state(ps):
                self._params = ps
                self.graph(*[p.grad for p in ps])
                return
        opt.step()
