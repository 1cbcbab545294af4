"""Writing datasets never destroys what it must not: inputs, unrelated folders, the current
folder, an old dataset being replaced; bad output options are one line before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from official_layout import make_episodes, write_official
from tdmpc_opt.checkpoints import save_checkpoint
from tdmpc_opt.cli import collect as collect_cli
from tdmpc_opt.cli import data as data_cli
from tdmpc_opt.cli import main
from tdmpc_opt.config import model_config_for
from tdmpc_opt.data import Dataset, DatasetWriter
from tdmpc_opt.world_model import WorldModel

TASKS = "walker-walk,cartpole-balance,pendulum-swingup"


@pytest.fixture
def src(tmp_path):
    """A folder of two small files in the published layout (3 tasks, 4 + 3 episodes)."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i, n in enumerate((4, 3)):
        write_official(folder / f"chunk_{i}.pt", *make_episodes(n, 6, 24, 6, 3, seed=i))
    return folder


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny three-task model (random weights); nothing here runs it in an environment."""
    cfg = model_config_for(tuple(TASKS.split(",")), None, enc_dim=32, mlp_dim=32,
                           latent_dim=16, task_dim=8, num_q=2, simnorm_dim=8)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, WorldModel(cfg))
    return str(path)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes."""
    return {str(f.relative_to(folder)): f.read_bytes()
            for f in sorted(folder.rglob("*")) if f.is_file()}


def _convert(src, out, *extra) -> int:
    return main(["data", "convert", str(src), "--out", str(out), "--tasks", TASKS, "--quiet",
                 *extra])


def _collect(ckpt, out, *extra) -> int:
    return main(["collect", "--checkpoint", ckpt, "--tasks", "cartpole-balance", "--episodes",
                 "1", "--max-steps", "2", "--policy", "--out", str(out), *extra])


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


def _dataset(tmp_path, name="old", episodes=2) -> Path:
    """A small dataset made with the writer; its obs are all 7."""
    w = DatasetWriter(tmp_path / name, ("a", "b"), 2, 1)
    w.add_episodes(np.full((episodes, 3, 2), 7.0), np.zeros((episodes, 3, 1)),
                   np.zeros((episodes, 3)), np.zeros(episodes, int))
    return w.close().path


# ------------------------------------------------------------------ 1. output among inputs
@pytest.mark.parametrize("which", ["folder", "file", "parent"])
def test_convert_refuses_an_output_that_is_or_holds_an_input(src, capsys, which):
    before = _snapshot(src.parent)
    args = {"folder": (src, src), "file": (src / "chunk_0.pt", src),
            "parent": (src, src.parent)}[which]
    assert _convert(*args, "--overwrite") == 2
    _one_line_error(capsys, "the input", "apart from the inputs")
    assert _snapshot(src.parent) == before


def test_convert_into_a_folder_beside_the_inputs_is_fine(src):
    assert _convert(src, src / "ds") == 0  # the inputs are not inside the output
    assert Dataset(src / "ds").num_episodes == 7 and len(list(src.glob("*.pt"))) == 2


# -------------------------------------------------- 2. --overwrite replaces only datasets
def test_overwrite_refuses_a_folder_of_other_files(src, ckpt, tmp_path, capsys):
    precious = tmp_path / "precious"
    (precious / "sub").mkdir(parents=True)
    (precious / "notes.txt").write_text("mine")
    (precious / "sub" / "data.bin").write_bytes(b"\1\2")
    before = _snapshot(precious)
    assert _collect(ckpt, precious, "--overwrite") == 2
    _one_line_error(capsys, "not a tdmpc-opt dataset (it holds notes.txt)",
                    "only an empty folder or a dataset")
    assert _convert(src, precious, "--overwrite") == 2
    _one_line_error(capsys, "not a tdmpc-opt dataset")
    assert _snapshot(precious) == before


def test_overwrite_refuses_a_dataset_with_other_files_or_no_meta(tmp_path, capsys, src):
    ds = _dataset(tmp_path)
    (ds / "README").write_text("keep")
    assert _convert(src, ds, "--overwrite") == 2
    _one_line_error(capsys, "it holds README")
    assert (ds / "README").read_text() == "keep" and Dataset(ds).num_episodes == 2
    lone = tmp_path / "lone"
    lone.mkdir()
    np.save(lone / "obs.npy", np.ones(3))
    (lone / "meta.json").write_text(json.dumps({"format": "something-else"}))
    assert _convert(src, lone, "--overwrite") == 2
    _one_line_error(capsys, "its meta.json is not a dataset's")
    assert np.load(lone / "obs.npy").tolist() == [1, 1, 1]


def test_overwrite_replaces_an_empty_folder_or_a_dataset(src, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert _convert(src, tmp_path / "empty", "--overwrite") == 0
    old = _dataset(tmp_path)
    assert _convert(src, old) == 2  # without --overwrite
    _one_line_error(capsys, "already exists")
    assert _convert(src, old, "--overwrite") == 0
    assert Dataset(old).num_episodes == 7 and Dataset(tmp_path / "empty").num_episodes == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "old", "src"]


def test_a_failing_overwrite_keeps_the_old_dataset(tmp_path, monkeypatch):
    old = _dataset(tmp_path)
    before = _snapshot(old)
    rename = Path.rename

    def fail_on_partial(self, target):
        if self.name.endswith(".partial"):
            raise OSError(28, "No space left on device")
        return rename(self, target)

    w = DatasetWriter(old, ("x",), 3, 1, overwrite=True)
    w.add_episodes(np.zeros((1, 4, 3)), np.zeros((1, 4, 1)), np.zeros((1, 4)), [0])
    monkeypatch.setattr(Path, "rename", fail_on_partial)
    with pytest.raises(OSError, match="No space"), w:
        w.close()  # the new dataset is complete, moving it into place fails
    assert _snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


# --------------------------------------------------------------- 3. numeric options
@pytest.mark.parametrize("chunk", ["0", "-1", "two"])
def test_convert_chunk_must_be_positive(src, tmp_path, capsys, chunk):
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit
        _convert(src, tmp_path / "o", "--chunk", chunk)
    assert exit_.value.code == 2
    _one_line_error(capsys, "--chunk")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------- 4. the current folder or one above it
def test_overwrite_refuses_the_current_folder_and_its_ancestors(ckpt, src, tmp_path,
                                                                 monkeypatch, capsys):
    here = tmp_path / "a" / "b"
    here.mkdir(parents=True)
    (here / "keep.txt").write_text("keep")
    monkeypatch.chdir(here)
    before = _snapshot(tmp_path)
    for out in (".", "/"):
        assert _collect(ckpt, out, "--overwrite") == 2
        _one_line_error(capsys, "the current folder or one above it")
    for out in ("..", str(tmp_path / "a")):
        assert _convert(src, out, "--overwrite") == 2
        _one_line_error(capsys, "the current folder or one above it")
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------- 5. a folder that cannot be created
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_that_cannot_be_created_is_one_line_before_any_work(src, tmp_path, capsys,
                                                                       monkeypatch):
    monkeypatch.setattr("tdmpc_opt.data.read_official",
                        lambda *a, **k: pytest.fail("read an input before checking --out"))
    assert _convert(src, "/proc/x/d") == 2
    _one_line_error(capsys, "cannot write /proc/x/d", "cannot create a folder in /proc")
    # before the checkpoint is even looked at
    assert _collect(str(tmp_path / "no-such.pt"), "/proc/x/d") == 2
    _one_line_error(capsys, "cannot write /proc/x/d")


# -------------------------------------------------------------------- 6. Ctrl-C notes
def test_interrupted_convert_says_what_is_left(src, tmp_path, capsys, monkeypatch):
    old = _dataset(tmp_path)
    before = _snapshot(old)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(DatasetWriter, "add_episodes", interrupt)
    assert _convert(src, old, "--overwrite") == 130
    err = capsys.readouterr().err.strip()
    assert err == data_cli.INTERRUPTED and "nothing was written" in err
    assert _snapshot(old) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old", "src"]  # no partial output


def test_interrupted_collect_keeps_its_episodes_and_finishes_the_same(ckpt, tmp_path, capsys,
                                                                      monkeypatch):
    """Ctrl-C after 3 of 6 episodes: they are kept beside the output (no dataset yet); the same
    command collects only the other 3 and writes the dataset an uninterrupted run writes; a
    run with another seed is refused while the interrupted one is there; more --episodes add
    to what is kept."""
    def collect(out, episodes="3", *extra):
        return main(["collect", "--checkpoint", ckpt, "--tasks", "cartpole-balance,walker-walk",
                     "--episodes", episodes, "--max-steps", "3", "--policy", "--explore",
                     "--batch", "1", "--out", str(out), *extra])

    assert collect(tmp_path / "straight") == 0
    capsys.readouterr()
    store = tmp_path / ".ds.collecting"
    add, added = collect_cli.EpisodeStore.add, []

    def add_then_interrupt(self, res):
        add(self, res)
        added.append(res.episode)
        if len(added) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(collect_cli.EpisodeStore, "add", add_then_interrupt)
    assert collect(tmp_path / "ds") == 130
    assert capsys.readouterr().err.strip() == collect_cli.INTERRUPTED
    assert not (tmp_path / "ds").exists() and len(list(store.glob("*.npz"))) == 3
    monkeypatch.undo()
    assert collect(tmp_path / "ds", "3", "--seed", "1") == 2
    _one_line_error(capsys, "other settings (seed)", str(store))
    ran = []
    monkeypatch.setattr(collect_cli.EpisodeStore, "add",
                        lambda self, res: ran.append(res) or add(self, res))
    assert collect(tmp_path / "ds") == 0
    assert "continuing: 3 of 6 episodes were collected before" in capsys.readouterr().out
    assert len(ran) == 3 and not store.exists()
    assert _snapshot(tmp_path / "ds") == _snapshot(tmp_path / "straight")
    # more episodes than an interrupted run asked for: its episodes count
    monkeypatch.setattr(collect_cli.EpisodeStore, "add", add_then_interrupt)
    added.clear()
    assert collect(tmp_path / "more", "4") == 130
    monkeypatch.undo()
    assert collect(tmp_path / "more", "5") == 0
    assert Dataset(tmp_path / "more").num_episodes == 10 and not (
        tmp_path / ".more.collecting").exists()
    # each episode leaves memory once kept: the results the rollouts return hold no steps
    import tdmpc_opt.backends as backends

    real, returned = backends.run_rollouts, []
    monkeypatch.setattr(backends, "run_rollouts",
                        lambda *a, **k: returned.extend(real(*a, **k)) or returned)
    assert collect(tmp_path / "mem") == 0
    assert len(returned) == 6 and all(r.trajectory is None for r in returned)


# ------------------------------------------------------------ 7. a short task message
def test_collect_names_a_few_unknown_tasks(ckpt, tmp_path, capsys):
    assert main(["collect", "--checkpoint", ckpt, "--tasks", "mt80", "--episodes", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = _one_line_error(capsys, "not trained on", "and 74 more", "tdmpc-opt info")
    assert len(err) < 300, err
    assert not (tmp_path / "o").exists()
