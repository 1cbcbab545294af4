"""Multi-task padding helpers."""

from __future__ import annotations

import numpy as np
import pytest

from tdmpc_opt.envs import PaddedEnv, make_env, pad_obs, set_dims, unpad_action
from tdmpc_opt.errors import InputError
from tdmpc_opt.tasks import TASK_SETS


def test_set_dims_of_mt30() -> None:
    assert set_dims(TASK_SETS["mt30"]) == (24, 6)
    assert set_dims(["pendulum-spin", "cup-spin"]) == (8, 2)


def test_pad_obs_zero_pads_last_axis() -> None:
    padded = pad_obs(np.array([1.0, 2.0, 3.0]), 5)
    np.testing.assert_array_equal(padded, [1, 2, 3, 0, 0])
    assert padded.dtype == np.float32
    batch = pad_obs(np.ones((4, 3)), 6)
    assert batch.shape == (4, 6) and np.all(batch[:, 3:] == 0)
    with pytest.raises(InputError):
        pad_obs(np.ones(7), 5)


def test_unpad_action_cuts_to_task_size() -> None:
    action = np.arange(6, dtype=np.float32)
    np.testing.assert_array_equal(unpad_action(action, "reacher-three-easy"), [0, 1, 2])
    assert unpad_action(np.ones((2, 6)), "pendulum-spin").shape == (2, 1)
    with pytest.raises(InputError):
        unpad_action(np.ones(1), "walker-walk")


def test_padded_env_round_trip() -> None:
    env = PaddedEnv(make_env("pendulum-spin", seed=0), "pendulum-spin", 24, 6)
    assert env.observation_space.shape == (24,) and env.action_space.shape == (6,)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (24,) and np.all(obs[3:] == 0)
    reference, _ = make_env("pendulum-spin", seed=0).reset()
    np.testing.assert_array_equal(obs[:3], reference)
    obs, reward, terminated, truncated, _ = env.step(np.full(6, 0.5, dtype=np.float32))
    assert obs.shape == (24,) and 0 <= reward <= 2 and not terminated and not truncated
    with pytest.raises(InputError):
        PaddedEnv(make_env("walker-walk", seed=0), "walker-walk", 17, 6)
