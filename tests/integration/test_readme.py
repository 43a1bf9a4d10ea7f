"""Every fenced code block of README.md runs here, or composes, or is on a short skip list with the reason.

- ``python`` blocks are executed in a temporary folder. The Lightning block gets ``user_module`` (an
  :class:`SDQClassifier` on digits), ``datamodule`` (digits) and ``checkpoints/my_fp_model.ckpt`` (a digits teacher),
  and ``lightning.Trainer`` is limited to 2 training batches and 1 validation batch per epoch.
- ``bash`` blocks are split into commands (comments dropped, ``\\`` continuations joined). ``sdq-train`` /
  ``python -m sdq_lightning.train`` lines with ``--cfg`` run in a subprocess; other app lines are composed through
  Hydra's compose API with the app's config (``-m`` sweeps are expanded into their jobs; a bare ``...`` in the
  README means "your other arguments" and is dropped). ``make X`` lines run as ``make -n X`` (the recipe exists and
  parses; ``make demo`` itself runs in the demo test).
- Anything else fails, naming the command, so that a new README block gets a handler or a skip reason here.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import sdq_lightning

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
SRC = Path(sdq_lightning.__file__).resolve().parents[1]
CONF_DIR = Path(sdq_lightning.__file__).resolve().parent / "conf"
APP = ("sdq-train", "python -m sdq_lightning.train")

# substring of a command -> why it cannot run here
SKIP = {
    "pip install": "needs the network (package index)",
    "sdq-export": "needs a finished run folder; tests/export/test_app_export.py runs sdq-export end to end",
    "sdq-plan": "needs the CIFAR-10 root; tests/integration/test_plan_cli.py runs sdq-plan end to end on digits",
    "source .venv/bin/activate": "a shell's state; .ci/readme_quickstart.sh runs the Getting started block as written",
    "export SDQ_CIFAR10_ROOT=": "a shell variable; .ci/readme_quickstart.sh keeps CI's value",
}
# README commands that fail today, each reported to the lead; the test checks they still fail, so a fix is noticed
# (then delete the entry).
KNOWN_FAILURES: dict[str, str] = {}  # command fragment -> why it still fails (none now)


def readme_blocks() -> list[tuple[int, str, str]]:
    """(line number, language, code) of every fenced block."""
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```(\w*)[^\n]*\n(.*?)^```", text, re.S | re.M):
        blocks.append((text[: m.start()].count("\n") + 1, m.group(1), m.group(2)))
    return blocks


BLOCKS = readme_blocks()


def shell_commands(code: str) -> list[str]:
    """Logical lines without comments; backslash continuations joined."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            commands.append(" ".join(shlex.quote(t) for t in tokens))
    return commands


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra's basic-sweeper expansion of ``key=a,b,c`` (no brackets or quotes) into one override list per job."""
    choices = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if eq and "," in value and not re.search(r"[\[\]{}()'\"]", value):
            choices.append([f"{key}={v}" for v in value.split(",")])
        else:
            choices.append([o])
    return [list(job) for job in itertools.product(*choices)]


def app_args(command: str) -> list[str] | None:
    for prefix in APP:
        if command == prefix or command.startswith(prefix + " "):
            return [t for t in shlex.split(command[len(prefix):]) if t != "..."]
    return None


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               WANDB_MODE="offline", WANDB_SILENT="true")
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def check_app_command(args: list[str], tmp_path: Path) -> None:
    if "--cfg" in args or "-c" in args:
        proc = subprocess.run([sys.executable, "-m", "sdq_lightning.train", *args], cwd=tmp_path,
                              env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"sdq-train {' '.join(args)}: {proc.stderr[-2000:]}"
        assert "model:" in proc.stdout and "hardware:" in proc.stdout
        return
    multirun = "-m" in args or "--multirun" in args
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    jobs = expand_sweep(overrides) if multirun else [overrides]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            cfg = compose("train", overrides=job, return_hydra_config=multirun or any(a.startswith("hydra.")
                                                                                       for a in job))
            assert cfg.model.backbone and cfg.hardware.metric, job


def check_shell_block(code: str, tmp_path: Path) -> None:
    for command in shell_commands(code):
        reason = next((why for key, why in SKIP.items() if key in command), None)
        if reason is not None:
            continue
        args = app_args(command)
        known = next((why for key, why in KNOWN_FAILURES.items() if key in command), None)
        if args is not None and known is not None:
            with pytest.raises(AssertionError):
                check_app_command(args, tmp_path)
        elif args is not None:
            check_app_command(args, tmp_path)
        elif command.startswith("make "):
            proc = subprocess.run(["make", "-n", *shlex.split(command)[1:]], cwd=REPO, capture_output=True, text=True,
                                  timeout=60)
            assert proc.returncode == 0, f"{command}: {proc.stderr[-1000:]}"
        else:
            pytest.fail(f"README command not handled by test_readme.py (add a handler or a SKIP reason): {command}")


def lightning_prelude(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """``user_module``, ``datamodule`` and the teacher checkpoint the Lightning block names; a tiny Trainer."""
    import lightning

    from sdq_lightning import SDQClassifier
    from sdq_lightning.data import DigitsDataModule

    real = lightning.Trainer
    tiny = functools.partial(real, limit_train_batches=2, limit_val_batches=1, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", devices=1, default_root_dir=str(tmp_path))
    lightning.seed_everything(0, verbose=False)
    teacher = SDQClassifier("digits_cnn", in_chans=1, lr=0.05)
    datamodule = DigitsDataModule(batch_size=32)
    trainer = tiny(max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(teacher, datamodule=datamodule)
    (tmp_path / "checkpoints").mkdir()
    trainer.save_checkpoint(tmp_path / "checkpoints" / "my_fp_model.ckpt")
    monkeypatch.setattr(lightning, "Trainer", tiny)
    return {"user_module": SDQClassifier("digits_cnn", in_chans=1, lr=0.05), "datamodule": datamodule}


def reload_prelude(tmp_path: Path) -> dict:
    """For the reload/export block: a user's own LightningModule class (``LitNet``: helpers.user_module.UserNet)
    trained with SDQ for a few batches and saved as ``checkpoints/last.ckpt``, and an input batch ``x``."""
    import lightning.pytorch as pl

    from helpers.data import digits_signed, digits_signed_loader
    from helpers.user_module import UserNet

    pl.seed_everything(0, verbose=False)
    sdq = sdq_lightning.SDQ(weight_bits=(2, 4, 8), activation_bits=4, budget={"metric": "avg_bits", "target": 3.0},
                            search_epochs=1, runtime={"kernels": "eager", "save_dir": tmp_path})
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=2, callbacks=[sdq], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)
    trainer.fit(UserNet(), digits_signed_loader())
    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    return {"LitNet": UserNet, "x": digits_signed(8)[0]}


def check_python_block(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    namespace: dict = {"__name__": "readme_block"}
    if "user_module" in code:
        namespace.update(lightning_prelude(tmp_path, monkeypatch))
    if "load_quantized(" in code:
        namespace.update(reload_prelude(tmp_path))
    exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - the README's own examples
    return namespace


def _param(line: int, lang: str, code: str):
    slow = lang == "python" and ("user_module" in code or "load_quantized(" in code) or "--cfg" in code
    return pytest.param(lang, code, id=f"line{line}-{lang or 'text'}", marks=[pytest.mark.slow] if slow else [])


def test_readme_has_blocks() -> None:
    langs = [lang for _, lang, _ in BLOCKS]
    assert langs.count("python") >= 2 and langs.count("bash") >= 4, langs


@pytest.mark.parametrize(("lang", "code"), [_param(*b) for b in BLOCKS])
def test_readme_block(lang: str, code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SDQ_OUTPUT_DIR", str(tmp_path / "outputs"))
    if lang == "python":
        namespace = check_python_block(code, tmp_path, monkeypatch)
        if "sdq" in namespace and getattr(namespace["sdq"], "plan", None) is not None:
            budget = namespace["sdq"].budget
            assert namespace["sdq"].plan.cost(budget.metric) <= budget.target * (1 + 1e-9)
            assert list(tmp_path.rglob("plan.yaml")), "the Lightning block says plan.yaml is written"
        if "plan" in namespace and "plan.save" in code:
            assert (tmp_path / "plan.yaml").is_file()
    elif lang in ("bash", "sh", "shell", "console"):
        check_shell_block(code, tmp_path)
    elif lang in ("", "text", "yaml"):
        pytest.skip("not a command: output or a file excerpt")
    else:
        pytest.fail(f"README block in language {lang!r} is not handled by test_readme.py")


@pytest.mark.parametrize(("command", "expected"), [
    ("sdq-train a=1 b=2,3  # note", ["sdq-train a=1 b=2,3"]),
    ("x \\\n  y\n# only a comment\n", ["x y"]),
])
def test_shell_commands(command, expected) -> None:
    assert shell_commands(command) == expected


def test_expand_sweep_and_ellipsis() -> None:
    assert expand_sweep(["e=x", "t=2,3", "w=[1,2]"]) == [["e=x", "t=2", "w=[1,2]"], ["e=x", "t=3", "w=[1,2]"]]
    assert app_args("sdq-train phase=train phase.plan=p.yaml ...") == ["phase=train", "phase.plan=p.yaml"]
    assert app_args("make demo") is None


def test_unhandled_command_fails(tmp_path) -> None:
    with pytest.raises(pytest.fail.Exception, match="not handled by test_readme.py .*: rm -rf x"):
        check_shell_block("rm -rf x\n", tmp_path)
