"""The integer graph of a quantized network: the ops onnxruntime's integer kernels run, traced once with torch.fx.

Ops (each reads and writes quantized tensors, ``uint8`` codes with zero point 0, or 128 for a signed tensor):

* ``quantize``: the float network input (``QuantizeLinear``);
* ``conv``: a ``QuantConv2d`` with the BatchNorm after it folded in and a ReLU/ReLU6 after that fused
  (``QLinearConv``);
* ``add``: a residual add, a ReLU after it fused (``QLinearAdd``);
* ``maxpool``, ``gap`` (global average pool: ``QLinearGlobalAveragePool``), ``flatten``;
* ``linear``: the classifier, float logits (``QGemm``); it must produce the network's output.

Every tensor is held once, by one quantizer: a tensor read by quantized layers uses the input quantizer
(``act_quant``) of the first of them, and all of them must have the same input bits; any other tensor gets an 8-bit
quantizer of its own (created by :mod:`sdq_lightning.integer.network`). A tensor written by a ReLU/ReLU6 is
unsigned, any other signed (zero point 128); the network input keeps the sign its quantizer found in the data.

Anything else a network does (float layers, an op between a conv and its BatchNorm, a linear layer that is not the
output, ...) is a one-line ``ValueError`` naming the module or op.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from sdq_lightning.modules import QuantConv2d, QuantLinear

__all__ = ["IntegerGraph", "Op", "QTensor", "trace_integer_graph"]

NEW_QUANT = "integer_only.quant."  # module path prefix of the quantizers the graph adds


@dataclass
class QTensor:
    """A tensor the integer graph holds: ``bits``-bit codes of the quantizer at module path ``quant``."""

    name: str
    signed: bool
    bits: int
    quant: str


@dataclass
class Op:
    """One integer op. ``name``: the layer (conv, linear) or the op's module path (``layer1.0.add``)."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    output: str
    bn: str | None = None
    act: str | None = None  # "relu" | "relu6" | None
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class IntegerGraph:
    tensors: dict[str, QTensor]
    ops: list[Op]

    def consumers(self, tensor: str) -> list[Op]:
        return [op for op in self.ops if tensor in op.inputs]


def _batchnorm_act_type() -> tuple[type, ...]:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm is a dependency; a model without it just has no such layers
        return ()
    return (BatchNormAct2d,)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (QuantConv2d, QuantLinear, *_batchnorm_act_type())):
            return True
        return super().is_leaf_module(m, qualname)


def _scope(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


def _act_of(m: nn.Module) -> str | None | bool:
    """``"relu"``, ``"relu6"``, None (identity) or False (not an activation the graph knows)."""
    if isinstance(m, nn.ReLU6):
        return "relu6"
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.Hardtanh) and (m.min_val, m.max_val) == (0.0, 6.0):
        return "relu6"
    if isinstance(m, nn.Identity):
        return None
    return False


class _Classifier:
    """What each fx node is, in the graph's terms (``kind``, module)."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules

    def __call__(self, n: fx.Node) -> tuple[str, Any]:
        if n.op == "call_module":
            m = self.modules[n.target]
            if isinstance(m, QuantConv2d):
                return "conv", m
            if isinstance(m, QuantLinear):
                return "linear", m
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                raise ValueError(f"integer-only: layer {n.target!r} is kept in floating point; every Conv2d/Linear "
                                 f"must be quantized (first_last='8bit', no FP layers in the plan)")
            if isinstance(m, nn.BatchNorm2d):
                return "bn", m
            if isinstance(m, nn.Dropout) or type(m).__name__ == "DropPath":
                p = getattr(m, "p", getattr(m, "drop_prob", 0.0))
                if p:
                    raise ValueError(f"integer-only: {n.target!r} ({type(m).__name__}, p={p}) has no integer form; "
                                     f"use drop rate 0")
                return "identity", m
            act = _act_of(m)
            if act is None:
                return "identity", m
            if act:
                return "act", act
            if isinstance(m, nn.MaxPool2d):
                return "maxpool", m
            if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1)):
                return "gap", True
            if isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                return "flatten", None
            raise ValueError(f"integer-only: module {n.target!r} ({type(m).__name__}) has no integer form")
        if n.op == "call_function":
            if n.target in (operator.add, operator.iadd, torch.add):
                return "add", None
            if n.target in (F.relu, torch.relu):
                return "act", "relu"
            if n.target is F.relu6:
                return "act", "relu6"
            if n.target is torch.flatten and tuple(n.args[1:]) == (1,):
                return "flatten", None
            if n.target is F.adaptive_avg_pool2d and n.args[1] in (1, (1, 1)):
                return "gap", True
        if n.op == "call_method":
            if n.target in ("relu", "relu_"):
                return "act", "relu"
            if n.target == "flatten" and tuple(n.args[1:]) == (1,):
                return "flatten", None
            if n.target in ("add", "add_"):
                return "add", None
            if n.target == "mean" and tuple(n.args[1:2]) in (((2, 3),), ((-2, -1),)):
                return "gap", bool(n.kwargs.get("keepdim", n.args[2] if len(n.args) > 2 else False))
        raise ValueError(f"integer-only: op {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)}) in "
                         f"{_scope(n) or 'the network'} has no integer form")


class _Walker:
    """One pass over the fx graph in order, fusing each conv's BatchNorm and activation, each add's ReLU."""

    def __init__(self, net: nn.Module) -> None:
        self.modules = dict(net.named_modules())
        self.nodes = list(_Tracer().trace(net).nodes)
        self.kind_of = _Classifier(self.modules)
        self.value: dict[fx.Node, str] = {}  # fx node -> the tensor it is
        self.tensors: dict[str, QTensor] = {}
        self.ops: list[Op] = []
        self.done: set[fx.Node] = set()  # fused into an op already

    # ---- helpers
    @staticmethod
    def single_user(n: fx.Node) -> fx.Node | None:
        users = list(n.users)
        return users[0] if len(users) == 1 and users[0].op != "output" else None

    def skip_identity(self, n: fx.Node) -> fx.Node:
        """``n``'s only consumer after identity modules (Identity, Dropout(0)), or ``n`` itself."""
        while (u := self.single_user(n)) is not None and self.kind_of(u)[0] == "identity":
            self.done.add(u)
            n = u
        return n

    def fuse_act(self, n: fx.Node) -> tuple[fx.Node, str | None]:
        """``n`` extended by a ReLU/ReLU6 that only it feeds: (the last node, the activation or None)."""
        n = self.skip_identity(n)
        u = self.single_user(n)
        if u is not None and self.kind_of(u)[0] == "act":
            self.done.add(u)
            return self.skip_identity(u), self.kind_of(u)[1]
        return n, None

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.tensors or name in {op.name for op in self.ops}:
            name, i = f"{base}_{i}", i + 1
        return name

    def add_op(self, op: Op, signed: bool, *nodes: fx.Node) -> None:
        self.ops.append(op)
        if op.kind != "linear" and op.output not in self.tensors:  # the logits are float, not a held tensor
            self.tensors[op.output] = QTensor(op.output, signed, 8, "")
        for n in nodes:
            self.value[n] = op.output

    def input_of(self, n: fx.Node, arg: Any) -> str:
        if not isinstance(arg, fx.Node) or arg not in self.value:
            raise ValueError(f"integer-only: op {n.name!r} in {_scope(n) or 'the network'} reads a value the integer "
                             f"graph does not hold ({arg!r})")
        return self.value[arg]

    # ---- the walk
    def run(self) -> IntegerGraph:
        if sum(n.op == "placeholder" for n in self.nodes) != 1:
            raise ValueError("integer-only: the network must take exactly one input tensor")
        output = None
        for n in self.nodes:
            if n in self.done:
                continue
            if n.op == "placeholder":
                self.add_op(Op("quantize", "input", ("input_float",), "input"), True, n)
            elif n.op == "output":
                output = n.args[0]
            elif n.op == "get_attr":
                raise ValueError(f"integer-only: {n.name!r} reads the attribute {n.target!r}: no integer form")
            else:
                kind, m = self.kind_of(n)
                getattr(self, "_" + kind)(n, m)
        if output is None or self.value.get(output) != "logits":
            raise ValueError("integer-only: the network output must be the logits of its quantized Linear classifier")
        graph = IntegerGraph(self.tensors, self.ops)
        _assign_quantizers(graph, self.modules)
        return graph

    def _identity(self, n: fx.Node, m: Any) -> None:
        self.value[n] = self.input_of(n, n.args[0])

    def _bn(self, n: fx.Node, m: Any) -> None:
        raise ValueError(f"integer-only: BatchNorm {n.target!r} does not directly follow a quantized conv whose output "
                         f"nothing else reads")

    def _act(self, n: fx.Node, m: Any) -> None:
        raise ValueError(f"integer-only: activation {n.name!r} ({m}) in {_scope(n) or 'the network'} does not "
                         f"directly follow a quantized conv or a residual add whose output nothing else reads")

    def _conv(self, n: fx.Node, m: nn.Conv2d) -> None:
        x = self.input_of(n, n.args[0])
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            raise ValueError(f"integer-only: conv {n.target!r} has padding {m.padding!r}/{m.padding_mode!r}; only "
                             f"numeric zero padding has an integer form")
        end, bn, act = self.skip_identity(n), None, None
        u = self.single_user(end)
        if u is not None and self.kind_of(u)[0] == "bn":
            self.done.add(u)
            bn, end = u.target, u
            bn_mod = self.modules[u.target]
            if isinstance(bn_mod, _batchnorm_act_type()):  # BatchNorm and its activation in one module
                act = _act_of(bn_mod.act)
                if act is False or not isinstance(bn_mod.drop, nn.Identity):
                    raise ValueError(f"integer-only: {u.target!r} applies {type(bn_mod.act).__name__} (or dropout), "
                                     f"which has no integer form (ReLU, ReLU6 or none)")
                end = self.skip_identity(end)
        if act is None:
            end, act = self.fuse_act(end)
        attrs = {"stride": m.stride, "padding": m.padding, "dilation": m.dilation, "groups": m.groups}
        self.add_op(Op("conv", n.target, (x,), self.unique(n.target), bn=bn, act=act, attrs=attrs), act is None,
                    n, end)

    def _linear(self, n: fx.Node, m: Any) -> None:
        x = self.input_of(n, n.args[0])
        end = self.skip_identity(n)
        users = list(end.users)
        if len(users) != 1 or users[0].op != "output":
            raise ValueError(f"integer-only: linear layer {n.target!r} must produce the network output (a "
                             f"classifier); its output is read by other ops")
        self.add_op(Op("linear", n.target, (x,), "logits"), True, n, end)

    def _add(self, n: fx.Node, m: Any) -> None:
        args = [a for a in (*n.args, *n.kwargs.values()) if isinstance(a, fx.Node)]
        if len(args) != 2 or len(n.args) + len(n.kwargs) != 2:
            raise ValueError(f"integer-only: add {n.name!r} in {_scope(n)} must add two tensors")
        a, b = (self.input_of(n, x) for x in args)
        end, act = self.fuse_act(n)
        name = self.unique(f"{_scope(n)}.add" if _scope(n) else "add")
        self.add_op(Op("add", name, (a, b), name, act=act), act is None, n, end)

    def _name(self, n: fx.Node, what: str) -> str:
        return self.unique(n.target if n.op == "call_module" else f"{_scope(n)}.{what}".lstrip("."))

    def _maxpool(self, n: fx.Node, m: nn.MaxPool2d) -> None:
        x, name = self.input_of(n, n.args[0]), self._name(n, "maxpool")
        attrs = {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding, "dilation": m.dilation,
                 "ceil_mode": m.ceil_mode}
        self.add_op(Op("maxpool", name, (x,), name, attrs=attrs), self.tensors[x].signed, n)

    def _gap(self, n: fx.Node, keepdim: bool) -> None:
        x, name = self.input_of(n, n.args[0]), self._name(n, "gap")
        self.add_op(Op("gap", name, (x,), name), self.tensors[x].signed, n)
        if not keepdim:  # mean over (2, 3): [N, C]
            flat = self.unique(name + ".flatten")
            self.add_op(Op("flatten", flat, (name,), flat), self.tensors[x].signed, n)

    def _flatten(self, n: fx.Node, m: Any) -> None:
        x, name = self.input_of(n, n.args[0]), self._name(n, "flatten")
        self.add_op(Op("flatten", name, (x,), name), self.tensors[x].signed, n)


def trace_integer_graph(net: nn.Module) -> IntegerGraph:
    """The integer graph of ``net`` (its Conv2d/Linear layers quantized, see the module docstring)."""
    return _Walker(net).run()


def _assign_quantizers(graph: IntegerGraph, modules: dict[str, nn.Module]) -> None:
    """Each tensor's quantizer and bits (see the module docstring); pass-through ops share their input's."""
    for op in graph.ops:
        if op.kind in ("conv", "linear"):
            m = modules[op.name]
            if m.weight_quant is None or m.act_quant is None:
                what = "weight" if m.weight_quant is None else "input"
                raise ValueError(f"integer-only: layer {op.name!r} has a floating-point {what}; integer-only needs "
                                 f"quantized weights and inputs in every layer")
    shared = {op.output: op.inputs[0] for op in graph.ops if op.kind in ("maxpool", "flatten")}

    def root(t: str) -> str:
        while t in shared:
            t = shared[t]
        return t

    readers: dict[str, list[str]] = {}
    for op in graph.ops:
        if op.kind in ("conv", "linear"):
            readers.setdefault(root(op.inputs[0]), []).append(op.name)
    for name, t in graph.tensors.items():
        if name in shared:
            continue
        layers = readers.get(name, [])
        if layers:
            bits = {modules[n].act_quant.bits for n in layers}
            if len(bits) > 1:
                raise ValueError(f"integer-only: tensor {name!r} is read by layers with different input bits "
                                 f"({', '.join(f'{n}: {modules[n].act_quant.bits}' for n in layers)}); one code "
                                 f"tensor per value: give them the same activation bits")
            t.bits, t.quant = bits.pop(), f"{layers[0]}.act_quant"
        else:
            t.quant = NEW_QUANT + name.replace(".", "_")
    for name in shared:
        src = graph.tensors[root(name)]
        graph.tensors[name].bits, graph.tensors[name].quant = src.bits, src.quant
