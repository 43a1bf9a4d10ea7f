"""docs/extending.md, "A backbone": the ``my_backbones.py`` block runs as written and registers ``my_cnn`` in timm;
the app's pre-check refuses the name before it and accepts it after; the app's own builder makes an SDQClassifier
around it; the SDQ surgery replaces its convs and linear layer by quantized layers; real digits go through."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import timm
import torch
from helpers.data import digits_unit
from helpers.docs import doc_example
from hydra import compose, initialize_config_dir
from torch import nn

import sdq_lightning
from sdq_lightning.cli.errors import UserError
from sdq_lightning.cli.precheck import check_config
from sdq_lightning.modules import QuantConv2d, QuantLinear
from sdq_lightning.surgery import QuantSpec, quant_layers, quantize_model
from sdq_lightning.utils.instantiate import build_datamodule, build_model

CONF = Path(sdq_lightning.__file__).resolve().parent / "conf"
NAME = "my_cnn"


def _unregister(name: str) -> None:
    """Take ``name`` out of timm's registry again (timm has no public call for it)."""
    from timm.models import _registry

    clear = getattr(_registry, "_clear_model_entries", None)
    if clear is not None:
        clear(name)
    _registry._model_entrypoints.pop(name, None)


@pytest.fixture
def my_backbones():
    assert not timm.is_model(NAME)
    try:
        yield doc_example("A backbone", "my_backbones", register=True)
    finally:
        _unregister(NAME)
        sys.modules.pop("my_backbones", None)


def _app_cfg():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose("train", overrides=[f"model.backbone={NAME}", "model.lr=0.05", "dataset=digits",
                                           "trainer.max_epochs=4", "phase.search_epochs=2"])


def test_the_app_refuses_an_unregistered_backbone():
    assert not timm.is_model(NAME)
    with pytest.raises(UserError, match=f"unknown model '{NAME}'"):
        check_config(_app_cfg())


def test_doc_backbone_is_built_by_the_app_and_quantized(my_backbones):
    assert timm.is_model(NAME)
    cfg = _app_cfg()
    check_config(cfg)  # the app's pre-check: known name, something to quantize, the budget reachable
    module = build_model(cfg, build_datamodule(cfg))
    assert type(module).__name__ == "SDQClassifier" and isinstance(module.model, my_backbones.MyCNN)
    assert module.model.features[0].in_channels == 1 and module.model.fc.out_features == 10

    float_layers = {n for n, m in module.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    assert float_layers == {"model.features.0", "model.features.3", "model.fc"}
    spec = QuantSpec(weight_bits=tuple(cfg.hardware.weight_bits), activation_bits=4)
    report = quantize_model(module, spec)
    layers = quant_layers(module)
    assert set(layers) == float_layers  # every conv and linear was swapped ...
    assert not any(type(m) in (nn.Conv2d, nn.Linear) for m in module.modules())  # ... and no float one is left
    assert isinstance(layers["model.features.0"], QuantConv2d) and isinstance(layers["model.features.3"], QuantConv2d)
    assert isinstance(layers["model.fc"], QuantLinear)
    assert (report.first_layer, report.last_layer) == ("model.features.0", "model.fc")
    assert report.fixed == {"model.features.0": 8, "model.fc": 8} and report.searched == ["model.features.3"]

    x, y = digits_unit()
    module.train()
    out = module(x[:64])  # a training forward: draws bits, initialises the activation quantizers
    out.float().pow(2).mean().backward()
    assert layers["model.features.3"].weight_quant.dbp.grad is not None
    module.eval()
    with torch.no_grad():
        logits = module(x[:64])
    assert logits.shape == (64, 10) and torch.isfinite(logits).all()
