"""The expert options of :class:`~sdq_lightning.SDQ`, one frozen dataclass per concern, each validating itself.

``SDQ(layers=..., search=..., freeze=..., ebr=..., kd=..., runtime=...)`` takes an instance or a plain dict of its
fields (an unknown key is a one-line error naming the allowed ones); a field left out keeps its default. The same
classes are the Hydra app's schema of the ``sdq`` node (:class:`SDQConfig`, registered as ``sdq/schema`` and
extended by ``conf/sdq/default.yaml``), so ``sdq.search.settle=notabool`` or ``sdq.search.nope=1`` fails when the
config is composed.

Only the standard library is imported here; the registries the checks read are imported when a check runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = ["COMPILE_MODES", "EBROptions", "FreezeOptions", "KDOptions", "LayerOptions", "RuntimeOptions",
           "SDQConfig", "SearchOptions", "coerce_options", "nest_flat_node"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "cuda-graphs", "auto")
# search.lookahead_levels=None with a paired estimate: the 2->1, 3->2 and 4->3 drops, the levels a plan of about 2 bits
# is decided at (docs/method.md, "What the task force measures")
DEFAULT_LOOKAHEAD_LEVELS = 3


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def _number(obj: Any, name: str, label: str, positive: bool = False) -> None:
    """``obj.<name>`` must be a number >= 0 (``positive``: > 0); stored as a float."""
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not (value > 0 if positive else value >= 0):
        raise ValueError(f"{label} must be a number {'>' if positive else '>='} 0, got {value!r}")
    _set(obj, name, float(value))


def _whole(value: Any, label: str, low: int, null_ok: bool = False) -> None:
    """An integer >= ``low`` (not a bool); with ``null_ok`` also None."""
    if null_ok and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{label} must be an integer >= {low}{' or null' if null_ok else ''}, got {value!r}")


def _flag(value: Any, label: str) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{label} must be true or false, got {value!r}")


def _one_of(value: Any, allowed: tuple, label: str) -> None:
    if value not in allowed:
        raise ValueError(f"{label} must be one of {allowed}, got {value!r}")


@dataclass(frozen=True)
class LayerOptions:
    """Which layers are quantized, and how their weight quantizers are shaped.

    Args:
        first_last: the first conv and the classifier: ``"8bit"`` (at ``first_last_bits``, inputs too, outside the
            search), ``"fp"`` (left in floating point) or ``"search"`` (searched like the others).
        first_last_bits: their bitwidth under ``"8bit"``.
        include / exclude: layer names or regexes (see :class:`~sdq_lightning.surgery.QuantSpec`).
        per_channel: one weight step per output channel instead of one per layer.
        step_init: where each candidate width's weight step starts: ``"lsq"`` (LSQ's ``2 mean|w| / sqrt(Qp)``),
            ``"mse"`` (the step of least squared quantization error, the one ``sdq-plan``'s oracle quantizes with, at
            the widths up to 4 bits of a searched layer, where a low-bit plan is decided; LSQ's rule above and for
            layers at a fixed width: uniform runs, a given plan, first/last at 8 bits) or ``"mse_all"`` (the
            least-squares step at every width: on networks trained from scratch it cost accuracy, docs/RESULTS.md
            sections 29-30, because at 5-8 bits it clips the largest weights).
        step_follow: until a width is first drawn, its step follows the weight's scale (``mean|w|``, per channel
            with ``per_channel``), rescaled after every search step, so it starts at its ``step_init`` rule on the
            weights the layer has when it reaches that width. For searches from scratch, where the weights outgrow
            their random initialisation several times over while the layer descends (docs/RESULTS.md section 30).
    """

    first_last: str = "8bit"
    first_last_bits: int = 8
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    per_channel: bool = False
    step_init: str = "mse"
    step_follow: bool = False

    def __post_init__(self) -> None:
        import re

        from sdq_lightning.quantizers import validate_candidates
        from sdq_lightning.quantizers.functional import STEP_INITS
        from sdq_lightning.surgery.quantize import FIRST_LAST_POLICIES

        _one_of(self.first_last, FIRST_LAST_POLICIES, "first_last")
        validate_candidates((self.first_last_bits,), "first_last_bits")
        for key in ("include", "exclude"):
            patterns = getattr(self, key)
            patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns or ())
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as err:
                    raise ValueError(f"{key} pattern {p!r} is not a valid regular expression: {err}") from None
            _set(self, key, patterns)
        _flag(self.per_channel, "per_channel")
        _flag(self.step_follow, "step_follow")
        _one_of(self.step_init, STEP_INITS, "step_init")


@dataclass(frozen=True)
class SearchOptions:
    """Phase 1: how bitwidths are drawn and read, and how the DBPs move under the budget.

    Args:
        reading: ``"progressive"`` or ``"cascade"``: how a layer's DBPs read as a bitwidth.
        estimator: ``"gumbel"``, ``"ste"`` or one added with :func:`sdq_lightning.quantizers.register_estimator`.
        temperature: Gumbel temperature: a value, ``(start, end)`` annealed geometrically over the search or a
            function of the (fractional) epoch.
        budget_control: ``"dual"``: a multiplier solved every step drives the expected cost along a schedule to the
            target, reached after ``budget_reach`` of the search; ``"penalty"``: the fixed budget penalty
            ``penalty_weight * R(E[cost])`` (``penalty``: ``"squared_hinge"`` or ``"hinge"``) and SGD.
        search_signal: ``"task+budget"``, or a control: ``"budget_only"``, ``"projection_only"``, ``"size_greedy"``,
            ``"random"`` (see :mod:`sdq_lightning.core.search`).
        task_weight: weight of the normalised task force on the DBPs (``dual``).
        task_estimate: what the task force measures. None: ``"paired"`` under the progressive reading,
            ``"pathwise"`` under ``cascade``. ``"paired"``: after each training step's backward,
            ``L(b_hi) - L(b_lo)`` of ``probes_per_step`` layers (those measured longest ago) on the same batch, no
            gradients, in eval mode: one forward at every layer's current decision, one more per probed layer with
            its decision flipped between its two live widths, so the batch's noise cancels; ``"paired_train"``: the
            same in train mode, against the training forward's own draws and batch statistics (one forward per
            probe); ``"paired_isolated"``: the same difference measured in the oracle's context, every other
            searched layer at its top width (eval mode, two forwards per probed layer); ``"pathwise"``: the DBP
            gradient through the relaxation, ``<dL/dw_q, Q_hi(w) - Q_lo(w)>``
            (first order, no extra forward). Where the default ``probe_loss`` does not fit the batches, the search
            warns once and measures pathwise. See ``docs/method.md``, "What the task force measures".
        probes_per_step: ``"paired"``/``"paired_train"``/``"paired_isolated"``: layers measured per training step.
        lookahead_levels: with a paired estimate, measure each searched layer's lowest ``lookahead_levels`` levels
            (1: the 2->1 drop of 1..8-bit candidates; 3: 2->1, 3->2 and 4->3) at the start of the search, before any
            live probe, while the network is still near its starting point: two eval forwards per probe, the probed
            layer at the two widths of that level and every other layer at its current decision. Those measurements
            are final; live probes then measure only the levels above. 0: off (every level measured live). None
            (default): 3 with a paired estimate, 0 with ``pathwise``. With ``step_init="mse"`` it ranks the drops
            like the oracle from a trained start (docs/RESULTS.md sections 28 and 30); from scratch it measures a
            random network, which cost nothing measurable on users' networks (section 30).
        lookahead_repeats: measurements per layer and lookahead level (batches of the training loader).
        probe_loss: the loss the paired forwards compare, ``probe_loss(output, batch) -> Tensor``; None: the
            cross-entropy of the network's output against ``batch[1]``.
        budget_reach: fraction of the search after which the schedule holds the target (0 < x <= 1).
        settle: sequential settling while the schedule holds the target (``dual``): one layer after another, the
            largest first, has its live DBP rounded to 0 or 1 and stops moving, while the layers still moving hold
            the budget, so the freeze decides only the last (smallest) layer and the projection is a one-layer
            correction. False: the hardening force alone, which may leave many layers fractional for the freeze's
            rounding and the projection to decide.
        dbp_lr: DBP travel per step. None: ``dual`` derives it from the search length and the budget; ``penalty``
            uses 0.05 (SGD).
        step_lr: learning rate of the quantizer step sizes (Adam on log s), in both phases.
        drop_threshold: a live DBP at or below it moves the layer one level down (progressive), only while the
            expected cost is above the schedule, and at most once per ``min_steps_between_drops`` steps per layer.
        reinit_dbp: the value a layer's next DBP starts from after such a drop (0 < x <= 1).
        penalty, penalty_weight: the budget penalty of ``budget_control="penalty"``.
    """

    reading: str = "progressive"
    estimator: str = "gumbel"
    temperature: Any = (1.0, 0.1)
    budget_control: str = "dual"
    search_signal: str = "task+budget"
    task_weight: float = 1.0
    task_estimate: Optional[str] = None
    probes_per_step: int = 4
    lookahead_levels: Optional[int] = None
    lookahead_repeats: int = 4
    probe_loss: Any = None
    budget_reach: float = 0.75
    settle: bool = True
    dbp_lr: Optional[float] = None
    step_lr: float = 1e-2
    drop_threshold: float = 0.05
    reinit_dbp: float = 1.0
    min_steps_between_drops: int = 1
    penalty: str = "squared_hinge"
    penalty_weight: float = 1.0

    def __post_init__(self) -> None:
        from sdq_lightning.budget.costmodel import PENALTIES
        from sdq_lightning.core.schedule import resolve_schedule
        from sdq_lightning.core.search import BUDGET_CONTROLS, SEARCH_SIGNALS, TASK_ESTIMATES
        from sdq_lightning.quantizers import READINGS
        from sdq_lightning.quantizers.estimators import get_estimator

        _one_of(self.reading, READINGS, "reading")
        get_estimator(self.estimator, self.reading)  # one-line error naming the registered estimators
        if isinstance(self.temperature, list):
            _set(self, "temperature", tuple(self.temperature))
        resolve_schedule(self.temperature, "temperature")
        _one_of(self.budget_control, BUDGET_CONTROLS, "budget_control")
        _one_of(self.search_signal, SEARCH_SIGNALS, "search_signal")
        _one_of(self.task_estimate, (None, *TASK_ESTIMATES), "task_estimate")
        _number(self, "task_weight", "task_weight")
        estimate = self.resolved_task_estimate
        if estimate.startswith("paired") and self.reading != "progressive":
            raise ValueError(f"task_estimate={estimate!r} needs reading='progressive', got reading={self.reading!r}")
        _whole(self.probes_per_step, "probes_per_step", 1)
        _whole(self.lookahead_levels, "lookahead_levels", 0, null_ok=True)
        _whole(self.lookahead_repeats, "lookahead_repeats", 1)
        if self.lookahead_levels and not estimate.startswith("paired"):
            raise ValueError(f"lookahead_levels needs a paired task_estimate (paired, paired_train, paired_isolated), "
                             f"got {estimate!r}")
        if self.probe_loss is not None and not callable(self.probe_loss):
            raise ValueError(f"probe_loss must be a function (output, batch) -> loss, got "
                             f"{type(self.probe_loss).__name__}")
        if isinstance(self.budget_reach, bool) or not isinstance(self.budget_reach, (int, float)) or \
                not 0 < self.budget_reach <= 1:
            raise ValueError(f"budget_reach must be a number in (0, 1], got {self.budget_reach!r}")
        _set(self, "budget_reach", float(self.budget_reach))
        _flag(self.settle, "settle")
        if self.dbp_lr is not None:
            _number(self, "dbp_lr", "dbp_lr", positive=True)
        _number(self, "step_lr", "step_lr", positive=True)
        if not 0.0 <= self.drop_threshold < 1.0:
            raise ValueError(f"drop_threshold must be in [0, 1), got {self.drop_threshold!r}")
        _set(self, "drop_threshold", float(self.drop_threshold))
        if not 0.0 < self.reinit_dbp <= 1.0:
            raise ValueError(f"reinit_dbp must be in (0, 1], got {self.reinit_dbp!r}")
        _set(self, "reinit_dbp", float(self.reinit_dbp))
        _set(self, "min_steps_between_drops", int(self.min_steps_between_drops))
        _one_of(self.penalty, PENALTIES, "penalty")
        _number(self, "penalty_weight", "penalty_weight")

    @property
    def resolved_task_estimate(self) -> str:
        """``task_estimate``, or for None the reading's default (``paired`` / ``pathwise``)."""
        if self.task_estimate is not None:
            return self.task_estimate
        return "paired" if self.reading == "progressive" else "pathwise"

    @property
    def resolved_lookahead_levels(self) -> int:
        """The lookahead of a search with :attr:`resolved_task_estimate` (see :meth:`lookahead_levels_for`)."""
        return self.lookahead_levels_for(self.resolved_task_estimate)

    def lookahead_levels_for(self, estimate: str) -> int:
        """The lookahead a search with the task estimate ``estimate`` runs: 0 under ``pathwise`` (also a paired
        search that fell back to it), else ``lookahead_levels`` or, for None, :data:`DEFAULT_LOOKAHEAD_LEVELS`."""
        if not estimate.startswith("paired"):
            return 0
        return DEFAULT_LOOKAHEAD_LEVELS if self.lookahead_levels is None else self.lookahead_levels


@dataclass(frozen=True)
class FreezeOptions:
    """The phase boundary: how the searched DBPs become the bit plan.

    Args:
        projection_sensitivity: how the projection onto the budget ranks layers: ``"task_grad"`` (accumulated DBP
            task gradients) or ``"weight_mse"`` (data-free weight quantization error).
        rounding: the decision before the projection: ``"argmax"`` (each live DBP rounded at 0.5 on its own) or
            ``"budget"`` (the lower live bitwidth everywhere, then the higher one in order of decreasing DBP
            wherever the budget allows: the DBPs, not the projection, decide what a search that ended fractional
            leaves over; see :meth:`~sdq_lightning.core.search.BitSearch.round_to_budget`).
        bn_fold_steps: with ``integer_only``, the phase-2 steps BatchNorm stays live (the fake-quantized forward)
            before it is folded and the integer graph trains: its statistics are then those of the quantized
            weights, not the float model's. A phase 2 shorter than this folds after its last step. Default 100.
    """

    projection_sensitivity: str = "task_grad"
    rounding: str = "argmax"
    bn_fold_steps: int = 100

    def __post_init__(self) -> None:
        from sdq_lightning.core.search import PROJECTION_SENSITIVITIES, ROUNDINGS

        _one_of(self.projection_sensitivity, PROJECTION_SENSITIVITIES, "projection_sensitivity")
        _one_of(self.rounding, ROUNDINGS, "rounding")
        _whole(self.bn_fold_steps, "bn_fold_steps", 0)


@dataclass(frozen=True)
class EBROptions:
    """Entropy-aware Bin Regularization, added to the training gradient in phase 2 (:mod:`sdq_lightning.losses.ebr`).

    Args:
        weight: lambda_E (0 = off).
        weighting: per-layer weighting: ``"uniform"``, ``"inv_bits"`` or ``"inv_pow2"``.
        entropy_weight: weight of the bin-entropy term.
    """

    weight: float = 0.1
    weighting: str = "uniform"
    entropy_weight: float = 0.0

    def __post_init__(self) -> None:
        from sdq_lightning.losses.ebr import EBR_WEIGHTINGS

        _number(self, "weight", "ebr.weight")
        if self.weighting not in EBR_WEIGHTINGS:
            raise ValueError(f"EBR weighting must be one of {EBR_WEIGHTINGS}, got {self.weighting!r}")
        _number(self, "entropy_weight", "ebr.entropy_weight")


@dataclass(frozen=True)
class KDOptions:
    """Knowledge distillation from ``SDQ(teacher=...)``: the gradient of ``weight * KD(student, teacher)`` is ADDED
    to that of the module's own loss, which is multiplied by ``ce_weight``.

    Args:
        teacher_arch: the timm model a plain state-dict teacher checkpoint is loaded into.
        teacher_cls: how to rebuild a teacher checkpoint of your own LightningModule: its class, an import path
            (``"pkg.mod.LitNet"``) or a factory (see :func:`~sdq_lightning.core.teacher.load_teacher`).
        temperature: KD temperature.
        weight: weight of the KD term.
        ce_weight: weight of the module's own loss (1: kept; 0: pure distillation, as in the paper's phase 2).
        in_search: KD in phase 1 too (else phase 2 only).
    """

    teacher_arch: Optional[str] = None
    teacher_cls: Any = None
    temperature: float = 1.0
    weight: float = 1.0
    ce_weight: float = 1.0
    in_search: bool = False

    def __post_init__(self) -> None:
        _number(self, "temperature", "kd.temperature", positive=True)
        _number(self, "weight", "kd.weight")
        _number(self, "ce_weight", "ce_weight")
        _set(self, "in_search", bool(self.in_search))


@dataclass(frozen=True)
class RuntimeOptions:
    """How the callback runs: kernels, compilation, the batched weight pass, the divergence guard, inputs, outputs.
    None of it changes what is computed, except ``guard`` stopping a diverged run.

    Args:
        kernels: ``"eager"`` or ``"compile"``: the LSQ fake-quantization arithmetic in eager PyTorch or through
            ``torch.compile`` (faster on the CPU, bit-identical forward; see :mod:`sdq_lightning.modules.fused`); set
            for the process at ``setup``. None keeps the process setting (``SDQ_KERNELS``, else eager). ``"auto"``
            (the Hydra app's default): ``"compile"`` on the CPU, ``"eager"`` on a CUDA device (where the CUDA graphs
            of ``compile="auto"`` remove the launch cost, so compiling the kernels does not pay for itself).
        compile: None or a ``torch.compile`` mode (``"default"``, ``"reduce-overhead"`` (CUDA graphs),
            ``"max-autotune"``): the network is compiled whole, ``fullgraph=True``, at the first training batch
            after the activation quantizers have seen data (their sign mode is read from it: with activation
            quantizers the first step runs eager) (``nn.Module.compile``: the state dict keeps its keys). It
            recompiles once, at the freeze. On the CPU it gives the fastest step, worth its compile time on runs of
            more than a few epochs. ``"cuda-graphs"``: no compiler; the network's training forward and backward are
            captured as CUDA graphs from the second batch and replayed every step
            (:class:`~sdq_lightning.modules.graphs.GraphedNetwork`; re-captured at the freeze; CUDA, one device;
            KD then reads the network's output); the KD teacher's forward, KD's gradient, the EBR term with its
            gradients, the DBP step and the step-size optimizer (without a gradient scaler) replay as a graph each
            (:class:`~sdq_lightning.modules.graphs.GraphedCall`; a capture that fails warns and that piece stays
            eager). ``"auto"`` (the Hydra app's default): ``"cuda-graphs"`` on one CUDA device, falling back to
            eager with a warning if the capture fails; None elsewhere (CPU, several processes).
        batched: quantize every layer's weight in one batched pass per forward
            (:class:`~sdq_lightning.modules.batched.BatchedWeights`, installed on the network at setup): the same
            values and draws as each layer's own quantizer, and a number of kernels that does not grow with the
            number of layers. False runs each layer's quantizer in its own forward.
        guard: ``True``, ``False`` or keyword arguments of :class:`~sdq_lightning.callbacks.guard.DivergenceGuard`:
            a non-finite training loss, or validation accuracy falling to chance after it had been above, stops the
            run with one line and keeps ``checkpoints/last_good.ckpt`` in the run's folder (``save_dir``, else
            ``trainer.log_dir``); the accuracy is the module's own validation metric under a usual name
            (``val/acc``, ``val_acc``, ...) or ``guard={"monitor": "<name>"}``.
        input_fn: how to get the model input from a batch (None: ``batch[0]``).
        example_input: a tensor used to profile the model (None: the module's ``example_input_array``, else a batch
            of the datamodule, else the first training batch).
        save_dir: where ``plan.yaml`` goes (None: the trainer's log dir).
    """

    kernels: Optional[str] = None
    compile: Optional[str] = None
    batched: bool = True
    guard: Any = True
    input_fn: Any = None
    example_input: Any = None
    save_dir: Any = None

    def __post_init__(self) -> None:
        from sdq_lightning.modules.fused import KERNELS

        if self.kernels is not None and self.kernels not in (*KERNELS, "auto"):
            raise ValueError(f"kernels must be one of {(*KERNELS, 'auto')} or None, got {self.kernels!r}")
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be None or one of {COMPILE_MODES}, got {self.compile!r}")
        _flag(self.batched, "batched")
        if not isinstance(self.guard, bool) and not hasattr(self.guard, "items"):
            raise ValueError(f"guard must be True, False or a dict of DivergenceGuard arguments, got {self.guard!r}")
        if self.input_fn is not None and not callable(self.input_fn):
            raise ValueError(f"input_fn must be a function batch -> model input, got {type(self.input_fn).__name__}")


def coerce_options(cls: type, value: Any, name: str) -> Any:
    """``value`` as a ``cls``: None gives the defaults, a mapping its fields (an unknown key is one line naming the
    allowed keys), an instance itself."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = [str(k) for k in value if k not in allowed]
    if unknown:
        raise ValueError(f"{name} has no option {unknown[0]!r}; its options: {', '.join(allowed)}")
    return cls(**value)


GROUPS = {"layers": LayerOptions, "search": SearchOptions, "freeze": FreezeOptions, "ebr": EBROptions, "kd": KDOptions,
          "runtime": RuntimeOptions}
# Group fields whose name in the flat sdq node of earlier versions differed (``ebr_weight`` -> ``ebr.weight``).
_FLAT_NAMES = {("ebr", "weight"): "ebr_weight", ("ebr", "weighting"): "ebr_weighting",
               ("ebr", "entropy_weight"): "ebr_entropy_weight", ("kd", "temperature"): "kd_temperature",
               ("kd", "weight"): "kd_weight", ("kd", "in_search"): "kd_in_search"}


def nest_flat_node(node: dict[str, Any]) -> dict[str, Any]:
    """An ``sdq`` config node of earlier versions, with every option a top-level key and ``null`` meaning the
    default, in today's form: the options in their groups, a null replaced by the field's default. A node that already
    has the groups is returned as it is (``sdq-train ... resume=`` compares an old run's ``config.yaml`` this way)."""
    if not isinstance(node, dict) or any(isinstance(node.get(g), dict) for g in GROUPS):
        return node
    out = dict(node)
    if out.get("integer_only", None) is None:
        out["integer_only"] = False
    for group, cls in GROUPS.items():
        sub = {}
        for f in dataclasses.fields(cls):  # absent (an option added since) or null: the default
            value = out.pop(_FLAT_NAMES.get((group, f.name), f.name), None)
            sub[f.name] = f.default if value is None else value
        out[group] = {k: list(v) if isinstance(v, tuple) else v for k, v in sub.items()}
    return out


@dataclass
class SDQConfig:
    """The Hydra app's ``sdq`` node, as a schema: :class:`~sdq_lightning.SDQ`'s arguments, the option groups above as
    typed sub-nodes (their defaults are the classes, which OmegaConf reads without constructing them), and the
    app's own switch ``enabled`` (false: the run trains in floating point)."""

    _target_: str = "sdq_lightning.SDQ"
    enabled: bool = True
    weight_bits: Any = (1, 2, 3, 4, 5, 6, 7, 8)
    activation_bits: Optional[int] = 4
    budget: Any = None
    search_epochs: int = 3
    teacher: Any = None
    plan: Any = None
    seed: int = 0
    integer_only: bool = False
    layers: LayerOptions = field(default_factory=lambda: LayerOptions)
    search: SearchOptions = field(default_factory=lambda: SearchOptions)
    freeze: FreezeOptions = field(default_factory=lambda: FreezeOptions)
    ebr: EBROptions = field(default_factory=lambda: EBROptions)
    kd: KDOptions = field(default_factory=lambda: KDOptions)
    runtime: RuntimeOptions = field(default_factory=lambda: RuntimeOptions)


def register_schema() -> None:
    """Store :class:`SDQConfig` as ``sdq/schema`` in Hydra's ConfigStore (``conf/sdq/default.yaml`` extends it;
    importing :mod:`sdq_lightning` does this). OmegaConf makes the nodes of frozen classes read-only; the schema's
    are made writable so that the yaml and the command line can set values, their keys and types still checked."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import DictConfig, OmegaConf

    def writable(node: Any) -> None:
        node._set_flag("readonly", None)
        if isinstance(node, DictConfig):
            for key in node.keys():
                writable(node._get_node(key))

    schema = OmegaConf.structured(SDQConfig)
    writable(schema)
    ConfigStore.instance().store(group="sdq", name="schema", node=schema)
