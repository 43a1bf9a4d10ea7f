"""Every bad argument is a ValueError whose message names the argument and what is allowed."""

from __future__ import annotations

import pytest
import timm
import torch

import sdq_lightning as sq
from sdq_lightning import ActQuantizer, QuantSpec, SDQWeightQuantizer
from _nets import tiny_net


# -------------------------------------------------------------- candidates
def test_quantizer_empty_candidates():
    with pytest.raises(ValueError, match=r"candidates must be a non-empty sequence of integers in \[1, 8\]"):
        SDQWeightQuantizer(())


def test_quantizer_unsorted_candidates():
    with pytest.raises(ValueError, match=r"candidates must be sorted in increasing order, got \(4, 2, 8\)"):
        SDQWeightQuantizer((4, 2, 8))


def test_quantizer_duplicated_candidates():
    with pytest.raises(ValueError, match=r"candidates must not contain duplicates, got \(2, 4, 4\)"):
        SDQWeightQuantizer((2, 4, 4))


@pytest.mark.parametrize("bad", [0, 9, 2.0, True])
def test_quantizer_out_of_range_candidates(bad):
    with pytest.raises(ValueError, match=r"candidates must hold integers in \[1, 8\], got " + repr(bad)):
        SDQWeightQuantizer((bad, 4) if bad in (0, True) else (2, bad))


def test_spec_empty_weight_bits():
    with pytest.raises(ValueError, match=r"weight_bits must be a non-empty sequence of integers in \[1, 8\]"):
        QuantSpec(weight_bits=())


def test_spec_unsorted_weight_bits():
    with pytest.raises(ValueError, match=r"weight_bits must be sorted in increasing order"):
        QuantSpec(weight_bits=(8, 4))


def test_spec_duplicated_weight_bits():
    with pytest.raises(ValueError, match=r"weight_bits must not contain duplicates"):
        QuantSpec(weight_bits=(2, 2, 4))


@pytest.mark.parametrize("bad", [0, 16])
def test_spec_out_of_range_weight_bits(bad):
    with pytest.raises(ValueError, match=rf"weight_bits must hold integers in \[1, 8\], got {bad}"):
        QuantSpec(weight_bits=(2, bad) if bad > 8 else (bad, 2))


# ------------------------------------------------------------------- plans
def _plan_and_model():
    model = tiny_net()
    prof = sq.profile_model(model, torch.randn(1, 1, 4, 4))
    sq.quantize_model(model, QuantSpec(weight_bits=(2, 4, 8), first_last="search"))
    return sq.BitPlan.from_model(model, profile=prof), model


def test_with_bits_unknown_layer():
    plan, _ = _plan_and_model()
    with pytest.raises(ValueError, match=r"unknown layer names for this plan: \['conv9'\]"):
        plan.with_bits({"conv9": 4})


def test_apply_plan_with_unknown_layer():
    plan, model = _plan_and_model()
    layers = dict(plan.layers)
    layers["7"] = layers.pop("5")
    with pytest.raises(ValueError, match=r"plan names layers the model does not have .*\['7'\]"):
        sq.BitPlan(layers).apply(model)


def test_freeze_bits_outside_candidates():
    q = SDQWeightQuantizer((2, 4, 8))
    with pytest.raises(ValueError, match=r"bits must be one of the candidates \(2, 4, 8\), got 3"):
        q.freeze(3)


def test_apply_bits_outside_candidates():
    plan, model = _plan_and_model()
    with pytest.raises(ValueError, match=r"plan bits 3 for '2' are outside its candidates \(2, 4, 8\)"):
        plan.with_bits({"2": 3}).apply(model)


def test_plan_bits_outside_declared_candidates():
    plan, _ = _plan_and_model()
    plan.metadata["candidates"] = [2, 4, 8]
    with pytest.raises(ValueError, match=r"plan bits must be among the candidates \(2, 4, 8\), got \{'2': 3\}"):
        plan.with_bits({"2": 3})


def test_plan_bits_outside_1_to_8():
    plan, _ = _plan_and_model()
    with pytest.raises(ValueError, match=r"w_bits of layer '2' must be an integer in \[1, 8\] or None"):
        plan.with_bits({"2": 12})


def _resnet20_plan():
    model = timm.create_model("resnet20", num_classes=10)
    return sq.BitPlan.from_model(model, torch.randn(1, 3, 32, 32)).with_bits({"layer1.0.conv1": None})


def test_resnet20_plan_on_resnet32():
    with pytest.raises(ValueError, match=r"layers the plan does not cover \(a plan for a different model\?\)"):
        _resnet20_plan().apply(timm.create_model("resnet32", num_classes=10))


def test_resnet20_plan_on_digits_cnn():
    with pytest.raises(ValueError, match=r"plan names layers the model does not have \(a plan for a different"):
        _resnet20_plan().apply(timm.create_model("digits_cnn", in_chans=1))


def test_plan_layer_sizes_differ():
    plan = _resnet20_plan()
    with pytest.raises(ValueError, match=r"layer sizes differ between plan and model .*'fc'"):
        plan.apply(timm.create_model("resnet20", num_classes=100))


# ------------------------------------------------------ activations, budget
@pytest.mark.parametrize("bad", [1, 9, 4.0, "4"])
def test_bad_activation_bits(bad):
    with pytest.raises(ValueError, match=r"activation_bits must be an integer in \[2, 8\] or None \(floating"):
        QuantSpec(activation_bits=bad)


def test_bad_layer_activation_bits():
    with pytest.raises(ValueError, match=r"activation bits of 2 must be an integer in \[2, 8\]"):
        sq.quantize_model(tiny_net(), QuantSpec(layer_act_bits={"2": 12}))


def test_bad_act_quantizer_bits():
    with pytest.raises(ValueError, match=r"bits must be an integer in \[1, 8\], got 0"):
        ActQuantizer(0)


def test_bad_budget_metric():
    with pytest.raises(ValueError, match=r"budget metric must be one of \('avg_bits', 'size', 'bitops'\), got 'flops'"):
        sq.Budget("flops", 2.0)


@pytest.mark.parametrize("bad", [0, -1.0, "2", True])
def test_bad_budget_target(bad):
    with pytest.raises(ValueError, match=r"budget target must be a positive number"):
        sq.Budget("avg_bits", bad)


def test_bad_budget_keys():
    with pytest.raises(ValueError, match=r"budget accepts the keys 'metric' and 'target', got unknown \['bits'\]"):
        sq.Budget.coerce({"bits": 2})


def test_bad_reading_and_estimator():
    with pytest.raises(ValueError, match=r"reading must be one of \('progressive', 'cascade'\), got 'greedy'"):
        SDQWeightQuantizer((2, 4), reading="greedy")
    with pytest.raises(ValueError, match=r"estimator must be one of \('gumbel', 'ste'\), got 'reinforce'"):
        QuantSpec(estimator="reinforce")


def test_bad_first_last_policy():
    with pytest.raises(ValueError, match=r"first_last must be one of \('8bit', 'fp', 'search'\), got '4bit'"):
        QuantSpec(first_last="4bit")


def test_bad_regex():
    with pytest.raises(ValueError, match=r"include pattern '\[' is not a valid regular expression"):
        QuantSpec(include=("[",))
