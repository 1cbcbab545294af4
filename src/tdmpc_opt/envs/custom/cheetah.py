"""Custom cheetah tasks of MT30: run backwards, run on the front or back legs, jump.

Model: dm_control's ``cheetah.xml`` with the ground plane twice as long (half-length 200 m
instead of 100 m), as in TD-MPC2. Observations (``position`` = qpos without the horizontal
root position, then ``velocity``), the initial-state distribution (random limited joints,
then 200 settling steps) and the timing (0.01 s per control step, 10 s) are the suite's.
"""

from __future__ import annotations

import functools

from dm_control.rl import control
from dm_control.suite import cheetah
from dm_control.utils import rewards

from tdmpc_opt.envs.custom._model import ASSETS, widen_floor
from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 10.0
"""Episode length in simulated seconds (1000 physics-control steps of 0.01 s)."""
FLOOR_HALF_LENGTH_M = 200.0
"""Half-length of the ground plane along x (suite: 100 m)."""
BACKWARDS_SPEED_MPS = 8.0
"""run-backwards: speed (m/s, backwards) at and beyond which the reward is 1 (0.8 x 10 m/s)."""
ONE_FOOT_RUN_SPEED_MPS = 6.0
"""run-front / run-back: forward speed (m/s) for the full speed bonus (0.6 x 10 m/s)."""
JUMP_SPEED_TOLERANCE_MPS = 0.5
"""jump: horizontal speed (m/s, either way) within which the cheetah counts as in place."""
JUMP_HEIGHT_M = 1.2
"""Height (m) that the torso and the lifted foot should reach."""


@functools.cache
def model_xml() -> str:
    """The cheetah MJCF with the longer ground plane."""
    return widen_floor("cheetah.xml", "ground", FLOOR_HALF_LENGTH_M)


def _height_reward(height: float) -> float:
    """1 at or above :data:`JUMP_HEIGHT_M`, falling off as a Gaussian (0.1 half a height lower)."""
    return float(rewards.tolerance(height, bounds=(JUMP_HEIGHT_M, float("inf")),
                                   margin=JUMP_HEIGHT_M / 2))


class CustomCheetah(cheetah.Cheetah):
    """The suite cheetah with one of the MT30 goals as reward.

    Goals: ``run-backwards``, ``run-front`` (on the front leg: back foot ``bfoot`` up),
    ``run-back`` (on the back leg: front foot ``ffoot`` up) and ``jump``.
    """

    GOALS = ("run-backwards", "run-front", "run-back", "jump")

    def __init__(self, goal: str, random: Random = None) -> None:
        if goal not in self.GOALS:
            raise ValueError(f"unknown cheetah goal {goal!r}; expected one of {self.GOALS}")
        super().__init__(random=random)
        self.goal = goal

    def _run_backwards(self, physics: cheetah.Physics) -> float:
        """Linear in backward speed: 0 at standstill or forwards, 1 at 8 m/s backwards."""
        return float(rewards.tolerance(
            physics.speed(), bounds=(-float("inf"), -BACKWARDS_SPEED_MPS),
            margin=BACKWARDS_SPEED_MPS, value_at_margin=0, sigmoid="linear"))

    def _stand_on_one_foot(self, physics: cheetah.Physics, lifted_foot: str) -> float:
        """Mean of torso and ``lifted_foot`` height high (weight 5), small speed (weight 1)."""
        data = physics.named.data
        mean_height = (data.xpos["torso", "z"] + data.xpos[lifted_foot, "z"]) / 2
        still = rewards.tolerance(
            physics.speed(), bounds=(-JUMP_SPEED_TOLERANCE_MPS, JUMP_SPEED_TOLERANCE_MPS),
            margin=JUMP_SPEED_TOLERANCE_MPS, value_at_margin=0, sigmoid="linear")
        return (5 * _height_reward(mean_height) + float(still)) / 6

    def _run_on_one_foot(self, physics: cheetah.Physics, lifted_foot: str) -> float:
        """Lifted foot (weight 3) and torso (weight 2) high, scaled by a forward-speed term."""
        data = physics.named.data
        up = (3 * _height_reward(data.xpos[lifted_foot, "z"])
              + 2 * _height_reward(data.xpos["torso", "z"])) / 5
        fast = rewards.tolerance(
            physics.speed(), bounds=(ONE_FOOT_RUN_SPEED_MPS, float("inf")),
            margin=ONE_FOOT_RUN_SPEED_MPS, value_at_margin=0, sigmoid="linear")
        return up * (5 * float(fast) + 1) / 6

    def get_reward(self, physics: cheetah.Physics) -> float:
        """The reward of :attr:`goal` in the current state, in [0, 1]."""
        if self.goal == "run-backwards":
            return self._run_backwards(physics)
        if self.goal == "run-front":
            return self._run_on_one_foot(physics, "bfoot")
        if self.goal == "run-back":
            return self._run_on_one_foot(physics, "ffoot")
        # jump: as high on the front leg as on the back leg, on average.
        return (self._stand_on_one_foot(physics, "bfoot")
                + self._stand_on_one_foot(physics, "ffoot")) / 2


def _factory(goal: str) -> TaskFactory:
    def make(random: Random = None) -> control.Environment:
        physics = cheetah.Physics.from_xml_string(model_xml(), ASSETS)
        return control.Environment(physics, CustomCheetah(goal, random=random),
                                   time_limit=TIME_LIMIT_S)

    make.__doc__ = f"Build the cheetah {goal} environment."
    return make


TASKS: dict[str, TaskFactory] = {f"cheetah-{g}": _factory(g) for g in CustomCheetah.GOALS}
"""Task name -> environment factory."""
