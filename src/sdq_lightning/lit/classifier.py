"""``SDQClassifier``: a reference LightningModule around any timm backbone (losses returned as a dict)."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import timm
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["SDQClassifier"]

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "onecycle", "none")


class SDQClassifier(pl.LightningModule):
    """Image classifier over a timm backbone with top-1/top-5 accuracy from torchmetrics.

    Args:
        backbone: a timm model name (``resnet20``, ``resnet18``, ``mobilenetv2_100``, ...) or an nn.Module.
        num_classes / in_chans: passed to timm. pretrained: timm pretrained weights (needs internet).
        init_checkpoint: a state dict (``.pt``) or Lightning checkpoint to initialise the backbone from.
        optimizer: ``sgd`` (momentum, nesterov) or ``adamw``; scheduler: ``cosine`` (per step, with warm-up),
            ``onecycle`` or ``none``.
    """

    def __init__(self, backbone: str | nn.Module = "resnet20", num_classes: int = 10, in_chans: int = 3,
                 pretrained: bool = False, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4,
                 optimizer: str = "sgd", scheduler: str = "cosine", warmup_epochs: float = 0.0,
                 label_smoothing: float = 0.0, init_checkpoint: str | None = None) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
        self.save_hyperparameters(ignore=[] if isinstance(backbone, str) else ["backbone"])
        if isinstance(backbone, str):
            if not timm.is_model(backbone):
                raise ValueError(f"unknown model {backbone!r}: not in timm's registry (see timm.list_models())")
            self.model = timm.create_model(backbone, pretrained=pretrained, num_classes=num_classes,
                                           in_chans=in_chans)
        else:
            self.model = backbone
        if init_checkpoint:
            self.load_backbone(init_checkpoint)
        # validate_args=False: the argument checks read the targets back to the host (torch.unique) on every
        # update, a host-device sync per step on a GPU; cross_entropy already rejects out-of-range labels.
        metric = {"num_classes": num_classes, "validate_args": False}
        self.val_acc = MulticlassAccuracy(**metric, top_k=1)
        self.val_acc5 = MulticlassAccuracy(**metric, top_k=min(5, num_classes))
        self.test_acc = MulticlassAccuracy(**metric, top_k=1)
        self.test_acc5 = MulticlassAccuracy(**metric, top_k=min(5, num_classes))

    def load_backbone(self, path: str) -> None:
        from sdq_lightning.checkpoint import load_checkpoint

        state = load_checkpoint(path)
        state = state.get("state_dict", state)
        if any(k.startswith("model.") for k in state):
            state = {k[6:]: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        bad = [k for k in missing if not k.endswith(("dbp", "steps", "step", "level", "frozen_index", "draw_step",
                                                     "temperature", "initialized", "signed"))]
        if bad or unexpected:
            raise ValueError(f"init_checkpoint {path} does not fit the backbone: missing {bad[:5]}, "
                             f"unexpected {list(unexpected)[:5]}")

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def _shared(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch[0], batch[1]
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        return loss, logits, y

    def _progress_bar(self) -> bool:
        """Whether the trainer shows a progress bar. Lightning reads every ``prog_bar`` value back to the host after
        every step (a device sync) even when no bar is shown, so values go to the bar only when there is one."""
        trainer = self._trainer
        return trainer is not None and trainer.progress_bar_callback is not None

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        loss, logits, y = self._shared(batch)
        # Training accuracy as a device-side mean over the epoch (micro average): torchmetrics' multiclass update
        # calls bincount, which reads the device back on every step.
        acc = (logits.detach().argmax(-1) == y).float().mean()
        # Losses: sample-weighted means over all ranks (sync_dist). batch_size as a float: Lightning averages the ranks'
        # sample counts with "mean", which truncates an integer count (51 and 50 samples would count as 50 each).
        self.log("train/loss", loss, prog_bar=self._progress_bar(), on_step=True, on_epoch=True,
                 batch_size=float(len(y)), sync_dist=True)
        self.log("train/acc", acc, on_step=False, on_epoch=True, batch_size=float(len(y)), sync_dist=True)
        return {"loss": loss}

    def _evaluate(self, batch: Any, stage: str) -> dict[str, Tensor]:
        loss, logits, y = self._shared(batch)
        acc, acc5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_acc5")
        acc(logits, y)
        acc5(logits, y)
        self.log(f"{stage}/loss", loss, batch_size=float(len(y)), sync_dist=True)  # see training_step
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", batch_size=len(y))
        self.log(f"{stage}/acc_top5", acc5, batch_size=len(y))
        return {"loss": loss}

    def validation_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).argmax(-1)

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.ndim > 1], "weight_decay": hp.weight_decay},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
        if hp.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=hp.momentum > 0)
        else:
            opt = torch.optim.AdamW(groups, lr=hp.lr)
        if hp.scheduler == "none":
            return opt
        total = int(self.trainer.estimated_stepping_batches)
        if hp.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp.lr, total_steps=max(total, 1),
                                                        pct_start=0.25)
        else:
            per_epoch = max(total // max(self.trainer.max_epochs or 1, 1), 1)
            warm = int(hp.warmup_epochs * per_epoch)

            def lr_lambda(step: int) -> float:
                if step < warm:
                    return (step + 1) / warm
                t = (step - warm) / max(total - warm, 1)
                return 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
