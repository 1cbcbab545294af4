"""Helpers to build MuJoCo models for the custom tasks from dm_control's own suite XML.

Every custom MT30 task reuses a DeepMind Control Suite model. Where TD-MPC2 ships an edited
copy of a suite XML file, we read the file of the installed dm_control package at run time
and apply the same edits with :mod:`xml.etree.ElementTree`, so no model file is duplicated.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET

from dm_control.suite import common

ASSETS: dict[str, bytes] = common.ASSETS
"""The shared suite assets (skybox, materials, visual settings) the suite XML files include."""


def load_suite_xml(filename: str) -> ET.Element:
    """Parse ``filename`` (e.g. ``cheetah.xml``) from dm_control's suite directory."""
    return ET.fromstring(common.read_model(filename))


def find_element(root: ET.Element, tag: str, name: str) -> ET.Element:
    """Return the unique ``<tag name="name">`` element below ``root``.

    Raises:
        LookupError: there is no such element, or more than one (the installed dm_control
            model differs from the one this module was written for).
    """
    found = [e for e in root.iter(tag) if e.get("name") == name]
    if len(found) != 1:
        raise LookupError(f"expected one <{tag} name={name!r}> in the model, found {len(found)}")
    return found[0]


def find_parent(root: ET.Element, child: ET.Element) -> ET.Element:
    """Return the element whose direct child is ``child``."""
    for parent in root.iter():
        if any(c is child for c in parent):
            return parent
    raise LookupError(f"<{child.tag} name={child.get('name')!r}> has no parent in the model")


def to_xml_string(root: ET.Element) -> str:
    """Serialise a (modified) model tree back to an MJCF string."""
    return ET.tostring(root, encoding="unicode")


def widen_floor(filename: str, geom_name: str, half_length: float) -> str:
    """Return the suite model ``filename`` with the floor plane ``geom_name`` made longer.

    Only the plane's first half-size (along x) changes; MuJoCo planes are infinite for
    collisions, so this alters the rendered ground (and the model's spatial extent), which
    is what TD-MPC2's edited cheetah/walker files do.
    """
    root = load_suite_xml(filename)
    floor = find_element(root, "geom", geom_name)
    sizes = floor.get("size", "").split()
    if len(sizes) != 3:
        raise LookupError(f"floor {geom_name!r} of {filename} has no 3-value size")
    floor.set("size", " ".join([f"{half_length:g}", *sizes[1:]]))
    return to_xml_string(root)
