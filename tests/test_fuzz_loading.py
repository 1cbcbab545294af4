"""Fuzzing checkpoint and dataset loading: every damaged file ends in one of our errors (a
CheckpointError or a DataError), nothing else."""

import json
import pickle
import random
import shutil
from pathlib import Path

import numpy as np
import torch

import official_layout
from official_layout import make_episodes, write_official
from tdmpc_opt.checkpoints import load_world_model, read_state_dict, save_checkpoint
from tdmpc_opt.cli import main
from tdmpc_opt.data import Dataset, DatasetWriter, convert_official, read_official
from tdmpc_opt.errors import CheckpointError, DataError
from tdmpc_opt.replay import SequenceSampler
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


# ------------------------------------------------------------------------------ datasets
def _npy_header_len(data: bytes) -> int:
    """Bytes before the array data of an .npy file (format 1.0: a 2-byte header length)."""
    return 10 + int.from_bytes(data[8:10], "little")


def _dataset_base(root: Path) -> Dataset:
    """Six episodes (3..8 observations, tasks 0, 1, 2) with termination flags."""
    rng = np.random.default_rng(SEED)
    w = DatasetWriter(root / "base", ("x", "y", "z"), 3, 2, terminated=True)
    for e in range(6):
        n = 3 + e
        w.add_episodes(rng.standard_normal((1, n, 3), np.float32),
                       rng.uniform(-1, 1, (1, n, 2)), rng.random((1, n)), np.array([e % 3]),
                       terminated=(np.arange(n) == n - 1)[None])
    return w.close()


_ARRAYS = ("obs", "action", "reward", "terminated", "episodes")


def _meta_cases(meta: dict, rng) -> list[tuple[str, object]]:
    """(label, meta.json content: bytes, or a dict to write as JSON) of damaged headers."""
    text = json.dumps(meta, indent=1).encode() + b"\n"
    cases: list[tuple[str, object]] = []
    cuts = [0, 1, 10, len(text) // 3, len(text) // 2, len(text) - 2]
    cuts += [rng.randrange(1, len(text) - 2) for _ in range(4)]
    cases += [("meta cut", text[:c]) for c in cuts]
    cases += [("meta not JSON", b) for b in (b"\xff\xfe\x00garbage", b"not json", b"{'a': 1}",
                                             b"[" * 100_000, b"NaN")]
    cases += [("meta not an object", b) for b in (b"[]", b"null", b"42", b'"tdmpc"')]

    def changed(**kv):
        m = dict(meta)
        m.update(kv)
        return m

    wrong = {"format": ["other", None], "version": ["1", 2, 0, True, 1.0],
             "tasks": ["x", [1, 2], None], "obs_dim": ["3", 3.0, True, 0, -3],
             "action_dim": [None, [2]], "num_rows": [-5, None, "33"],
             "num_episodes": [6.5, "6"], "num_transitions": [None], "min_length": ["3"],
             "max_length": [[8]], "episodes_per_task": ["2", [1.5, 2, 2], None],
             "has_terminated": ["yes", 1, None]}
    cases += [("meta wrong type", changed(**{k: v})) for k, vs in wrong.items() for v in vs]
    for key in wrong:  # every entry but "source"
        cases.append(("meta key missing", {k: v for k, v in meta.items() if k != key}))
    off = {"num_rows": 1, "num_episodes": 1, "num_transitions": 1, "min_length": 1,
           "max_length": -1, "obs_dim": 1, "action_dim": -1}
    cases += [("meta counts disagree", changed(**{k: meta[k] + d})) for k, d in off.items()]
    cases += [("meta counts disagree", changed(num_rows=meta["num_rows"] - 1)),
              ("meta counts disagree", changed(episodes_per_task=[3, 2, 1])),
              ("meta counts disagree", changed(tasks=["x", "y", "z", "w"])),
              ("meta counts disagree", changed(tasks=["x", "y"], episodes_per_task=[2, 2])),
              ("meta counts disagree", changed(has_terminated=False))]
    return cases


def _array_cases(base: Dataset, rng) -> list[tuple[str, str, object]]:
    """(label, array name, new file content: bytes, "dir", None to delete, or an array)."""
    cases: list[tuple[str, str, object]] = []
    for name in _ARRAYS:
        data = (base.path / f"{name}.npy").read_bytes()
        hdr = _npy_header_len(data)
        cuts = [1, 8, 64, hdr - 1, hdr, hdr + 3, len(data) // 2, len(data) - 1]
        cases += [("npy cut", name, data[:c]) for c in cuts]
        cases += [("npy header flip", name, _flip_in(data, 0, hdr, rng)) for _ in range(8)]
        cases += [(f"{name} body flip", name, _flip_in(data, hdr, len(data), rng))
                  for _ in range(5)]
        cases += [("npy empty", name, b""), ("npy is a directory", name, "dir"),
                  ("npy deleted", name, None), ("npy is an npz", name, "npz"),
                  ("npy holds objects", name, np.array([{"a": 1}, None], dtype=object))]
    obs, action, reward = (np.array(getattr(base, k)) for k in ("obs", "action", "reward"))
    eps = np.array(base.episodes)
    cases += [("wrong dtype", "obs", obs.astype(np.float64)),
              ("wrong dtype", "obs", obs.astype(np.int32)),
              ("wrong dtype", "obs", obs > 0),
              ("wrong dtype", "obs", obs.astype(np.float16)),
              ("wrong dtype", "action", action.astype(np.float64)),
              ("wrong dtype", "action", np.zeros(action.shape, np.int64)),
              ("wrong dtype", "reward", reward.astype(np.float64)),
              ("wrong dtype", "terminated", np.array(base.terminated, bool)),
              ("wrong dtype", "terminated", np.array(base.terminated, np.float32)),
              ("wrong dtype", "episodes", eps.astype(np.int32)),
              ("wrong dtype", "episodes", eps.astype(np.float64)),
              ("wrong dtype", "obs", obs.astype(">f4"))]
    cases += [("wrong shape", "obs", obs[:, :2]), ("wrong shape", "obs", obs[:-1]),
              ("wrong shape", "obs", obs[:, :, None]), ("wrong shape", "obs", obs[:, 0]),
              ("wrong shape", "obs", np.asfortranarray(obs.T)),
              ("wrong shape", "action", action[:, :1]),
              ("wrong shape", "reward", reward[:, None]), ("wrong shape", "reward", reward[1:]),
              ("wrong shape", "terminated", np.array(base.terminated)[:-2]),
              ("wrong shape", "episodes", eps[:, :2]), ("wrong shape", "episodes", eps[:-1]),
              ("wrong shape", "episodes", eps.reshape(-1)),
              ("wrong shape", "episodes", np.array(7, np.int64))]
    mid = int(eps[3, 0]) + 2  # a row that is no episode's first: its action/reward are data
    for name, arr in (("obs", obs), ("action", action), ("reward", reward)):
        for value in (np.nan, np.inf, -np.inf):
            bad = arr.copy()
            bad[mid] = value
            cases.append(("NaN/Inf value", name, bad))
    for value in (2, 255):
        flags = np.array(base.terminated)
        flags[mid] = value
        cases.append(("termination flag not 0/1", "terminated", flags))
    return cases + _table_cases(eps)


def _table_cases(eps: np.ndarray) -> list[tuple[str, str, object]]:
    """Episode tables of the right shape and dtype whose content is impossible."""
    first, length = eps[:, 0], eps[:, 1]
    edits = [(0, 0, -1), (0, 0, 2**63 - 1), (5, 0, first[5] + 1),  # (episode, column, value)
             (2, 1, 0), (2, 1, -3), (5, 1, length[5] + 1), (0, 1, 2**62),
             (1, 2, -1), (1, 2, 3), (4, 2, 2**40)]  # three tasks: 0, 1, 2
    cases = []
    for i, col, value in edits:
        bad = eps.copy()
        bad[i, col] = value
        cases.append(("episode table out of range", "episodes", bad))
    swapped = eps.copy()
    swapped[[1, 2]] = swapped[[2, 1]]
    reversed_ = eps[::-1].copy()
    overlap = eps.copy()
    overlap[2, 0] -= 1
    overlap[2, 1] += 1
    overlap2 = eps.copy()
    overlap2[3, 0] = overlap2[2, 0]
    gap = eps.copy()
    gap[4, 0] += 1
    gap[4, 1] -= 1
    same_start = eps.copy()
    same_start[:, 0] = 0
    cases += [("episode table not monotonic", "episodes", swapped),
              ("episode table not monotonic", "episodes", reversed_),
              ("episode table overlapping", "episodes", overlap),
              ("episode table overlapping", "episodes", overlap2),
              ("episode table overlapping", "episodes", same_start),
              ("episode table with a gap", "episodes", gap)]
    return cases


def _flip_in(data: bytes, lo: int, hi: int, rng) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 3))):
        b[rng.randrange(lo, hi)] ^= 1 << rng.randrange(8)
    return bytes(b)


def _write_case(path: Path, name: str, content) -> None:
    f = path / f"{name}.npy"
    f.unlink()
    if isinstance(content, bytes):
        f.write_bytes(content)
    elif isinstance(content, str) and content == "dir":
        f.mkdir()
    elif isinstance(content, str) and content == "npz":
        with open(f, "wb") as out:
            np.savez(out, a=np.zeros(3))
    elif content is not None:
        np.save(f, content, allow_pickle=content.dtype == object)


def _sample_everything(ds: Dataset) -> None:
    """A random batch, then every subsequence of 2 observations of every episode."""
    sampler = SequenceSampler(ds, 8, 1, seed=SEED, task_map=np.arange(len(ds.tasks)))
    sampler.sample()
    eps = np.asarray(ds.episodes)
    starts = np.concatenate([np.arange(f, f + n - 1) for f, n, _ in eps])
    sampler.batch_at(starts[:, None] + np.arange(2), np.repeat(eps[:, 2], eps[:, 1] - 1))


def _same_data(ds: Dataset, base: Dataset) -> bool:
    return ds.meta == base.meta and all(
        np.array_equal(np.asarray(getattr(ds, k)), np.asarray(getattr(base, k)),
                       equal_nan=k not in ("terminated", "episodes")) for k in _ARRAYS)


def _dataset_outcome(path: Path, base: Dataset, capsys) -> str:
    """"refused at open" / "refused at sampling" (one-line DataError), or, when it loads and
    samples, "identical" (data equal to the undamaged dataset) or "changed"."""
    try:
        ds = Dataset(path)
    except DataError as e:
        _one_line(e)
        capsys.readouterr()
        assert main(["data", "info", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        return "refused at open"
    try:
        _sample_everything(ds)
    except DataError as e:
        _one_line(e)
        return "refused at sampling"
    return "identical" if _same_data(ds, base) else "changed"


def _one_line(e: Exception) -> None:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg


def test_fuzz_dataset_loading(tmp_path, capsys):
    """Every damaged dataset directory is refused with one DataError line (by Dataset(), by
    ``tdmpc-opt data info`` with exit code 2, or by the sampler when a batch holds NaN/Inf or
    a termination flag other than 0/1), never another exception.

    Except: the format has no content checksum (one would cost a full read of the data at every
    open, and datasets are memory-mapped so that opening reads nothing but the episode table).
    So a flipped bit in the body of obs/action/reward/terminated that leaves a finite value
    (or a flag 0/1) loads: counted as "changed" (undetectable without a checksum). A flip may
    also leave the same data: in a header (``<f4`` -> ``=f4``, format version 1.0 -> 3.0) or in
    the payload of a step-0 NaN filler: "identical". Episode tables are always checked (tiling,
    ranges, counts), so their flips are refused.
    """
    rng = random.Random(SEED)
    base = _dataset_base(tmp_path)
    meta = json.loads((base.path / "meta.json").read_text())
    strict: dict[str, int] = {}
    lenient: dict[str, dict[str, int]] = {}
    n = 0

    def record(label: str, outcome: str) -> None:
        if label.endswith("flip") and not label.startswith("episodes"):
            allowed = ({"refused at open", "identical"} if label == "npy header flip"
                       else {"refused at sampling", "identical", "changed"})
            assert outcome in allowed, (label, outcome)
            lenient.setdefault(label, {}).setdefault(outcome, 0)
            lenient[label][outcome] += 1
        else:
            assert outcome.startswith("refused"), (label, outcome)
            strict[outcome] = strict.get(outcome, 0) + 1

    for label, content in _meta_cases(meta, rng):
        n += 1
        path = tmp_path / f"case{n}"
        shutil.copytree(base.path, path)
        data = content if isinstance(content, bytes) else json.dumps(content).encode()
        (path / "meta.json").write_bytes(data)
        record(label, _dataset_outcome(path, base, capsys))
    for label, name, content in _array_cases(base, rng):
        n += 1
        path = tmp_path / f"case{n}"
        shutil.copytree(base.path, path)
        _write_case(path, name, content)
        record(label, _dataset_outcome(path, base, capsys))
    for make in ("no meta", "meta is a directory", "a file", "missing"):
        n += 1
        path = tmp_path / f"case{n}"
        if make == "a file":
            path.write_bytes(b"{}")
        elif make != "missing":
            shutil.copytree(base.path, path)
            (path / "meta.json").unlink()
            if make == "meta is a directory":
                (path / "meta.json").mkdir()
        record(make, _dataset_outcome(path, base, capsys))
    flips = {k: sum(v.values()) for k, v in lenient.items()}
    print(f"fuzzed {n} damaged datasets: must refuse {strict}; bit flips {lenient}")
    assert n == sum(strict.values()) + sum(flips.values())
    assert strict["refused at sampling"] >= 11  # the NaN/Inf/flag cases: found when sampled
    assert sum(strict.values()) >= 180 and n >= 250


# --------------------------------------------------------------------- published .pt files
class _WritesAFile:
    """Unpickling this would run ``exec`` and create the file ``target``."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (exec, (f"open({str(self.target)!r}, 'w').write('owned')",))


def _official_cases(good: Path, tmp_path: Path, target: Path, rng) -> list[tuple[str, Path]]:
    data = good.read_bytes()
    cases: list[tuple[str, object]] = []
    cuts = [1, 4, 30, 100, len(data) // 3, len(data) // 2, len(data) - 22, len(data) - 1]
    cuts += [rng.randrange(1, len(data)) for _ in range(8)]
    cases += [("cut", data[:c]) for c in cuts]
    cases += [("flip", _flip_in(data, 0, len(data), rng)) for _ in range(40)]
    cases += [("empty", b""), ("not a PyTorch file", b"chunk_0 of MT30\n")]
    evil = _WritesAFile(target)
    cases.append(("unsafe pickle", pickle.dumps(evil, protocol=2)))  # legacy, non-zip layout
    out = []
    for i, (label, blob) in enumerate(cases):
        path = tmp_path / f"official{i}.pt"
        path.write_bytes(blob)
        out.append((label, path))
    obs, action, reward, task = make_episodes(3, 6, 5, 2, 3, seed=2)
    fields = {"obs": torch.from_numpy(obs), "action": torch.from_numpy(action),
              "reward": torch.from_numpy(reward), "task": torch.from_numpy(task)}
    torch.save({**fields, "obs": evil}, tmp_path / "evil0.pt")
    torch.save([evil, fields], tmp_path / "evil1.pt")
    with official_layout._fake_tensordict("tensordict.tensordict"):
        td = official_layout.TensorDict(fields, (3, 6))
        td._cache = evil  # inside the allow-listed TensorDict's state
        torch.save(td, tmp_path / "evil2.pt")
        td = official_layout.TensorDict(fields, (3, 6))
        td._tensordict = list(fields.values())  # entries that are no mapping
        torch.save(td, tmp_path / "odd0.pt")
    torch.save({1: fields["obs"], "obs": fields["obs"]}, tmp_path / "odd1.pt")
    out += [("unsafe pickle", tmp_path / f"evil{i}.pt") for i in range(3)]
    out += [("odd content", tmp_path / f"odd{i}.pt") for i in range(2)]
    for name, value in (("obs", np.nan), ("action", np.inf), ("reward", -np.inf)):
        arr = {"obs": obs, "action": action, "reward": reward}[name].copy()
        arr[1, 3] = value
        out.append(("NaN/Inf value", write_official(
            tmp_path / f"nan_{name}.pt", **{"obs": obs, "action": action, "reward": reward,
                                             "task": task, name: arr})))
    (tmp_path / "adir.pt").mkdir()
    out.append(("directory", tmp_path / "adir.pt"))
    return out


def _same_tensors(got: dict, want: dict) -> bool:
    """Equal values (NaN equal to NaN) and dtypes; ``got`` may leave out step 0 of actions and
    rewards."""
    def cut(k, t):
        return t[:, 1:] if got[k].shape[1] < t.shape[1] else t

    return all(got[k].dtype == want[k].dtype and torch.equal(
        torch.nan_to_num(got[k].double(), 7.0), torch.nan_to_num(cut(k, want[k]).double(), 7.0))
        for k in got)


def test_fuzz_official_dataset_files(tmp_path, capsys):
    """Damaged published (TensorDict .pt) files: ``convert_official`` refuses every one with a
    one-line DataError and writes nothing, and no pickle runs code.

    ``read_official`` alone memory-maps the tensors and only checks the CRC-32 of the pickle,
    so a flipped bit inside tensor data reads as "changed"; ``convert_official`` checks every
    CRC-32 that ``torch.save`` recorded and refuses those too. A flip in bytes nothing reads
    (zip padding, local header copies of central directory fields) leaves the data "identical".
    """
    rng = random.Random(SEED)
    good = write_official(tmp_path / "good.pt", *make_episodes(3, 6, 5, 2, 3, seed=1))
    want = read_official(good, mmap=False)
    target = tmp_path / "owned.txt"
    reads: dict[str, int] = {}
    converts: dict[str, int] = {}
    cli_checked = 0
    cases = _official_cases(good, tmp_path, target, rng)
    for i, (label, path) in enumerate(cases):
        try:
            got = read_official(path)
            outcome = "identical" if _same_tensors(got, want) else "changed"
            assert label in ("flip", "NaN/Inf value"), (label, outcome)
        except DataError as e:
            _one_line(e)
            outcome = "refused"
        reads[outcome] = reads.get(outcome, 0) + 1
        out = tmp_path / f"converted{i}"
        try:
            convert_official([path], out, ("a", "b", "c"))
            outcome = "identical" if _same_tensors(_rows(Dataset(out)), want) else "changed"
            assert (label, outcome) == ("flip", "identical"), (label, outcome)
        except DataError as e:
            _one_line(e)
            outcome = "refused"
            assert not out.exists() and not (tmp_path / f".{out.name}.partial").exists()
            if i % 4 == 0 or label != "flip":  # the CLI on a share of the refused files
                capsys.readouterr()
                assert main(["data", "convert", str(path), "--out", str(out), "--quiet",
                             "--tasks", "walker-walk,cartpole-balance,pendulum-swingup"]) == 2
                err = capsys.readouterr().err
                assert err.startswith("error: ") and err.count("\n") == 1, err
                assert not out.exists()
                cli_checked += 1
        converts[outcome] = converts.get(outcome, 0) + 1
        assert not target.exists(), f"{label}: unpickling ran code"
    print(f"fuzzed {len(cases)} damaged published files: read_official {reads}, "
          f"convert_official {converts}, {cli_checked} through the CLI")
    assert converts.get("changed", 0) == 0 and reads["refused"] >= 40
    assert converts["refused"] >= 50 and len(cases) >= 60
    pickle.loads(pickle.dumps(_WritesAFile(target)))  # the payload is real: plain pickle runs it
    assert target.read_text() == "owned"


def _rows(ds: Dataset) -> dict[str, torch.Tensor]:
    """A converted dataset back in the published [E, T, ...] layout (equal-length episodes);
    step 0's filler action and reward are NaN in our format, so they are left out."""
    e = ds.num_episodes
    rows = {"obs": np.asarray(ds.obs).reshape(e, -1, ds.obs.shape[1]),
            "action": np.asarray(ds.action).reshape(e, -1, ds.action.shape[1])[:, 1:],
            "reward": np.asarray(ds.reward).reshape(e, -1)[:, 1:]}
    return {k: torch.from_numpy(v.copy()) for k, v in rows.items()}
