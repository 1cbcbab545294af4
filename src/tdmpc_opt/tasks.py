"""The task registry: the single source of truth for task names, sizes and task sets.

The order of a task set is part of the checkpoint format: row ``i`` of a multi-task model's
task embedding belongs to ``TASK_SETS[name][i]``. Observation and action sizes are per task,
before the multi-task padding.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from tdmpc_opt.errors import TaskError


@dataclass(frozen=True)
class TaskInfo:
    """Static facts about one task."""

    name: str
    """Task name, ``domain-task`` (e.g. ``walker-walk``)."""
    obs_dim: int
    """Length of the flat state observation before padding."""
    action_dim: int
    """Number of action dimensions before padding; actions lie in [-1, 1]."""
    episode_length: int
    """Agent steps per episode (after action repeat)."""
    suite: str
    """``dmcontrol`` (DeepMind Control Suite), ``custom`` (our MT30 additions) or ``metaworld``."""

    @property
    def domain(self) -> str:
        """The MuJoCo model family, e.g. ``cheetah`` for ``cheetah-run-back``."""
        return self.name[3:].split("-")[0] if self.suite == "metaworld" else self.name.split("-")[0]


def _dmc(name: str, obs: int, act: int) -> TaskInfo:
    return TaskInfo(name, obs, act, 500, "dmcontrol")


def _custom(name: str, obs: int, act: int) -> TaskInfo:
    return TaskInfo(name, obs, act, 500, "custom")


# MT30 in canonical order: 19 DMControl tasks, then 11 custom tasks on the same models.
_MT30 = (
    _dmc("walker-stand", 24, 6),
    _dmc("walker-walk", 24, 6),
    _dmc("walker-run", 24, 6),
    _dmc("cheetah-run", 17, 6),
    _dmc("reacher-easy", 6, 2),
    _dmc("reacher-hard", 6, 2),
    _dmc("acrobot-swingup", 6, 1),
    _dmc("pendulum-swingup", 3, 1),
    _dmc("cartpole-balance", 5, 1),
    _dmc("cartpole-balance-sparse", 5, 1),
    _dmc("cartpole-swingup", 5, 1),
    _dmc("cartpole-swingup-sparse", 5, 1),
    _dmc("cup-catch", 8, 2),
    _dmc("finger-spin", 9, 2),
    _dmc("finger-turn-easy", 12, 2),
    _dmc("finger-turn-hard", 12, 2),
    _dmc("fish-swim", 24, 5),
    _dmc("hopper-stand", 15, 4),
    _dmc("hopper-hop", 15, 4),
    _custom("walker-walk-backwards", 24, 6),
    _custom("walker-run-backwards", 24, 6),
    _custom("cheetah-run-backwards", 17, 6),
    _custom("cheetah-run-front", 17, 6),
    _custom("cheetah-run-back", 17, 6),
    _custom("cheetah-jump", 17, 6),
    _custom("hopper-hop-backwards", 15, 4),
    _custom("reacher-three-easy", 8, 3),
    _custom("reacher-three-hard", 8, 3),
    _custom("cup-spin", 8, 2),
    _custom("pendulum-spin", 3, 1),
)

# Meta-World MT50, in the order TD-MPC2 appends it to MT30 to form MT80 (39-dim state, 4-dim
# action, 100 agent steps). Listed so MT80 checkpoints load; no Meta-World environments ship.
_MW50_NAMES = (
    "assembly basketball button-press-topdown button-press-topdown-wall button-press "
    "button-press-wall coffee-button coffee-pull coffee-push dial-turn disassemble door-open "
    "door-close drawer-close drawer-open faucet-open faucet-close hammer handle-press-side "
    "handle-press handle-pull-side handle-pull lever-pull peg-insert-side peg-unplug-side "
    "pick-out-of-hole pick-place pick-place-wall plate-slide plate-slide-side plate-slide-back "
    "plate-slide-back-side push-back push push-wall reach reach-wall shelf-place soccer "
    "stick-push stick-pull sweep-into sweep window-open window-close bin-picking box-close "
    "door-lock door-unlock hand-insert"
).split()
_MW50 = tuple(TaskInfo(f"mw-{n}", 39, 4, 100, "metaworld") for n in _MW50_NAMES)

TASKS: dict[str, TaskInfo] = {t.name: t for t in _MT30 + _MW50}
"""Every known task by name."""

TASK_SETS: dict[str, tuple[str, ...]] = {
    "mt30": tuple(t.name for t in _MT30),
    "mt80": tuple(t.name for t in _MT30 + _MW50),
}
"""Named multi-task sets, in checkpoint order."""


def check_environments(tasks, why: str) -> None:
    """Refuse Meta-World tasks, which have no environments here; ``why`` says what needs
    one."""
    meta = [t for t in tasks if get_task(t).suite == "metaworld"]
    if meta:
        raise TaskError(f"{meta[0]}: Meta-World environments are not shipped ({why})")


def get_task(name: str) -> TaskInfo:
    """Return the :class:`TaskInfo` of ``name``.

    Raises:
        TaskError: the name is unknown (the message suggests the closest known names).
    """
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(TASKS), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else \
            "; known tasks are those of the MT30 and MT80 sets, e.g. walker-walk (all listed " \
            "in tdmpc_opt/tasks.py)"
        raise TaskError(f"unknown task {name!r}{hint}") from None


def resolve_tasks(spec: str) -> tuple[str, ...]:
    """Turn a task-set name (``mt30``) or a comma-separated list of task names into names.

    Raises:
        TaskError: an unknown or repeated name, or an empty list.
    """
    spec = spec.strip()
    if spec in TASK_SETS:
        return TASK_SETS[spec]
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    if not names:
        raise TaskError("no task given: pass a task set (mt30, mt80) or comma-separated task names")
    for n in names:
        get_task(n)
    if len(set(names)) != len(names):
        raise TaskError(f"task list repeats a name: {spec!r}")
    return names


def task_set_for_count(num_tasks: int) -> tuple[str, ...] | None:
    """The named task set with ``num_tasks`` tasks (30 -> MT30, 80 -> MT80), if any."""
    for names in TASK_SETS.values():
        if len(names) == num_tasks:
            return names
    return None
