"""Data-parallel runs through the app: 2 gloo ranks on the CPU; test metrics over the whole test split exactly once."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn import functional as F
from torchmetrics.classification import MulticlassAccuracy

from app_helpers import compose_cfg, run_cli
from sdq_lightning.utils.instantiate import resolve_trainer_kwargs

# 101 test samples: 2 ranks cannot split them evenly, so a DistributedSampler would repeat one.
DDP_RUN = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false", "trainer.max_epochs=2",
           "phase.search_epochs=1", "trainer.limit_train_batches=2", "trainer.enable_progress_bar=false",
           "dataset.val_subset=101", "dataset.batch_size=16", "name=ddp", "hardware.activation_bits=4",
           "dataset.val_size=0"]  # validate on the test split (digits_demo holds out a validation split)


def _single_process_eval(run_dir, val_subset: int) -> tuple[float, float, int]:
    """Accuracy (macro, as SDQClassifier's torchmetrics) and mean loss of the run's checkpoint, one process."""
    import yaml

    from sdq_lightning.data import DigitsDataModule
    from sdq_lightning.export.api import export_from_checkpoint

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())  # the resolved config the app saved
    model = export_from_checkpoint(run_dir / "checkpoints" / "last.ckpt", cfg["model"]["backbone"], 10,
                                   run_dir / "plan.yaml", in_chans=1)
    dm = DigitsDataModule(batch_size=37, val_subset=val_subset)
    dm.setup("test")
    acc, loss_sum, n = MulticlassAccuracy(num_classes=10), 0.0, 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            logits = model(x)
            acc.update(logits, y)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            n += len(y)
    return float(acc.compute()), loss_sum / n, n


@pytest.mark.slow
def test_two_gloo_ranks_test_metrics_equal_single_process(tmp_path):
    """Issue 12.6: test figures of a 2-rank run are the test split's, each sample once (101 samples: a
    DistributedSampler would have repeated one) and the loss a sample-weighted mean over the ranks."""
    proc = run_cli([*DDP_RUN, "trainer=ddp_cpu"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SyncBatchNorm" not in proc.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs" / "ddp").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2
    acc, loss, n = _single_process_eval(run_dir, 101)
    assert n == 101
    assert metrics["test/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(loss, rel=1e-5)
    # digits validates on the test split: validation saw every sample once too, with the same final weights
    assert metrics["val/acc"] == pytest.approx(acc, abs=1e-6)
    assert metrics["val/loss"] == pytest.approx(loss, rel=1e-5)
    assert f"run folder: {run_dir}" in proc.stdout


def test_trainer_auto_precision_and_sync_batchnorm(monkeypatch):
    cpu = resolve_trainer_kwargs(compose_cfg(["trainer=ddp", "trainer.accelerator=cpu"]).trainer)
    assert cpu["sync_batchnorm"] is False and cpu["precision"] == "32-true"
    cpu2 = resolve_trainer_kwargs(compose_cfg(["trainer=ddp_cpu"]).trainer)
    assert cpu2["devices"] == 2 and cpu2["strategy"] == "ddp" and cpu2["sync_batchnorm"] is False
    # the issue's command line (it failed with "SyncBatchNorm layers only work with GPU modules") is trainer=ddp_cpu
    issue = resolve_trainer_kwargs(compose_cfg(["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]).trainer)
    assert issue == cpu2
    for bf16, expected in ((True, "bf16-mixed"), (False, "16-mixed")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
        for trainer in ("gpu", "ddp", "ddp_multinode"):
            kwargs = resolve_trainer_kwargs(compose_cfg([f"trainer={trainer}"]).trainer)
            assert kwargs["precision"] == expected, trainer
        assert resolve_trainer_kwargs(compose_cfg(["trainer=ddp"]).trainer)["sync_batchnorm"] is True
        fp16 = resolve_trainer_kwargs(compose_cfg(["trainer=gpu", "trainer.precision=16-mixed"]).trainer)
        assert fp16["precision"] == "16-mixed"  # still selectable


@pytest.mark.gpu
def test_gpu_run_with_auto_precision(tmp_path):
    proc = run_cli([*DDP_RUN, "trainer=gpu", "trainer.limit_test_batches=2"], tmp_path, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs" / "ddp").iterdir()
    cfg_text = (run_dir / "config.yaml").read_text()
    assert "precision: auto" in cfg_text
    assert json.loads((run_dir / "metrics.json").read_text())["test/acc"] is not None
