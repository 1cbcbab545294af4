"""Roll an agent out in the environments and write the episodes as a tdmpc-opt dataset.

Episodes of a task run together (one batched planner call per step); each has its own seed
for its environment and its planner noise. Observations are stored padded to the model's
size and actions as the agent produced them (padded, masked), as in TD-MPC2's datasets.

Examples:
  tdmpc-opt collect --checkpoint runs/cp-s1/model.safetensors --tasks cartpole-balance \\
      --episodes 20 --out data/cartpole --explore
  tdmpc-opt collect --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --tasks walker-walk,cheetah-run --episodes 5 --out data/two --policy --action-noise 0.1
"""

from __future__ import annotations

NAME = "collect"
HELP = "roll an agent out and write its episodes in the dataset format"


def add_arguments(p):
    from tdmpc_opt.cli._common import nonnegative_float, positive_int

    p.add_argument("--checkpoint", required=True, help="model: .pt, .safetensors or run dir")
    p.add_argument("--tasks", required=True, help="task names (comma-separated) or a task set")
    p.add_argument("--episodes", type=positive_int, required=True, help="episodes per task")
    p.add_argument("--out", required=True, help="output dataset directory (must not exist)")
    p.add_argument("--policy", action="store_true", help="act with the policy prior, no MPPI")
    p.add_argument("--explore", action="store_true",
                   help="act as in training (planner noise / policy samples) instead of eval")
    p.add_argument("--action-noise", type=nonnegative_float, default=0.0,
                   help="std of extra Gaussian noise added to every action (clipped to [-1,1])")
    p.add_argument("--seed", type=int, default=0, help="seed of environments and noise")
    p.add_argument("--batch", type=positive_int, default=16, help="episodes run together")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def collect_episodes(agent, tasks, episodes: int, writer, seed: int = 0, explore: bool = False,
                     action_noise: float = 0.0, batch: int = 16, make_env=None,
                     on_episode=None) -> int:
    """Run ``episodes`` episodes of each task with ``agent`` and append them to ``writer``.

    Returns the number of transitions written.
    """
    import numpy as np
    import torch

    from tdmpc_opt.envs import pad_obs
    from tdmpc_opt.evaluation import episode_seed

    if make_env is None:
        from tdmpc_opt.envs import make_env
    cfg, written = agent.cfg, 0
    task_ids = {t: (cfg.tasks.index(t) if cfg.multitask else 0) for t in tasks}
    for task in tasks:
        for first in range(0, episodes, batch):
            seeds = [episode_seed(seed, task, i) for i in range(first, min(episodes,
                                                                             first + batch))]
            envs = [make_env(task, s) for s in seeds]
            obs = [pad_obs(e.reset(seed=s)[0], cfg.obs_dim) for e, s in zip(envs, seeds,
                                                                                strict=True)]
            gens = [torch.Generator().manual_seed(s) for s in seeds]
            noise_rng = np.random.default_rng(seeds[0])
            hist = [([o], [np.full(cfg.action_dim, np.nan, np.float32)], [np.nan]) for o in obs]
            live, t = [True] * len(envs), 0
            agent.reset()
            while any(live):
                act = agent.act(np.stack(obs), task=task if cfg.multitask else None,
                                t0=t == 0, eval_mode=not explore, generators=gens).numpy()
                if action_noise:
                    act = np.clip(act + action_noise * noise_rng.standard_normal(act.shape),
                                  -1, 1).astype(np.float32)
                for i, env in enumerate(envs):
                    if not live[i]:
                        continue
                    o, r, term, trunc, _ = env.step(act[i, :env.action_space.shape[0]])
                    obs[i] = pad_obs(o, cfg.obs_dim)
                    hist[i][0].append(obs[i]), hist[i][1].append(act[i]), hist[i][2].append(r)
                    live[i] = not (term or trunc)
                t += 1
            for (o, a, r), env in zip(hist, envs, strict=True):
                writer.add_episodes(np.stack(o)[None], np.stack(a)[None],
                                    np.array(r, np.float32)[None], np.array([task_ids[task]]),
                                    where=task)
                written += len(r) - 1
                env.close()
                if on_episode:
                    on_episode(task, float(np.nansum(r)))
    return written


def run(args) -> int:
    from pathlib import Path

    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.data import DatasetWriter
    from tdmpc_opt.errors import TaskError
    from tdmpc_opt.tasks import resolve_tasks

    ckpt = Path(args.checkpoint)
    if ckpt.is_dir():
        ckpt = ckpt / "model.safetensors"
    agent = load_agent(ckpt)
    if args.policy:
        agent = agent.with_planner(mpc=False)
    tasks = resolve_tasks(args.tasks)
    cfg = agent.cfg
    names = cfg.tasks if cfg.multitask else (cfg.tasks or tasks[:1])
    unknown = [t for t in tasks if t not in names]
    if unknown:
        raise TaskError(f"the model was not trained on {', '.join(unknown)} "
                        f"(its tasks: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''})")
    returns: dict[str, list[float]] = {}
    with DatasetWriter(args.out, tuple(names), cfg.obs_dim, cfg.action_dim,
                       overwrite=args.overwrite, source=f"collected with {ckpt.name}") as w:
        n = collect_episodes(agent, tasks, args.episodes, w, args.seed, args.explore,
                             args.action_noise, args.batch,
                             on_episode=lambda t, r: returns.setdefault(t, []).append(r))
        ds = w.close()
    for task, rs in returns.items():
        print(f"{task}: {len(rs)} episodes, mean return {sum(rs) / len(rs):.1f}")
    print(f"wrote {ds.path}: {ds.num_episodes} episodes, {n:,} transitions")
    return 0
