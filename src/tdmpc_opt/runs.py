"""Run directories: resolved configuration, metrics, checkpoints and resuming.

Layout of a run directory::

    config.json                 resolved configuration (every field, defaults included)
    train.csv / eval.csv        metrics, one row per log step (TensorBoard events when installed)
    checkpoints/
        step-00001000.pt        resumable training state (torch.save, loaded weights_only)
        step-00001000.json      {"step", "sha256", "bytes"}: written before the .pt; a
                                checkpoint without it, or whose bytes differ, is invalid
    model.safetensors           the latest world model in tdmpc-opt's format (for agents)

Checkpoints are written to a temporary file and renamed, so a crash or a full disk never
harms the previous one. :meth:`RunDir.latest_checkpoint` returns the newest valid checkpoint,
skips corrupt ones with a :class:`CheckpointSkipped` warning and renames them ``*.skipped``, and
refuses a run none of whose checkpoints can be read.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import math
import re
import warnings
from pathlib import Path

import torch

from tdmpc_opt.checkpoints import atomic_write, file_sha256
from tdmpc_opt.errors import TdmpcError

_CKPT = re.compile(r"^step-(\d+)\.pt$")
_SIDE = re.compile(r"^step-(\d+)\.json$")


class RunError(TdmpcError):
    """A run cannot continue: unwritable run directory, full disk, diverged losses."""


class TrainingDiverged(RunError):
    """A loss became NaN or Inf."""


class CheckpointSkipped(UserWarning):
    """A checkpoint that resuming skipped because it cannot be read (the message is one line)."""


RESUMABLE = ("steps", "eval_freq", "log_freq", "checkpoint_freq", "keep_checkpoints", "threads",
             "compile")
"""Training settings a resumed run may change: its length, how often it logs, evaluates and
checkpoints, and how it uses the machine. Every other setting must match the stored one."""

LOCATIONS = ("data", "teacher", "cache", "init", "distributed")
"""Top-level ``config.json`` entries that say where things are (or how many processes run), not
what is learned; a resume may change them (a moved dataset, another working directory). The
teacher's identity is its ``teacher_sha256``, the process count is checked with the checkpoint."""


class RunDir:
    """A training run's directory (created when missing)."""

    def __init__(self, path: str | Path, keep: int = 3):
        self.path = Path(path)
        self.keep = keep
        try:
            (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunError(f"{self.path}: cannot create the run directory ({e.strerror})") \
                from None
        self.ckpt_dir = self.path / "checkpoints"
        self._loggers: dict[str, MetricsLog] = {}

    # ---------------------------------------------------------------- config
    def write_config(self, config: dict) -> None:
        """Write ``config.json`` (atomically)."""
        text = json.dumps(config, indent=1, sort_keys=True) + "\n"
        self._write(self.path / "config.json", lambda tmp: Path(tmp).write_text(text))

    def read_config(self) -> dict | None:
        """The stored configuration, or None.

        Raises:
            RunError: ``config.json`` is damaged.
        """
        f = self.path / "config.json"
        if not f.is_file():
            return None
        try:
            return json.loads(f.read_text())
        except ValueError:
            raise RunError(f"{f} is damaged; choose another --run-dir") from None

    # --------------------------------------------------------------- metrics
    def log(self, kind: str, step: int, metrics: dict[str, float]) -> None:
        """Append a row to ``<kind>.csv`` (and TensorBoard when available)."""
        if kind not in self._loggers:
            self._loggers[kind] = MetricsLog(self.path / f"{kind}.csv", kind, self.path)
        self._loggers[kind].write(step, metrics)

    def truncate_metrics(self, step: int) -> None:
        """Drop metric rows after ``step`` (a resumed run rewrites them)."""
        for f in self.path.glob("*.csv"):
            with open(f, newline="") as fh:
                rows = list(csv.DictReader(fh))
            keep = [r for r in rows if float(r.get("step") or 0) <= step]
            if len(keep) != len(rows):
                _write_csv(f, keep, list(rows[0].keys()) if rows else [])

    # ----------------------------------------------------------- checkpoints
    def checkpoint_path(self, step: int) -> Path:
        return self.ckpt_dir / f"step-{step:08d}.pt"

    def save_checkpoint(self, step: int, state: dict) -> Path:
        """Write a resumable checkpoint for ``step`` and prune old ones.

        Raises:
            RunError: the write failed (full disk...); the previous checkpoint is untouched.
        """
        path = self.checkpoint_path(step)
        buf = io.BytesIO()
        torch.save(state, buf)  # serialised in memory: a full disk surfaces as OSError below
        data = buf.getvalue()
        meta = {"step": step, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        text = json.dumps(meta) + "\n"
        # The checksum first: a process killed between the two renames leaves a checksum
        # without its .pt (ignored), never a .pt without its checksum (an unreadable one).
        side = path.with_suffix(".json")
        self._write(side, lambda tmp: Path(tmp).write_text(text))
        try:
            self._write(path, lambda tmp: _write_bytes(tmp, data))
        except BaseException:
            side.unlink(missing_ok=True)
            raise
        self._prune(step)
        return path

    def _write(self, path: Path, write) -> None:
        try:
            atomic_write(path, write)
        except OSError as e:
            prev = self.latest_valid_path()
            kept = f"the last good checkpoint is {prev}" if prev else "no earlier checkpoint"
            what = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise RunError(f"could not write {path.name} ({what}); {kept}; free space and "
                           "rerun with --resume") from None

    def _prune(self, current: int) -> None:
        """Keep the ``keep`` newest checkpoints up to step ``current`` (the one just written,
        so it always stays); delete the older ones.

        A checkpoint with a higher step is left alone: it is no part of this run's lineage. A
        resume starts from the newest readable checkpoint and renames the unreadable ones above
        it (:meth:`latest_checkpoint`), so unreadable files never take the place of new ones.
        """
        steps = sorted((s for s in self._steps() if s <= current), reverse=True)
        for s in steps[self.keep:]:
            for suffix in (".pt", ".json"):
                self.checkpoint_path(s).with_suffix(suffix).unlink(missing_ok=True)
        for side in self.ckpt_dir.glob("step-*.json"):  # checksums a killed save left alone
            m = _SIDE.match(side.name)
            if m and int(m.group(1)) < current and not side.with_suffix(".pt").exists():
                side.unlink(missing_ok=True)

    def _steps(self) -> list[int]:
        return [int(m.group(1)) for f in self.ckpt_dir.iterdir() if (m := _CKPT.match(f.name))]

    def _valid(self, path: Path) -> str | None:
        """None when ``path`` is a complete checkpoint, else the reason it is not."""
        side = path.with_suffix(".json")
        try:
            meta = json.loads(side.read_text())
        except (OSError, ValueError):
            return "its checksum file is missing or unreadable (interrupted write?)"
        if path.stat().st_size != meta.get("bytes") or file_sha256(path) != meta.get("sha256"):
            return "checksum mismatch (corrupted)"
        return None

    def latest_valid_path(self) -> Path | None:
        """Newest checkpoint whose checksum matches (resuming reports the skipped ones:
        :meth:`latest_checkpoint`)."""
        for step in sorted(self._steps(), reverse=True):
            if self._valid(self.checkpoint_path(step)) is None:
                return self.checkpoint_path(step)
        return None

    def latest_checkpoint(self) -> tuple[Path, dict] | None:
        """``(path, state)`` of the newest readable checkpoint, or None when there is none.

        Each newer checkpoint that cannot be read is reported with a :class:`CheckpointSkipped`
        warning and renamed ``<name>.skipped`` (kept for inspection, out of the run's way).

        Raises:
            RunError: there are checkpoints but none of them can be read (starting over would
                overwrite the run's model and prune its files).
        """
        skipped: list[Path] = []
        for step in sorted(self._steps(), reverse=True):
            path = self.checkpoint_path(step)
            reason = self._valid(path)
            if reason is None:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True)
                except Exception as e:  # noqa: BLE001 - any unreadable file is skipped
                    first = (str(e).strip() or type(e).__name__).splitlines()[0]
                    reason = f"unreadable ({first[:200]})"
            if reason is not None:
                warnings.warn(f"skipping checkpoint {path}: {reason}", CheckpointSkipped,
                              stacklevel=2)
                skipped.append(path)
                continue
            for bad in skipped:
                for f in (bad, bad.with_suffix(".json")):
                    if f.exists():
                        f.rename(f.with_name(f.name + ".skipped"))
            return path, state
        if skipped:
            raise RunError(f"{self.ckpt_dir}: none of its {len(skipped)} checkpoints could be "
                           "read; move them away to start the run over, or choose another "
                           "--run-dir")
        return None


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def check_finite(metrics: dict[str, float], step: int, run: RunDir | None) -> None:
    """Raise :class:`TrainingDiverged` naming the step and the last good checkpoint."""
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    if bad:
        last = run.latest_valid_path() if run is not None else None
        where = f"; last good checkpoint: {last}" if last else "; no checkpoint was written"
        raise TrainingDiverged(f"training diverged at step {step}: {', '.join(bad)} is "
                               f"NaN or Inf{where}")


def plot_curves(run_path: str | Path, out: str | Path | None = None) -> Path | None:
    """Plot evaluation return (and training episode return) against steps into a PNG.

    Reads ``eval.csv`` / ``episode.csv`` of a run directory; returns the image path, or None
    when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_path = Path(run_path)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for name, label, style in (("episode", "training episodes", "-"),
                               ("eval", "evaluation (mean)", "o-")):
        f = run_path / f"{name}.csv"
        if not f.is_file():
            continue
        with open(f, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r.get("episode_reward")]
        if rows:
            ax.plot([float(r["step"]) for r in rows], [float(r["episode_reward"]) for r in rows],
                    style, label=label, alpha=0.5 if name == "episode" else 1.0)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("environment steps")
    ax.set_ylabel("episode return")
    ax.set_title(run_path.name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(out) if out else run_path / "curve.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def check_resume_config(run: RunDir, config: dict | None) -> None:
    """Raise :class:`RunError` when ``config`` differs from the run's stored configuration in
    anything but :data:`RESUMABLE` training settings and :data:`LOCATIONS`.

    Settings the stored configuration lacks (added by a later version) are not compared;
    entries only it has (a run of another command) count as different.
    """
    old = run.read_config()
    if not old or not config:
        return
    new = json.loads(json.dumps(config))  # the types config.json stores (tuples as lists)
    model = _differing(old.get("model") or {}, new.get("model") or {})
    if model:
        raise RunError(f"{run.path} was trained with a different model ({', '.join(model[:5])} "
                       "differ); resume with the same settings or choose another --run-dir")
    diff = set()
    for key in old:
        if key == "model" or key in LOCATIONS:
            continue
        value = new.get(key)
        if isinstance(value, dict) and isinstance(old[key], dict):
            allowed = RESUMABLE if key == "train" else ()
            diff |= {k for k in _differing(old[key], value) if k not in allowed}
        elif value != old[key]:
            diff.add(key)
    if diff:
        raise RunError(f"{run.path} was trained with other settings ({', '.join(sorted(diff))} "
                       f"differ); a resume may change only {', '.join(RESUMABLE)}: use the "
                       "run's values or choose another --run-dir")


def _differing(old: dict, new: dict) -> list[str]:
    """Sorted keys in both dictionaries whose values differ."""
    return sorted(k for k in old if k in new and old[k] != new[k])


# ------------------------------------------------------------------------ metrics
def _write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


class MetricsLog:
    """CSV file whose header grows when new keys appear; TensorBoard when installed."""

    def __init__(self, path: Path, kind: str, run_path: Path):
        self.path, self.kind = path, kind
        self.fields: list[str] = []
        if path.is_file():
            with open(path, newline="") as fh:
                self.fields = list(csv.DictReader(fh).fieldnames or [])
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_path / "tb"))
        except ImportError:
            pass

    def write(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step, **metrics}
        new = [k for k in row if k not in self.fields]
        if new:
            rows = []
            if self.path.is_file():
                with open(self.path, newline="") as fh:
                    rows = list(csv.DictReader(fh))
            self.fields += new
            _write_csv(self.path, rows, self.fields)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self.fields, extrasaction="ignore").writerow(row)
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(f"{self.kind}/{k}", v, step)
