"""make_env / env_spec: every MT30 task builds with the registry's sizes and TD-MPC2's rules."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tdmpc_opt.envs import EPISODE_LENGTH, EnvSpec, env_spec, make_env
from tdmpc_opt.errors import InputError, TaskError
from tdmpc_opt.tasks import TASK_SETS, get_task

MT30 = TASK_SETS["mt30"]


@pytest.mark.parametrize("task", MT30)
def test_every_mt30_task_builds_resets_and_steps(task: str) -> None:
    info = get_task(task)
    env = make_env(task, seed=0)
    assert env.observation_space.shape == (info.obs_dim,)
    assert env.observation_space.dtype == np.float32
    assert env.action_space.shape == (info.action_dim,)
    assert env.action_space.dtype == np.float32
    assert np.all(env.action_space.low == -1) and np.all(env.action_space.high == 1)
    assert env.task_spec == env_spec(task)

    obs, info_dict = env.reset()
    assert obs.shape == (info.obs_dim,) and obs.dtype == np.float32
    assert np.all(np.isfinite(obs))
    assert isinstance(info_dict, dict)
    rng = np.random.default_rng(0)
    for _ in range(4):
        action = rng.uniform(-1, 1, info.action_dim).astype(np.float32)
        obs, reward, terminated, truncated, _ = env.step(action)
        assert obs.shape == (info.obs_dim,) and obs.dtype == np.float32
        assert np.all(np.isfinite(obs))
        assert isinstance(reward, float)
        assert 0.0 <= reward <= 2.0  # two [0, 1] control rewards summed
        assert terminated is False and truncated is False
    env.close()


def test_env_spec_matches_registry_and_is_frozen() -> None:
    spec = env_spec("reacher-three-easy")
    assert spec == EnvSpec("reacher-three-easy", 8, 3, 500)
    with pytest.raises(AttributeError):
        spec.obs_dim = 3  # type: ignore[misc]
    assert env_spec("mw-assembly") == EnvSpec("mw-assembly", 39, 4, 100)


@pytest.mark.parametrize("task", ["cheetah-run-backwards", "cup-spin", "reacher-three-hard",
                                  "walker-walk", "hopper-hop-backwards"])
def test_same_seed_same_trajectory(task: str) -> None:
    actions = np.random.default_rng(1).uniform(-1, 1, (15, get_task(task).action_dim))

    def rollout(env) -> tuple[np.ndarray, list[float]]:
        observations = [env.reset()[0]] if env.elapsed_steps == 0 else []
        rewards = []
        for a in actions:
            obs, reward, *_ = env.step(a)
            observations.append(obs)
            rewards.append(reward)
        return np.stack(observations), rewards

    first = rollout(make_env(task, seed=3))
    second = rollout(make_env(task, seed=3))
    np.testing.assert_array_equal(first[0], second[0])
    assert first[1] == second[1]

    # reset(seed=...) reseeds an env that has already run other episodes.
    env = make_env(task, seed=99)
    env.reset()
    env.step(actions[0])
    obs0, _ = env.reset(seed=3)
    rest = [env.step(a) for a in actions]
    np.testing.assert_array_equal(obs0, first[0][0])
    np.testing.assert_array_equal(np.stack([r[0] for r in rest]), first[0][1:])
    assert [r[1] for r in rest] == first[1]


def test_different_seeds_give_different_initial_states() -> None:
    a = make_env("walker-walk-backwards", seed=1).reset()[0]
    b = make_env("walker-walk-backwards", seed=2).reset()[0]
    assert not np.array_equal(a, b)


def test_episode_truncates_after_exactly_500_steps() -> None:
    env = make_env("pendulum-spin", seed=0)
    env.reset()
    zero = np.zeros(1, dtype=np.float32)
    for t in range(1, EPISODE_LENGTH):
        _, _, terminated, truncated, _ = env.step(zero)
        assert not terminated and not truncated, f"ended early at step {t}"
    _, _, terminated, truncated, _ = env.step(zero)
    assert truncated is True and terminated is False
    assert env.elapsed_steps == 500
    with pytest.raises(RuntimeError, match="reset"):
        env.step(zero)
    env.reset()
    assert env.step(zero)[3] is False


def test_step_checks_reset_and_action_shape() -> None:
    env = make_env("cartpole-balance", seed=0)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.zeros(1))
    env.reset()
    with pytest.raises(InputError, match="shape"):
        env.step(np.zeros(2))


def test_out_of_range_actions_are_clipped() -> None:
    big, unit = make_env("cheetah-run", seed=5), make_env("cheetah-run", seed=5)
    big.reset()
    unit.reset()
    a = np.array([3.0, -3.0, 0.5, 1.0, -2.0, 0.0])
    np.testing.assert_array_equal(big.step(a)[0], unit.step(np.clip(a, -1, 1))[0])


def test_unknown_task_raises_task_error_with_suggestion() -> None:
    with pytest.raises(TaskError, match="did you mean.*cheetah-run"):
        make_env("cheetah-runn")
    with pytest.raises(TaskError):
        env_spec("no-such-task")


def test_metaworld_task_is_not_shipped() -> None:
    with pytest.raises(TaskError, match="Meta-World.*not shipped"):
        make_env("mw-assembly")


def test_render_needs_gl_only_when_called() -> None:
    """Rendering runs in a child process with MUJOCO_GL=egl (skipped where EGL is missing)."""
    code = ("from tdmpc_opt.envs import make_env\n"
            "env = make_env('cup-spin', seed=0, render_size=32); env.reset()\n"
            "frame = env.render(); assert frame.shape == (32, 32, 3), frame.shape\n"
            "assert frame.dtype.name == 'uint8' and frame.any()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "MUJOCO_GL": "egl"}, timeout=120, check=False)
    if result.returncode != 0:
        if "OpenGL" in result.stderr or "EGL" in result.stderr or "GL" in result.stderr:
            pytest.skip("no EGL rendering on this machine")
        pytest.fail(result.stderr[-2000:])
