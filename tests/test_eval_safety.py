"""``tdmpc-opt eval`` keeps finished work and refuses bad input in one line: Ctrl-C with worker
processes, torn episode logs, reused or foreign --json files, unwritable outputs, a closed
stdout, absurd episode counts, a bad fault-injection setting."""

from __future__ import annotations

import _thread
import ctypes
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

from conftest import DropsAnInterrupt
from tdmpc_opt import cpu_kernels
from tdmpc_opt.backends import FAULT_ENV, run_rollouts
from tdmpc_opt.checkpoints import save_checkpoint
from tdmpc_opt.cli import INTERRUPTED, main
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.evaluation import episode_specs
from tdmpc_opt.world_model import WorldModel


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny three-task model saved as a safetensors checkpoint."""
    import torch

    from tdmpc_opt.config import model_config_for

    torch.manual_seed(0)
    cfg = model_config_for(("walker-walk", "cartpole-balance", "pendulum-swingup"), None,
                           enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2,
                           simnorm_dim=8)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(path, WorldModel(cfg))
    return str(path)


def _eval(ckpt, out, *extra):
    """An eval command line: policy planner, 2-step episodes, quiet."""
    return ["eval", "--checkpoint", ckpt, "--planner", "policy", "--max-steps", "2", "--quiet",
            "--json", str(out), *extra]


def _log(out: Path) -> Path:
    return out.with_name(out.name + ".episodes.jsonl")


def _episodes(out: Path) -> list[tuple[str, int]]:
    """(task, episode) of every readable episode line of ``out``'s log."""
    rows = []
    for line in _log(out).read_text().splitlines()[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        rows.append((row["task"], row["episode"]))
    return rows


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


# ----------------------------------------------------------------- 1: Ctrl-C with workers
def test_interrupt_stops_worker_processes_at_once(ckpt):
    """Ctrl-C in the driver (here: raised as the first chunk's result arrives) terminates the
    workers instead of waiting for the chunks they run and those queued. The bound leaves
    room for a loaded machine (terminate, 3 s grace, kill) and is far below finishing the
    other seven chunks of 1000-step episodes."""
    specs = episode_specs(("walker-walk",), 32, 1)  # 8 chunks of 4 episodes
    interrupted = []

    def on_result(res):
        interrupted.append(time.monotonic())
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_rollouts(ckpt, PlannerConfig(mpc=False), specs, workers=2, batch_size=4,
                     max_steps=1000, on_result=on_result)
    assert time.monotonic() - interrupted[0] < 8.0
    assert multiprocessing.active_children() == []


def _alive_in_group(pgid: int) -> list[int]:
    """Processes (not zombies) of process group ``pgid``."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("sig,group,code", [
    pytest.param(signal.SIGINT, True, 130, id="ctrl-c", marks=pytest.mark.slow),
    pytest.param(signal.SIGTERM, False, 143, id="term"),
    pytest.param(signal.SIGKILL, False, -signal.SIGKILL, id="kill"),
])
def test_stopped_eval_keeps_its_episodes_and_leaves_no_process(ckpt, tmp_path, sig, group, code):
    """A terminal's Ctrl-C (SIGINT to the whole process group): exit 130 with the note only, no
    traceback of the driver or the workers. ``kill PID`` of the driver alone: SIGTERM is handled
    as Ctrl-C (exit 143, the note, workers stopped); after SIGKILL the kernel kills the workers
    (both used to leave the workers planning on as orphans until their chunks ended). Finished
    episodes are kept and no process of the run is left in every case."""
    out = tmp_path / "r.json"
    argv = _eval(ckpt, out, "--tasks", "walker-walk", "--episodes", "40", "--workers", "2",
                 "--batch-size", "4")
    argv[argv.index("--max-steps") + 1] = "250"
    proc = subprocess.Popen([sys.executable, "-m", "tdmpc_opt", *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (_log(out).exists() and _episodes(out)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_alive_in_group(proc.pid)) >= 3  # the driver and its two workers
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        _, err = proc.communicate(timeout=15)
        deadline = time.monotonic() + 5
        while _alive_in_group(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive_in_group(proc.pid) == []
    finally:
        if _alive_in_group(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == code, err
    if sig != signal.SIGKILL:
        assert err.strip().splitlines() == [INTERRUPTED], err
    assert len(_episodes(out)) >= 4  # at least the first chunk


# ------------------------------------------------------------ 2: torn last line of the log
def test_resume_skips_a_torn_line_and_appends_on_a_new_line(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = _eval(ckpt, out, "--tasks", "cartpole-balance", "--episodes", "3")
    assert main(argv) == 0
    log = _log(out)
    log.write_text(log.read_text()[:-20])  # a crash cut the last episode's line
    capsys.readouterr()
    argv[-1] = "4"
    assert main(argv) == 0
    cap = capsys.readouterr()
    assert "resuming: 2 of 4 episodes" in cap.out
    assert cap.err.strip().splitlines() == [
        f"warning: skipped 1 unreadable line(s) of {log} (a write cut short); episodes "
        "missing from it run again"]
    assert sorted(_episodes(out)) == [("cartpole-balance", i) for i in range(4)]
    before = log.read_text()
    assert main(argv) == 0  # again: nothing reruns, the log does not grow
    assert "resuming: 4 of 4 episodes" in capsys.readouterr().out
    assert log.read_text() == before
    assert len(json.loads(out.read_text())["tasks"]["cartpole-balance"]["returns"]) == 4


# ------------------------------------------------- 3: tasks and settings are the run's identity
@pytest.mark.parametrize("change, key", [
    (["--tasks", "walker-walk", "--episodes", "1"], "task_names"),
    (["--tasks", "walker-walk,cartpole-balance"], "task_names"),
    (["--tasks", "cartpole-balance", "--planner", "mppi", "num_samples=16", "num_elites=4",
      "num_pi_trajs=2", "iterations=1"], "layers, planner"),
    (["--tasks", "cartpole-balance", "--seed", "2"], "seed"),
])
def test_other_tasks_or_settings_are_refused(ckpt, tmp_path, capsys, change, key):
    out = tmp_path / "r.json"
    assert main(_eval(ckpt, out, "--tasks", "cartpole-balance", "--episodes", "2")) == 0
    saved = out.read_text(), _log(out).read_text()
    capsys.readouterr()
    assert main(_eval(ckpt, out, *change)) == 2
    err = _one_line_error(capsys)
    assert f"holds 2 finished episode(s) of an evaluation with other settings ({key})" in err
    assert (out.read_text(), _log(out).read_text()) == saved
    _log(out).unlink()  # the results alone are protected too
    assert main(_eval(ckpt, out, *change)) == 2
    assert f"{out} holds the results of an evaluation with other settings ({key})" in \
        _one_line_error(capsys)
    assert out.read_text() == saved[0]


@pytest.mark.skipif(not cpu_kernels.available(), reason="the fused CPU kernel does not build here")
def test_episodes_planned_with_other_layers_are_refused(ckpt, tmp_path, capsys):
    """An int8 evaluation begun in a process where the fused kernel did not load (another
    code scheme) is not continued where it loads: its episodes would not be comparable."""
    out = tmp_path / "r.json"
    argv = _eval(ckpt, out, "--tasks", "cartpole-balance", "--planner", "mppi",
                 "--precision", "int8", "num_samples=16", "num_elites=4", "num_pi_trajs=2",
                 "iterations=1")
    code = "import sys; from tdmpc_opt.cli import main; sys.exit(main(sys.argv[1:]))"
    env = dict(os.environ, TDMPC_OPT_NO_CPU_KERNELS="1")
    subprocess.run([sys.executable, "-c", code, *argv, "--episodes", "1"], env=env, check=True,
                   capture_output=True)
    assert json.loads(out.read_text())["layers"] == "int8 on cpu: PyTorch ops, 15-bit codes " \
        "into dyn,q"
    saved = _log(out).read_text()
    capsys.readouterr()
    assert main([*argv, "--episodes", "2"]) == 2
    assert "an evaluation with other settings (layers)" in _one_line_error(capsys)
    assert _log(out).read_text() == saved


def test_more_episodes_add_and_fewer_report_the_first(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = _eval(ckpt, out, "--tasks", "cartpole-balance,pendulum-swingup", "--episodes", "1")
    assert main(argv) == 0
    argv[-1] = "3"
    assert main(argv) == 0
    assert "resuming: 2 of 6 episodes already finished" in capsys.readouterr().out
    assert len(_episodes(out)) == 6
    three = json.loads(out.read_text())["tasks"]
    argv[-1] = "2"
    assert main(argv) == 0
    assert ("resuming: 4 of 4 episodes already finished (2 more in "
            f"{_log(out)}, beyond --episodes, not reported)") in capsys.readouterr().out
    two = json.loads(out.read_text())
    assert two["episodes"] == 2 and len(_episodes(out)) == 6  # nothing finished is lost
    for task, v in two["tasks"].items():
        assert v["returns"] == three[task]["returns"][:2]


# --------------------------------------------------------------- 4: a --json that is not ours
@pytest.mark.parametrize("content", ["[1, 2]\n", "my notes\n", '{"results": "mine"}\n', ""])
def test_a_foreign_json_file_is_refused_before_any_work(ckpt, tmp_path, capsys, monkeypatch,
                                                        content):
    import tdmpc_opt.quantization

    out = tmp_path / "r.json"
    out.write_text(content)
    monkeypatch.setattr(tdmpc_opt.quantization, "load_fast_agent", _not_called)
    assert main(_eval(ckpt, out, "--tasks", "cartpole-balance")) == 2
    assert _one_line_error(capsys) == (f"error: {out} exists and is not the results of "
                                       "tdmpc-opt eval; choose another --json, or delete it")
    assert out.read_text() == content and not _log(out).exists()


def test_a_foreign_episode_log_is_refused(ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    _log(out).write_text("line one\nline two\n")
    assert main(_eval(ckpt, out, "--tasks", "cartpole-balance")) == 2
    assert "is not an episode log of tdmpc-opt eval" in _one_line_error(capsys)
    assert _log(out).read_text() == "line one\nline two\n" and not out.exists()


def _not_called(*args, **kwargs):
    raise AssertionError("work started")


# ------------------------------------------------------------- 5: outputs that cannot be made
@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("option, path", [("--json", "/proc/x/r.json"),
                                          ("--video", "/proc/x/v")])
def test_unwritable_outputs_are_refused_before_any_episode(ckpt, tmp_path, capsys,
                                                           monkeypatch, option, path):
    import tdmpc_opt.evaluation

    monkeypatch.setattr(tdmpc_opt.evaluation, "run_episodes", _not_called)
    argv = _eval(ckpt, tmp_path / "r.json", "--tasks", "cartpole-balance", option, path)
    assert main(argv) == 2
    err = _one_line_error(capsys)
    assert err.startswith(f"error: cannot write {path}") and "No such file" in err, err


# --------------------------------------------------------------------- 6: a closed stdout
class _ClosedPipe:
    """stdout whose reader went away (``| head`` after its first line)."""

    def write(self, text):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def fileno(self):
        raise ValueError("no file descriptor")


def test_results_are_written_when_stdout_is_closed(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "stdout", _ClosedPipe())
    assert main(_eval(ckpt, out, "--tasks", "cartpole-balance", "--episodes", "2")) == 141
    assert len(json.loads(out.read_text())["tasks"]["cartpole-balance"]["returns"]) == 2


# ------------------------------------------------------------ 7: an absurd episode count
class _Unanswered(BaseException):
    """Raised in the main thread when a test's Ctrl-C went unanswered (not an ``Exception``:
    the command's error handling must not turn it into an exit code)."""


UNANSWERED_S = 60.0
"""How long a test waits for its Ctrl-C to be acted on before it calls it lost."""


def test_a_huge_episode_count_starts_at_once(ckpt, tmp_path, capsys):
    """10^11 episodes: the first ones finish within seconds (nothing is listed up front);
    Ctrl-C then keeps them."""
    out = tmp_path / "r.json"
    stop = threading.Event()
    lost = []  # SIGINT's handler and the main thread's stack for each unanswered Ctrl-C

    def interrupt_after_first_episode():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            if _log(out).exists() and _episodes(out):
                break
            time.sleep(0.05)
        # unanswered (seen twice in full-suite runs, never alone), the 10^11 episodes would
        # run on: interrupt again and fail below instead of hanging the suite
        while not stop.is_set():
            _thread.interrupt_main()
            if stop.wait(UNANSWERED_S):
                break
            # what the main thread was doing and which handler it had: where the Ctrl-C went
            stack = traceback.format_stack(sys._current_frames()[threading.main_thread().ident])
            lost.append(f"handler {signal.getsignal(signal.SIGINT)!r}, main thread at:\n"
                        + "".join(stack[-12:]))
            # and stop it without a signal handler: an exception raised in the main thread
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(threading.main_thread().ident), ctypes.py_object(_Unanswered))

    watcher = threading.Thread(target=interrupt_after_first_episode, daemon=True)
    start = time.monotonic()
    watcher.start()
    try:
        code = main(_eval(ckpt, out, "--tasks", "cartpole-balance",
                          "--episodes", "100000000000"))
    except _Unanswered:
        code = None
    finally:
        stop.set()
        watcher.join()
    assert not lost, f"a Ctrl-C went unanswered for {UNANSWERED_S:.0f} s; " + "\n".join(lost)
    assert code == 130 and capsys.readouterr().err.strip() == INTERRUPTED
    assert _episodes(out) and time.monotonic() - start < 30


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_ctrl_c_dropped_inside_a_del_still_stops_the_evaluation(ckpt, tmp_path, capsys,
                                                                  monkeypatch):
    """The evaluation stops at its next step with the finished episodes kept, instead of
    running on until a second Ctrl-C (the likely cause of one hang of the huge-episode-count
    test above)."""
    import tdmpc_opt.envs as envs

    made, real = [], envs.make_env

    def make_env(task, seed):
        made.append(task)
        if len(made) == 3:  # while the third episode's environment is made
            DropsAnInterrupt()
        return real(task, seed)

    monkeypatch.setattr(envs, "make_env", make_env)
    out = tmp_path / "r.json"
    code = main(_eval(ckpt, out, "--tasks", "cartpole-balance", "--episodes", "20",
                      "--batch-size", "1"))
    assert code == 130 and capsys.readouterr().err.strip().endswith(INTERRUPTED)
    assert len(made) == 3 and _episodes(out) == [("cartpole-balance", 0),
                                                 ("cartpole-balance", 1)]


# ---------------------------------------------------------- 8: the fault-injection setting
@pytest.mark.parametrize("value", ["garbage", "1", "x:marker", "1:", ":marker"])
def test_a_bad_fault_injection_setting_is_one_line(ckpt, tmp_path, capsys, monkeypatch,
                                                   value):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(FAULT_ENV, value)
    assert main(_eval(ckpt, tmp_path / "r.json", "--tasks", "cartpole-balance",
                      "--workers", "2")) == 2
    assert _one_line_error(capsys) == (f"error: {FAULT_ENV} must be CHUNK:MARKER (a chunk "
                                       f"number and a file to create), got {value!r}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json.episodes.jsonl"]
