"""Loading published checkpoints: golden predictions, key layouts, dtypes, bad files."""

import errno
import json
import re

import pytest
import torch

from conftest import shared_path
from tdmpc_opt.checkpoints import (
    atomic_write,
    load_world_model,
    migrate_official_keys,
    read_state_dict,
    save_checkpoint,
    save_official,
)
from tdmpc_opt.errors import CheckpointError, OutputError
from tdmpc_opt.world_model import WorldModel


def _golden():
    return json.loads(shared_path("reference", "golden-predictions-3tasks.json").read_text())


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-6)


@torch.no_grad()
def test_golden_predictions_of_the_original_implementation(fp16_ckpt):
    model, _ = load_world_model(fp16_ckpt)
    for item in _golden()["items"]:
        t = torch.tensor([item["task_index"]])
        obs, act = torch.tensor([item["obs"]]), torch.tensor([item["action"]])
        z = model.encode(obs, t)
        assert torch.allclose(z[0], torch.tensor(item["z"]), atol=1e-4)
        assert torch.allclose(model.next(z, act, t)[0], torch.tensor(item["z_next"]), atol=1e-4)
        assert _rel(model.decode(model.reward(z, act, t)).item(), item["reward"]) < 1e-3
        assert _rel(model.decode(model.q_logits(z, act, t)).mean().item(), item["q_mean"]) < 1e-3
        pi = model.pi(z, t, torch.zeros(1, 6)).mean[0]
        assert torch.allclose(pi, torch.tensor(item["pi_mean"]), rtol=1e-3, atol=1e-6)


# --- an independent forward pass written from the TD-MPC2 equations on the raw tensors ---
def _layer(sd, prefix, x, act):
    w, b = sd[prefix + ".weight"].float(), sd[prefix + ".bias"].float()
    y = x @ w.T + b
    if prefix + ".ln.weight" not in sd:
        return y
    mu, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    y = (y - mu) / torch.sqrt(var + 1e-5) * sd[prefix + ".ln.weight"].float() \
        + sd[prefix + ".ln.bias"].float()
    if act == "simnorm":
        return torch.softmax(y.reshape(-1, 8), -1).reshape(y.shape)
    return y * torch.tanh(torch.log1p(torch.exp(y)))  # mish


def _hand_forward(sd, task, obs, action):
    emb = sd["_task_emb.weight"][task].float()
    emb = emb / max(1.0, emb.norm().item() + 1e-7) if emb.norm() > 1 else emb
    h = torch.cat([obs, emb])
    h = _layer(sd, "_encoder.state.0", h, "mish")
    z = _layer(sd, "_encoder.state.1", h, "simnorm")
    za = torch.cat([z, emb, action])
    h = _layer(sd, "_reward.0", za, "mish")
    h = _layer(sd, "_reward.1", h, "mish")
    logits = _layer(sd, "_reward.2", h, None)
    bins = torch.linspace(-10, 10, 101)
    x = (torch.softmax(logits, -1) * bins).sum()
    reward = torch.sign(x) * (torch.exp(x.abs()) - 1)
    return z, reward


@torch.no_grad()
def test_predictions_match_hand_written_math(fp16_ckpt):
    raw, _ = read_state_dict(fp16_ckpt)
    model, _ = load_world_model(fp16_ckpt)
    gen = torch.Generator().manual_seed(3)
    for task in (0, 8, 21, 29):  # walker-stand, cartpole-balance, cheetah-run-backwards, ...
        obs, action = torch.randn(24, generator=gen), torch.rand(6, generator=gen) * 2 - 1
        action = action * model._action_masks[task]
        z_ref, r_ref = _hand_forward(raw, task, obs, action)
        t = torch.tensor([task])
        z = model.encode(obs[None], t)[0]
        assert torch.allclose(z, z_ref, atol=1e-5)
        r = model.decode(model.reward(z[None], action[None], t)).item()
        assert r == pytest.approx(r_ref.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("variant", ["fp16", "int8", "mixed"])
def test_published_variants_load_with_all_numbers(variant):
    path = shared_path("checkpoints", f"tdmpc-opt-mt30-1M-{variant}.pt")
    raw, _ = read_state_dict(path)
    assert sum(v.numel() for v in raw.values()) == 1_980_357
    model, info = load_world_model(path)
    assert sum(p.numel() for p in model.parameters()) == 1_980_357
    assert model.cfg.tasks[1] == "walker-walk" and model.cfg.num_tasks == 30
    assert next(model.parameters()).dtype == torch.float32


def test_int8_file_is_dequantized_with_its_scale(fp16_ckpt):
    int8 = shared_path("checkpoints", "tdmpc-opt-mt30-1M-int8.pt")
    raw, _ = read_state_dict(int8)
    model, _ = load_world_model(int8)
    q = raw["_encoder.state.0.weight"]
    assert q.is_quantized
    assert torch.equal(model._encoder["state"][0].weight, q.dequantize())
    # scale 1.0: every weight is an integer
    assert torch.equal(model._encoder["state"][0].weight, model._encoder["state"][0].weight.round())


def _new_api(old):
    """Re-key an old-API state dict the way current TD-MPC2 saves it."""
    names = ["weight", "bias", "ln.weight", "ln.bias"]
    new = {}
    for k, v in old.items():
        m = re.fullmatch(r"(_Qs|_target_Qs)\.params\.(\d+)", k)
        if not m:
            new[k] = v
            continue
        sub = f"{int(m.group(2)) // 4}.{names[int(m.group(2)) % 4]}"
        if m.group(1) == "_Qs":
            new[f"_Qs.params.{sub}"] = v
            new[f"_detach_Qs_params.{sub}"] = v
        else:
            new[f"_target_Qs_params.{sub}"] = v
    for prefix in ("_Qs.params.", "_detach_Qs_params.", "_target_Qs_params."):
        new[prefix + "__batch_size"] = torch.Size([2])
        new[prefix + "__device"] = "cuda:0"
    new["log_std_min"], new["log_std_dif"] = torch.tensor(-10.0), torch.tensor(12.0)
    new["_action_masks"] = torch.ones(30, 6)
    return new


def test_old_and_new_key_layouts_give_the_same_model(fp16_ckpt, tmp_path):
    raw, _ = read_state_dict(fp16_ckpt)
    new = {k: v for k, v in _new_api(raw).items() if isinstance(v, torch.Tensor)}
    assert migrate_official_keys(raw).keys() == migrate_official_keys(new).keys()
    torch.save({"model": new}, tmp_path / "new.pt")
    a, _ = load_world_model(fp16_ckpt)
    b, _ = load_world_model(tmp_path / "new.pt")
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_bfloat16_and_float32_files(fp16_ckpt, tmp_path):
    model, _ = load_world_model(fp16_ckpt)
    for dtype in (torch.float32, torch.bfloat16):
        save_official(tmp_path / "m.pt", model, dtype)
        back, _ = load_world_model(tmp_path / "m.pt")
        w = back._dynamics[0].weight
        assert torch.allclose(w, model._dynamics[0].weight.to(dtype).float())


def test_safetensors_round_trip_and_checksum(tiny_cfg, tmp_path):
    model = WorldModel(tiny_cfg)
    save_checkpoint(tmp_path / "m.safetensors", model)
    back, info = load_world_model(tmp_path / "m.safetensors")
    assert back.cfg == tiny_cfg and info["source_format"] == "tdmpc-opt"
    for (k, v), (_, w) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert torch.equal(v, w), k
    data = bytearray((tmp_path / "m.safetensors").read_bytes())
    data[-5] ^= 0xFF  # flip a byte of tensor data
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        load_world_model(tmp_path / "bad.safetensors")


def test_bad_files_give_clear_errors(fp16_ckpt, tmp_path):
    cases = {}
    cases["missing"] = (tmp_path / "nope.pt", "no such file")
    cases["dir"] = (tmp_path, "directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    cases["empty"] = (tmp_path / "empty.pt", "empty")
    (tmp_path / "text.pt").write_text("hello")
    cases["text"] = (tmp_path / "text.pt", "not a checkpoint")
    data = fp16_ckpt.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    cases["truncated"] = (tmp_path / "trunc.pt", "truncated or corrupted")
    torch.save({"model": {"a.weight": torch.zeros(3, 3)}}, tmp_path / "other.pt")
    cases["other arch"] = (tmp_path / "other.pt", "fits no TD-MPC2 architecture")
    for name, (path, message) in cases.items():
        with pytest.raises(CheckpointError, match=message):
            load_world_model(path)
        assert name


def test_pytorch_file_named_safetensors_is_a_clear_error(tiny_cfg, tmp_path):
    """torch.load picks its safetensors reader by the file name; its error is ours too."""
    torch.save({"model": WorldModel(tiny_cfg).state_dict()}, tmp_path / "m.safetensors")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_world_model(tmp_path / "m.safetensors")


@pytest.mark.parametrize("value,message", [("{not json", "not JSON"),
                                           ('"int8"', "expected a JSON object")])
def test_bad_quantization_metadata_is_a_clear_error(tiny_cfg, tmp_path, value, message):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from tdmpc_opt.checkpoints import describe

    save_checkpoint(tmp_path / "m.safetensors", WorldModel(tiny_cfg))
    with safe_open(str(tmp_path / "m.safetensors"), "pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["quantization"] = value
    save_file(state, str(tmp_path / "q.safetensors"), metadata=meta)
    for read in (load_world_model, describe):
        with pytest.raises(CheckpointError, match=message):
            read(tmp_path / "q.safetensors")


def test_architecture_errors_name_the_file_and_a_missing_task_embedding(fp16_ckpt, tmp_path):
    raw, _ = read_state_dict(fp16_ckpt)
    torch.save({k: v for k, v in raw.items() if k != "_task_emb.weight"}, tmp_path / "noemb.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'noemb.pt'}: state dict "
                       "fits no TD-MPC2 architecture: its layers read a 96-value task "
                       "embedding, but _task_emb.weight is missing")):
        load_world_model(tmp_path / "noemb.pt")
    torch.save({"a.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=re.escape(f"{tmp_path / 'other.pt'}: state dict "
                                                        "fits no TD-MPC2 architecture")):
        load_world_model(tmp_path / "other.pt")


def test_wrong_shapes_and_nan_weights(fp16_ckpt, tmp_path):
    raw, _ = read_state_dict(fp16_ckpt)
    bad = dict(raw)
    bad["_reward.1.weight"] = torch.zeros(100, 384, dtype=torch.float16)
    torch.save({"model": bad}, tmp_path / "shape.pt")
    with pytest.raises(CheckpointError, match="fits no TD-MPC2 architecture"):
        load_world_model(tmp_path / "shape.pt")
    nan = dict(raw)
    nan["_pi.0.weight"] = nan["_pi.0.weight"].clone()
    nan["_pi.0.weight"][0, 0] = float("nan")
    torch.save({"model": nan}, tmp_path / "nan.pt")
    with pytest.raises(CheckpointError, match="NaN"):
        load_world_model(tmp_path / "nan.pt")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    torch.save({"model": {"x": _Evil(str(target))}}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_world_model(tmp_path / "evil.pt")
    assert not target.exists()


def test_unknown_task_count_needs_a_task_list(tiny_cfg, tmp_path):
    model = WorldModel(tiny_cfg)
    save_official(tmp_path / "m.pt", model)
    with pytest.raises(CheckpointError, match="3 task embeddings"):
        load_world_model(tmp_path / "m.pt")
    back, _ = load_world_model(tmp_path / "m.pt", tasks=tiny_cfg.tasks)
    assert back.cfg.action_dims == tiny_cfg.action_dims


def test_atomic_write_failures_are_output_errors_and_keep_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def half_then_full_disk(tmp):
        tmp.write_text("ne")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match="cannot write .*result.json: No space left") as err:
        atomic_write(target, half_then_full_disk)
    assert isinstance(err.value, OSError) and err.value.errno == errno.ENOSPC
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]
    (tmp_path / "folder").mkdir()
    with pytest.raises(OutputError, match="folder: Is a directory"):
        atomic_write(tmp_path / "folder", lambda tmp: tmp.write_text("x"))
    with pytest.raises(OutputError, match="cannot write .*result.json/x"):  # a file as a folder
        atomic_write(target / "x", lambda tmp: tmp.write_text("x"))


def test_saved_files_get_the_users_usual_permissions(tiny_cfg, tmp_path):
    """safetensors creates its files 0o600; ours get 0o666 less the umask, like open()."""
    import os

    save_checkpoint(tmp_path / "m.safetensors", WorldModel(tiny_cfg))
    (tmp_path / "plain").write_text("x")
    mode = (tmp_path / "m.safetensors").stat().st_mode & 0o777
    assert mode == (tmp_path / "plain").stat().st_mode & 0o777
    mask = os.umask(0o022)
    os.umask(mask)
    assert mode == 0o666 & ~mask
