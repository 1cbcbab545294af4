"""Run directories: atomic checksummed checkpoints, corrupt-file skipping, full disk, NaN stop,
metrics files."""

from __future__ import annotations

import errno

import pytest
import torch

import tdmpc_opt.runs as runs
from tdmpc_opt.runs import RunDir, RunError, TrainingDiverged, check_finite


def _state(v: float) -> dict:
    return {"w": torch.full((64,), v), "step": int(v), "nested": {"rng": "x"}}


def test_checkpoint_round_trip_and_pruning(tmp_path):
    run = RunDir(tmp_path / "r", keep=2)
    for s in (1, 2, 3):
        run.save_checkpoint(s, _state(s))
    path, state = run.latest_checkpoint()
    assert path.name == "step-00000003.pt" and state["step"] == 3
    assert sorted(p.name for p in run.ckpt_dir.glob("*.pt")) == ["step-00000002.pt",
                                                                  "step-00000003.pt"]
    assert not list(run.ckpt_dir.glob(".*tmp*"))


def test_corrupt_newest_checkpoint_is_skipped(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, _state(1))
    newest = run.save_checkpoint(2, _state(2))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="step-00000002.pt: checksum mismatch"):
        path, state = run.latest_checkpoint()
    assert state["step"] == 1


def test_interrupted_checkpoint_without_checksum_is_skipped(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, _state(1))
    run.save_checkpoint(2, _state(2)).with_suffix(".json").unlink()
    with pytest.warns(UserWarning, match="checksum file is missing"):
        assert run.latest_checkpoint()[1]["step"] == 1


def test_a_checkpoint_never_appears_before_its_checksum(tmp_path, monkeypatch):
    """A process killed between the two renames of a save must not leave a .pt without its
    checksum (every resume would skip it; a run whose only checkpoint it is was refused)."""
    seen = []

    def recording_write(path, write):
        if path.suffix == ".pt":
            seen.append(path.with_suffix(".json").exists())
        real_atomic_write(path, write)

    real_atomic_write = runs.atomic_write
    monkeypatch.setattr(runs, "atomic_write", recording_write)
    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, _state(1))
    run.save_checkpoint(2, _state(2))
    assert seen == [True, True]


def test_checksum_left_by_a_killed_save_is_ignored_and_pruned(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, _state(1))
    orphan = run.save_checkpoint(2, _state(2))
    orphan.unlink()  # killed after the checksum's rename, before the checkpoint's
    path, state = run.latest_checkpoint()
    assert state["step"] == 1
    run.save_checkpoint(3, _state(3))
    assert not orphan.with_suffix(".json").exists()
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == [
        "step-00000001.json", "step-00000001.pt", "step-00000003.json", "step-00000003.pt"]


def test_first_save_killed_before_the_checkpoint_starts_over(tmp_path):
    run = RunDir(tmp_path / "r")
    run.save_checkpoint(1, _state(1)).unlink()
    assert run.latest_checkpoint() is None


def test_no_checkpoint(tmp_path):
    assert RunDir(tmp_path / "r").latest_checkpoint() is None


def test_full_disk_keeps_previous_checkpoint(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "r")
    good = run.save_checkpoint(10, _state(10))

    def full_disk(path, data):
        with open(path, "wb") as fh:
            fh.write(data[: len(data) // 3])  # part of it got written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs, "_write_bytes", full_disk)
    with pytest.raises(RunError, match=r"step-00000020.pt \(disk full\); the last good "
                                       r"checkpoint is .*step-00000010.pt"):
        run.save_checkpoint(20, _state(20))
    monkeypatch.undo()
    assert sorted(p.name for p in run.ckpt_dir.iterdir()) == ["step-00000010.json",
                                                              "step-00000010.pt"]
    path, state = run.latest_checkpoint()
    assert path == good and state["step"] == 10


def test_nan_loss_names_step_and_checkpoint(tmp_path):
    run = RunDir(tmp_path / "r")
    check_finite({"reward_loss": 1.0}, 5, run)
    with pytest.raises(TrainingDiverged, match="step 7: value_loss is NaN or Inf; no checkpoint"):
        check_finite({"reward_loss": 1.0, "value_loss": float("nan")}, 7, run)
    run.save_checkpoint(6, _state(6))
    with pytest.raises(TrainingDiverged, match="last good checkpoint: .*step-00000006.pt"):
        check_finite({"pi_loss": float("inf")}, 9, run)


def test_metrics_csv_grows_and_truncates(tmp_path):
    run = RunDir(tmp_path / "r")
    run.log("train", 1, {"a": 1.0})
    run.log("train", 2, {"a": 2.0, "b": 3.0})
    run.log("train", 3, {"a": 4.0})
    lines = (tmp_path / "r" / "train.csv").read_text().splitlines()
    assert lines == ["step,a,b", "1,1.0,", "2,2.0,3.0", "3,4.0,"]
    run.truncate_metrics(2)
    assert (tmp_path / "r" / "train.csv").read_text().splitlines()[-1] == "2,2.0,3.0"


def test_config_json(tmp_path):
    run = RunDir(tmp_path / "r")
    run.write_config({"train": {"lr": 3e-4}})
    assert run.read_config() == {"train": {"lr": 3e-4}}
