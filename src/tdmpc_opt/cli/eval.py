"""Evaluate a checkpoint on MT30 tasks with batched MPPI planning.

Episodes of all asked tasks run together, --batch-size at a time, and every episode has its
own seed, so results do not depend on the batch size. With --json, each finished episode is
appended to OUT.json.episodes.jsonl at once: an interrupted evaluation started again with the
same arguments skips the episodes it already finished (a line cut short by a crash is skipped
with a warning); with more --episodes it adds the missing ones, with fewer it reports the first.
An OUT.json that holds the results of an evaluation with other settings (checkpoint, precision,
how the planner computes its layers here, seed, tasks, --max-steps, planner), or is no result
of this command, is refused, never overwritten: choose another --json, or delete it to start
over. Worker processes and Ray tasks plan in the same precision as this process, and refuse to
play episodes where they would compute the layers otherwise (e.g. int8 where the fused CPU
kernel does not build). Ctrl-C keeps every finished episode (worker processes are stopped at
once).

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

import itertools
import json
import os
import sys
import time
from pathlib import Path

from tdmpc_opt import stops
from tdmpc_opt.cli._common import (
    add_backend_arguments,
    output_dir,
    output_file,
    positive_int,
    thread_count,
)

NAME = "eval"
HELP = "evaluate a checkpoint on tasks (batched planning, normalized score)"

_BLOCK = 4096
"""Episodes handed to the backend at a time: memory stays bounded for any --episodes."""

_RESULT_KEYS = ("tasks", "normalized_score", "checkpoint_sha256", "planner", "episode_seeds")
"""Keys every results file of this command has."""


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
    p.add_argument("--threads", type=thread_count, default=None, help="torch threads")
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


def _identity(args, agent, planner, tasks) -> dict:
    """What decides which episodes a run plays and how: runs that differ in it never share a
    --json. The episode count is not part of it: more episodes resume, fewer report the first."""
    from tdmpc_opt.config import config_to_dict

    return {"checkpoint_sha256": agent.info.get("sha256"), "runtime": agent.precision,
            "layers": agent.layers, "seed": args.seed, "task_names": list(tasks),
            "max_steps": args.max_steps, "planner": config_to_dict(planner)}


def _differing(identity: dict, other: dict) -> list[str]:
    """Keys of ``identity`` that ``other`` (an earlier run's) records with another value, or
    not at all."""
    return [k for k, v in identity.items() if other.get(k) != v]


def _other_settings(path: Path, what: str, differing: list[str]):
    """The error refusing ``path``, which holds ``what`` of a run with other settings."""
    from tdmpc_opt.errors import ConfigError

    return ConfigError(f"{path} holds {what} of an evaluation with other settings "
                       f"({', '.join(differing)}); choose another --json, or delete it to start "
                       "over")


def _not_ours(path: Path, what: str):
    """The error refusing ``path``, which is not ``what`` of this command."""
    from tdmpc_opt.errors import ConfigError

    return ConfigError(f"{path} exists and is not {what} of tdmpc-opt eval; choose another "
                       "--json, or delete it")


def _earlier_results(path: Path) -> dict | None:
    """The results an earlier evaluation wrote at ``path`` (None if there is no file); any
    other file there is refused, never overwritten."""
    if not path.exists():
        return None
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        earlier = None
    if not isinstance(earlier, dict) or not all(k in earlier for k in _RESULT_KEYS):
        raise _not_ours(path, "the results")
    return earlier


def _load_finished(log: Path, identity: dict) -> dict:
    """Finished episodes of an earlier run with the same identity, keyed by (task, episode).

    Unreadable lines (one torn by a crash mid-write) are skipped with one warning: their
    episodes run again. Finished episodes of a run with another identity, or a file that is
    no episode log, are refused, never overwritten.
    """
    from tdmpc_opt.evaluation import EpisodeResult

    if not log.exists():
        return {}
    lines = log.read_text(errors="replace").splitlines()
    if not lines:
        return {}
    try:
        head = json.loads(lines[0])["identity"]
    except (ValueError, TypeError, KeyError):
        head = None
    if not isinstance(head, dict):
        raise _not_ours(log, "an episode log")
    if _differing(identity, head):
        if len(lines) > 1:
            raise _other_settings(log, f"{len(lines) - 1} finished episode(s)",
                                  _differing(identity, head))
        return {}
    done, unreadable = {}, 0
    for line in lines[1:]:
        try:
            res = EpisodeResult(**json.loads(line))
        except (ValueError, TypeError):
            unreadable += 1
            continue
        done[(res.task, res.episode)] = res
    if unreadable:
        print(f"warning: skipped {unreadable} unreadable line(s) of {log} (a write cut short); "
              "episodes missing from it run again", file=sys.stderr)
    return done


def _open_log(log: Path, identity: dict, fresh: bool) -> None:
    """Start ``log`` with the run's identity when ``fresh``; else make sure the next episode
    appended starts on a line of its own (after a last line torn by a crash)."""
    from tdmpc_opt.checkpoints import atomic_write

    if fresh:
        head = json.dumps({"identity": identity}) + "\n"
        atomic_write(log, lambda tmp: Path(tmp).write_text(head))
        return
    with open(log, "rb") as f:
        f.seek(-1, os.SEEK_END)
        torn = f.read(1) != b"\n"
    if torn:
        with open(log, "a") as f:
            f.write("\n")


def _check_folder(folder: str) -> None:
    """Create ``folder`` and check that a file can be written in it, before any episode runs."""
    import tempfile

    from tdmpc_opt.errors import OutputError

    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise OutputError(e.errno, e.strerror, folder) from None


def run(args) -> int:
    import torch

    from tdmpc_opt.cli._common import write_json
    from tdmpc_opt.config import PlannerConfig, apply_overrides
    from tdmpc_opt.evaluation import iter_episode_specs, result_to_dict, summarize
    from tdmpc_opt.tasks import resolve_tasks

    in_process = args.backend == "local" and (args.workers or 1) == 1
    _check_backend(args, in_process)
    earlier = _earlier_results(Path(args.json)) if args.json else None
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
    identity = _identity(args, agent, planner, tasks)
    log = Path(args.json + ".episodes.jsonl") if args.json else None
    done = _load_finished(log, identity) if log else {}
    if earlier is not None and _differing(identity, earlier):
        raise _other_settings(Path(args.json), "the results", _differing(identity, earlier))
    finished = {k: res for k, res in done.items() if k[1] < args.episodes}
    if args.video:
        os.environ.setdefault("MUJOCO_GL", "egl")
        _check_folder(args.video)
    if log:
        _open_log(log, identity, fresh=not done)
    if finished:
        beyond = len(done) - len(finished)
        print(f"resuming: {len(finished)} of {len(tasks) * args.episodes} episodes already "
              "finished" + (f" ({beyond} more in {log}, beyond --episodes, not reported)"
                            if beyond else ""))

    def on_result(res):
        if log:
            with open(log, "a") as f:
                f.write(json.dumps(result_to_dict(res)) + "\n")

    todo = (s for s in iter_episode_specs(tasks, args.episodes, args.seed)
            if (s.task, s.episode) not in done)
    start = time.perf_counter()
    steps = _run_with_progress(agent, in_process, todo, _steps_left(tasks, args, finished),
                               args, on_result)
    elapsed = time.perf_counter() - start
    summary = summarize(list(finished.values()) + steps, tasks)
    if args.json:  # before the table: a closed stdout (``| head``) loses nothing
        out = dict(summary, **identity, checkpoint=str(args.checkpoint), episodes=args.episodes,
                   batch_size=args.batch_size, backend=args.backend, workers=args.workers,
                   elapsed_s=round(elapsed, 2),
                   episode_seeds={t: v["seeds"] for t, v in summary["tasks"].items()})
        write_json(args.json, out)
    _print_table(summary)
    if args.json:
        print(f"wrote {args.json}")
    return 0


def _steps_left(tasks, args, finished: dict) -> int:
    """Agent steps of the episodes still to run, at most (the progress bar's total)."""
    from collections import Counter

    from tdmpc_opt.tasks import get_task

    done_per_task = Counter(task for task, _ in finished)
    return sum(min(args.max_steps or 10**9, get_task(t).episode_length)
               * (args.episodes - done_per_task[t]) for t in tasks)


def _check_backend(args, in_process: bool) -> None:
    """Refuse option combinations the chosen backend cannot honour (before loading anything)."""
    from tdmpc_opt.cli._common import check_backend_options
    from tdmpc_opt.errors import ConfigError

    if args.video and not in_process:
        raise ConfigError("--video needs the in-process backend (--backend local --workers 1)")
    check_backend_options(args.backend, args.ray_address)


def _run_with_progress(agent, in_process: bool, todo, total: int, args, on_result):
    """Run the episodes of the iterator ``todo`` (``total`` agent steps at most) with a
    progress bar, ``_BLOCK`` at a time: with ``agent`` in this process, else on
    ``args.backend``, whose workers load the checkpoint and plan as ``agent`` does (its
    planner and precision; a worker that would compute the layers otherwise is an error)."""
    from tqdm import tqdm

    from tdmpc_opt.evaluation import run_episodes, write_video

    bar = tqdm(total=total, unit="step", disable=args.quiet or not total, desc="eval")
    seen_video = set()
    seen_stops: list[int] = []  # the stop signals seen while episodes run (stops.noted)

    def on_step(steps: int) -> None:
        stops.raise_noted(seen_stops)  # a Ctrl-C whose exception a __del__ dropped: stop here
        bar.update(steps)

    def record(spec):
        if args.video and spec.task not in seen_video:
            seen_video.add(spec.task)
            return True
        return False

    def on_video(spec, frames):
        write_video(Path(args.video) / f"{spec.task}.mp4", frames)

    def run_block(block):
        if not in_process:
            from tdmpc_opt.backends import run_rollouts

            return run_rollouts(args.checkpoint, agent.planner, block,
                                backend=args.backend, workers=args.workers,
                                batch_size=args.batch_size, max_steps=args.max_steps,
                                ray_address=args.ray_address, on_result=on_result,
                                on_step=on_step, device=args.device,
                                threads=args.threads or 1, precision=agent.precision,
                                layers=agent.layers)
        return run_episodes(agent, block, args.batch_size, args.max_steps, True, on_result,
                            on_step, record, on_video)

    results = []
    with stops.noted(seen_stops):
        try:
            while block := list(itertools.islice(todo, _BLOCK)):
                results += run_block(block)
        finally:
            bar.close()
    return results


def _print_table(summary: dict) -> None:
    print(f"{'task':<26}{'mean return':>12}{'std':>9}{'episodes':>9}{'success':>9}")
    for task, v in summary["tasks"].items():
        success = "" if v["success"] is None else f"{v['success']:.2f}"
        print(f"{task:<26}{v['mean_return']:>12.1f}{v['std_return']:>9.1f}"
              f"{len(v['returns']):>9}{success:>9}")
    print(f"normalized score: {summary['normalized_score']:.2f}")
