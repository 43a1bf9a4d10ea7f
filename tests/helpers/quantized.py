"""Quantized timm models and the searched-model setups the unit tests share."""

from __future__ import annotations

import timm
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.quantizers import SDQWeightQuantizer


def weight_quantizers(net: nn.Module) -> list[SDQWeightQuantizer]:
    """The network's weight quantizers in module order."""
    return [m for m in net.modules() if isinstance(m, SDQWeightQuantizer)]


def quantized_model(name: str = "resnet20", torch_seed: int = 0, calibrate: tuple[int, ...] | None = None,
                    **spec) -> nn.Module:
    """timm ``name`` (10 classes) built after ``torch.manual_seed(torch_seed)``, quantized with
    ``QuantSpec(**spec)``, in train mode. ``calibrate``: the shape of a random batch (drawn next from the same seed)
    run once without gradients, as the activation quantizers take their sign and step from the first forward."""
    torch.manual_seed(torch_seed)
    kw = {"pretrained": False} if name == "mobilenetv2_100" else {}
    model = timm.create_model(name, num_classes=10, **kw)
    sq.quantize_model(model, sq.QuantSpec(**spec))
    model.train()
    if calibrate is not None:
        with torch.no_grad():
            model(torch.randn(*calibrate))
    return model


def freeze_spread(net: nn.Module) -> None:
    """Freeze every searched layer, the i-th weight quantizer at candidate ``i % n``: all widths in use (1-bit
    layers too where 1 is a candidate)."""
    for i, q in enumerate(weight_quantizers(net)):
        if not q.frozen:
            q.freeze(q.candidates[i % len(q.candidates)])


def freeze_where_candidate(net: nn.Module, bits: int) -> None:
    """Freeze at ``bits`` every weight quantizer that has it among its candidates."""
    for q in weight_quantizers(net):
        if bits in q.candidates:
            q.freeze(bits)


def scatter_levels(net: nn.Module, seed: int) -> nn.Module:
    """Every searched layer at a random level with random DBPs in [0, 1] (seeded), temperature 0.7, draw step 11:
    a searched model mid-search, every reading of the DBPs exercised."""
    g = torch.Generator().manual_seed(seed)
    for q in weight_quantizers(net):
        if not q.frozen:
            q.set_level(int(torch.randint(0, len(q.candidates), (1,), generator=g)), reinit_dbp=None)
            with torch.no_grad():
                q.dbp.copy_(torch.rand(len(q.candidates), generator=g))
            q.set_temperature(0.7)
            q.set_draw_step(11)
    return net
