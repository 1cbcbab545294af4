"""Teacher-target caching: the teacher's predictions for every transition of a dataset, once.

A cache is a directory beside (or anywhere away from) the dataset::

    meta.json        {"format": "tdmpc-opt-teacher-cache", "teacher_sha256", "dataset", ...}
    reward.npy       float32 [N, 1]   teacher reward of (o_r, a_{r+1}) at obs row r
    q.npy            float32 [N, 1]   mean decoded teacher Q of the same transition
    pi_mean.npy      float32 [N, A]   teacher policy mean (pre-tanh, masked) at o_r
    pi_log_std.npy   float32 [N, A]   teacher policy log-std (masked) at o_r
    latent.npy       float32 [N, L]   teacher latent of o_r (only when asked for)

Row ``r`` is the transition that starts at observation row ``r`` (its action is stored at row
``r + 1`` of the dataset); the last observation of every episode has no transition and holds
filler. The cache records the teacher checkpoint's sha256 and a content fingerprint of the
dataset, and refuses to serve another teacher or dataset.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from tdmpc_opt.checkpoints import write_json
from tdmpc_opt.distillation import TeacherTargets, teacher_targets
from tdmpc_opt.errors import DataError
from tdmpc_opt.world_model import WorldModel

FORMAT = "tdmpc-opt-teacher-cache"
VERSION = 1
_SAMPLED_ROWS = 4096


def dataset_fingerprint(ds) -> str:
    """sha256 over the dataset's header, episode table and an evenly spaced sample of rows.

    Cheap on any dataset size, and different for datasets with different content in practice
    (any change of episodes, sizes or the sampled rows changes it).
    """
    h = hashlib.sha256()
    meta = {k: v for k, v in ds.meta.items() if k not in ("created", "source")}
    h.update(json.dumps(meta, sort_keys=True).encode())
    h.update(np.ascontiguousarray(ds.episodes).tobytes())
    n = ds.obs.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, _SAMPLED_ROWS)).astype(np.int64))
    for arr in (ds.obs, ds.action, ds.reward):
        h.update(np.ascontiguousarray(arr[rows]).tobytes())
    return h.hexdigest()


def row_tasks(ds, lo: int, hi: int, task_map: np.ndarray | None) -> np.ndarray | None:
    """Model task index of rows ``lo..hi-1`` (None for single-task models)."""
    if task_map is None:
        return None
    eps = np.asarray(ds.episodes)
    idx = np.searchsorted(eps[:, 0], np.arange(lo, hi), side="right") - 1
    return task_map[eps[idx, 2]]


def build_cache(teacher: WorldModel, teacher_sha256: str, ds, out: str | Path,
                task_map: np.ndarray | None, latent: bool = False, chunk: int = 4096,
                progress=None) -> TeacherCache:
    """Compute and write the teacher targets of every row of dataset ``ds``.

    Written into a temporary directory (``OUT.partial``) renamed at the end, so an interrupted
    build never leaves a cache that looks complete; after each chunk of rows the arrays are
    flushed and the rows done recorded, so a build started again with the same teacher,
    dataset and settings continues where the interrupted one stopped (the same bytes as one
    uninterrupted build; anything else starts over).
    """
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    n, a_dim = ds.obs.shape[0], teacher.cfg.action_dim
    dims = {"reward": 1, "q": 1, "pi_mean": a_dim, "pi_log_std": a_dim}
    if latent:
        dims["latent"] = teacher.cfg.latent_dim
    meta = {"format": FORMAT, "version": VERSION, "teacher_sha256": teacher_sha256,
            "dataset": dataset_fingerprint(ds), "num_rows": n, "fields": dims,
            "teacher_latent_dim": teacher.cfg.latent_dim}
    identity = {**meta, "chunk": chunk}  # a row's rounding depends on its chunk's size
    start = _rows_done(tmp, identity)
    arrays = _open_arrays(tmp, dims, n) if start else None
    if arrays is None:
        start = 0
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        arrays = {k: np.lib.format.open_memmap(tmp / f"{k}.npy", "w+", np.float32, (n, d))
                  for k, d in dims.items()}
    elif progress:
        progress(start)
    device = next(teacher.parameters()).device
    saved = time.monotonic()
    for lo in range(start, n, chunk):
        hi = min(n, lo + chunk)
        obs = torch.from_numpy(np.array(ds.obs[lo:hi])).to(device)
        act = np.zeros((hi - lo, ds.action.shape[1]), np.float32)
        nxt = np.asarray(ds.action[lo + 1:hi + 1])
        act[: len(nxt)] = np.nan_to_num(nxt)  # an episode's last row: filler
        tasks = row_tasks(ds, lo, hi, task_map)
        task = None if tasks is None else torch.from_numpy(tasks).to(device)
        tt = teacher_targets(teacher, obs, torch.from_numpy(act).to(device), task, latent)
        for k in dims:
            arrays[k][lo:hi] = getattr(tt, k).cpu().numpy()
        if time.monotonic() - saved >= PROGRESS_EVERY_S and hi < n:
            for arr in arrays.values():
                arr.flush()
            write_json(tmp / _PROGRESS, {**identity, "rows_done": hi})
            saved = time.monotonic()
        if progress:
            progress(hi - lo)
    for arr in arrays.values():
        arr.flush()
    del arrays  # unmapped before the folder is renamed
    (tmp / _PROGRESS).unlink(missing_ok=True)
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return TeacherCache(out)


_PROGRESS = "progress.json"
"""In an unfinished build's folder: its identity and how many rows are done."""
PROGRESS_EVERY_S = 10.0
"""Seconds between two records of a build's progress (each flushes the arrays to disk)."""


def _open_arrays(tmp: Path, dims: dict[str, int], n: int) -> dict[str, np.ndarray] | None:
    """An interrupted build's arrays, writable, or None if any is missing or malformed."""
    arrays = {}
    for k, d in dims.items():
        try:
            arr = np.lib.format.open_memmap(tmp / f"{k}.npy", "r+")
        except (OSError, ValueError):
            return None
        if arr.shape != (n, d) or arr.dtype != np.float32:
            return None
        arrays[k] = arr
    return arrays


def _rows_done(tmp: Path, identity: dict) -> int:
    """Rows an earlier, interrupted build with the same ``identity`` finished (else 0)."""
    try:
        done = json.loads((tmp / _PROGRESS).read_text())
    except (OSError, ValueError):
        return 0
    rows = done.pop("rows_done", 0) if isinstance(done, dict) else 0
    if done != identity or not isinstance(rows, int) or not 0 < rows <= identity["num_rows"]:
        return 0
    return rows


class TeacherCache:
    """A built cache, memory-mapped; :meth:`targets` serves sampled subsequences."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.meta = json.loads((self.path / "meta.json").read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{self.path}: not a teacher cache ({e})") from None
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{self.path}: not a teacher cache")
        self.arrays = {}
        for name, dim in self.meta["fields"].items():
            arr = np.load(self.path / f"{name}.npy", mmap_mode="r")
            if arr.shape != (self.meta["num_rows"], dim):
                raise DataError(f"{self.path}/{name}.npy: shape {arr.shape} is not "
                                f"{(self.meta['num_rows'], dim)}")
            self.arrays[name] = arr

    def check(self, teacher_sha256: str, ds) -> None:
        """Refuse a cache made for another teacher or another dataset."""
        if self.meta["teacher_sha256"] != teacher_sha256:
            raise DataError(f"{self.path}: cache was made with another teacher checkpoint "
                            f"({self.meta['teacher_sha256'][:12]}, not {teacher_sha256[:12]})")
        if self.meta["dataset"] != dataset_fingerprint(ds):
            raise DataError(f"{self.path}: cache was made for another dataset (content hash "
                            "differs); rebuild it with --cache-teacher")

    @property
    def has_latent(self) -> bool:
        return "latent" in self.arrays

    def targets(self, rows: np.ndarray, device="cpu") -> TeacherTargets:
        """Targets ``[H, B, ...]`` for sampled row indices ``rows [B, H+1]``."""
        idx = rows[:, :-1].T.reshape(-1)  # time-major
        h, b = rows.shape[1] - 1, rows.shape[0]

        def get(name):
            arr = np.asarray(self.arrays[name][idx]).reshape(h, b, -1)
            return torch.from_numpy(arr).to(device)

        return TeacherTargets(get("reward"), get("q"), get("pi_mean"), get("pi_log_std"),
                              get("latent") if self.has_latent else None)
