"""Custom pendulum task of MT30: spin the pendulum as fast as possible.

Model (TD-MPC2's ``pendulum.xml`` is the suite's unchanged), observations (``orientation``
(2), ``velocity`` (1)), initial state (pole angle uniform in [-pi, pi)) and timing (0.02 s
per step, 20 s) are dm_control's pendulum swingup; only the reward differs.
"""

from __future__ import annotations

import numpy as np
from dm_control.rl import control
from dm_control.suite import common, pendulum
from dm_control.utils import rewards

from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 20.0
"""Episode length in simulated seconds (1000 physics steps of 0.02 s)."""
SPIN_SPEED_RADPS = 9.0
"""Angular speed (rad/s, either direction) at and above which the reward is 1."""


class Spin(pendulum.SwingUp):
    """Pendulum rewarded for angular speed: reward = min(1, |omega| / 9 rad/s)."""

    def get_reward(self, physics: pendulum.Physics) -> float:
        """Linear in |angular velocity|: 0.5 at 4.5 rad/s, 1 from 9 rad/s on."""
        return float(rewards.tolerance(np.linalg.norm(physics.angular_velocity()),
                                       bounds=(SPIN_SPEED_RADPS, float("inf")),
                                       margin=SPIN_SPEED_RADPS / 2,
                                       value_at_margin=0.5, sigmoid="linear"))


def spin(random: Random = None) -> control.Environment:
    """Build the pendulum-spin environment."""
    physics = pendulum.Physics.from_xml_string(common.read_model("pendulum.xml"),
                                               common.ASSETS)
    return control.Environment(physics, Spin(random=random), time_limit=TIME_LIMIT_S)


TASKS: dict[str, TaskFactory] = {"pendulum-spin": spin}
"""Task name -> environment factory."""
