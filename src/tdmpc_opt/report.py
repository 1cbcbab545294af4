"""The pipeline's report: one table of every model, the distillation verdict, two figures.

Everything here is read from the run directory (evaluation JSON, latency JSON, model files,
stage markers), so the report can be rebuilt at any time from a finished run.
"""

from __future__ import annotations

import json
import math

from tdmpc_opt.cli.bench import machine

LABELS = {
    "teacher": "teacher",
    "student": "student, no distillation",
    "distilled": "student, distilled",
    "distilled-fp16": "distilled, FP16",
    "distilled-int8": "distilled, INT8",
}


def score_stderr(result: dict) -> float:
    """Standard error of a normalized score: per task, the std error of its mean return,
    combined over tasks (the score is their mean / 10)."""
    tasks = result["tasks"].values()
    var = 0.0
    for t in tasks:
        r = t["returns"]
        if len(r) > 1:
            mean = sum(r) / len(r)
            var += sum((x - mean) ** 2 for x in r) / (len(r) - 1) / len(r)
    return math.sqrt(var) / max(1, len(tasks)) / 10.0


def distillation_verdict(student: dict, distilled: dict) -> str:
    """A plain sentence: did distillation help, hurt, or make no clear difference?

    Both arguments are report rows (``normalized_score``, ``score_stderr``)."""
    a, b = student["normalized_score"], distilled["normalized_score"]
    diff = b - a
    se = math.hypot(student["score_stderr"], distilled["score_stderr"])
    shown = f"{b:.1f} vs {a:.1f} ({diff:+.1f} points, standard error of the difference {se:.1f})"
    if se == 0.0:
        return (f"Distilled vs baseline student: {shown}; one episode per task gives no error "
                "estimate, so this run cannot say whether distillation helped.")
    if diff > 2 * se:
        return f"Distillation helped: {shown}."
    if diff < -2 * se:
        return f"Distillation hurt at this scale: {shown}."
    return (f"Distillation made no clear difference at this scale: {shown}; the difference "
            "is within two standard errors.")


def collect_rows(pipe) -> list[dict]:
    """One row per model: parameters, file size, score, per-task returns, latency."""
    from tdmpc_opt.checkpoints import describe
    from tdmpc_opt.pipeline import MODELS

    latency = json.loads((pipe.dir / "latency.json").read_text())["models"]
    rows = []
    for name in MODELS:
        info = describe(pipe.model_path(name))
        result = json.loads(pipe.eval_path(name).read_text())
        rows.append({
            "model": name, "label": LABELS[name], "parameters": info["learnable_params"],
            "file_bytes": info["file_bytes"], "sha256": info["sha256"],
            "normalized_score": result["normalized_score"],
            "score_stderr": score_stderr(result),
            "tasks": {t: v["mean_return"] for t, v in result["tasks"].items()},
            "returns": {t: v["returns"] for t, v in result["tasks"].items()},
            "episode_seeds": {t: v["seeds"] for t, v in result["tasks"].items()},
            "latency_ms": 1000 * latency[name]["median_s"], "runtime": latency[name]["runtime"],
            "layers": result.get("layers"),  # absent in results made before 2026-12-04
        })
    return rows


def _layers_note(rows: list[dict]) -> list[str]:
    """One line saying how each model's evaluation planner computed its layers (the same
    precision plans other numbers where the fused CPU kernel did not build), then a blank."""
    by: dict[str, list[str]] = {}
    for r in rows:
        if r.get("layers"):
            by.setdefault(r["layers"], []).append(r["label"])
    if not by:
        return []
    parts = [" ".join(f"**{label}**" for label in labels) + f": `{layers}`"
             for layers, labels in by.items()]
    return ["Evaluation planner layers -- " + "; ".join(parts) + ".", ""]


def stage_seconds(pipe) -> dict[str, float]:
    """Wall seconds of every finished stage, from its marker, in pipeline order."""
    out = {}
    for name, _ in pipe.stages():
        path = pipe.dir / "stages" / f"{name}.json"
        if path.is_file():
            out[name] = json.loads(path.read_text())["seconds"]
    return out


def markdown(pipe, rows: list[dict], verdict: str, seconds: dict[str, float]) -> str:
    cfg, tasks = pipe.cfg, list(rows[0]["tasks"])
    head = ["model", "parameters", "file size", "normalized score", *tasks,
            "planner latency (batch 1)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"{r['parameters']:,}", _size(r["file_bytes"]),
                 f"{r['normalized_score']:.1f} ± {r['score_stderr']:.1f}",
                 *(f"{r['tasks'][t]:.1f}" for t in tasks),
                 f"{r['latency_ms']:.1f} ms ({r['runtime']})"]
        lines.append("| " + " | ".join(cells) + " |")
    m = machine()
    total = sum(seconds.values())
    episodes = cfg.max_steps or "all 500"
    return "\n".join([
        "# tdmpc-opt pipeline report", "",
        f"Made {m['date']} on {m['cpu']} ({m['cores']} cores, torch {m['torch']}); "
        f"stages took {total / 60:.1f} min in all (report excluded).", "",
        *lines, "",
        f"Normalized score: mean over tasks of mean episode return / 10, ± its standard error "
        f"over episodes. Every model is evaluated on the same {cfg.eval_episodes} episode(s) "
        f"per task (evaluation seed {cfg.eval_seed}; per-episode seeds in results.json), "
        f"{episodes} agent steps each, MPPI with {cfg.num_samples} samples x "
        f"{cfg.iterations} iterations. Latency: median wall time of one planner call for "
        "one environment, in the runtime the file asks for.", "",
        *_layers_note(rows),
        "## Distillation", "",
        verdict, "",
        f"Both students: {rows[1]['parameters']:,} parameters "
        f"(teacher {rows[0]['parameters']:,}, {rows[0]['parameters'] / rows[1]['parameters']:.1f}x"
        f"), the same dataset ({_data_note(pipe)}), {cfg.steps} updates of batch "
        f"{cfg.batch_size}, training seed {cfg.seed}; the distilled one adds the paper's reward "
        f"MSE to the teacher with coefficient {cfg.coef}"
        + (f" and our plan term with coefficient {cfg.plan_coef}" if cfg.plan_coef else "")
        + ".", "",
        "## Stages", "",
        "| stage | seconds |", "|---|---|",
        *(f"| {k} | {v:.1f} |" for k, v in seconds.items()), "",
        "Figures: `returns.png` (per-task returns), `score-vs-size.png`. Configuration: "
        "`pipeline.json`; all numbers: `results.json`.", "",
    ])


def _data_note(pipe) -> str:
    cfg = pipe.cfg
    if cfg.data:
        return f"given: {cfg.data}"
    return (f"{cfg.collect_episodes} teacher episodes per task, policy prior plus noise of std "
            f"{cfg.collect_noise}")


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def write_report(pipe) -> None:
    """Write report.md, results.json, returns.png and score-vs-size.png into the run."""
    from tdmpc_opt.pipeline import _write_json
    from tdmpc_opt.plots import plot_score_vs_size, plot_task_returns

    rows = collect_rows(pipe)
    by_name = {r["model"]: r for r in rows}
    verdict = distillation_verdict(by_name["student"], by_name["distilled"])
    seconds = stage_seconds(pipe)
    plot_task_returns([{"tasks": {t: {"mean_return": r["tasks"][t],
                                      "std_return": _std(r["returns"][t])} for t in r["tasks"]},
                        "normalized_score": r["normalized_score"]} for r in rows],
                      [r["label"] for r in rows], pipe.dir / "returns.png")
    plot_score_vs_size([(r["label"], r["file_bytes"] / 1e6, r["normalized_score"])
                        for r in rows], pipe.dir / "score-vs-size.png")
    _write_json(pipe.dir / "results.json", {"models": rows, "verdict": verdict,
                                            "stage_seconds": seconds, "machine": machine()})
    (pipe.dir / "report.md").write_text(markdown(pipe, rows, verdict, seconds))


def _std(x: list[float]) -> float:
    if len(x) < 2:
        return 0.0
    m = sum(x) / len(x)
    return math.sqrt(sum((v - m) ** 2 for v in x) / len(x))
