"""Phase-2 losses: Entropy-aware Bin Regularization and knowledge distillation (no Lightning)."""

from sdq_lightning.losses.ebr import EBR_WEIGHTINGS, EntropyBinRegularizer, bin_regularization
from sdq_lightning.losses.kd import KDLoss, kd_loss

__all__ = ["EBR_WEIGHTINGS", "EntropyBinRegularizer", "KDLoss", "bin_regularization", "kd_loss"]
