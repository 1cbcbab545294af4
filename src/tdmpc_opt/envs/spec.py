"""The static sizes of a task's environment, as one explicit object."""

from __future__ import annotations

from dataclasses import dataclass

from tdmpc_opt.tasks import get_task


@dataclass(frozen=True)
class EnvSpec:
    """Sizes of one task's environment, before multi-task padding."""

    task: str
    """Task name."""
    obs_dim: int
    """Length of the flat float32 observation, shape ``(obs_dim,)``."""
    action_dim: int
    """Length of the action, shape ``(action_dim,)``; every entry lies in [-1, 1]."""
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
