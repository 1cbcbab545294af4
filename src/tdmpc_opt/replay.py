"""Sampling subsequences of episodes, and the in-memory replay buffer of online training.

A *source* is anything with the arrays of :class:`~tdmpc_opt.data.Dataset`: ``obs [N, D]``,
``action [N, A]``, ``reward [N]``, ``terminated [N]`` or None, and ``episodes [E, 3]`` (first
row, number of observations, task id). Row 0 of an episode is its first observation; its
action/reward rows are filler. :class:`SequenceSampler` draws an episode uniformly among those
with at least H + 1 observations (as TorchRL's ``SliceSampler`` in TD-MPC2), then a start
uniformly, and reads exactly the ``B * (H + 1)`` rows it needs: time and RAM per batch do not
depend on the number of stored transitions. A batch holding a NaN/Inf value or a termination
flag other than 0/1 (a damaged dataset: the writer refuses them) raises a DataError.
"""

from __future__ import annotations

import json
from collections import deque

import numpy as np
import torch

from tdmpc_opt.errors import DataError
from tdmpc_opt.training import Batch


class SequenceSampler:
    """Batches of ``batch_size`` subsequences of ``horizon + 1`` observations.

    Args:
        source: a :class:`~tdmpc_opt.data.Dataset` or :class:`ReplayBuffer`.
        task_map: ``[num source tasks]`` model task index of each source task id, or None for a
            single-task model (batches then carry no task).
        seed: seed of the sampler's own generator (saved with :meth:`state_dict`).
    """

    def __init__(self, source, batch_size: int, horizon: int, seed: int = 0,
                 device: str | torch.device = "cpu", task_map: np.ndarray | None = None):
        self.source, self.batch_size, self.horizon = source, batch_size, horizon
        self.device = torch.device(device)
        self.task_map = None if task_map is None else np.asarray(task_map, dtype=np.int64)
        self.rng = np.random.default_rng(seed)
        self._eligible: np.ndarray | None = None
        self._version = None
        self._offsets = np.arange(horizon + 1)

    def _episodes(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The episode table and the eligible rows of it (None: all are eligible)."""
        src = self.source
        version = getattr(src, "version", 0)
        if version != self._version:
            eps = src.episodes
            lengths = np.asarray(eps[:, 1])
            short = lengths < self.horizon + 1
            self._eligible = np.flatnonzero(~short) if short.any() else None
            if len(eps) == 0 or (self._eligible is not None and self._eligible.size == 0):
                raise DataError(f"no episode has the {self.horizon + 1} observations a "
                                "subsequence needs")
            self._version = version
        return src.episodes, self._eligible

    def sample_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Row indices ``[B, H+1]`` of the sampled subsequences and their task ids ``[B]``."""
        eps, eligible = self._episodes()
        n = len(eps) if eligible is None else eligible.size
        pick = self.rng.integers(0, n, self.batch_size)
        if eligible is not None:
            pick = eligible[pick]
        picked = np.asarray(eps[np.sort(pick)])  # sorted: sequential reads of the table
        starts = (self.rng.random(self.batch_size) * (picked[:, 1] - self.horizon)).astype(
            np.int64)
        rows = picked[:, :1] + starts[:, None] + self._offsets
        return rows, picked[:, 2]

    def sample(self) -> Batch:
        """A time-major :class:`~tdmpc_opt.training.Batch`."""
        return self.batch_at(*self.sample_rows())

    def batch_at(self, rows: np.ndarray, tasks: np.ndarray) -> Batch:
        """The batch of given row indices ``[B, H+1]`` and source task ids ``[B]``."""
        src, (b, h) = self.source, (rows.shape[0], rows.shape[1] - 1)
        flat = rows.reshape(-1)
        obs = np.asarray(src.obs[flat]).reshape(b, h + 1, -1)
        act_rows = rows[:, 1:].reshape(-1)
        action = np.asarray(src.action[act_rows]).reshape(b, h, -1)
        reward = np.asarray(src.reward[act_rows]).reshape(b, h, 1)
        if src.terminated is not None:
            term = np.asarray(src.terminated[act_rows], dtype=np.float32).reshape(b, h, 1)
        else:
            term = np.zeros((b, h, 1), np.float32)
        if not (np.isfinite(obs).all() and np.isfinite(action).all()
                and np.isfinite(reward).all() and term.max(initial=0) <= 1):
            raise DataError(self._damaged(rows))

        def tm(x: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(x.swapaxes(0, 1))).to(self.device)

        task = None
        if self.task_map is not None:
            task = torch.from_numpy(self.task_map[tasks]).to(self.device)
        return Batch(tm(obs), tm(action), tm(reward), tm(term), task)

    def _damaged(self, rows: np.ndarray) -> str:
        """Which stored value of a batch is NaN/Inf (or a termination flag not 0/1)."""
        src = self.source
        path = getattr(src, "path", None)
        where, why = (path, ": the dataset is damaged") if path else ("the replay buffer", "")
        act_rows = np.unique(rows[:, 1:])
        checks = [("obs", src.obs, np.unique(rows)), ("action", src.action, act_rows),
                  ("reward", src.reward, act_rows)]
        for name, arr, idx in checks:
            bad = ~np.isfinite(np.asarray(arr[idx]))
            if bad.any():
                row = idx[np.flatnonzero(bad.reshape(len(idx), -1).any(axis=1))[0]]
                return f"{where}: {name} of row {row} is NaN or Inf{why}"
        flags = np.asarray(src.terminated[act_rows])
        row = act_rows[np.flatnonzero(flags > 1)[0]]
        return f"{where}: termination flag of row {row} is {flags[flags > 1][0]}, not 0 or 1{why}"

    def state_dict(self) -> dict:
        return {"rng": json.dumps(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = json.loads(state["rng"])


class ReplayBuffer:
    """Episodes in preallocated arrays of ``capacity`` rows; the oldest episodes are dropped
    when a new one does not fit (first in, first out).

    Has the arrays of a :class:`~tdmpc_opt.data.Dataset`, so :class:`SequenceSampler` and
    :class:`~tdmpc_opt.data.DatasetWriter` work on it.
    """

    def __init__(self, capacity: int, obs_dim: int, action_dim: int):
        self.capacity = capacity
        self.obs = np.zeros((capacity, obs_dim), np.float32)
        self.action = np.zeros((capacity, action_dim), np.float32)
        self.reward = np.zeros(capacity, np.float32)
        self.terminated = np.zeros(capacity, np.uint8)
        self._eps: deque[tuple[int, int, int]] = deque()
        self._pos, self.high, self.version = 0, 0, 0
        self._table = np.zeros((0, 3), np.int64)

    @property
    def episodes(self) -> np.ndarray:
        """``[E, 3]`` (first row, length, task) of the stored episodes, oldest first."""
        return self._table

    @property
    def num_episodes(self) -> int:
        return len(self._eps)

    def __len__(self) -> int:
        """Stored transitions."""
        return int(sum(n - 1 for _, n, _ in self._eps))

    def add(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
            terminated: np.ndarray | None = None, task: int = 0) -> None:
        """Store one episode: ``obs [T, D]``, ``action [T, A]``, ``reward [T]`` (row 0 filler)."""
        t = obs.shape[0]
        if t > self.capacity:
            raise DataError(f"an episode of {t} steps does not fit a buffer of {self.capacity}")
        if self._pos + t > self.capacity:
            self._pos = 0
        lo, hi = self._pos, self._pos + t
        while self._eps and self._overlaps(self._eps[0], lo, hi):
            self._eps.popleft()
        self.obs[lo:hi], self.action[lo:hi], self.reward[lo:hi] = obs, action, reward
        self.terminated[lo:hi] = 0 if terminated is None else terminated
        self._eps.append((lo, t, task))
        self._pos, self.high = hi, max(self.high, hi)
        self._table = np.array(self._eps, dtype=np.int64).reshape(-1, 3)
        self.version += 1

    @staticmethod
    def _overlaps(ep: tuple[int, int, int], lo: int, hi: int) -> bool:
        return ep[0] < hi and lo < ep[0] + ep[1]

    def state_dict(self) -> dict:
        """Stored rows and episode table as tensors (for checkpoints)."""
        n = self.high
        return {"obs": torch.from_numpy(self.obs[:n].copy()),
                "action": torch.from_numpy(self.action[:n].copy()),
                "reward": torch.from_numpy(self.reward[:n].copy()),
                "terminated": torch.from_numpy(self.terminated[:n].copy()),
                "episodes": torch.from_numpy(self._table.copy()), "pos": self._pos}

    def load_state_dict(self, state: dict) -> None:
        n = state["obs"].shape[0]
        for k in ("obs", "action", "reward", "terminated"):
            getattr(self, k)[:n] = state[k].numpy()
        self._eps = deque(tuple(int(v) for v in row) for row in state["episodes"].tolist())
        self._table = np.array(self._eps, dtype=np.int64).reshape(-1, 3)
        self._pos, self.high = int(state["pos"]), n
        self.version += 1
