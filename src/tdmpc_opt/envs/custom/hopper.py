"""Custom hopper task of MT30: hop backwards.

Model, observations (``position`` without the horizontal root position, ``velocity``,
``touch``), initial-state distribution (random joint angles) and timing (0.02 s per control
step, 20 s) are dm_control's hopper; TD-MPC2's ``hopper.xml`` is the suite's unchanged. The
reward is the suite's hop reward with the target speed mirrored and halved.
"""

from __future__ import annotations

from dm_control.rl import control
from dm_control.suite import common, hopper
from dm_control.utils import rewards

from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 20.0
"""Episode length in simulated seconds (1000 control steps of 0.02 s)."""
CONTROL_TIMESTEP_S = 0.02
"""Simulated seconds per control step (four 0.005 s physics steps)."""
STAND_HEIGHT_M = 0.6
"""Lower bound (m) of the torso-over-foot height that counts as standing."""
MAX_STAND_HEIGHT_M = 2.0
"""Upper bound (m) of the torso-over-foot height that counts as standing."""
BACKWARDS_SPEED_MPS = 1.0
"""Backward speed (m/s) for the full hop reward (half the suite's 2 m/s forward hop speed)."""


class HopBackwards(hopper.Hopper):
    """The suite hopper, rewarded for hopping in the -x direction while standing."""

    def __init__(self, random: Random = None) -> None:
        super().__init__(hopping=False, random=random)

    def get_reward(self, physics: hopper.Physics) -> float:
        """Standing indicator x backward-speed term (linear, 0 at standstill), in [0, 1]."""
        standing = rewards.tolerance(physics.height(), (STAND_HEIGHT_M, MAX_STAND_HEIGHT_M))
        # Linear: 1 at -1 m/s or faster backwards, 0.5 at -0.5 m/s, 0 at standstill.
        hopping = rewards.tolerance(physics.speed(),
                                    bounds=(-float("inf"), -BACKWARDS_SPEED_MPS),
                                    margin=BACKWARDS_SPEED_MPS / 2,
                                    value_at_margin=0.5, sigmoid="linear")
        return float(standing * hopping)


def hop_backwards(random: Random = None) -> control.Environment:
    """Build the hopper-hop-backwards environment."""
    physics = hopper.Physics.from_xml_string(common.read_model("hopper.xml"), common.ASSETS)
    return control.Environment(physics, HopBackwards(random=random), time_limit=TIME_LIMIT_S,
                               control_timestep=CONTROL_TIMESTEP_S)


TASKS: dict[str, TaskFactory] = {"hopper-hop-backwards": hop_backwards}
"""Task name -> environment factory."""
