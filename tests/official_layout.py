"""Write dataset files in exactly the published TD-MPC2 layout, without tensordict.

A published file is ``torch.save(td)`` of a ``tensordict.tensordict.TensorDict`` (tensordict
0.2, October 2023). Pickle records such an object as the class's import path, then its
instance ``__dict__``; the entries live in a ``tensordict.utils._StringOnlyDict``. Here
stand-in classes carrying those import paths are registered in ``sys.modules`` only while
``torch.save`` runs, so the file's bytes name the same globals and hold the same state as a
real one.
"""

from __future__ import annotations

import contextlib
import sys
import types
from pathlib import Path

import numpy as np
import torch


class _StringOnlyDict(dict):
    pass


class TensorDict:
    def __init__(self, fields: dict[str, torch.Tensor], batch_size: tuple[int, ...]):
        # the instance attributes of tensordict 0.2.1's TensorDict, in its order
        self._safe = False
        self._lazy = False
        self._inplace_set = False
        self.is_meta = False
        self._is_locked = False
        self._cache = None
        self._last_op = None
        self._TensorDictBase__last_op_queue = None
        self._lock_id = set()
        self._locked_tensordicts = []
        self._is_shared = False
        self._is_memmap = False
        self._device = torch.device("cpu")
        self._tensordict = _StringOnlyDict(fields)
        self._batch_size = torch.Size(batch_size)
        self._td_dim_names = [None] * len(batch_size)


@contextlib.contextmanager
def _fake_tensordict(td_module: str):
    """Make ``tensordict``'s import paths resolve to the stand-ins while pickling."""
    names = ["tensordict", td_module, "tensordict.utils"]
    saved = {n: sys.modules.get(n) for n in names}
    root = types.ModuleType("tensordict")
    td_mod = types.ModuleType(td_module)
    utils = types.ModuleType("tensordict.utils")
    TensorDict.__module__, TensorDict.__qualname__ = td_module, "TensorDict"
    _StringOnlyDict.__module__ = "tensordict.utils"
    td_mod.TensorDict, utils._StringOnlyDict = TensorDict, _StringOnlyDict
    root.utils = utils
    setattr(root, td_module.split(".")[-1], td_mod)
    sys.modules.update({"tensordict": root, td_module: td_mod, "tensordict.utils": utils})
    try:
        yield
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def write_official(path: Path, obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
                   task: np.ndarray, td_module: str = "tensordict.tensordict",
                   plain_dict: bool = False) -> Path:
    """Save ``obs [E,T,D]``, ``action [E,T,A]``, ``reward [E,T]``, ``task [E,T]`` (int32)."""
    fields = {"action": torch.as_tensor(action, dtype=torch.float32),
              "obs": torch.as_tensor(obs, dtype=torch.float32),
              "reward": torch.as_tensor(reward, dtype=torch.float32),
              "task": torch.as_tensor(task, dtype=torch.int32)}
    if plain_dict:
        torch.save(fields, path)
        return path
    with _fake_tensordict(td_module):
        torch.save(TensorDict(fields, tuple(obs.shape[:2])), path)
    return path


def make_episodes(num: int, steps: int, obs_dim: int, action_dim: int, num_tasks: int,
                  seed: int = 0, obs_used: int | None = None):
    """Synthetic episodes in the published layout, with learnable structure.

    ``obs[e, t] = [e, t, noise...]`` (so tests can locate rows), rewards a smooth function of
    the previous observation and the action, step 0's action uninitialised-looking filler and
    reward NaN, as in the published files.
    """
    rng = np.random.default_rng(seed)
    obs = rng.standard_normal((num, steps, obs_dim)).astype(np.float32)
    obs[:, :, 0] = np.arange(num)[:, None]
    obs[:, :, 1] = np.arange(steps)[None, :]
    if obs_used is not None:
        obs[:, :, obs_used:] = 0
    action = rng.uniform(-1, 1, (num, steps, action_dim)).astype(np.float32)
    action[:, 0] = 1e30  # filler of torch.empty_like in the released data
    reward = np.zeros((num, steps), np.float32)
    reward[:, 1:] = np.tanh(obs[:, :-1, 2] + action[:, 1:, 0]) + 1
    reward[:, 0] = np.nan
    task = np.repeat((np.arange(num) % num_tasks)[:, None], steps, axis=1).astype(np.int32)
    return obs, action, reward, task
