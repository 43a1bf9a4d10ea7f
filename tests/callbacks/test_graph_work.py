"""The eager work around a graphed network replayed as graphs of its own (``SDQ._graph_eager_work``, what
``compile="cuda-graphs"`` turns on): the KD teacher's forward, EBR with its gradients, the DBP step and the step-size
optimizer. On the CPU the capture is ``capture_eagerly`` (static inputs, static outputs overwritten by every replay,
warm-up passes that run for real): a whole fit through it equals the eager fit bit for bit. The ``gpu`` tests in
``tests/unit/test_cuda_graphs.py`` capture real CUDA graphs."""

from __future__ import annotations

import copy

import lightning.pytorch as pl
import torch
from torch import nn

import sdq_lightning as sq
from sdq_lightning.modules.graphs import capture_eagerly


class _Lit(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                   nn.Linear(8, 4))

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, _):
        return nn.functional.cross_entropy(self(batch[0]), batch[1])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _fit(tmp_path, graphed: bool):
    torch.manual_seed(0)
    teacher = _Lit().model.eval()
    x, y = torch.randn(128, 3, 12, 12), torch.randint(0, 4, (128,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    cb = sq.SDQ(weight_bits=(2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 4.0},
                search_epochs=2, teacher=copy.deepcopy(teacher), kd_in_search=True, ebr_weight=0.1,
                save_dir=tmp_path, guard=False)
    if graphed:
        cb._graph_eager_work(capture_eagerly)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=4, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    torch.manual_seed(1)
    lit = _Lit()
    trainer.fit(lit, loader)
    return cb, lit


def test_a_fit_with_the_eager_work_graphed_equals_the_eager_fit(tmp_path):
    cb_e, lit_e = _fit(tmp_path / "eager", graphed=False)
    cb_g, lit_g = _fit(tmp_path / "graphed", graphed=True)
    teacher, kd, ebr = cb_g.losses.graphs
    graphs = {"teacher": teacher, "kd": kd, "ebr": ebr, "dbp": cb_g.search.graph,
              "step sizes": cb_g._step_graph.graph}
    replays = {name: (g.captures, g.replays, g.failed) for name, g in graphs.items()}
    # 8 batches per epoch: KD every step (kd_in_search), the DBP step for 2 epochs, EBR for 2, the step sizes from
    # their second step (the first makes the optimizer's state)
    assert replays == {"teacher": (1, 32, None), "kd": (1, 32, None), "ebr": (1, 16, None), "dbp": (1, 16, None),
                       "step sizes": (1, 31, None)}, replays
    assert cb_g.plan.layers == cb_e.plan.layers
    state_e, state_g = lit_e.state_dict(), lit_g.state_dict()
    assert state_e.keys() == state_g.keys()
    for k in state_e:
        assert torch.equal(state_e[k], state_g[k]), k
    assert [h.get("val/acc") for h in cb_g.history] == [h.get("val/acc") for h in cb_e.history]
    assert torch.equal(cb_g.search.optimizer.multiplier, cb_e.search.optimizer.multiplier)


def test_graphed_optimizer_step_equals_the_optimizer_and_recaptures_at_a_new_lr():
    from sdq_lightning.modules.graphs import GraphedOptimizerStep
    from sdq_lightning.quantizers.optim import LogStepAdam

    torch.manual_seed(0)
    params = [[nn.Parameter(torch.rand(3) + 0.5), nn.Parameter(torch.rand(()) + 0.5)] for _ in range(2)]
    params[1] = [nn.Parameter(p.detach().clone()) for p in params[0]]
    plain, graphed = LogStepAdam(params[0], lr=0.05), LogStepAdam(params[1], lr=0.05)
    stepper = GraphedOptimizerStep(graphed, capture_fn=capture_eagerly)
    for i in range(6):
        if i == 4:  # a new learning rate is a new graph (the rate is baked into the captured kernels)
            for opt in (plain, graphed):
                opt.param_groups[0]["lr"] = 0.01
        grads = [torch.randn(3), torch.randn(())]
        for ps, run in ((params[0], plain.step), (params[1], stepper.step)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            run()
        for a, b in zip(*params):
            assert torch.equal(a, b), i
    # the first step made the state (eager), then one capture per learning rate
    assert (stepper.graph.captures, stepper.graph.replays) == (2, 5)
