"""``SDQ``: the Lightning callback that searches per-layer bitwidths, freezes them on the budget and trains on.

Phase 1 (search, ``search_epochs`` epochs): stochastic bitwidths from the DBPs, moved by the task gradient and a
budget controller that drives the expected cost to the target by the end of the search (:mod:`.search`).
Phase boundary (the last training batch of the last search epoch, so that epoch's validation already sees the frozen
plan): decide, project onto the budget by a loss-aware ranking (never above the target), write ``plan.yaml``.
Phase 2: fixed bits; EBR and KD added to the training gradient.

Nothing in the user's LightningModule needs to change: the callback swaps layers in ``setup`` (before checkpoint
weights are restored and before optimizers are built), moves quantizer parameters out of the user's optimizers into
its own (DBPs: :class:`~sdq_lightning.quantizers.optim.DBPOptimizer`; steps:
:class:`~sdq_lightning.quantizers.optim.LogStepAdam`; no weight decay), and adds its loss terms to the gradient
through autograd hooks (KD enters through the classifier's output, so the network is traversed by ONE backward pass).

The parts it composes, each in its own module with its own tests: the bit search and its controller
(:mod:`.search`, :mod:`sdq_lightning.quantizers.optim`), the added losses (:mod:`.losses`: EBR and KD gradients),
the teacher (:mod:`.teacher`), the divergence guard (:mod:`.guard`), monitoring (:mod:`.monitor`: what is logged and
recorded per step and epoch), the temperature schedule (:mod:`.schedule`), the model's quantization at setup
(:mod:`.setup`), the freeze (:mod:`.freeze`) and the CUDA-graph replay (:mod:`sdq_lightning.modules.graphs`). This
module keeps the Lightning hooks and the callback's state.

Precision: under a gradient scaler (``precision="16-mixed"``) the added gradients are multiplied by the scaler's
current scale like the loss, and the callback's optimizers go through the scaler exactly like the user's
(``unscale_`` then ``step``: skipped on inf/NaN), see :func:`grad_scaler`.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from sdq_lightning.budget import BitPlan, Budget, CostModel
from sdq_lightning.budget.profile import LayerProfile
from sdq_lightning.callbacks.guard import DivergenceGuard, infer_num_classes
from sdq_lightning.callbacks.monitor import StepTermLog, epoch_record, log_epoch
from sdq_lightning.callbacks.setup import (
    default_input_fn,
    default_probe_loss,
    find_example_input,
    num_classes_of,
    profile_network,
    quantize,
)
from sdq_lightning.checkpoint import network_of, network_prefix
from sdq_lightning.core.freeze import freeze_message, freeze_searched, freeze_warnings
from sdq_lightning.core.losses import AddedLosses
from sdq_lightning.core.params import quantizer_params, take_from_optimizers
from sdq_lightning.core.schedule import resolve_schedule
from sdq_lightning.core.search import BitSearch
from sdq_lightning.core.teacher import check_teacher_file
from sdq_lightning.integer import activate_integer_only, is_integer_only
from sdq_lightning.modules.batched import BatchedWeights, batch_weights
from sdq_lightning.modules.fused import set_kernels
from sdq_lightning.modules.graphs import CallCaptureFn, GraphedNetwork, GraphedOptimizerStep
from sdq_lightning.options import (
    COMPILE_MODES,
    EBROptions,
    FreezeOptions,
    KDOptions,
    LayerOptions,
    RuntimeOptions,
    SearchOptions,
    coerce_options,
)
from sdq_lightning.quantizers import ActQuantizer, SDQWeightQuantizer
from sdq_lightning.quantizers.optim import LogStepAdam
from sdq_lightning.surgery import QuantSpec, quant_layers

__all__ = ["COMPILE_MODES", "SDQ", "Phase", "grad_scaler"]

# Per-step terms that describe the search; phase 2 logs the plan's cost ("cost") instead.
SEARCH_TERMS = ("expected_cost", "budget_schedule", "multiplier", "penalty", "temperature")
MIN_SAMPLES_PER_CLASS = 10  # fewer training samples per class than this: warned at the start of training


def grad_scaler(trainer: pl.Trainer) -> Any:
    """The precision plugin's enabled gradient scaler (``16-mixed``), else None."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    return scaler


def _scale_of(scaler: Any) -> Tensor | float:
    """The scaler's current scale as a device tensor (no host read), or 1."""
    if scaler is None:
        return 1.0
    scale = getattr(scaler, "_scale", None)
    return scale if isinstance(scale, Tensor) else float(scaler.get_scale())


RECOMPILE_LIMIT = 32  # Dynamo recompiles allowed to a network compiled by SDQ(runtime={"compile": ...})


class Phase(str, enum.Enum):
    SEARCH = "search"
    TRAIN = "train"


class SDQ(Callback):
    """Stochastic Differentiable Quantization with mixed precision, as one callback.

    Args:
        weight_bits: candidate weight bitwidths (sorted, in 1..8). One value = uniform quantization, no search.
        activation_bits: input-activation bits of every quantized layer (2..8), None = floating point.
        budget: ``{"metric": "avg_bits" | "size" | "bitops", "target": float}`` (size in bytes, bitops per sample).
        search_epochs: length of phase 1; the phase boundary is the end of that epoch. Must be < max_epochs.
        teacher: None, an nn.Module, a timm model name or a checkpoint path: KD in phase 2 (see ``kd``).
        plan: a BitPlan or a plan file: skip the search and train under that plan.
        seed: sampling seed (draws are a function of seed, layer and global step: identical on every rank).
        integer_only: phase 2 trains the integer graph onnxruntime runs (:mod:`sdq_lightning.integer`): per-channel
            weight steps, BatchNorm frozen and folded after phase 2's first ``freeze.bn_fold_steps`` steps, the
            residual stream and every tensor quantized as deployed, exact integer forward, straight-through
            gradients; ``sdq-export`` then writes onnxruntime's integer graph. Runs eager and per layer
            (``runtime.compile``, ``runtime.batched`` do not apply); EBR is not applied (its bins are the unfolded
            weights').

    The expert options, each a frozen dataclass of :mod:`sdq_lightning.options` or a dict of its fields (left out:
    the defaults), documented field by field there:
        layers: :class:`~sdq_lightning.options.LayerOptions`: first/last-layer policy, include / exclude,
            per-channel steps.
        search: :class:`~sdq_lightning.options.SearchOptions`: reading, estimator, temperature, the budget
            controller, the task force (``task_estimate``, probes), settling, the DBP and step learning rates, drops.
        freeze: :class:`~sdq_lightning.options.FreezeOptions`: the phase boundary's rounding and projection.
        ebr: :class:`~sdq_lightning.options.EBROptions`: EBR in phase 2 (``weight=0``: off).
        kd: :class:`~sdq_lightning.options.KDOptions`: how ``teacher`` is loaded and distilled (temperature,
            weights, KD during the search).
        runtime: :class:`~sdq_lightning.options.RuntimeOptions`: LSQ kernels, ``torch.compile`` / CUDA graphs, the
            batched weight pass, the divergence guard, ``input_fn``, ``example_input``, ``save_dir``.

    Example: ``SDQ(weight_bits=(2, 4, 8), budget={"metric": "avg_bits", "target": 3.0},
    search={"budget_control": "penalty"}, runtime=RuntimeOptions(guard=False))``.
    """

    def __init__(
        self,
        weight_bits: Sequence[int] = (1, 2, 3, 4, 5, 6, 7, 8),
        activation_bits: int | None = 4,
        budget: dict | Budget | None = None,
        search_epochs: int = 3,
        *,
        teacher: nn.Module | str | Path | None = None,
        plan: BitPlan | str | Path | None = None,
        seed: int = 0,
        integer_only: bool = False,
        layers: LayerOptions | dict | None = None,
        search: SearchOptions | dict | None = None,
        freeze: FreezeOptions | dict | None = None,
        ebr: EBROptions | dict | None = None,
        kd: KDOptions | dict | None = None,
        runtime: RuntimeOptions | dict | None = None,
    ) -> None:
        super().__init__()
        self.options = SimpleNamespace(
            layers=coerce_options(LayerOptions, layers, "layers"),
            search=coerce_options(SearchOptions, search, "search"),
            freeze=coerce_options(FreezeOptions, freeze, "freeze"),
            ebr=coerce_options(EBROptions, ebr, "ebr"),
            kd=coerce_options(KDOptions, kd, "kd"),
            runtime=coerce_options(RuntimeOptions, runtime, "runtime"))
        lay, opt, run = self.options.layers, self.options.search, self.options.runtime
        self.kernels = run.kernels
        self.compile = None if run.compile == "auto" else run.compile  # "auto" is resolved at fit start
        self._compile_request = run.compile
        self.task_estimate = opt.resolved_task_estimate  # falls back to "pathwise" where probing cannot run
        self.probe_loss = opt.probe_loss or default_probe_loss
        self.probes_per_step = opt.probes_per_step
        self._probe_out: Any = None  # the training forward's output of this step (task_estimate="paired")
        self._probe_batch: Any = None
        self._probe_saved: list[Tensor] | None = None  # the buffers' values before the probes, restored after
        self._probe_hook: Any = None
        if not isinstance(integer_only, bool):
            raise ValueError(f"integer_only must be true or false, got {integer_only!r}")
        if integer_only and run.compile not in (None, "auto"):
            raise ValueError(f"integer_only runs eager: compile must be None or 'auto', got {run.compile!r}")
        self.batched = run.batched and not integer_only
        self._fold_at: int | None = None  # integer_only: the global step at which phase 2 folds BatchNorm
        self.spec = QuantSpec(weight_bits=tuple(weight_bits), activation_bits=activation_bits,
                              first_last=lay.first_last, first_last_bits=lay.first_last_bits, include=lay.include,
                              exclude=lay.exclude, reading=opt.reading, estimator=opt.estimator,
                              per_channel=lay.per_channel, seed=seed, integer_only=integer_only,
                              step_init=lay.step_init, step_follow=lay.step_follow)
        self.budget = Budget.coerce(budget)
        if isinstance(search_epochs, bool) or not isinstance(search_epochs, int) or search_epochs < 0:
            raise ValueError(f"search_epochs must be an integer >= 0, got {search_epochs!r}")
        self._temperature = resolve_schedule(opt.temperature, "temperature")
        if teacher is not None and not isinstance(teacher, (nn.Module, str, Path)):
            raise ValueError(f"teacher must be None, an nn.Module, a timm model name or a checkpoint path, got "
                             f"{type(teacher).__name__}")
        kd = self.options.kd
        if isinstance(teacher, (str, Path)):
            check_teacher_file(teacher, kd.teacher_arch, kd.teacher_cls)
        guard = run.guard
        self.guard = DivergenceGuard(**dict(guard)) if not isinstance(guard, bool) else \
            (DivergenceGuard() if guard else None)
        if isinstance(plan, (str, Path)):
            plan = BitPlan.load(plan)
        if plan is not None and not isinstance(plan, BitPlan):
            raise ValueError(f"plan must be a BitPlan or a path to a plan file, got {type(plan).__name__}")
        self.searching_enabled = plan is None and len(self.spec.weight_bits) > 1
        if self.searching_enabled and search_epochs == 0:
            raise ValueError("search_epochs=0 needs plan=... or a single weight bitwidth (uniform quantization); "
                             f"got weight_bits={self.spec.weight_bits}")
        self.search_epochs = search_epochs if self.searching_enabled else 0
        ebr = self.options.ebr
        self.losses = AddedLosses(ebr.weight, ebr.weighting, ebr.entropy_weight, teacher, kd.teacher_arch,
                                  kd.teacher_cls, kd.temperature, kd.weight, kd.ce_weight)
        self.input_fn = run.input_fn or default_input_fn
        self.example_input = run.example_input
        self.save_dir = Path(run.save_dir) if run.save_dir is not None else None

        self.plan: BitPlan | None = plan
        self._given_plan = plan is not None
        self.phase = Phase.SEARCH if self.searching_enabled else Phase.TRAIN
        self.history: list[dict[str, Any]] = []
        self.profile: dict[str, LayerProfile] | None = None
        self.cost_model: CostModel | None = None
        self.report = None
        self.search: BitSearch | None = None
        self._pending_search: dict[str, Any] | None = None
        self._step_opt: torch.optim.Optimizer | None = None
        self._pending_opt_states: dict[str, Any] | None = None
        self._compiled = False
        self._graphs: GraphedNetwork | None = None
        # the eager work around a graphed network, replayed as graphs of its own (_graph_eager_work), and how
        self._graph_work = False
        self._graph_capture: CallCaptureFn | None = None
        self._step_graph: GraphedOptimizerStep | None = None
        self._dbp_quantizers: list[SDQWeightQuantizer] | None = None
        self._weight_layers: list[nn.Module] | None = None
        self._root: nn.Module | None = None
        self._terms: dict[str, Tensor | float] = {}
        self._term_log = StepTermLog()

    # ================================================================ structure
    @property
    def teacher(self) -> nn.Module | None:
        """The KD teacher (built at setup from ``teacher=``), or None."""
        return self.losses.teacher

    @property
    def ebr_weight(self) -> float:
        return self.losses.ebr_weight

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weight_bits=self.spec.weight_bits, budget=(self.budget.metric,
                                                                                   self.budget.target))

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs = trainer.max_epochs
        if stage == "fit" and self.searching_enabled and max_epochs not in (None, -1) and \
                self.search_epochs >= max_epochs:
            raise ValueError(f"search_epochs ({self.search_epochs}) must be smaller than the trainer's max_epochs "
                             f"({max_epochs}) so that phase 2 trains under the frozen plan")
        self._root = pl_module
        if self.guard is not None and self.save_dir is not None:
            self.guard.run_dir = self.save_dir  # last_good.ckpt next to plan.yaml
        if self.kernels is not None:
            # a compiled network fuses the LSQ arithmetic itself and runs the eager kernels inside its graph; switching
            # the kernels back here (the test stage's setup) would recompile it
            kernels = self.kernels
            if kernels == "auto":  # compiled on the CPU; eager on CUDA, where the graphs already remove launch cost
                kernels = "eager" if trainer.strategy.root_device.type == "cuda" else "compile"
            set_kernels("eager" if self._compiled else kernels)
        self.report, rebased = quantize(pl_module, self.spec, self.plan if self._given_plan else None)
        if rebased is not None:
            self.plan = rebased
        if self.plan is not None and self.spec.integer_only and not self.plan.metadata.get("integer_only"):
            # a given plan: the checkpoint's plan says the mode, so a reload (sdq-export) rebuilds the integer graph
            self.plan = self.plan.with_metadata(integer_only=True)
        net = network_of(pl_module)
        if self.batched or isinstance(vars(net).get("forward"), BatchedWeights):
            # a network torch.compile will compile runs its per-layer quantizers (the compiler fuses them), also in
            # the eager first step that initialises the activation quantizers
            torch_compile = self.compile not in (None, "cuda-graphs")
            batch_weights(net, enabled=self.batched and not torch_compile)
        if self.report.changed:
            rank_zero_info(f"[SDQ] {self.report}")
        example = find_example_input(trainer, pl_module, stage, self.input_fn, self.example_input)
        if example is not None:
            self._init_profile(pl_module, example)
        if stage == "fit" and self.losses.teacher is None and self.losses.teacher_spec is not None:
            self.losses.load_teacher(self._num_classes(pl_module))
            if example is not None:
                self.losses.check_teacher(example, self._num_classes(pl_module))

    def _num_classes(self, root: nn.Module) -> int | None:
        return num_classes_of(root, self.report.last_layer if self.report else None)

    def _init_profile(self, root: nn.Module, example: Tensor) -> None:
        self.profile = profile_network(root, example)
        self.cost_model = CostModel(root, self.profile)
        if self.searching_enabled and self.phase is Phase.SEARCH:
            self.cost_model.check_feasible(self.budget)
        if self.plan is None and not self.searching_enabled:
            self.plan = self._make_plan(root)

    def _make_plan(self, root: nn.Module) -> BitPlan:
        return BitPlan.from_model(root, profile=self.profile, candidates=list(self.spec.weight_bits),
                                  budget={"metric": self.budget.metric, "target": self.budget.target},
                                  first_last=self.spec.first_last, reading=self.spec.reading,
                                  estimator=self.spec.estimator,
                                  **({"integer_only": True} if self.spec.integer_only else {}))

    # ================================================================ optimizers
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _, steps = quantizer_params(pl_module)  # (also turns off the gradient of single-candidate DBPs)
        all_dbps = [m.dbp for m in pl_module.modules() if isinstance(m, SDQWeightQuantizer)]
        take_from_optimizers(trainer.optimizers, steps + all_dbps)
        self._step_opt = LogStepAdam(steps, lr=self.options.search.step_lr) if steps else None
        if self._pending_opt_states:
            if self._step_opt is not None and self._pending_opt_states.get("step"):
                self._step_opt.load_state_dict(self._pending_opt_states["step"])
            self._pending_opt_states = None
        if self._compile_request == "auto":  # CUDA graphs where one CUDA device runs the fit, else eager
            single_cuda = pl_module.device.type == "cuda" and trainer.world_size == 1
            self.compile = "cuda-graphs" if single_cuda and not self.spec.integer_only else None
        if self.compile == "cuda-graphs":
            if pl_module.device.type != "cuda":
                raise ValueError(f"compile='cuda-graphs' needs a CUDA device, but this run is on "
                                 f"{pl_module.device.type}; use compile=None or a torch.compile mode")
            if trainer.world_size > 1:
                raise ValueError(f"compile='cuda-graphs' runs on one device, but this run has {trainer.world_size} "
                                 f"processes; use compile=None or a torch.compile mode")
        # under CUDA graphs the classifier's forward hook would not run on replay: KD takes the network's output
        # the integer-only network computes its classifier without calling it: KD hooks the network's output
        kd_at = network_prefix(pl_module) if self.spec.integer_only else self.report.last_layer
        self.losses.attach(pl_module, None if self.compile == "cuda-graphs" else kd_at, pl_module.device)
        self._weight_layers = None
        if self.spec.step_follow:  # the steps loaded with a checkpoint belong to the weights loaded with it
            for m in self._weight_quant_layers(pl_module):
                m.weight_quant.follow_from_(m.weight)
        self._dbp_quantizers = [m for m in pl_module.modules() if isinstance(m, SDQWeightQuantizer)]
        self._step_graph = None
        if self.task_estimate == "paired_train" and self.phase is Phase.SEARCH and self._probe_hook is None:
            self._probe_hook = network_of(pl_module).register_forward_hook(self._capture_probe_output)
        if self._graph_work:  # a new fit: new optimizers, so new graphs
            self._graph_eager_work(self._graph_capture)

    # ---- the divergence guard's hooks (composed, so one SDQ(...) line brings it along)
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._warn_if_tiny_dataset(trainer, pl_module)

    def _warn_if_tiny_dataset(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            samples = len(trainer.train_dataloader.dataset)
        except (AttributeError, TypeError):  # several loaders, an iterable dataset: the size is not known
            return
        classes = self._num_classes(pl_module) or infer_num_classes(pl_module)
        if classes and samples < MIN_SAMPLES_PER_CLASS * classes:
            rank_zero_warn(f"[SDQ] the training set has {samples} samples for {classes} classes "
                           f"({samples / classes:.1f} per class, fewer than {MIN_SAMPLES_PER_CLASS}): the quantizer "
                           "steps, the search's task gradients and the plan are estimated from almost no data; train "
                           "on more samples (the app: a larger dataset.subset)")

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None:
            self.guard.on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None:
            self.guard.on_validation_end(trainer, pl_module)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.phase is Phase.SEARCH and trainer.state.fn == TrainerFn.FITTING:
            rank_zero_warn(self._ended_mid_search(trainer))
        self.losses.detach()
        self._stop_probing()
        if self._graphs is not None:  # evaluation after fit runs the network's own forward
            self._graphs.remove()
            self._graphs, self._compiled = None, False

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if optimizer is not trainer.optimizers[0]:
            return
        scaler = grad_scaler(trainer)
        if self.phase is Phase.SEARCH and self.search is not None and self.search.optimizer is not None:
            if self.search.probes and self._probe_batch is not None and \
                    (self.task_estimate != "paired_train" or self._probe_out is not None):
                self._probe(trainer, pl_module)
            self._terms.update(self.search.step(scaler))
        else:
            quantizers = self._dbp_quantizers
            if quantizers is None:
                quantizers = [m for m in pl_module.modules() if isinstance(m, SDQWeightQuantizer)]
            for m in quantizers:  # DBPs off the search (frozen layers): no gradient to keep
                m.dbp.grad = None
        if self._step_opt is not None:
            if scaler is not None:
                scaler.unscale_(self._step_opt)
                scaler.step(self._step_opt)
            elif self._step_graph is not None:  # a replay from the optimizer's second step
                self._step_graph.step()
            else:
                self._step_opt.step()
            self._step_opt.zero_grad(set_to_none=True)

    # ---- the paired forwards of task_estimate="paired" / "paired_train" / "paired_isolated"
    def _capture_probe_output(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled():
            self._probe_out = output

    def _stop_probing(self) -> None:
        if self._probe_hook is not None:
            self._probe_hook.remove()
        self._probe_hook, self._probe_out, self._probe_batch, self._probe_saved = None, None, None, None

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The further forwards of this step's batch for :meth:`BitSearch.probe`, ``probes_per_step`` layers, no
        gradients, the training step's precision context, the same weights. ``paired``: in eval mode (BatchNorm's
        running statistics, every layer at its current decision), one forward for the reference loss and one per
        probed layer with that layer's decision flipped; ``paired_isolated``: in eval mode, two forwards per probed
        layer with every other searched layer at its top width. ``paired_train``: the reference is the training
        forward's own loss and each probe repeats its draws and batch statistics with one layer's draw flipped.
        Every buffer (BatchNorm statistics, draw counters, activation-quantizer state) and the module's train mode
        are put back afterwards, so training goes on as it would without the probes, apart from the DBP moves they cause."""
        net = network_of(pl_module)
        batch, out = self._probe_batch, self._probe_out
        self._probe_out = None
        buffers = list(net.buffers())
        saved = self._probe_saved
        if saved is None or len(saved) != len(buffers) or any(
                a.shape != b.shape or a.dtype != b.dtype or a.device != b.device for a, b in zip(saved, buffers)):
            saved = self._probe_saved = [torch.empty_like(b) for b in buffers]  # kept: one grouped copy a step
        torch._foreach_copy_(saved, buffers)
        modes = [(m, m.training) for m in net.modules()]
        x = self.input_fn(batch)
        context = getattr(getattr(trainer, "precision_plugin", None), "forward_context", None)

        def loss_of() -> Tensor:
            with torch.no_grad(), (context() if context is not None else contextlib.nullcontext()):
                return self.probe_loss(net(x), batch)

        try:
            try:
                if self.search.lookahead_pending:  # the lowest levels measured ahead: two eval forwards per probe
                    net.eval()
                    self.search.probe(None, loss_of, self.probes_per_step)
                    return
                if self.task_estimate == "paired":
                    net.eval()
                    main = loss_of()  # also sets every layer's last_index to its current decision
                elif self.task_estimate == "paired_isolated":
                    net.eval()
                    self.search.probe(None, loss_of, self.probes_per_step)  # two forwards of its own per layer
                    return
                else:
                    with torch.no_grad():
                        main = self.probe_loss(out.detach() if isinstance(out, Tensor) else out, batch)
            except ValueError as err:
                if self.probe_loss is not default_probe_loss:
                    raise
                # the default loss does not fit this module's batches: measure with the DBP gradients instead
                rank_zero_warn(f"[SDQ] task_estimate={self.task_estimate!r} falls back to 'pathwise' for this "
                               f"search: {err}")
                self.task_estimate = "pathwise"
                self.search.use_pathwise()
                self._stop_probing()
                return
            self.search.probe(main, loss_of, self.probes_per_step)
        finally:
            for m, training in modes:
                m.training = training
            torch._foreach_copy_(buffers, saved)

    def _graph_eager_work(self, capture_fn: CallCaptureFn | None = None) -> None:
        """Replay the work that stays eager next to a graphed network as CUDA graphs of its own: the KD teacher's
        forward, KD's gradient, EBR with its gradients, the DBP step and the step-size optimizer (each captured at
        its first use, eager where it cannot be: a gradient scaler, a capture that fails). ``capture_fn``: see
        :class:`~sdq_lightning.modules.graphs.GraphedCall` (tests pass a CPU stand-in)."""
        self._graph_work, self._graph_capture = True, capture_fn
        self.losses.use_graphs(True, capture_fn=capture_fn)
        if self.search is not None and self.search.graph is None:
            self.search.use_graphs(True, capture_fn=capture_fn)
        if self._step_opt is not None and self._step_graph is None:
            self._step_graph = GraphedOptimizerStep(self._step_opt, capture_fn=capture_fn)

    def _ended_mid_search(self, trainer: pl.Trainer) -> str:
        if trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps:
            why = f"max_steps={trainer.max_steps} reached"
        elif trainer.should_stop:
            why = "stopped early (max_time, early stopping or another callback)"
        else:
            why = f"max_epochs={trainer.max_epochs} or a batch limit reached"
        total = self.search.total_steps if self.search is not None else None
        length = f"{self.search_epochs} epochs" + (f", {total} steps" if total else "")
        return (f"[SDQ] the fit ended during the search ({why} after {trainer.global_step} training steps; the "
                f"search takes {length}): no bit plan was frozen and no plan.yaml written, the layers still sample "
                "their bitwidths; let the fit run past the search (max_steps, max_time) or search for fewer epochs "
                "(search_epochs)")

    # ================================================================ per step
    def _progress(self, trainer: pl.Trainer, batch_idx: int) -> float:
        n = trainer.num_training_batches
        n = n if isinstance(n, int) and n > 0 else 1
        return trainer.current_epoch + batch_idx / n

    def _steps_per_epoch(self, trainer: pl.Trainer) -> int:
        n = trainer.num_training_batches
        n = n if isinstance(n, int) and n > 0 else 100
        return max(n // self._accumulate(trainer), 1)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._maybe_fold(trainer, pl_module)
        x = None
        if self.profile is None:
            x = self.input_fn(batch)
            self._init_profile(pl_module, x)
            self.losses.check_teacher(x, self._num_classes(pl_module))
        if self.phase is Phase.SEARCH:
            if self.search is None:
                self.search = self._make_search()
            if self.search.optimizer is None:
                self.search.start(self._steps_per_epoch(trainer), self.search_epochs, self._pending_search)
                self._pending_search = None
            tau = self._temperature(self._progress(trainer, batch_idx), self.search_epochs)
            self.search.begin_step(trainer.global_step, tau)
            self._terms["temperature"] = torch.tensor(tau)  # a host tensor: logging a float copies it to the device
            if self.search.probes_wanted:
                self._probe_batch = batch
        elif "cost" not in self._terms and self.plan is not None:
            self._terms["cost"] = torch.tensor(self.plan.cost(self.budget.metric))
        if self.compile is not None and not self._compiled and self._act_quant_ready(pl_module):
            self._compile_network(pl_module)
        kd = self.losses.teacher is not None and (self.phase is Phase.TRAIN or self.options.kd.in_search)
        if kd and x is None:
            x = self.input_fn(batch)
        self.losses.before_batch(x, pl_module.device, kd)

    def _make_search(self) -> BitSearch:
        opt, frz = self.options.search, self.options.freeze
        search = BitSearch(self.cost_model, self.budget, control=opt.budget_control, signal=opt.search_signal,
                           dbp_lr=opt.dbp_lr, task_weight=opt.task_weight, budget_reach=opt.budget_reach,
                           penalty_weight=opt.penalty_weight, penalty=opt.penalty,
                           drop_threshold=opt.drop_threshold, reinit_dbp=opt.reinit_dbp,
                           min_steps_between_drops=opt.min_steps_between_drops,
                           projection_sensitivity=frz.projection_sensitivity, seed=self.spec.seed,
                           rounding=frz.rounding, settle=opt.settle, task_estimate=self.task_estimate,
                           lookahead_levels=opt.lookahead_levels_for(self.task_estimate),
                           lookahead_repeats=opt.lookahead_repeats)
        if self._graph_work:  # under CUDA graphs the DBP step is a graph of its own
            search.use_graphs(True, capture_fn=self._graph_capture)
        return search

    @staticmethod
    def _act_quant_ready(pl_module: pl.LightningModule) -> bool:
        """Whether every activation quantizer has seen its first batch: their initialisation reads the data (the
        sign mode), so the first training step runs eager and the network is compiled from the second."""
        return all(m.is_initialized for m in pl_module.modules() if isinstance(m, ActQuantizer))

    def _compile_network(self, pl_module: pl.LightningModule) -> None:
        """Compile the network in place, whole graph (its LSQ kernels then run eager inside the graph), or install
        the CUDA-graph replay (``compile="cuda-graphs"``; the kernels stay as set)."""
        net = network_of(pl_module)
        if self.compile == "cuda-graphs":
            self._graphs = GraphedNetwork(net, on_output=self.losses.capture_output,
                                          fallback=self._compile_request == "auto")
            self._graph_eager_work()  # the teacher's forward, EBR, the DBP step, the step sizes: a graph each
            self._compiled = True
            return
        set_kernels("eager")
        # One graph per variant the run meets: train / eval, grad / no grad / inference mode, searching / frozen, the
        # smaller last batch (then dynamic). That is about 8-12, at Dynamo's default limit of 8, where fullgraph=True
        # fails hard (an app run with compile did, in trainer.test after training): allow more.
        dynamo_config = torch._dynamo.config
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, RECOMPILE_LIMIT)
        net.compile(mode=None if self.compile == "default" else self.compile, fullgraph=True)
        self._compiled = True

    def _accumulate(self, trainer: pl.Trainer) -> int:
        return max(int(getattr(trainer, "accumulate_grad_batches", 1) or 1), 1)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        # ``loss`` arrives scaled by the gradient scaler (16-mixed): the added gradients are scaled the same way
        scale = _scale_of(grad_scaler(trainer))
        scale = scale / self._accumulate(trainer)
        layers = None
        if self.phase is Phase.TRAIN and self.losses.ebr_weight > 0 and not self.spec.integer_only:
            layers = self._weight_quant_layers(pl_module)
        self._terms.update(self.losses.before_backward(loss, scale, layers))

    def _weight_quant_layers(self, pl_module: pl.LightningModule) -> list[nn.Module]:
        """The quantized layers with a weight quantizer, listed once per fit (they do not change after setup)."""
        if self._weight_layers is None:
            self._weight_layers = [m for m in quant_layers(pl_module).values() if m.weight_quant is not None]
        return self._weight_layers

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.losses.after_backward()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.guard is not None:
            self.guard.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._term_log.step(trainer, pl_module, self._terms)
        if self.phase is Phase.SEARCH and self.spec.step_follow:
            for m in self._weight_quant_layers(pl_module):  # the widths not drawn yet keep their ratio to the weight
                m.weight_quant.follow_weight_(m.weight)
        n = trainer.num_training_batches
        last_batch = isinstance(n, int) and batch_idx + 1 >= n
        if self.phase is Phase.SEARCH and last_batch and trainer.current_epoch + 1 >= self.search_epochs:
            # the boundary is here, before this epoch's validation, so that validation measures the frozen plan
            self._freeze_record = self.freeze(trainer, pl_module)
        elif (last_batch and trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs) \
                or 0 < trainer.max_steps <= trainer.global_step:
            self._maybe_fold(trainer, pl_module, last_batch=batch)  # phase 2 shorter than bn_fold_steps

    def _maybe_fold(self, trainer: pl.Trainer, pl_module: pl.LightningModule, last_batch: Any = None) -> None:
        """Integer-only phase 2: BatchNorm stays live (the fake-quantized forward, per-channel steps) for the first
        ``freeze.bn_fold_steps`` steps, so that its statistics are those of the quantized weights; then it is folded
        and the integer forward installed. After the fit's last step (``last_batch``) at the latest, with one
        no-grad forward of that batch to calibrate the quantizers the integer graph adds."""
        net = network_of(pl_module)
        if not self.spec.integer_only or self.phase is not Phase.TRAIN or is_integer_only(net):
            return
        if self._fold_at is None:
            self._fold_at = trainer.global_step + self.options.freeze.bn_fold_steps
        if last_batch is None and trainer.global_step < self._fold_at:
            return
        activate_integer_only(net)
        if last_batch is not None:
            with torch.no_grad():
                net(self.input_fn(last_batch).to(pl_module.device))

    # ================================================================ epochs
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # catch-up: a checkpoint saved before the boundary of its last epoch resumes past it
        if self.phase is Phase.SEARCH and trainer.current_epoch >= self.search_epochs:
            self.freeze(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None:
            self.guard.on_train_epoch_end(trainer, pl_module)
        if self.search is not None:
            self.search.flush_trace()
        record = self._epoch_record(trainer, pl_module)
        if self.phase is Phase.SEARCH and trainer.current_epoch + 1 >= self.search_epochs:
            self.freeze(trainer, pl_module)  # the epoch ended early (max_time, limits): freeze now
        freeze_info = getattr(self, "_freeze_record", None)
        if freeze_info is not None:
            record.update({"frozen": True, "plan_avg_bits": self.plan.average_bits,
                           f"plan_{self.budget.metric}": self.plan.cost(self.budget.metric), **freeze_info})
            self._freeze_record = None
        self.history.append(record)
        log_epoch(pl_module, record, self.phase is Phase.SEARCH, self.budget.target, record["phase"] == "search")
        self._term_log.epoch_end(pl_module)

    def _epoch_record(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        freeze_info = getattr(self, "_freeze_record", None)
        phase = Phase.SEARCH.value if freeze_info is not None else self.phase.value  # the epoch that froze searched
        dual = self.search is not None and self.search.optimizer is not None and \
            self.options.search.budget_control == "dual"
        return epoch_record(trainer.current_epoch, phase, self.budget, self.cost_model, self._terms,
                            self.search.optimizer.multiplier if dual else None, freeze_info, trainer.callback_metrics)

    def freeze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        """The phase boundary: decide, project onto the budget, freeze every layer, write ``plan.yaml``.
        Returns what the history records at the freeze epoch."""
        if self.search is None:
            self.search = self._make_search()
        result = freeze_searched(self.search, pl_module)
        self._stop_probing()
        if self.spec.integer_only:
            self._fold_at = trainer.global_step + self.options.freeze.bn_fold_steps
            self._maybe_fold(trainer, pl_module)
        self.phase = Phase.TRAIN
        self.plan = self._make_plan(pl_module)
        rank_zero_info(freeze_message(trainer.current_epoch, self.plan, self.budget, result))
        for line in freeze_warnings(self.plan, self.budget, result, len(self.search.names)):
            rank_zero_warn(line)
        for key in SEARCH_TERMS:  # from here on the bar and the logs show the plan's cost, not the search's
            self._terms.pop(key, None)
        self._terms["cost"] = torch.tensor(self.plan.cost(self.budget.metric))
        if trainer.is_global_zero:
            self.plan.save(self._plan_path(trainer))
        return result.record

    def _plan_path(self, trainer: pl.Trainer) -> Path:
        root = self.save_dir or (Path(trainer.log_dir) if trainer.log_dir else Path(trainer.default_root_dir))
        return root / "plan.yaml"

    @property
    def search_trace(self) -> dict[str, list] | None:
        """Per recorded search step: each layer's expected bits, the expected cost and the controller's value
        (the multiplier under ``dual``, the penalty under ``penalty``)."""
        if self.search is None:
            return (self._pending_search or {}).get("trace")
        return self.search.flush_trace()

    # ================================================================ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "plan": self.plan.to_dict() if self.plan is not None else None,
            "history": self.history,
            "search": self.search.state_dict() if self.search is not None else self._pending_search,
            "freeze_record": getattr(self, "_freeze_record", None),
            "step_opt": self._step_opt.state_dict() if self._step_opt is not None else None,
            "guard": self.guard.state_dict() if self.guard is not None else None,
            "fold_at": self._fold_at,
            "task_estimate": self.task_estimate,  # after a fallback to pathwise, the resumed search measures the same
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.phase = Phase(state_dict["phase"])
        if state_dict.get("plan") is not None:
            self.plan = BitPlan.from_dict(state_dict["plan"])
        self.history = list(state_dict.get("history", []))
        self._pending_search = state_dict.get("search")
        self._freeze_record = state_dict.get("freeze_record")
        self._pending_opt_states = {"step": state_dict.get("step_opt")}
        self._fold_at = state_dict.get("fold_at")
        if state_dict.get("task_estimate") == "pathwise":
            self.task_estimate = "pathwise"
        if self.guard is not None and state_dict.get("guard") is not None:
            self.guard.load_state_dict(state_dict["guard"])
