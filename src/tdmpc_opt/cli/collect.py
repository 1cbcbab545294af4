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

Interrupted (Ctrl-C, SIGTERM, a crash), nothing is lost: every finished episode is kept in a
hidden folder beside the output (`.NAME.collecting`), and the same command run again collects
only the missing ones (more --episodes adds episodes; other settings are refused). The dataset
appears only when every episode is there, and equals an uninterrupted collection's.
"""

from __future__ import annotations

NAME = "collect"
HELP = "roll an agent out and write its episodes in the dataset format"
INTERRUPTED = ("interrupted; the finished episodes are kept (and a dataset that --overwrite was "
               "replacing as it was): run the same command again to collect the rest")


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


class EpisodeStore:
    """Finished episodes of one collection, one ``.npz`` per episode (written atomically), in a
    folder that outlives an interrupted run, with the settings that made them.

    Args:
        folder: the store's folder (created if missing).
        identity: everything that decides an episode's steps besides its task, number and
            seed (checkpoint hash, planner, noise, --max-steps, --seed): a folder made with
            other settings is refused, so episodes of two collections never mix.
    Raises:
        DataError: the folder holds a collection with other settings.
    """

    IDENTITY = "collection.json"

    def __init__(self, folder, identity: dict):
        import json
        from pathlib import Path

        from tdmpc_opt.errors import DataError

        self.folder = Path(folder)
        meta = self.folder / self.IDENTITY
        if meta.is_file():
            try:
                stored = json.loads(meta.read_text())
            except ValueError:
                stored = None
            if stored != identity:
                diff = sorted(k for k in identity if not isinstance(stored, dict)
                              or stored.get(k) != identity[k])
                raise DataError(f"{self.folder} holds an interrupted collection made with other "
                                f"settings ({', '.join(diff) or 'unreadable'}): run that command "
                                "again to finish it, or delete the folder to start over")
        else:
            from tdmpc_opt.checkpoints import write_json

            write_json(meta, identity)
        for tmp in self.folder.glob(".*.tmp*"):  # left by a killed write
            tmp.unlink(missing_ok=True)

    @classmethod
    def for_output(cls, out, checkpoint, *, seed: int, mpc: bool, explore: bool,
                   action_noise: float | tuple[float, ...] = 0.0,
                   max_steps: int | None = None, layers: str | None = None) -> EpisodeStore:
        """The store of a collection into dataset ``out`` (``.NAME.collecting`` beside it) by
        the agent of ``checkpoint`` with these settings; ``layers``: how an MPPI collection's
        planner computes its layers (:attr:`~tdmpc_opt.agent.Agent.layers`), part of the
        identity when given."""
        from tdmpc_opt.checkpoints import file_sha256

        noise = list(action_noise) if isinstance(action_noise, tuple) else action_noise
        identity = {"checkpoint_sha256": file_sha256(checkpoint), "seed": seed, "mpc": mpc,
                    "explore": explore, "action_noise": noise, "max_steps": max_steps}
        return cls(store_folder(out), identity if layers is None else
                   dict(identity, layers=layers))

    def missing(self, specs) -> list:
        """The episodes of ``specs`` not kept here yet."""
        return [s for s in specs if not self._path(s.task, s.episode).is_file()]

    def _path(self, task: str, episode: int):
        return self.folder / f"{task}-{episode:06d}.npz"

    def add(self, res) -> None:
        """Keep one finished episode (an :class:`~tdmpc_opt.evaluation.EpisodeResult` with its
        trajectory); the result then drops its trajectory (no episode waits in memory)."""
        import numpy as np

        from tdmpc_opt.checkpoints import atomic_write

        tr = res.trajectory

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, obs=tr.obs, action=tr.action, reward=tr.reward,
                         seed=res.seed, episode_return=res.episode_return)

        atomic_write(self._path(res.task, res.episode), write)
        res.trajectory = None

    def load(self, spec):
        """The stored episode of ``spec`` as an EpisodeResult with its trajectory.

        Raises:
            DataError: the file is unreadable or belongs to another seed.
        """
        import numpy as np

        from tdmpc_opt.errors import DataError
        from tdmpc_opt.evaluation import EpisodeResult, Trajectory

        path = self._path(spec.task, spec.episode)
        try:
            with np.load(path, allow_pickle=False) as f:
                tr = Trajectory(f["obs"], f["action"], f["reward"])
                seed, ret = int(f["seed"]), float(f["episode_return"])
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"{path}: unreadable ({e}); delete it to collect that episode "
                            "again") from None
        if seed != spec.seed:
            raise DataError(f"{path}: made with seed {seed}, not {spec.seed}; delete it to "
                            "collect that episode again")
        return EpisodeResult(spec.task, spec.episode, seed, ret, len(tr.reward) - 1,
                             trajectory=tr)

    def write_dataset(self, out, specs, names: tuple[str, ...], cfg, task_ids: dict[str, int],
                      overwrite: bool = False, source: str = "", on_episode=None):
        """Write the kept episodes of ``specs`` (all must be here) as dataset ``out`` in spec
        order, then remove this folder. Returns (the dataset, transitions written)."""
        import shutil

        from tdmpc_opt.data import DatasetWriter

        with DatasetWriter(out, names, cfg.obs_dim, cfg.action_dim, overwrite=overwrite,
                           source=source) as w:
            writer = EpisodeWriter(w, specs, task_ids, on_episode)
            for spec in specs:
                writer.on_result(self.load(spec))
            n = writer.finish()
            ds = w.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        return ds, n


def store_folder(out) -> str:
    """Where ``tdmpc-opt collect --out OUT`` keeps finished episodes until the dataset is
    written: ``.NAME.collecting`` beside it."""
    import os
    from pathlib import Path

    full = Path(os.path.abspath(out))
    return str(full.with_name(f".{full.name}.collecting"))


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

    Returns the number of transitions written. The same episodes as ``tdmpc-opt collect``
    with the same seed, whatever ``batch`` or backend.
    """
    from tdmpc_opt.evaluation import episode_specs, run_episodes

    specs = episode_specs(tasks, episodes, seed)
    out = EpisodeWriter(writer, specs, _task_ids(agent.cfg, tasks), on_episode)
    run_episodes(agent, specs, batch, max_steps, not explore, out.on_result, make_env=make_env,
                 action_noise=action_noise, trajectories=True)
    return out.finish()


def run(args) -> int:
    from pathlib import Path

    from tdmpc_opt.backends import cached_agent
    from tdmpc_opt.cli._common import check_backend_options
    from tdmpc_opt.config import PlannerConfig
    from tdmpc_opt.data import check_output
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
    agent = cached_agent(str(ckpt), planner)
    cfg = agent.cfg
    # MPPI plays episodes as the planner computes its layers here; workers must do the same
    layers = agent.layers if planner.mpc else None
    tasks = resolve_tasks(args.tasks)
    names = cfg.tasks if cfg.multitask else (cfg.tasks or tasks[:1])
    unknown = [t for t in tasks if t not in names]
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise TaskError(f"the model was not trained on {', '.join(unknown[:3])}{more} (its "
                        f"tasks: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}; "
                        f"`tdmpc-opt info {args.checkpoint}` lists them)")
    from tdmpc_opt.backends import run_rollouts
    from tdmpc_opt.evaluation import episode_specs

    store = EpisodeStore.for_output(args.out, ckpt, seed=args.seed, mpc=planner.mpc,
                                    explore=args.explore, action_noise=args.action_noise,
                                    max_steps=args.max_steps, layers=layers)
    specs = episode_specs(tasks, args.episodes, args.seed)
    todo = store.missing(specs)
    if len(todo) < len(specs):
        print(f"continuing: {len(specs) - len(todo)} of {len(specs)} episodes were collected "
              f"before (kept in {store.folder})")
    if todo:
        run_rollouts(str(ckpt), planner, todo, batch_size=args.batch, max_steps=args.max_steps,
                     on_result=store.add, eval_mode=not args.explore,
                     action_noise=args.action_noise, trajectories=True, backend=args.backend,
                     workers=args.workers, ray_address=args.ray_address, layers=layers)
    returns: dict[str, list[float]] = {}
    ds, n = store.write_dataset(args.out, specs, tuple(names), cfg, _task_ids(cfg, tasks),
                                overwrite=args.overwrite, source=f"collected with {ckpt.name}",
                                on_episode=lambda t, r: returns.setdefault(t, []).append(r))
    for task, rs in returns.items():
        print(f"{task}: {len(rs)} episodes, mean return {sum(rs) / len(rs):.1f}")
    print(f"wrote {ds.path}: {ds.num_episodes} episodes, {n:,} transitions")
    return 0
