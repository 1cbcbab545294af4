"""Fuzzing checkpoint loading: every damaged file ends in one CheckpointError, nothing else."""

import random
from pathlib import Path

import torch

from tdmpc_opt.checkpoints import load_world_model, read_state_dict, save_checkpoint
from tdmpc_opt.errors import CheckpointError
from tdmpc_opt.world_model import WorldModel

SEED = 1234


def _truncations(data: bytes, rng) -> list[bytes]:
    cuts = [0, 1, 8, 64, 512, len(data) // 3, len(data) // 2, len(data) - 1]
    cuts += [rng.randrange(1, len(data)) for _ in range(12)]
    return [data[:c] for c in cuts]


def _flips(data: bytes, rng, n: int) -> list[bytes]:
    out = []
    for _ in range(n):
        b = bytearray(data)
        for _ in range(rng.choice((1, 1, 3))):
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
        out.append(bytes(b))
    return out


def _tensor_cases(raw: dict) -> list[dict]:
    cases = []
    ints = dict(raw)
    ints["_dynamics.0.weight"] = torch.zeros(384, 230, dtype=torch.int64)
    cases.append(ints)  # integer dtype where floats belong
    flags = dict(raw)
    flags["_pi.0.bias"] = torch.ones(384, dtype=torch.bool)
    cases.append(flags)
    for value in (float("nan"), float("inf"), -float("inf")):
        bad = dict(raw)
        w = bad["_Qs.params.4"].clone()
        w.view(-1)[17] = value
        bad["_Qs.params.4"] = w
        cases.append(bad)
    other = {k: v for k, v in raw.items() if not k.startswith("_encoder")}
    cases.append(other)  # missing encoder
    bigger = dict(raw)
    bigger["_pi.2.weight"] = torch.zeros(14, 384, dtype=torch.float16)
    cases.append(bigger)  # action size that disagrees with the rest
    five = WorldModel(__import__("tdmpc_opt.config", fromlist=["x"]).model_config_for(
        ("cartpole-balance",), 5)).state_dict()
    mixed = dict(raw)
    mixed.update({k: v for k, v in five.items() if k.startswith("_reward")})
    cases.append(mixed)  # layers of another architecture
    cases.append({"model": torch.zeros(3)})
    return cases


def _expect_clean_failure(path: Path, outcomes: dict) -> None:
    try:
        load_world_model(path)
    except CheckpointError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "Traceback" not in msg
        outcomes["refused"] += 1
        return
    outcomes["loaded"] += 1


def test_fuzz_checkpoint_loading(fp16_ckpt, tmp_path):
    rng = random.Random(SEED)
    data = fp16_ckpt.read_bytes()
    outcomes = {"refused": 0, "loaded": 0}
    files: list[bytes] = _truncations(data, rng) + _flips(data, rng, 40)
    # our own format too
    own = tmp_path / "own.safetensors"
    model, _ = load_world_model(fp16_ckpt)
    save_checkpoint(own, model)
    own_data = own.read_bytes()
    files += _truncations(own_data, rng)[:10] + _flips(own_data, rng, 20)
    for i, blob in enumerate(files):
        path = tmp_path / f"case{i}{'.pt' if i < 60 else '.safetensors'}"
        path.write_bytes(blob)
        _expect_clean_failure(path, outcomes)
    raw, _ = read_state_dict(fp16_ckpt)
    for j, state in enumerate(_tensor_cases(raw)):
        path = tmp_path / f"tensors{j}.pt"
        torch.save({"model": state}, path)
        _expect_clean_failure(path, outcomes)
    (tmp_path / "adir.pt").mkdir()
    _expect_clean_failure(tmp_path / "adir.pt", outcomes)
    total = sum(outcomes.values())
    print(f"fuzzed {total} damaged checkpoints: {outcomes}")
    # every damaged file is refused: no byte flip, cut or bad tensor loads silently
    assert outcomes == {"refused": total, "loaded": 0}
    assert total >= 100
