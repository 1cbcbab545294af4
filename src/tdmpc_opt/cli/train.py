"""Train a TD-MPC2 world model: offline multi-task from a dataset, or online on one task.

Settings are TD-MPC2's published defaults; change any with key=value overrides (training keys
such as steps, batch_size, lr, eval_freq; model keys such as latent_dim, num_q; planner keys
such as iterations, num_samples). A run directory holds config.json, train/eval CSV metrics,
checkpoints and model.safetensors; --resume continues a killed run where its last checkpoint
left off, with the same result as an uninterrupted run.

Offline training runs on several GPUs or nodes when started by torchrun (one process per GPU,
the batch split evenly among them; see docs/scaling.md).

Examples:
  tdmpc-opt data convert datasets/mt30 --out data/mt30
  tdmpc-opt train --data data/mt30 --tasks mt30 --model-size 1 steps=1000000
  tdmpc-opt train --data data/mt30 --tasks mt30 --model-size 1 bf16=true compile=true  # ~2x on CPU
  tdmpc-opt train --task cartpole-balance --online steps=100000 eval_freq=5000
  tdmpc-opt train --task cartpole-balance --online steps=100000 --run-dir runs/cp --resume
  torchrun --nproc_per_node 4 -m tdmpc_opt.cli train --data data/mt30 --model-size 5 \\
      batch_size=1024
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import warnings

NAME = "train"
HELP = "train a world model offline from a dataset or online in an environment"
INTERRUPTED = ("interrupted; finished updates and episodes are checkpointed in the run directory: "
               "add --resume to the same command to continue from it")
LOSS_WEIGHTS = ("consistency_coef", "reward_coef", "value_coef", "termination_coef",
                "entropy_coef")


def add_arguments(p):
    from tdmpc_opt.cli._common import output_dir

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset directory in tdmpc-opt format (offline)")
    src.add_argument("--task", help="task to train on online (with --online)")
    p.add_argument("--online", action="store_true", help="train online in the environment")
    p.add_argument("--tasks", default=None,
                   help="offline: task set (mt30) or comma-separated names (default: the "
                        "dataset's tasks)")
    p.add_argument("--model-size", type=int, default=None,
                   help="published size in M parameters: 1, 5, 19, 48, 317 (default: "
                        "TD-MPC2's base architecture)")
    p.add_argument("--run-dir", default=None, type=output_dir,
                   help="run directory (default runs/<name>-s<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the run directory's newest valid checkpoint")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="setting overrides, e.g. steps=50000 batch_size=128 latent_dim=64 "
                        "(keep them together, before or after the options)")


def split_overrides(items: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Route key=value items to (TrainConfig, ModelConfig, PlannerConfig) by field name.

    ``horizon`` goes to training (the planner uses the same horizon).
    """
    from tdmpc_opt.config import ModelConfig, PlannerConfig
    from tdmpc_opt.training import TrainConfig

    names = [{f.name for f in dataclasses.fields(c)}
             for c in (TrainConfig, ModelConfig, PlannerConfig)]
    out: tuple[list[str], list[str], list[str]] = ([], [], [])
    for item in items:
        key = item.partition("=")[0].strip()
        idx = next((i for i, n in enumerate(names) if key in n), 0)
        out[idx].append(item)
    return out


def settings(items: list[str]):
    """``(TrainConfig, PlannerConfig, model items)`` from key=value items, the training and
    planner settings checked (the model items need the tasks: :func:`model_config`)."""
    from tdmpc_opt.config import PlannerConfig, apply_overrides, check_seed
    from tdmpc_opt.errors import ConfigError
    from tdmpc_opt.training import TrainConfig

    t_items, m_items, p_items = split_overrides(items)
    cfg = apply_overrides(TrainConfig(), t_items)
    check_seed(cfg.seed)
    negative = [name for name in LOSS_WEIGHTS if getattr(cfg, name) < 0]
    if negative:
        raise ConfigError(f"{', '.join(negative)} must be >= 0")
    planner = apply_overrides(PlannerConfig(horizon=cfg.horizon), p_items)
    return cfg, planner, m_items


def model_config(tasks: tuple[str, ...], size: int | None, items: list[str], source: str):
    """The model for ``tasks`` (a published ``size`` or the defaults) with ``items`` applied;
    ``source`` names where the command takes the tasks from, for refusing ``tasks=`` and the
    sizes derived from them."""
    from tdmpc_opt.config import apply_overrides, check_not_derived, model_config_for

    check_not_derived(items, source)
    return apply_overrides(model_config_for(tuple(tasks), size), items)


@contextlib.contextmanager
def one_line_warnings():
    """Show checkpoints skipped on resume as one line each (``warning: ...``) instead of
    Python's warning format with a source line; other warnings are shown as usual."""
    from tdmpc_opt.runs import CheckpointSkipped

    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, CheckpointSkipped):
            print(f"warning: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


def start_processes(cfg, device_name: str, offline: bool = True):
    """Threads and device of this process; under torchrun also joins the process group.

    Returns ``(device, env)`` with ``env`` None in a plain single process. Refuses, before
    anything is loaded, what cannot run on several processes.
    """
    from tdmpc_opt import distributed
    from tdmpc_opt.agent import resolve_device
    from tdmpc_opt.errors import ConfigError
    from tdmpc_opt.trainer import set_threads

    env = distributed.detect()
    if env is not None:
        if not offline:
            raise ConfigError("torchrun runs offline training (--data) only; online training "
                              "is a single process")
        distributed.local_batch(cfg.batch_size, env.world_size)
    set_threads(cfg.threads or (distributed.cpu_share(env) if env else 0))
    device = resolve_device(device_name)
    return (device if env is None else distributed.init(env, device)), env


def run(args) -> int:
    from tdmpc_opt import distributed
    from tdmpc_opt.errors import ConfigError

    cfg, planner, m_items = settings(args.overrides)
    if args.online != bool(args.task):
        raise ConfigError("online training needs --task NAME --online; offline needs --data DIR")
    device, env = start_processes(cfg, args.device, offline=not args.online)
    try:
        with one_line_warnings():
            return _run(args, cfg, planner, m_items, device)
    finally:
        if env is not None:
            distributed.destroy()


def _run(args, cfg, planner, m_items, device) -> int:
    from tdmpc_opt import distributed
    from tdmpc_opt.runs import RunDir
    from tdmpc_opt.trainer import build_learner, run_config

    main = distributed.is_main()
    if args.online:
        from tdmpc_opt.tasks import get_task

        tasks = (get_task(args.task).name,)
        name = args.task
    else:
        tasks, dataset = _offline_tasks(args)
        name = args.data.rstrip("/").split("/")[-1]
    model_cfg = model_config(tasks, args.model_size, m_items,
                             "--task" if args.online else "--tasks (or the dataset)")
    from tdmpc_opt.tasks import check_environments

    if args.online:
        check_environments(tasks, "online training runs one")
    elif cfg.eval_freq:
        check_environments(tuple(t for t in tasks if t in dataset.tasks),
                           "evaluation runs them: set eval_freq=0")
    run_dir = RunDir(args.run_dir or f"runs/{name}-s{cfg.seed}", keep=cfg.keep_checkpoints)
    _check_fresh(run_dir, args.resume)
    learner = build_learner(model_cfg, cfg, device)
    config = run_config(learner, planner=dataclasses.asdict(planner), model_size=args.model_size,
                        mode="online" if args.online else "offline",
                        data=args.data, task=args.task, **processes_config())
    if main:
        print(f"run directory: {run_dir.path}  ({learner.model.learnable_parameters():,} "
              f"parameters, {learner.device}{processes_note()})")
    if args.online:
        from tdmpc_opt.trainer import OnlineTrainer

        trainer = OnlineTrainer(args.task, learner, run_dir, planner)
        last = trainer.train(resume=args.resume, progress=not args.quiet, config=config)
    else:
        last = _train_offline(args, learner, dataset, run_dir, planner, config)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.endswith("_loss"))
    if main:
        print(f"done: {run_dir.path / 'model.safetensors'}  {shown}")
    return 0


def processes_config() -> dict:
    """``{"distributed": {world_size, backend}}`` for config.json under torchrun, else {}."""
    from tdmpc_opt import distributed

    return {"distributed": distributed.describe()} if distributed.is_active() else {}


def processes_note() -> str:
    """``", 4 processes"`` under torchrun, else empty (for the first printed line)."""
    from tdmpc_opt import distributed

    return f", {distributed.world_size()} processes" if distributed.is_active() else ""


def _offline_tasks(args):
    from tdmpc_opt.data import Dataset
    from tdmpc_opt.tasks import resolve_tasks

    dataset = Dataset(args.data)
    tasks = resolve_tasks(args.tasks) if args.tasks is not None else dataset.tasks
    return tasks, dataset


def _check_fresh(run_dir, resume: bool) -> None:
    from tdmpc_opt.runs import RunError

    if not resume and any(run_dir.ckpt_dir.glob("step-*.pt")):
        raise RunError(f"{run_dir.path} already has checkpoints: pass --resume to continue "
                       "that run, or choose another --run-dir")


def _train_offline(args, learner, dataset, run_dir, planner, config):
    import numpy as np

    from tdmpc_opt import distributed
    from tdmpc_opt.data import check_row_sizes
    from tdmpc_opt.errors import DataError
    from tdmpc_opt.replay import SequenceSampler
    from tdmpc_opt.trainer import evaluate_model, train_offline

    cfg, mc = learner.cfg, learner.model.cfg
    missing = [t for t in dataset.tasks if t not in mc.tasks]
    counts = dataset.meta.get("episodes_per_task", [])
    if any(counts[dataset.tasks.index(t)] for t in missing if counts):
        raise DataError(f"the dataset has episodes of tasks outside --tasks: {missing[:5]}")
    check_row_sizes(dataset, mc.obs_dim, mc.action_dim)
    task_map = None
    if mc.multitask:
        task_map = np.array([mc.tasks.index(t) if t in mc.tasks else 0 for t in dataset.tasks])
    sampler = SequenceSampler(dataset, distributed.local_batch(cfg.batch_size), cfg.horizon,
                              seed=distributed.rank_seed(cfg.seed), device=learner.device,
                              task_map=task_map)
    present = tuple(t for t in mc.tasks if t in dataset.tasks)

    def evaluate(model):
        return evaluate_model(model, present, cfg.eval_episodes, cfg.seed, planner)

    return train_offline(learner, sampler, run_dir, evaluate=evaluate, resume=args.resume,
                         progress=not args.quiet, config=config)
