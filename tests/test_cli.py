"""CLI: info, predict and convert on the published checkpoints; bad input is one clear line."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import shared_path
from tdmpc_opt.cli import INTERRUPTED, main


def _run(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("variant", ["fp16", "int8", "mixed"])
def test_info_reports_every_number(variant, capsys):
    path = shared_path("checkpoints", f"tdmpc-opt-mt30-1M-{variant}.pt")
    code, out, _ = _run(["info", str(path), "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and info["stored_numbers"] == 1_980_357
    assert info["learnable_params"] == 1_426_427 and info["task_set"] == "mt30"
    code, out, _ = _run(["info", str(path)], capsys)
    assert "1,980,357" in out and "mt30" in out


def test_predict_reproduces_the_golden_file(fp16_ckpt, tmp_path, capsys):
    golden = json.loads(shared_path("reference", "golden-predictions-3tasks.json").read_text())
    items = [{"task": i["task"], "obs": i["obs"], "action": i["action"]}
             for i in golden["items"]]
    (tmp_path / "in.json").write_text(json.dumps(items))
    code, _, _ = _run(["predict", "--checkpoint", str(fp16_ckpt), "--input",
                       str(tmp_path / "in.json"), "--output", str(tmp_path / "out.json")], capsys)
    assert code == 0
    out = json.loads((tmp_path / "out.json").read_text())
    for got, want in zip(out, golden["items"], strict=True):
        assert max(abs(a - b) for a, b in zip(got["z"], want["z"], strict=True)) < 1e-4
        assert max(abs(a - b) for a, b in zip(got["z_next"], want["z_next"], strict=True)) < 1e-4
        for key in ("reward", "q_mean"):
            assert abs(got[key] - want[key]) <= 1e-3 * abs(want[key])
        assert max(abs(a - b) for a, b in zip(got["pi_mean"], want["pi_mean"], strict=True)) < 1e-3


def test_predict_accepts_unpadded_inputs(fp16_ckpt, tmp_path, capsys):
    items = [{"task": "cartpole-balance", "obs": [0.1, 0.2, 0.3, 0.4, 0.5], "action": [0.3]},
             {"task": "cartpole-balance", "obs": [0.1, 0.2, 0.3, 0.4, 0.5] + [0.0] * 19,
              "action": [0.3, 0, 0, 0, 0, 0]}]
    (tmp_path / "in.json").write_text(json.dumps(items))
    code, _, _ = _run(["predict", "--checkpoint", str(fp16_ckpt), "--input",
                       str(tmp_path / "in.json"), "--output", str(tmp_path / "o.json")], capsys)
    a, b = json.loads((tmp_path / "o.json").read_text())
    assert code == 0 and a["z"] == b["z"] and a["reward"] == b["reward"]


def test_convert_round_trip_keeps_predictions(fp16_ckpt, tmp_path, capsys):
    st, pt = tmp_path / "m.safetensors", tmp_path / "m.pt"
    assert _run(["convert", str(fp16_ckpt), str(st)], capsys)[0] == 0
    assert _run(["convert", str(st), str(pt), "--dtype", "float16"], capsys)[0] == 0
    infos = [json.loads(_run(["info", str(p), "--json"], capsys)[1]) for p in (st, pt)]
    assert infos[0]["format"] == "tdmpc-opt" and infos[1]["format"] == "torch"
    assert infos[0]["stored_numbers"] == infos[1]["stored_numbers"] == 1_980_357


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_checkpoint_outputs_never_replace_a_file_unasked(fp16_ckpt, tmp_path, capsys, command):
    """A trained checkpoint at the output name is kept unless --overwrite says otherwise."""
    out = tmp_path / "trained.safetensors"
    out.write_bytes(b"hours of training")
    argv = ([command, str(fp16_ckpt), str(out)] if command == "convert" else
            [command, "--checkpoint", str(fp16_ckpt), "--format", "fp16", "--out", str(out)])
    code, _, err = _run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == [f"error: {out}: already exists; choose another file "
                                        "name or pass --overwrite to replace it"]
    assert out.read_bytes() == b"hours of training"
    assert _run([*argv, "--overwrite"], capsys)[0] == 0
    assert json.loads(_run(["info", str(out), "--json"], capsys)[1])["format"] == "tdmpc-opt"


def _bad_inputs(tmp_path, ckpt):
    (tmp_path / "notjson.json").write_text("{nope")
    (tmp_path / "wrongobs.json").write_text(json.dumps(
        [{"task": "walker-walk", "obs": [0.0] * 7, "action": [0.0] * 6}]))
    (tmp_path / "task.json").write_text(json.dumps(
        [{"task": "walker-moonwalk", "obs": [0.0] * 24, "action": [0.0] * 6}]))
    (tmp_path / "huge.json").write_text(
        '[{"task": "walker-walk", "obs": [' + "9" * 400 + ", 0" * 23 + '], "action": ['
        + ", ".join(["0"] * 6) + "]}]")
    (tmp_path / "big.json").write_text(json.dumps(
        [{"task": "walker-walk", "obs": [1e39] + [0.0] * 23, "action": [0.0] * 6}]))
    (tmp_path / "trunc.pt").write_bytes(ckpt.read_bytes()[:5000])
    (tmp_path / "text.pt").write_text("not a checkpoint")
    pred = ["predict", "--checkpoint", str(ckpt), "--output", str(tmp_path / "o.json"),
            "--input"]
    return [
        (["info", str(tmp_path / "missing.pt")], "no such file"),
        (["info", str(tmp_path / "text.pt")], "not a checkpoint"),
        (["info", str(tmp_path / "trunc.pt")], "truncated or corrupted"),
        ([*pred, str(tmp_path / "notjson.json")], "not valid JSON"),
        ([*pred, str(tmp_path / "wrongobs.json")], "'obs' has 7 values; expected 24"),
        ([*pred, str(tmp_path / "task.json")], "not in this model's task set"),
        ([*pred, str(tmp_path / "none.json")], "no such input file"),
        ([*pred, str(tmp_path / "huge.json")], "'obs' contains a number too large"),
        ([*pred, str(tmp_path / "big.json")], "or a number too large"),
        (["convert", str(ckpt), str(tmp_path / "x.bin")], "must end in .safetensors or .pt"),
        (["info"], "the following arguments are required"),
        (["eval", "--checkpoint", str(ckpt), "--tasks", "cartpole-balance", "--device", "gpu9"],
         "unknown device 'gpu9'"),
        (["eval", "--checkpoint", str(ckpt), "--tasks", ""], "no task given"),  # not all 30
        (["eval", "--checkpoint", str(ckpt), "--tasks", "cartpole-balance", "temperature=nan"],
         "temperature='nan': expected a finite number"),
        # outputs refused before any work: a folder where a file goes, a file as a folder
        (["predict", "--checkpoint", str(ckpt), "--input", str(tmp_path / "task.json"),
          "--output", str(tmp_path)], "is a folder; give a file name"),
        (["convert", str(ckpt), str(tmp_path / "text.pt" / "m.safetensors")],
         "text.pt is a file, not a folder"),
        (["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "text.pt")],
         "is a file; give a folder"),
        (["eval", "--checkpoint", str(ckpt), "--tasks", "cartpole-balance", "--json",
          str(tmp_path)], "is a folder; give a file name"),
        (["export", "--checkpoint", str(ckpt), "--out", ""], "an empty path"),
        (["report-quant", "--out", ""], "an empty path"),
        (["bench", "planner", "--checkpoint", str(ckpt), "--threads", "100000"],
         "at most 256, got 100000"),  # PyTorch's thread pool segfaulted
        (["report-quant", "--threads", "100000"], "at most 256"),
        (["bench", "planner", "--checkpoint", str(ckpt), "--batch", ","],
         "expected comma-separated numbers"),
        (["bench", "planner", "--checkpoint", str(ckpt), "--precision", ","],
         "names no precision"),
        (["bench", "planner", "--checkpoint", str(ckpt), "--literal-calls", "-1"],
         "must be 0 or more"),
        (["plot", str(tmp_path), "--out", str(tmp_path / "a.png")], "is a folder; give the JSON"),
        (["plot", str(tmp_path / "notjson.json"), "--out", str(tmp_path / "a.json")],
         "name an image file"),
        *([] if torch.cuda.is_available() else [
            (["bench", "planner", "--checkpoint", str(ckpt), "--device", "cuda"], "use cpu")]),
    ]


def test_bad_input_gives_one_line_and_exit_2(fp16_ckpt, tmp_path, capsys):
    for argv, message in _bad_inputs(tmp_path, fp16_ckpt):
        code, _, err = _run(argv, capsys)
        assert code == 2, argv
        assert message in err, (argv, err)
        assert len(err.strip().splitlines()) == 1, err
        assert "Traceback" not in err


def test_bad_products_setting_refused_before_work(fp16_ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TDMPC_OPT_PRODUCTS", "fastest")
    out = tmp_path / "r.json"
    code, _, err = _run(["bench", "planner", "--checkpoint", str(fp16_ckpt), "--json", str(out)],
                        capsys)
    assert code == 2 and "Traceback" not in err and not out.exists()
    assert err.strip().splitlines() == ["error: TDMPC_OPT_PRODUCTS must be one of native, "
                                        "kernel, float (or unset), got 'fastest'"]


def test_console_script_runs_as_a_process(fp16_ckpt, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tdmpc_opt", "info", str(tmp_path / "x.pt")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path / 'x.pt'}: no such file"]
    help_ = subprocess.run([sys.executable, "-m", "tdmpc_opt", "--help"], capture_output=True,
                           text=True, timeout=120)
    assert help_.returncode == 0 and "eval" in help_.stdout and "predict" in help_.stdout


@pytest.mark.parametrize("raised,code,first_line", [
    (FileNotFoundError(2, "No such file or directory", "/proc/x"), 2,
     "error: No such file or directory: /proc/x"),
    (RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 81604378624 bytes"), 2, "error: out of memory; try a smaller"),
    (MemoryError(), 2, "error: out of memory; try a smaller"),
    (KeyboardInterrupt(), 130, "interrupted; finished work is saved"),
])
def test_machine_failures_are_one_line(monkeypatch, capsys, raised, code, first_line):
    """Failures of the machine rather than the code: one line, no traceback."""
    from tdmpc_opt.cli import info

    def fail(args):
        raise raised

    monkeypatch.setattr(info, "run", fail)
    got, _, err = _run(["info", "x.pt"], capsys)
    assert got == code and len(err.strip().splitlines()) == 1
    assert err.startswith(first_line), err


def test_command_sets_its_own_interrupt_note_and_bugs_keep_tracebacks(monkeypatch, capsys):
    from tdmpc_opt.cli import info

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    monkeypatch.setattr(info, "INTERRUPTED", "interrupted; nothing was written", raising=False)
    assert _run(["info", "x.pt"], capsys)[::2] == (130, "interrupted; nothing was written\n")

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(info, "run", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["info", "x.pt"])


def test_the_command_line_starts_without_pytorch_and_a_stop_meanwhile_is_one_line(
        monkeypatch, capsys):
    """``--help``, ``--version`` and argument errors need no PyTorch (0.1 s instead of ~2 s);
    Ctrl-C while the command line is still being set up is the same one line as later."""
    probe = ("import sys\nfrom tdmpc_opt.cli import main\ncodes = []\n"
             "for argv in (['--version'], ['--help'], ['info'], ['eval', '--checkpoint', "
             "'x.pt', '--tasks', 'walker-walk', '--seed', 'one']):\n"
             "    try:\n        main(argv)\n"
             "    except SystemExit as e:\n        codes.append(e.code)\n"
             "print(codes, 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 2, 2] False", done.stderr
    import tdmpc_opt.cli as cli

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert _run(["info", "x.pt"], capsys)[::2] == (130, cli.INTERRUPTED + "\n")


_STOP_INSIDE_TORCHS_IMPORT = """
import os, signal, sys
kicked = []
class Kick:  # sends SIGTERM as torch's C start-up imports NumPy
    def find_spec(self, name, path=None, target=None):
        if name == "numpy._core" and not kicked:
            kicked.append(name)
            os.kill(os.getpid(), signal.SIGTERM)
def stop(signum, frame):
    raise KeyboardInterrupt
sys.meta_path.insert(0, Kick())
signal.signal(signal.SIGTERM, stop)
from tdmpc_opt.cli import _import_torch_whole
try:
    _import_torch_whole()
    print("not stopped")
except KeyboardInterrupt:
    import numpy
    print("stopped", kicked, "torch" in sys.modules, hasattr(numpy, "matrix"))
"""


def test_a_stop_while_torch_is_imported_acts_after_the_import():
    """Torch's C start-up swallows an exception raised while it imports NumPy (a stop there
    once left a half-imported NumPy and a RecursionError traceback): the command line holds
    Ctrl-C / SIGTERM back until torch is imported, then acts on them."""
    done = subprocess.run([sys.executable, "-c", _STOP_INSIDE_TORCHS_IMPORT],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "stopped ['numpy._core'] True True", done.stderr[-2000:]


def test_sigterm_is_handled_as_ctrl_c_and_then_restored(monkeypatch, capsys, tmp_path):
    """SIGTERM during a command runs the command's Ctrl-C clean-up (its ``finally`` blocks) and
    exits 143 with its note; a second SIGTERM meanwhile is ignored; afterwards SIGTERM is back
    to the default."""
    import os
    import signal
    import time

    from tdmpc_opt.cli import info

    cleaned = tmp_path / "cleaned"

    def terminated(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # ignored during the clean-up
            cleaned.touch()

    monkeypatch.setattr(info, "run", terminated)
    started = time.monotonic()
    assert _run(["info", "x.pt"], capsys)[::2] == (143, f"{INTERRUPTED}\n")
    assert cleaned.exists() and time.monotonic() - started < 4
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_closed_stdout_pipe_ends_quietly(fp16_ckpt):
    """``tdmpc-opt info ... | head -1`` where the reader has gone before the output comes
    (``true`` reads nothing): exit 141 without a BrokenPipeError traceback."""
    cmd = f"{sys.executable} -m tdmpc_opt info {fp16_ckpt} | true"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 141, proc.stderr
    assert proc.stderr == ""
