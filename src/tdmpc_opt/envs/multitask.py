"""Multi-task padding: one observation/action size for every task of a task set.

A multi-task agent works on vectors of the set's largest sizes (MT30: 24-dim observations,
6-dim actions). Observations of smaller tasks are zero-padded at the end; the agent's action
is cut to the task's own action size before it reaches the environment (the extra entries
are ignored), exactly as TD-MPC2's multi-task wrapper does.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import gymnasium as gym
import numpy as np

from tdmpc_opt.errors import InputError
from tdmpc_opt.tasks import get_task


def set_dims(tasks: Iterable[str]) -> tuple[int, int]:
    """The padded ``(obs_dim, action_dim)`` of a task set: the largest of each."""
    infos = [get_task(t) for t in tasks]
    if not infos:
        raise InputError("empty task set has no padded dimensions")
    return max(i.obs_dim for i in infos), max(i.action_dim for i in infos)


def pad_obs(obs: np.ndarray, dim: int) -> np.ndarray:
    """Zero-pad the last axis of ``obs`` to length ``dim`` (float32; batches allowed).

    Raises:
        InputError: ``obs`` is already longer than ``dim``.
    """
    obs = np.asarray(obs, dtype=np.float32)
    size = obs.shape[-1]
    if size > dim:
        raise InputError(f"observation has {size} entries, more than the padded size {dim}")
    if size == dim:
        return obs
    padding = [(0, 0)] * (obs.ndim - 1) + [(0, dim - size)]
    return np.pad(obs, padding)


def unpad_action(action: np.ndarray, task: str) -> np.ndarray:
    """Cut a padded action (last axis) to the action size of ``task``.

    Raises:
        InputError: the action is shorter than the task's action size.
        TaskError: the task is unknown.
    """
    action = np.asarray(action)
    dim = get_task(task).action_dim
    if action.shape[-1] < dim:
        raise InputError(f"action has {action.shape[-1]} entries, {task} needs {dim}")
    return action[..., :dim]


class PaddedEnv(gym.Wrapper[np.ndarray, np.ndarray, np.ndarray, np.ndarray]):
    """Present a single-task env with the padded sizes of a task set.

    Observations are zero-padded to ``obs_dim``; actions of length ``action_dim`` are cut to
    the task's own size before stepping.

    Args:
        env: an environment made by :func:`tdmpc_opt.envs.make_env`.
        task: its task name.
        obs_dim: padded observation size (e.g. ``set_dims(TASK_SETS["mt30"])[0]``).
        action_dim: padded action size.
    """

    def __init__(self, env: gym.Env, task: str, obs_dim: int, action_dim: int) -> None:
        super().__init__(env)
        info = get_task(task)
        if info.obs_dim > obs_dim or info.action_dim > action_dim:
            raise InputError(f"{task} ({info.obs_dim} obs, {info.action_dim} actions) does not "
                             f"fit the padded sizes ({obs_dim}, {action_dim})")
        self.task = task
        self.obs_dim = obs_dim
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (action_dim,), np.float32)

    def reset(self, **kwargs: Any) -> tuple[np.ndarray, dict[str, Any]]:
        """Reset the inner env and pad its observation."""
        obs, info = self.env.reset(**kwargs)
        return pad_obs(obs, self.obs_dim), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Step the inner env with the task's part of ``action``; pad the observation."""
        obs, reward, terminated, truncated, info = self.env.step(unpad_action(action, self.task))
        return pad_obs(obs, self.obs_dim), reward, terminated, truncated, info
