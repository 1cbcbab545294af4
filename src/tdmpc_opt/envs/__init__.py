"""Environments of the MT30 task set: 19 DeepMind Control Suite tasks and 11 custom ones.

:func:`make_env` builds a Gymnasium environment for a task name of the registry
(:mod:`tdmpc_opt.tasks`) with TD-MPC2's settings (action repeat 2, 500 agent steps, flat
float32 state observations, actions in [-1, 1]). :func:`env_spec` returns the static sizes
without building anything. Meta-World tasks (``mw-*``, part of MT80) are known to the
registry so that MT80 checkpoints load, but no Meta-World environment ships.
"""

from __future__ import annotations

from tdmpc_opt.envs.dmcontrol import (
    ACTION_REPEAT,
    DEFAULT_RENDER_SIZE,
    EPISODE_LENGTH,
    DMControlEnv,
)
from tdmpc_opt.envs.multitask import PaddedEnv, pad_obs, set_dims, unpad_action
from tdmpc_opt.envs.spec import EnvSpec, env_spec
from tdmpc_opt.errors import TaskError
from tdmpc_opt.tasks import get_task


def make_env(task: str, seed: int | None = None, *,
             render_size: int | None = None) -> DMControlEnv:
    """Build the Gymnasium environment of ``task``; its sizes are ``env.task_spec``.

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
    if env.task_spec != env_spec(info.name):
        env.close()
        raise TaskError(f"{task}: the environment's sizes {env.task_spec} differ from the "
                        f"registry's {env_spec(info.name)}")
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
