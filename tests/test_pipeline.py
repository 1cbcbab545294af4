"""The main job at a tiny setting: every stage's files, the report, interrupt and resume."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tdmpc_opt.cli import main
from tdmpc_opt.pipeline import BUILTIN_TEACHER, MODELS, Pipeline, PipelineConfig, load_config
from tdmpc_opt.report import LABELS

# The shipped teacher, two of its tasks, a 16-wide student, 5-step episodes, few samples.
TINY = ["tasks=cartpole-balance,pendulum-spin", "collect_episodes=1", "student_enc_dim=16",
        "student_mlp_dim=16", "student_latent_dim=16", "student_task_dim=4", "steps=20",
        "batch_size=16", "eval_episodes=2", "max_steps=5", "num_samples=64", "iterations=1",
        "latency_seconds=0", "checkpoint_every=10", "threads=1"]


def _check_complete(run: Path, extra: tuple[str, ...] | list[str] = ()) -> None:
    pipe = Pipeline(load_config(None, [*TINY, *extra]), run)
    for name, _ in pipe.stages():
        assert (run / "stages" / f"{name}.json").is_file(), name
    for name in MODELS:
        assert pipe.model_path(name).stat().st_size > 0
        result = json.loads(pipe.eval_path(name).read_text())
        assert set(result["tasks"]) == {"cartpole-balance", "pendulum-spin"}
        assert all(len(t["returns"]) == 2 for t in result["tasks"].values())
    report = (run / "report.md").read_text()
    for name in MODELS:
        assert f"| {LABELS[name]} |" in report
    assert "## Distillation" in report
    results = json.loads((run / "results.json").read_text())
    assert [m["model"] for m in results["models"]] == list(MODELS)
    for fig in ("returns.png", "score-vs-size.png"):
        assert (run / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "data" / "meta.json").is_file()


def test_builtin_teacher_is_shipped_and_small():
    assert BUILTIN_TEACHER.is_file(), "the project's teacher must ship with the package"
    assert BUILTIN_TEACHER.stat().st_size <= 10 * 2**20


def test_tiny_pipeline_makes_every_stage_and_the_report(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["pipeline", "--run-dir", str(run), "--quiet", *TINY]) == 0
    _check_complete(run)
    results = json.loads((run / "results.json").read_text())
    by = {m["model"]: m for m in results["models"]}
    assert by["student"]["parameters"] == by["distilled"]["parameters"]
    assert by["teacher"]["parameters"] > 10 * by["student"]["parameters"]
    assert by["distilled-int8"]["file_bytes"] < by["distilled-fp16"]["file_bytes"] < \
        by["distilled"]["file_bytes"]
    assert by["distilled-int8"]["runtime"] == "int8"
    assert by["distilled-int8"]["layers"].startswith("int8 on cpu: ")
    assert by["teacher"]["layers"] == by["distilled-fp16"]["layers"] != by["distilled-int8"][
        "layers"]
    note = next(line for line in (run / "report.md").read_text().splitlines()
                if line.startswith("Evaluation planner layers -- "))
    assert f"**distilled, INT8**: `{by['distilled-int8']['layers']}`" in note
    # same episodes for every model
    seeds = {json.dumps(m["episode_seeds"], sort_keys=True) for m in results["models"]}
    assert len(seeds) == 1
    # a second run does nothing again
    capsys.readouterr()
    assert main(["pipeline", "--run-dir", str(run), "--quiet", *TINY]) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == len(Pipeline(PipelineConfig(), run).stages())


def test_plan_term_reaches_only_the_distilled_student(tmp_path):
    run = tmp_path / "run"
    items = [*TINY, "plan_coef=0.5", "tasks=cartpole-balance", "eval_episodes=1"]
    assert main(["pipeline", "--run-dir", str(run), "--quiet", *items]) == 0
    distilled = json.loads((run / "distilled" / "config.json").read_text())
    student = json.loads((run / "student" / "config.json").read_text())
    assert distilled["distill"]["plan_coef"] == 0.5
    assert student["distill"]["plan_coef"] == 0.0 and student["distill"]["reward_coef"] == 0.0
    assert "our plan term with coefficient 0.5" in (run / "report.md").read_text()


def _start(run: Path, extra: list[str]) -> subprocess.Popen:
    code = "import sys; from tdmpc_opt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code, "pipeline", "--run-dir", str(run),
                             "--quiet", *TINY, *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _wait_for(pattern_dir: Path, pattern: str, proc: subprocess.Popen, limit: float = 300):
    start = time.monotonic()
    while time.monotonic() - start < limit:
        if any(pattern_dir.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"pipeline ended before {pattern_dir}/{pattern} appeared:\n"
                        f"{proc.stdout.read()}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"{pattern_dir}/{pattern} did not appear")


def _first_line(proc: subprocess.Popen) -> str:
    """The process's first output line, read from the pipe byte by byte: a buffered readline
    could take more, which ``communicate`` (reading the pipe itself) would then never see."""
    got = b""
    while not got.endswith(b"\n") and (byte := os.read(proc.stdout.fileno(), 1)):
        got += byte
    return got.decode()


def _results_without_timing(run: Path) -> dict:
    """Scores, returns, seeds, parameters and the verdict; the files' bytes and hashes differ
    because their metadata names the run directory, and latency is a wall-clock figure."""
    data = json.loads((run / "results.json").read_text())
    for row in data["models"]:
        for key in ("latency_ms", "file_bytes", "sha256"):
            row.pop(key)
    return {"models": data["models"], "verdict": data["verdict"]}


def _same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    ta, tb = load_file(a), load_file(b)
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_killed_pipeline_finishes_with_the_same_report(tmp_path):
    """Ctrl-C in the middle of a training stage, kill -9 in the next, then kill -9 at random
    moments: every restart skips finished stages, and the final results equal those of an
    uninterrupted run (latency, a wall-clock figure, aside)."""
    longer = ["steps=200", "checkpoint_every=25"]
    reference = tmp_path / "reference"
    assert main(["pipeline", "--run-dir", str(reference), "--quiet", *TINY, *longer]) == 0

    run = tmp_path / "run"
    proc = _start(run, longer)
    _wait_for(run / "student" / "checkpoints", "step-*.pt", proc)
    proc.send_signal(signal.SIGINT)  # Ctrl-C
    out, _ = proc.communicate(timeout=120)
    history = [f"--- Ctrl-C in the student's training:\n{out[-1500:]}"]  # for failure messages
    assert proc.returncode == 130, out
    assert "interrupted" in out
    assert not (run / "stages" / "student.json").exists()
    data_time = (run / "data" / "meta.json").stat().st_mtime_ns

    proc = _start(run, longer)
    _wait_for(run / "distilled" / "checkpoints", "step-*.pt", proc)
    proc.kill()  # kill -9
    out, _ = proc.communicate(timeout=60)
    history.append(f"--- kill -9 in the distilled student's training:\n{out[-1500:]}")
    assert "[student] done earlier, skipped" not in out  # it resumed the student, then ...
    assert not (run / "stages" / "distilled.json").exists()

    rng = random.Random(7)
    for _ in range(3):
        proc = _start(run, longer)
        # The kill moment counts from the run's first (flushed) line, not from the start of
        # Python: on a loaded machine the imports alone can outlast the shortest wait.
        first = _first_line(proc)
        wait = rng.uniform(2.0, 10.0)
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            proc.kill()
        out = first + proc.communicate(timeout=60)[0]
        history.append(f"--- killed {wait:.1f} s after its first line (exit {proc.returncode}):"
                       f"\n{out[-1500:]}")
        for stage in ("teacher", "data", "student"):
            assert f"[{stage}] done earlier, skipped" in out, out

    proc = _start(run, longer)
    out, _ = proc.communicate(timeout=600)
    history.append(f"--- final run (exit {proc.returncode}):\n{out[-3000:]}")
    assert proc.returncode == 0, out
    assert (run / "data" / "meta.json").stat().st_mtime_ns == data_time
    _check_complete(run, longer)
    # The models first: the first one that differs names the stage that went wrong.
    differing = [name for name in MODELS
                 if not _same_tensors(run / "models" / f"{name}.safetensors",
                                      reference / "models" / f"{name}.safetensors")]
    assert not differing, f"models differ from the reference: {differing}\n" + "\n".join(history)
    got, want = _results_without_timing(run), _results_without_timing(reference)
    assert got == want, "\n".join(
        [f"{a['model']}: {a['returns']} != {b['returns']}"
         for a, b in zip(got["models"], want["models"], strict=True) if a != b] + history)


def test_other_settings_in_the_same_run_dir_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    Pipeline(load_config(None, TINY), run)._claim()
    assert main(["pipeline", "--run-dir", str(run), "--quiet", *TINY, "steps=21"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "other settings (steps)" in err


@pytest.mark.parametrize("content, suffix, message", [
    ("{not json", ".json", "is not valid json"),
    ('{"stepz": 3}', ".json", "unknown PipelineConfig keys"),
    ("steps = 'many'", ".toml", "steps must be int, got 'many'"),
    ("[1, 2]", ".json", "must hold a table"),
    ('{"coef": NaN}', ".json", "coef must be a finite number, got nan"),
    ("coef = inf", ".toml", "coef must be a finite number, got inf"),
])
def test_bad_config_files_get_one_line(tmp_path, capsys, content, suffix, message):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(content)
    assert main(["pipeline", "--config", str(path), "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "r").exists()


def test_config_file_and_overrides_compose(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text('steps = 123\ntasks = "cartpole-balance"\n')
    cfg = load_config(path, ["eval_episodes=7"])
    assert (cfg.steps, cfg.tasks, cfg.eval_episodes) == (123, "cartpole-balance", 7)


@pytest.mark.parametrize("items, message", [
    (["teacher=missing.safetensors"], "teacher checkpoint not found"),
    (["tasks=walker-flip"], "unknown task 'walker-flip'"),
    (["tasks=mw-reach"], "Meta-World environments are not shipped"),
    (["steps=0"], "steps must be positive"),
    (["plan_coef=-1"], "plan_coef >= 0"),
    (["stepz=3"], "unknown setting 'stepz'"),
])
def test_bad_settings_get_one_line(tmp_path, capsys, items, message):
    assert main(["pipeline", "--run-dir", str(tmp_path / "r"), "--quiet", *TINY, *items]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
