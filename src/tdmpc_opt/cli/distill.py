"""Distill a frozen teacher into a smaller student (TD-MPC-Opt).

The student trains offline with the full TD-MPC2 objective plus distillation terms (see
tdmpc_opt.distillation): --coef is the paper's first-step reward MSE (0.45 by default; 0
trains the same student without a teacher), the other --*-coef options add our terms.
With --cache-teacher the teacher's targets for every dataset row are computed once into a
memory-mapped cache (reused when it matches teacher and dataset) and training never runs the
teacher. Without a dataset, --collect N first rolls the teacher out for N episodes per task.
Under torchrun it trains on several GPUs or nodes like `train --data` (see docs/scaling.md).

Examples:
  tdmpc-opt distill --teacher ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --data data/mt30 --student-size 1 --coef 0.45 steps=100000
  tdmpc-opt distill --teacher teacher.pt --collect 20 --tasks cartpole-balance,walker-stand \\
      --cache-teacher enc_dim=64 mlp_dim=64 latent_dim=32 steps=5000
  tdmpc-opt distill --teacher teacher.pt --data data/d --coef 0.45 --value-coef 0.1 \\
      --policy-coef 0.1 --run-dir runs/d1 --resume
"""

from __future__ import annotations

from pathlib import Path

from tdmpc_opt.cli.train import INTERRUPTED as TRAIN_INTERRUPTED

NAME = "distill"
HELP = "train a small student from a frozen teacher (reward distillation and more)"
INTERRUPTED = TRAIN_INTERRUPTED  # the same run directory and resume


def add_arguments(p):
    from tdmpc_opt.cli._common import nonnegative_float, output_dir, positive_int

    p.add_argument("--teacher", required=True, help="teacher checkpoint (.pt or .safetensors)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset directory in tdmpc-opt format")
    src.add_argument("--collect", type=positive_int, metavar="N",
                     help="first collect N teacher episodes per task (policy prior + noise)")
    p.add_argument("--tasks", default=None, help="tasks to collect (with --collect)")
    p.add_argument("--student-size", type=int, default=None,
                   help="published size 1, 5, 19, 48, 317 (or give dims as key=value)")
    p.add_argument("--coef", type=nonnegative_float, default=0.45,
                   help="the paper's reward-distillation coefficient (0: no distillation)")
    p.add_argument("--reward-horizon-coef", type=nonnegative_float, default=0.0)
    p.add_argument("--value-coef", type=nonnegative_float, default=0.0)
    p.add_argument("--policy-coef", type=nonnegative_float, default=0.0)
    p.add_argument("--latent-coef", type=nonnegative_float, default=0.0)
    p.add_argument("--plan-coef", type=nonnegative_float, default=0.0,
                   help="imagined-rollout distillation on planner-like actions (runs the "
                        "teacher live; see docs/distillation.md)")
    p.add_argument("--plan-samples", type=positive_int, default=4,
                   help="action sequences per start state for --plan-coef")
    p.add_argument("--init", default=None, metavar="CHECKPOINT",
                   help="start the student from this model's weights (its architecture; "
                        "fine-tuning) instead of a fresh initialisation")
    # const is not a string: argparse would check it as a folder name
    p.add_argument("--cache-teacher", nargs="?", const=True, default=None, metavar="DIR",
                   type=output_dir,
                   help="use (building if needed) a teacher-target cache (default: "
                        "RUN_DIR/teacher-cache)")
    p.add_argument("--run-dir", default=None, type=output_dir,
                   help="run directory (default runs/distill-s<seed>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="training/student/planner settings, e.g. steps=20000 latent_dim=64")


def _distill_config(args):
    from tdmpc_opt.distillation import DistillConfig

    return DistillConfig(reward_coef=args.coef, reward_horizon_coef=args.reward_horizon_coef,
                         value_coef=args.value_coef, policy_coef=args.policy_coef,
                         latent_coef=args.latent_coef, plan_coef=args.plan_coef,
                         plan_samples=args.plan_samples).validate()


def _collect(args, teacher_path: Path, run_dir) -> Path:
    """Roll the teacher out (policy prior with exploration) into RUN_DIR/data, once; an
    interrupted collection keeps its finished episodes and continues (as ``collect``)."""
    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.cli.collect import EpisodeStore, _task_ids
    from tdmpc_opt.errors import ConfigError
    from tdmpc_opt.evaluation import episode_specs, run_episodes
    from tdmpc_opt.tasks import resolve_tasks

    out = run_dir.path / "data"
    if (out / "meta.json").is_file():
        return out
    if not args.tasks:
        raise ConfigError("--collect needs --tasks (which of the teacher's tasks to roll out)")
    agent = load_agent(teacher_path).with_planner(mpc=False)
    tasks = resolve_tasks(args.tasks)
    from tdmpc_opt.cli.eval import check_tasks

    check_tasks(agent, tasks)
    names = agent.cfg.tasks if agent.cfg.multitask else tasks[:1]
    store = EpisodeStore.for_output(out, teacher_path, seed=0, mpc=False, explore=True)
    specs = episode_specs(tasks, args.collect, 0)
    run_episodes(agent, store.missing(specs), 16, None, False, store.add, trajectories=True)
    store.write_dataset(out, specs, tuple(names), agent.cfg, _task_ids(agent.cfg, tasks),
                        overwrite=True, source=f"collected from {teacher_path.name}")
    return out


def _learner_from(args, cfg, device):
    """A learner whose student starts from ``--init``'s weights (and takes its architecture)."""
    from tdmpc_opt.checkpoints import load_world_model
    from tdmpc_opt.trainer import build_learner

    init, _ = load_world_model(args.init, device)
    learner = build_learner(init.cfg, cfg, device)
    learner.model.load_state_dict(init.state_dict())
    return learner


def run(args) -> int:
    from tdmpc_opt import distributed
    from tdmpc_opt.cli.train import one_line_warnings, settings, start_processes
    from tdmpc_opt.errors import ConfigError

    dcfg = _distill_config(args)
    cfg, planner, m_items = settings(args.overrides)
    if args.init and (args.student_size is not None or m_items):
        raise ConfigError("--init takes the student's architecture from its checkpoint; drop "
                          "--student-size and model settings")
    device, env = start_processes(cfg, args.device)
    try:
        with one_line_warnings():
            return _run(args, dcfg, cfg, planner, m_items, device)
    finally:
        if env is not None:
            distributed.destroy()


def _run(args, dcfg, cfg, planner, m_items, device) -> int:
    import numpy as np

    from tdmpc_opt import distributed
    from tdmpc_opt.checkpoints import load_world_model
    from tdmpc_opt.cli.train import (
        _check_fresh,
        model_config,
        processes_config,
        processes_note,
    )
    from tdmpc_opt.data import Dataset, check_row_sizes
    from tdmpc_opt.distill_trainer import distill_offline
    from tdmpc_opt.distillation import check_compatible
    from tdmpc_opt.runs import RunDir
    from tdmpc_opt.tasks import check_environments
    from tdmpc_opt.trainer import build_learner, run_config

    main = distributed.is_main()
    teacher, info = load_world_model(args.teacher, device)
    teacher.requires_grad_(False)
    student_cfg = None if args.init else model_config(teacher.cfg.tasks, args.student_size,
                                                      m_items, "the teacher")
    run_dir = RunDir(args.run_dir or f"runs/distill-s{cfg.seed}", keep=cfg.keep_checkpoints)
    _check_fresh(run_dir, args.resume)
    data = Path(args.data) if args.data else None
    if data is None:  # rank 0 collects; the others then find its data (or collect the same)
        data = _collect(args, Path(args.teacher), run_dir) if main else None
        distributed.wait_for_main()
        if data is None:
            data = _collect(args, Path(args.teacher), run_dir)
    dataset = Dataset(data)
    if student_cfg is None:
        learner = _learner_from(args, cfg, device)
        student_cfg = learner.model.cfg
    else:
        learner = build_learner(student_cfg, cfg, device)
    check_compatible(teacher, learner.model)
    check_row_sizes(dataset, student_cfg.obs_dim, student_cfg.action_dim)
    if cfg.eval_freq:
        check_environments(tuple(t for t in student_cfg.tasks if t in dataset.tasks),
                           "evaluation runs them: set eval_freq=0")
    task_map = None
    if student_cfg.multitask:
        from tdmpc_opt.errors import DataError

        outside = [t for t in dataset.tasks if t not in student_cfg.tasks]
        if outside:
            raise DataError(f"the dataset has tasks outside the teacher's task set: {outside[:5]}")
        task_map = np.array([student_cfg.tasks.index(t) for t in dataset.tasks])
    cache_dir = None
    if args.cache_teacher is not None:
        cache_dir = run_dir.path / "teacher-cache" if args.cache_teacher is True else \
            Path(args.cache_teacher)
    config = run_config(learner, planner=planner.__dict__, distill=dcfg.__dict__,
                        teacher=str(args.teacher), teacher_sha256=info["sha256"],
                        student_size=args.student_size, data=str(data), init=args.init,
                        cache=str(cache_dir) if cache_dir else None, **processes_config())
    if main:
        print(f"run directory: {run_dir.path}  (student {learner.model.learnable_parameters():,}"
              f" parameters, teacher {sum(p.numel() for p in teacher.parameters()):,} with "
              f"targets{processes_note()})")
    last = distill_offline(learner, teacher, info["sha256"], dataset, task_map, dcfg, run_dir,
                           planner=planner, cache_dir=cache_dir, resume=args.resume,
                           progress=not args.quiet, config=config)
    shown = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k.startswith("distill"))
    if main:
        print(f"done: {run_dir.path / 'model.safetensors'}  {shown}")
    return 0
