"""Online training loop (on a fake environment) and the train / data / collect commands."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch

from conftest import DropsAnInterrupt
from official_layout import make_episodes, write_official
from tdmpc_opt.cli import main
from tdmpc_opt.data import Dataset
from tdmpc_opt.runs import RunDir
from tdmpc_opt.trainer import OnlineTrainer, build_learner
from tdmpc_opt.training import TrainConfig

TINY = ["enc_dim=32", "mlp_dim=32", "latent_dim=16", "num_q=2", "batch_size=16",
        "iterations=1", "num_samples=16", "num_elites=4", "num_pi_trajs=2"]


class PointEnv(gym.Env):
    """5-dim observations, 1-dim action, 20-step episodes; reward for staying near 0."""

    length = 20

    def __init__(self, task: str, seed: int | None = None):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (5,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.task_spec = SimpleNamespace(episode_length=self.length)
        self._rng = np.random.default_rng(seed)

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        self.x, self.t = self._rng.uniform(-1, 1), 0
        return self._obs(), {}

    def _obs(self):
        return np.array([self.x, self.x**2, 0.0, 1.0, self.t / 20], np.float32)

    def step(self, action):
        self.x = float(np.clip(self.x + 0.3 * float(action[0]), -2, 2))
        self.t += 1
        return self._obs(), 1.0 - abs(self.x), False, self.t >= self.length, {}


def _online(tmp_path, name, steps, cfg_single, resume=False):
    cfg = TrainConfig(steps=steps, batch_size=8, seed_steps=30, eval_freq=40, eval_episodes=2,
                      checkpoint_freq=40, log_freq=10)
    from tdmpc_opt.config import PlannerConfig

    planner = PlannerConfig(iterations=1, num_samples=16, num_elites=4, num_pi_trajs=2)
    learner = build_learner(cfg_single, cfg)
    trainer = OnlineTrainer("cartpole-balance", learner, RunDir(tmp_path / name), planner,
                            make_env=PointEnv)
    trainer.train(resume=resume)
    return trainer


def test_online_loop_and_resume(tiny_single_cfg, tmp_path):
    a = _online(tmp_path, "a", 100, tiny_single_cfg)
    assert a.state.step == 120 and a.state.episode == 6  # whole episodes past `steps`
    assert a.learner.step == 30 + (120 - 31)  # burst of seed_steps updates, then 1 per step
    evals = (tmp_path / "a" / "eval.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in evals[1:]] == ["0", "40", "80", "120"]
    # a run stopped after step 40's checkpoint, resumed: the same parameters
    b = _online(tmp_path, "b", 60, tiny_single_cfg)
    b.run.checkpoint_path(80).unlink()
    c = _online(tmp_path, "b", 100, tiny_single_cfg, resume=True)
    for (k, x), y in zip(a.learner.model.state_dict().items(),
                         c.learner.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert (tmp_path / "b" / "model.safetensors").is_file()
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000


def _eval_rows(run_dir):
    import csv

    with open(run_dir / "eval.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(f)]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("signal_at,kept,dropped", [(150, 60, False), (180, 80, False),
                                                    (150, 60, True)],
                         ids=["episode", "evaluation", "episode-dropped-in-a-del"])
def test_online_interrupt_checkpoints_the_work_under_way(tiny_single_cfg, tmp_path, monkeypatch,
                                                         signal_at, kept, dropped):
    """Ctrl-C in the middle of episode 4 (env call 150: 40 evaluation steps at steps 0 and 40,
    then 70 of training; last checkpoint at 40) checkpoints the start of that episode (step
    60, its buffer); Ctrl-C inside the evaluation at step 80 (env call 180) checkpoints the
    state the evaluation started from. Either way the resumed run equals an uninterrupted one,
    evaluations included, and no finished episode is lost. A Ctrl-C whose exception Python
    drops (raised inside a ``__del__``) stops the run at its next step the same way."""
    import os
    import signal

    a = _online(tmp_path, "a", 100, tiny_single_cfg)
    real_step, steps = PointEnv.step, []

    def step(self, action):
        steps.append(1)
        if len(steps) == signal_at and dropped:
            DropsAnInterrupt()
        elif len(steps) == signal_at:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, action)

    monkeypatch.setattr(PointEnv, "step", step)
    with pytest.raises(KeyboardInterrupt):
        _online(tmp_path, "b", 100, tiny_single_cfg)
    monkeypatch.undo()
    run = RunDir(tmp_path / "b")
    assert sorted(run.ckpt_dir.glob("step-*.pt")) == [run.checkpoint_path(40),
                                                      run.checkpoint_path(kept)]
    c = _online(tmp_path, "b", 100, tiny_single_cfg, resume=True)
    assert c.state.step == 120 and c.learner.step == a.learner.step
    for (k, x), y in zip(a.learner.model.state_dict().items(),
                         c.learner.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), k
    assert _eval_rows(tmp_path / "b") == _eval_rows(tmp_path / "a")
    assert len(_eval_rows(tmp_path / "a")) == 4  # steps 0, 40, 80 and the final 120


def test_cli_offline_train_resume_collect(tmp_path, capsys):
    tasks = "walker-walk,cartpole-balance,pendulum-swingup"
    files = [write_official(tmp_path / f"chunk_{i}.pt", *make_episodes(6, 12, 24, 6, 3, seed=i))
             for i in range(2)]
    assert main(["data", "convert", str(tmp_path), "--out", str(tmp_path / "ds"),
                 "--tasks", tasks, "--quiet"]) == 0
    assert Dataset(tmp_path / "ds").num_episodes == 12 and len(files) == 2
    assert main(["data", "info", str(tmp_path / "ds")]) == 0
    run = tmp_path / "run"
    args = ["train", "--data", str(tmp_path / "ds"), "--run-dir", str(run), "--quiet",
            "eval_freq=0", "checkpoint_freq=5", *TINY]
    assert main([*args, "steps=6"]) == 0
    assert main([*args, "steps=6"]) == 2  # checkpoints exist: refuse without --resume
    assert "--resume" in capsys.readouterr().err
    assert main([*args, "steps=10", "--resume"]) == 0
    assert main([*args, "steps=12", "latent_dim=32", "--resume"]) == 2
    assert "different model (latent_dim differ)" in capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["steps"] == 10 and cfg["model"]["latent_dim"] == 16
    rows = (run / "train.csv").read_text().splitlines()
    assert rows[0].startswith("step,") and len(rows) == 1 + 2
    assert main(["collect", "--checkpoint", str(run), "--tasks", "cartpole-balance",
                 "--episodes", "2", "--out", str(tmp_path / "col"), "--policy",
                 "--explore"]) == 0
    col = Dataset(tmp_path / "col")
    assert col.num_episodes == 2 and len(col) == 1000
    assert col.tasks[col.episodes[0, 2]] == "cartpole-balance"
    assert np.isfinite(col.reward[1:501]).all()


def test_cli_errors(tmp_path, capsys):
    assert main(["train", "--task", "cartpole-balance"]) == 2
    assert "--online" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path), "steps=3"]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert main(["train", "--task", "cartpole-balance", "--online", "stepz=3"]) == 2
    assert "did you mean 'steps'" in capsys.readouterr().err
    assert main(["data", "convert", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]) \
        == 2


@pytest.mark.slow
def test_cli_online_real_env(tmp_path):
    run = tmp_path / "cp"
    assert main(["train", "--task", "cartpole-balance", "--online", "--run-dir", str(run),
                 "--quiet", "steps=600", "seed_steps=100", "eval_freq=500", "eval_episodes=1",
                 *TINY]) == 0
    evals = (run / "eval.csv").read_text().splitlines()
    assert len(evals) >= 2
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["mode"] == "online" and dataclasses.is_dataclass(TrainConfig)
