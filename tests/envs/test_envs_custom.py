"""The 11 custom MT30 tasks: models, observation layout and rewards on constructed states.

Rewards are checked against closed forms written out here (not against dm_control's
``tolerance``): e.g. a linear tolerance with value 0.5 at a margin of half the bound is
simply ``clip(x / bound, 0, 1)``, and a Gaussian tolerance of bound ``b`` and margin ``m``
is ``0.1 ** ((b - x) / m) ** 2`` below ``b``.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from tdmpc_opt.envs import DMControlEnv, make_env
from tdmpc_opt.envs.custom import CUSTOM_TASKS
from tdmpc_opt.envs.dmcontrol import flatten_observation
from tdmpc_opt.tasks import TASK_SETS, get_task


def gaussian_up(x: float, bound: float = 1.2, margin: float = 0.6) -> float:
    """1 at or above ``bound``, 0.1 one ``margin`` below it (Gaussian in between)."""
    return 1.0 if x >= bound else 0.1 ** (((bound - x) / margin) ** 2)


def ramp(x: float) -> float:
    return float(np.clip(x, 0.0, 1.0))


def reward_at(env: DMControlEnv, set_state: Callable) -> float:
    """Reset the physics, apply ``set_state(physics)``, recompute derived quantities, score."""
    physics = env.physics
    with physics.reset_context():
        set_state(physics)
    return float(env.dm_task.get_reward(physics))


def moving(**qpos_and_vel: float) -> Callable:
    """A state setter: ``name=value`` sets qpos, ``name_vel=value`` sets qvel."""

    def apply(physics) -> None:
        for key, value in qpos_and_vel.items():
            if key.endswith("_vel"):
                physics.named.data.qvel[key[:-4]] = value
            else:
                physics.named.data.qpos[key] = value

    return apply


def test_custom_registry_matches_mt30() -> None:
    custom = [t for t in TASK_SETS["mt30"] if get_task(t).suite == "custom"]
    assert sorted(CUSTOM_TASKS) == sorted(custom) and len(custom) == 11


def test_longer_floors_and_three_link_reacher_model() -> None:
    assert make_env("cheetah-jump").physics.named.model.geom_size["ground", 0] == 200
    assert make_env("walker-run-backwards").physics.named.model.geom_size["floor", 0] == 500
    model = make_env("reacher-three-easy").physics.named.model
    assert list(model.jnt_range.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    assert model.jnt_limited["shoulder0"] == 0
    np.testing.assert_allclose(np.rad2deg(model.jnt_range[1:]), [[-80, 80], [-80, 80]])
    assert list(model.actuator_gear.axes.row.names) == ["shoulder0", "shoulder1", "wrist"]
    np.testing.assert_allclose(model.actuator_gear[:, 0], 0.05)
    physics = make_env("reacher-three-easy").physics
    with physics.reset_context():
        physics.named.data.qpos["shoulder0"] = np.pi / 2
    np.testing.assert_allclose(physics.named.data.geom_xpos["finger", :2], [0, 0.27], atol=1e-12)


@pytest.mark.parametrize(("task", "layout"), [
    ("cheetah-run-front", lambda p: [p.data.qpos[1:], p.data.qvel]),
    ("walker-walk-backwards", lambda p: [p.named.data.xmat[1:, ["xx", "xz"]].ravel(),
                                         [p.named.data.xpos["torso", "z"]], p.data.qvel]),
    ("hopper-hop-backwards", lambda p: [p.data.qpos[1:], p.data.qvel,
                                        np.log1p(p.data.sensordata[-2:])]),
    ("reacher-three-hard", lambda p: [p.data.qpos, p.named.data.geom_xpos["target", :2]
                                      - p.named.data.geom_xpos["finger", :2], p.data.qvel]),
    ("cup-spin", lambda p: [p.data.qpos, p.data.qvel]),
    ("pendulum-spin", lambda p: [p.named.data.xmat["pole", ["zz", "xz"]], p.data.qvel]),
])
def test_observation_layout(task: str, layout: Callable) -> None:
    env = make_env(task, seed=4)
    env.reset()
    obs = env.step(env.action_space.sample())[0]
    expected = np.concatenate([np.ravel(x) for x in layout(env.physics)]).astype(np.float32)
    np.testing.assert_array_equal(obs, expected)
    assert obs.shape == (get_task(task).obs_dim,)


def test_cheetah_run_backwards_rewards_backward_speed() -> None:
    env = make_env("cheetah-run-backwards", seed=0)
    for v in (-12.0, -8.0, -4.0, -1.0, 0.0, 3.0):
        assert reward_at(env, moving(rootx_vel=v)) == pytest.approx(ramp(-v / 8))


@pytest.mark.parametrize(("task", "lifted_foot"), [("cheetah-run-front", "bfoot"),
                                                    ("cheetah-run-back", "ffoot")])
def test_cheetah_run_on_one_leg(task: str, lifted_foot: str) -> None:
    env = make_env(task, seed=0)
    for v in (8.0, 6.0, 3.0, 0.0, -2.0):  # whole body 2 m up: the height terms are 1
        expected = (5 * ramp(v / 6) + 1) / 6
        assert reward_at(env, moving(rootz=2.0, rootx_vel=v)) == pytest.approx(expected)
    reward = reward_at(env, moving(rootx_vel=6.0))  # on the ground: torso 0.7 m
    z = env.physics.named.data.xpos
    up = (3 * gaussian_up(z[lifted_foot, "z"]) + 2 * gaussian_up(z["torso", "z"])) / 5
    assert reward == pytest.approx(up) and reward < 0.2


def test_cheetah_jump() -> None:
    env = make_env("cheetah-jump", seed=0)
    for v, still in ((0.0, 1.0), (0.4, 1.0), (0.75, 0.5), (-0.75, 0.5), (1.0, 0.0)):
        assert reward_at(env, moving(rootz=2.0, rootx_vel=v)) == pytest.approx((5 + still) / 6)
    reward = reward_at(env, moving())
    z = env.physics.named.data.xpos
    torso = z["torso", "z"]
    height = (gaussian_up((torso + z["bfoot", "z"]) / 2)
              + gaussian_up((torso + z["ffoot", "z"]) / 2)) / 2
    assert reward == pytest.approx((5 * height + 1) / 6)


@pytest.mark.parametrize(("task", "speed"), [("walker-walk-backwards", 1.0),
                                              ("walker-run-backwards", 8.0)])
def test_walker_backwards(task: str, speed: float) -> None:
    env = make_env(task, seed=0)
    for v in (-2 * speed, -speed, -speed / 2, 0.0, speed):  # standing upright: stand term 1
        expected = (5 * ramp(-v / speed) + 1) / 6
        assert reward_at(env, moving(rootx_vel=v)) == pytest.approx(expected)
    # Torso lowered to 0.6 m (half the stand height): standing term 0.1, upright term 1.
    reward = reward_at(env, moving(rootz=-0.7, rootx_vel=-speed))
    assert reward == pytest.approx((3 * 0.1 + 1) / 4)


def test_hopper_hop_backwards() -> None:
    env = make_env("hopper-hop-backwards", seed=0)
    for v in (-2.0, -1.0, -0.5, -0.25, 0.0, 1.0):  # default pose: torso 0.98 m over the foot
        assert reward_at(env, moving(rootx_vel=v)) == pytest.approx(ramp(-v))
    assert reward_at(env, moving(rooty=np.pi, rootx_vel=-2.0)) == 0.0  # upside down


def test_pendulum_spin() -> None:
    env = make_env("pendulum-spin", seed=0)
    for w in (-12.0, -9.0, -4.5, 0.0, 2.25, 9.5):
        assert reward_at(env, moving(hinge_vel=w)) == pytest.approx(min(1.0, abs(w) / 9))


def test_cup_spin() -> None:
    env = make_env("cup-spin", seed=0)
    physics = env.physics
    # Ball in the cup: no reward however fast it moves.
    assert reward_at(env, moving(ball_z=0.35, ball_x_vel=10.0)) == 0.0
    assert physics.in_target() == 1.0
    for dx, vx, vz in ((0.6, 8.0, 0.0), (0.25, 3.0, 0.0), (0.4, 3.0, -4.0), (-0.3, 0.0, 0.0)):
        reward = reward_at(env, moving(ball_z=0.35, ball_x=dx, ball_x_vel=vx, ball_z_vel=vz))
        distance = np.linalg.norm(physics.ball_to_target())
        assert distance == pytest.approx(abs(dx))
        speed = np.hypot(vx, vz)
        assert reward == pytest.approx((ramp(distance / 0.5) + 2 * ramp(speed / 6)) / 3)


def test_cup_spin_usually_starts_in_the_cup() -> None:
    env = make_env("cup-spin", seed=0)
    starts_in = []
    for _ in range(40):
        env.reset()
        starts_in.append(env.physics.in_target())
    assert np.mean(starts_in) >= 0.75  # 0.9 + 0.1 x chance, by construction


@pytest.mark.parametrize(("task", "radius"), [("reacher-three-easy", 0.05),
                                               ("reacher-three-hard", 0.015)])
def test_reacher_three_reward_is_touching_the_target(task: str, radius: float) -> None:
    env = make_env(task, seed=0)
    env.reset()
    assert env.physics.named.model.geom_size["target", 0] == radius
    target = env.physics.named.model.geom_pos["target"]
    for offset in (0.0, 0.03, 0.2):
        target[:2] = [0.27 - offset, 0.0]  # the fingertip is at (0.27, 0) with zero angles
        touching = offset <= radius + 0.01  # target radius + fingertip radius
        assert reward_at(env, moving()) == (1.0 if touching else 0.0)


def test_flatten_observation_keeps_dict_order() -> None:
    obs = {"b": np.array([[1.0, 2.0]]), "a": np.float64(3.0), "c": np.array([4.0])}
    np.testing.assert_array_equal(flatten_observation(obs), [1, 2, 3, 4])
