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
needs, so RAM stays bounded whatever the dataset size. Opening checks ``meta.json``, each
array's header (dtype, shape) and the episode table (episodes must cover the rows in order and
agree with the counts in ``meta.json``), reading nothing of the rows themselves. There is no
content checksum (checking one would read the whole dataset at every open); the sampler
refuses batches holding NaN/Inf, so a damaged value is caught when first sampled, unless the
damage leaves a finite number.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import shutil
import tempfile
import tokenize
import zipfile
from pathlib import Path

import numpy as np
import torch

from tdmpc_opt.errors import ConfigError, DataError, OutputError

FORMAT = "tdmpc-opt-dataset"
VERSION = 1
_HEADER_BYTES = 128
_REQUIRED = ("obs", "action", "reward", "task")
_FILES = ("meta.json", "obs.npy", "action.npy", "reward.npy", "episodes.npy", "terminated.npy")
"""Every file a dataset directory may hold."""


# ----------------------------------------------------------------- published (TensorDict)
class PickledTensorDict:
    """Inert stand-in for a pickled ``TensorDict``: keeps its attribute dict, runs nothing."""

    state = None

    def __setstate__(self, state: dict) -> None:
        self.state = state

    def fields(self) -> dict:
        """The TensorDict's entries (``_tensordict``) as a plain dict (empty if it has none)."""
        entries = self.state.get("_tensordict") if isinstance(self.state, dict) else None
        return dict(entries) if isinstance(entries, dict) else {}


ALLOWED_GLOBALS = [
    (PickledTensorDict, "tensordict.tensordict.TensorDict"),  # tensordict <= 0.2
    (PickledTensorDict, "tensordict._td.TensorDict"),  # tensordict >= 0.3
    (dict, "tensordict.utils._StringOnlyDict"),
    (collections.deque, "collections.deque"),  # an unused op queue may be pickled with it
]
"""The only names beyond tensors and plain containers that a published file may contain."""


def read_official(path: str | Path, mmap: bool = True,
                  verify: bool = False) -> dict[str, torch.Tensor]:
    """Read a published TD-MPC2 dataset file into ``{obs, action, reward, task}`` tensors.

    Returns tensors of shapes ``[E, T, D]``, ``[E, T, A]``, ``[E, T]``, ``[E, T]``
    (memory-mapped when ``mmap``). Also accepts a plain ``{key: tensor}`` dict file.
    ``torch.save`` records a CRC-32 of each entry of its zip file; torch never checks them.
    Here the pickle's is always checked (it is small), and with ``verify`` those of the tensor
    data too, which reads the whole file.
    Raises:
        DataError: missing or damaged file, unsafe or unreadable pickle, missing keys, wrong
            shapes.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: " + ("a directory, not a dataset file" if path.is_dir()
                                       else "no such dataset file"))
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise DataError(f"{path}: not a readable dataset file (not a PyTorch file)")
    if magic == b"PK\x03\x04":
        _check_crc(path, everything=verify)
    obj = _torch_load(path, mmap)
    fields = obj.fields() if isinstance(obj, PickledTensorDict) else obj
    if not isinstance(fields, dict) or not all(isinstance(fields.get(k), torch.Tensor)
                                               for k in _REQUIRED):
        have = sorted(map(str, fields)) if isinstance(fields, dict) else type(obj).__name__
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


def _check_crc(path: Path, everything: bool) -> None:
    """Compare the CRC-32s recorded in a ``torch.save`` zip with its entries' bytes: those of
    the pickle only, or of every entry. A CRC of 0 means none was recorded (``torch.save`` with
    ``compute_crc32`` off) and is skipped."""
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                if not (everything or info.filename.endswith("/data.pkl")) or info.CRC == 0:
                    continue
                if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 1:
                    raise zipfile.BadZipFile(f"entry {info.filename} is compressed or encrypted")
                with z.open(info) as f:  # raises BadZipFile at the end on a CRC mismatch
                    while f.read(1 << 24):
                        pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError,
            NotImplementedError) as e:
        raise DataError(f"{path}: damaged or truncated file: {_first_line(e)}") from None


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
        raise DataError(f"{path}: not a readable dataset file: {_first_line(e)}") from None


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
        overwrite: replace an existing empty folder or dataset at ``path`` (see
            :func:`check_output`); the old one is removed only once the new one is complete.

    Raises:
        DataError, OutputError: as :func:`check_output`.
    """

    def __init__(self, path: str | Path, tasks: tuple[str, ...], obs_dim: int, action_dim: int,
                 terminated: bool = False, overwrite: bool = False, source: str = ""):
        self.path = Path(path)
        check_output(self.path, overwrite)
        full = Path(os.path.abspath(self.path))  # "a/b/.." has no name to derive siblings from
        self.tmp = full.with_name(f".{full.name}.partial")
        self.old = full.with_name(f".{full.name}.replaced")
        shutil.rmtree(self.tmp, ignore_errors=True)
        try:
            self.tmp.mkdir(parents=True)
        except OSError as e:
            raise OutputError(e.errno, e.strerror, str(self.tmp)) from None
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
        replacing = self.path.exists()
        if replacing:  # set the old dataset aside, put the new one in place, then delete the old
            shutil.rmtree(self.old, ignore_errors=True)  # left by an interrupted replacement
            self.path.rename(self.old)
        try:
            self.tmp.rename(self.path)
        except BaseException:
            if replacing:
                self.old.rename(self.path)
            raise
        if replacing:
            shutil.rmtree(self.old)
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


def check_output(path: str | Path, overwrite: bool = False, inputs=()) -> None:
    """Refuse, before any work, an output dataset directory that is or holds one of ``inputs``,
    that exists (without ``overwrite``; with it, unless it is an empty folder or a tdmpc-opt
    dataset, and not the current folder or one above it), or that cannot be created.

    Raises:
        DataError: the output is refused; the message says why.
        OutputError: no folder can be created there.
    """
    path = Path(path)
    full = path.resolve()
    for item in map(Path, inputs):
        src = item.resolve()
        if full == src or full in src.parents:
            raise DataError(f"{path}: {'is' if full == src else 'holds'} the input {item}; "
                            "choose an output directory apart from the inputs")
    if path.exists() or path.is_symlink():
        if not overwrite:
            raise DataError(f"{path}: already exists; choose a new output directory "
                            "(--overwrite replaces an empty folder or a dataset)")
        here = Path.cwd().resolve()
        if full == here or full in here.parents:
            raise DataError(f"{path}: the current folder or one above it; --overwrite replaces "
                            "only a dataset directory")
        if path.is_symlink() or not path.is_dir():
            raise DataError(f"{path}: not a folder but a file or a link; --overwrite replaces "
                            "only a dataset directory")
        extra = sorted(p.name for p in path.iterdir() if p.name not in _FILES)
        if extra or (any(path.iterdir()) and not _is_dataset(path)):
            why = f"it holds {extra[0]}" if extra else "its meta.json is not a dataset's"
            raise DataError(f"{path}: not a tdmpc-opt dataset ({why}); --overwrite replaces "
                            "only an empty folder or a dataset, choose another output directory")
    parent = Path(os.path.abspath(path)).parent
    while not parent.exists():
        parent = parent.parent
    try:  # the one sure test that folders can be made there: make one
        Path(tempfile.mkdtemp(prefix=".tdmpc-opt-probe-", dir=parent)).rmdir()
    except OSError as e:
        raise OutputError(e.errno, f"{e.strerror} (cannot create a folder in {parent})",
                          str(path)) from None


def _is_dataset(path: Path) -> bool:
    """Whether ``path`` holds a ``meta.json`` of our format (the rest is not checked, so that a
    damaged dataset can still be replaced)."""
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_row_sizes(dataset: Dataset, obs_dim: int, action_dim: int) -> None:
    """Refuse a dataset whose rows are not ``obs_dim`` observations and ``action_dim`` actions
    (a model's padded sizes), in one line instead of a shape error inside a matrix product."""
    rows = (dataset.meta["obs_dim"], dataset.meta["action_dim"])
    if rows != (obs_dim, action_dim):
        raise DataError(f"{dataset.path}: dataset rows are {rows[0]} obs / {rows[1]} actions; "
                        f"the model takes {obs_dim} / {action_dim}")


def _check_finite(x: np.ndarray, name: str, where: str, first: int) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        idx = np.argwhere(bad)[0]
        kind = "NaN" if np.isnan(x[tuple(idx)]) else "Inf"
        step = idx[1] + (1 if name != "obs" else 0)
        raise DataError(f"{where}: {name} of episode {first + idx[0]} at step {step} is {kind}")


_NPY_ERRORS = (OSError, ValueError, EOFError, SyntaxError, TypeError, OverflowError)
"""What ``numpy.load`` raises on a missing, truncated or garbled ``.npy`` file."""


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _is_int(x, low: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


_META_FIELDS = {
    "tasks": ("a list of task names",
              lambda v: isinstance(v, list) and all(isinstance(t, str) for t in v)),
    "obs_dim": ("an integer >= 1", lambda v: _is_int(v, 1)),
    "action_dim": ("an integer >= 1", lambda v: _is_int(v, 1)),
    **{k: ("an integer >= 0", _is_int) for k in ("num_episodes", "num_rows", "num_transitions",
                                                 "min_length", "max_length")},
    "episodes_per_task": ("a list of integers",
                          lambda v: isinstance(v, list) and all(_is_int(c) for c in v)),
    "has_terminated": ("true or false", lambda v: isinstance(v, bool)),
}
"""The ``meta.json`` entries the loader and the CLI read: what each must be, and its test."""


def _check_meta(meta, where: Path) -> None:
    if not isinstance(meta, dict):
        raise DataError(f"{where}: not a JSON object")
    version = meta.get("version")
    if meta.get("format") != FORMAT or not _is_int(version, 1) or version > VERSION:
        raise DataError(f"{where}: unknown dataset format {str(meta.get('format'))[:60]!r} "
                        f"version {str(version)[:20]}")
    for key, (kind, ok) in _META_FIELDS.items():
        if not ok(meta.get(key)):
            got = f"got {json.dumps(meta[key])[:60]}" if key in meta else "missing"
            raise DataError(f"{where}: {key} must be {kind}, {got}")


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
        except (OSError, ValueError, RecursionError) as e:
            raise DataError(f"{meta_path}: unreadable: {_first_line(e)}") from None
        _check_meta(self.meta, meta_path)
        self.tasks = tuple(self.meta["tasks"])
        rows = self.meta["num_rows"]
        self.obs = self._open("obs", np.float32, (rows, self.meta["obs_dim"]))
        self.action = self._open("action", np.float32, (rows, self.meta["action_dim"]))
        self.reward = self._open("reward", np.float32, (rows,))
        self.terminated = (self._open("terminated", np.uint8, (rows,))
                           if self.meta["has_terminated"] else None)
        if self.terminated is None and (self.path / "terminated.npy").exists():
            raise DataError(f"{meta_path}: has_terminated is false, but terminated.npy exists")
        self.episodes = self._open("episodes", np.int64, (self.meta["num_episodes"], 3))
        self._check_episodes()

    def _open(self, name: str, dtype, shape: tuple[int, ...]) -> np.ndarray:
        f = self.path / f"{name}.npy"
        try:
            with open(f, "rb") as fh:
                magic = fh.read(6)
            if magic != b"\x93NUMPY":  # else numpy takes it for a pickle, or an .npz archive
                raise DataError(f"{f}: not a .npy array file{' (empty)' if not magic else ''}")
            arr = np.load(f, mmap_mode="r")
        except tokenize.TokenError:
            raise DataError(f"{f}: unreadable: damaged array header") from None
        except _NPY_ERRORS as e:
            raise DataError(f"{f}: unreadable: {_first_line(e)}") from None
        if arr.dtype != dtype or arr.shape != shape:
            raise DataError(f"{f}: shape {arr.shape} {arr.dtype}, expected {shape} "
                            f"{np.dtype(dtype)}")
        return arr

    def _check_episodes(self) -> None:
        """The episode table must tile the rows in order and agree with meta.json's counts
        (one pass over the ``[E, 3]`` table: cheap whatever the number of rows)."""
        f, m = self.path / "episodes.npy", self.meta
        eps = np.asarray(self.episodes)
        first, length, task = eps[:, 0], eps[:, 1], eps[:, 2]
        bad = np.flatnonzero((length < 1) | (length > m["num_rows"]))
        if bad.size:
            raise DataError(f"{f}: episode {bad[0]} has {length[bad[0]]} observations")
        ends = np.cumsum(length)
        starts = ends - length
        bad = np.flatnonzero(first != starts)
        if bad.size:
            i = bad[0]
            raise DataError(f"{f}: episode {i} starts at row {first[i]}, expected {starts[i]}: "
                            "episodes must cover the rows in order, without gaps or overlaps")
        covered = int(ends[-1]) if len(eps) else 0
        if covered != m["num_rows"]:
            raise DataError(f"{f}: the episodes cover {covered} rows, the arrays have "
                            f"{m['num_rows']}")
        bad = np.flatnonzero((task < 0) | (task >= len(self.tasks)))
        if bad.size:
            raise DataError(f"{f}: episode {bad[0]} has task index {task[bad[0]]}, outside the "
                            f"task set of {len(self.tasks)} tasks")
        counts = {"num_transitions": covered - len(eps),
                  "min_length": int(length.min()) if len(eps) else 0,
                  "max_length": int(length.max()) if len(eps) else 0,
                  "episodes_per_task": (np.bincount(task, minlength=len(self.tasks)).tolist()
                                        if len(eps) else [0] * len(m["episodes_per_task"]))}
        for key, value in counts.items():
            if m[key] != value:
                raise DataError(f"{self.path / 'meta.json'}: {key} is {str(m[key])[:60]}, the "
                                f"episode table gives {str(value)[:60]}")

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
    episodes, whatever the file sizes. Every file's recorded CRC-32s are checked first.
    ``out`` is checked before any file is read (:func:`check_output`).
    Raises:
        DataError: unreadable input, inconsistent sizes, bad task ids, NaN values, refused
            output.
        OutputError: no folder can be created at ``out``.
        ConfigError: ``chunk`` is not a whole number >= 1.
    """
    if not files:
        raise DataError("no dataset files given")
    if not _is_int(chunk, 1):
        raise ConfigError(f"chunk must be a whole number >= 1, got {chunk!r}")
    check_output(out, overwrite, files)
    sources = [(Path(f), read_official(f, verify=True)) for f in files]
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
