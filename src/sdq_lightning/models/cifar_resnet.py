"""ResNet20/32/56 of He et al. (2016, section 4.2) for 32x32 input, and a small CNN for 8x8 digits.

Registered in timm so that ``timm.create_model("resnet20", num_classes=10)`` works after ``import sdq_lightning``.
Option A shortcuts are replaced by 1x1 projection shortcuts (the common "option B" variant used by most CIFAR QAT
code), which adds 3 small convs to ResNet20. No pretrained weights exist for these entries.
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import Tensor, nn

__all__ = ["CifarResNet", "DigitsCNN"]


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.act2 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act2(x + shortcut)


class _Classifier(nn.Module):
    """timm's classifier interface over ``forward_features``: global average pooling, dropout, then ``fc``."""

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.drop(self.global_pool(x).flatten(1))
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


class CifarResNet(_Classifier):
    """CIFAR ResNet with ``6n + 2`` layers (n = 3, 5, 9 for 20, 32, 56) and widths 16/32/64."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_chans: int = 3, drop_rate: float = 0.0,
                 **_: object) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth must be 6n + 2 (20, 32, 56, ...), got {depth}")
        n = (depth - 2) // 6
        self.num_classes = num_classes
        self.num_features = 64
        self.conv1 = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.act1 = nn.ReLU(inplace=True)
        stages, in_ch = [], 16
        for i, width in enumerate((16, 32, 64)):
            blocks = [BasicBlock(in_ch if j == 0 else width, width, 2 if (j == 0 and i > 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = stages
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act1(self.bn1(self.conv1(x)))
        return self.layer3(self.layer2(self.layer1(x)))



class DigitsCNN(_Classifier):
    """Three-conv CNN for 8x8 inputs (scikit-learn digits): 32-64-128 channels, then a linear classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, width: int = 32, drop_rate: float = 0.0,
                 **_: object) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = 4 * width
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, 2, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, 2, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.act = nn.ReLU()
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.act(self.bn2(self.conv2(x)))
        return self.act(self.bn3(self.conv3(x)))



def _cfg(**kwargs: object) -> dict:
    return {"url": "", "num_classes": 10, "input_size": (3, 32, 32), "pool_size": (8, 8), "crop_pct": 1.0,
            "interpolation": "bilinear", "mean": (0.4914, 0.4822, 0.4465), "std": (0.2470, 0.2435, 0.2616),
            "first_conv": "conv1", "classifier": "fc", **kwargs}


default_cfgs = generate_default_cfgs({
    "resnet20.untrained": _cfg(),
    "resnet32.untrained": _cfg(),
    "resnet56.untrained": _cfg(),
    "digits_cnn.untrained": _cfg(input_size=(1, 8, 8), pool_size=(2, 2), mean=(0.0,), std=(1.0,)),
})


def _build(cls: type, variant: str, pretrained: bool, **kwargs: object) -> nn.Module:
    if pretrained:
        raise ValueError(f"no pretrained weights exist for {variant!r}; use pretrained=False and train it "
                         f"(or load a state dict with init_checkpoint=...)")
    return build_model_with_cfg(cls, variant, pretrained=False, **kwargs)


@register_model
def resnet20(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet20 for CIFAR (about 0.27 M parameters, 41 M MACs at 32x32)."""
    return _build(CifarResNet, "resnet20", pretrained, depth=20, **kwargs)


@register_model
def resnet32(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet32 for CIFAR."""
    return _build(CifarResNet, "resnet32", pretrained, depth=32, **kwargs)


@register_model
def resnet56(pretrained: bool = False, **kwargs: object) -> CifarResNet:
    """ResNet56 for CIFAR."""
    return _build(CifarResNet, "resnet56", pretrained, depth=56, **kwargs)


@register_model
def digits_cnn(pretrained: bool = False, **kwargs: object) -> DigitsCNN:
    """Small CNN for 8x8 digits (the embedded demo)."""
    return _build(DigitsCNN, "digits_cnn", pretrained, **kwargs)
