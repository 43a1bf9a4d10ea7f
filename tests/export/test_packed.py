"""Packed checkpoint: exact outputs after reloading, size near the ideal, one clear ValueError per defect."""

from __future__ import annotations

import torch
from torch import nn
import pytest

from sdq_lightning import BitPlan, SDQWeightQuantizer
from sdq_lightning.export import (
    check_exportable,
    export_from_checkpoint,
    export_model,
    ideal_packed_bytes,
    load_packed,
    read_header,
    save_packed,
)
from sdq_lightning.modules import QuantModule

from export_helpers import build_mixed


def test_reload_is_exact(resnet20_mixed, digits_batch, tmp_path) -> None:
    x, _ = digits_batch
    path = save_packed(resnet20_mixed, tmp_path / "m.sdqpack")
    back = load_packed(path)
    with torch.no_grad():
        assert torch.equal(back(x), resnet20_mixed(x))
    assert not back.training


def test_reload_is_exact_per_channel(digits_batch, tmp_path) -> None:
    model = build_mixed("resnet20", per_channel=True, fp_steps=0, qat_steps=2)
    x, _ = digits_batch
    back = load_packed(save_packed(model, tmp_path / "pc.sdqpack"))
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(back(x), ref)
    # per-output-channel steps also go to ONNX (DequantizeLinear axis=0)
    from sdq_lightning.export import export_onnx, run_onnx

    got = run_onnx(export_onnx(model, tmp_path / "pc.onnx", x[:1]), x)
    agree = float((got.argmax(1) == ref.numpy().argmax(1)).mean())
    print(f"\n[resnet20 per-channel, digits] max |logit diff| = {abs(got - ref.numpy()).max():.3g}, "
          f"top-1 agreement = {agree:.2%}")
    assert agree >= 0.999


def test_size_close_to_ideal(resnet20_mixed, tmp_path) -> None:
    path = save_packed(resnet20_mixed, tmp_path / "m.sdqpack")
    size, ideal = path.stat().st_size, ideal_packed_bytes(resnet20_mixed)
    w_bytes = sum(m.weight.numel() * m.weight_quant.bits / 8 for m in resnet20_mixed.modules()
                  if getattr(m, "weight_quant", None) is not None)
    print(f"\npacked {size} B, ideal {ideal:.0f} B ({size / ideal - 1:+.2%}); quantized weights {w_bytes:.0f} B, "
          f"fp32 state {ideal - w_bytes:.0f} B; an fp32 state_dict would be ~{4 * sum(p.numel() for p in resnet20_mixed.parameters()):,} B")
    assert 60_000 < ideal < 200_000  # a small model: the fixed overhead (header, checksum) matters
    assert size <= 1.05 * ideal


def _packed(resnet20_mixed, tmp_path):
    return save_packed(resnet20_mixed, tmp_path / "m.sdqpack")


def test_truncated_file(resnet20_mixed, tmp_path) -> None:
    path = _packed(resnet20_mixed, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="corrupted or truncated"):
        load_packed(path)
    path.write_bytes(data[:20])
    with pytest.raises(ValueError, match="not an SDQ packed checkpoint"):
        load_packed(path)


def test_flipped_bytes(resnet20_mixed, tmp_path) -> None:
    path = _packed(resnet20_mixed, tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_packed(path)


def test_mismatched_plan(resnet20_mixed, digits_batch, tmp_path) -> None:
    x, _ = digits_batch
    plan = BitPlan.from_model(resnet20_mixed, x[:1])
    other = plan.with_bits({"layer1.0.conv1": 8 if plan["layer1.0.conv1"] != 8 else 4})
    with pytest.raises(ValueError, match="plan does not match the model at 'layer1.0.conv1'"):
        export_model(resnet20_mixed, tmp_path, x[:1], plan=other)
    # a plan of another network for a checkpoint of this one
    import timm

    r32 = timm.create_model("resnet32", num_classes=10)
    plan32 = BitPlan({n: plan.layers.get(n, plan.layers["conv1"]) for n, m in r32.named_modules()
                      if isinstance(m, (nn.Conv2d, nn.Linear))})
    ckpt = tmp_path / "r20.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in resnet20_mixed.state_dict().items()}}, ckpt)
    with pytest.raises(ValueError, match="plan names layers the model does not have"):
        export_from_checkpoint(ckpt, "resnet20", 10, plan32)


class QuantConv1d(QuantModule, nn.Conv1d):
    """What a user might write for a 1-D model: the exporter handles QuantConv2d/QuantLinear only."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight_quant = SDQWeightQuantizer((4,), weight=self.weight.detach())
        self.act_quant = None


def test_unsupported_layer_type(tmp_path) -> None:
    model = nn.Sequential(QuantConv1d(2, 4, 3), nn.Flatten(), nn.Linear(8, 2))
    model.pretrained_cfg = {"architecture": "none"}
    with pytest.raises(ValueError, match=r"layer '0' \(QuantConv1d\) holds an SDQ quantizer but only QuantConv2d"):
        save_packed(model, tmp_path / "x.sdqpack")


def test_unfrozen_quantizer_is_refused(tmp_path) -> None:
    import timm

    from sdq_lightning import QuantSpec, quantize_model

    model = timm.create_model("digits_cnn", num_classes=10)
    quantize_model(model, QuantSpec(weight_bits=(2, 4, 8)))
    with pytest.raises(ValueError, match="is not frozen"):
        check_exportable(model)


def test_header_is_safe_json(resnet20_mixed, tmp_path) -> None:
    h = read_header(_packed(resnet20_mixed, tmp_path))
    assert h["model"] == {"name": "resnet20", "kwargs": {"num_classes": 10, "in_chans": 3},
                          "class": type(resnet20_mixed).__qualname__}
    assert len(h["plan"]["layers"]) == 22


def test_size_close_to_ideal_low_bit_plan(digits_batch, tmp_path) -> None:
    """A ~2-bit average plan (weights 1, 2, 3 bits in turn): ~70 KB ideal, where the fixed overhead weighs most."""
    import timm

    from sdq_lightning import LayerBits

    torch.manual_seed(0)
    model = timm.create_model("resnet20", num_classes=10)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    BitPlan({n: LayerBits((1, 2, 3)[i % 3], 4, 0, 0) for i, n in enumerate(names)}).apply(model)
    x, _ = digits_batch
    model.train()
    with torch.no_grad():
        model(x[:64])
    model.eval()
    path = save_packed(model, tmp_path / "low.sdqpack")
    size, ideal = path.stat().st_size, ideal_packed_bytes(model)
    print(f"\nlow-bit plan: packed {size} B, ideal {ideal:.0f} B ({size / ideal - 1:+.2%})")
    assert 50_000 < ideal < 90_000 and size <= 1.05 * ideal
    with torch.no_grad():
        assert torch.equal(load_packed(path)(x), model(x))
