"""The main job: teacher -> data -> students -> quantized student -> evaluation -> report.

:func:`run_pipeline` runs these stages in order, each one through the same command a user would
type (``collect``, ``distill``, ``quantize``, ``eval``), inside one run directory::

    RUN/pipeline.json             the configuration (a rerun must match it)
    RUN/data/                     the students' dataset (collected from the teacher unless given)
    RUN/student/, RUN/distilled/  training runs: without and with distillation (same data,
                                  same updates, same seed); resumable checkpoints inside
    RUN/models/*.safetensors      every model of the report: teacher, student, distilled,
                                  distilled-fp16, distilled-int8
    RUN/eval/<model>.json         evaluation results (same tasks, episodes and seeds for all)
    RUN/latency.json              planner latency per model (batch 1)
    RUN/report.md, RUN/results.json, RUN/returns.png, RUN/score-vs-size.png
    RUN/stages/<stage>.json       written when a stage has finished (its wall time inside)

A stage whose marker exists is skipped, and the stages that train or evaluate continue from
their own checkpoints and per-episode logs, so a stopped pipeline started again with the same
command finishes the run without redoing finished work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from tdmpc_opt.config import MAX_THREADS
from tdmpc_opt.errors import ConfigError, TdmpcError

#: The project's own teacher, shipped with the package (see docs/teacher.md).
BUILTIN_TEACHER = Path(__file__).parent / "assets" / "teacher-mt4.safetensors"

#: Report order and file names of the models the pipeline makes.
MODELS = ("teacher", "student", "distilled", "distilled-fp16", "distilled-int8")


class PipelineError(TdmpcError):
    """A stage failed or the run directory belongs to another configuration."""


@dataclass(frozen=True)
class PipelineConfig:
    """Settings of the main job; the defaults run on a 2-core CPU in under 15 minutes."""

    teacher: str = "builtin"
    """Teacher checkpoint; ``builtin`` is the project's own 4-task teacher (docs/teacher.md)."""
    tasks: str = "cartpole-balance,finger-turn-easy,pendulum-spin"
    """Tasks to collect, train and evaluate on (comma-separated; all in the teacher's set).
    The builtin teacher's tasks that it solves with MPPI (docs/teacher.md)."""
    data: str = ""
    """Dataset directory for the students; empty: collect one from the teacher."""
    collect_episodes: int = 8
    """Teacher episodes per task collected into the dataset (policy prior plus noise)."""
    collect_noise: float = 0.3
    """Std of the Gaussian noise added to the teacher's actions while collecting."""
    student_enc_dim: int = 96
    """Student encoder width (the teacher is TD-MPC2's 1M size: 256)."""
    student_mlp_dim: int = 96
    """Student hidden width of dynamics, reward, policy and Q heads (teacher: 384)."""
    student_latent_dim: int = 64
    """Student latent size (teacher: 128)."""
    student_task_dim: int = 16
    """Student task-embedding size (teacher: 96)."""
    student_num_q: int = 2
    """Student Q-ensemble size (teacher: 2, as in TD-MPC2's 1M size)."""
    steps: int = 4000
    """Gradient updates of each student."""
    batch_size: int = 256
    """Subsequences per update."""
    coef: float = 0.45
    """The paper's reward-distillation coefficient for the distilled student."""
    plan_coef: float = 0.0
    """Our imagined-rollout ``plan`` term added to the distilled student (0: the paper's method
    alone; docs/distillation.md). It runs the teacher live: about 3x slower training."""
    seed: int = 1
    """Seed of collection, student initialisation and sampling (both students share it)."""
    eval_episodes: int = 2
    """Evaluation episodes per task (every model sees the same episode seeds)."""
    eval_seed: int = 1
    """Seed from which every evaluation episode's seed derives."""
    max_steps: int = 0
    """Cut evaluation episodes after this many agent steps (0: the full 500)."""
    num_samples: int = 512
    """MPPI samples per planning iteration in evaluation (TD-MPC2's default)."""
    iterations: int = 4
    """MPPI iterations per agent step in evaluation (TD-MPC2 uses 6; 4 keeps the default run
    under 15 minutes and scored the builtin teacher the same: 83.7 vs 82.4 on the same
    episodes, docs/teacher.md)."""
    latency_seconds: float = 3.0
    """Time spent measuring each model's planner latency."""
    checkpoint_every: int = 1000
    """Students save a resumable checkpoint every this many updates."""
    threads: int = 0
    """torch threads (0: one per core)."""
    backend: str = "local"
    """Where collection and evaluation episodes run: ``local`` or ``ray`` (docs/scaling.md)."""
    workers: int = 1
    """Local worker processes for rollouts, or Ray CPUs to use (1: in this process)."""
    ray_address: str = ""
    """Ray cluster to join (``auto`` or ``HOST:PORT``); empty: start one here."""

    def validate(self) -> PipelineConfig:
        """Check every setting, alone and with the others, as the stages' commands will (the
        tasks, the students' architecture, the evaluation planner); returns ``self``.

        The teacher's task set needs its file: :meth:`Pipeline.check` looks at it.
        """
        from tdmpc_opt.config import PlannerConfig, check_seed, model_config_for
        from tdmpc_opt.tasks import check_environments, resolve_tasks

        positive = ("collect_episodes", "student_enc_dim", "student_mlp_dim",
                    "student_latent_dim", "student_task_dim", "student_num_q", "steps",
                    "batch_size", "eval_episodes", "num_samples", "iterations",
                    "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive")
        if self.backend not in ("local", "ray"):
            raise ConfigError(f"backend must be local or ray, not {self.backend!r}")
        if self.max_steps < 0 or self.threads < 0 or self.latency_seconds < 0 \
                or self.workers < 1:
            raise ConfigError("max_steps, threads and latency_seconds must be >= 0, workers >= 1")
        if self.threads > MAX_THREADS:
            raise ConfigError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        if self.coef <= 0 or self.collect_noise < 0 or self.plan_coef < 0:
            raise ConfigError("coef must be > 0, collect_noise and plan_coef >= 0")
        check_seed(self.seed)
        check_seed(self.eval_seed, "eval_seed")
        if not [t for t in self.tasks.split(",") if t.strip()]:
            raise ConfigError("tasks is empty")
        tasks = resolve_tasks(self.tasks)
        check_environments(tasks, "the pipeline collects data in them; choose DMControl tasks")
        try:
            model_config_for(tasks, None, enc_dim=self.student_enc_dim,
                             mlp_dim=self.student_mlp_dim, latent_dim=self.student_latent_dim,
                             task_dim=self.student_task_dim, num_q=self.student_num_q)
        except ConfigError as e:
            raise ConfigError(f"student architecture: {e}") from None
        elites = PlannerConfig.num_elites
        if self.num_samples < elites:
            raise ConfigError(f"num_samples must be at least {elites} (the evaluation "
                              f"planner's num_elites), got {self.num_samples}")
        PlannerConfig(num_samples=self.num_samples, iterations=self.iterations).validate()
        return self

    def teacher_path(self) -> Path:
        """The teacher file this configuration names."""
        return BUILTIN_TEACHER if self.teacher == "builtin" else Path(self.teacher)


def load_config(path: str | Path | None, overrides: list[str]) -> PipelineConfig:
    """Defaults, then a JSON (``.json``) or TOML (``.toml``) file's settings, then
    ``key=value`` overrides."""
    from tdmpc_opt.config import apply_overrides, config_from_dict

    cfg = PipelineConfig()
    if path:
        path = Path(path)
        if path.suffix not in (".json", ".toml"):
            raise ConfigError(f"{path}: settings files are .json or .toml, not "
                              f"{path.suffix or 'without a suffix'}")
        try:
            text = path.read_bytes().decode()
        except OSError as e:
            raise ConfigError(f"cannot read config file {path} ({e.strerror})") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not UTF-8 text") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            else:
                data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid {path.suffix[1:]}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a table of settings")
        cfg = config_from_dict(PipelineConfig, data)
        _check_types(cfg, path)
    return apply_overrides(cfg, overrides).validate()


def _check_types(cfg: PipelineConfig, path: Path) -> None:
    """Refuse a settings file whose values have the wrong type (``steps = "many"``) or are
    not finite (``coef = nan``)."""
    kinds = {"int": (int,), "float": (int, float), "str": (str,)}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, bool) or not isinstance(value, kinds[str(f.type)]):
            raise ConfigError(f"{path}: {f.name} must be {f.type}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{path}: {f.name} must be a finite number, got {value!r}")


# ----------------------------------------------------------------------------- the run
class Pipeline:
    """One pipeline run directory: its stages, their outputs and the report."""

    def __init__(self, cfg: PipelineConfig, run_dir: str | Path, progress: bool = True):
        self.cfg, self.dir, self.progress = cfg, Path(run_dir), progress

    # paths
    def model_path(self, name: str) -> Path:
        return self.dir / "models" / f"{name}.safetensors"

    def eval_path(self, name: str) -> Path:
        return self.dir / "eval" / f"{name}.json"

    @property
    def data_dir(self) -> Path:
        return Path(self.cfg.data) if self.cfg.data else self.dir / "data"

    @property
    def tasks(self) -> tuple[str, ...]:
        from tdmpc_opt.tasks import resolve_tasks

        return resolve_tasks(self.cfg.tasks)

    def stages(self) -> list[tuple[str, object]]:
        """``(name, function)`` of every stage, in order."""
        out = [("teacher", self.stage_teacher)]
        if not self.cfg.data:
            out.append(("data", self.stage_data))
        out += [("student", lambda: self.stage_student("student", 0.0)),
                ("distilled", lambda: self.stage_student("distilled", self.cfg.coef)),
                ("quantize", self.stage_quantize)]
        out += [(f"eval-{m}", lambda m=m: self.stage_eval(m)) for m in MODELS]
        out += [("latency", self.stage_latency), ("report", self.stage_report)]
        return out

    def run(self) -> Path:
        """Run every unfinished stage; returns the report's path."""
        self._claim()
        start = time.perf_counter()
        for name, fn in self.stages():
            marker = self.dir / "stages" / f"{name}.json"
            if marker.is_file():
                self._say(f"[{name}] done earlier, skipped")
                continue
            self._say(f"[{name}] ...")
            t = time.perf_counter()
            try:
                fn()
            except PipelineError:
                raise
            except TdmpcError as e:
                raise PipelineError(f"stage {name}: {e}") from None
            _write_json(marker, {"stage": name, "seconds": round(time.perf_counter() - t, 2),
                                 "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
            self._say(f"[{name}] finished in {time.perf_counter() - t:.1f} s")
        self._say(f"pipeline finished in {time.perf_counter() - start:.1f} s "
                  f"(this invocation)")
        return self.dir / "report.md"

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def _claim(self) -> None:
        """Write the configuration, or check that an existing run directory has the same."""
        path = self.dir / "pipeline.json"
        mine = dataclasses.asdict(self.cfg)
        if path.is_file():
            try:
                theirs = json.loads(path.read_text())
            except ValueError:
                raise PipelineError(f"{path} is damaged; remove the run directory or choose "
                                    "another --run-dir") from None
            if theirs != mine:
                diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise PipelineError(f"{self.dir} holds a run with other settings ({', '.join(diff)}"
                                    "); choose another --run-dir or use the same settings")
            return
        self.check()
        _write_json(path, mine)

    def check(self) -> None:
        """Refuse, before the run directory is claimed, what the settings alone cannot show:
        a missing teacher or dataset, tasks outside the teacher's set."""
        from tdmpc_opt.agent import load_agent
        from tdmpc_opt.cli.eval import check_tasks

        if not self.cfg.teacher_path().is_file():
            raise PipelineError(f"teacher checkpoint not found: {self.cfg.teacher_path()}")
        if self.cfg.data and not (Path(self.cfg.data) / "meta.json").is_file():
            raise PipelineError(f"{self.cfg.data} is not a tdmpc-opt dataset (no meta.json)")
        check_tasks(load_agent(self.cfg.teacher_path()), self.tasks)

    def _command(self, argv: list[str]) -> None:
        """Run one ``tdmpc-opt`` command in this process (its errors propagate)."""
        from tdmpc_opt.cli import build_parser

        if not self.progress:
            argv = [*argv, "--quiet"] if argv[0] in ("distill", "eval") else argv
        args = build_parser().parse_args(argv)
        if args._run(args):
            raise PipelineError(f"stage command failed: tdmpc-opt {' '.join(argv)}")

    def _backend(self) -> list[str]:
        """Rollout backend options of ``collect`` and ``eval``."""
        c, out = self.cfg, []
        if c.backend != "local" or c.workers > 1:
            out += ["--backend", c.backend, "--workers", str(c.workers)]
        if c.ray_address:
            out += ["--ray-address", c.ray_address]
        return out

    def _threads(self) -> list[str]:
        return [f"threads={self.cfg.threads}"] if self.cfg.threads else []

    # stages
    def stage_teacher(self) -> None:
        """Check the teacher loads and knows the tasks; keep a copy with the run."""
        from tdmpc_opt.agent import load_agent
        from tdmpc_opt.cli.eval import check_tasks

        src = self.cfg.teacher_path()
        check_tasks(load_agent(src), self.tasks)
        dst = self.model_path("teacher")
        if src.suffix == ".safetensors":
            _copy_atomic(src, dst)
        else:
            self._command(["convert", str(src), str(dst), "--overwrite"])

    def stage_data(self) -> None:
        c = self.cfg
        self._command(["collect", "--checkpoint", str(self.model_path("teacher")),
                       "--tasks", ",".join(self.tasks), "--episodes", str(c.collect_episodes),
                       "--policy", "--action-noise", str(c.collect_noise), "--seed", str(c.seed),
                       "--out", str(self.data_dir), "--overwrite", *self._backend()])

    def stage_student(self, name: str, coef: float) -> None:
        """Train one student (``coef`` 0: no teacher); both share data, updates and seed."""
        c, run_dir = self.cfg, self.dir / name
        argv = ["distill", "--teacher", str(self.model_path("teacher")),
                "--data", str(self.data_dir), "--coef", str(coef), "--run-dir", str(run_dir),
                f"enc_dim={c.student_enc_dim}", f"mlp_dim={c.student_mlp_dim}",
                f"latent_dim={c.student_latent_dim}", f"task_dim={c.student_task_dim}",
                f"num_q={c.student_num_q}",
                f"steps={c.steps}", f"batch_size={c.batch_size}", f"seed={c.seed}",
                "eval_freq=0", f"checkpoint_freq={c.checkpoint_every}", *self._threads()]
        if coef > 0:
            argv += ["--cache-teacher", str(self.dir / "teacher-cache")]
        if coef > 0 and c.plan_coef > 0:
            argv += ["--plan-coef", str(c.plan_coef)]
        if any((run_dir / "checkpoints").glob("step-*.pt")):
            argv.append("--resume")
        self._command(argv)
        _copy_atomic(run_dir / "model.safetensors", self.model_path(name))

    def stage_quantize(self) -> None:
        src = self.model_path("distilled")
        for fmt, name in (("fp16", "distilled-fp16"), ("int8-dynamic", "distilled-int8")):
            argv = ["quantize", "--checkpoint", str(src), "--format", fmt,
                    "--out", str(self.model_path(name)), "--overwrite"]
            if fmt.startswith("int8"):
                argv += ["--calibrate-data", str(self.data_dir)]
            self._command(argv)

    def stage_eval(self, name: str) -> None:
        c = self.cfg
        argv = ["eval", "--checkpoint", str(self.model_path(name)), "--tasks",
                ",".join(self.tasks), "--episodes", str(c.eval_episodes), "--seed",
                str(c.eval_seed), "--json", str(self.eval_path(name)),
                f"num_samples={c.num_samples}", f"iterations={c.iterations}"]
        if c.max_steps:
            argv += ["--max-steps", str(c.max_steps)]
        if c.threads:
            argv += ["--threads", str(c.threads)]
        self._command(argv + self._backend())

    def stage_latency(self) -> None:
        """Median seconds of one planner call (batch 1) per model, in its own runtime."""
        from tdmpc_opt.cli.bench import machine, time_planner
        from tdmpc_opt.config import PlannerConfig
        from tdmpc_opt.quantization import load_fast_agent

        planner = PlannerConfig(num_samples=self.cfg.num_samples,
                                iterations=self.cfg.iterations)
        out = {"machine": machine(), "batch": 1, "models": {}}
        for name in MODELS:
            agent = load_fast_agent(self.model_path(name), planner=planner)
            t = time_planner(agent, 1, agent.precision, self.cfg.latency_seconds)
            out["models"][name] = dict(t, runtime=agent.precision)
        _write_json(self.dir / "latency.json", out)

    def stage_report(self) -> None:
        from tdmpc_opt.report import write_report

        write_report(self)


# ---------------------------------------------------------------------------- helpers
def _write_json(path: Path, data) -> None:
    from tdmpc_opt.checkpoints import write_json

    write_json(path, data, indent=2)


def _copy_atomic(src: Path, dst: Path) -> None:
    from tdmpc_opt.checkpoints import atomic_write

    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
