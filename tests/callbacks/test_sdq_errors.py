"""Invalid arguments raise at construction or at setup, one clear message each."""

from __future__ import annotations

import time

import pytest
import torch

from sdq_lightning import SDQ, BitPlan, EBROptions, FreezeOptions, SDQClassifier, SearchOptions


def test_unknown_budget_metric():
    with pytest.raises(ValueError, match=r"budget metric must be one of \('avg_bits', 'size', 'bitops'\), got 'flops'"):
        SDQ(budget={"metric": "flops", "target": 2.0})


def test_unknown_budget_key():
    with pytest.raises(ValueError, match="budget accepts the keys 'metric' and 'target'"):
        SDQ(budget={"metric": "avg_bits", "goal": 2.0})


def test_target_below_minimum(make_trainer, digits):
    sdq = SDQ(weight_bits=(2, 4, 8), budget={"metric": "avg_bits", "target": 1.0}, search_epochs=1)
    module = SDQClassifier("digits_cnn", in_chans=1)
    with pytest.raises(ValueError, match=r"budget target 1 \(avg_bits\) is below what the candidates and fixed layers "
                                         r"allow: the minimum is 2\.1"):
        make_trainer(max_epochs=2, callbacks=[sdq], limit_train_batches=1).fit(module, digits.train())


def test_search_epochs_not_below_max_epochs(make_trainer, digits):
    sdq = SDQ(search_epochs=3)
    with pytest.raises(ValueError, match=r"search_epochs \(3\) must be smaller than the trainer's max_epochs \(3\)"):
        make_trainer(max_epochs=3, callbacks=[sdq]).fit(SDQClassifier("digits_cnn", in_chans=1), digits.train())


def test_teacher_with_other_classes(make_trainer, digits):
    teacher = SDQClassifier("digits_cnn", in_chans=1, num_classes=5).model
    sdq = SDQ(search_epochs=1, teacher=teacher, runtime={"example_input": torch.zeros(1, 1, 8, 8)})
    with pytest.raises(ValueError, match="teacher outputs 5 classes but the student has 10"):
        make_trainer(max_epochs=2, callbacks=[sdq]).fit(SDQClassifier("digits_cnn", in_chans=1), digits.train())


def test_plan_for_other_model(make_trainer, digits, tmp_path):
    import timm

    other = timm.create_model("resnet20", num_classes=10)
    plan = BitPlan.from_model(other, example_input=torch.zeros(1, 3, 32, 32))
    plan.save(tmp_path / "resnet20.yaml")
    sdq = SDQ(plan=tmp_path / "resnet20.yaml")
    with pytest.raises(ValueError, match="plan names layers the model does not have"):
        make_trainer(max_epochs=1, callbacks=[sdq]).fit(SDQClassifier("digits_cnn", in_chans=1), digits.train())


def test_search_epochs_zero_without_plan():
    with pytest.raises(ValueError, match="search_epochs=0 needs plan=... or a single weight bitwidth"):
        SDQ(search_epochs=0)


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be a positive number, a \\(start, end\\) pair"):
        SDQ(search={"temperature": (1.0, -0.1)})


def test_bad_activation_bits():
    with pytest.raises(ValueError, match=r"activation_bits must be an integer in \[2, 8\] or None"):
        SDQ(activation_bits=12)


def test_bad_teacher_type():
    with pytest.raises(ValueError, match="teacher must be None, an nn.Module, a timm model name or a checkpoint path"):
        SDQ(teacher=3.5)


def test_unknown_teacher_name():
    with pytest.raises(ValueError, match="'not_a_model_xyz' is neither a file nor a timm model"):
        SDQ(search_epochs=1, teacher="not_a_model_xyz")


def test_offline_timm_teacher_fails_at_once_with_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # nothing cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    start = time.perf_counter()
    with pytest.raises(ValueError) as info:
        SDQ(search_epochs=1, teacher="resnet101")
    assert time.perf_counter() - start < 5
    assert str(info.value) == ("teacher 'resnet101' needs timm's pretrained weights, but they are not in the local "
                               "cache and HF_HUB_OFFLINE is set; pass a teacher checkpoint path (or an nn.Module), "
                               "or run once online to cache the weights")


def test_timm_teacher_without_pretrained_weights():
    with pytest.raises(ValueError, match="teacher 'resnet20' needs timm's pretrained weights, but timm has no "
                                         "pretrained weights for it;"):
        SDQ(search_epochs=1, teacher="resnet20")


def test_missing_plan_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="bit plan file not found"):
        SDQ(plan=tmp_path / "nope.yaml")


def test_unknown_kernels():
    with pytest.raises(ValueError, match=r"kernels must be one of \('eager', 'compile', 'auto'\) or None, got 'cuda'"):
        SDQ(runtime={"kernels": "cuda"})


def test_settle_must_be_a_bool():
    with pytest.raises(ValueError, match="settle must be true or false, got 'yes'"):
        SDQ(search={"settle": "yes"})
    assert SDQ(search=SearchOptions(settle=False)).options.search.settle is False


def test_options_take_a_dataclass_or_a_dict_and_name_an_unknown_key():
    assert SDQ(freeze={"rounding": "budget"}).options.freeze == FreezeOptions(rounding="budget")
    with pytest.raises(ValueError, match=r"search has no option 'ebr_weight'; its options: reading, estimator, "):
        SDQ(search={"ebr_weight": 0.2})
    with pytest.raises(ValueError, match="kd must be a KDOptions or a dict of its fields, got float"):
        SDQ(kd=1.0)
    with pytest.raises(ValueError, match="ebr.weight must be a number >= 0, got -1"):
        EBROptions(weight=-1)
    with pytest.raises(TypeError, match="keyword-only|positional argument"):
        SDQ((2, 4), 4, None, 1, None)  # after search_epochs every argument is named
