"""Packed checkpoint: bit-packed integer weights + scales + FP state + plan + how to rebuild the timm model.

File layout (all little-endian)::

    b"SDQPACK1"                 8 bytes magic
    sha256(rest of file)       32 bytes
    header length              4 bytes (uint32)
    header                     zlib-compressed JSON (model name/kwargs, plan, tensor table)
    payload                    the tensors back to back, in the order of the tensor table

Tensor entries are ``raw`` (native dtype bytes: FP weights, biases, BN state, step sizes) or ``packed`` (the codes of a
quantized weight minus the grid's lowest code, at the plan's bitwidth, see :mod:`.bitpack`). Loading needs only
``json``/``zlib``/``numpy`` (no pickle), and every defect (wrong magic, truncation, flipped bytes, unknown tensors,
shape mismatches) raises a one-line ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sdq_lightning.budget import BitPlan, LayerBits
from sdq_lightning.budget.profile import held_bits
from sdq_lightning.export.bitpack import pack_bits, packed_nbytes, unpack_bits
from sdq_lightning.modules import QuantModule, is_quant_layer
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer
from sdq_lightning.quantizers.functional import int_range
from sdq_lightning.surgery import quant_layers

__all__ = ["MAGIC", "check_exportable", "ideal_packed_bytes", "load_packed", "model_identity", "plan_of",
           "save_packed"]

MAGIC = b"SDQPACK1"
FORMAT_VERSION = 1
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64,
           "int64": torch.int64, "int32": torch.int32, "uint8": torch.uint8, "int8": torch.int8, "bool": torch.bool}
_NAMES = {v: k for k, v in _DTYPES.items()}


# ------------------------------------------------------------------ checks shared by every export format
def check_exportable(model: nn.Module) -> dict[str, QuantModule]:
    """The model's quantized layers, after checking that every one of them can be exported.

    Raises ``ValueError`` for a module holding an SDQ quantizer that is not a ``QuantConv2d``/``QuantLinear``
    (e.g. a hand-made quantized Conv1d/Conv3d), and for a weight quantizer that is not frozen (a search that has not
    ended: the bitwidth is not decided yet).
    """
    qlayers = quant_layers(model)
    for name, mod in model.named_modules():
        if is_quant_layer(mod) or name == "integer_only.quant" or name.endswith(".integer_only.quant"):
            continue
        held = [c for c in mod.children() if isinstance(c, (SDQWeightQuantizer, ActQuantizer))]
        parent_is_quant = any(name.startswith(q + ".") for q in qlayers)
        if held and not parent_is_quant:
            raise ValueError(f"layer {name!r} ({type(mod).__name__}) holds an SDQ quantizer but only QuantConv2d and "
                             f"QuantLinear layers can be exported; keep it in FP or convert it")
    for name, q in qlayers.items():
        if q.weight_quant is not None and not q.weight_quant.frozen:
            raise ValueError(f"weight quantizer of {name!r} is not frozen (search not finished); apply a BitPlan or "
                             f"call freeze() before exporting")
    for name, q in qlayers.items():
        if q.act_quant is not None and not bool(q.act_quant.initialized):
            raise ValueError(f"activation quantizer of {name!r} was never calibrated (run one forward pass in train "
                             f"mode on real data before exporting)")
    return qlayers


def model_identity(model: nn.Module, name: str | None = None, kwargs: dict[str, Any] | None = None
                   ) -> tuple[str | None, dict[str, Any]]:
    """timm architecture name and the kwargs that rebuild ``model`` (``num_classes``, ``in_chans``); the name is
    None for a model timm does not know (such a packed checkpoint is loaded with ``load_packed(path, model=...)``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = name or (cfg.get("architecture") if isinstance(cfg, dict) else None)
    kw: dict[str, Any] = {}
    if name:
        if isinstance(getattr(model, "num_classes", None), int):
            kw["num_classes"] = model.num_classes
        first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        if first is not None:
            kw["in_chans"] = first.in_channels
    kw.update(kwargs or {})
    return name, kw


def plan_of(model: nn.Module, example_input: torch.Tensor | None = None) -> BitPlan:
    """The BitPlan the (frozen) model holds: from ``BitPlan.from_model`` when an example input is given (MACs
    included), else weight counts only."""
    if example_input is not None:
        was = model.training
        model.eval()
        try:
            return BitPlan.from_model(model, example_input)
        finally:
            model.train(was)
    return BitPlan({n: LayerBits(*held_bits(m), m.weight.numel(), 0) for n, m in model.named_modules()
                    if isinstance(m, (nn.Conv2d, nn.Linear))})


def check_plan_matches(plan: BitPlan, model: nn.Module) -> BitPlan:
    """``plan`` rebased onto ``model``; ``ValueError`` if its layers or bits differ from what the model holds."""
    plan = plan.rebased(model)
    plan.check_model(model)
    for name, lb in plan.layers.items():
        w, a = held_bits(model.get_submodule(name))
        if w != lb.w_bits or a != lb.a_bits:
            raise ValueError(f"plan does not match the model at {name!r}: plan W{lb.w_bits}/A{lb.a_bits}, "
                             f"model W{w}/A{a}")
    return plan


# ------------------------------------------------------------------------------------------- writing
def _quantizer_keys(qlayers: dict[str, QuantModule]) -> set[str]:
    """The state-dict keys of every weight/activation quantizer, as the quantizers themselves name them."""
    keys: set[str] = set()
    for lname, q in qlayers.items():
        for attr in ("weight_quant", "act_quant"):
            sub = getattr(q, attr)
            if sub is not None:
                keys.update(sub.state_dict(prefix=f"{lname}.{attr}.", keep_vars=True))
    return keys


def _integer_only_terms(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """For a network in the integer-only mode: the codes of every layer's folded weight (by layer name), and
    ``state`` changed in place so that each folded BatchNorm is the identity on the stored weights (``gamma =
    sqrt(var + eps)``, mean 0, bias = the folded bias; a conv bias folded into it): rebuilt, the network folds exactly
    the stored codes and bias again. Empty for any other model."""
    from sdq_lightning.checkpoint import network_prefix
    from sdq_lightning.integer import bn_denominator, is_integer_only, layer_terms

    prefix = network_prefix(model)
    net = model.get_submodule(prefix) if prefix else model
    if not is_integer_only(net):
        return {}
    pre = f"{prefix}." if prefix else ""
    codes = {}
    for op in net.integer_only.graph.ops:
        if op.kind not in ("conv", "linear"):
            continue
        terms = layer_terms(net, op)
        codes[pre + op.name] = terms["codes"]
        if op.bn is None:
            continue
        bn, layer = net.get_submodule(op.bn), net.get_submodule(op.name)
        if bn.weight is None or bn.bias is None:
            raise ValueError(f"the packed format stores a folded BatchNorm as its affine parameters; {op.bn!r} has "
                             f"none (affine=False)")
        state[f"{pre}{op.bn}.weight"] = bn_denominator(bn).detach().clone()
        state[f"{pre}{op.bn}.bias"] = terms["folded_bias"].clone()
        state[f"{pre}{op.bn}.running_mean"] = torch.zeros_like(bn.running_mean)
        if layer.bias is not None:
            state[f"{pre}{op.name}.bias"] = torch.zeros_like(layer.bias)
    return codes


def _weight_codes(q: QuantModule, folded: torch.Tensor | None = None) -> tuple[np.ndarray, torch.Tensor, int, int]:
    """Codes (offset to unsigned), step row, bits and offset of a layer's weight; ``folded``: the codes of an
    integer-only layer's folded weight, which its (folded) step quantizes."""
    codes, step, bits = q.weight_quant.integer_weight(q.weight.detach())
    if folded is not None:
        codes = folded.to(torch.int8)
    codes = codes.to(torch.int16)
    if bits == 1:
        unsigned = (codes + 1) // 2  # -1 -> 0, +1 -> 1
        offset = -1
    else:
        offset = int_range(bits, signed=True)[0]
        unsigned = codes - offset
    row = step.detach().reshape(-1) if q.weight_quant.per_channel else step.detach().reshape(())
    return unsigned.to(torch.uint8).numpy(), row.to(torch.float32), bits, offset


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def save_packed(model: nn.Module, path: str | Path, plan: BitPlan | None = None,
                example_input: torch.Tensor | None = None, model_name: str | None = None,
                model_kwargs: dict[str, Any] | None = None) -> Path:
    """Write the packed checkpoint of a frozen quantized model (see the module docstring). A timm model records how
    to rebuild it (``model_name``/``model_kwargs``, read from timm's ``pretrained_cfg`` when left out); any other
    ``nn.Module`` is stored without a name and loaded with ``load_packed(path, model=<float model>)``."""
    qlayers = check_exportable(model)
    name, kwargs = model_identity(model, model_name, model_kwargs)
    plan = check_plan_matches(plan, model) if plan is not None else plan_of(model, example_input)
    state = model.state_dict()
    folded = _integer_only_terms(model, state)
    if folded:  # rebuilt from the plan: the integer-only mode first, then this state
        plan = plan.with_metadata(integer_only=True)
    table: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    skip = _quantizer_keys(qlayers)
    layers_meta: dict[str, Any] = {}
    for lname, q in qlayers.items():
        meta: dict[str, Any] = {}
        if q.weight_quant is not None:
            skip.add(f"{lname}.weight")
            codes, row, bits, offset = _weight_codes(q, folded.get(lname))
            blob = pack_bits(codes, bits).tobytes()
            table.append({"k": f"{lname}.weight", "t": "packed", "b": bits, "o": offset,
                          "s": list(q.weight.shape)})
            chunks.append(blob)
            table.append({"k": f"{lname}.weight_quant.step", "t": "raw", "d": "float32", "s": list(row.shape)})
            chunks.append(_raw(row))
            meta["per_channel"] = bool(q.weight_quant.per_channel)
        if q.act_quant is not None:
            table.append({"k": f"{lname}.act_quant.step", "t": "raw", "d": "float32", "s": []})
            chunks.append(_raw(q.act_quant.step.detach().float().reshape(())))
            meta["signed"] = bool(q.act_quant.signed)
        layers_meta[lname] = meta
    for key, t in state.items():
        if key in skip:
            continue
        if t.dtype not in _NAMES:
            raise ValueError(f"state entry {key!r} has dtype {t.dtype} that the packed format does not store")
        table.append({"k": key, "t": "raw", "d": _NAMES[t.dtype], "s": list(t.shape)})
        chunks.append(_raw(t))
    header = {"format": FORMAT_VERSION, "model": {"name": name, "kwargs": kwargs, "class": type(model).__qualname__},
              "plan": plan.to_dict(),
              "layers": layers_meta, "tensors": table}
    hbytes = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    body = struct.pack("<I", len(hbytes)) + hbytes + b"".join(chunks)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(MAGIC + hashlib.sha256(body).digest() + body)
    return path


def ideal_packed_bytes(model: nn.Module) -> float:
    """Ideal size of the packed checkpoint: ``sum(N_l * b_l) / 8`` for the quantized weights plus every other value
    that must be stored (FP weights, biases, BN parameters and running statistics, weight and activation steps) at its
    own width (4 bytes for float32)."""
    qlayers = check_exportable(model)
    total = 0.0
    skip = _quantizer_keys(qlayers)
    for lname, q in qlayers.items():
        if q.weight_quant is not None:
            skip.add(f"{lname}.weight")
            total += q.weight.numel() * q.weight_quant.bits / 8
            total += 4 * (q.weight.shape[0] if q.weight_quant.per_channel else 1)
        if q.act_quant is not None:
            total += 4
    for k, t in model.state_dict().items():
        if k not in skip:
            total += t.numel() * t.element_size()
    return total


# ------------------------------------------------------------------------------------------- reading
def _read(path: str | Path) -> tuple[dict[str, Any], memoryview]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"packed checkpoint not found: {path}")
    data = path.read_bytes()
    if len(data) < 44 or data[:8] != MAGIC:
        raise ValueError(f"{path} is not an SDQ packed checkpoint (bad magic or shorter than the 44-byte preamble)")
    body = data[40:]
    if hashlib.sha256(body).digest() != data[8:40]:
        raise ValueError(f"{path} is corrupted or truncated: sha256 of the payload does not match the stored checksum")
    (hlen,) = struct.unpack("<I", body[:4])
    try:
        header = json.loads(zlib.decompress(body[4:4 + hlen]))
    except (zlib.error, ValueError) as err:
        raise ValueError(f"{path} has an unreadable header: {err}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has packed format {header.get('format') if isinstance(header, dict) else '?'}, "
                         f"this reader understands {FORMAT_VERSION}")
    return header, memoryview(body)[4 + hlen:]


def _entries(header: dict[str, Any], payload: memoryview, path: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    pos = 0
    for e in header["tensors"]:
        shape = tuple(int(s) for s in e["s"])
        count = int(np.prod(shape)) if shape else 1
        if e["t"] == "packed":
            n = packed_nbytes(count, e["b"])
        else:
            if e["d"] not in _DTYPES:
                raise ValueError(f"{path}: tensor {e['k']!r} has unknown dtype {e['d']!r}")
            n = count * torch.empty((), dtype=_DTYPES[e["d"]]).element_size()
        if pos + n > len(payload):
            raise ValueError(f"{path} is truncated: tensor {e['k']!r} needs bytes {pos}..{pos + n} of a "
                             f"{len(payload)}-byte payload")
        buf = np.frombuffer(payload[pos:pos + n], dtype=np.uint8)
        pos += n
        if e["t"] == "packed":
            codes = unpack_bits(buf, e["b"], count).astype(np.int16)
            codes = codes * 2 - 1 if e["b"] == 1 else codes + int(e["o"])
            out[e["k"]] = torch.from_numpy(codes.reshape(shape))
        else:
            dt = _DTYPES[e["d"]]
            if dt == torch.bfloat16:
                t = torch.from_numpy(buf.copy().view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(buf.copy()).view(dt)
            out[e["k"]] = t.reshape(shape)
    if pos != len(payload):
        raise ValueError(f"{path}: payload has {len(payload) - pos} bytes beyond the tensors the header lists")
    return out


def load_packed(path: str | Path, model: nn.Module | None = None) -> nn.Module:
    """Rebuild the model from a packed checkpoint (eval mode): ``timm.create_model(name, pretrained=False,
    **kwargs)``, the stored plan applied, integer weights times steps, FP state. Pass ``model`` (a float model of the
    same architecture) to skip the timm lookup; a checkpoint of a non-timm model needs it."""
    path = Path(path)
    header, payload = _read(path)
    tensors = _entries(header, payload, path)
    if model is None and not header["model"].get("name"):
        raise ValueError(f"{path} holds a {header['model'].get('class') or 'non-timm'} model that timm cannot rebuild; "
                         f"pass load_packed(path, model=<a float instance of it>)")
    if model is None:
        import timm

        import sdq_lightning  # noqa: F401  (registers the CIFAR ResNets)

        try:
            model = timm.create_model(header["model"]["name"], pretrained=False, **header["model"]["kwargs"])
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"{path}: cannot rebuild timm model {header['model']['name']!r} with "
                             f"{header['model']['kwargs']}: {err}") from None
    plan = BitPlan.from_dict(header["plan"])
    plan.apply(model)
    qlayers = quant_layers(model)
    if set(qlayers) != set(header["layers"]):
        raise ValueError(f"{path}: quantized layers of the rebuilt model {sorted(qlayers)[:3]}... differ from the "
                         f"checkpoint's {sorted(header['layers'])[:3]}...")
    state = model.state_dict()
    with torch.no_grad():
        for lname, meta in header["layers"].items():
            q = qlayers[lname]
            if q.weight_quant is not None:
                row = tensors.pop(f"{lname}.weight_quant.step")
                wq = q.weight_quant
                wq.per_channel = bool(meta.get("per_channel", False))
                wq.steps = nn.Parameter(row.reshape(1, *row.shape).clone(), requires_grad=wq.steps.requires_grad)
                codes = tensors.pop(f"{lname}.weight")
                if codes.shape != q.weight.shape:
                    raise ValueError(f"{path}: weight of {lname!r} has shape {tuple(codes.shape)}, the model "
                                     f"expects {tuple(q.weight.shape)}")
                step = row.view(-1, *([1] * (codes.dim() - 1))) if wq.per_channel else row
                state[f"{lname}.weight"] = codes.to(torch.float32) * step
            if q.act_quant is not None:
                q.act_quant.step.copy_(tensors.pop(f"{lname}.act_quant.step"))
                q.act_quant.set_state(bool(meta["signed"]), True)
        for key, t in tensors.items():
            if key not in state:
                raise ValueError(f"{path}: checkpoint tensor {key!r} does not exist in the rebuilt model")
            if tuple(state[key].shape) != tuple(t.shape):
                raise ValueError(f"{path}: tensor {key!r} has shape {tuple(t.shape)}, the model expects "
                                 f"{tuple(state[key].shape)}")
            state[key] = t
        # the quantizer entries were set in place above; keep those, not the stale copies in ``state``
        quantizer_keys = _quantizer_keys(qlayers)
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in quantizer_keys},
                                                    strict=False)
        missing = [k for k in missing if k not in quantizer_keys]
        if missing or unexpected:
            raise ValueError(f"{path}: state mismatch, missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model.eval()


def read_header(path: str | Path) -> dict[str, Any]:
    """The checked header of a packed checkpoint (model, plan, tensor table)."""
    return _read(path)[0]
