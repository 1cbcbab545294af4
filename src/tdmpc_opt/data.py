"""Datasets of episodes: TD-MPC2's published files, our memory-mapped format, and sampling.

**Published files** (MT30: ``chunk_0.pt`` .. ``chunk_3.pt``) are ``torch.save``-d TensorDicts of
batch size ``[E, T]`` (``T = 501`` for MT30) with ``obs [E, T, 24]`` float32, ``action
[E, T, 6]`` float32, ``reward [E, T]`` float32 and ``task [E, T]`` int32. Step 0 of an episode
holds the first observation; its action and reward are filler (uninitialised, NaN); step t > 0
holds the action taken at observation t-1, the reward for it and the resulting observation t.
Such a file is a pickle naming the classes ``tensordict.tensordict.TensorDict`` and
``tensordict.utils._StringOnlyDict``. We read it with ``torch.load(weights_only=True)``, which
builds nothing but tensors and plain containers, plus an explicit allow-list of exactly these
names mapped to inert stand-ins (a class that only stores its pickled attribute dict, and
``dict``). tensordict itself is never imported or needed. Files are memory-mapped (``mmap=True``)
so converting a 13 GB chunk does not need 13 GB of RAM.

**Our format** is a directory (see :class:`Dataset`)::

    meta.json       {"format": "tdmpc-opt-dataset", "version": 1, "tasks": [...], ...}
    obs.npy         float32 [N, obs_dim]      N = total observations of all episodes
    action.npy      float32 [N, action_dim]   row of an episode's first step: NaN
    reward.npy      float32 [N]               row of an episode's first step: NaN
    episodes.npy    int64   [E, 3]            (first row, number of observations, task index)
    terminated.npy  uint8   [N]               optional; 1 where the observation is terminal

Each ``.npy`` is opened with ``numpy.load(mmap_mode="r")``: sampling reads only the rows it
needs, so RAM stays bounded whatever the dataset size.
"""

from __future__ import annotations

import collections
import json
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from tdmpc_opt.errors import DataError

FORMAT = "tdmpc-opt-dataset"
VERSION = 1
_HEADER_BYTES = 128
_REQUIRED = ("obs", "action", "reward", "task")


# ----------------------------------------------------------------- published (TensorDict)
class PickledTensorDict:
    """Inert stand-in for a pickled ``TensorDict``: keeps its attribute dict, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def fields(self) -> dict:
        """The TensorDict's entries (``_tensordict``) as a plain dict."""
        return dict(self.state.get("_tensordict") or {})


ALLOWED_GLOBALS = [
    (PickledTensorDict, "tensordict.tensordict.TensorDict"),  # tensordict <= 0.2
    (PickledTensorDict, "tensordict._td.TensorDict"),  # tensordict >= 0.3
    (dict, "tensordict.utils._StringOnlyDict"),
    (collections.deque, "collections.deque"),  # an unused op queue may be pickled with it
]
"""The only names beyond tensors and plain containers that a published file may contain."""


def read_official(path: str | Path, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Read a published TD-MPC2 dataset file into ``{obs, action, reward, task}`` tensors.

    Returns tensors of shapes ``[E, T, D]``, ``[E, T, A]``, ``[E, T]``, ``[E, T]``
    (memory-mapped when ``mmap``). Also accepts a plain ``{key: tensor}`` dict file.
    Raises:
        DataError: missing file, unsafe or unreadable pickle, missing keys, wrong shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such dataset file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise DataError(f"{path}: not a readable dataset file (not a PyTorch file)")
    obj = _torch_load(path, mmap)
    fields = obj.fields() if isinstance(obj, PickledTensorDict) else obj
    if not isinstance(fields, dict) or not all(isinstance(fields.get(k), torch.Tensor)
                                               for k in _REQUIRED):
        have = sorted(fields) if isinstance(fields, dict) else type(obj).__name__
        raise DataError(f"{path}: not a TD-MPC2 dataset: need tensors {', '.join(_REQUIRED)}, "
                        f"found {have}")
    out = {k: fields[k] for k in _REQUIRED}
    if out["reward"].ndim == 3 and out["reward"].shape[-1] == 1:
        out["reward"] = out["reward"][..., 0]
    e_t = tuple(out["obs"].shape[:2])
    want = {"obs": 3, "action": 3, "reward": 2, "task": 2}
    for k, nd in want.items():
        if out[k].ndim != nd or tuple(out[k].shape[:2]) != e_t:
            raise DataError(f"{path}: wrong layout: {k} has shape {tuple(out[k].shape)}, "
                            f"expected [episodes, steps{', dim' if nd == 3 else ''}] with "
                            f"episodes, steps = {e_t}")
    if out["task"].is_floating_point():
        raise DataError(f"{path}: task ids must be integers, got {out['task'].dtype}")
    if e_t[1] < 2:
        raise DataError(f"{path}: episodes have {e_t[1]} steps; need at least 2")
    return out


def _torch_load(path: Path, mmap: bool):
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln or "nsupported" in ln]
        raise DataError(f"{path}: refused to load: the file asks to build objects other than "
                        f"tensors and TensorDicts ({(lines or [str(e)])[0][:160]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, IndexError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable dataset file: {first[:200]}") from None


# ---------------------------------------------------------------------- our format
class _NpyAppender:
    """Append rows to a ``.npy`` file whose header is written (padded) when it is closed."""

    def __init__(self, path: Path, dtype: np.dtype, row_shape: tuple[int, ...]):
        self.path, self.dtype, self.row_shape, self.rows = path, np.dtype(dtype), row_shape, 0
        self.f = open(path, "wb")  # noqa: SIM115 - closed by close()
        self.f.write(b"\0" * _HEADER_BYTES)

    def append(self, x: np.ndarray) -> None:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        self.f.write(x.tobytes())
        self.rows += x.shape[0]

    def close(self) -> None:
        shape = (self.rows, *self.row_shape)
        header = repr({"descr": self.dtype.str, "fortran_order": False, "shape": shape})
        body = header.encode("latin1")
        pad = _HEADER_BYTES - 10 - len(body) - 1
        if pad < 0:
            raise DataError(f"{self.path}: array header too long")
        self.f.seek(0)
        self.f.write(b"\x93NUMPY\x01\x00" + (_HEADER_BYTES - 10).to_bytes(2, "little")
                     + body + b" " * pad + b"\n")
        self.f.close()


class DatasetWriter:
    """Write episodes into a new dataset directory (atomically: a temporary directory is renamed
    onto ``path`` by :meth:`close`). Usable as a context manager.

    Args:
        path: directory to create (must not exist unless ``overwrite``).
        tasks: task names; episode task ids index this list.
        obs_dim, action_dim: row sizes (padded sizes for multi-task data).
        terminated: also store per-step termination flags.
    """

    def __init__(self, path: str | Path, tasks: tuple[str, ...], obs_dim: int, action_dim: int,
                 terminated: bool = False, overwrite: bool = False, source: str = ""):
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise DataError(f"{self.path}: already exists; choose a new output directory")
        self.tmp = self.path.with_name(f".{self.path.name}.partial")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.tasks, self.obs_dim, self.action_dim = tuple(tasks), obs_dim, action_dim
        self.source = source
        self.arrays = {"obs": _NpyAppender(self.tmp / "obs.npy", np.float32, (obs_dim,)),
                       "action": _NpyAppender(self.tmp / "action.npy", np.float32, (action_dim,)),
                       "reward": _NpyAppender(self.tmp / "reward.npy", np.float32, ())}
        if terminated:
            self.arrays["terminated"] = _NpyAppender(self.tmp / "terminated.npy", np.uint8, ())
        self.episodes: list[tuple[int, int, int]] = []
        self.rows = 0

    def add_episodes(self, obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
                     task: np.ndarray, terminated: np.ndarray | None = None,
                     where: str = "", first: int = 0) -> None:
        """Append ``E`` episodes of ``T`` steps: ``obs [E, T, D]``, ``action [E, T, A]``,
        ``reward [E, T]``, ``task [E]`` (int), ``terminated [E, T]``; step 0's action and reward
        are filler and stored as NaN. ``where``/``first`` name the source and the number of
        its first episode in error messages.

        Raises:
            DataError: wrong sizes, task index outside the task set, NaN/Inf values.
        """
        e, t = obs.shape[:2]
        where = where or str(self.path)
        if obs.shape[2:] != (self.obs_dim,) or action.shape != (e, t, self.action_dim) \
                or reward.shape != (e, t) or np.shape(task) != (e,):
            raise DataError(f"{where}: wrong layout: obs {obs.shape}, action {action.shape}, "
                            f"reward {reward.shape}, task {np.shape(task)}")
        task = np.asarray(task)
        bad = np.flatnonzero((task < 0) | (task >= len(self.tasks)))
        if bad.size:
            raise DataError(f"{where}: episode {first + bad[0]} has task index "
                            f"{task[bad[0]]}, outside the task set of {len(self.tasks)} tasks")
        _check_finite(reward[:, 1:], "reward", where, first)
        _check_finite(obs, "obs", where, first)
        _check_finite(action[:, 1:], "action", where, first)
        action = np.array(action, dtype=np.float32)
        reward = np.array(reward, dtype=np.float32)
        action[:, 0], reward[:, 0] = np.nan, np.nan
        self.arrays["obs"].append(obs.reshape(e * t, -1))
        self.arrays["action"].append(action.reshape(e * t, -1))
        self.arrays["reward"].append(reward.reshape(-1))
        if "terminated" in self.arrays:
            flags = np.zeros((e, t)) if terminated is None else terminated
            self.arrays["terminated"].append(np.asarray(flags).reshape(-1))
        for i in range(e):
            self.episodes.append((self.rows + i * t, t, int(task[i])))
        self.rows += e * t

    def close(self) -> Dataset:
        """Finish the files, write ``meta.json`` and move the directory into place."""
        for arr in self.arrays.values():
            arr.close()
        eps = np.array(self.episodes, dtype=np.int64).reshape(-1, 3)
        np.save(self.tmp / "episodes.npy", eps)
        counts = np.bincount(eps[:, 2], minlength=len(self.tasks)) if len(eps) else []
        meta = {"format": FORMAT, "version": VERSION, "tasks": list(self.tasks),
                "obs_dim": self.obs_dim, "action_dim": self.action_dim,
                "num_episodes": len(eps), "num_rows": self.rows,
                "num_transitions": int(self.rows - len(eps)),
                "min_length": int(eps[:, 1].min()) if len(eps) else 0,
                "max_length": int(eps[:, 1].max()) if len(eps) else 0,
                "episodes_per_task": [int(c) for c in counts],
                "has_terminated": "terminated" in self.arrays, "source": self.source}
        (self.tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if self.path.exists():
            shutil.rmtree(self.path)
        self.tmp.rename(self.path)
        return Dataset(self.path)

    def abort(self) -> None:
        """Remove the partial output."""
        for arr in self.arrays.values():
            arr.f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _check_finite(x: np.ndarray, name: str, where: str, first: int) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        idx = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(x[tuple(idx)]) else "Inf"
        step = idx[1] + (1 if name != "obs" else 0)
        raise DataError(f"{where}: {name} of episode {first + idx[0]} at step {step} is {kind}")


class Dataset:
    """A dataset directory in our format, memory-mapped read-only.

    Attributes: ``obs [N, D]``, ``action [N, A]``, ``reward [N]``, ``terminated [N]`` or None,
    ``episodes [E, 3]`` (first row, length, task id), ``tasks``, ``meta``.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            hint = (" (a TD-MPC2 .pt file: convert it with `tdmpc-opt data convert`)"
                    if self.path.suffix == ".pt" or any(self.path.glob("*.pt")) else "")
            raise DataError(f"{self.path}: not a tdmpc-opt dataset (no meta.json){hint}")
        try:
            self.meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{meta_path}: unreadable: {e}") from None
        if self.meta.get("format") != FORMAT or int(self.meta.get("version", 0)) > VERSION:
            raise DataError(f"{self.path}: unknown dataset format {self.meta.get('format')!r} "
                            f"version {self.meta.get('version')}")
        self.tasks = tuple(self.meta["tasks"])
        self.obs = self._open("obs", np.float32, (self.meta["obs_dim"],))
        self.action = self._open("action", np.float32, (self.meta["action_dim"],))
        self.reward = self._open("reward", np.float32, ())
        self.terminated = (self._open("terminated", np.uint8, ())
                           if self.meta.get("has_terminated") else None)
        self.episodes = np.load(self.path / "episodes.npy", mmap_mode="r")
        if self.episodes.shape != (self.meta["num_episodes"], 3):
            raise DataError(f"{self.path}: episodes.npy has shape {self.episodes.shape}")

    def _open(self, name: str, dtype, row: tuple[int, ...]) -> np.ndarray:
        f = self.path / f"{name}.npy"
        try:
            arr = np.load(f, mmap_mode="r")
        except (OSError, ValueError) as e:
            raise DataError(f"{f}: unreadable: {str(e)[:200]}") from None
        if arr.dtype != dtype or arr.shape != (self.meta["num_rows"], *row):
            raise DataError(f"{f}: shape {arr.shape} {arr.dtype}, expected "
                            f"{(self.meta['num_rows'], *row)} {np.dtype(dtype)}")
        return arr

    @property
    def num_episodes(self) -> int:
        return int(self.meta["num_episodes"])

    def __len__(self) -> int:
        """Number of transitions."""
        return int(self.meta["num_transitions"])


def convert_official(files: list[Path], out: str | Path, tasks: tuple[str, ...],
                     chunk: int = 1024, overwrite: bool = False, progress=None) -> Dataset:
    """Convert published TD-MPC2 dataset files into our format at ``out``.

    ``progress(episodes_done)`` is called after each chunk. RAM use is about ``chunk``
    episodes, whatever the file sizes.
    Raises:
        DataError: unreadable input, inconsistent sizes, bad task ids, NaN values.
    """
    if not files:
        raise DataError("no dataset files given")
    sources = [(Path(f), read_official(f)) for f in files]
    obs_dim, action_dim = (int(sources[0][1][k].shape[2]) for k in ("obs", "action"))
    for f, arrs in sources:
        if arrs["obs"].shape[2] != obs_dim or arrs["action"].shape[2] != action_dim:
            raise DataError(f"{f}: obs/action sizes {arrs['obs'].shape[2]}/"
                            f"{arrs['action'].shape[2]} differ from {obs_dim}/{action_dim}")
    names = ",".join(f.name for f, _ in sources)
    with DatasetWriter(out, tasks, obs_dim, action_dim, overwrite=overwrite,
                       source=f"converted from {names}") as writer:
        for f, arrs in sources:
            num = arrs["obs"].shape[0]
            for e0 in range(0, num, chunk):
                part = {k: v[e0:e0 + chunk].numpy() for k, v in arrs.items()}
                task = part["task"]
                mixed = np.flatnonzero((task != task[:, :1]).any(axis=1))
                if mixed.size:
                    raise DataError(f"{f}: episode {e0 + mixed[0]} changes task mid-episode")
                writer.add_episodes(part["obs"], part["action"], part["reward"], task[:, 0],
                                    where=str(f), first=e0)
                if progress:
                    progress(min(chunk, num - e0))
        return writer.close()
