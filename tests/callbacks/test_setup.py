"""callbacks/setup.py: the SDQ callback's model setup, on its own (no Trainer.fit)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.callbacks import setup
from sdq_lightning.core.params import quantizer_params, take_from_optimizers


class _Wrapped(nn.Module):
    """A LightningModule-like root whose network sits under ``model`` next to a non-network child."""

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
        self.metric = nn.Identity()


def test_default_input_fn_reads_tensors_dicts_and_tuples():
    x = torch.zeros(2, 3)
    assert setup.default_input_fn(x) is x
    assert setup.default_input_fn({"image": x, "label": 1}) is x
    assert setup.default_input_fn((x, torch.ones(2))) is x
    with pytest.raises(ValueError, match="cannot find the model input in a dict batch; pass input_fn"):
        setup.default_input_fn({"pixels": x})


def test_network_of_finds_the_innermost_module_with_every_layer():
    from sdq_lightning.checkpoint import network_of, network_prefix

    root = _Wrapped()
    prefix, net = network_prefix(root), network_of(root)
    assert prefix == "model" and net is root.model
    assert (network_prefix(root.model), network_of(root.model)) == ("", root.model)


def test_profile_network_names_layers_relative_to_the_root_and_counts_macs():
    root = _Wrapped()
    prof = setup.profile_network(root, torch.randn(4, 3, 8, 8))
    assert set(prof) == {"model.0", "model.3"}
    assert prof["model.0"].params == 4 * 3 * 3 * 3
    assert prof["model.0"].macs == 4 * 3 * 3 * 3 * 6 * 6  # one sample
    assert prof["model.3"].macs == 4 * 6 * 6 * 5


def test_quantize_searchable_then_fixed_at_a_plan():
    root = _Wrapped()
    report, plan = setup.quantize(root, sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=None))
    assert plan is None and report.last_layer == "model.3"
    assert setup.num_classes_of(root, report.last_layer) == 5
    dbps, steps = quantizer_params(root)
    # first and last layers at 8 bits (weights and inputs): one candidate, no DBP to learn (turned off), the two
    # weight steps and two activation steps still learned
    n_act = sum(isinstance(m, sq.quantizers.ActQuantizer) for m in root.modules())
    assert dbps == [] and n_act == 2 and len(steps) == 2 + n_act
    assert all(not m.dbp.requires_grad for m in root.modules() if isinstance(m, sq.SDQWeightQuantizer))

    root2 = _Wrapped()
    spec = sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=None, first_last="search")
    report2, _ = setup.quantize(root2, spec)
    dbps2, _ = quantizer_params(root2)
    assert len(dbps2) == 2 and all(p.requires_grad for p in dbps2)
    # a plan written for the bare network (names "0", "3") is rebased onto the wrapped root ("model.0", "model.3")
    given = sq.BitPlan.from_model(root2.model, torch.randn(1, 3, 8, 8)).with_bits({"0": 4, "3": 2})
    root3 = _Wrapped()
    _, rebased = setup.quantize(root3, spec, given)
    assert dict(rebased) == {"model.0": 4, "model.3": 2}  # the plan as applied, under the root's names
    assert {n: q.bits for n, q in ((n, m.weight_quant) for n, m in sq.quant_layers(root3).items())} == \
        {"model.0": 4, "model.3": 2}


def test_take_from_optimizers_removes_exactly_the_given_parameters():
    root = _Wrapped()
    setup.quantize(root, sq.QuantSpec(weight_bits=(2, 4, 8), activation_bits=4, first_last="search"))
    dbps, steps = quantizer_params(root)
    opt = torch.optim.SGD(root.parameters(), lr=0.1)
    n_before = len(opt.param_groups[0]["params"])
    removed = take_from_optimizers([opt], dbps + steps)
    left = {id(p) for p in opt.param_groups[0]["params"]}
    assert removed == len(dbps) + len(steps) and len(left) == n_before - removed
    assert not ({id(p) for p in dbps + steps} & left)
    assert id(root.model[0].weight) in left


def test_find_example_input_prefers_the_given_one_then_the_module_attribute():
    class Trainer:
        datamodule = None

    class Module(nn.Module):
        example_input_array = torch.ones(1, 3)

    given = torch.zeros(1, 3)
    assert setup.find_example_input(Trainer(), Module(), "fit", setup.default_input_fn, given) is given
    assert torch.equal(setup.find_example_input(Trainer(), Module(), "fit", setup.default_input_fn), torch.ones(1, 3))
    assert setup.find_example_input(Trainer(), nn.Linear(3, 2), "fit", setup.default_input_fn) is None
