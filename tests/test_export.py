"""ONNX export: graphs match PyTorch, the numpy planner matches the PyTorch planner."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import random_model
from tdmpc_opt import math as tm
from tdmpc_opt.checkpoints import save_checkpoint
from tdmpc_opt.cli import main
from tdmpc_opt.config import PlannerConfig
from tdmpc_opt.deploy import onnx_planner as op
from tdmpc_opt.errors import CheckpointError, InputError
from tdmpc_opt.export import EXPORT_FILES, export_checkpoint, export_onnx, verify_export
from tdmpc_opt.planner import draw_noise, plan, plan_literal


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A random tiny multi-task model exported once for the module."""
    from tdmpc_opt.config import model_config_for

    torch.manual_seed(0)
    cfg = model_config_for(("walker-walk", "cartpole-balance", "pendulum-swingup"), None,
                           enc_dim=32, mlp_dim=32, latent_dim=16, task_dim=8, num_q=2)
    model = random_model(cfg)
    out = tmp_path_factory.mktemp("onnx")
    export_onnx(model, out)
    return model, out


def _settings(cfg: PlannerConfig) -> op.PlannerSettings:
    return op.PlannerSettings(**{f.name: getattr(cfg, f.name)
                                 for f in dataclasses.fields(op.PlannerSettings)})


def _compare_planners(model, out, cfg: PlannerConfig, task, eval_mode: bool):
    b = len(task) if task is not None else 3
    noise = draw_noise(cfg, model.cfg.action_dim, model.cfg.num_q, b,
                       [torch.Generator().manual_seed(10 + i) for i in range(b)])
    obs = torch.randn(b, model.cfg.obs_dim)
    prev = (torch.rand(b, cfg.horizon, model.cfg.action_dim) * 2 - 1)
    t0 = torch.tensor([True, False, False][:b])
    lengths = model.cfg.episode_lengths or (500,)
    gamma = torch.tensor([tm.discount_for_episode_length(lengths[0])] * b)
    z0 = model.encode(obs, task).detach()
    want, want_mean = plan(model, cfg, z0, task, prev, t0, eval_mode, noise, gamma)
    om = op.OnnxWorldModel(out)
    tnp = None if task is None else task.numpy()
    got, got_mean = op.plan(om, _settings(cfg), om.encode(obs.numpy(), tnp), tnp, prev.numpy(),
                            t0.numpy(), eval_mode,
                            {k: getattr(noise, k).numpy() for k in op.NOISE_FIELDS},
                            gamma.numpy())
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4)
    np.testing.assert_allclose(got_mean, want_mean.numpy(), atol=1e-4)
    return noise, obs, prev, gamma, got


def test_graphs_match_pytorch(exported):
    model, out = exported
    errors = verify_export(model, out, n=50)
    assert set(errors) >= {"encoder.z", "dynamics.z_next", "reward.reward", "q.q",
                           "policy.action"}
    assert max(errors.values()) < 1e-4, errors
    for name in ("model.json", "onnx_planner.py", "example.py", "requirements.txt"):
        assert (out / name).exists()
    assert (out / "requirements.txt").read_text().split() == ["numpy>=1.26", "onnxruntime>=1.18"]


@pytest.mark.parametrize("eval_mode", [True, False])
def test_numpy_planner_matches_pytorch_planner(exported, tiny_planner, eval_mode):
    model, out = exported
    task = torch.tensor([0, 1, 2])
    noise, obs, prev, gamma, got = _compare_planners(model, out, tiny_planner, task, eval_mode)
    # and the literal reference, element by element
    for i in range(3):
        want, _ = plan_literal(model, tiny_planner, obs[i], int(task[i]), prev[i], i == 0,
                               eval_mode, noise[i], float(gamma[i]))
        np.testing.assert_allclose(got[i], want.numpy(), atol=1e-4)


def test_single_task_model_with_five_q(tiny_single_cfg, tiny_planner, tmp_path):
    model = random_model(tiny_single_cfg)
    export_onnx(model, tmp_path)
    assert max(verify_export(model, tmp_path, n=20).values()) < 1e-4
    _compare_planners(model, tmp_path, tiny_planner, None, True)


def test_onnx_agent_acts_and_keeps_warm_start(exported):
    _, out = exported
    agent = op.OnnxAgent(out, op.PlannerSettings(iterations=2, num_samples=32, num_elites=8,
                                                 num_pi_trajs=4))
    a = agent.act(np.zeros(17, np.float32), task="walker-walk", t0=True)
    assert a.shape == (6,) and np.all(np.abs(a) <= 1)
    b = agent.act(np.zeros((2, 5), np.float32), task=["cartpole-balance", 2], t0=[True, True])
    assert b.shape == (2, 6) and np.all(b[:, 1:] == 0)  # one-dim tasks: masked
    with pytest.raises(ValueError, match="not in this model"):
        agent.act(np.zeros(17, np.float32), task="cup-catch")
    for obs, task, message in [(np.zeros(30, np.float32), 0, "takes at most 24"),
                               (np.zeros((0, 24), np.float32), 0, "batch >= 1"),
                               (np.zeros((2, 2, 24), np.float32), 0, "batch >= 1"),
                               (np.full(24, np.nan, np.float32), 0, "NaN"),
                               (np.zeros((2, 24), np.float32), [0, 1, 2], "3 tasks for 2")]:
        with pytest.raises(ValueError, match=message):
            agent.act(obs, task=task)
    with pytest.raises(FileNotFoundError, match="no model.json here"):
        op.OnnxAgent(out.parent)


def test_deployment_runs_without_torch(exported):
    """The exported folder imports and runs with torch made unimportable."""
    _, out = exported
    code = ("import sys; sys.modules['torch'] = None; sys.argv = ['example.py', '--steps', "
            "'1']; import runpy; runpy.run_path('example.py', run_name='__main__'); "
            "assert 'tdmpc_opt' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], cwd=out, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "step 0:" in result.stdout
    for args, message in [(["--task", "cup-catch"], "not in this model's task set"),
                          (["--model", str(out.parent)], "no model.json here"),
                          (["--batch", "0"], "must be positive")]:
        bad = subprocess.run([sys.executable, "example.py", *args], cwd=out,
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert len(bad.stderr.strip().splitlines()) == 1 or "usage:" in bad.stderr
        assert "Traceback" not in bad.stderr


def test_export_cli_and_bad_input(tmp_path, capsys, tiny_cfg):
    model = random_model(tiny_cfg)
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, model)
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out",
                 str(tmp_path / "out")]) == 0
    assert "largest difference from PyTorch" in capsys.readouterr().out
    assert main(["export", "--checkpoint", str(ckpt), "--format", "tflite", "--out",
                 str(tmp_path / "x")]) == 2
    assert "unsupported export format 'tflite'" in capsys.readouterr().err
    with pytest.raises(InputError, match="only one is 'onnx'"):
        export_checkpoint(ckpt, tmp_path / "x", "tflite")
    pixel = tmp_path / "pixel.pt"
    state = dict(model.state_dict(), **{"_encoder.rgb.0.weight": torch.zeros(32, 9, 7, 7)})
    torch.save({"model": state}, pixel)
    with pytest.raises(CheckpointError, match="pixel .* cannot be quantized or exported"):
        export_checkpoint(pixel, tmp_path / "x")
    assert main(["export", "--checkpoint", str(pixel), "--out", str(tmp_path / "x")]) == 2
    assert "pixel (image) encoder" in capsys.readouterr().err


def test_published_student_export(fp16_ckpt, tmp_path):
    """The real 1M MT30 student: graphs to 1e-4 and the same actions for the same noise."""
    result = export_checkpoint(fp16_ckpt, tmp_path)
    assert max(result["errors"].values()) < 1e-4, result["errors"]
    from tdmpc_opt.checkpoints import load_world_model

    model, _ = load_world_model(fp16_ckpt)
    cfg = PlannerConfig(iterations=3, num_samples=128, num_elites=16, num_pi_trajs=8)
    _compare_planners(model, tmp_path, cfg, torch.tensor([1, 8, 16]), True)


def test_export_never_replaces_a_folders_own_files(tmp_path, capsys, tiny_cfg):
    """A folder holding its own example.py / requirements.txt is refused before any work;
    other files in it are kept; an earlier export is replaced as a whole."""
    ckpt = tmp_path / "m.safetensors"
    save_checkpoint(ckpt, random_model(tiny_cfg))
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "requirements.txt").write_text("my-own-package==1\n")
    (mine / "example.py").write_text("print('mine')\n")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "example.py, requirements.txt" in err
    assert "not from an earlier export" in err
    assert sorted(p.name for p in mine.iterdir()) == ["example.py", "requirements.txt"]
    assert (mine / "requirements.txt").read_text() == "my-own-package==1\n"

    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "notes.txt").write_text("keep me\n")
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(shared)]) == 0
    assert (shared / "notes.txt").read_text() == "keep me\n"
    assert sorted(p.name for p in shared.iterdir()) == sorted(["notes.txt", *EXPORT_FILES])
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(shared)]) == 0  # again


def test_interrupted_export_leaves_the_earlier_export_as_it_was(tmp_path, monkeypatch,
                                                                   tiny_cfg):
    import tdmpc_opt.export as ex

    out = tmp_path / "out"
    export_onnx(random_model(tiny_cfg), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / f"{ex.STAGING_PREFIX}stale").mkdir()  # as a killed export leaves it
    real, calls = ex.export_graph, []

    def interrupted(model, kind, path, *args):
        calls.append(kind)
        if len(calls) == 3:
            raise KeyboardInterrupt
        real(model, kind, path, *args)

    monkeypatch.setattr(ex, "export_graph", interrupted)
    torch.manual_seed(1)
    with pytest.raises(KeyboardInterrupt):
        export_onnx(random_model(tiny_cfg), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # stale staging gone too
    monkeypatch.setattr(ex, "export_graph", real)
    desc, errors = export_onnx(random_model(tiny_cfg), out, "abc", verify=True)
    assert json.loads((out / "model.json").read_text()) == desc and desc["source_sha256"] == "abc"
    assert max(errors.values()) < 1e-4 and (out / "q.onnx").read_bytes() != before["q.onnx"]
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
