"""Run by test_ddp.py: SDQ on digits with strategy="ddp", 2 CPU processes (gloo). Each rank writes what it drew."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the helpers package (run as a script)
from helpers.data import digits_unit  # noqa: E402
from sdq_lightning import SDQ, SDQClassifier  # noqa: E402
from sdq_lightning.quantizers import SDQWeightQuantizer  # noqa: E402


class RecordDraws(Callback):
    def __init__(self) -> None:
        self.draws: list[list[int | None]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.draws.append([m.last_bits for m in pl_module.modules() if isinstance(m, SDQWeightQuantizer)])


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    x, y = digits_unit()
    data = TensorDataset(x[:1024], y[:1024])
    sdq = SDQ(activation_bits=4, budget={"metric": "avg_bits", "target": 2.5}, search_epochs=2,
              search={"dbp_lr": 0.3}, runtime={"save_dir": out})
    rec = RecordDraws()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[sdq, rec], default_root_dir=out)
    module = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    trainer.fit(module, DataLoader(data, batch_size=32, shuffle=True))
    rank = trainer.global_rank
    weights = {k: v.double().sum().item() for k, v in module.state_dict().items() if v.is_floating_point()}
    (out / f"rank{rank}.json").write_text(json.dumps({"draws": rec.draws, "plan": dict(sdq.plan),
                                                      "avg_bits": sdq.plan.average_bits, "weights": weights}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
