"""The SDQ callback on real data: learning check, budgets, user modules, bf16, evaluation from checkpoints."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch

from helpers.user_module import UserNet
from sdq_lightning import SDQ, BitPlan, SDQClassifier
from sdq_lightning.quantizers import SDQWeightQuantizer



def _student(teacher: SDQClassifier) -> SDQClassifier:
    student = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    student.model.load_state_dict(teacher.model.state_dict())
    return student


def _fit_sdq(quiet_trainer, digits, teacher, target: float, save_dir) -> tuple[SDQ, SDQClassifier, float]:
    L.seed_everything(0, verbose=False)
    student = _student(teacher)
    sdq = SDQ(activation_bits=4, budget={"metric": "avg_bits", "target": target}, search_epochs=4,
              teacher=teacher.model, runtime={"save_dir": save_dir})
    trainer = quiet_trainer(max_epochs=8, callbacks=[sdq], default_root_dir=save_dir)
    trainer.fit(student, digits.train())
    acc = trainer.test(student, digits.test(), verbose=False)[0]["test/acc"]
    return sdq, student, acc


@pytest.mark.slow
def test_learns_digits_under_budget(make_trainer, digits, fp_teacher, tmp_path):
    sdq, student, acc = _fit_sdq(make_trainer, digits, fp_teacher, 2.0, tmp_path)
    assert acc >= 0.90, f"test accuracy {acc:.4f} below 0.90"
    assert sdq.plan.average_bits <= 2.0, f"plan average {sdq.plan.average_bits:.4f} above the 2.0 budget"
    assert len(set(sdq.plan.values())) > 1, f"expected a mixed plan, got {dict(sdq.plan)}"
    saved = BitPlan.load(tmp_path / "plan.yaml")
    assert dict(saved) == dict(sdq.plan)
    assert [h["phase"] for h in sdq.history] == ["search"] * 4 + ["train"] * 4
    # the frozen model really computes at the planned bits
    for name, m in student.named_modules():
        if isinstance(m, SDQWeightQuantizer):
            assert m.frozen
    tight, _, _ = _fit_sdq(make_trainer, digits, fp_teacher, 1.5, tmp_path / "tight")
    assert tight.plan.average_bits <= 1.5, f"plan average {tight.plan.average_bits:.4f} above the 1.5 budget"
    assert tight.plan.average_bits < sdq.plan.average_bits, \
        f"tighter budget: {tight.plan.average_bits:.4f} bits, not below {sdq.plan.average_bits:.4f}"


def test_user_module_with_weight_decay(make_trainer, digits):
    L.seed_everything(0, verbose=False)
    module = UserNet("cnn_plain", width=16, lr=0.05, momentum=0.9, weight_decay=5e-4)  # decay on every parameter
    sdq = SDQ(activation_bits=None, budget={"metric": "avg_bits", "target": 3.0}, search_epochs=2)
    trainer = make_trainer(max_epochs=3, callbacks=[sdq])
    trainer.fit(module, digits.train())
    dbp_ids = {id(m.dbp) for m in module.modules() if isinstance(m, SDQWeightQuantizer)}
    step_ids = {id(m.steps) for m in module.modules() if isinstance(m, SDQWeightQuantizer)}
    user_ids = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert dbp_ids and not dbp_ids & user_ids, "DBPs must not sit in the user's (weight-decayed) optimizer"
    assert not step_ids & user_ids
    assert not {id(p) for g in sdq.search.optimizer.param_groups for p in g["params"]} - dbp_ids
    assert all(g.get("weight_decay", 0) == 0 for g in sdq.search.optimizer.param_groups)
    assert all(g.get("weight_decay", 0) == 0 for g in sdq._step_opt.param_groups)
    assert sdq.plan.average_bits <= 3.0
    assert sdq.plan.layers["net.0"].w_bits == 8 and sdq.plan.layers["net.6"].w_bits == 8  # first/last policy


def test_bf16_mixed_with_kd(make_trainer, digits, fp_teacher):
    L.seed_everything(0, verbose=False)
    student = _student(fp_teacher)
    sdq = SDQ(activation_bits=4, budget={"metric": "avg_bits", "target": 3.0}, search_epochs=1, teacher=fp_teacher.model)
    trainer = make_trainer(max_epochs=2, callbacks=[sdq], precision="bf16-mixed", limit_train_batches=3)
    trainer.fit(student, digits.train())
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["sdq/kd"]) and torch.isfinite(metrics["sdq/ebr"])
    assert sdq.plan.average_bits <= 3.0
    assert not any(p.requires_grad for p in sdq.teacher.parameters()) and not sdq.teacher.training


def test_evaluate_from_checkpoint_rebuilds_model(make_trainer, digits, fp_teacher, tmp_path):
    L.seed_everything(0, verbose=False)
    student = _student(fp_teacher)
    args = dict(activation_bits=4, budget={"metric": "bitops", "target": 2.0e7}, search_epochs=1)
    sdq = SDQ(**args)
    trainer = make_trainer(max_epochs=2, callbacks=[sdq], limit_train_batches=8, default_root_dir=tmp_path)
    trainer.fit(student, digits.train())
    ckpt = tmp_path / "final.ckpt"
    trainer.save_checkpoint(ckpt)
    assert sdq.plan.bitops <= 2.0e7
    raw = torch.load(ckpt, weights_only=True)  # the whole checkpoint loads with the safe loader
    assert any(k.endswith("weight_quant.frozen_index") for k in raw["state_dict"])
    x = next(iter(digits.test()))[0]
    student.eval()
    expected = student(x)
    fresh = SDQClassifier("digits_cnn", in_chans=1)
    sdq2 = SDQ(**args)
    result = make_trainer(callbacks=[sdq2]).test(fresh, digits.test(), ckpt_path=str(ckpt), verbose=False)
    fresh.eval()
    assert torch.equal(fresh(x), expected)
    assert dict(sdq2.plan) == dict(sdq.plan)
    assert result[0]["test/acc"] > 0.5
    preds = make_trainer(callbacks=[SDQ(**args)]).predict(SDQClassifier("digits_cnn", in_chans=1),
                                                           digits.test(), ckpt_path=str(ckpt))
    assert torch.equal(torch.cat(preds)[: len(x)], expected.argmax(-1))


def test_train_under_given_plan(make_trainer, digits, fp_teacher, tmp_path):
    plan_model = copy.deepcopy(fp_teacher.model)
    plan = BitPlan.from_model(plan_model, example_input=torch.zeros(1, 1, 8, 8))
    plan = plan.with_bits({"conv1": 8, "conv2": 4, "conv3": 2, "fc": 8})
    plan.save(tmp_path / "given.yaml")
    L.seed_everything(0, verbose=False)
    module = _student(fp_teacher)
    sdq = SDQ(activation_bits=4, plan=tmp_path / "given.yaml", teacher=fp_teacher.model)
    make_trainer(max_epochs=1, callbacks=[sdq], limit_train_batches=5).fit(module, digits.train())
    assert dict(sdq.plan) == {"model.conv1": 8, "model.conv2": 4, "model.conv3": 2, "model.fc": 8} or \
        dict(sdq.plan) == dict(plan)


def test_step_follow_starts_each_width_at_its_rule_on_the_weights_it_reaches(make_trainer, digits):
    """``layers.step_follow=True`` from scratch: after 24 search steps, every width a layer has never drawn (below
    the lowest live pair it had) still has LSQ's rule on the layer's current weight (not on its random
    initialisation); without the option the same widths keep the initialisation's steps, which training has moved
    away from (the control)."""
    from sdq_lightning.quantizers.functional import weight_step_init
    from sdq_lightning.surgery import quant_layers

    class LowestLevel(L.Callback):  # the lowest live level each layer had after any step
        def __init__(self):
            self.lowest = {}

        def on_train_batch_end(self, trainer, pl_module, *args):
            for name, layer in quant_layers(pl_module).items():
                if layer.weight_quant is not None:
                    lv = layer.weight_quant.current_level
                    self.lowest[name] = min(self.lowest.get(name, lv), lv)

    with pytest.raises(ValueError, match="step_follow must be true or false"):
        SDQ(layers={"step_follow": "yes"})
    gaps = {}
    for follow in (True, False):
        L.seed_everything(0, verbose=False)
        module = SDQClassifier("digits_cnn", in_chans=1, lr=0.1)
        sdq = SDQ(activation_bits=4, budget={"metric": "avg_bits", "target": 2.0}, search_epochs=2,
                  layers={"step_follow": follow, "step_init": "lsq"})  # LSQ's rule: linear in mean|w|
        assert sdq.spec.step_follow is follow
        seen = LowestLevel()
        make_trainer(max_epochs=3, max_steps=24, callbacks=[sdq, seen]).fit(module, digits.train())
        worst, checked = 0.0, 0
        for name, layer in quant_layers(module).items():
            q = layer.weight_quant
            if q is None or len(q.candidates) == 1:
                continue
            for i in range(seen.lowest[name] - 1):  # the widths never drawn
                rule = weight_step_init(layer.weight.detach(), q.candidates[i])
                worst = max(worst, float((q.steps[i].detach() / rule - 1).abs().max()))
                checked += 1
        assert checked > 0
        gaps[follow] = worst
    assert gaps[True] < 1e-5, gaps
    assert gaps[False] > 1e-2, gaps
