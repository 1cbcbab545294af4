"""Batched evaluation: reproducibility, batch invariance, scores, resume, bad input."""

import json

import pytest

from tdmpc_opt.agent import Agent, load_agent
from tdmpc_opt.cli import main
from tdmpc_opt.evaluation import episode_specs, run_episodes, summarize, task_score
from tdmpc_opt.world_model import WorldModel


@pytest.fixture
def tiny_agent(tiny_cfg, tiny_planner):
    return Agent(WorldModel(tiny_cfg), tiny_planner)


def _returns(agent, specs, batch):
    return [r.episode_return for r in run_episodes(agent, specs, batch, max_steps=6)]


def test_returns_do_not_depend_on_batch_size(tiny_agent):
    specs = episode_specs(("walker-walk", "cartpole-balance", "pendulum-swingup"), 2, seed=7)
    one = _returns(tiny_agent, specs, 1)
    assert one == _returns(tiny_agent, specs, 4)
    assert one == _returns(tiny_agent, specs, 6)
    assert one == _returns(tiny_agent, specs, 1)  # and across runs


def test_a_list_of_action_noises_cycles_over_episodes(tiny_agent):
    """Episode i takes the (i mod n)-th std: a 0 entry reproduces the noiseless episode, a
    positive one the single-std run's episode with that noise."""
    specs = episode_specs(("cartpole-balance",), 4, seed=7)

    def actions(noise):
        res = run_episodes(tiny_agent, specs, 4, max_steps=6, action_noise=noise,
                           trajectories=True)
        return [r.trajectory.action[1:] for r in res]

    quiet, loud, cycled = actions(0.0), actions(0.5), actions((0.0, 0.5))
    for i in range(4):
        want = quiet[i] if i % 2 == 0 else loud[i]
        assert (cycled[i] == want).all(), i
    assert not (quiet[1] == loud[1]).all()


def test_policy_mode_is_batch_invariant_too(tiny_agent):
    agent = tiny_agent.with_planner(mpc=False)
    specs = episode_specs(("walker-walk", "cartpole-balance"), 2, seed=3)
    assert _returns(agent, specs, 1) == _returns(agent, specs, 3)


def test_closed_environments_are_freed_before_memory_is_handed_back(tiny_agent, monkeypatch):
    """Each hand-back of freed memory (after episodes end) comes when every environment of the
    finished episodes is already unreferenced, so their ~25 MB of MuJoCo buffers are free."""
    import weakref

    import tdmpc_opt.evaluation as evaluation
    from tdmpc_opt.envs import make_env

    envs, finished, checks = [], [], []

    def tracked_env(task, seed):
        env = make_env(task, seed)
        envs.append(weakref.ref(env))
        return env

    def release():
        checks.append((len(finished), sum(ref() is None for ref in envs)))

    monkeypatch.setattr(evaluation, "release_freed_memory", release)
    specs = episode_specs(("walker-walk", "cartpole-balance", "pendulum-swingup"), 2, seed=1)
    run_episodes(tiny_agent.with_planner(mpc=False), specs, 4, max_steps=3,
                 on_result=finished.append, make_env=tracked_env)
    assert checks == [(4, 4), (6, 6)]


def test_episode_seeds_are_per_task_and_episode():
    a = episode_specs(("walker-walk", "cartpole-balance"), 3, seed=1)
    b = episode_specs(("cartpole-balance",), 3, seed=1)
    assert [s.seed for s in a if s.task == "cartpole-balance"] == [s.seed for s in b]
    assert len({s.seed for s in a}) == 6


def test_normalized_score():
    specs = episode_specs(("cartpole-balance",), 2, 1)
    from tdmpc_opt.evaluation import EpisodeResult

    results = [EpisodeResult("cartpole-balance", 0, specs[0].seed, 900.0, 500),
               EpisodeResult("cartpole-balance", 1, specs[1].seed, 700.0, 500),
               EpisodeResult("walker-stand", 0, 5, 400.0, 500)]
    s = summarize(results, ("cartpole-balance", "walker-stand"))
    assert s["tasks"]["cartpole-balance"]["mean_return"] == 800.0
    assert s["normalized_score"] == pytest.approx((80.0 + 40.0) / 2)
    assert task_score("mw-reach", [0.0, 0.0], [1.0, 0.0]) == 50.0


def test_published_checkpoint_short_episode_cli_and_resume(fp16_ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", "--checkpoint", str(fp16_ckpt), "--tasks", "cartpole-balance,walker-stand",
            "--episodes", "1", "--max-steps", "4", "--json", str(out), "--quiet",
            "num_samples=64", "num_elites=16", "iterations=2"]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert set(first["tasks"]) == {"cartpole-balance", "walker-stand"}
    assert first["checkpoint_sha256"] and first["planner"]["num_samples"] == 64
    # start again: nothing is rerun and the result is the same
    assert main(args) == 0
    assert "resuming: 2 of 2" in capsys.readouterr().out
    assert json.loads(out.read_text())["tasks"] == first["tasks"]
    # another precision is another evaluation: refused at the same --json (its results and
    # finished episodes are kept), run at another one with the runtime recorded
    saved = out.read_text(), out.with_name("r.json.episodes.jsonl").read_text()
    assert main(args + ["--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "holds 2 finished episode(s) of an evaluation with other settings (runtime, " \
        "layers)" in err
    assert (out.read_text(), out.with_name("r.json.episodes.jsonl").read_text()) == saved
    other = tmp_path / "int8.json"
    assert main([*args[:-5], str(other), *args[-4:], "--precision", "int8"]) == 0
    assert "resuming" not in capsys.readouterr().out
    assert json.loads(other.read_text())["runtime"] == "int8"
    # finished results alone (episode log deleted) are protected the same way
    out.with_name("r.json.episodes.jsonl").unlink()
    assert main(args[:8] + ["5", *args[9:]]) == 2
    assert f"{out} holds the results of an evaluation with other settings (max_steps)" in \
        capsys.readouterr().err


def test_cartpole_balance_short_run_scores_high(fp16_ckpt):
    agent = load_agent(fp16_ckpt).with_planner(num_samples=128, num_elites=32, iterations=3)
    res = run_episodes(agent, episode_specs(("cartpole-balance",), 1, 1), max_steps=50)
    # balancing from the start: nearly 1 reward per physics step, 2 per agent step
    assert res[0].episode_return > 0.9 * 2 * 50


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "walker-flip"], "unknown task 'walker-flip'"),
    (["--tasks", "mw-reach"], "Meta-World"),
    (["--episodes", "0"], "must be positive"),
    (["--tasks", "cartpole-balance", "horizon=0"], "horizon must be positive"),
    (["--tasks", "cartpole-balance", "num_sample=3"], "did you mean 'num_samples'"),
    (["--tasks", "cartpole-balance", "--precision", "fp8"], "invalid choice: 'fp8'"),
])
def test_bad_input_is_one_clear_line(fp16_ckpt, capsys, argv, message):
    code = None
    try:
        code = main(["eval", "--checkpoint", str(fp16_ckpt), *argv])
    except SystemExit as e:  # argparse usage errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_checkpoint_for_other_tasks_is_refused(tmp_path, capsys, tiny_single_cfg):
    from tdmpc_opt.checkpoints import save_checkpoint

    save_checkpoint(tmp_path / "m.safetensors", WorldModel(tiny_single_cfg))
    assert main(["eval", "--checkpoint", str(tmp_path / "m.safetensors"),
                 "--tasks", "walker-walk"]) == 2
    assert "single-task checkpoint is for 'cartpole-balance'" in capsys.readouterr().err
    from tdmpc_opt.config import model_config_for

    cfg = model_config_for(("walker-walk",), None, enc_dim=16, mlp_dim=16, latent_dim=16)
    save_checkpoint(tmp_path / "w.safetensors", WorldModel(cfg))
    assert main(["eval", "--checkpoint", str(tmp_path / "w.safetensors"),
                 "--tasks", "walker-walk,cheetah-run"]) == 2
    assert "single-task checkpoint" in capsys.readouterr().err


def test_eval_video_writes_one_playable_mp4_per_task(tmp_path, tiny_cfg):
    pytest.importorskip("imageio_ffmpeg")
    from tdmpc_opt.checkpoints import save_checkpoint

    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, WorldModel(tiny_cfg))
    out = tmp_path / "videos"
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", "cartpole-balance,walker-walk",
                 "--episodes", "2", "--max-steps", "6", "--video", str(out), "--quiet",
                 "--json", str(tmp_path / "r.json"), "num_samples=32", "num_elites=8",
                 "iterations=1"]) == 0
    import imageio.v2 as imageio

    files = sorted(p.name for p in out.iterdir())
    assert files == ["cartpole-balance.mp4", "walker-walk.mp4"]
    for name in files:
        frames = imageio.mimread(out / name)
        assert len(frames) == 7 and frames[0].ndim == 3  # reset + 6 steps, one episode
        assert frames[0].std() > 0  # a rendered scene, not a blank image


def test_checkpoint_for_other_observation_sizes_is_refused(tmp_path, capsys, tiny_single_cfg):
    # an official single-task .pt names no task: only its shapes say what it can take
    from tdmpc_opt.checkpoints import save_official

    save_official(tmp_path / "cartpole.pt", WorldModel(tiny_single_cfg))
    assert main(["eval", "--checkpoint", str(tmp_path / "cartpole.pt"),
                 "--tasks", "walker-walk"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "walker-walk has 24-dim observations but the checkpoint takes 5" in err, err
