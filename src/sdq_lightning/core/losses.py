"""The SDQ callback's added losses: entropy-preserving bit regularisation (EBR) on the quantized weights in phase 2,
and knowledge distillation (KD) from a teacher, both added to the user's own loss as gradients, so the user's
``training_step`` stays as it is.

How (the same under every precision): before ``backward`` the loss arrives scaled by the gradient scaler (16-mixed),
so the gradients added here are multiplied by the same scale (and divided by the accumulation steps):

* EBR: ``d(ebr_weight * EBR)/d(weights)`` is computed with ``autograd.grad`` and added to ``.grad`` (times the scale)
  after the user's backward;
* KD: the classifier's output is captured by a forward hook; ``d(kd_weight * KD(student, teacher))/d(student)`` is
  added to the output's gradient by a tensor hook (and the user's loss is scaled by ``ce_weight`` the same way).

:class:`AddedLosses` is composed by :class:`~sdq_lightning.callbacks.sdq.SDQ` (one ``SDQ(...)`` line brings it along);
it keeps no Lightning state of its own and is tested on its own (``tests/callbacks/test_added_losses.py``).

Under CUDA graphs (``SDQ(runtime={"compile": "cuda-graphs"})``, :meth:`AddedLosses.use_graphs`) the teacher's
forward, KD with its gradient and the EBR term with its gradients replay as a CUDA graph each
(:class:`~sdq_lightning.modules.graphs.GraphedCall`): next to the graphed network they were the largest eager work
of a phase-2 step (``benchmarks/count_app_ops.py``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sdq_lightning.core.teacher import load_teacher
from sdq_lightning.losses import EntropyBinRegularizer, kd_loss
from sdq_lightning.modules.graphs import CallCaptureFn, GraphedCall
from sdq_lightning.quantizers.sdq import structure_key

__all__ = ["AddedLosses"]


class AddedLosses:
    """EBR and KD gradients for a training step (see the module docstring).

    Args:
        ebr_weight, ebr_weighting, ebr_entropy_weight: the EBR term (weight 0 = off).
        teacher, teacher_arch, teacher_cls: the KD teacher (a module, a timm name or a checkpoint path; see
            :func:`sdq_lightning.core.teacher.load_teacher`); None = no KD.
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
        self._extra_scale: Tensor | float = 1.0
        self._hook_handle = None
        self._teacher_graph: GraphedCall | None = None
        self._kd_graph: GraphedCall | None = None
        self._ebr_graph: GraphedCall | None = None
        self._ebr_layers: list[nn.Module] = []

    def use_graphs(self, enabled: bool = True, capture_fn: CallCaptureFn | None = None) -> None:
        """Replay the teacher's forward, the KD term with its gradient and the EBR term with its gradients as CUDA
        graphs (``enabled``), or run them eager again. EBR is graphed only in its one-pass form
        (:meth:`EntropyBinRegularizer.one_pass`: no host read); ``capture_fn``: see
        :class:`~sdq_lightning.modules.graphs.GraphedCall` (tests pass a CPU stand-in)."""
        self._teacher_graph = self._kd_graph = self._ebr_graph = None
        if enabled:
            self._teacher_graph = GraphedCall(self._teacher_forward, name="the KD teacher", capture_fn=capture_fn)
            self._kd_graph = GraphedCall(self._kd_and_grad, key=lambda: (self.kd_temperature, self.kd_weight),
                                         name="KD", capture_fn=capture_fn)
            self._ebr_graph = GraphedCall(self._ebr_and_grads, key=self._ebr_key, name="EBR",
                                          capture_fn=capture_fn)

    @property
    def graphs(self) -> tuple[GraphedCall, ...]:
        """The teacher's, KD's and EBR's graphs (empty without :meth:`use_graphs`)."""
        return tuple(g for g in (self._teacher_graph, self._kd_graph, self._ebr_graph) if g is not None)

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
            run = self._teacher_graph or self._teacher_forward
            self._teacher_logits = run(x.to(device))

    def _teacher_forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.teacher(x)

    def _ebr_and_grads(self) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """``ebr_weight * EBR`` of the step's layers and its gradients with respect to their weights."""
        layers = self._ebr_layers
        weights = [m.weight for m in layers]
        with torch.enable_grad():
            ebr = self.ebr_weight * self.ebr(layers)
            grads = torch.autograd.grad(ebr, weights, allow_unused=True) if ebr.requires_grad else \
                (None,) * len(weights)
        return ebr.detach(), grads

    def _ebr_key(self) -> tuple:
        return (self.ebr_weight, self.ebr.weighting, self.ebr.entropy_weight,
                structure_key(self._ebr_layers), tuple(m.weight.requires_grad for m in self._ebr_layers))

    def before_backward(self, loss: Tensor, scale: Tensor | float, layers: list[nn.Module] | None) -> dict[str, Tensor]:
        """Prepare the added gradients of this step (``layers``: the quantized layers for EBR, None = no EBR);
        ``scale``: the gradient scaler's scale over the accumulation steps. Returns the terms to log."""
        terms: dict[str, Tensor] = {}
        self._extra_grads, self._extra_scale = [], scale
        if layers is not None and self.ebr_weight > 0:
            self._ebr_layers = layers
            graphed = self._ebr_graph is not None and self.ebr.one_pass(layers)
            ebr, grads = (self._ebr_graph if graphed else self._ebr_and_grads)()
            self._extra_grads += [(m.weight, g) for m, g in zip(layers, grads) if g is not None]
            terms["ebr"] = ebr.clone() if graphed else ebr  # a graph's output is overwritten by its next replay
        if self._teacher_logits is not None and self._captured is not None and self._captured.requires_grad:
            student = self._captured
            if student.shape != self._teacher_logits.shape:
                raise ValueError(f"KD needs the classifier output {tuple(student.shape)} to match the teacher's "
                                 f"{tuple(self._teacher_logits.shape)}")
            z = student.detach().float()
            if self._kd_graph is not None:
                kd, g = self._kd_graph(z, self._teacher_logits)
                kd = kd.clone()  # a graph's output is overwritten by its next replay (g is copied by the scaling)
            else:
                kd, g = self._kd_and_grad(z, self._teacher_logits)
            g = g * scale
            student.register_hook(lambda grad, g=g: grad + g.to(grad.dtype))
            if self.ce_weight != 1.0:
                loss.register_hook(lambda grad, w=self.ce_weight: grad * w)
            terms["kd"] = kd
        self._captured = None
        return terms

    def _kd_and_grad(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """KD of the (detached, float) student logits against the teacher's, and ``d(kd_weight * KD)/d(student)``."""
        with torch.enable_grad():
            z = student.detach().requires_grad_()
            kd = kd_loss(z, teacher, self.kd_temperature)
            (g,) = torch.autograd.grad(kd * self.kd_weight, z)
        return kd.detach(), g

    def after_backward(self) -> None:
        """Add the EBR gradients prepared in :meth:`before_backward`, times the step's scale, to ``.grad``."""
        scale = self._extra_scale
        with torch.no_grad():
            into, add = [], []
            for p, g in self._extra_grads:
                if p.grad is None:
                    p.grad = (g * scale).to(p.dtype)
                else:
                    into.append(p.grad)
                    add.append(g.to(p.grad.dtype))
            if into:  # multi-tensor operations (a few kernels on a GPU), not one per layer
                if isinstance(scale, Tensor):
                    torch._foreach_add_(into, torch._foreach_mul(add, scale))
                else:
                    torch._foreach_add_(into, add, alpha=scale)
        self._extra_grads = []
