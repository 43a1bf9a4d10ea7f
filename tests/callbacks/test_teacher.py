"""load_teacher on a user's own LightningModule checkpoint: teacher_cls (class, import path or factory),
LightningCLI's _class_path, SDQClassifier checkpoints, and one-line errors saying what to pass."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sdq_lightning import SDQClassifier
from sdq_lightning.core.teacher import check_teacher_file, load_teacher


class Net(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LitNet(L.LightningModule):
    """A user's own module: not timm, nothing in its hyperparameters names a timm model."""

    def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = Net(hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def _save(module: L.LightningModule, digits, path, make_trainer) -> None:
    trainer = make_trainer(max_epochs=1, limit_train_batches=3)
    trainer.fit(module, digits.train())
    trainer.save_checkpoint(path)


@pytest.fixture
def lit_ckpt(tmp_path, digits, make_trainer):
    L.seed_everything(0, verbose=False)
    module = LitNet(hidden=24)
    path = tmp_path / "my_fp_model.ckpt"
    _save(module, digits, path, make_trainer)
    return module.eval(), path


def _same_outputs(a: nn.Module, b: nn.Module) -> bool:
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def _frozen(model: nn.Module) -> bool:
    return not model.training and not any(p.requires_grad for p in model.parameters())


def test_own_lightning_checkpoint_without_class_says_what_to_pass(lit_ckpt) -> None:
    _, path = lit_ckpt
    for call in (lambda: load_teacher(str(path), 10), lambda: check_teacher_file(str(path))):
        with pytest.raises(ValueError) as info:
            call()
        msg = str(info.value)
        assert "\n" not in msg
        assert f"teacher checkpoint {path} is a LightningModule checkpoint that names no model" in msg
        assert "hyper_parameters: hidden, lr" in msg
        assert "teacher_cls=<your LightningModule class" in msg and "LitNet.load_from_checkpoint(" in msg


def test_teacher_cls_class(lit_ckpt) -> None:
    module, path = lit_ckpt
    teacher = load_teacher(str(path), 10, teacher_cls=LitNet)
    assert isinstance(teacher, LitNet) and teacher.hparams.hidden == 24
    assert _same_outputs(teacher, module) and _frozen(teacher)
    check_teacher_file(str(path), teacher_cls=LitNet)  # no error


def test_teacher_cls_import_path(lit_ckpt) -> None:
    module, path = lit_ckpt
    teacher = load_teacher(path, teacher_cls=f"{LitNet.__module__}.LitNet")
    assert isinstance(teacher, LitNet) and _same_outputs(teacher, module)


def test_teacher_cls_factory_of_plain_module_strips_prefix(lit_ckpt) -> None:
    module, path = lit_ckpt
    teacher = load_teacher(path, teacher_cls=lambda: Net(hidden=24))
    assert isinstance(teacher, Net) and _same_outputs(teacher, module) and _frozen(teacher)


def test_teacher_cls_factory_that_does_not_match(lit_ckpt) -> None:
    _, path = lit_ckpt
    with pytest.raises(ValueError, match=r"does not match teacher_cls\(\): \d+ missing keys"):
        load_teacher(path, teacher_cls=lambda: nn.Linear(3, 4))


def test_bad_teacher_cls_import_path(lit_ckpt) -> None:
    _, path = lit_ckpt
    with pytest.raises(ValueError, match="teacher_cls 'nowhere_pkg.LitNet' cannot be imported"):
        load_teacher(path, teacher_cls="nowhere_pkg.LitNet")
    with pytest.raises(ValueError, match="import path 'package.module.Class', got 'LitNet'"):
        check_teacher_file(path, teacher_cls="LitNet")


def test_lightning_cli_class_path_hparam(tmp_path, lit_ckpt) -> None:
    module, path = lit_ckpt
    ckpt = torch.load(path, weights_only=True)
    ckpt["hyper_parameters"]["_class_path"] = f"{LitNet.__module__}.LitNet"
    cli_path = tmp_path / "cli.ckpt"
    torch.save(ckpt, cli_path)
    check_teacher_file(cli_path)
    teacher = load_teacher(cli_path)
    assert isinstance(teacher, LitNet) and _same_outputs(teacher, module)


def test_sdq_classifier_checkpoint_still_rebuilds_from_backbone(tmp_path, digits, make_trainer) -> None:
    L.seed_everything(0, verbose=False)
    module = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    path = tmp_path / "cls.ckpt"
    _save(module, digits, path, make_trainer)
    teacher = load_teacher(path, 10)
    assert _same_outputs(teacher, module.model.eval()) and _frozen(teacher)


def test_plain_state_dict_with_arch(tmp_path) -> None:
    import timm

    net = timm.create_model("digits_cnn", num_classes=10, in_chans=1).eval()
    path = tmp_path / "weights.pt"
    torch.save(net.state_dict(), path)
    with pytest.raises(ValueError, match=r"is a state dict that names no model to rebuild; pass teacher_cls="):
        load_teacher(path)
    assert _same_outputs(load_teacher(path, 10, arch="digits_cnn"), net)


def test_missing_checkpoint_file(tmp_path) -> None:
    missing = tmp_path / "nope.ckpt"
    with pytest.raises(FileNotFoundError, match=f"teacher checkpoint {missing} does not exist"):
        load_teacher(str(missing))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        check_teacher_file(str(missing))
    with pytest.raises(ValueError, match="'nope_net' is neither a file nor a timm model"):
        check_teacher_file("nope_net")  # not a file: checked as a timm name


def test_module_is_returned_frozen() -> None:
    net = Net()
    assert load_teacher(net) is net and _frozen(net)
