"""Datasets: the published layout, conversion, our memory-mapped format, sampling, replay."""

from __future__ import annotations

import pickle
import zipfile

import numpy as np
import pytest
import torch

from official_layout import make_episodes, write_official
from tdmpc_opt.data import Dataset, DatasetWriter, convert_official, read_official
from tdmpc_opt.errors import DataError
from tdmpc_opt.replay import ReplayBuffer, SequenceSampler
from tdmpc_opt.tasks import TASK_SETS

MT30 = TASK_SETS["mt30"]


@pytest.fixture
def chunks(tmp_path):
    """Two files in the published layout (tensordict 0.2 and >= 0.3 class paths)."""
    a = make_episodes(6, 21, 24, 6, 30, seed=1)
    b = make_episodes(4, 21, 24, 6, 30, seed=2)
    b[0][:, :, 0] += 6  # episode numbers continue across files
    return [write_official(tmp_path / "chunk_0.pt", *a),
            write_official(tmp_path / "chunk_1.pt", *b, td_module="tensordict._td")], (a, b)


def test_file_is_a_tensordict_pickle(chunks):
    """The helper writes what the published files are: pickles naming tensordict classes,
    which torch's plain weights-only loader refuses."""
    (path, _), _ = chunks
    with zipfile.ZipFile(path) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert b"tensordict.tensordict\nTensorDict" in pkl
    assert b"tensordict.utils\n_StringOnlyDict" in pkl
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def test_read_official_layout(chunks):
    (path, _), ((obs, action, reward, task), _) = chunks
    d = read_official(path)
    assert d["obs"].shape == (6, 21, 24) and d["task"].dtype == torch.int32
    assert torch.equal(d["obs"], torch.from_numpy(obs))
    assert torch.equal(d["reward"][:, 1:], torch.from_numpy(reward[:, 1:]))


def test_plain_dict_file_is_read(tmp_path):
    path = write_official(tmp_path / "d.pt", *make_episodes(2, 5, 4, 2, 1), plain_dict=True)
    assert read_official(path)["action"].shape == (2, 5, 2)


def test_convert_round_trip(chunks, tmp_path):
    files, ((o1, a1, r1, t1), (o2, a2, r2, t2)) = chunks
    ds = convert_official(files, tmp_path / "out", MT30, chunk=4)
    assert (ds.num_episodes, len(ds), ds.tasks) == (10, 200, MT30)
    np.testing.assert_array_equal(ds.obs.reshape(10, 21, 24), np.concatenate([o1, o2]))
    acts = ds.action.reshape(10, 21, 6)
    np.testing.assert_array_equal(acts[:, 1:], np.concatenate([a1, a2])[:, 1:])
    assert np.isnan(acts[:, 0]).all() and np.isnan(ds.reward.reshape(10, 21)[:, 0]).all()
    np.testing.assert_array_equal(ds.episodes[:, 2], np.concatenate([t1, t2])[:, 0])
    assert isinstance(ds.obs, np.memmap)
    assert Dataset(tmp_path / "out").meta["episodes_per_task"][:7] == [2] * 4 + [1] * 2 + [0]


def _bad(tmp_path, **change):
    obs, action, reward, task = make_episodes(3, 6, 24, 6, 30)
    arrays = {"obs": obs, "action": action, "reward": reward, "task": task}
    for k, f in change.items():
        arrays[k] = f(arrays[k])
    return write_official(tmp_path / "bad.pt", **arrays)


@pytest.mark.parametrize("change, message", [
    ({"obs": lambda x: x[:, :, 0]}, "wrong layout"),
    ({"reward": lambda x: x[:, :4]}, "wrong layout"),
])
def test_wrong_layout(tmp_path, change, message):
    with pytest.raises(DataError, match=message):
        read_official(_bad(tmp_path, **change))


def test_missing_key(tmp_path):
    obs, action, reward, _ = make_episodes(2, 5, 4, 2, 1)
    torch.save({"obs": torch.from_numpy(obs), "action": torch.from_numpy(action),
                "reward": torch.from_numpy(reward)}, tmp_path / "x.pt")
    with pytest.raises(DataError, match="need tensors obs, action, reward, task"):
        read_official(tmp_path / "x.pt")


def test_task_index_beyond_task_set(tmp_path):
    def shift(t):
        t = t.copy()
        t[2] = 30
        return t

    with pytest.raises(DataError, match="episode 2 has task index 30, outside the task set of "
                                        "30 tasks"):
        convert_official([_bad(tmp_path, task=shift)], tmp_path / "o", MT30)
    assert not (tmp_path / "o").exists() and not (tmp_path / ".o.partial").exists()


def test_nan_reward(tmp_path):
    def poison(r):
        r = r.copy()
        r[1, 3] = np.nan
        return r

    with pytest.raises(DataError, match="reward of episode 1 at step 3 is NaN"):
        convert_official([_bad(tmp_path, reward=poison)], tmp_path / "o", MT30)


def test_task_changing_mid_episode(tmp_path):
    def mix(t):
        t = t.copy()
        t[0, 4] = 1
        return t

    with pytest.raises(DataError, match="episode 0 changes task"):
        convert_official([_bad(tmp_path, task=mix)], tmp_path / "o", MT30)


def test_unsafe_pickle_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"obs": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DataError, match="refused to load"):
        read_official(tmp_path / "evil.pt")


def test_not_a_file(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable dataset file"):
        read_official(tmp_path / "junk.pt")
    with pytest.raises(DataError, match="no such dataset file"):
        read_official(tmp_path / "missing.pt")


def test_dataset_errors(tmp_path, chunks):
    with pytest.raises(DataError, match="data convert"):
        Dataset(chunks[0][0].parent)  # a folder of .pt files
    ds = convert_official(chunks[0][:1], tmp_path / "out", MT30)
    np.save(ds.path / "reward.npy", np.zeros(3, np.float32))
    with pytest.raises(DataError, match="reward.npy: shape"):
        Dataset(ds.path)


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError), DatasetWriter(tmp_path / "w", ("a",), 3, 1) as w:
        w.add_episodes(np.zeros((1, 4, 3)), np.zeros((1, 4, 1)), np.zeros((1, 4)), [0])
        raise RuntimeError("crash")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- sampler
@pytest.fixture
def dataset(tmp_path):
    """Episodes of lengths 3..9 whose obs encode (episode, step); tasks 0, 1, 2."""
    w = DatasetWriter(tmp_path / "ds", ("x", "y", "z"), 2, 1, terminated=True)
    for e in range(7):
        n = 3 + e
        obs = np.stack([np.full(n, e), np.arange(n)], -1)[None].astype(np.float32)
        w.add_episodes(obs, np.arange(n, dtype=np.float32).reshape(1, n, 1),
                       np.arange(n, dtype=np.float32)[None] * 10, np.array([e % 3]),
                       terminated=(np.arange(n) == n - 1)[None])
    return w.close()


def test_sampler_subsequences(dataset):
    s = SequenceSampler(dataset, 64, 3, seed=0, task_map=np.array([5, 6, 7]))
    for _ in range(20):
        b = s.sample()
        assert b.obs.shape == (4, 64, 2) and b.action.shape == (3, 64, 1)
        ep, step = b.obs[..., 0], b.obs[..., 1]
        assert (ep == ep[0]).all(), "a subsequence crossed an episode boundary"
        assert (step == step[0] + torch.arange(4)[:, None]).all()
        assert (ep[0] >= 1).all(), "episode 0 (3 observations) is too short for H=3"
        assert torch.equal(b.action[..., 0], step[1:]) and torch.equal(b.reward[..., 0],
                                                                        10 * step[1:])
        assert torch.equal(b.task, torch.tensor([5, 6, 7])[ep[0].long() % 3])
        last = step[1:] == (3 + ep[1:])  - 1
        assert torch.equal(b.terminated[..., 0].bool(), last)


def test_sampler_is_reproducible_and_resumable(dataset):
    a = SequenceSampler(dataset, 8, 2, seed=3)
    a.sample()
    state = a.state_dict()
    want = a.sample()
    b = SequenceSampler(dataset, 8, 2, seed=99)
    b.load_state_dict(state)
    got = b.sample()
    assert torch.equal(want.obs, got.obs) and want.task is None


def test_sampler_needs_long_enough_episodes(dataset):
    with pytest.raises(DataError, match="no episode has the 11 observations"):
        SequenceSampler(dataset, 4, 10).sample()


def test_replay_buffer_drops_oldest(dataset):
    buf = ReplayBuffer(capacity=10, obs_dim=2, action_dim=1)
    for e in range(4):
        obs = np.full((4, 2), e, np.float32)
        buf.add(obs, np.zeros((4, 1)), np.zeros(4))
    assert buf.num_episodes == 2 and len(buf) == 6
    assert sorted(buf.obs[buf.episodes[:, 0], 0]) == [2.0, 3.0]
    b = SequenceSampler(buf, 16, 2, seed=0).sample()
    assert set(b.obs[0, :, 0].tolist()) <= {2.0, 3.0}
    clone = ReplayBuffer(10, 2, 1)
    clone.load_state_dict(buf.state_dict())
    np.testing.assert_array_equal(clone.episodes, buf.episodes)
