"""Rollout backends: worker processes and Ray give the in-process returns (and collected
datasets), once per episode."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import random_model
from tdmpc_opt import cpu_kernels
from tdmpc_opt.backends import FAULT_ENV, episode_cost, make_chunks, run_rollouts
from tdmpc_opt.checkpoints import save_checkpoint
from tdmpc_opt.cli import main
from tdmpc_opt.errors import ConfigError
from tdmpc_opt.evaluation import episode_specs
from tdmpc_opt.quantization import load_fast_agent
from tdmpc_opt.tasks import TASK_SETS
from tdmpc_opt.world_model import WorldModel

TASKS = ("walker-walk", "cartpole-balance", "pendulum-swingup")
STEPS = 5


def _tiny_checkpoint(folder, name: str, make_model) -> str:
    """``make_model(cfg)`` for a tiny three-task config (torch seeded), saved as safetensors."""
    import torch

    from tdmpc_opt.config import model_config_for

    torch.manual_seed(0)
    cfg = model_config_for(TASKS, None, enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8,
                           num_q=2, simnorm_dim=8)
    path = folder / name
    save_checkpoint(path, make_model(cfg))
    return str(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny three-task model saved as a safetensors checkpoint."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny.safetensors", WorldModel)


@pytest.fixture(scope="module")
def specs():
    return episode_specs(TASKS, 3, seed=5)


@pytest.fixture(scope="module")
def reference(ckpt, specs):
    """Per-episode returns in this process, one batch of 4 at a time."""
    from tdmpc_opt.config import PlannerConfig

    planner = PlannerConfig(iterations=2, num_samples=32, num_elites=8, num_pi_trajs=4)
    results = run_rollouts(ckpt, planner, specs, batch_size=4, max_steps=STEPS)
    return planner, [(r.task, r.episode, r.episode_return, r.length) for r in results]


def _rows(results):
    return [(r.task, r.episode, r.episode_return, r.length) for r in results]


@pytest.fixture(scope="module")
def ray_instance():
    """One local Ray instance (2 CPUs) shared by this module's Ray tests."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_chunks_cover_specs_in_order_and_balance_steps(specs):
    chunks = make_chunks(specs, batch_size=4, workers=2)  # 9 equal episodes
    assert [s for c in chunks for s in c] == specs and [len(c) for c in chunks] == [3, 3, 3]
    assert len(make_chunks(specs[:4], batch_size=16, workers=4)) == 4
    assert make_chunks(specs, 4, 2) == make_chunks(list(specs), 4, 2)  # deterministic
    mt80 = episode_specs(TASK_SETS["mt80"], 10, 1)  # 500-step and 100-step episodes
    chunks = make_chunks(mt80, batch_size=16, workers=64)
    steps = [sum(episode_cost(s) for s in c) for c in chunks]
    assert max(map(len, chunks)) == 16 and max(steps) <= 3500


def test_local_worker_processes_match_in_process(ckpt, specs, reference):
    planner, expected = reference
    streamed = []
    results = run_rollouts(ckpt, planner, specs, workers=2, batch_size=2, max_steps=STEPS,
                           on_result=streamed.append)
    assert _rows(results) == expected
    assert sorted(_rows(streamed)) == sorted(expected)


def test_local_worker_death_is_retried(ckpt, specs, reference, tmp_path, monkeypatch):
    planner, expected = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")
    streamed = []
    results = run_rollouts(ckpt, planner, specs, workers=2, batch_size=3, max_steps=STEPS,
                           on_result=streamed.append)
    assert marker.exists() and _rows(results) == expected
    assert sorted(_rows(streamed)) == sorted(expected)


@pytest.fixture(scope="module")
def random_ckpt(tmp_path_factory):
    """The tiny model with random weights everywhere (a fresh model's zero heads tie all
    values, so every precision plans the same actions)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), "random.safetensors", random_model)


def _eval_returns(ckpt, out, *extra) -> dict:
    args = ["eval", "--checkpoint", ckpt, "--tasks", "cartpole-balance,walker-walk",
            "--episodes", "2", "--max-steps", "10", "--json", str(out), "--quiet",
            "iterations=2", "num_samples=32", "num_elites=8", "num_pi_trajs=4", *extra]
    assert main(args) == 0
    result = json.loads(out.read_text())
    return {t: v["returns"] for t, v in result["tasks"].items()}


def test_eval_workers_plan_in_the_precision_asked_for(random_ckpt, tmp_path):
    """``--precision`` reaches worker processes (they used to plan in the file's own runtime
    while the results said otherwise)."""
    fp32 = _eval_returns(random_ckpt, tmp_path / "fp32.json")
    int8 = _eval_returns(random_ckpt, tmp_path / "int8.json", "--precision", "int8")
    assert int8 != fp32  # the precision matters for these episodes
    workers = _eval_returns(random_ckpt, tmp_path / "w.json", "--precision", "int8",
                            "--workers", "2")
    assert workers == int8
    assert json.loads((tmp_path / "w.json").read_text())["runtime"] == "int8"


@pytest.mark.skipif(not cpu_kernels.available(), reason="the fused CPU kernel does not build here")
def test_a_worker_computing_the_layers_otherwise_is_refused(ckpt, tmp_path, monkeypatch, capsys):
    """A worker process where the fused kernel does not load would plan int8 with another code
    scheme: the evaluation stops with one line instead of mixing the two in its results."""
    here = load_fast_agent(ckpt, "int8").layers  # this process: the kernel, loaded
    monkeypatch.setenv("TDMPC_OPT_NO_CPU_KERNELS", "1")  # seen by spawned workers only
    out = tmp_path / "r.json"
    args = ["eval", "--checkpoint", ckpt, "--tasks", "cartpole-balance", "--episodes", "1",
            "--max-steps", "2", "--json", str(out), "--quiet", "--precision", "int8",
            "--workers", "2", "iterations=1", "num_samples=16", "num_elites=4",
            "num_pi_trajs=2"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"the run with {here!r}" in err and "disabled by TDMPC_OPT_NO_CPU_KERNELS" in err
    assert "PyTorch ops" in err and not out.exists()


def test_ray_matches_local(ray_instance, ckpt, specs, reference):
    planner, expected = reference
    steps = []
    results = run_rollouts(ckpt, planner, specs, backend="ray", batch_size=4, max_steps=STEPS,
                           on_step=steps.append)
    assert _rows(results) == expected and sum(steps) == len(specs) * STEPS


def test_ray_worker_killed_mid_chunk_yields_every_episode_once(ray_instance, ckpt, specs,
                                                               reference, tmp_path,
                                                               monkeypatch):
    planner, expected = reference
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"0:{marker}")
    streamed = []
    results = run_rollouts(ckpt, planner, specs, backend="ray", workers=2, batch_size=4,
                           max_steps=STEPS, on_result=streamed.append)
    assert marker.exists()  # the first attempt of chunk 0 ran half its episodes and died
    assert _rows(results) == expected
    assert sorted(_rows(streamed)) == sorted(expected)  # each episode reported exactly once


def test_eval_cli_ray_backend_and_resume(ray_instance, ckpt, tmp_path, capsys):
    out = tmp_path / "r.json"
    args = ["eval", "--checkpoint", ckpt, "--tasks", "cartpole-balance,walker-walk",
            "--episodes", "2", "--max-steps", "3", "--json", str(out), "--quiet",
            "--backend", "ray", "--batch-size", "1", "iterations=1", "num_samples=16",
            "num_elites=4", "num_pi_trajs=2"]
    assert main(args) == 0
    ray_result = json.loads(out.read_text())
    assert len(out.with_name("r.json.episodes.jsonl").read_text().splitlines()) == 1 + 4
    assert main(args) == 0 and "resuming: 4 of 4" in capsys.readouterr().out
    local = tmp_path / "l.json"
    i = args.index("--backend")
    assert main(args[:i] + args[i + 2:] + ["--json", str(local)]) == 0
    assert json.loads(local.read_text())["tasks"] == ray_result["tasks"]


def test_missing_ray_is_one_clear_line(ckpt, specs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ConfigError, match=r"pip install 'tdmpc-opt\[ray\]'"):
        run_rollouts(ckpt, None, specs, backend="ray")
    assert main(["eval", "--checkpoint", ckpt, "--tasks", "cartpole-balance", "--backend",
                 "ray", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "install the ray extra" in err and len(err.splitlines()) == 1


def test_unreachable_ray_address_fails_fast():
    from tdmpc_opt.backends import _check_reachable

    with pytest.raises(ConnectionError, match="nothing answers at 127.0.0.1:1"):
        _check_reachable("127.0.0.1:1")
    _check_reachable("auto")  # left to Ray


def test_bad_backend_options_are_config_errors(ckpt, specs):
    with pytest.raises(ConfigError, match="unknown backend"):
        run_rollouts(ckpt, None, specs, backend="dask")
    with pytest.raises(ConfigError, match="needs the ray backend"):
        run_rollouts(ckpt, None, specs, ray_address="auto")


# ------------------------------------------------------------------------ collect on backends
COLLECT = ["--tasks", "walker-walk,cartpole-balance", "--episodes", "3", "--max-steps", "4",
           "--explore", "--action-noise", "0.3", "--seed", "3"]


def _dataset(path):
    """Every file of a dataset directory: arrays and meta.json."""
    files = {f.name: np.load(f) for f in sorted(path.glob("*.npy"))}
    return dict(files, meta=json.loads((path / "meta.json").read_text()))


def _assert_same_dataset(got, want):
    assert got.keys() == want.keys()
    for name in want:  # NaN (step 0's action and reward) equals NaN here
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def _collect(ckpt, out, *extra):
    assert main(["collect", "--checkpoint", ckpt, "--out", str(out), *COLLECT, *extra]) == 0
    return _dataset(out)


@pytest.fixture(scope="module")
def collected(ckpt, tmp_path_factory):
    """The dataset collected in this process, 4 episodes per batched call."""
    return _collect(ckpt, tmp_path_factory.mktemp("collect") / "ref", "--batch", "4")


def test_collected_dataset_is_ordered_and_batch_invariant(ckpt, collected, tmp_path):
    from tdmpc_opt.agent import load_agent
    from tdmpc_opt.cli.collect import collect_episodes
    from tdmpc_opt.data import DatasetWriter

    eps, action = collected["episodes.npy"], collected["action.npy"]
    assert eps[:, 2].tolist() == [0, 0, 0, 1, 1, 1] and (eps[:, 1] == 5).all()  # task order
    assert np.isnan(action[eps[:, 0]]).all()
    cart = np.concatenate([action[s + 1:s + n] for s, n, _ in eps[3:]])
    assert (cart[:, 1:] == 0).all() and (np.abs(cart[:, 0]) <= 1).all()  # noise: own dims
    agent = load_agent(ckpt)  # the library function, one episode per batch, same dataset
    with DatasetWriter(tmp_path / "b1", agent.cfg.tasks, agent.cfg.obs_dim,
                       agent.cfg.action_dim, source="collected with tiny.safetensors") as w:
        n = collect_episodes(agent, ("walker-walk", "cartpole-balance"), 3, w, seed=3,
                             explore=True, action_noise=0.3, batch=1, max_steps=4)
        w.close()
    assert n == 24
    _assert_same_dataset(_dataset(tmp_path / "b1"), collected)


def test_collect_local_workers_with_a_killed_worker(ckpt, collected, tmp_path, monkeypatch,
                                                    capsys):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"1:{marker}")  # chunk 1 runs half its episodes and dies
    got = _collect(ckpt, tmp_path / "w2", "--workers", "2", "--batch", "2")
    assert marker.exists() and "6 episodes, 24 transitions" in capsys.readouterr().out
    _assert_same_dataset(got, collected)  # every episode once, in order, same numbers


@pytest.mark.skipif(not cpu_kernels.available(), reason="the fused CPU kernel does not build here")
def test_collect_refuses_workers_and_episodes_planned_with_other_layers(ckpt, tmp_path,
                                                                         monkeypatch, capsys):
    """An MPPI collection's episodes come from one way of computing the layers: workers where
    the fused kernel does not load, and episodes kept by such a process, are refused."""
    from tdmpc_opt.cli.collect import EpisodeStore
    from tdmpc_opt.config import PlannerConfig

    here = load_fast_agent(ckpt, planner=PlannerConfig()).layers
    with monkeypatch.context() as m:
        m.setenv("TDMPC_OPT_NO_CPU_KERNELS", "1")  # seen by the spawned workers only
        capsys.readouterr()
        assert main(["collect", "--checkpoint", ckpt, "--out", str(tmp_path / "w"), *COLLECT,
                     "--workers", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"the run with {here!r}" in err, err
    out = tmp_path / "d"
    common = dict(seed=3, mpc=True, explore=True, action_noise=0.3, max_steps=4)
    EpisodeStore.for_output(out, ckpt, **common, layers="fp32 on cpu: PyTorch ops")
    assert main(["collect", "--checkpoint", ckpt, "--out", str(out), *COLLECT]) == 2
    assert "made with other settings (layers)" in capsys.readouterr().err
    EpisodeStore.for_output(tmp_path / "e", ckpt, **common, layers=here)  # the same: accepted
    assert main(["collect", "--checkpoint", ckpt, "--out", str(tmp_path / "e"), *COLLECT]) == 0


def test_collect_ray_with_a_killed_worker(ray_instance, ckpt, collected, tmp_path,
                                          monkeypatch):
    marker = tmp_path / "killed"
    monkeypatch.setenv(FAULT_ENV, f"0:{marker}")
    got = _collect(ckpt, tmp_path / "ray", "--backend", "ray", "--batch", "3")
    assert marker.exists()
    _assert_same_dataset(got, collected)


def test_collect_bad_backend_options_are_one_line(ckpt, tmp_path, monkeypatch, capsys):
    base = ["collect", "--checkpoint", ckpt, "--out", str(tmp_path / "x"), *COLLECT]
    assert main([*base, "--ray-address", "auto"]) == 2
    assert capsys.readouterr().err.strip() == "error: --ray-address needs --backend ray"
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main([*base, "--backend", "ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert "install the ray extra" in err and len(err.splitlines()) == 1
    assert main([*base[:2], str(tmp_path / "nope.pt"), *base[3:]]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_collect_refuses_a_bad_noise_list_in_one_line(ckpt, tmp_path, capsys):
    base = ["collect", "--checkpoint", ckpt, "--out", str(tmp_path / "x"), "--tasks",
            "cartpole-balance", "--episodes", "2", "--max-steps", "3"]
    for bad in ("0.3,-1", "0.3,,1", "0.3,nan"):
        with pytest.raises(SystemExit) as exit_:  # argparse's own exit, status 2
            main([*base, "--action-noise", bad])
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--action-noise" in err, err
    assert not (tmp_path / "x").exists()
    assert main([*base, "--action-noise", "0,0.5"]) == 0  # a good list collects
    assert (tmp_path / "x" / "meta.json").is_file()


def test_starting_ray_keeps_the_callers_sigterm_handling():
    """``ray.init`` makes SIGTERM call sys.exit (exit 15, no clean-up note); the CLI's handling
    (as Ctrl-C) is put back once Ray is up."""
    import signal
    from types import SimpleNamespace

    from tdmpc_opt.backends import _connect
    from tdmpc_opt.cli import _stops_as_interrupt

    def init(**kwargs):  # what ray.init does to SIGTERM in the driver
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    fake_ray = SimpleNamespace(is_initialized=lambda: False, init=init)
    with _stops_as_interrupt():
        ours = signal.getsignal(signal.SIGTERM)
        assert _connect(fake_ray, None, 1) is True
        assert signal.getsignal(signal.SIGTERM) is ours
