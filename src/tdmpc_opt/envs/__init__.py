"""Environments of the MT30 task set: 19 DeepMind Control Suite tasks and 11 custom ones.

:func:`make_env` builds a Gymnasium environment for a task name of the registry
(:mod:`tdmpc_opt.tasks`) with TD-MPC2's settings (action repeat 2, 500 agent steps, flat
float32 state observations, actions in [-1, 1]). :func:`env_spec` returns the static sizes
without building anything. Meta-World tasks (``mw-*``, part of MT80) are known to the
registry so that MT80 checkpoints load, but no Meta-World environment ships.
"""

from __future__ import annotations

from dataclasses import dataclass

from tdmpc_opt.envs.dmcontrol import (
    ACTION_REPEAT,
    DEFAULT_RENDER_SIZE,
    EPISODE_LENGTH,
    DMControlEnv,
)
from tdmpc_opt.envs.multitask import PaddedEnv, pad_obs, set_dims, unpad_action
from tdmpc_opt.errors import TaskError
from tdmpc_opt.tasks import get_task


@dataclass(frozen=True)
class EnvSpec:
    """Sizes of one task's environment, before multi-task padding."""

    task: str
    """Task name."""
    obs_dim: int
    """Length of the flat float32 observation."""
    action_dim: int
    """Length of the action; every entry lies in [-1, 1]."""
    episode_length: int
    """Agent steps until the episode is truncated."""


def env_spec(task: str) -> EnvSpec:
    """The :class:`EnvSpec` of ``task``, from the registry (no environment is built).

    Works for every registered task, Meta-World ones included.

    Raises:
        TaskError: the task is unknown (the message suggests close names).
    """
    info = get_task(task)
    return EnvSpec(info.name, info.obs_dim, info.action_dim, info.episode_length)


def make_env(task: str, seed: int | None = None, *,
             render_size: int | None = None) -> DMControlEnv:
    """Build the Gymnasium environment of ``task``.

    Args:
        task: a registered task name, e.g. ``walker-walk`` or ``cup-spin``.
        seed: seed of the initial-state generator; the same seed gives the same episodes
            for the same actions. ``None`` seeds from the OS.
        render_size: side length in pixels of :meth:`~DMControlEnv.render` frames
            (default 384). Rendering is optional and needs OpenGL only when used.

    Raises:
        TaskError: the task is unknown, or it is a Meta-World task (not shipped).
    """
    info = get_task(task)
    if info.suite == "metaworld":
        raise TaskError(f"{task} is a Meta-World task; Meta-World environments are not "
                        "shipped with tdmpc-opt (only its MT30 DMControl tasks are)")
    env = DMControlEnv(info.name, seed, render_size=render_size or DEFAULT_RENDER_SIZE)
    obs_dim = env.observation_space.shape[0]
    act_dim = env.action_space.shape[0]
    if (obs_dim, act_dim) != (info.obs_dim, info.action_dim):
        env.close()
        raise TaskError(f"{task}: environment has {obs_dim} obs / {act_dim} action dims, the "
                        f"registry says {info.obs_dim} / {info.action_dim}")
    return env


__all__ = [
    "ACTION_REPEAT",
    "EPISODE_LENGTH",
    "DMControlEnv",
    "EnvSpec",
    "PaddedEnv",
    "env_spec",
    "make_env",
    "pad_obs",
    "set_dims",
    "unpad_action",
]
