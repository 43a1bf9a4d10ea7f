"""Cost of one SDQ training step against the float model: ResNet20, batch 128, CPU, forward + backward + SGD step.

Modes (all in one process, interleaved round robin so that machine noise hits every mode alike):

* ``fp``: timm ``resnet20`` as is.
* ``search``: the same network after ``quantize_model`` with weight candidates 1..8 (progressive reading, gumbel
  estimator, the defaults), 4-bit activations (``--act-bits``; 0 = FP activations, as the paper row), first conv and classifier at 8 bits; train mode, every quantizer
  drawing a bitwidth each step (both adjacent quantizers of the live level are evaluated, as the method requires).
* ``frozen``: a search-mode model whose plan was projected onto ``avg_bits <= 2.0`` with ``project_to_budget`` and
  applied with ``BitPlan.apply`` (one quantizer per layer, 4-bit activations): the phase-2 training step.
* ``search+ck`` / ``frozen+ck`` (``--kernels both``, the default, or ``--kernels compile``): the same models with
  the LSQ elementwise kernels compiled (``sdq_lightning.set_kernels("compile")``: only the fake-quantization
  arithmetic goes through ``torch.compile``, the model stays eager). This is what
  ``SDQ(runtime={"kernels": "compile"})`` and the Hydra app's default ``sdq.runtime.kernels=compile`` run.
* with ``--compile``, fp/search/frozen with the whole model under ``torch.compile`` (a second table; skipped if it
  fails); ``--compile-modes cuda-graphs`` (and ``cuda-graphs+ck``) instead captures forward + backward as CUDA graphs
  (:class:`sdq_lightning.modules.graphs.GraphedNetwork`, what ``SDQ(runtime={"compile": "cuda-graphs"})`` runs; no
  compiler), and the DBP step and the step-size optimizer as graphs of their own, as that callback does.
* ``search+pl`` / ``frozen+pl`` (``--weights both``, the default, or ``--weights per-layer``): each layer's weight
  quantizer runs in its own forward, as before the batched weight pass; without ``+pl`` every layer's weight is
  quantized in one batched pass per forward (:mod:`sdq_lightning.modules.batched`, what ``SDQ(runtime={"batched": True})``, the
  default, runs). ``--compile-modes cuda-graphs+pl`` captures the per-layer form.
* ``--bf16``: every mode under ``torch.autocast(device, torch.bfloat16)`` (the ``bf16-mixed`` training precision).
* ``--device cuda --batch N``: on a GPU (CUDA-synchronised wall time per step; memory columns from the CUDA
  allocator instead of saved tensors / RSS).

A quantized step is the whole training step the SDQ callback runs: forward, backward, the SGD step of the weights,
the LSQ step sizes' ``LogStepAdam`` step and, in ``search`` mode, the DBP step with its budget controller
(:class:`sdq_lightning.core.search.BitSearch`, 1000-step search towards ``avg_bits <= 2.0``).

Each repeat times ``--steps`` consecutive optimizer steps of one mode after ``--warmup`` untimed steps of every
mode; the median over ``--repeats`` repeats of (time / steps) is reported, with the ratios to ``fp``. On a shared
machine the minimum is the better estimate of the uncontended cost, so the ratio of minima is printed too.

Memory, measured two ways and both printed, because on CPU torch's caching allocator does not keep statistics:

* ``saved MiB``: bytes of the distinct tensors autograd saves for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``, deduplicated by storage). This is the activation memory of a
  training step, the part that grows with the quantizers; parameters, gradients and optimizer state are the same
  size in every mode (the quantizers add a few hundred scalars) and are listed separately.
* ``peak RSS delta MiB``: in a fresh subprocess per mode, peak RSS (VmHWM, reset via ``/proc/self/clear_refs``
  after building the model and the batch) over ``--steps`` steps minus the RSS before them. Honest but coarse (allocator caching, glibc arenas, page granularity).

Exact command used for benchmarks/results/bench_step.md:

    .venv/bin/python benchmarks/bench_step.py --repeats 15 --steps 3 --warmup 3

Results are written to ``benchmarks/results/bench_step.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch
from torch import nn

import sdq_lightning as sq

BATCH = 128
MODES = ("fp", "search", "frozen")
CK = "+ck"  # suffix of a mode run with the compiled LSQ kernels
PL = "+pl"  # suffix of a mode whose weight quantizers run per layer (no batched weight pass)


def modes_for(kernels: str, weights: str = "batched") -> tuple[str, ...]:
    quant = [m for m in MODES if m != "fp"]
    forms = {"batched": [""], "per-layer": [PL], "both": ["", PL]}[weights]
    quant = [m + f for m in quant for f in forms]
    eager = quant if kernels in ("eager", "both") else []
    ck = [m + CK for m in quant] if kernels in ("compile", "both") else []
    return ("fp", *eager, *ck)


def _base(mode: str) -> str:
    return mode.removesuffix(CK).removesuffix(PL)


DEVICE = "cpu"
ACT_BITS: int | None = 4  # activation bits of the quantized modes (--act-bits; None: FP activations)
MODEL = "resnet20"  # the timm model (benchmarks/count_ops.py --model; 32x32 inputs, 10 classes)


def build(mode: str, seed: int = 0) -> nn.Module:
    batched = PL not in mode
    mode = _base(mode)
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, num_classes=10)
    if mode == "fp":
        return model.train().to(DEVICE)
    x1 = torch.randn(1, 3, 32, 32)
    prof = sq.profile_model(model, x1)
    sq.quantize_model(model, sq.QuantSpec(weight_bits=tuple(range(1, 9)), activation_bits=ACT_BITS))
    model.train()
    with torch.no_grad():  # initialise the activation steps from a batch, as the first training step would
        model(torch.randn(BATCH, 3, 32, 32))
    if mode == "frozen":
        cm = sq.CostModel(model, prof)
        bits = sq.project_to_budget(cm, cm.current_bits(), sq.Budget("avg_bits", 2.0))
        plan = sq.BitPlan.from_model(model, profile=prof).with_bits(bits)
        plan.apply(model)
        assert plan.average_bits <= 2.0
    model.to(DEVICE)
    if batched:
        from sdq_lightning.modules.batched import batch_weights

        batch_weights(model)
    if mode == "search":
        from sdq_lightning.core.search import BitSearch

        model._bench_search = BitSearch(sq.CostModel(model, prof), sq.Budget("avg_bits", 2.0))
        model._bench_search.start(1000, 1)
    return model


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Runner:
    def __init__(self, model: nn.Module, compiled: str | None = None, kernels: str = "eager",
                 bf16: bool = False) -> None:
        from sdq_lightning.quantizers.optim import LogStepAdam

        self.model, self.kernels, self.bf16 = model, kernels, bf16
        quant = [p for n, p in model.named_parameters() if n.endswith(("dbp", "steps", "step"))]
        ids = {id(p) for p in quant}
        self.opt = torch.optim.SGD([p for p in model.parameters() if id(p) not in ids], lr=0.01, momentum=0.9)
        steps = [p for n, p in model.named_parameters() if n.endswith(("steps", "step"))]
        self.step_opt = LogStepAdam(steps) if steps else None
        self.search = getattr(model, "_bench_search", None)
        # compiled: a torch.compile mode ("default", "reduce-overhead": CUDA graphs, ...), whole model, one graph;
        # "cuda-graphs": no compiler, forward + backward captured by sdq_lightning.modules.graphs.GraphedNetwork
        self.step_sizes = self.step_opt.step if self.step_opt is not None else None
        if compiled == "cuda-graphs":  # as under SDQ(runtime={"compile": "cuda-graphs"}): network, DBP step, step sizes
            from sdq_lightning.modules.graphs import GraphedNetwork, GraphedOptimizerStep

            GraphedNetwork(model)  # installs itself as model.forward
            if self.search is not None:
                self.search.use_graphs(True)
            if self.step_opt is not None:
                self.step_sizes = GraphedOptimizerStep(self.step_opt).step
        self.fwd = model if compiled in (None, "cuda-graphs") else \
            torch.compile(model, mode=None if compiled == "default" else compiled, fullgraph=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(BATCH, 3, 32, 32, generator=g).to(DEVICE)
        self.y = torch.randint(0, 10, (BATCH,), generator=g).to(DEVICE)
        self.step_idx = 0

    def step(self) -> None:
        self.step_idx += 1
        if self.search is not None:
            self.search.begin_step(self.step_idx, 0.5)
        self.opt.zero_grad(set_to_none=True)
        self.loss(self.fwd).backward()
        self.opt.step()
        if self.search is not None:
            self.search.step()
        if self.step_opt is not None:
            self.step_sizes()
            self.step_opt.zero_grad(set_to_none=True)

    def loss(self, fwd: nn.Module, n: int | None = None) -> torch.Tensor:
        """Cross entropy of ``fwd`` on the first ``n`` images, under this runner's kernels and precision."""
        n = BATCH if n is None else n
        sq.set_kernels(self.kernels)
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=self.bf16):
            return nn.functional.cross_entropy(fwd(self.x[:n]), self.y[:n])


def saved_tensor_bytes(runner: Runner) -> int:
    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        seen[(st.data_ptr(), st.nbytes())] = st.nbytes()
        return t

    runner.opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = runner.loss(runner.model)
    loss.backward()
    runner.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def _vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def make_runner(mode: str, bf16: bool) -> Runner:
    return Runner(build(mode), kernels="compile" if mode.endswith(CK) else "eager", bf16=bf16)


def rss_child(mode: str, steps: int, bf16: bool) -> None:
    """Subprocess body: print the peak-RSS growth (KiB) over ``steps`` training steps.

    The import of torch/timm can leave a peak higher than a ResNet20 step needs, so the peak (VmHWM) is reset to the
    current RSS first (``echo 5 > /proc/self/clear_refs``, Linux); the delta is VmHWM after the steps minus VmRSS
    before them."""
    runner = make_runner(mode, bf16)
    if mode.endswith(CK):  # compile the kernels before the measurement, on a 2-image batch (shapes are dynamic)
        runner.loss(runner.model, n=2).backward()
        runner.opt.zero_grad(set_to_none=True)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = _vm_kib("VmRSS")
    for _ in range(steps):
        runner.step()
    after = _vm_kib("VmHWM")
    print(json.dumps({"mode": mode, "rss_delta_kib": after - before}))


def rss_delta_mib(mode: str, steps: int, bf16: bool) -> float:
    out = subprocess.run([sys.executable, __file__, "--rss-child", mode, "--steps", str(steps), "--batch", str(BATCH),
                          "--act-bits", str(ACT_BITS or 0)] + ["--bf16"] * bf16,
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["rss_delta_kib"] / 1024


def time_modes(runners: dict[str, Runner], repeats: int, steps: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for r in runners.values():
            r.step()
    times: dict[str, list[float]] = {m: [] for m in runners}
    for rep in range(repeats):
        order = list(runners) if rep % 2 == 0 else list(runners)[::-1]
        for m in order:
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                runners[m].step()
            _sync()
            times[m].append((time.perf_counter() - t0) / steps * 1e3)
    return times


def table(title: str, times: dict[str, list[float]], extra: dict[str, dict[str, str]] | None = None) -> str:
    fp = statistics.median(times["fp"])
    cols = list(next(iter(extra.values())).keys()) if extra else []
    fp_min = min(times["fp"])
    head = "| mode | median ms/step | min ms | max ms | ratio to fp (medians) | ratio to fp (mins) |" + "".join(f" {c} |" for c in cols)
    rows = [f"### {title}", "", head, "|---|---:|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for m, ts in times.items():
        med = statistics.median(ts)
        ext = "".join(f" {extra[m][c]} |" for c in cols) if extra else ""
        rows.append(f"| {m} | {med:.1f} | {min(ts):.1f} | {max(ts):.1f} | {med / fp:.2f}x | {min(ts) / fp_min:.2f}x |"
                    f"{ext}")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per timed repeat")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch default)")
    ap.add_argument("--kernels", choices=("eager", "compile", "both"), default="both",
                    help="LSQ kernels of the quantized modes (compile: sdq_lightning.set_kernels('compile'))")
    ap.add_argument("--weights", choices=("batched", "per-layer", "both"), default="both",
                    help="weight quantizers of the quantized modes: one batched pass (the callback's default), per "
                         "layer (+pl), or both")
    ap.add_argument("--bf16", action="store_true", help="every mode under CPU bf16 autocast")
    ap.add_argument("--act-bits", type=int, default=4, help="activation bits of the quantized modes (0: FP)")
    ap.add_argument("--compile", action="store_true", help="also time whole-model torch.compile variants")
    ap.add_argument("--compile-modes", default="default",
                    help="comma-separated torch.compile modes for --compile (default, reduce-overhead, "
                         "max-autotune-no-cudagraphs) or cuda-graphs / cuda-graphs+ck (no compiler: "
                         "GraphedNetwork, CUDA only); one table each")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    ap.add_argument("--rss-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE, BATCH, ACT_BITS
    DEVICE, BATCH, ACT_BITS = args.device, args.batch, args.act_bits or None
    if DEVICE == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device is available")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args.rss_child, args.steps, args.bf16)
        return

    modes = modes_for(args.kernels, args.weights)
    runners = {m: make_runner(m, args.bf16) for m in modes}
    frozen_plan_bits = sq.BitPlan.from_model(runners["frozen"].model,
                                            torch.randn(1, 3, 32, 32, device=DEVICE)).average_bits
    times = time_modes(runners, args.repeats, args.steps, args.warmup)

    mem: dict[str, dict[str, str]] = {}
    saved = {m: saved_tensor_bytes(r) / 2**20 for m, r in runners.items()}
    if DEVICE == "cuda":  # the caching allocator keeps statistics: peak allocated over one step per mode
        rss = {}
        for m, r in runners.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            r.step()
            torch.cuda.synchronize()
            rss[m] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        rss = {m: rss_delta_mib(m, max(args.steps, 3), args.bf16) for m in modes}
    params = {m: sum(p.numel() * p.element_size() for p in r.model.parameters()) / 2**20 for m, r in runners.items()}
    for m in modes:
        mem[m] = {"saved MiB": f"{saved[m]:.1f} ({saved[m] / saved['fp']:.2f}x)",
                  "peak RSS delta MiB": f"{rss[m]:.0f} ({rss[m] / max(rss['fp'], 1e-9):.2f}x)",
                  "params MiB": f"{params[m]:.2f}"}

    cmd = "python " + " ".join(sys.argv)
    dev = torch.cuda.get_device_name() if DEVICE == "cuda" else (platform.processor() or platform.machine())
    env = (f"torch {torch.__version__}, {dev}, "
           f"{torch.get_num_threads()} threads, {'bf16 autocast' if args.bf16 else 'fp32'}, "
           f"{ACT_BITS or 'FP'} activation bits, batch {BATCH}, {args.repeats} repeats x {args.steps} steps, "
           f"frozen plan {frozen_plan_bits:.3f} avg bits")
    parts = [f"Command: `{cmd}`", "", env, "", table("model in eager mode (+ck: LSQ kernels compiled)", times, mem)]
    result = {"command": cmd, "env": env, "eager": times, "saved_mib": saved, "rss_delta_mib": rss}
    print("\n".join(parts), flush=True)  # the eager table first: compiling takes minutes on a small CPU
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every table, so a run stopped while compiling keeps what it measured
        (out / "bench_step.md").write_text("\n".join(parts) + "\n")
        (out / "bench_step.json").write_text(json.dumps(result, indent=2))

    save()

    for cmode in (args.compile_modes.split(",") if args.compile else []):
        try:
            t0 = time.perf_counter()
            # "cuda-graphs+ck": CUDA graphs around the compiled LSQ kernels; "+pl": per-layer weight quantizers
            base, ck, pl = _base(cmode), CK in cmode, PL in cmode
            cr = {m: Runner(build(m + PL * pl), compiled=base, kernels="compile" if ck and m != "fp" else "eager",
                            bf16=args.bf16) for m in MODES}
            for r in cr.values():  # compile (and recompile after the first draws) outside the timing
                for _ in range(3):
                    r.step()
            ctimes = time_modes(cr, args.repeats, args.steps, args.warmup)
            what = f"CUDA graphs ({'compiled' if ck else 'eager'} LSQ kernels), forward + backward captured" \
                if base == "cuda-graphs" else f"torch.compile(mode={cmode!r}, fullgraph=True), whole model"
            parts += ["", table(f"{what} "
                                f"(compile+warmup {time.perf_counter() - t0:.0f} s incl. timing)", ctimes)]
            result[f"compiled_{cmode}"] = ctimes
        except Exception as err:  # noqa: BLE001  (report, don't hide)
            import traceback

            traceback.print_exc()
            parts += ["", f"torch.compile(mode={cmode!r}) failed: {type(err).__name__}: {str(err)[:300]}"]
            result[f"compiled_{cmode}_error"] = repr(err)[:1000]
        print("\n".join(parts[-2:]), flush=True)
        save()



if __name__ == "__main__":
    main()
