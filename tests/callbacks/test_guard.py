"""DivergenceGuard: a NaN loss and an accuracy collapse stop the run with one line; a healthy run is untouched."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdq_lightning.callbacks.guard import DivergenceError, DivergenceGuard, infer_num_classes




class TinyNet(L.LightningModule):
    """A linear digits classifier that can be told to go wrong: NaN loss from a step on, or constant logits
    (one predicted class: accuracy at chance) from an epoch on."""

    def __init__(self, nan_from_step: int | None = None, collapse_from_epoch: int | None = None,
                 never_learn: bool = False, metric: str | None = "val/acc") -> None:
        super().__init__()
        self.fc = nn.Linear(64, 10)
        self.nan_from_step, self.collapse_from_epoch, self.never_learn = nan_from_step, collapse_from_epoch, never_learn
        self.metric = metric  # the name the accuracy is logged under (None: only the loss is logged)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.fc(x.flatten(1))
        collapsed = self.collapse_from_epoch is not None and self.current_epoch >= self.collapse_from_epoch
        if collapsed or self.never_learn:
            logits = logits * 0 + torch.arange(10.0, device=logits.device)  # always class 9
        return logits

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.nan_from_step is not None and self.global_step >= self.nan_from_step:
            loss = loss * float("nan")
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y), batch_size=len(y))
        if self.metric is not None:
            self.log(self.metric, (logits.argmax(1) == y).float().mean(), batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(make_trainer, digits, module: TinyNet, guard: DivergenceGuard, max_epochs: int = 4) -> L.Trainer:
    trainer = make_trainer(max_epochs=max_epochs, callbacks=[guard])
    L.seed_everything(0, verbose=False)
    trainer.fit(module, digits.train(), digits.test())
    return trainer


def test_nan_loss_stops_with_one_line_naming_step_and_last_good(make_trainer, digits, tmp_path) -> None:
    guard = DivergenceGuard()
    with pytest.raises(DivergenceError) as info:
        fit(make_trainer, digits, TinyNet(nan_from_step=30), guard)
    msg = str(info.value)
    assert "\n" not in msg
    # 22 batches per epoch: the loss of global step 30 is the 31st step, in epoch 1
    assert "training loss is nan at epoch 1, step 31;" in msg
    assert "learning rate" in msg and "gradient_clip_val" in msg
    good = tmp_path / "checkpoints" / "last_good.ckpt"
    assert "last good state (epoch 0, step 22, val/acc " in msg and str(good) in msg
    state = torch.load(good, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0 and state["global_step"] == 22
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values())


def test_deferred_read_still_names_the_first_bad_step(make_trainer, digits) -> None:
    guard = DivergenceGuard(check_every_n_steps=8)
    reads = []
    original = guard.check_loss
    guard.check_loss = lambda trainer, module: (reads.append(trainer.global_step), original(trainer, module))
    with pytest.raises(DivergenceError, match=r"training loss is nan at epoch 0, step 3;"):
        fit(make_trainer, digits, TinyNet(nan_from_step=2), guard)
    assert reads[-1] == 8  # read once, after 8 steps, not at step 3


def test_accuracy_collapse_to_chance_stops(make_trainer, digits, tmp_path) -> None:
    guard = DivergenceGuard(patience=1)
    with pytest.raises(DivergenceError) as info:
        fit(make_trainer, digits, TinyNet(collapse_from_epoch=2), guard)
    msg = str(info.value)
    assert "\n" not in msg
    assert "val/acc fell to 0.1" in msg and "at epoch 2" in msg and "chance 1/10 = 0.1000" in msg
    assert "budget too low" in msg and "last good state (epoch 1, step 44" in msg
    assert (tmp_path / "checkpoints" / "last_good.ckpt").is_file()


def test_collapse_waits_for_patience(make_trainer, digits) -> None:
    guard = DivergenceGuard(patience=2)
    with pytest.raises(DivergenceError, match=r"at epoch 3, step 88 .* for 2 validation\(s\)"):
        fit(make_trainer, digits, TinyNet(collapse_from_epoch=2), guard, max_epochs=6)


def test_healthy_run_is_untouched(make_trainer, digits, tmp_path) -> None:
    guard = DivergenceGuard()
    trainer = fit(make_trainer, digits, TinyNet(), guard, max_epochs=3)
    assert guard.message is None and trainer.current_epoch == 3 and not trainer.interrupted
    assert guard.best_acc > 0.8
    assert guard.last_good["epoch"] == 2 and guard.last_good["path"] == str(tmp_path / "checkpoints" /
                                                                            "last_good.ckpt")


def test_model_that_never_left_chance_is_not_flagged(make_trainer, digits) -> None:
    guard = DivergenceGuard(patience=1)
    trainer = fit(make_trainer, digits, TinyNet(never_learn=True), guard, max_epochs=2)
    assert guard.message is None and trainer.current_epoch == 2


def test_reference_acc_flags_a_run_that_starts_at_chance(make_trainer, digits) -> None:
    guard = DivergenceGuard(patience=1, reference_acc=0.97)
    with pytest.raises(DivergenceError, match=r"val/acc fell to 0\.10\d+ at epoch 0, .*earlier 0\.9700"):
        fit(make_trainer, digits, TinyNet(never_learn=True), guard, max_epochs=2)


def test_action_stop_ends_fit_without_raising(make_trainer, digits) -> None:
    guard = DivergenceGuard(action="stop", save_last_good=False)
    with pytest.warns(UserWarning, match="training loss is nan"):
        trainer = fit(make_trainer, digits, TinyNet(nan_from_step=30), guard, max_epochs=5)
    assert trainer.current_epoch == 2  # stopped at the end of the second epoch, where the NaN was
    assert guard.message.endswith("(save_last_good=False: not saved)")


def test_infer_num_classes() -> None:
    assert infer_num_classes(TinyNet()) == 10
    assert infer_num_classes(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 7))) == 7
    assert infer_num_classes(nn.Conv2d(1, 1, 1)) is None


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"check_every_n_steps": 0}, "check_every_n_steps must be None or an integer >= 1, got 0"),
    ({"num_classes": 1}, "num_classes must be None or an integer >= 2, got 1"),
    ({"tolerance": 0.5}, r"tolerance must be a number in \[0, 0.3\), got 0.5"),
    ({"reference_acc": 97.0}, r"reference_acc must be None or a fraction in \[0, 1\], got 97.0"),
    ({"patience": 0}, "patience must be an integer >= 1, got 0"),
    ({"action": "ignore"}, r"action must be one of \('raise', 'stop'\), got 'ignore'"),
    ({"monitor": ""}, "monitor must be None or a metric name, got ''"),
])
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        DivergenceGuard(**kwargs)


def test_real_divergence_from_a_huge_learning_rate(make_trainer, digits) -> None:
    from sdq_lightning import SDQClassifier

    guard = DivergenceGuard()
    module = SDQClassifier("digits_cnn", in_chans=1, lr=1e12, scheduler="none")
    trainer = make_trainer(max_epochs=3, callbacks=[guard])
    with pytest.raises(DivergenceError, match=r"divergence guard: training loss is (nan|inf) at epoch \d+, step \d+;"):
        trainer.fit(module, digits.train(), digits.test())


@pytest.mark.slow
def test_healthy_sdq_run_with_guard_is_untouched(make_trainer, digits, fp_teacher) -> None:
    from sdq_lightning import SDQ, SDQClassifier

    student = SDQClassifier("digits_cnn", in_chans=1, lr=0.02)
    student.model.load_state_dict(fp_teacher.model.state_dict())
    guard = DivergenceGuard(reference_acc=0.95)
    sdq = SDQ(search_epochs=1, budget={"metric": "avg_bits", "target": 3.0}, activation_bits=None)
    trainer = make_trainer(max_epochs=2, limit_train_batches=6, callbacks=[sdq, guard])
    L.seed_everything(0, verbose=False)
    trainer.fit(student, digits.train(), digits.test())
    assert guard.message is None and trainer.current_epoch == 2 and sdq.plan.average_bits <= 3.0
    assert guard.best_acc > 0.9 and guard.last_good["epoch"] == 1


@pytest.mark.parametrize("metric", ["val_acc", "val/accuracy", "valid_acc"])
def test_collapse_is_found_under_the_users_own_accuracy_name(make_trainer, digits, metric) -> None:
    guard = DivergenceGuard(patience=1)
    with pytest.raises(DivergenceError, match=rf"divergence guard: {metric} fell to 0\.1\d* at epoch 2,"):
        fit(make_trainer, digits, TinyNet(collapse_from_epoch=2, metric=metric), guard)


def test_monitor_names_the_accuracy(make_trainer, digits) -> None:
    guard = DivergenceGuard(patience=1, monitor="score")
    with pytest.raises(DivergenceError, match=r"score fell to 0\.1\d* at epoch 2,"):
        fit(make_trainer, digits, TinyNet(collapse_from_epoch=2, metric="score"), guard)


def test_no_accuracy_warns_once_and_still_keeps_the_last_good_state(make_trainer, digits, tmp_path) -> None:
    guard = DivergenceGuard()
    with pytest.warns(UserWarning) as record:
        fit(make_trainer, digits, TinyNet(metric=None), guard, max_epochs=3)
    missing = [str(w.message) for w in record if "no validation accuracy logged" in str(w.message)]
    assert len(missing) == 1, missing
    assert "logged: ['val_loss']" in missing[0] and "SDQ(runtime={'guard': {'monitor': '<name>'}})" in missing[0]
    assert guard.last_good["epoch"] == 2 and guard.last_good["acc"] is None
    assert (tmp_path / "checkpoints" / "last_good.ckpt").is_file()


def test_the_untrained_state_is_never_kept(make_trainer, digits, tmp_path) -> None:
    guard = DivergenceGuard()
    with pytest.raises(DivergenceError) as info:
        fit(make_trainer, digits, TinyNet(nan_from_step=3), guard)  # before the first validation after training
    assert str(info.value).endswith("no state was kept (no sane validation since training started)")
    assert not (tmp_path / "checkpoints" / "last_good.ckpt").exists()


def test_last_good_goes_to_the_runs_log_folder(digits, tmp_path, monkeypatch) -> None:
    from lightning.pytorch.loggers import CSVLogger

    monkeypatch.chdir(tmp_path)
    guard = DivergenceGuard()
    trainer = L.Trainer(max_epochs=1, callbacks=[guard], logger=CSVLogger(tmp_path / "logs"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", devices=1)
    trainer.fit(TinyNet(), digits.train(), digits.test())
    assert guard.last_good["path"] == str(Path(trainer.log_dir) / "checkpoints" / "last_good.ckpt")
    assert Path(guard.last_good["path"]).is_file() and not (tmp_path / "checkpoints").exists()


def test_last_good_goes_next_to_the_plan_of_the_sdq_callback(make_trainer, digits, tmp_path) -> None:
    from sdq_lightning import SDQ

    sdq = SDQ(weight_bits=(8,), activation_bits=None, search_epochs=0, runtime={"save_dir": tmp_path / "run"})
    trainer = make_trainer(max_epochs=1, callbacks=[sdq])
    trainer.fit(TinyNet(), digits.train(), digits.test())
    assert sdq.guard.last_good["path"] == str(tmp_path / "run" / "checkpoints" / "last_good.ckpt")
    assert (tmp_path / "run" / "checkpoints" / "last_good.ckpt").is_file()
