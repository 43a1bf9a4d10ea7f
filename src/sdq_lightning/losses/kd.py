"""Knowledge distillation: soft cross entropy between teacher and student distributions at temperature T."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["KDLoss", "kd_loss"]


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """``T^2 * mean_batch sum_c -p_teacher(c) log p_student(c)`` computed in float32; the teacher gets no gradient."""
    t = float(temperature)
    s = F.log_softmax(student_logits.float() / t, dim=-1)
    p = F.softmax(teacher_logits.detach().float() / t, dim=-1)
    return -(p * s).sum(-1).mean() * t * t


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`."""

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature!r}")
        self.temperature = float(temperature)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature)


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor) -> Tensor:
    teacher.eval()
    return teacher(x)
