"""The SDQ callback's added losses: entropy-preserving bit regularisation (EBR) on the quantized weights in phase 2,
and knowledge distillation (KD) from a teacher, both added to the user's own loss as gradients, so the user's
``training_step`` stays as it is.

How (the same under every precision): before ``backward`` the loss arrives scaled by the gradient scaler (16-mixed),
so the gradients added here are multiplied by the same scale (and divided by the accumulation steps):

* EBR: ``d(ebr_weight * EBR)/d(weights)`` is computed with ``autograd.grad`` and added to ``.grad`` after the
  user's backward;
* KD: the classifier's output is captured by a forward hook; ``d(kd_weight * KD(student, teacher))/d(student)`` is
  added to the output's gradient by a tensor hook (and the user's loss is scaled by ``ce_weight`` the same way).

:class:`AddedLosses` is composed by :class:`~sdq_lightning.callbacks.sdq.SDQ` (one ``SDQ(...)`` line brings it along);
it keeps no Lightning state of its own and is tested on its own (``tests/callbacks/test_added_losses.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdq_lightning.callbacks.teacher import load_teacher
from sdq_lightning.losses import EntropyBinRegularizer, kd_loss

__all__ = ["AddedLosses"]


class AddedLosses:
    """EBR and KD gradients for a training step (see the module docstring).

    Args:
        ebr_weight, ebr_weighting, ebr_entropy_weight: the EBR term (weight 0 = off).
        teacher, teacher_arch, teacher_cls: the KD teacher (a module, a timm name or a checkpoint path; see
            :func:`sdq_lightning.callbacks.teacher.load_teacher`); None = no KD.
        kd_temperature, kd_weight, ce_weight: ``ce_weight * CE + kd_weight * KD_T``.
    """

    def __init__(self, ebr_weight: float = 0.1, ebr_weighting: str = "uniform", ebr_entropy_weight: float = 0.0,
                 teacher: nn.Module | str | Path | None = None, teacher_arch: str | None = None,
                 teacher_cls: Any = None, kd_temperature: float = 1.0, kd_weight: float = 1.0,
                 ce_weight: float = 1.0) -> None:
        self.ebr_weight = float(ebr_weight)
        self.ebr = EntropyBinRegularizer(ebr_weighting, ebr_entropy_weight)
        self.teacher_spec, self.teacher_arch, self.teacher_cls = teacher, teacher_arch, teacher_cls
        self.kd_temperature, self.kd_weight, self.ce_weight = float(kd_temperature), float(kd_weight), float(ce_weight)
        self.teacher: nn.Module | None = None
        self._captured: Tensor | None = None
        self._teacher_logits: Tensor | None = None
        self._extra_grads: list[tuple[nn.Parameter, Tensor]] = []
        self._hook_handle = None

    # ---------------------------------------------------------------- teacher
    def load_teacher(self, num_classes: int | None) -> None:
        """Build the teacher once (frozen, eval mode)."""
        if self.teacher_spec is not None and self.teacher is None:
            self.teacher = load_teacher(self.teacher_spec, num_classes, self.teacher_arch,
                                        teacher_cls=self.teacher_cls)

    def check_teacher(self, example: Tensor, student_classes: int | None) -> None:
        """Raise if the teacher's output does not match the student's number of classes."""
        if self.teacher is None:
            return
        with torch.no_grad():
            out = self.teacher(example[:1].to(next(self.teacher.parameters()).device))
        if student_classes is not None and out.shape[-1] != student_classes:
            raise ValueError(f"teacher outputs {out.shape[-1]} classes but the student has {student_classes}; the "
                             f"teacher must be trained on the same classes")

    def attach(self, root: nn.Module, last_layer: str | None, device: torch.device) -> None:
        """Move the teacher to ``device`` and capture the output of ``last_layer`` (the classifier) for KD."""
        if self.teacher is None:
            return
        self.teacher.to(device)
        if last_layer is not None and self._hook_handle is None:
            self._hook_handle = root.get_submodule(last_layer).register_forward_hook(self._capture)

    def detach(self) -> None:
        if self._hook_handle is not None:
            self._hook_handle.remove()
            self._hook_handle = None

    def _capture(self, module: nn.Module, inputs: Any, output: Tensor) -> None:
        if module.training and torch.is_grad_enabled():
            self._captured = output

    def capture_output(self, output: Any) -> None:
        """Take ``output`` (a training forward's classifier output) as the student logits of this step: for a
        network whose inner forward hooks do not run (CUDA graphs replay, :mod:`sdq_lightning.modules.graphs`)."""
        self._captured = output if isinstance(output, Tensor) else None

    # ---------------------------------------------------------------- per step
    def before_batch(self, x: Tensor | None, device: torch.device, kd: bool) -> None:
        """Reset the step's captures; with ``kd``, run the teacher on the batch's input ``x``."""
        self._captured, self._teacher_logits = None, None
        if kd and self.teacher is not None and x is not None:
            with torch.no_grad():
                self._teacher_logits = self.teacher(x.to(device))

    def before_backward(self, loss: Tensor, scale: Tensor | float, layers: list[nn.Module] | None) -> dict[str, Tensor]:
        """Prepare the added gradients of this step (``layers``: the quantized layers for EBR, None = no EBR);
        ``scale``: the gradient scaler's scale over the accumulation steps. Returns the terms to log."""
        terms: dict[str, Tensor] = {}
        self._extra_grads = []
        if layers is not None and self.ebr_weight > 0:
            ebr = self.ebr_weight * self.ebr(layers)
            if ebr.requires_grad:
                weights = [m.weight for m in layers]
                grads = torch.autograd.grad(ebr * scale, weights, allow_unused=True)
                self._extra_grads += [(p, g) for p, g in zip(weights, grads) if g is not None]
            terms["ebr"] = ebr.detach()
        if self._teacher_logits is not None and self._captured is not None and self._captured.requires_grad:
            student = self._captured
            if student.shape != self._teacher_logits.shape:
                raise ValueError(f"KD needs the classifier output {tuple(student.shape)} to match the teacher's "
                                 f"{tuple(self._teacher_logits.shape)}")
            z = student.detach().float().requires_grad_()
            kd = kd_loss(z, self._teacher_logits, self.kd_temperature)
            (g,) = torch.autograd.grad(kd * self.kd_weight, z)
            g = g * scale
            student.register_hook(lambda grad, g=g: grad + g.to(grad.dtype))
            if self.ce_weight != 1.0:
                loss.register_hook(lambda grad, w=self.ce_weight: grad * w)
            terms["kd"] = kd.detach()
        self._captured = None
        return terms

    def after_backward(self) -> None:
        """Add the EBR gradients prepared in :meth:`before_backward` to ``.grad``."""
        with torch.no_grad():
            into, add = [], []
            for p, g in self._extra_grads:
                if p.grad is None:
                    p.grad = g.to(p.dtype).clone()
                else:
                    into.append(p.grad)
                    add.append(g.to(p.grad.dtype))
            if into:  # one multi-tensor add (a few kernels on a GPU), not one per layer
                torch._foreach_add_(into, add)
        self._extra_grads = []
