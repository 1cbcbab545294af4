"""Roll an agent out in the environments and write the episodes as a tdmpc-opt dataset.

Episodes run --batch at a time (one batched planner call per step); each has its own seed,
derived from --seed, its task and its number, for its environment, its planner noise and its
action noise, so the dataset does not depend on --batch or on the backend. Observations are
stored padded to the model's size and actions as the agent produced them (padded, masked;
--action-noise is added to the task's own action dimensions only), as in TD-MPC2's datasets.

Examples:
  tdmpc-opt collect --checkpoint runs/cp-s1/model.safetensors --tasks cartpole-balance \\
      --episodes 20 --out data/cartpole --explore
  tdmpc-opt collect --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --tasks walker-walk,cheetah-run --episodes 5 --out data/two --policy --action-noise 0.1
  tdmpc-opt collect --checkpoint ckpt.pt --tasks mt30 --episodes 10 --out data/mt30 \\
      --backend ray --ray-address auto

--workers N runs chunks of episodes in N processes (one torch thread each); --backend ray
runs them as Ray tasks on a cluster (--ray-address auto or HOST:PORT) or on a local Ray
instance (needs the ray extra). Workers send whole episodes back; this process writes them
in task order, then episode order, so every backend and worker count writes the same
dataset. A worker that dies is replaced and its episodes rerun. See docs/scaling.md.
"""

from __future__ import annotations

NAME = "collect"
HELP = "roll an agent out and write its episodes in the dataset format"
INTERRUPTED = ("interrupted; nothing was written: the episodes collected so far are removed and "
               "a dataset that --overwrite was replacing is kept as it was; run the command "
               "again to collect from the start")


def add_arguments(p):
    from tdmpc_opt.cli._common import add_backend_arguments, noise_stds, output_dir, positive_int

    p.add_argument("--checkpoint", required=True, help="model: .pt, .safetensors or run dir")
    p.add_argument("--tasks", required=True, help="task names (comma-separated) or a task set")
    p.add_argument("--episodes", type=positive_int, required=True, help="episodes per task")
    p.add_argument("--out", required=True, type=output_dir,
                   help="output dataset directory (must not exist unless --overwrite)")
    p.add_argument("--policy", action="store_true", help="act with the policy prior, no MPPI")
    p.add_argument("--explore", action="store_true",
                   help="act as in training (planner noise / policy samples) instead of eval")
    p.add_argument("--action-noise", type=noise_stds, default=0.0,
                   help="std of extra Gaussian noise added to every action (clipped to [-1,1]);"
                        " a list such as 0.3,1.0 gives episode i the (i mod n)-th std")
    p.add_argument("--seed", type=int, default=0, help="seed of environments and noise")
    p.add_argument("--batch", type=positive_int, default=16, help="episodes run together")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="cut episodes after this many agent steps (default: full length)")
    add_backend_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that is an empty folder or a dataset")


class EpisodeWriter:
    """Appends finished episodes to a :class:`~tdmpc_opt.data.DatasetWriter` in the order of
    ``specs``, whatever order they finish in; each result's trajectory is dropped once written.

    ``on_result`` takes :class:`~tdmpc_opt.evaluation.EpisodeResult` s with trajectories;
    an episode not in ``specs`` or reported twice is an error (nothing is written twice).
    """

    def __init__(self, writer, specs, task_ids: dict[str, int], on_episode=None):
        self.writer, self.specs, self.task_ids = writer, specs, task_ids
        self.on_episode = on_episode
        self.index = {(s.task, s.episode): i for i, s in enumerate(specs)}
        self.waiting: dict = {}
        self.next = 0
        self.transitions = 0

    def on_result(self, res) -> None:
        """Take one finished episode; write it and every waiting one that now follows."""
        import numpy as np

        from tdmpc_opt.errors import TdmpcError

        i = self.index.get((res.task, res.episode))
        if i is None or i < self.next or i in self.waiting or res.trajectory is None:
            raise TdmpcError(f"episode {res.episode} of {res.task} was not expected here "
                             "(unknown, reported twice, or without its steps)")
        self.waiting[i] = res
        while self.next in self.waiting:
            done = self.waiting.pop(self.next)
            tr = done.trajectory
            self.writer.add_episodes(tr.obs[None], tr.action[None], tr.reward[None],
                                     np.array([self.task_ids[done.task]]), where=done.task)
            self.transitions += len(tr.reward) - 1
            done.trajectory = None
            if self.on_episode:
                self.on_episode(done.task, done.episode_return)
            self.next += 1

    def finish(self) -> int:
        """Check that every episode was written; the number of transitions written."""
        from tdmpc_opt.errors import TdmpcError

        if self.next != len(self.specs):
            missing = self.specs[self.next]
            raise TdmpcError(f"{len(self.specs) - self.next} episodes were not collected "
                             f"(first: episode {missing.episode} of {missing.task})")
        return self.transitions


def _task_ids(cfg, tasks) -> dict[str, int]:
    return {t: (cfg.tasks.index(t) if cfg.multitask else 0) for t in tasks}


def collect_episodes(agent, tasks, episodes: int, writer, seed: int = 0, explore: bool = False,
                     action_noise: float | tuple[float, ...] = 0.0, batch: int = 16, make_env=None,
                     on_episode=None, max_steps: int | None = None) -> int:
    """Run ``episodes`` episodes of each task with ``agent`` in this process and append them
    to ``writer`` (task order, then episode order).

    Returns the number of transitions written. The same episodes as
    :func:`collect_on_backend` with the same seed, whatever ``batch``.
    """
    from tdmpc_opt.evaluation import episode_specs, run_episodes

    specs = episode_specs(tasks, episodes, seed)
    out = EpisodeWriter(writer, specs, _task_ids(agent.cfg, tasks), on_episode)
    run_episodes(agent, specs, batch, max_steps, not explore, out.on_result, make_env=make_env,
                 action_noise=action_noise, trajectories=True)
    return out.finish()


def collect_on_backend(checkpoint, planner, cfg, tasks, episodes: int, writer, seed: int = 0,
                       explore: bool = False, action_noise: float | tuple[float, ...] = 0.0,
                       batch: int = 16, max_steps: int | None = None, on_episode=None,
                       **backend) -> int:
    """:func:`collect_episodes` with the agent of ``checkpoint`` (model config ``cfg``)
    planning with ``planner``, on a rollout backend: ``backend`` holds the keyword arguments
    ``backend``, ``workers``, ``ray_address``, ... of :func:`~tdmpc_opt.backends.run_rollouts`.

    Returns the number of transitions written.
    """
    from tdmpc_opt.backends import run_rollouts
    from tdmpc_opt.evaluation import episode_specs

    specs = episode_specs(tasks, episodes, seed)
    out = EpisodeWriter(writer, specs, _task_ids(cfg, tasks), on_episode)
    run_rollouts(checkpoint, planner, specs, batch_size=batch, max_steps=max_steps,
                 on_result=out.on_result, eval_mode=not explore, action_noise=action_noise,
                 trajectories=True, **backend)
    return out.finish()


def run(args) -> int:
    from pathlib import Path

    from tdmpc_opt.backends import cached_agent
    from tdmpc_opt.cli._common import check_backend_options
    from tdmpc_opt.config import PlannerConfig
    from tdmpc_opt.data import DatasetWriter, check_output
    from tdmpc_opt.errors import CheckpointError, TaskError
    from tdmpc_opt.tasks import resolve_tasks

    check_output(args.out, args.overwrite)
    check_backend_options(args.backend, args.ray_address)
    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        ckpt = ckpt / "model.safetensors"
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: no such file")
    planner = PlannerConfig(mpc=not args.policy)
    # the agent the in-process backend plans with (workers load the same file the same way)
    cfg = cached_agent(str(ckpt), planner).cfg
    tasks = resolve_tasks(args.tasks)
    names = cfg.tasks if cfg.multitask else (cfg.tasks or tasks[:1])
    unknown = [t for t in tasks if t not in names]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise TaskError(f"the model was not trained on {', '.join(unknown[:3])}{more} (its "
                        f"tasks: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                        f"`tdmpc-opt info {args.checkpoint}` lists them)")
    returns: dict[str, list[float]] = {}
    with DatasetWriter(args.out, tuple(names), cfg.obs_dim, cfg.action_dim,
                       overwrite=args.overwrite, source=f"collected with {ckpt.name}") as w:
        n = collect_on_backend(str(ckpt), planner, cfg, tasks, args.episodes, w, args.seed,
                               args.explore, args.action_noise, args.batch, args.max_steps,
                               lambda t, r: returns.setdefault(t, []).append(r),
                               backend=args.backend, workers=args.workers,
                               ray_address=args.ray_address)
        ds = w.close()
    for task, rs in returns.items():
        print(f"{task}: {len(rs)} episodes, mean return {sum(rs) / len(rs):.1f}")
    print(f"wrote {ds.path}: {ds.num_episodes} episodes, {n:,} transitions")
    return 0
