"""LSQ activation quantizer (one fixed bitwidth, signed or unsigned decided from the data)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sdq_lightning.quantizers.functional import int_range, lsq_grad_factor

__all__ = ["ActQuantizer"]


class ActQuantizer(nn.Module):
    """Learned-step uniform activation quantizer.

    The sign mode and the step are decided at the first TRAINING-mode forward: signed if the batch has negative
    values, else unsigned; the step ``2 mean|x| / sqrt(Qp)`` of that batch (averaged over data-parallel ranks).
    Eval-mode forwards before it (Lightning's sanity check, a ``validate`` or ``test`` call, a user's own eval pass)
    commit nothing: each quantizes its batch with the sign and step that batch alone would give, computed and
    discarded. The state therefore comes from a batch of the data the network trains on, with BatchNorm in training
    mode, never from an untrained network's evaluation pass. :meth:`initialize` sets it explicitly.

    Args:
        bits: bitwidth in 1..8 (1-bit activations are ``{0, s}`` unsigned or ``{-s, 0}`` signed-ish; use >= 2).
        signed: force the sign mode instead of deciding it from the data.
    """

    def __init__(self, bits: int, signed: bool | None = None) -> None:
        super().__init__()
        int_range(bits, signed=False)  # validates bits
        self.bits = int(bits)
        self.step = nn.Parameter(torch.tensor(1.0))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("signed", torch.tensor(bool(signed) if signed is not None else False))
        self._force_signed = signed
        # Python mirrors of the two buffers: read in every forward, so they must not be read back from the device
        self._initialized = False
        self._signed = bool(signed) if signed is not None else False
        self.register_load_state_dict_post_hook(lambda module, keys: module._sync())

    def set_state(self, signed: bool, initialized: bool = True) -> None:
        """Set the sign mode and the initialised flag (buffers and their Python mirrors together)."""
        self.signed.fill_(bool(signed))
        self.initialized.fill_(bool(initialized))
        self._sync()

    def _sync(self) -> None:
        self._initialized = bool(self.initialized)
        self._signed = bool(self.signed)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self._signed}"

    @property
    def is_initialized(self) -> bool:
        """Whether the sign mode and step are set (a Python mirror of the ``initialized`` buffer: no device read)."""
        return self._initialized

    @property
    def is_signed(self) -> bool:
        """The sign mode (a Python mirror of the ``signed`` buffer: no device read)."""
        return self._signed

    @property
    def qrange(self) -> tuple[int, int]:
        return self._range(self._signed)

    def _range(self, signed: bool) -> tuple[int, int]:
        if signed:
            return -(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1
        return int_range(self.bits, signed=False)

    @torch.no_grad()
    def initialize(self, x: Tensor) -> None:
        """Set sign mode and step from a batch (copied into the existing parameter, never re-created)."""
        negative = (x < 0).any().float()
        mean_abs = x.detach().abs().mean().float()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # every data-parallel rank must start from the same sign mode and step
            stats = torch.stack([negative, mean_abs]).to(x.device)
            torch.distributed.all_reduce(stats)
            negative, mean_abs = stats[0], stats[1] / torch.distributed.get_world_size()
        if self._force_signed is None:
            self._signed = bool(negative > 0)  # one host read, at initialisation only
            self.signed.fill_(self._signed)
        _, qp = self.qrange
        self.step.copy_((2.0 * mean_abs / qp**0.5).clamp_min(1e-8))
        self.initialized.fill_(True)
        self._initialized = True

    @torch.no_grad()
    def provisional(self, x: Tensor) -> tuple[Tensor, int, int]:
        """``(step, Qn, Qp)`` that :meth:`initialize` would set from ``x``, without setting anything."""
        signed = bool((x < 0).any()) if self._force_signed is None else bool(self._force_signed)
        qn, qp = self._range(signed)
        return (2.0 * x.abs().mean().float() / qp**0.5).clamp_min(1e-8).to(self.step.dtype), qn, qp

    def prepare(self, x: Tensor) -> tuple[Tensor, int, int, float]:
        """Initialise from ``x`` at the first training-mode forward; return ``(step, Qn, Qp, grad_factor)`` for the
        fused layer functions (before that, in eval mode: the batch's own provisional step, nothing stored)."""
        numel = x[0].numel() if x.dim() > 1 else x.numel()
        if not self._initialized:
            if not self.training:
                step, qn, qp = self.provisional(x)
                return step, qn, qp, lsq_grad_factor(numel, qp)
            self.initialize(x)
        qn, qp = self.qrange
        return self.step, qn, qp, lsq_grad_factor(numel, qp)

    def forward(self, x: Tensor) -> Tensor:
        from sdq_lightning.modules.fused import lsq_act_quantize

        step, qn, qp, g = self.prepare(x)
        return lsq_act_quantize(x, step, qn, qp, g)
