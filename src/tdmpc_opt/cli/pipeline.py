"""Run the whole idea end to end: teacher -> data -> students with and without distillation ->
FP16 and INT8 distilled student -> evaluation of all -> report.md with a table and figures.

The default needs no download and no GPU: it starts from the project's own 4-task teacher
(shipped with the package, see docs/teacher.md), runs on the three tasks it solves and takes
about 13 minutes on a 2-core CPU.
Every stage runs the same command a user would (collect, distill, quantize, eval) and is
skipped when its output exists, so a stopped pipeline continues where it stopped when the
same command is run again.

Settings (see tdmpc_opt.pipeline.PipelineConfig) come from the defaults, then --config FILE
(JSON or TOML), then key=value overrides.

Examples:
  tdmpc-opt pipeline                                    # the default run, into runs/pipeline
  tdmpc-opt pipeline --run-dir runs/p2 steps=8000 eval_episodes=5
  tdmpc-opt pipeline --config big.toml --run-dir runs/big   # e.g. teacher=... data=...
"""

from __future__ import annotations

NAME = "pipeline"
HELP = "distill, quantize, evaluate and report, end to end (the main job)"


def add_arguments(p):
    from tdmpc_opt.cli._common import output_dir

    p.add_argument("--config", default=None, help="settings file (.json or .toml)")
    p.add_argument("--run-dir", default="runs/pipeline", type=output_dir,
                   help="run directory (default runs/pipeline); an existing one with the "
                   "same settings is continued")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings, e.g. steps=8000 eval_episodes=5 tasks=cartpole-balance")


def run(args) -> int:
    from tdmpc_opt.pipeline import Pipeline, load_config

    cfg = load_config(args.config, args.overrides)
    report = Pipeline(cfg, args.run_dir, progress=not args.quiet).run()
    print(f"report: {report}")
    return 0
