"""The app as a newcomer meets it: sweeps checked job by job before any starts and summarised when a later job fails;
a run of several models names each stage on its bar, prints its folder first, keeps the search in its report and
prints none of the libraries' noise."""

from __future__ import annotations

import logging

import pytest

from app_helpers import TINY, run_cli
from sdq_lightning.cli.precheck import sweep_jobs

BASE = ["experiment=digits_demo", "compare.enabled=false", "fp_teacher.enabled=false"]
NOISE = ("weights_only", "litlogger", "LeafSpec", "No CUDA runtime")


def test_sweep_jobs_are_hydras_grid() -> None:
    jobs, whole = sweep_jobs(["experiment=x", "a=1,2", "b=3,4"])
    assert whole and jobs == [["experiment=x", "a=1", "b=3"], ["experiment=x", "a=1", "b=4"],
                              ["experiment=x", "a=2", "b=3"], ["experiment=x", "a=2", "b=4"]]
    jobs, whole = sweep_jobs(["a=range(0,10)", "b=range(0,10)"])  # 100 jobs: each value once
    assert not whole and len(jobs) == 20 and ["a=5", "b=0"] in jobs and ["a=0", "b=7"] in jobs


def test_a_bad_sweep_job_is_refused_before_the_first_job_starts(tmp_path, monkeypatch, capsys) -> None:
    from sdq_lightning.cli.train import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    with pytest.raises(SystemExit) as exit_info:
        main(["-m", *BASE, "hardware.target=2,1.0"])
    assert exit_info.value.code == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: sweep job 1 (hardware.target=1.0): impossible budget")
    assert lines[0].endswith("; no job was started")
    assert list(tmp_path.iterdir()) == []


def test_library_noise_is_dropped_from_the_apps_logs() -> None:
    from sdq_lightning.utils.logging import quiet_library_noise

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    quiet_library_noise()
    for name, message in (("torch.utils.cpp_extension", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"),
                          ("lightning.pytorch.utilities.rank_zero", "💡 Tip: For seamless cloud logging ..."),
                          ("lightning.pytorch.utilities.rank_zero", "GPU available: False, used: False")):
        logger = logging.getLogger(name)
        handler = Keep()
        logger.addHandler(handler)
        try:
            logger.warning(message)
        finally:
            logger.removeHandler(handler)
    assert seen == ["GPU available: False, used: False"]


TINY_NO_BATCH = [o for o in TINY if not o.startswith("dataset.batch_size=")]


@pytest.mark.slow
def test_a_failing_sweep_job_leaves_the_summary_of_the_finished_ones(tmp_path) -> None:
    # a batch size of 0 is only refused by the data loader, inside the second job
    proc = run_cli(["-m", *BASE, *TINY_NO_BATCH, "dataset.batch_size=16,0"], tmp_path, timeout=400)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and "batch_size" in errors[0] and "Traceback" not in proc.stderr
    (sweep,) = (tmp_path / "outputs" / "multirun" / "digits_demo").iterdir()
    summary = (sweep / "sweep_summary.md").read_text()
    assert "1 runs in" in summary and "dataset.batch_size=16" in summary
    assert f"sweep summary of the jobs that finished: {sweep / 'sweep_summary.md'}" in proc.stdout


@pytest.mark.slow
def test_a_run_of_several_models_names_its_stages_and_keeps_its_search_trace(tmp_path) -> None:
    args = ["experiment=digits_demo", *[o for o in TINY if o != "trainer.enable_progress_bar=false"]]
    proc = run_cli(args, tmp_path, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs" / "runs" / "digits_demo").iterdir()
    out = proc.stdout
    first = out.index(f"run folder: {run_dir}")
    assert first < out.index("FP teacher: Epoch ") < out.index("SDQ: Epoch ") < out.index("uniform 1-bit: Epoch "), out
    report = (run_dir / "report.md").read_text()
    assert "## FP vs SDQ vs uniform" in report and "![search trace](plots/search_trace.png)" in report
    for noise in NOISE:
        assert noise not in out + proc.stderr, noise


def test_gpu_scripts_and_their_docs_speak_of_this_project_only() -> None:
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    files = [*repo.glob("experiments/*.sh"), *repo.glob("benchmarks/*.sh"), repo / "experiments" / "README.md",
             repo / "benchmarks" / "README.md"]
    foreign = ("run(command", "carry", "device call", "device tool", "give_back", ".library", "KINDS.md")
    found = {f"{path.relative_to(repo)}: {word}" for path in files for word in foreign
             if word in path.read_text()}
    assert not found, sorted(found)
    readme = (repo / "experiments" / "README.md").read_text()
    assert "make install" in readme and "CIFAR10_ROOT=/path/to/cifar10 bash experiments/gpu_cifar10_resnet20.sh" \
        in readme


def test_getting_started_names_the_venv_the_data_the_quick_preset_and_each_commands_time() -> None:
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    section = readme[readme.index("## Getting started"):readme.index("## Add SDQ to an existing Lightning project")]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    commands = [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
    assert commands[:2] == ["make install", "source .venv/bin/activate"]
    assert "export SDQ_CIFAR10_ROOT=/path/to/cifar10" in commands
    assert "sdq-train experiment=cifar10_quick dataset.root=$SDQ_CIFAR10_ROOT" in commands
    timed = re.findall(r"^\| `([^`]+)` \| ([^|]+) \|$", section, re.M)
    assert {c for c, _ in timed} >= {c for c in commands if not c.startswith(("source", "export"))}, timed
    assert all(re.search(r"\d", t) for _, t in timed), timed  # a measured figure, not a placeholder
    assert "**DBP** (Differentiable Bitwidth Parameter)" in section
    assert "bash .ci/readme_quickstart.sh" in (repo / ".ci" / "run").read_text()
