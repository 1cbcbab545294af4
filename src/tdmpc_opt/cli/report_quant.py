"""Compare quantized formats of a checkpoint: size, prediction error, score and planner speed.

For each format (fp32, fp16, bf16, int8, int8-dynamic, plus any published files given with
--paper-files, used as they are) it writes the file into --out, then measures: file size,
bytes of tensor data, prediction error against float32 on held-out inputs (states from short
environment rollouts with seeds the calibration never uses; --inputs random for N(0, 1)
observations), the planner's action change for the same noise, planner steps/s at each
--batch size (one thread by default) and, with --score-tasks, the normalized score from
tdmpc_opt.evaluation (finished scores are kept in scores.json, so a rerun resumes).
Writes report.md (a markdown table), report.json and report.png.

Examples:
  tdmpc-opt report-quant --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --paper-files ../shared/checkpoints/tdmpc-opt-mt30-1M-int8.pt \\
      ../shared/checkpoints/tdmpc-opt-mt30-1M-mixed.pt --out reports/quant
  tdmpc-opt report-quant --checkpoint model.pt --score-tasks walker-walk,cartpole-swingup \\
      --episodes 2 --out reports/quant
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from tdmpc_opt.cli._common import int_list, output_dir, positive_int, thread_count, write_json

NAME = "report-quant"
HELP = "compare quantized formats: size, prediction error, score, planner latency"
FORMATS = ("fp32", "fp16", "bf16", "int8", "int8-dynamic")
_METRICS = ("z", "z_next", "reward", "q", "pi_mean")


def format_list(text: str) -> list[str]:
    """argparse type: comma-separated names from :data:`FORMATS` (checked before any work)."""
    import argparse

    names = [f.strip() for f in text.split(",") if f.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no format given")
    for name in names:
        if name not in FORMATS:
            raise argparse.ArgumentTypeError(f"unknown format {name!r}; choose from "
                                             f"{', '.join(FORMATS)}")
    return names


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="float checkpoint to quantize")
    p.add_argument("--out", default="reports/quant", type=output_dir,
                   help="folder for files and the report")
    p.add_argument("--formats", default=",".join(FORMATS), type=format_list,
                   help="comma list of " + ", ".join(FORMATS))
    p.add_argument("--paper-files", nargs="*", default=[],
                   help="published quantized .pt files to evaluate as they are")
    p.add_argument("--inputs", choices=("env", "random"), default="env",
                   help="held-out inputs: environment rollouts or random observations")
    p.add_argument("--inputs-per-task", type=positive_int, default=64)
    p.add_argument("--seed", type=int, default=1000, help="seed of held-out inputs and scores")
    p.add_argument("--batch", type=int_list, default=[1, 16],
                   help="planner batch sizes to time (default 1,16); empty to skip")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed planner steps")
    p.add_argument("--threads", type=thread_count, default=1, help="torch threads")
    p.add_argument("--score-tasks", default="", help="comma list of tasks to score on")
    p.add_argument("--episodes", type=positive_int, default=2, help="episodes per task")


# ------------------------------------------------------------------------------ inputs
def held_out_inputs(model, per_task: int, seed: int, source: str = "env"):
    """``(obs [M, obs_dim], action [M, A], task [M])`` for every task of ``model``.

    ``env``: states of a rollout per task (seed ``seed + task index``), acting alternately
    with the policy prior (noise std 0.5) and uniform random actions; ``random``: N(0, 1)
    observations of the task's size with uniform actions.
    """
    import torch

    cfg, gen = model.cfg, torch.Generator().manual_seed(seed)
    tasks = cfg.tasks or ("task",)
    obs, act, tid = [], [], []
    for ti, name in enumerate(tasks):
        env, o = _reset(name, seed + ti) if source == "env" else (None, None)
        mask = model.action_mask(torch.tensor([ti]))[0] if cfg.multitask else 1.0
        for k in range(per_task):
            if env is None:
                o = torch.randn(_obs_size(name, cfg), generator=gen).numpy()
            x = torch.nn.functional.pad(torch.as_tensor(o, dtype=torch.float32),
                                        (0, cfg.obs_dim - len(o)))
            t = torch.tensor([ti]) if cfg.multitask else None
            with torch.no_grad():
                a = model.pi(model.encode(x[None], t), t,
                             0.5 * torch.randn(1, cfg.action_dim, generator=gen)).action[0]
            if env is None or k % 2:
                a = (torch.rand(cfg.action_dim, generator=gen) * 2 - 1) * mask
            obs.append(x), act.append(a), tid.append(ti)
            if env is not None:
                o, *_ = env.step(a[:env.action_space.shape[0]].numpy())
        if env is not None:
            env.close()
    return torch.stack(obs), torch.stack(act), torch.tensor(tid) if cfg.multitask else None


def _reset(task: str, seed: int):
    from tdmpc_opt.envs import make_env

    env = make_env(task, seed)
    return env, env.reset(seed=seed)[0]


def _obs_size(task: str, cfg) -> int:
    from tdmpc_opt.tasks import TASKS

    return TASKS[task].obs_dim if task in TASKS else cfg.obs_dim


def predictions(model, obs, act, task, precision: str = "fp32") -> dict:
    """End-to-end predictions: latent, next latent, decoded reward, ensemble-mean Q, pi mean.

    ``bf16``/``int8`` are simulated with :func:`simulated_precision`.
    """
    import torch

    with torch.no_grad(), simulated_precision(model, precision):
        z = model.encode(obs, task)
        return {"z": z, "z_next": model.next(z, act, task),
                "reward": model.decode(model.reward(z, act, task)),
                "q": model.decode(model.q_logits(z, act, task)).mean(0),
                "pi_mean": model.pi(z, task, torch.zeros_like(act)).mean}


@contextlib.contextmanager
def simulated_precision(model, precision: str):
    """Round the inputs of the model's linear layers as the planner's ``precision`` does.

    ``int8``: symmetric per-row int8 (fake quantization; weights are used as they are, so
    pass an int8 file's model for int8 weights); ``bf16``: inputs and weights rounded to
    bfloat16. As in :mod:`tdmpc_opt.fast_model`, the encoder stays float32 and first layers
    round only their latent part (task embedding and action parts stay float32).
    """
    import torch
    import torch.nn as nn

    from tdmpc_opt.layers import EnsembleLayer

    def rnd(x):
        if precision == "bf16":
            return x.to(torch.bfloat16).float()
        s = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(x / s).clamp(-127, 127) * s

    def hook(mod, args, first: bool):
        x = args[0]
        if first:
            lat = model.cfg.latent_dim
            return (torch.cat([rnd(x[..., :lat]), x[..., lat:]], -1), *args[1:])
        return (rnd(x), *args[1:])

    handles, saved = [], []
    if precision != "fp32":
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear | EnsembleLayer) and not name.startswith("_encoder"):
                first = name.endswith(".0")
                handles.append(mod.register_forward_pre_hook(
                    lambda m, a, first=first: hook(m, a, first)))
                if precision == "bf16":
                    saved.append((mod.weight, mod.weight.detach().clone()))
                    mod.weight.data = rnd(mod.weight.data)
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        for param, value in saved:
            param.data = value


def prediction_errors(ref: dict, got: dict) -> dict:
    """Mean and max absolute error per output; Q relative to ``max(1, |Q|)``."""
    out = {}
    for k in _METRICS:
        d = (got[k] - ref[k]).abs()
        if k == "q":
            d = d / ref[k].abs().clamp_min(1.0)
        out[k] = {"mean": float(d.mean()), "max": float(d.max())}
    return out


# ----------------------------------------------------------------------------- variants
def make_variants(checkpoint: Path, out: Path, formats: list[str], paper: list[str]) -> list:
    """Write each format's file into ``out``; ``[(name, path, runtime)]``."""
    from tdmpc_opt.checkpoints import load_world_model, save_checkpoint
    from tdmpc_opt.quantization import check_format, quantize_checkpoint, runtime_for

    variants = []
    for fmt in formats:
        path = out / f"{fmt}.safetensors"
        if fmt == "fp32":
            save_checkpoint(path, load_world_model(checkpoint)[0])
        else:
            quantize_checkpoint(checkpoint, path, check_format(fmt))
        variants.append((fmt, path, runtime_for(fmt)))
    for f in paper:
        variants.append((f"paper:{Path(f).stem}", Path(f), "fp32"))
    return variants


def planner_speed(agent, batches: list[int], repeats: int, seed: int) -> dict:
    """Planner steps/s per batch size: the fastest of ``repeats`` timed steps after one
    warm-up (the least disturbed by other processes on a shared machine)."""
    import torch

    out = {}
    for b in batches:
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(b, agent.cfg.obs_dim, generator=gen)
        tid = torch.arange(b) % agent.cfg.num_tasks if agent.cfg.multitask else None
        t0 = torch.ones(b, dtype=torch.bool)
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            agent.step(x, tid, agent.initial_plan(b), t0)
            times.append(time.perf_counter() - start)
        out[str(b)] = 1.0 / min(times[1:])
    return out


def action_change(ref_agent, agent, obs, task, n: int = 8, seed: int = 7) -> float:
    """Mean absolute difference of planned actions of two agents for the same noise."""
    import torch

    idx = torch.linspace(0, len(obs) - 1, n).long()
    tid = None if task is None else task[idx]
    acts = []
    for a in (ref_agent, agent):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        acts.append(a.step(obs[idx], tid, a.initial_plan(n), torch.ones(n, dtype=torch.bool),
                           True, gens)[0])
    return float((acts[0] - acts[1]).abs().mean())


def score(agent, tasks: list[str], episodes: int, seed: int) -> dict | None:
    """``{"score": normalized score, "returns": {task: mean return}}`` on ``tasks`` (None
    when ``tdmpc_opt.evaluation`` is missing)."""
    try:
        from tdmpc_opt.evaluation import episode_specs, run_episodes, summarize
    except ImportError:
        return None
    specs = episode_specs(tasks, episodes, seed)
    summary = summarize(run_episodes(agent, specs, batch_size=len(specs)), tasks)
    return {"score": summary["normalized_score"],
            "returns": {t: v["mean_return"] for t, v in summary["tasks"].items()}}


# ------------------------------------------------------------------------------- report
def _digest(model) -> str:
    """Digest of a file's weights as loaded (float32): formats that load to the same numbers
    (fp16 of an fp16 checkpoint and fp32) share one score."""
    from tdmpc_opt.checkpoints import tensor_digest

    state = model.state_dict()
    return tensor_digest({k: v for k, v in state.items() if not k.startswith("_target_Qs.")}
                         )[:16]


def measure(args, out: Path) -> list[dict]:
    """Rows of the report, one per variant (see the module docstring)."""
    import torch

    from tdmpc_opt.checkpoints import read_state_dict
    from tdmpc_opt.quantization import load_fast_agent

    torch.set_num_threads(args.threads)
    variants = make_variants(Path(args.checkpoint), out, args.formats, args.paper_files)
    ref_agent = load_fast_agent(args.checkpoint, "fp32")
    inputs = held_out_inputs(ref_agent.model, args.inputs_per_task, args.seed, args.inputs)
    ref = predictions(ref_agent.model, *inputs)
    tasks = [t for t in args.score_tasks.split(",") if t]
    cache_path = out / "scores.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    rows = []
    for name, path, runtime in variants:
        agent = load_fast_agent(path, runtime, tasks=ref_agent.cfg.tasks or None)
        state, _ = read_state_dict(path)
        row = {"name": name, "file": str(path), "runtime": runtime,
               "file_bytes": path.stat().st_size,
               "weight_bytes": sum(v.numel() * v.element_size() for v in state.values()),
               "errors": prediction_errors(ref, predictions(agent.model, *inputs, runtime)),
               "action_change": action_change(ref_agent, agent, inputs[0], inputs[2]),
               "steps_per_s": planner_speed(agent, args.batch, args.repeats, args.seed)}
        key = f"{_digest(agent.model)}:{runtime}:{','.join(tasks)}:{args.episodes}:{args.seed}"
        if tasks and key not in cache:
            cache[key] = score(agent, tasks, args.episodes, args.seed)
            write_json(cache_path, cache)
        found = cache.get(key) if tasks else None
        row["score"] = found["score"] if isinstance(found, dict) else found
        row["returns"] = found.get("returns") if isinstance(found, dict) else None
        rows.append(row)
        print(f"{name}: {row['file_bytes']:,} bytes, q err {row['errors']['q']['mean']:.2e}, "
              f"steps/s {row['steps_per_s']}, score {row['score']}", flush=True)
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    """The report as a markdown table (errors are mean / max over the held-out inputs)."""
    base = next((r["file_bytes"] for r in rows if r["name"] == "fp32"), None)
    batches = list(rows[0]["steps_per_s"]) if rows else []
    head = ["format", "runtime", "file bytes", "% of fp32", "weight bytes", "latent z",
            "reward", "Q (rel.)", "pi mean", "action change", "score",
            *[f"steps/s b{b}" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        e = r["errors"]
        err = [f"{e[k]['mean']:.1e} / {e[k]['max']:.1e}" for k in ("z", "reward", "q",
                                                                      "pi_mean")]
        pct = f"{100 * r['file_bytes'] / base:.1f}%" if base else "-"
        cells = [r["name"], r["runtime"], f"{r['file_bytes']:,}", pct,
                 f"{r['weight_bytes']:,}", *err, f"{r['action_change']:.3f}",
                 "-" if r["score"] is None else f"{r['score']:.1f}",
                 *[f"{r['steps_per_s'][b]:.2f}" for b in batches]]
        lines.append("| " + " | ".join(cells) + " |")
    notes = "\n".join(f"- {k}: {v}" for k, v in meta.items())
    return "\n".join(lines) + "\n\n" + notes + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Bars: file size, mean relative Q error and reward error, planner steps/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    axes[0].bar(names, [r["file_bytes"] / 1e6 for r in rows])
    axes[0].set_ylabel("file size (MB)")
    for i, k in enumerate(("q", "reward")):
        axes[1].bar([j + 0.4 * i for j in range(len(rows))],
                    [max(r["errors"][k]["mean"], 1e-9) for r in rows], 0.4, label=k)
    axes[1].set_yscale("log")
    axes[1].set_ylabel("mean error vs float32 (Q relative)")
    axes[1].legend()
    for i, b in enumerate(rows[0]["steps_per_s"] if rows else []):
        axes[2].bar([j + 0.4 * i for j in range(len(rows))],
                    [r["steps_per_s"][b] for r in rows], 0.4, label=f"batch {b}")
    axes[2].set_ylabel("planner steps/s (one thread)")
    if rows and rows[0]["steps_per_s"]:  # no timing asked (--batch ""): an empty panel
        axes[2].legend()
    for ax in axes:
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(args) -> int:
    import platform

    import torch

    from tdmpc_opt.checkpoints import file_sha256

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = measure(args, out)
    meta = {"checkpoint": f"{args.checkpoint} (sha256 {file_sha256(args.checkpoint)[:16]})",
            "held-out inputs": f"{args.inputs}, {args.inputs_per_task} per task, seed "
                               f"{args.seed}",
            "score": f"tasks {args.score_tasks or '(none)'}, {args.episodes} episodes each",
            "timing": f"torch {torch.__version__}, {args.threads} thread(s), "
                      f"{platform.processor() or platform.machine()}, fastest of "
                      f"{args.repeats} planning steps"}
    (out / "report.md").write_text(markdown(rows, meta))
    write_json(out / "report.json", {"meta": meta, "rows": rows})
    plot(rows, out / "report.png")
    print(f"wrote {out / 'report.md'}, report.json and report.png")
    return 0
