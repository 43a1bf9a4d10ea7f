"""Models registered in timm's registry on ``import sdq_lightning``: CIFAR ResNets (resnet20/32/56) and digits_cnn."""

from sdq_lightning.models.cifar_resnet import CifarResNet, DigitsCNN

__all__ = ["CifarResNet", "DigitsCNN"]
