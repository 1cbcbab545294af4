"""Quantization: formats, round trips, loading, faster runtimes, calibration, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import random_model
from tdmpc_opt import load_agent
from tdmpc_opt.checkpoints import load_world_model, read_state_dict, save_checkpoint
from tdmpc_opt.cli import main
from tdmpc_opt.errors import CheckpointError, TdmpcError
from tdmpc_opt.quantization import (
    FORMATS,
    QuantizationError,
    calibrate_clips,
    collect_layer_inputs,
    dequantize_int8,
    dequantize_stored,
    load_fast_agent,
    quantize_checkpoint,
    quantize_int8,
    quantize_state,
    tensor_group,
    with_precision,
)
from tdmpc_opt.world_model import WorldModel


@pytest.fixture
def tiny_model(tiny_cfg) -> WorldModel:
    """A tiny model with random (not zero-initialised) weights everywhere."""
    return random_model(tiny_cfg)


@pytest.fixture
def tiny_file(tiny_model, tmp_path):
    path = tmp_path / "fp32.safetensors"
    save_checkpoint(path, tiny_model)
    return path


def _inputs(model, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    c = model.cfg
    obs = torch.randn(n, c.obs_dim, generator=g)
    task = torch.randint(0, c.num_tasks, (n,), generator=g)
    act = (torch.rand(n, c.action_dim, generator=g) * 2 - 1) * model.action_mask(task)
    return obs, act, task


def _outputs(model, obs, act, task):
    with torch.no_grad():
        z = model.encode(obs, task)
        return {"z": z, "z_next": model.next(z, act, task),
                "reward": model.decode(model.reward(z, act, task)),
                "q": model.decode(model.q_logits(z, act, task))}


def test_int8_per_channel_round_trip():
    w = torch.randn(2, 7, 5) * torch.tensor([0.01, 1.0, 100.0, 0, 3, 4, 5])[:, None]
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (2, 7)
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s.unsqueeze(-1) / 2 + 1e-6).all()  # half a step per output channel
    assert (q[..., 3, :] == 0).all() and torch.isfinite(s).all()  # all-zero rows are safe
    q1, s1 = quantize_int8(torch.tensor([0.5, -1.0]))
    assert s1.shape == (1,) and q1.tolist() == [64, -127]


def test_tensor_groups(tiny_model):
    state = tiny_model.state_dict()
    groups = {k: tensor_group(k, state) for k in state}
    assert groups["_reward.2.weight"] == "twohot_heads"
    assert groups["_Qs.params.2.weight"] == "twohot_heads"
    assert groups["_pi.2.weight"] == "pi_head"
    assert groups["_reward.1.weight"] == "weight"
    assert groups["_dynamics.2.weight"] == "weight"  # simnorm output layer of a latent
    assert groups["_dynamics.0.ln.weight"] == "norm"
    assert groups["_task_emb.weight"] == "task_emb"
    assert groups["_encoder.state.1.weight"] == "encoder"
    assert groups["_Qs.params.0.bias"] == "bias"


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_file_loads_like_any_checkpoint(fmt, tiny_model, tiny_file, tmp_path):
    out = tmp_path / f"{fmt}.safetensors"
    summary = quantize_checkpoint(tiny_file, out, fmt)
    assert summary["file_bytes"] == out.stat().st_size
    state, meta = read_state_dict(out)
    qmeta = json.loads(meta["quantization"])
    assert qmeta["format"] == fmt and qmeta["target_q"] == "dropped"
    assert not any(k.startswith("_target_Qs.") for k in state)
    model, _ = load_world_model(out)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())
    tol = {"fp16": 2e-2, "bf16": 1e-1, "int8": 0.1, "int8-dynamic": 0.1}[fmt]
    ref, got = (_outputs(m, *_inputs(tiny_model)) for m in (tiny_model, model))
    for k in ref:
        assert (got[k] - ref[k]).abs().mean() < tol * max(1.0, float(ref[k].abs().mean())), k
    assert load_agent(out).act(torch.randn(tiny_model.cfg.obs_dim), "walker-walk").shape == (
        tiny_model.cfg.action_dim,)


def test_int8_keeps_chosen_groups_and_target_q_option(tiny_file, tmp_path):
    out = tmp_path / "int8.safetensors"
    quantize_checkpoint(tiny_file, out, "int8", keep=("norm",), keep_target_q=True)
    state, meta = read_state_dict(out)
    assert state["_dynamics.0.ln.weight"].dtype == torch.float16
    assert state["_dynamics.0.bias"].dtype == torch.int8
    assert state["_reward.2.weight"].dtype == torch.int8
    assert state["_target_Qs.params.0.weight"].dtype == torch.int8
    assert json.loads(meta["quantization"])["target_q"] == "kept"
    load_world_model(out)


def test_load_fast_agent_selects_precision(tiny_file, tmp_path, tiny_planner):
    for fmt, runtime in (("int8-dynamic", "int8"), ("bf16", "bf16"), ("int8", "fp32"),
                         ("fp16", "fp32")):
        out = tmp_path / f"{fmt}.safetensors"
        quantize_checkpoint(tiny_file, out, fmt)
        agent = load_fast_agent(out, planner=tiny_planner)
        assert agent.info["runtime"] == runtime == agent.precision
        action = agent.act(torch.randn(3, agent.cfg.obs_dim), "cartpole-balance", t0=True)
        assert action.shape == (3, agent.cfg.action_dim) and torch.isfinite(action).all()
    with pytest.raises(QuantizationError, match="unknown runtime"):
        load_fast_agent(tiny_file, "int4")


def test_precision_agent_plans_in_its_precision(tiny_file, tiny_planner):
    """fp32 is the plain agent; int8/bf16 plan in their precision for the same noise."""
    base = load_agent(tiny_file, planner=tiny_planner)
    obs = torch.randn(4, base.cfg.obs_dim)
    x, tid = base.prepare_inputs(obs, "walker-walk")
    t0 = torch.ones(4, dtype=torch.bool)

    def act(agent):
        gens = [torch.Generator().manual_seed(i) for i in range(4)]
        return agent.step(x, tid, agent.initial_plan(4), t0, True, gens)[0]

    plain = act(base)
    torch.testing.assert_close(act(with_precision(base, "fp32")), plain)
    for precision in ("bf16", "int8"):
        assert torch.isfinite(act(with_precision(base, precision))).all()
    with pytest.raises(QuantizationError, match="unknown precision"):
        with_precision(base, "fp8")
    with pytest.raises(QuantizationError, match="unknown precision"):
        with_precision(base, "fp8+compile")
    assert with_precision(base, "int8+compile").precision == "int8+compile"


def test_calibration_never_increases_layer_error(tiny_model, tiny_file, tmp_path):
    obs, _, task = _inputs(tiny_model, 128, seed=3)
    clips = calibrate_clips(tiny_model, obs, task)
    inputs = collect_layer_inputs(tiny_model, obs, task)
    state = tiny_model.state_dict()
    for key, x in inputs.items():
        w = state[key]
        err = [(x @ (w - dequantize_int8(*quantize_int8(w, c))).transpose(-1, -2)).pow(2).sum()
               for c in (1.0, clips[key])]
        assert err[1] <= err[0] * (1 + 1e-5), key
    out = tmp_path / "cal.safetensors"
    assert quantize_checkpoint(tiny_file, out, "int8", calibration=(obs, task))["calibrated"]
    load_world_model(out)


def test_calibrate_data_cli(tiny_file, tmp_path, capsys):
    data = tmp_path / "calib"
    data.mkdir()
    np.savez(data / "a.npz", obs=np.random.randn(50, 17).astype(np.float32),
             task=np.zeros(50, dtype=np.int64))
    out = tmp_path / "c.safetensors"
    assert main(["quantize", "--checkpoint", str(tiny_file), "--format", "int8", "--out",
                 str(out), "--calibrate-data", str(data)]) == 0
    assert "calibrated" in capsys.readouterr().out
    assert main(["quantize", "--checkpoint", str(tiny_file), "--format", "int8", "--out",
                 str(tmp_path / "d.safetensors"), "--calibrate-data", str(tmp_path / "none")]) == 2
    assert "no calibration data" in capsys.readouterr().err


@pytest.mark.parametrize("case,message", [
    ("object", "unreadable calibration file"),
    ("corrupt", "not a readable .npz file"),
    ("float_task", "integer task indices"),
    ("nan", "contain NaN or Inf"),
    ("empty", "holds no observations"),
])
def test_bad_calibration_data_is_one_line(tiny_file, tmp_path, capsys, case, message):
    data = tmp_path / "calib"
    data.mkdir()
    obs, task = np.random.randn(20, 17).astype(np.float32), np.zeros(20, dtype=np.int64)
    if case == "object":  # would need pickle to load: refused, never unpickled
        np.savez(data / "a.npz", obs=np.array([{"x": 1}] * 20, dtype=object), task=task)
    elif case == "corrupt":
        np.savez(data / "a.npz", obs=obs, task=task)
        (data / "a.npz").write_bytes((data / "a.npz").read_bytes()[:100])
    elif case == "float_task":
        np.savez(data / "a.npz", obs=obs, task=task + 0.5)
    elif case == "nan":
        obs[3, 2] = np.nan
        np.savez(data / "a.npz", obs=obs, task=task)
    else:
        np.savez(data / "a.npz", obs=obs[:0], task=task[:0])
    out = tmp_path / "c.safetensors"
    code = main(["quantize", "--checkpoint", str(tiny_file), "--format", "int8", "--out",
                 str(out), "--calibrate-data", str(data)])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


@pytest.mark.parametrize("rows", ["0", "-5"])
def test_calibrate_rows_must_be_positive(tiny_file, tmp_path, capsys, rows):
    with pytest.raises(SystemExit) as e:
        main(["quantize", "--checkpoint", str(tiny_file), "--format", "int8", "--out",
              str(tmp_path / "c.safetensors"), "--calibrate-rows", rows])
    assert e.value.code == 2 and "must be positive" in capsys.readouterr().err


def test_calibrate_data_from_dataset_folder(tiny_model, tmp_path):
    from tdmpc_opt.cli.quantize import load_calibration
    from tdmpc_opt.data import DatasetWriter

    cfg = tiny_model.cfg
    tasks = ("pendulum-swingup", "walker-walk")  # another order than the model's
    w = DatasetWriter(tmp_path / "ds", tasks, cfg.obs_dim, cfg.action_dim)
    w.add_episodes(np.random.randn(2, 5, cfg.obs_dim).astype(np.float32),
                   np.zeros((2, 5, cfg.action_dim), np.float32), np.zeros((2, 5), np.float32),
                   np.array([0, 1]))
    w.close()
    obs, task = load_calibration(str(tmp_path / "ds"), cfg, rows=100)
    assert obs.shape == (10, cfg.obs_dim)
    assert task.tolist() == [cfg.tasks.index("pendulum-swingup")] * 5 + [0] * 5


# ------------------------------------------------------------------------------ bad input
def test_refuses_already_quantized_and_unknown_formats(tiny_file, tmp_path, capsys):
    q = tmp_path / "q.safetensors"
    quantize_checkpoint(tiny_file, q, "fp16")
    with pytest.raises(QuantizationError, match=r"already quantized \(fp16\)"):
        quantize_checkpoint(q, tmp_path / "again.safetensors", "int8")
    with pytest.raises(QuantizationError, match="unsupported quantization format 'int4'"):
        quantize_checkpoint(tiny_file, tmp_path / "x.safetensors", "int4")
    with pytest.raises(QuantizationError, match="overwrite"):
        quantize_checkpoint(tiny_file, tiny_file, "int8")
    assert main(["quantize", "--checkpoint", str(tiny_file), "--format", "int4", "--out",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "unsupported quantization format 'int4'; choose one of" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint", str(q), "--format", "int8", "--out",
                 str(tmp_path / "y.safetensors")]) == 2
    assert "already quantized" in capsys.readouterr().err
    report = tmp_path / "report"
    with pytest.raises(SystemExit) as refused:  # an argument error: argparse exits
        main(["report-quant", "--checkpoint", str(tiny_file), "--formats", "fp16,int4", "--out",
              str(report)])
    assert refused.value.code == 2
    assert "unknown format 'int4'; choose from" in capsys.readouterr().err
    assert not report.exists()  # refused before anything is written


def test_refuses_torch_quantized_and_pixel_files(tiny_model, tmp_path):
    state = tiny_model.state_dict()
    qfile = tmp_path / "paper-like.pt"
    torch.save({"model": {k: torch.quantize_per_tensor(v.float(), 1.0, 0, torch.qint8)
                          for k, v in state.items()}}, qfile)
    with pytest.raises(QuantizationError, match="torch qint8 tensors"):
        quantize_checkpoint(qfile, tmp_path / "x.safetensors", "int8")
    pixel = tmp_path / "pixel.pt"
    torch.save({"model": dict(state, **{"_encoder.rgb.0.weight": torch.zeros(32, 9, 7, 7)})},
               pixel)
    with pytest.raises(CheckpointError, match="pixel .* state-observation models only"):
        quantize_checkpoint(pixel, tmp_path / "x.safetensors", "int8")


def test_dequantize_stored_rejects_broken_files():
    q, s = quantize_int8(torch.randn(4, 3))
    with pytest.raises(CheckpointError, match="has no scale"):
        dequantize_stored({"w": q}, {"format": "int8"})
    with pytest.raises(CheckpointError, match="without its tensor"):
        dequantize_stored({"w:scale": s}, {"format": "int8"})
    with pytest.raises(CheckpointError, match="unknown quantization format"):
        dequantize_stored({"w": q}, {"format": "int3"})
    assert issubclass(QuantizationError, TdmpcError)
    with pytest.raises(QuantizationError, match="unknown tensor groups"):
        quantize_state({"w": torch.randn(2, 2)}, "int8", keep=("heads",))


# ------------------------------------------------------------------- published checkpoint
def test_published_student_int8_size_and_error(fp16_ckpt, tmp_path):
    """Documented in docs/quantization.md: int8 < 30% of float32, errors within bounds."""
    fp32, int8 = tmp_path / "fp32.safetensors", tmp_path / "int8.safetensors"
    ref, _ = load_world_model(fp16_ckpt)
    save_checkpoint(fp32, ref)
    quantize_checkpoint(fp16_ckpt, int8, "int8")
    assert int8.stat().st_size < 0.30 * fp32.stat().st_size
    model, _ = load_world_model(int8)
    from tdmpc_opt.cli.report_quant import held_out_inputs, prediction_errors, predictions

    inputs = held_out_inputs(ref, 8, 1000, "random")
    err = prediction_errors(predictions(ref, *inputs), predictions(model, *inputs))
    assert err["z"]["max"] == 0  # the encoder stays float16, like the source
    assert err["z_next"]["mean"] < 3e-3 and err["reward"]["mean"] < 5e-3
    assert err["q"]["mean"] < 1e-2 and err["pi_mean"]["mean"] < 1e-2
    paper, _ = load_world_model(fp16_ckpt.with_name("tdmpc-opt-mt30-1M-int8.pt"))
    paper_err = prediction_errors(predictions(ref, *inputs), predictions(paper, *inputs))
    assert paper_err["q"]["mean"] > 10 * err["q"]["mean"]  # scale 1.0 rounds weights to ints


def test_report_quant_cli(tiny_model, tiny_file, tmp_path, capsys):
    paper = tmp_path / "paper-int8.pt"
    torch.save({"model": {k: torch.quantize_per_tensor(v.float(), 1.0, 0, torch.qint8)
                          for k, v in tiny_model.state_dict().items()}}, paper)
    out = tmp_path / "report"
    assert main(["report-quant", "--checkpoint", str(tiny_file), "--out", str(out),
                 "--formats", "fp32,bf16,int8,int8-dynamic", "--paper-files", str(paper),
                 "--inputs", "random", "--inputs-per-task", "4", "--batch", "1",
                 "--repeats", "1"]) == 0
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["fp32", "bf16", "int8", "int8-dynamic",
                                         "paper:paper-int8"]
    assert [r["runtime"] for r in rows] == ["fp32", "bf16", "fp32", "int8", "fp32"]
    assert rows[0]["errors"]["q"]["max"] == 0 and rows[0]["action_change"] == 0
    assert all(r["score"] is None and r["steps_per_s"]["1"] > 0 for r in rows)
    assert rows[4]["errors"]["q"]["mean"] > rows[2]["errors"]["q"]["mean"]
    table = (out / "report.md").read_text()
    assert "| int8-dynamic | int8 |" in table and (out / "report.png").stat().st_size > 0
