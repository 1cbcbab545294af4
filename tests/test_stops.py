"""Stop signals: held back over a block, acted on after it; SIGHUP is a stop like SIGTERM."""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import termios
import time

import pytest

from conftest import DropsAnInterrupt
from tdmpc_opt import stops


@pytest.mark.parametrize("sig", stops.STOP_SIGNALS)
def test_a_stop_waits_for_the_block_but_a_second_one_acts_at_once(sig):
    from tdmpc_opt.cli import _stops_as_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt), _stops_as_interrupt(), stops.finish_first():
        signal.raise_signal(sig)
        done.append("finished")  # the block goes on; the stop comes at its end
    assert done == ["finished"]
    with pytest.raises(KeyboardInterrupt), _stops_as_interrupt(), stops.finish_first():
        signal.raise_signal(sig)
        signal.raise_signal(sig)  # asked again: at once
        done.append("not reached")
    assert done == ["finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.getsignal(signal.SIGHUP) is signal.SIG_DFL


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_stop_dropped_inside_a_del_is_raised_again():
    with stops.noted() as seen:
        stops.raise_noted(seen)  # nothing seen: nothing raised
        DropsAnInterrupt()  # its KeyboardInterrupt is printed and dropped by Python
        assert seen == [signal.SIGINT]
        with pytest.raises(KeyboardInterrupt):
            stops.raise_noted(seen)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sighup_exits_129_and_nohup_keeps_it_ignored(monkeypatch, capsys):
    from tdmpc_opt.cli import info, main

    def hang_up(args):
        signal.raise_signal(signal.SIGHUP)
        time.sleep(5)  # not reached: the terminal's hang-up stops the command

    monkeypatch.setattr(info, "run", hang_up)
    assert main(["info", "x.pt"]) == 129
    assert capsys.readouterr().err.startswith("interrupted")
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # started under nohup: keep running
    monkeypatch.setattr(info, "run", lambda args: signal.raise_signal(signal.SIGHUP) or 0)
    assert main(["info", "x.pt"]) == 0
    assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN


def _own_terminal():
    """Child side: a new session whose controlling terminal is its stdin (a pty)."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.skipif(not hasattr(termios, "TIOCSCTTY"), reason="needs POSIX pseudo-terminals")
def test_closing_the_terminal_keeps_the_finished_updates(tmp_path):
    """Training in a terminal that goes away (an SSH connection dropped): the kernel hangs up,
    the command gets SIGHUP, checkpoints the updates it finished and exits 129 -- before, the
    process died at once and kept nothing since its last periodic checkpoint (50,000 updates by
    default)."""
    from tdmpc_opt.config import model_config_for
    from test_training import tiny_dataset

    cfg = model_config_for(("walker-walk", "cartpole-balance", "pendulum-spin"), None,
                           enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2,
                           simnorm_dim=8)
    tiny_dataset(tmp_path / "ds", cfg)
    run = tmp_path / "run"
    master, slave = os.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tdmpc_opt", "train", "--data", str(tmp_path / "ds"),
         "--run-dir", str(run), "steps=100000", "checkpoint_freq=50000", "eval_freq=0",
         "log_freq=5", "batch_size=8", "enc_dim=32", "mlp_dim=32", "latent_dim=16", "num_q=2",
         "threads=1"],
        stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        preexec_fn=_own_terminal)
    os.close(slave)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (
                (run / "train.csv").exists() and len((run / "train.csv").read_text().split()) > 3):
            if select.select([master], [], [], 0.2)[0]:
                os.read(master, 65536)  # keep the terminal's buffer from filling up
        assert (run / "train.csv").exists(), "training did not start"
    finally:
        os.close(master)  # the terminal goes away
    assert proc.wait(timeout=60) == 129
    kept = sorted((run / "checkpoints").glob("step-*.pt"))
    assert len(kept) == 1 and int(kept[0].stem.split("-")[1]) >= 15
