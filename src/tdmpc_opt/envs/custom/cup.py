"""Custom ball-in-cup task of MT30: spin the ball around the cup.

Model (TD-MPC2's ``ball_in_cup.xml`` is the suite's unchanged), observations (``position``
(4), ``velocity`` (4)) and timing (0.02 s per control step, 20 s) are dm_control's
ball-in-cup catch. Two things differ:

* initial state: with probability 0.9 the ball starts inside the cup (positions are
  resampled until it is), otherwise anywhere collision-free, as in the catch task;
* reward: zero while the ball is in the cup; otherwise the mean of a distance term (ball at
  least 0.5 m from the cup's target site, weight 1) and a speed term (ball at least 6 m/s,
  weight 2).
"""

from __future__ import annotations

import numpy as np
from dm_control.rl import control
from dm_control.suite import ball_in_cup, base, common
from dm_control.utils import rewards

from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 20.0
"""Episode length in simulated seconds (1000 control steps of 0.02 s)."""
CONTROL_TIMESTEP_S = 0.02
"""Simulated seconds per control step."""
SPIN_DISTANCE_M = 0.5
"""Ball-to-target distance (m) at and above which the distance term is 1."""
SPIN_SPEED_MPS = 6.0
"""Ball speed (m/s, in the x-z plane) at and above which the speed term is 1."""
START_OUTSIDE_PROBABILITY = 0.1
"""Chance that an episode may start with the ball outside the cup."""
BALL_X_RANGE_M = (-0.2, 0.2)
"""Range of the initial ball x position, relative to the cup's rest position."""
BALL_Z_RANGE_M = (0.2, 0.5)
"""Range of the initial ball z position, relative to the cup's rest position."""


class CupSpin(ball_in_cup.BallInCup):
    """Ball-in-cup rewarded for swinging the ball around the cup far and fast."""

    def initialize_episode(self, physics: ball_in_cup.Physics) -> None:
        """Place the ball collision-free; in the cup unless a 10% draw allows anywhere."""
        may_start_outside = self.random.uniform() < START_OUTSIDE_PROBABILITY
        while True:
            physics.named.data.qpos["ball_x"] = self.random.uniform(*BALL_X_RANGE_M)
            physics.named.data.qpos["ball_z"] = self.random.uniform(*BALL_Z_RANGE_M)
            physics.after_reset()
            penetrating = physics.data.ncon > 0
            if not penetrating and (may_start_outside or physics.in_target()):
                break
        # Skip BallInCup's own placement; only the base-class bookkeeping remains.
        base.Task.initialize_episode(self, physics)

    def get_reward(self, physics: ball_in_cup.Physics) -> float:
        """(distance term + 2 x speed term) / 3, or 0 while the ball is in the cup."""
        distance = np.linalg.norm(physics.ball_to_target())
        velocity = physics.named.data.qvel
        speed = np.linalg.norm([abs(velocity["ball_x"]), abs(velocity["ball_z"])])
        far = rewards.tolerance(distance, bounds=(SPIN_DISTANCE_M, float("inf")),
                                margin=SPIN_DISTANCE_M / 2, value_at_margin=0.5,
                                sigmoid="linear")
        fast = rewards.tolerance(speed, bounds=(SPIN_SPEED_MPS, float("inf")),
                                 margin=SPIN_SPEED_MPS / 2, value_at_margin=0.5,
                                 sigmoid="linear")
        outside = 1 - physics.in_target()
        return float(outside * (far + 2 * fast) / 3)


def spin(random: Random = None) -> control.Environment:
    """Build the cup-spin environment."""
    physics = ball_in_cup.Physics.from_xml_string(common.read_model("ball_in_cup.xml"),
                                                  common.ASSETS)
    return control.Environment(physics, CupSpin(random=random), time_limit=TIME_LIMIT_S,
                               control_timestep=CONTROL_TIMESTEP_S)


TASKS: dict[str, TaskFactory] = {"cup-spin": spin}
"""Task name -> environment factory."""
