"""Custom reacher tasks of MT30: a three-link planar reacher, easy and hard target sizes.

Model: dm_control's ``reacher.xml`` (arena, target, damping 0.01, motor gear 0.05,
0.02 s timestep, contacts off) with the two-link arm replaced by a three-link arm, as in
TD-MPC2's ``reacher_three_links.xml``:

* ``arm0`` (joint ``shoulder0``, unlimited hinge), ``arm1`` (joint ``shoulder1``) and
  ``hand`` (joint ``wrist``), joints 0.09 m apart; ``shoulder1`` and ``wrist`` are limited
  to +-80 degrees;
* the ``arm0``/``arm1`` capsules are 0.09 m long, the ``hand`` capsule 0.1 m, and the
  fingertip sphere sits 0.09 m past the wrist (reach 0.27 m);
* three motors, in the order shoulder0, shoulder1, wrist.

The task is the suite's reacher task unchanged: random joint angles (uniform in the limits,
or in [-pi, pi] for the unlimited shoulder), a target at a random angle and a radius in
[0.05, 0.20] m, reward 1 while the fingertip touches the target, observations ``position``
(3), ``to_target`` (2), ``velocity`` (3).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET

from dm_control.rl import control
from dm_control.suite import reacher

from tdmpc_opt.envs.custom._model import (
    ASSETS,
    find_element,
    find_parent,
    load_suite_xml,
    to_xml_string,
)
from tdmpc_opt.envs.custom.types import Random, TaskFactory

TIME_LIMIT_S = 20.0
"""Episode length in simulated seconds (1000 physics steps of 0.02 s)."""
EASY_TARGET_RADIUS_M = 0.05
"""Target sphere radius of reacher-three-easy (the suite's easy size)."""
HARD_TARGET_RADIUS_M = 0.015
"""Target sphere radius of reacher-three-hard (the suite's hard size)."""
LINK_SPACING_M = 0.09
"""Distance between consecutive joints, and from the wrist to the fingertip."""
HAND_CAPSULE_LENGTH_M = 0.1
"""Length of the drawn/colliding hand capsule (it reaches 1 cm past the fingertip centre)."""
CAPSULE_RADIUS_M = 0.01
"""Radius of the link capsules and of the fingertip sphere."""
ARM_HEIGHT_M = 0.01
"""Height of the arm's base above the ground."""
JOINT_LIMIT_DEG = 80.0
"""Symmetric range limit of the ``shoulder1`` and ``wrist`` joints."""


def _add_link(parent: ET.Element, name: str, joint: str, pos: str, limited: bool,
              capsule_length: float = LINK_SPACING_M) -> ET.Element:
    """Append one arm link (body, capsule geom, hinge joint) to ``parent``."""
    body = ET.SubElement(parent, "body", name=name, pos=pos)
    ET.SubElement(body, "geom", name=name, type="capsule",
                  fromto=f"0 0 0 {capsule_length:g} 0 0", size=f"{CAPSULE_RADIUS_M:g}",
                  material="self")
    attrs = {"name": joint}
    if limited:
        attrs.update(limited="true", range=f"{-JOINT_LIMIT_DEG:g} {JOINT_LIMIT_DEG:g}")
    ET.SubElement(body, "joint", attrs)
    return body


@functools.cache
def model_xml() -> str:
    """The three-link reacher MJCF, built from the suite's two-link model."""
    root = load_suite_xml("reacher.xml")
    old_arm = find_element(root, "body", "arm")
    worldbody = find_parent(root, old_arm)
    index = list(worldbody).index(old_arm)
    worldbody.remove(old_arm)

    arm0 = ET.Element("body", name="arm0", pos=f"0 0 {ARM_HEIGHT_M:g}")
    worldbody.insert(index, arm0)
    ET.SubElement(arm0, "geom", name="arm0", type="capsule",
                  fromto=f"0 0 0 {LINK_SPACING_M:g} 0 0", size=f"{CAPSULE_RADIUS_M:g}",
                  material="self")
    ET.SubElement(arm0, "joint", name="shoulder0")
    spacing = f"{LINK_SPACING_M:g} 0 0"
    arm1 = _add_link(arm0, "arm1", "shoulder1", spacing, limited=True)
    hand = _add_link(arm1, "hand", "wrist", spacing, limited=True,
                     capsule_length=HAND_CAPSULE_LENGTH_M)
    finger = ET.SubElement(hand, "body", name="finger", pos=spacing)
    ET.SubElement(finger, "camera", name="hand", pos="0 0 .2", mode="track")
    ET.SubElement(finger, "geom", name="finger", type="sphere", size=f"{CAPSULE_RADIUS_M:g}",
                  material="effector")

    actuator = root.find("actuator")
    if actuator is None:
        raise LookupError("reacher.xml has no <actuator> section")
    for motor in list(actuator):
        actuator.remove(motor)
    for joint in ("shoulder0", "shoulder1", "wrist"):
        ET.SubElement(actuator, "motor", name=joint, joint=joint)
    return to_xml_string(root)


def _factory(target_radius: float, name: str) -> TaskFactory:
    def make(random: Random = None) -> control.Environment:
        physics = reacher.Physics.from_xml_string(model_xml(), ASSETS)
        task = reacher.Reacher(target_size=target_radius, random=random)
        return control.Environment(physics, task, time_limit=TIME_LIMIT_S)

    make.__doc__ = f"Build the {name} environment."
    return make


TASKS: dict[str, TaskFactory] = {
    "reacher-three-easy": _factory(EASY_TARGET_RADIUS_M, "reacher-three-easy"),
    "reacher-three-hard": _factory(HARD_TARGET_RADIUS_M, "reacher-three-hard"),
}
"""Task name -> environment factory."""
