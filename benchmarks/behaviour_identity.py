"""Behaviour identity (issue 23): two short, seeded CPU fits whose results are fingerprinted, so that a refactor can
show it changed nothing: the same plan, weights, DBPs, steps, multiplier and exports, bit for bit.

Fits:
  digits  the README's "Add SDQ to an existing Lightning project" path: ``SDQ(weight_bits=(1..8),
          activation_bits=4, budget avg_bits <= 2.0, search_epochs=2)`` in a plain ``lightning.Trainer(max_epochs=3)``
          X, digits 75/25 split), then
          ``sdq_lightning.export.export_model`` (packed, ONNX, report) and a test pass.
  cifar   the Hydra app (``python -m sdq_lightning.train``, a subprocess) on ResNet20 from
          checkpoints/resnet20_cifar10_fp.pt: CIFAR-10 ImageFolder as in experiments/search_signal.sh (in memory,
          on-device augmentation), a class-balanced subset of 1,500 training images, validation and test on 500 test
          images, 1 search epoch + 1 phase-2 epoch (EBR on), FP activations, avg bits <= 2.0; then ``sdq-export``
          (``python -m sdq_lightning.cli.export``) of the run folder.

Both run with one thread (``torch.set_num_threads(1)`` / ``OMP_NUM_THREADS=1``) and the eager LSQ kernels
(``--kernels``, default eager: the compiled kernels cost minutes of compilation on 2 cores), seed 0, CPU.

Fingerprints (JSON, no absolute paths and no timestamps, so two runs of the same tree write equal files): the frozen
plan (weight/activation bits per layer and its costs), the SHA-256 of every model state tensor (dtype, shape and
bytes) and one over all, the DBPs (one SHA-256 and the values of the first three searched layers), the global step, the
search's multiplier (the DBP optimizer's final lambda, the per-epoch values in the history and a SHA-256 of the
per-step controller trace), the accuracies, the SHA-256 of each exported file (ONNX, bit-packed checkpoint,
capability.json, plan.yaml) and the onnxruntime outputs of the exported ONNX model on a fixed seeded batch (SHA-256
of the float32 bytes and the first values): where the ONNX bytes differ, equal onnxruntime outputs still count as
the same behaviour (the table says which held).

    python benchmarks/behaviour_identity.py --record ref.json [--fits digits,cifar] [--cifar10 ROOT]
    python benchmarks/behaviour_identity.py --check ref.json  [--fits digits,cifar] [--cifar10 ROOT]

``--check`` prints one row per field (fit, field, reference, now, equal?) and exits 1 on any difference.
``--repo PATH``: fingerprint another checkout (e.g. a ``git worktree`` of the commit before a refactor): its
``src/`` and ``tests/`` are imported instead of this tree's, the app runs from it (``cwd``, ``PYTHONPATH``) and its
``checkpoints/`` is used; outputs go to ``PATH/outputs/behaviour_identity/`` (``--work`` to change). CIFAR-10:
``--cifar10`` or ``SDQ_CIFAR10_ROOT`` / ``CIFAR10_ROOT`` (an ImageFolder tree with train/ and test/); without it the
cifar fit is skipped with a message (and ``--check`` then compares the digits fit only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

FITS = ("digits", "cifar")
CIFAR_MEAN, CIFAR_STD = "[0.4914,0.4822,0.4465]", "[0.2470,0.2435,0.2616]"
DBP_SAMPLE_LAYERS = 3


# ----------------------------------------------------------------------------------------------- fingerprints
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_sha(t: Any) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (contiguous, on the CPU)."""
    import torch

    t = t.detach().cpu().contiguous()
    head = f"{t.dtype}|{tuple(t.shape)}|".encode()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return _sha(head + t.numpy().tobytes())


def state_fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """Per-tensor SHA-256 (sorted by name), one over all of them, and the DBPs."""
    import torch

    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    per = {k: tensor_sha(tensors[k]) for k in sorted(tensors)}
    total = _sha("\n".join(f"{k} {v}" for k, v in per.items()).encode())
    dbps = {k: tensors[k] for k in sorted(tensors) if k.endswith("dbp")}
    dbp_all = _sha("\n".join(f"{k} {per[k]}" for k in dbps).encode())
    searched = [k for k, v in dbps.items() if v.numel() > 1]  # a fixed layer's DBP is one value
    sample = {k: [float(x) for x in dbps[k].detach().cpu().flatten().tolist()] for k in searched[:DBP_SAMPLE_LAYERS]}
    return {"state_sha256": total, "state_tensors": len(per), "state": per,
            "dbp_sha256": dbp_all, "dbp_layers": len(dbps), "dbp_sample": sample}


def plan_fingerprint(plan: dict[str, Any]) -> dict[str, Any]:
    """Bits per layer and the plan's costs (BitPlan.to_dict() or a loaded plan.yaml; metadata left out)."""
    layers = {n: [lb.get("w_bits"), lb.get("a_bits")] for n, lb in plan["layers"].items()}
    return {"plan": layers, "plan_costs": plan.get("costs")}


def multiplier_fingerprint(final: Any, history: list[dict[str, Any]], trace: dict[str, Any] | None) -> dict[str, Any]:
    per_epoch = [h.get("multiplier") for h in history if "multiplier" in h]
    control = (trace or {}).get("control") or []
    return {"multiplier": None if final is None else float(final), "multiplier_per_epoch": per_epoch,
            "multiplier_trace_steps": len(control),
            "multiplier_trace_sha256": _sha(json.dumps([float(c) for c in control]).encode()) if control else None}


def export_fingerprint(out: Path, batch_shape: tuple[int, ...]) -> dict[str, Any]:
    """SHA-256 of the exported files (paths relative to the export folder; export.json is left out: it records
    absolute paths) and the onnxruntime outputs of model.onnx on a fixed seeded batch."""
    import numpy as np

    files = {str(p.relative_to(out)): _sha(p.read_bytes()) for p in sorted(out.rglob("*"))
             if p.is_file() and p.name not in ("export.json", "capability.md")}
    result: dict[str, Any] = {"export_files": files}
    onnx = out / "model.onnx"
    if onnx.is_file():
        import onnxruntime as ort

        sess = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        n = inp.shape[0] if isinstance(inp.shape[0], int) else batch_shape[0]
        x = np.random.default_rng(0).standard_normal((n, *batch_shape[1:])).astype(np.float32)
        y = np.ascontiguousarray(sess.run(None, {inp.name: x})[0], dtype=np.float32)
        result["onnxruntime"] = {"input": [n, *batch_shape[1:]], "output_sha256": _sha(y.tobytes()),
                                 "output_first": [float(v) for v in y.flatten()[:5]],
                                 "top1": [int(v) for v in y.reshape(y.shape[0], -1).argmax(1)]}
    return result


# ----------------------------------------------------------------------------------------------- fits
def fit_digits(work: Path) -> dict[str, Any]:
    """The README one-liner on a user's own LightningModule (digits, 3 epochs, 2 of them searching)."""
    import lightning
    import torch

    from helpers.data import Loaders
    from helpers.user_module import UserNet
    from sdq_lightning import SDQ
    from sdq_lightning.export import export_model

    torch.set_num_threads(1)
    lightning.seed_everything(0, workers=True, verbose=False)
    loaders = Loaders()
    user_module = UserNet(body="cnn_fc", width=16, test_metric="test_acc")
    sdq = SDQ(weight_bits=(1, 2, 3, 4, 5, 6, 7, 8), activation_bits=4,   # the README's call; the LSQ kernels are
              budget={"metric": "avg_bits", "target": 2.0}, search_epochs=2)  # the process default (SDQ_KERNELS)
    trainer = lightning.Trainer(max_epochs=3, callbacks=[sdq], accelerator="cpu", devices=1, deterministic=True,
                                default_root_dir=str(work), enable_progress_bar=False, enable_model_summary=False,
                                log_every_n_steps=5)
    trainer.fit(user_module, train_dataloaders=loaders.train())
    fp: dict[str, Any] = {"global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch)}
    fp.update(plan_fingerprint(sdq.plan.to_dict()))
    fp["plan_average_bits"] = float(sdq.plan.average_bits)
    fp.update(state_fingerprint(user_module.state_dict()))
    opt = getattr(getattr(sdq, "search", None), "optimizer", None)  # getattr: a renamed attribute shows as a None
    fp.update(multiplier_fingerprint(getattr(opt, "multiplier", None), getattr(sdq, "history", []),
                                     getattr(sdq, "search_trace", None)))
    test = trainer.test(user_module, dataloaders=loaders.test(), verbose=False)
    fp["test_acc"] = float(test[0]["test_acc"])
    example = loaders.test_set.tensors[0][:8]
    export_model(user_module, work / "export", example)
    fp.update(export_fingerprint(work / "export", tuple(example.shape)))
    return fp


def _cifar_overrides(root: str, repo: Path, run_dir: Path, subset: int) -> list[str]:
    """Only keys that every version of the app since e493818 has (the kernels come from SDQ_KERNELS)."""
    return ["name=behaviour_identity_cifar", f"hydra.run.dir={run_dir}", "phase=full", "phase.search_epochs=1",
            "trainer=cpu", "trainer.max_epochs=2", "trainer.precision=32", "trainer.enable_progress_bar=false",
            "trainer.deterministic=true", "dataset=imagefolder", f"dataset.root={root}", "dataset.image_size=32",
            f"dataset.mean={CIFAR_MEAN}", f"dataset.std={CIFAR_STD}", "dataset.in_memory=true",
            "dataset.on_device=true", "dataset.num_workers=0", "dataset.batch_size=128", f"dataset.subset={subset}",
            "dataset.val_size=0", "dataset.val_subset=500", "model=resnet20",
            f"model.init_checkpoint={repo / 'checkpoints' / 'resnet20_cifar10_fp.pt'}", "model.lr=0.02",
            "model.scheduler=cosine", "hardware=avg_bits", "hardware.target=2.0", "hardware.activation_bits=null",
            "logger=csv", "seed=0"]


def _child_env(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(repo / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def fit_cifar(work: Path, repo: Path, root: str, subset: int) -> dict[str, Any]:
    """The Hydra app on ResNet20 (1 search + 1 phase-2 epoch on a CIFAR-10 subset), then sdq-export."""
    import torch
    import yaml

    run_dir = work / "run"
    env = _child_env(repo)
    cmd = [sys.executable, "-m", "sdq_lightning.train", *_cifar_overrides(root, repo, run_dir, subset)]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"the cifar fit failed (exit {proc.returncode}): {' '.join(cmd)}")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    fp: dict[str, Any] = {"global_step": int(ckpt["global_step"]), "epochs": int(ckpt["epoch"])}
    fp.update(plan_fingerprint(yaml.safe_load((run_dir / "plan.yaml").read_text())))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    fp["plan_average_bits"] = metrics.get("avg_bits")
    fp.update(state_fingerprint(ckpt["state_dict"]))
    sdq_state = next((v for k, v in ckpt.get("callbacks", {}).items() if "SDQ" in k), None) or {}
    opt = ((sdq_state.get("search") or {}).get("optimizer") or {})
    final = opt.get("multiplier", (opt.get("controller") or {}).get("multiplier")) if isinstance(opt, dict) else None
    history = json.loads((run_dir / "history.json").read_text())
    trace_path = run_dir / "search_trace.json"
    trace = json.loads(trace_path.read_text()) if trace_path.is_file() else None
    fp.update(multiplier_fingerprint(final, history, trace))
    fp["test_acc"], fp["val_acc"] = metrics.get("test/acc"), metrics.get("val/acc")
    out = work / "export"
    exp = subprocess.run([sys.executable, "-m", "sdq_lightning.cli.export", str(run_dir), "--out", str(out)],
                         cwd=repo, env=env, capture_output=True, text=True)
    if exp.returncode != 0:
        sys.stderr.write(exp.stdout[-4000:] + exp.stderr[-4000:])
        raise SystemExit(f"sdq-export of the cifar run failed (exit {exp.returncode})")
    fp.update(export_fingerprint(out, (8, 3, 32, 32)))
    return fp


# ----------------------------------------------------------------------------------------------- compare
def _short(v: Any, width: int = 34) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    if isinstance(v, dict):
        s = f"{{{len(v)} entries}} sha {_sha(json.dumps(v, sort_keys=True).encode())[:10]}"
    return s if len(s) <= width else s[:width - 3] + "..."


def compare(ref: dict[str, Any], now: dict[str, Any], fits: list[str]) -> bool:
    rows: list[tuple[str, str, str, str, str]] = []
    all_equal = True
    for fit in fits:
        r, n = ref.get("fits", {}).get(fit), now.get("fits", {}).get(fit)
        if r is None or n is None:
            rows.append((fit, "(fit)", "present" if r else "absent", "present" if n else "absent", "skipped"))
            continue
        onnx_bytes_equal = r.get("export_files", {}).get("model.onnx") == n.get("export_files", {}).get("model.onnx")
        ort_equal = r.get("onnxruntime") == n.get("onnxruntime")
        for field in sorted(set(r) | set(n)):
            a, b = r.get(field), n.get(field)
            eq = a == b
            verdict = "yes" if eq else "NO"
            if field == "export_files" and not eq:
                others_equal = all(a.get(k) == b.get(k) for k in set(a) | set(b) if k != "model.onnx")
                if not onnx_bytes_equal and ort_equal and others_equal:
                    verdict = "onnx bytes differ, onnxruntime outputs equal"
                    eq = True
            all_equal &= eq
            rows.append((fit, field, _short(a), _short(b), verdict))
            if not eq and isinstance(a, dict) and isinstance(b, dict):
                diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
                for k in diff[:12]:
                    rows.append((fit, f"  {field}[{k}]", _short(a.get(k), 24), _short(b.get(k), 24), "NO"))
                if len(diff) > 12:
                    rows.append((fit, f"  {field}: {len(diff) - 12} more", "", "", "NO"))
    head = ("fit", "field", "reference", "now", "equal?")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(5)]
    for row in [head, tuple("-" * w for w in widths), *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return all_equal


# ----------------------------------------------------------------------------------------------- main
def _commit(repo: Path) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "src", "conf"],
                               cwd=repo, capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+dirty(src)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", metavar="OUT.json", help="run the fits and write their fingerprints")
    mode.add_argument("--check", metavar="REF.json", help="run the fits and compare with a recorded reference")
    p.add_argument("--fits", default=",".join(FITS), help="comma-separated: digits,cifar (default: both)")
    p.add_argument("--cifar10", default=os.environ.get("SDQ_CIFAR10_ROOT") or os.environ.get("CIFAR10_ROOT"),
                   help="CIFAR-10 ImageFolder tree (train/, test/); default $SDQ_CIFAR10_ROOT or $CIFAR10_ROOT")
    p.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                   help="checkout whose src/, tests/ and checkpoints/ are used (default: this one)")
    p.add_argument("--work", default=None, help="scratch folder (default: REPO/outputs/behaviour_identity)")
    p.add_argument("--kernels", default="eager", choices=("eager", "compile", "auto"),
                   help="the LSQ kernels of both fits (default eager)")
    p.add_argument("--cifar-subset", type=int, default=1500, help="training images of the cifar fit (default 1500)")
    args = p.parse_args(argv)

    os.environ["SDQ_KERNELS"] = args.kernels  # the process default of the LSQ kernels, here and in the app
    repo = Path(args.repo).resolve()
    fits = [f.strip() for f in args.fits.split(",") if f.strip()]
    bad = [f for f in fits if f not in FITS]
    if bad:
        p.error(f"unknown fit(s) {bad}; choose from {FITS}")
    sys.path[:0] = [str(repo / "src"), str(repo / "tests")]
    import sdq_lightning

    if repo not in Path(sdq_lightning.__file__).resolve().parents:
        p.error(f"sdq_lightning was imported from {sdq_lightning.__file__}, not from {repo}/src")
    import lightning
    import onnxruntime
    import torch

    work = Path(args.work).resolve() if args.work else repo / "outputs" / "behaviour_identity"
    result: dict[str, Any] = {
        "meta": {"commit": _commit(repo), "torch": torch.__version__, "lightning": lightning.__version__,
                 "onnxruntime": onnxruntime.__version__, "kernels": args.kernels, "cifar_subset": args.cifar_subset},
        "fits": {}}
    timings: dict[str, float] = {}
    for fit in fits:
        folder = work / fit
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        t0 = time.perf_counter()
        if fit == "cifar" and (not args.cifar10 or not (Path(args.cifar10) / "train").is_dir()):
            print(f"cifar fit skipped: no CIFAR-10 ImageFolder tree (give --cifar10 ROOT or set SDQ_CIFAR10_ROOT; "
                  f"got {args.cifar10!r})", file=sys.stderr)
            continue
        try:
            if fit == "digits":
                result["fits"][fit] = fit_digits(folder)
            else:
                result["fits"][fit] = fit_cifar(folder, repo, str(Path(args.cifar10).resolve()), args.cifar_subset)
        except (Exception, SystemExit) as err:  # noqa: BLE001 - a fit that no longer runs is a difference too
            if args.record:
                raise
            import traceback

            traceback.print_exc()
            result["fits"][fit] = {"fit_error": f"{type(err).__name__}: {err}"}
        timings[fit] = time.perf_counter() - t0
        print(f"[behaviour_identity] {fit}: {timings[fit]:.1f} s (sdq_lightning from {repo}/src)", flush=True)

    if args.record:
        Path(args.record).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        print(f"fingerprints of {list(result['fits'])} written to {args.record}")
        return 0
    ref = json.loads(Path(args.check).read_text())
    print(f"reference {args.check}: commit {ref['meta'].get('commit')}; now: commit {result['meta']['commit']}")
    for key in ("torch", "lightning", "onnxruntime", "kernels", "cifar_subset"):
        if ref["meta"].get(key) != result["meta"].get(key):
            print(f"note: {key} differs: reference {ref['meta'].get(key)}, now {result['meta'].get(key)}")
    same = compare(ref, result, [f for f in fits if f in result["fits"]])
    print("behaviour identical" if same else "behaviour DIFFERS (rows marked NO)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
