"""Operations one Lightning training step issues, per hook: the FP classifier, and the SDQ callback searching and
frozen (KD from an FP teacher, EBR), as the paper row runs them (ResNet20, FP activations, bf16-mixed).

Under CUDA graphs (the app's default on one GPU) the network's forward and backward replay as two launches; what
the hooks around them issue stays eager and is launched one kernel at a time. This counts, on the CPU, the
operations that launch work (``benchmarks/count_ops.py``'s rule: allocations, views and no-op conversions left out, a
``_foreach_`` op once), attributed to the innermost Lightning hook they run in (a profiler that marks every hook with
``torch.profiler.record_function``), averaged over ``--steps`` steps after ``--skip`` warm-up steps of each phase.

``--graphs``: the KD teacher's forward, KD, the EBR term, the DBP step and the step-size optimizer run through their
``GraphedCall`` as under ``SDQ(runtime={"compile": "cuda-graphs"})``, with a CPU stand-in for the capture (it runs the
work eagerly inside a mark); their operations are counted as replayed, the rest (copying the inputs in, keeping the
logged terms, the schedule's device scalars) stays eager.

``--task-estimate``: the search's task estimate (default ``pathwise``: the callback's own work around the network;
``paired``, the callback's default, adds its no-grad probe forwards of the network to ``SDQ.on_before_optimizer_step``).

    python benchmarks/count_app_ops.py [--batch 8] [--steps 4] [--batched both] [--graphs] [--task-estimate paired]
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
import count_ops  # noqa: E402

from sdq_lightning import SDQ, SDQClassifier  # noqa: E402
from sdq_lightning.modules.graphs import capture_eagerly  # noqa: E402

NETWORK = ("Strategy.training_step", "Strategy.backward")  # what CUDA graphs replay (plus the loss around it)
REPLAY = "graph replay"  # the mark of the stand-in capture (--graphs): the work graphed around the network


def _replay_stand_in(fn, inputs, warmup):
    """GraphedCall's capture on the CPU for counting (``capture_eagerly``): each "replay" runs inside a mark."""
    replay = capture_eagerly(fn, inputs, warmup)

    def marked():
        with torch.profiler.record_function(REPLAY):
            return replay()

    return marked


class HookProfiler(pl.profilers.Profiler):
    """A Lightning profiler that only wraps every hook (``profile``; subclasses say how); nothing to start, stop or
    summarise. Shared with ``benchmarks/app_host_time.py``."""

    def start(self, action_name: str) -> None:  # noqa: D102
        pass

    def stop(self, action_name: str) -> None:  # noqa: D102
        pass

    def summary(self) -> str:  # noqa: D102
        return ""


def hook_name(action_name: str) -> str:
    """Lightning's action name as ``owner.hook``: ``[Callback]SDQ{...state key...}.on_before_backward`` ->
    ``SDQ.on_before_backward``, ``[Strategy]SingleDeviceStrategy.training_step`` -> ``Strategy.training_step``."""
    if action_name.startswith("[") and "]" in action_name:
        kind, rest = action_name[1:].split("]", 1)
        owner = rest.rsplit(".", 1)[0].split("{", 1)[0] if kind == "Callback" else kind
        return f"{owner}.{rest.rsplit('.', 1)[-1]}"
    return action_name


class _Marks(HookProfiler):
    """Marks every Lightning hook with a ``record_function`` of its name (Lightning's own names)."""

    @contextmanager
    def profile(self, action_name: str):  # noqa: D102
        with torch.profiler.record_function(action_name):
            yield


class _Window(pl.Callback):
    """Profiles the training steps ``skip .. skip + steps - 1`` of every epoch (first in the callback list: the
    window opens before the other callbacks' batch-start hooks and closes before the next batch's)."""

    def __init__(self, skip: int, steps: int) -> None:
        self.skip, self.steps = skip, steps
        self.counts: dict[int, Counter] = {}
        self._prof = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: D102
        if batch_idx == self.skip:
            self._prof = profile(activities=[ProfilerActivity.CPU])
            self._prof.__enter__()
        elif batch_idx == self.skip + self.steps and self._prof is not None:
            self._close(trainer.current_epoch)

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: D102
        if self._prof is not None:
            self._close(trainer.current_epoch)

    def _close(self, epoch: int) -> None:
        prof, self._prof = self._prof, None
        prof.__exit__(None, None, None)
        counts: Counter = Counter()
        for e in prof.events():
            if e.cpu_parent is None:
                _attribute(e, None, counts)
        self.counts[epoch] = counts


def _attribute(e, hook: str | None, counts: Counter) -> None:
    name = e.name
    if name == REPLAY:
        hook = f"{REPLAY} ({hook})"
    elif name.startswith("[") and "]" in name:
        hook = hook_name(name)
    if name.startswith("aten::"):
        ops: list = []
        count_ops._launching(e, ops)
        counts[hook or "(outside the hooks)"] += len(ops)
        return
    for c in e.cpu_children:
        _attribute(c, hook, counts)


def run(batch: int, skip: int, steps: int, sdq: bool, batched: bool = True, graphs: bool = False,
        task_estimate: str = "pathwise") -> dict[int, Counter]:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(0)
    n = batch * (skip + steps + 1)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    model = SDQClassifier("resnet20", lr=0.05)
    window = _Window(skip, steps)
    callbacks: list = [window]
    epochs = 1
    if sdq:
        teacher = copy.deepcopy(model)
        cb = SDQ(weight_bits=tuple(range(1, 9)), activation_bits=None, search_epochs=1,
                 budget={"metric": "avg_bits", "target": 1.93}, teacher=teacher,
                 search={"task_estimate": task_estimate}, ebr={"weight": 0.1},
                 runtime={"batched": batched, "guard": False})
        if graphs:  # what compile="cuda-graphs" turns on, with the counting stand-in for the capture
            cb._graph_eager_work(_replay_stand_in)
        callbacks.append(cb)
        epochs = 2
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, precision="bf16-mixed", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         profiler=_Marks(), callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(data, batch_size=batch))
    return window.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--skip", type=int, default=3, help="warm-up steps of each epoch before the counted ones")
    ap.add_argument("--steps", type=int, default=4, help="steps counted per epoch (the average is printed)")
    ap.add_argument("--batched", choices=("on", "off", "both"), default="both",
                    help="SDQ(runtime={'batched': ...}): the batched weight pass (on, the default), per layer (off), or both")
    ap.add_argument("--task-estimate", choices=("pathwise", "paired", "paired_train"), default="pathwise",
                    help="the search's task estimate (paired adds its probe forwards to the DBP step's hook)")
    ap.add_argument("--top", type=int, default=12, help="hooks listed per run (by operations)")
    ap.add_argument("--graphs", action="store_true",
                    help="the teacher's forward, KD, EBR, the DBP step and the step sizes as under "
                         "compile='cuda-graphs' (counted as replayed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    runs = {"fp": run(args.batch, args.skip, args.steps, sdq=False)[0]}
    for b in ({"on": [True], "off": [False], "both": [True, False]}[args.batched]):
        counts = run(args.batch, args.skip, args.steps, sdq=True, batched=b, graphs=args.graphs,
                     task_estimate=args.task_estimate)
        suffix = "" if b else " (per layer)"
        runs["sdq search" + suffix], runs["sdq frozen" + suffix] = counts[0], counts[1]
    print(f"torch {torch.__version__}, ResNet20, batch {args.batch}, bf16-mixed, FP activations, KD + EBR 0.1 in "
          f"SDQ's phase 2; operations that launch work per training step (mean of {args.steps} steps)\n")
    replayed = "network: training_step + backward" + (", teacher, KD, EBR, DBP step, step sizes" if args.graphs else "")
    print(f"| run | {replayed} | everything else (eager under CUDA graphs) | total |")
    print("|---|---:|---:|---:|")
    for name, c in runs.items():
        net = sum(v for k, v in c.items() if k in NETWORK or k.startswith(REPLAY))
        total = sum(c.values())
        print(f"| {name} | {net / args.steps:.0f} | {(total - net) / args.steps:.0f} | {total / args.steps:.0f} |")
    print("\n`LightningModule.optimizer_step` is the weights' SGD step: on the CPU torch.optim.SGD runs one operation "
          "per tensor, on CUDA its multi-tensor form (a few launches).")
    for name, c in runs.items():
        top = ", ".join(f"{k} {v / args.steps:.0f}" for k, v in c.most_common(args.top))
        print(f"\n{name}: {top}")


if __name__ == "__main__":
    main()
