"""Type aliases shared by the custom task modules."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from dm_control.rl import control

Random = int | np.random.RandomState | None
"""What dm_control tasks accept as ``random``: a seed, a generator, or None (OS entropy)."""

TaskFactory = Callable[[Random], control.Environment]
"""Builds a fresh dm_control environment of one task from a seed."""
