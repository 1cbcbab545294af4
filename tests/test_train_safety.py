"""Training, distillation and pipeline safety: resuming refuses what would lose or mix up a run,
every bad setting is one line before any work, and notes are accurate."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

import tdmpc_opt.cli.distill as distill_cli
import tdmpc_opt.cli.train as train_cli
from official_layout import make_episodes, write_official
from tdmpc_opt.checkpoints import save_checkpoint
from tdmpc_opt.cli import main
from tdmpc_opt.config import PlannerConfig, model_config_for
from tdmpc_opt.errors import ConfigError, TaskError
from tdmpc_opt.pipeline import Pipeline, load_config
from tdmpc_opt.runs import CheckpointSkipped, RunDir
from tdmpc_opt.tasks import get_task
from tdmpc_opt.world_model import WorldModel

TASKS = "walker-walk,cartpole-balance,pendulum-swingup"
TINY = ["enc_dim=32", "mlp_dim=32", "latent_dim=16", "num_q=2", "batch_size=16", "iterations=1",
        "num_samples=16", "num_elites=4", "num_pi_trajs=2", "eval_freq=0", "threads=1"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """A 12-episode three-task dataset in tdmpc-opt format."""
    tmp = tmp_path_factory.mktemp("data")
    for i in range(2):
        write_official(tmp / f"chunk_{i}.pt", *make_episodes(6, 12, 24, 6, 3, seed=i))
    assert main(["data", "convert", str(tmp), "--out", str(tmp / "ds"), "--tasks", TASKS,
                 "--quiet"]) == 0
    return tmp / "ds"


def _train(dataset: Path, run: Path, *items: str, resume: bool = False) -> int:
    argv = ["train", *TINY, *items, "--data", str(dataset), "--run-dir", str(run), "--quiet"]
    return main([*argv, "--resume"] if resume else argv)


def _error(capsys) -> str:
    """The one line a refused command printed to stderr (asserted to be one ``error:`` line)."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def _corrupt(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _state(step: int) -> dict:
    return {"w": torch.full((8,), float(step)), "step": step}


# ------------------------------------------------ 1. no readable checkpoint, pruning
def test_resume_refuses_a_run_whose_checkpoints_are_all_unreadable(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 0
    for pt in (run / "checkpoints").glob("step-*.pt"):
        _corrupt(pt)
    files = {f.name: f.read_bytes() for f in [*(run / "checkpoints").iterdir(),
                                              run / "model.safetensors", run / "config.json"]}
    capsys.readouterr()
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2", resume=True) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == (f"error: {run / 'checkpoints'}: none of its 2 checkpoints could be "
                         "read; move them away to start the run over, or choose another "
                         "--run-dir")
    assert {f.name: f.read_bytes() for f in [*(run / "checkpoints").iterdir(),
                                             run / "model.safetensors",
                                             run / "config.json"]} == files


def test_pruning_never_deletes_the_new_checkpoint_for_unreadable_ones(tmp_path):
    run = RunDir(tmp_path / "r", keep=3)
    for step in (1, 8, 9):
        run.save_checkpoint(step, _state(step))
    run = RunDir(tmp_path / "r", keep=2)  # resumed with keep_checkpoints=2
    for step in (8, 9):
        _corrupt(run.checkpoint_path(step))
    with pytest.warns(CheckpointSkipped) as caught:
        path, state = run.latest_checkpoint()
    assert [str(w.message) for w in caught] == [
        f"skipping checkpoint {run.checkpoint_path(s)}: checksum mismatch (corrupted)"
        for s in (9, 8)]
    assert state["step"] == 1
    run.save_checkpoint(2, _state(2))
    assert run.latest_checkpoint()[1]["step"] == 2
    run.save_checkpoint(3, _state(3))
    names = sorted(f.name for f in run.ckpt_dir.iterdir())
    assert names == ["step-00000002.json", "step-00000002.pt", "step-00000003.json",
                     "step-00000003.pt", "step-00000008.json.skipped", "step-00000008.pt.skipped",
                     "step-00000009.json.skipped", "step-00000009.pt.skipped"]


def test_pruning_leaves_higher_steps_alone_and_keeps_the_one_just_written(tmp_path):
    run = RunDir(tmp_path / "r", keep=1)
    run.save_checkpoint(10, _state(10))
    new = run.save_checkpoint(2, _state(2))
    assert new.is_file() and run.checkpoint_path(10).is_file()


def _model_tensors(path: Path) -> dict:
    from tdmpc_opt.checkpoints import read_state_dict

    return read_state_dict(path)[0]  # a training checkpoint: its world model's tensors


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_model_file_is_written_before_each_checkpoint(dataset, tmp_path, monkeypatch):
    """A kill between the two writes leaves the model file newer than the newest checkpoint
    (the resumed run writes it again), never older (nothing would write it again)."""
    import tdmpc_opt.trainer as trainer

    order = []
    save_model, save_checkpoint = trainer._save_model, RunDir.save_checkpoint
    monkeypatch.setattr(trainer, "_save_model",
                        lambda run, learner, step: (order.append(("model", step)),
                                                    save_model(run, learner, step)))
    monkeypatch.setattr(RunDir, "save_checkpoint",
                        lambda self, step, state: (order.append(("checkpoint", step)),
                                                   save_checkpoint(self, step, state))[1])
    assert _train(dataset, tmp_path / "run", "steps=4", "checkpoint_freq=2") == 0
    assert order == [("model", 2), ("checkpoint", 2), ("model", 4), ("checkpoint", 4)]


def test_a_finished_run_resumed_writes_its_final_model_again(dataset, tmp_path):
    """A run killed between its last checkpoint and its model file (the older write order)
    kept the model of the checkpoint before; resuming the finished run repairs it (the main
    job's intermittent INT8 difference: a distilled student one checkpoint behind)."""
    from tdmpc_opt.checkpoints import load_world_model

    run = tmp_path / "run"
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 0
    final = _model_tensors(run / "checkpoints" / "step-00000004.pt")
    assert _same(_model_tensors(run / "model.safetensors"), final)
    earlier, _ = load_world_model(run / "checkpoints" / "step-00000002.pt")
    save_checkpoint(run / "model.safetensors", earlier, extra={"step": 2})  # the killed state
    assert not _same(_model_tensors(run / "model.safetensors"), final)
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2", resume=True) == 0
    assert _same(_model_tensors(run / "model.safetensors"), final)


def test_a_training_checkpoint_loads_as_a_model_with_its_runs_settings(dataset, tmp_path,
                                                                        capsys):
    """``checkpoints/step-N.pt`` is a model for eval, info, quantize...: its world model with
    the run's config.json; moved away from its run, or not matching its checksum, one line."""
    import shutil

    from tdmpc_opt.checkpoints import describe, load_world_model

    run = tmp_path / "run"
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 0
    step4 = run / "checkpoints" / "step-00000004.pt"
    model, info = load_world_model(step4)
    final, _ = load_world_model(run / "model.safetensors")
    assert model.cfg == final.cfg and _same(model.state_dict(), final.state_dict())
    assert describe(step4)["format"] == "tdmpc-opt training checkpoint"
    out = tmp_path / "r.json"
    assert main(["eval", "--checkpoint", str(step4), "--tasks", "cartpole-balance",
                 "--planner", "policy", "--max-steps", "2", "--quiet", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["checkpoint_sha256"] == info["sha256"]
    converted = tmp_path / "m.safetensors"
    assert main(["convert", str(step4), str(converted)]) == 0
    assert _same(load_world_model(converted)[0].state_dict(), final.state_dict())

    alone = tmp_path / "alone" / "step-00000004.pt"
    alone.parent.mkdir()
    shutil.copy(step4, alone)
    capsys.readouterr()
    assert main(["info", str(alone)]) == 2
    assert "is a training checkpoint; its model settings are in its run directory's " \
        "config.json" in _error(capsys)
    step2 = run / "checkpoints" / "step-00000002.pt"
    shutil.copy(step4, step2)  # another file under step 2's recorded checksum
    assert main(["info", str(step2)]) == 2
    assert "checksum mismatch with step-00000002.json" in _error(capsys)


def test_ray_refuses_a_training_checkpoint_with_what_to_do(dataset, tmp_path):
    """Ray ships the file alone, without the run's config.json: refused before connecting."""
    pytest.importorskip("ray")
    from tdmpc_opt.backends import run_rollouts
    from tdmpc_opt.evaluation import episode_specs

    run = tmp_path / "run"
    assert _train(dataset, run, "steps=2") == 0
    step = run / "checkpoints" / "step-00000002.pt"
    with pytest.raises(ConfigError, match="training checkpoint, which needs its run directory; "
                       "for the ray backend make it a model file first: tdmpc-opt convert"):
        run_rollouts(step, PlannerConfig(mpc=False), episode_specs(("cartpole-balance",), 1, 0),
                     backend="ray")


# ------------------------------------------------------ 2. other settings on resume
def test_resume_refuses_other_training_settings_and_keeps_the_config(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, "steps=2") == 0
    stored = (run / "config.json").read_bytes()
    capsys.readouterr()
    assert _train(dataset, run, "steps=4", "lr=0.1", "rho=0.6", resume=True) == 2
    err = _error(capsys)
    assert "other settings (lr, rho differ)" in err and "--run-dir" in err
    assert (run / "config.json").read_bytes() == stored
    assert sorted(f.name for f in (run / "checkpoints").iterdir()) == ["step-00000002.json",
                                                                       "step-00000002.pt"]
    # the length and how often it logs or checkpoints may change
    assert _train(dataset, run, "steps=4", "log_freq=1", "checkpoint_freq=3", resume=True) == 0
    train = json.loads((run / "config.json").read_text())["train"]
    assert (train["steps"], train["log_freq"], train["lr"]) == (4, 1, 3e-4)


def test_distill_resume_refuses_other_coefficients(dataset, tmp_path, capsys):
    teacher = tmp_path / "teacher.safetensors"
    cfg = model_config_for(tuple(TASKS.split(",")), None, enc_dim=32, mlp_dim=32,
                           latent_dim=16, task_dim=8, num_q=2)
    save_checkpoint(teacher, WorldModel(cfg))
    argv = ["distill", "--teacher", str(teacher), "--data", str(dataset), "--run-dir",
            str(tmp_path / "d"), "--quiet", "enc_dim=16", "mlp_dim=16", "latent_dim=16",
            "task_dim=4", "steps=2", "batch_size=8", "eval_freq=0", "threads=1"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--resume", "--coef", "0.2"]) == 2
    assert "other settings (reward_coef differ)" in _error(capsys)


def test_distill_collect_interrupted_keeps_its_episodes(tmp_path, capsys, monkeypatch):
    """``distill --collect 3``: Ctrl-C after 2 of 3 teacher episodes keeps them; --resume
    collects the third only, and the data equal an uninterrupted run's."""
    from tdmpc_opt.cli import collect as collect_cli

    teacher = tmp_path / "teacher.safetensors"
    cfg = model_config_for(tuple(TASKS.split(",")), None, enc_dim=32, mlp_dim=32,
                           latent_dim=16, task_dim=8, num_q=2)
    save_checkpoint(teacher, WorldModel(cfg))

    def distill(run, *extra):
        return main(["distill", "--teacher", str(teacher), "--collect", "3", "--tasks",
                     "cartpole-balance", "--run-dir", str(run), "--quiet", "enc_dim=16",
                     "mlp_dim=16", "latent_dim=16", "task_dim=4", "steps=2", "batch_size=8",
                     "eval_freq=0", "threads=1", *extra])

    assert distill(tmp_path / "straight") == 0
    add, added = collect_cli.EpisodeStore.add, []

    def add_then_interrupt(self, res):
        add(self, res)
        added.append(res)
        if len(added) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(collect_cli.EpisodeStore, "add", add_then_interrupt)
    assert distill(tmp_path / "d") == 130
    assert len(list((tmp_path / "d" / ".data.collecting").glob("*.npz"))) == 2
    monkeypatch.setattr(collect_cli.EpisodeStore, "add",
                        lambda self, res: added.append(res) or add(self, res))
    assert distill(tmp_path / "d", "--resume") == 0
    assert len(added) == 3 and not (tmp_path / "d" / ".data.collecting").exists()
    for name in ("obs.npy", "action.npy", "reward.npy", "episodes.npy"):
        assert (tmp_path / "d" / "data" / name).read_bytes() == \
            (tmp_path / "straight" / "data" / name).read_bytes(), name
    capsys.readouterr()


# ------------------------------------------------------------ 3. pipeline settings
@pytest.fixture
def no_stages(monkeypatch):
    """Pipelines without stages: a setting wrongly accepted claims the run dir at once."""
    monkeypatch.setattr(Pipeline, "stages", lambda self: [])


@pytest.mark.parametrize("items, message", [
    (["num_samples=16"], "num_samples must be at least 64"),
    (["tasks=nope"], "unknown task 'nope'"),
    (["student_latent_dim=20"], "student architecture: latent_dim 20 is not a multiple"),
    (["student_num_q=1"], "student architecture: num_q must be at least 2"),
    (["seed=-1"], "seed must be in [0, 2**32)"),
    (["threads=100000"], "threads must be at most 256"),
])
def test_pipeline_refuses_bad_settings_before_claiming_the_run_dir(tmp_path, capsys, no_stages,
                                                                   items, message):
    run = tmp_path / "p"
    assert main(["pipeline", "--run-dir", str(run), "--quiet", *items]) == 2
    assert message in _error(capsys)
    assert not run.exists()


def test_pipeline_refuses_tasks_outside_the_teachers_set_before_claiming(tmp_path, capsys,
                                                                         no_stages):
    teacher = tmp_path / "single.safetensors"
    single = model_config_for(("cartpole-balance",), None, enc_dim=16, mlp_dim=16,
                              latent_dim=16, num_q=2)
    save_checkpoint(teacher, WorldModel(single))
    run = tmp_path / "p"
    assert main(["pipeline", "--run-dir", str(run), "--quiet", f"teacher={teacher}",
                 "tasks=pendulum-spin"]) == 2
    assert "single-task checkpoint is for 'cartpole-balance'" in _error(capsys)
    assert not run.exists()


def test_pipeline_planner_relations_are_part_of_its_config():
    with pytest.raises(ConfigError, match="num_samples must be at least 64"):
        load_config(None, ["num_samples=63"])
    assert load_config(None, ["num_samples=64"]).num_samples == 64


# ------------------------------------------------------------- 4. value validation
@pytest.mark.parametrize("item, message", [
    ("dropout=1.5", "dropout must be in [0, 1), got 1.5"),
    ("dropout=-0.1", "dropout must be in [0, 1), got -0.1"),
    ("seed=-1", "seed must be in [0, 2**32), got -1"),
    ("seed=99999999999999999999", "out of range"),
    ("task_dim=-3", "task_dim must be >= 0"),
    ("log_std_min=3", "need log_std_min < log_std_max"),
    ("temperature=-1", "temperature must be finite and >= 0, got -1.0"),
    ("num_elites=17", "num_elites must not exceed num_samples, got 17 with num_samples=16"),
    ("reward_coef=-1", "reward_coef must be >= 0"),
    ("threads=100000", "threads must be at most 256, got 100000"),  # segfaulted
])
def test_bad_values_are_one_line_before_any_work(dataset, tmp_path, capsys, item, message):
    run = tmp_path / "run"
    assert _train(dataset, run, "steps=2", item) == 2
    assert message in _error(capsys)
    assert not run.exists()


def test_model_config_checks_ranges_and_relations():
    tasks = tuple(TASKS.split(","))
    for dims, message in [({"episode_lengths": (500, 0, 500)}, "episode_lengths must be "),
                          ({"action_dims": (6, 9, 1)}, "action_dims must lie in"),
                          ({"dropout": 1.0}, "dropout must be in"),
                          ({"task_dim": -3}, "task_dim must be >= 0")]:
        with pytest.raises(ConfigError, match=message):
            model_config_for(tasks, None, **dims)
    with pytest.raises(ConfigError, match="num_pi_trajs must be in"):
        PlannerConfig(num_samples=24).validate()


# -------------------------------------------------------------- 5. derived settings
@pytest.mark.parametrize("item", ["tasks=foo", "action_dims=1,,2", "obs_dim=30",
                                  "episode_lengths=0"])
def test_settings_derived_from_the_tasks_are_refused(dataset, tmp_path, capsys, item):
    run = tmp_path / "run"
    assert _train(dataset, run, "steps=2", item) == 2
    key = item.partition("=")[0]
    assert f"cannot set {key} with key=value" in _error(capsys)
    assert not run.exists()


def test_unknown_task_names_are_refused_before_work(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", *TINY, "steps=2", "--data", str(dataset), "--tasks", "foo", "--run-dir",
            str(run)]
    assert main(argv) == 2
    assert "unknown task 'foo'" in _error(capsys)
    assert not run.exists()


# ---------------------------------------------------------------- 6. Ctrl-C notes
def test_ctrl_c_note_names_the_command_that_continues(dataset, tmp_path, capsys, monkeypatch):
    save = RunDir.save_checkpoint

    def save_then_interrupt(self, step, state):
        save(self, step, state)
        raise KeyboardInterrupt

    run = tmp_path / "run"
    monkeypatch.setattr(RunDir, "save_checkpoint", save_then_interrupt)
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 130
    note = capsys.readouterr().err.strip()
    assert "add --resume to the same command" in note
    monkeypatch.undo()
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 2  # the same command alone
    assert "pass --resume" in _error(capsys)
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2", resume=True) == 0
    assert distill_cli.INTERRUPTED == train_cli.INTERRUPTED


# ---------------------------------------------------------- 7. unknown-task message
def test_unknown_task_message_points_to_something_that_exists():
    import tdmpc_opt.tasks

    with pytest.raises(TaskError) as e:
        get_task("qqqqzzzz")
    assert "tdmpc-opt tasks" not in str(e.value)
    assert "tdmpc_opt/tasks.py" in str(e.value) and Path(tdmpc_opt.tasks.__file__).is_file()


# ------------------------------------------------------------ 8. settings files
@pytest.mark.parametrize("name, content, message", [
    ("cfg.yaml", b"steps: 5\n", "cfg.yaml: settings files are .json or .toml, not .yaml"),
    ("cfg.json", b'{"tasks": "caf\xe9"}', "cfg.json is not UTF-8 text"),
    ("cfg.toml", b'tasks = "caf\xe9"\n', "cfg.toml is not UTF-8 text"),
])
def test_settings_files_get_one_accurate_line(tmp_path, capsys, no_stages, name, content,
                                              message):
    path = tmp_path / name
    path.write_bytes(content)
    assert main(["pipeline", "--config", str(path), "--run-dir", str(tmp_path / "p")]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "p").exists()


# ------------------------------------------------------------ 9. skipped checkpoints
def test_skipped_checkpoints_are_one_clean_line_each(dataset, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(dataset, run, "steps=4", "checkpoint_freq=2") == 0
    newest = run / "checkpoints" / "step-00000004.pt"
    _corrupt(newest)
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        assert _train(dataset, run, "steps=4", "checkpoint_freq=2", resume=True) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"warning: skipping checkpoint {newest}: checksum mismatch (corrupted)"]
    assert (run / "checkpoints" / "step-00000004.pt.skipped").is_file()
    assert RunDir(run).latest_checkpoint()[1]["step"] == 4  # written again from step 2
