"""Multi-process training on the CPU (gloo): two ranks stay identical, match one process on the
union of their batches, resume exactly, and the torchrun-launched command writes once."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from tdmpc_opt import distributed
from tdmpc_opt.config import model_config_for
from tdmpc_opt.errors import ConfigError
from tdmpc_opt.replay import SequenceSampler
from tdmpc_opt.runs import RunDir
from tdmpc_opt.trainer import build_learner, train_offline
from tdmpc_opt.training import Batch, TrainConfig

WORLD, B, UPDATES = 2, 16, 4
TASKS = ("walker-walk", "cartpole-balance", "pendulum-swingup")
TRAIN = TrainConfig(batch_size=B, steps=6, checkpoint_freq=3, log_freq=1, eval_freq=0, seed=5)


def _model_cfg(dropout: float = 0.01):
    return model_config_for(TASKS, None, enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8,
                            num_q=2, simnorm_dim=8, dropout=dropout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sampler(ds, cfg: TrainConfig) -> SequenceSampler:
    """A rank's sampler, as the train command builds it."""
    return SequenceSampler(ds, distributed.local_batch(cfg.batch_size), cfg.horizon,
                           seed=distributed.rank_seed(cfg.seed), task_map=np.arange(3))


def _offline(ds, run: Path, cfg: TrainConfig, resume: bool = False) -> dict:
    learner = build_learner(_model_cfg(), cfg)
    train_offline(learner, _sampler(ds, cfg), RunDir(run), resume=resume)
    return learner.state_dict()


# ------------------------------------------------------------------ what each rank runs
def _learner():
    """A learner whose Q values spread over more than 1 (so the running scale moves) and whose
    task embeddings are longer than 1 (so they are renormalised); dropout off, so the model
    losses of a first update do not depend on random numbers."""
    learner = build_learner(_model_cfg(dropout=0.0), TRAIN)
    torch.nn.init.normal_(learner.model._Qs.params[-1].weight, std=1.0)
    with torch.no_grad():
        learner.model._task_emb.weight.mul_(100)
    return learner


def _updates(ds) -> dict:
    """UPDATES learner updates on this rank's shards."""
    learner = _learner()
    torch.manual_seed(distributed.rank_seed(TRAIN.seed))
    sampler = _sampler(ds, TRAIN)
    batches, metrics = [], []
    for _ in range(UPDATES):
        batch = sampler.sample()
        batches.append(batch)
        metrics.append(learner.update(batch))
    return {"batches": batches, "metrics": metrics, "state": learner.state_dict()}


def _one_task_each(rank: int) -> dict:
    """An update where rank r's rows are all of task 2r: both renormalise rows 0 and 2."""
    learner, b = _learner(), B // WORLD
    mc, g = learner.model.cfg, torch.Generator().manual_seed(rank)
    batch = Batch(torch.randn(4, b, mc.obs_dim, generator=g),
                  torch.rand(3, b, mc.action_dim, generator=g) * 2 - 1,
                  torch.rand(3, b, 1, generator=g), torch.zeros(3, b, 1),
                  torch.full((b,), 2 * rank))
    learner.update(batch)
    return learner.state_dict()


def _distill(ds) -> dict:
    """A live-teacher distillation with the latent term (its projection is averaged too)."""
    from tdmpc_opt import distill_trainer
    from tdmpc_opt.distillation import DistillConfig, Distiller
    from tdmpc_opt.world_model import WorldModel

    made = []

    class Recording(Distiller):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    distill_trainer.Distiller = Recording
    torch.manual_seed(11)
    teacher = WorldModel(_model_cfg()).eval().requires_grad_(False)
    learner = build_learner(_model_cfg(), dataclasses.replace(TRAIN, steps=3))
    dcfg = DistillConfig(reward_coef=0.45, latent_coef=0.5)
    distill_trainer.distill_offline(learner, teacher, "sha", ds, np.arange(3), dcfg, None)
    return {"student": learner.model.state_dict(),
            "projection": made[0].projection.state_dict()}


def _collectives(rank: int) -> dict:
    """The helpers on known per-rank values."""
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.full((3,), float(rank + 1))
    q = torch.nn.Parameter(torch.zeros(2))  # no gradient: left alone
    distributed.all_reduce_grads([p, q])
    return {"grad": p.grad, "no_grad": q.grad,
            "rows": distributed.gather_rows(torch.tensor([[rank], [10 + rank]])),
            "union": distributed.union_ids(torch.tensor([0, 0]) if rank == 0 else
                                           torch.tensor([3]), 5),
            "mean": distributed.average(torch.tensor([2.0 * rank, 1.0])),
            "objects": distributed.all_gather_object({"rank": rank}),
            "broadcast": distributed.broadcast_object(f"from {rank}")}


def _interrupted_on_one_rank(ds, run: Path) -> dict:
    """Ctrl-C on rank 1 alone, during its second update (the next checkpoint is due at 3)."""
    import signal

    learner, sampler = build_learner(_model_cfg(), TRAIN), _sampler(ds, TRAIN)
    draw, calls = sampler.sample, []

    def sample():
        calls.append(1)
        if distributed.rank() == 1 and len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return draw()

    sampler.sample = sample
    try:
        train_offline(learner, sampler, RunDir(run))
        stopped = None
    except KeyboardInterrupt:
        stopped = len(calls)
    distributed.barrier()  # rank 0 has written what it keeps
    kept = sorted(p.name for p in RunDir(run).ckpt_dir.glob("step-*.pt"))
    return {"stopped_after": stopped, "kept": kept,
            "resumed": _offline(ds, run, TRAIN, resume=True)}


def _with_evaluation(ds, run: Path) -> dict:
    """Periodic evaluation every 2 updates: rank 0 evaluates while the others wait for it."""
    calls = []
    learner = build_learner(_model_cfg(), dataclasses.replace(TRAIN, eval_freq=2))
    train_offline(learner, _sampler(ds, TRAIN), RunDir(run),
                  evaluate=lambda model: calls.append(1) or {"score": 1.0})
    return {"calls": len(calls), "state": learner.state_dict()}


def _worker(rank: int, world: int, root: str, port: int) -> None:
    from tdmpc_opt.data import Dataset

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    device = distributed.init(distributed.detect(), "cpu")
    assert device == torch.device("cpu") and distributed.world_size() == world
    root_p = Path(root)
    try:
        ds = Dataset(root_p / "ds")
        out = {"collectives": _collectives(rank), "updates": _updates(ds),
               "one_task_each": _one_task_each(rank)}
        out["straight"] = _offline(ds, root_p / "a", TRAIN)
        # "killed" after 4 updates, before the step-4 checkpoint was saved; then resumed
        _offline(ds, root_p / "b", dataclasses.replace(TRAIN, steps=4))
        if distributed.is_main():
            RunDir(root_p / "b").checkpoint_path(4).unlink()
        distributed.barrier()
        out["resumed"] = _offline(ds, root_p / "b", TRAIN, resume=True)
        out["interrupted"] = _interrupted_on_one_rank(ds, root_p / "c")
        out["evaluated"] = _with_evaluation(ds, root_p / "d")
        out["distill"] = _distill(ds)
        torch.save(out, root_p / f"rank{rank}.pt")
    finally:
        distributed.destroy()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run every scenario once on two gloo processes; each rank's results."""
    from test_training import tiny_dataset

    root = tmp_path_factory.mktemp("ddp")
    tiny_dataset(root / "ds", _model_cfg(), episodes=8)
    mp.spawn(_worker, args=(WORLD, str(root), _free_port()), nprocs=WORLD, join=True)
    return root, [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _assert_same(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# --------------------------------------------------------------------------------- tests
def test_ranks_keep_identical_parameters(ranks):
    root, (r0, r1) = ranks
    # model, both optimizers, running scale, step, pending task-embedding gradient
    _assert_same(r0["straight"], r1["straight"])
    _assert_same(r0["updates"]["state"], r1["updates"]["state"])
    _assert_same(r0["updates"]["metrics"], r1["updates"]["metrics"])  # means over ranks
    _assert_same(r0["one_task_each"], r1["one_task_each"])
    _assert_same(r0["distill"], r1["distill"])
    assert r0["straight"]["step"] == TRAIN.steps
    assert all(m["pi_scale"] > 1.5 for m in r0["updates"]["metrics"])  # the scale moved
    # the ranks drew different rows
    assert not torch.equal(r0["updates"]["batches"][0].obs, r1["updates"]["batches"][0].obs)
    # rank 0 alone wrote: one metrics row per step, every rank's random states saved
    steps = [int(r.split(",")[0]) for r in (root / "a" / "train.csv").read_text().split()[1:]]
    assert steps == list(range(1, TRAIN.steps + 1))
    state = torch.load(RunDir(root / "a").checkpoint_path(6), weights_only=True)
    assert len(state["ranks"]) == WORLD
    assert state["ranks"][0]["sampler"] != state["ranks"][1]["sampler"]


def test_collectives(ranks):
    _, results = ranks
    for r in results:
        c = r["collectives"]
        assert torch.equal(c["grad"], torch.full((3,), 1.5)) and c["no_grad"] is None
        assert c["rows"].flatten().tolist() == [0, 10, 1, 11]
        assert c["union"].tolist() == [0, 3]
        assert torch.equal(c["mean"], torch.tensor([1.0, 1.0]))
        assert c["objects"] == [{"rank": 0}, {"rank": 1}] and c["broadcast"] == "from 0"


def _union(batches: list[Batch]) -> Batch:
    return Batch(*(torch.cat(parts, dim=0 if i == 4 else 1)
                   for i, parts in enumerate(zip(*batches, strict=True))))


def test_two_processes_match_one_process_on_the_global_batch(ranks):
    _, (r0, r1) = ranks
    learner = _learner()
    got = r0["updates"]["metrics"]
    for i in range(UPDATES):
        union = _union([r0["updates"]["batches"][i], r1["updates"]["batches"][i]])
        assert union.obs.shape[1] == B
        want = learner.update(union)
        if i == 0:  # same parameters, same rows, no random numbers: the same losses
            for k in ("consistency_loss", "reward_loss"):
                assert got[i][k] == pytest.approx(want[k], rel=1e-5, abs=1e-7), k
        # the TD target's and the policy's noise differ: losses close, not equal
        for k in ("consistency_loss", "reward_loss", "value_loss", "total_loss"):
            assert got[i][k] == pytest.approx(want[k], rel=0.02), (i, k)


def test_resume_equals_uninterrupted(ranks):
    root, results = ranks
    for r in results:
        _assert_same(r["straight"], r["resumed"])
    steps = [int(r.split(",")[0]) for r in (root / "b" / "train.csv").read_text().split()[1:]]
    assert steps == list(range(1, TRAIN.steps + 1))


def test_rank_0_evaluates_alone_and_the_run_is_unchanged(ranks):
    root, results = ranks
    assert [r["evaluated"]["calls"] for r in results] == [3, 0]  # updates 2, 4 and 6
    for r in results:
        _assert_same(r["straight"], r["evaluated"]["state"])
    rows = (root / "d" / "eval.csv").read_text().split()
    assert [int(r.split(",")[0]) for r in rows[1:]] == [2, 4, 6]


def test_an_interrupt_on_one_rank_stops_every_rank_after_the_same_update(ranks):
    """Both ranks finish update 2, checkpoint it together (no checkpoint was due) and stop;
    resumed, the run equals an uninterrupted one on every rank."""
    _, results = ranks
    for r in results:
        assert r["interrupted"]["stopped_after"] == 2
        assert r["interrupted"]["kept"] == ["step-00000002.pt"]
        _assert_same(r["straight"], r["interrupted"]["resumed"])


def _slow_main(rank: int, port: int, wait: str, out: str) -> None:
    """Rank 0 works alone for 4 s while the others wait, with a 1.5 s collective timeout."""
    import time

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    Path(out, f"started{rank}").touch()  # join together: the timeout also bounds the joining
    deadline = time.monotonic() + 60
    while not Path(out, f"started{1 - rank}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    distributed.init(distributed.detect(), "cpu", timeout_s=1.5)
    try:
        if rank == 0:
            time.sleep(4)
        try:
            getattr(distributed, wait)()
            result = "waited"
        except RuntimeError as e:  # gloo's timeout
            result = f"failed: {str(e)[:80]}"
        Path(out, f"rank{rank}").write_text(result)
    finally:
        distributed.destroy()


@pytest.mark.parametrize("wait,waited", [("wait_for_main", True), ("barrier", False)])
def test_waiting_for_rank_0s_own_work_outlasts_the_collective_timeout(tmp_path, wait, waited):
    """Rank 0 alone collecting data or building a teacher cache for hours: the others wait for it
    (``wait_for_main``), where an ordinary collective times out (the plain barrier, shown)."""
    mp.spawn(_slow_main, args=(_free_port(), wait, str(tmp_path)), nprocs=2, join=True)
    got = (tmp_path / "rank1").read_text()
    assert (got == "waited") == waited, got


# --------------------------------------------------------------- no processes needed
def test_environment_batch_split_and_seeds():
    assert distributed.detect({}) is None
    assert distributed.detect({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = distributed.detect({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1",
                              "LOCAL_WORLD_SIZE": "2"})
    assert env == distributed.DistEnv(rank=3, local_rank=1, world_size=4, local_world_size=2)
    with pytest.raises(ConfigError, match="whole numbers"):
        distributed.detect({"WORLD_SIZE": "two"})
    with pytest.raises(ConfigError, match="inconsistent"):
        distributed.detect({"WORLD_SIZE": "2", "RANK": "2"})
    for world in ("0", "-3"):  # not quietly a single process
        with pytest.raises(ConfigError, match=f"WORLD_SIZE must be at least 1, got {world}"):
            distributed.detect({"WORLD_SIZE": world})
    assert distributed.local_batch(256, 4) == 64 and distributed.local_batch(256) == 256
    with pytest.raises(ConfigError, match="batch_size=10 does not split evenly over 4"):
        distributed.local_batch(10, 4)
    assert distributed.rank_seed(7) == 7  # a single process keeps its seed
    seeds = {distributed.rank_seed(7, r, world=4) for r in range(4)}
    assert len(seeds) == 4 and seeds == {distributed.rank_seed(7, r, world=4) for r in range(4)}


def test_joining_says_what_it_waits_for(monkeypatch, capsys):
    """The rendezvous can wait up to the timeout for peers: the wait is announced first."""
    calls = []
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda *a, **k: calls.append(k))
    monkeypatch.setattr(distributed.dist, "new_group", lambda *a, **k: calls.append(k))
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.7")
    monkeypatch.setenv("MASTER_PORT", "29571")
    env = distributed.DistEnv(rank=1, local_rank=1, world_size=2, local_world_size=2)
    assert distributed.init(env, "cpu", timeout_s=60) == torch.device("cpu")
    assert len(calls) == 2 and calls[0]["world_size"] == 2
    assert calls[1]["backend"] == "gloo"  # wait_for_main's group, without the 60 s timeout
    assert calls[1]["timeout"].total_seconds() == distributed.MAIN_WORK_TIMEOUT_S
    assert capsys.readouterr().err == ("rank 1 of 2: waiting for all 2 processes at "
                                       "10.0.0.7:29571 (up to 60 s)\n")


def test_cli_refuses_what_cannot_run_on_several_processes(tmp_path, monkeypatch, capsys):
    from tdmpc_opt.cli import main

    for k, v in {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert main(["train", "--data", str(tmp_path), "batch_size=15"]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: batch_size=15 does not split evenly over 2 processes: use a multiple of 2"
    assert main(["train", "--task", "cartpole-balance", "--online"]) == 2
    assert "offline training (--data) only" in capsys.readouterr().err


def test_torchrun_train_command(tmp_path):
    from test_training import tiny_dataset

    tiny_dataset(tmp_path / "ds", _model_cfg())
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "tdmpc_opt.cli", "train", "--data", str(tmp_path / "ds"), "--run-dir",
           str(run), "--quiet", "--device", "cpu", "steps=4", "checkpoint_freq=2",
           "eval_freq=0", "log_freq=1", "threads=1", "batch_size=8", "enc_dim=32",
           "mlp_dim=32", "latent_dim=16", "num_q=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # rank 0 prints
    assert "2 processes" in done.stdout
    config = json.loads((run / "config.json").read_text())
    assert config["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert (run / "model.safetensors").is_file()
    rows = (run / "train.csv").read_text().split()[1:]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2, 3, 4]
    state = torch.load(RunDir(run).checkpoint_path(4), weights_only=True)
    assert len(state["ranks"]) == 2
