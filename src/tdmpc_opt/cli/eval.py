"""Evaluate a checkpoint on MT30 tasks with batched MPPI planning.

Episodes of all asked tasks run together, --batch-size at a time, and every episode has its
own seed, so results do not depend on the batch size. With --json, each finished episode is
appended to OUT.json.episodes.jsonl at once: an interrupted evaluation started again with the
same arguments skips the episodes it already finished. An OUT.json that holds the results of an
evaluation with other settings (checkpoint, precision, seed, --max-steps, planner) is refused,
never overwritten: choose another --json, or delete it to start over.

Examples:
  tdmpc-opt eval --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --tasks cartpole-balance,walker-stand --episodes 1 --seed 1 --json result.json
  tdmpc-opt eval --checkpoint student.safetensors --tasks mt30 --episodes 10
  tdmpc-opt eval --checkpoint ckpt.pt --tasks cartpole-balance --planner policy
  tdmpc-opt eval --checkpoint ckpt.pt --tasks walker-walk num_samples=256 iterations=4
  tdmpc-opt eval --checkpoint student-int8-dynamic.safetensors --tasks mt30 --compile
  tdmpc-opt eval --checkpoint ckpt.pt --tasks mt30 --workers 2        # 2 local processes
  tdmpc-opt eval --checkpoint ckpt.pt --tasks mt30 --backend ray --ray-address auto

--workers N runs chunks of episodes in N processes (one torch thread each unless --threads);
--backend ray runs them as Ray tasks on a cluster (--ray-address auto or HOST:PORT) or on a
local Ray instance (needs the ray extra: pip install 'tdmpc-opt[ray]'). See docs/scaling.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tdmpc_opt.cli._common import add_backend_arguments, output_dir, output_file, positive_int

NAME = "eval"
HELP = "evaluate a checkpoint on tasks (batched planning, normalized score)"


def add_arguments(p):
    p.add_argument("--checkpoint", required=True, help="model file (.pt or .safetensors)")
    p.add_argument("--tasks", default=None,
                   help="mt30, or comma-separated task names (default: the model's tasks)")
    p.add_argument("--episodes", type=positive_int, default=10, help="episodes per task")
    p.add_argument("--seed", type=int, default=1, help="run seed (episode seeds derive from it)")
    p.add_argument("--planner", choices=("mppi", "policy"), default="mppi",
                   help="plan with MPPI (default) or act from the policy prior")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="episodes planned together in one batched call")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="cut episodes after this many agent steps (default: full 500)")
    p.add_argument("--json", default=None, type=output_file,
                   help="write results here (and resume from it)")
    p.add_argument("--video", default=None, type=output_dir,
                   help="write one MP4 per task into this folder")
    # quantization.RUNTIMES, spelled out so that --help does not import torch
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "int8"),
                   help="planner precision (default auto: int8 for int8-dynamic files, bf16 "
                        "for bf16 files, else fp32)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the planner (the first plan of each batch size "
                        "compiles, ~2.5 minutes on 2 cores; cached on disk)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    add_backend_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="planner settings, e.g. num_samples=256 horizon=3")


def check_tasks(agent, tasks: tuple[str, ...]) -> None:
    """Refuse tasks the model was not trained for or whose sizes it cannot take."""
    from tdmpc_opt.errors import TaskError
    from tdmpc_opt.tasks import get_task

    cfg = agent.cfg
    for name in tasks:
        info = get_task(name)
        if info.suite == "metaworld":
            raise TaskError(f"{name}: Meta-World environments are not shipped; evaluate DMControl"
                            " tasks only")
        if cfg.multitask and name not in cfg.tasks:
            raise TaskError(f"task {name!r} is not in this checkpoint's task set "
                            f"({cfg.num_tasks} tasks)")
        if not cfg.multitask and cfg.tasks and name not in cfg.tasks:
            raise TaskError(f"this single-task checkpoint is for {cfg.tasks[0]!r}, not {name!r}")
        if info.obs_dim > cfg.obs_dim or (not cfg.multitask and info.obs_dim != cfg.obs_dim):
            raise TaskError(f"{name} has {info.obs_dim}-dim observations but the checkpoint "
                            f"takes {cfg.obs_dim}")
        if info.action_dim > cfg.action_dim:
            raise TaskError(f"{name} has {info.action_dim} action dims but the checkpoint "
                            f"makes {cfg.action_dim}")


def _identity(args, agent, planner) -> dict:
    from tdmpc_opt.config import config_to_dict

    return {"checkpoint_sha256": agent.info.get("sha256"), "runtime": agent.precision,
            "seed": args.seed,
            "max_steps": args.max_steps, "planner": config_to_dict(planner)}


def _differing(identity: dict, other: dict) -> list[str]:
    """Keys of ``identity`` that ``other`` (an earlier run's) records with another value."""
    return [k for k, v in identity.items() if k in other and other[k] != v]


def _other_settings(path: Path, what: str, differing: list[str]):
    from tdmpc_opt.errors import ConfigError

    return ConfigError(f"{path} holds {what} of an evaluation with other settings "
                       f"({', '.join(differing)}); choose another --json, or delete it to start "
                       "over")


def _load_finished(path: Path, identity: dict) -> dict:
    """Finished episodes of an earlier run with the same identity, keyed by (task, episode);
    finished episodes of a run with another identity are refused, never overwritten."""
    from tdmpc_opt.evaluation import EpisodeResult

    if not path.exists():
        return {}
    done = {}
    lines = path.read_text().splitlines()
    try:
        head = json.loads(lines[0]).get("identity", {}) if lines else {}
        if head != identity:
            if len(lines) > 1 and _differing(identity, head):
                raise _other_settings(path, f"{len(lines) - 1} finished episode(s)",
                                      _differing(identity, head))
            return {}
        for line in lines[1:]:
            res = EpisodeResult(**json.loads(line))
            done[(res.task, res.episode)] = res
    except (json.JSONDecodeError, TypeError, AttributeError):
        pass  # a torn last line: keep what parsed (an unreadable head: nothing to resume)
    return done


def _refuse_other_results(result: Path, identity: dict) -> None:
    """Refuse to overwrite ``--json`` results of an evaluation with other settings (another
    checkpoint, runtime, seed, step limit or planner)."""
    try:
        earlier = json.loads(result.read_text()) if result.exists() else {}
    except (OSError, ValueError):
        return  # unreadable: nothing to lose
    if isinstance(earlier, dict) and _differing(identity, earlier):
        raise _other_settings(result, "the results", _differing(identity, earlier))


def run(args) -> int:
    import torch

    from tdmpc_opt.cli._common import write_json
    from tdmpc_opt.config import PlannerConfig, apply_overrides
    from tdmpc_opt.evaluation import episode_specs, result_to_dict, summarize
    from tdmpc_opt.tasks import resolve_tasks

    in_process = args.backend == "local" and (args.workers or 1) == 1
    _check_backend(args, in_process)
    if args.threads and in_process:
        torch.set_num_threads(args.threads)
    planner = apply_overrides(PlannerConfig(mpc=args.planner == "mppi"), args.overrides)
    from tdmpc_opt.quantization import load_fast_agent, with_precision

    # by default an int8-dynamic or bf16 file plans in that precision, as when deployed
    agent = load_fast_agent(args.checkpoint, args.precision, planner=planner,
                            device=args.device)
    if args.compile:
        agent = with_precision(agent, agent.precision + "+compile")
    tasks = resolve_tasks(args.tasks) if args.tasks is not None else agent.cfg.tasks
    if not tasks:
        from tdmpc_opt.errors import TaskError

        raise TaskError("the checkpoint does not name its task: pass --tasks")
    check_tasks(agent, tasks)
    if args.video:
        import os

        os.environ.setdefault("MUJOCO_GL", "egl")
    specs = episode_specs(tasks, args.episodes, args.seed)
    identity = _identity(args, agent, planner)
    log = Path(args.json + ".episodes.jsonl") if args.json else None
    done = _load_finished(log, identity) if log else {}
    if log:
        _refuse_other_results(Path(args.json), identity)
    todo = [s for s in specs if (s.task, s.episode) not in done]
    if log and not done:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(json.dumps({"identity": identity}) + "\n")
    if done:
        print(f"resuming: {len(done)} of {len(specs)} episodes already finished")

    def on_result(res):
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(result_to_dict(res)) + "\n")

    start = time.perf_counter()
    steps = _run_with_progress(agent if in_process else planner, todo, args, on_result)
    elapsed = time.perf_counter() - start
    results = list(done.values()) + steps
    summary = summarize(results, tasks)
    _print_table(summary)
    if args.json:
        out = dict(summary, **identity, checkpoint=str(args.checkpoint), episodes=args.episodes,
                   batch_size=args.batch_size, backend=args.backend, workers=args.workers,
                   elapsed_s=round(elapsed, 2),
                   episode_seeds={t: v["seeds"] for t, v in summary["tasks"].items()})
        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


def _check_backend(args, in_process: bool) -> None:
    """Refuse option combinations the chosen backend cannot honour (before loading anything)."""
    from tdmpc_opt.cli._common import check_backend_options
    from tdmpc_opt.errors import ConfigError

    if args.video and not in_process:
        raise ConfigError("--video needs the in-process backend (--backend local --workers 1)")
    check_backend_options(args.backend, args.ray_address)


def _run_with_progress(agent, todo, args, on_result):
    """Run ``todo`` with a progress bar: in this process when ``agent`` is an Agent, else on
    ``args.backend`` with ``agent`` the PlannerConfig that the workers plan with."""
    from tqdm import tqdm

    from tdmpc_opt.config import PlannerConfig
    from tdmpc_opt.evaluation import run_episodes, write_video
    from tdmpc_opt.tasks import get_task

    total = sum(min(args.max_steps or 10**9, get_task(s.task).episode_length) for s in todo)
    bar = tqdm(total=total, unit="step", disable=args.quiet or not todo, desc="eval")
    seen_video = set()

    def record(spec):
        if args.video and spec.task not in seen_video:
            seen_video.add(spec.task)
            return True
        return False

    def on_video(spec, frames):
        write_video(Path(args.video) / f"{spec.task}.mp4", frames)

    try:
        if isinstance(agent, PlannerConfig):
            from tdmpc_opt.backends import run_rollouts

            return run_rollouts(args.checkpoint, agent, todo,
                                backend=args.backend, workers=args.workers,
                                batch_size=args.batch_size, max_steps=args.max_steps,
                                ray_address=args.ray_address, on_result=on_result,
                                on_step=bar.update, device=args.device,
                                threads=args.threads or 1)
        return run_episodes(agent, todo, args.batch_size, args.max_steps, True, on_result,
                            bar.update, record, on_video)
    finally:
        bar.close()


def _print_table(summary: dict) -> None:
    print(f"{'task':<26}{'mean return':>12}{'std':>9}{'episodes':>9}{'success':>9}")
    for task, v in summary["tasks"].items():
        success = "" if v["success"] is None else f"{v['success']:.2f}"
        print(f"{task:<26}{v['mean_return']:>12.1f}{v['std_return']:>9.1f}"
              f"{len(v['returns']):>9}{success:>9}")
    print(f"normalized score: {summary['normalized_score']:.2f}")
