"""The 11 custom MT30 tasks that TD-MPC2 adds on top of the DeepMind Control Suite.

Each domain module builds dm_control ``control.Environment`` objects from the suite's own
models and task classes, changing only what TD-MPC2 changes (a longer floor, a third arm
link, a mirrored target speed, a new reward). :data:`CUSTOM_TASKS` maps task names to
factories taking the ``random`` argument of dm_control tasks (a seed or a RandomState).
"""

from __future__ import annotations

from tdmpc_opt.envs.custom import cheetah, cup, hopper, pendulum, reacher, walker
from tdmpc_opt.envs.custom.types import Random, TaskFactory

CUSTOM_TASKS: dict[str, TaskFactory] = {
    **walker.TASKS,
    **cheetah.TASKS,
    **hopper.TASKS,
    **reacher.TASKS,
    **cup.TASKS,
    **pendulum.TASKS,
}
"""Custom task name -> factory of its dm_control environment."""

__all__ = ["CUSTOM_TASKS", "Random", "TaskFactory"]
