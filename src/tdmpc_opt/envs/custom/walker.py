"""Custom walker tasks of MT30: walk backwards and run backwards.

Model: dm_control's ``walker.xml`` with the floor plane twice as long (half-length 500 m
instead of 250 m), as in TD-MPC2. Observations (``orientations``, ``height``, ``velocity``),
the initial-state distribution (random joint angles) and the timing (0.025 s per control
step, 25 s) are the suite's. The reward is the suite's walk/run reward with the target
velocity mirrored: the centre of mass should move in the -x direction.
"""

from __future__ import annotations

import functools

from dm_control.rl import control
from dm_control.suite import walker
from dm_control.utils import rewards

from tdmpc_opt.envs.custom._model import ASSETS, widen_floor
from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 25.0
"""Episode length in simulated seconds (1000 control steps of 0.025 s)."""
CONTROL_TIMESTEP_S = 0.025
"""Simulated seconds per control step (five 0.005 s physics steps)."""
FLOOR_HALF_LENGTH_M = 500.0
"""Half-length of the floor plane along x (suite: 250 m)."""
STAND_HEIGHT_M = 1.2
"""Torso height (m) above which the standing term is 1."""
WALK_SPEED_MPS = 1.0
"""walk-backwards: backward centre-of-mass speed (m/s) for the full move reward."""
RUN_SPEED_MPS = 8.0
"""run-backwards: backward centre-of-mass speed (m/s) for the full move reward."""


@functools.cache
def model_xml() -> str:
    """The walker MJCF with the longer floor plane."""
    return widen_floor("walker.xml", "floor", FLOOR_HALF_LENGTH_M)


class BackwardsWalker(walker.PlanarWalker):
    """The suite planar walker, rewarded for moving backwards at ``move_speed`` or faster."""

    def __init__(self, move_speed: float, random: Random = None) -> None:
        if move_speed <= 0:
            raise ValueError(f"move_speed must be positive, got {move_speed}")
        super().__init__(move_speed, random=random)

    def get_reward(self, physics: walker.Physics) -> float:
        """Standing x upright, scaled by how fast the walker moves backwards (in [0, 1])."""
        standing = rewards.tolerance(physics.torso_height(),
                                     bounds=(STAND_HEIGHT_M, float("inf")),
                                     margin=STAND_HEIGHT_M / 2)
        upright = (1 + physics.torso_upright()) / 2
        stand_reward = (3 * standing + upright) / 4
        # Linear: 1 at -move_speed or faster backwards, 0.5 at -move_speed / 2, 0 at standstill.
        backwards = rewards.tolerance(physics.horizontal_velocity(),
                                      bounds=(-float("inf"), -self._move_speed),
                                      margin=self._move_speed / 2,
                                      value_at_margin=0.5, sigmoid="linear")
        return float(stand_reward * (5 * backwards + 1) / 6)


def _factory(move_speed: float, name: str) -> TaskFactory:
    def make(random: Random = None) -> control.Environment:
        physics = walker.Physics.from_xml_string(model_xml(), ASSETS)
        return control.Environment(physics, BackwardsWalker(move_speed, random=random),
                                   time_limit=TIME_LIMIT_S,
                                   control_timestep=CONTROL_TIMESTEP_S)

    make.__doc__ = f"Build the {name} environment."
    return make


TASKS: dict[str, TaskFactory] = {
    "walker-walk-backwards": _factory(WALK_SPEED_MPS, "walker-walk-backwards"),
    "walker-run-backwards": _factory(RUN_SPEED_MPS, "walker-run-backwards"),
}
"""Task name -> environment factory."""
