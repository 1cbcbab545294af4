"""Figures: per-task returns side by side, score against file size (matplotlib, headless)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tdmpc_opt.errors import InputError


def load_results(paths: list[str]) -> list[dict]:
    """Read evaluation JSON files, checking they have per-task returns."""
    out = []
    for p in paths:
        path = Path(p)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"{path}: no such file") from None
        except IsADirectoryError:
            raise InputError(f"{path}: is a folder; give the JSON file `tdmpc-opt eval --json` "
                             "wrote") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"{path}: not a JSON file") from None
        if not isinstance(data, dict) or not isinstance(data.get("tasks"), dict):
            raise InputError(f"{path}: not an evaluation result (no 'tasks')")
        data.setdefault("_name", path.stem)
        out.append(data)
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_task_returns(results: list[dict], labels: list[str] | None, out: str | Path) -> None:
    """Grouped bars: one group per task, one bar (mean, std error bar) per result."""
    plt = _pyplot()
    labels = labels or [r["_name"] for r in results]
    tasks = list(dict.fromkeys(t for r in results for t in r["tasks"]))
    width = 0.8 / len(results)
    x = np.arange(len(tasks))
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * len(tasks) * max(1, len(results) / 2)) + 2.5, 4))
    for i, (res, label) in enumerate(zip(results, labels, strict=True)):
        means = [res["tasks"].get(t, {}).get("mean_return", np.nan) for t in tasks]
        stds = [res["tasks"].get(t, {}).get("std_return", 0.0) for t in tasks]
        score = res.get("normalized_score")
        name = f"{label} ({score:.1f})" if isinstance(score, int | float) else label
        ax.bar(x + (i - (len(results) - 1) / 2) * width, means, width, yerr=stds, label=name,
               capsize=2)
    ax.set_xticks(x, tasks, rotation=45, ha="right")
    ax.set_ylabel("episode return")
    ax.set_ylim(0, 1000)
    # beside the axes: inside, it covers the bars of whichever task scores high
    ax.legend(title="model (normalized score)", fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_score_vs_size(points: list[tuple[str, float, float]], out: str | Path) -> None:
    """Scatter of normalized score against file size (MB), one labelled point per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, size_mb, score in points:
        ax.scatter(size_mb, score)
        ax.annotate(name, (size_mb, score), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MB)")
    ax.set_ylabel("normalized score")
    ax.set_xscale("log")
    # ticks at the models' own sizes, as plain numbers (log-axis minor labels crowd)
    from matplotlib.ticker import NullFormatter

    sizes = sorted({float(f"{size:.2g}") for _, size, _ in points})
    ax.set_xticks(sizes, [f"{v:g}" for v in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
