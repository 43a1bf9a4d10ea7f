"""SyncAudit (issue 14): counts synchronising calls by call site inside its window, and only there.

Without a GPU the CUDA debug mode cannot fire, so the test switches it off (monkeypatched) and raises the warning that
``torch.cuda.set_sync_debug_mode("warn")`` raises (its text), from a named function, at known steps."""

from __future__ import annotations

import json
import types
import warnings

import pytest
import torch

from sdq_lightning.utils.sync_audit import SyncAudit

MESSAGE = "called a synchronizing CUDA operation"


def reads_the_device() -> None:
    warnings.warn(MESSAGE, UserWarning)


def test_counts_syncs_by_site_inside_the_window_only(monkeypatch, tmp_path):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: modes.append(mode))
    audit = SyncAudit(start=2, steps=3, out=str(tmp_path / "audit.json"))
    module = types.SimpleNamespace(device=torch.device("cuda"))
    trainer = types.SimpleNamespace(log_dir=None, is_global_zero=True)
    for step in range(8):
        audit.on_train_batch_start(trainer, module, None, step)
        reads_the_device()  # one sync per step, at every step
        if step == 3:
            reads_the_device()  # one more inside the window
    audit.on_fit_end(trainer, module)
    assert modes == ["warn", "default"]
    assert audit.steps_audited == 3
    assert sum(audit.counts.values()) == 4  # steps 2, 3 (twice) and 4; none before or after
    assert sorted(audit.counts.values()) == [1, 3]  # two call sites: the every-step one and the extra one
    assert all(site.startswith("unit/test_sync_audit.py:") and "reads_the_device" in site for site in audit.counts)
    saved = json.loads((tmp_path / "audit.json").read_text())
    assert saved["total"] == 4 and saved["steps"] == 3 and saved["sites"][0]["per_step"] == pytest.approx(1.0)
    with warnings.catch_warnings(record=True) as caught:  # the audit restored the warning machinery
        warnings.simplefilter("always")
        warnings.warn("an unrelated warning", UserWarning)
    assert [str(w.message) for w in caught] == ["an unrelated warning"]


def test_without_cuda_it_does_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda mode: pytest.fail("must not switch on CPU"))
    audit = SyncAudit(start=0, steps=2)
    module = types.SimpleNamespace(device=torch.device("cpu"))
    for step in range(4):
        audit.on_train_batch_start(None, module, None, step)
    assert audit.steps_audited == 0 and not audit.counts


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="steps > 0"):
        SyncAudit(steps=0)
