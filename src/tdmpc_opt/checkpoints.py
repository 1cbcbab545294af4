"""Checkpoints: safe loading of published TD-MPC2 / TD-MPC-Opt files and our own format.

Published checkpoints are PyTorch files holding ``{"model": state_dict}`` in one of two key
layouts (see :func:`migrate_official_keys`), in float32/16, bfloat16 or torch-quantized
tensors. They are read with ``torch.load(weights_only=True)``, which refuses any pickle that
would construct arbitrary objects, so a malicious file cannot run code.

Our own format is a safetensors file: the world model's state dict (keys as in
:class:`~tdmpc_opt.world_model.WorldModel`) plus string metadata: ``format``,
``format_version``, ``model_config`` (JSON) and ``extra`` (JSON), and a ``sha256`` of the
tensor bytes that is verified on load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path

import torch

from tdmpc_opt.config import ModelConfig, config_from_dict, config_to_dict
from tdmpc_opt.errors import CheckpointError, ConfigError, OutputError, TdmpcError
from tdmpc_opt.tasks import TASKS, task_set_for_count

FORMAT = "tdmpc-opt"
FORMAT_VERSION = 1
_Q_NAMES = ("weight", "bias", "ln.weight", "ln.bias")
_DROPPED_KEYS = re.compile(r"^(_detach_Qs_params\.|log_std_min$|log_std_dif$|_action_masks$)"
                           r"|(^|\.)__(batch_size|device)$")


# ------------------------------------------------------------------------------- files
def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@functools.cache
def _new_file_mode() -> int:
    """Permissions of a file this process creates with ``open``: ``0o666`` less the umask
    (read once: setting the umask to read it is not thread-safe, so only done once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file.

    The previous file at ``path`` survives any failure (full disk included). A failure to
    write raises :class:`~tdmpc_opt.errors.OutputError` (an ``OSError`` too). The file gets
    the permissions of any other file the user creates (safetensors writes ``0o600``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.chmod(tmp, _new_file_mode())
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(e, OutputError):
            raise
        raise OutputError(e.errno, e.strerror or str(e), str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data, indent: int = 1) -> None:
    """Write ``data`` as JSON with :func:`atomic_write` (never half a file)."""
    text = json.dumps(data, indent=indent) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _check_file(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file")


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < n < (1 << 32)


def tensor_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and bytes of a state dict, in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the raw tensors and metadata of a checkpoint (``.pt`` or safetensors).

    Returns ``(state_dict, meta)``; ``meta`` is empty for PyTorch files, except for a training
    checkpoint (a run directory's ``checkpoints/step-N.pt``), whose world model's tensors are
    returned with ``meta = {"training_checkpoint": "1"}``.
    Raises:
        CheckpointError: missing, empty, truncated, unsafe or unrecognised file.
    """
    path = Path(path)
    _check_file(path)
    if _is_safetensors(path):
        return _read_safetensors(path)
    return _read_torch(path)


def _unpickling_reason(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    found = [ln for ln in lines if "nsupported" in ln or "GLOBAL" in ln]
    return (found or lines or [type(e).__name__])[0][:200]


def _check_zip_crc(path: Path) -> None:
    """PyTorch's zip files carry a CRC-32 per record that ``torch.load`` does not check; check
    it, so a flipped bit in a weight is an error rather than a silently different model."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): "
                              f"{str(e)[:200]}") from None
    if bad is not None:
        raise CheckpointError(f"{path}: corrupted checkpoint (checksum mismatch in {bad})")


def _read_torch(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04" and magic[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a checkpoint (neither a PyTorch nor a safetensors "
                              "file)")
    if magic == b"PK\x03\x04":
        _check_zip_crc(path)
    from safetensors import SafetensorError  # torch.load reads *.safetensors names with it

    try:
        with warnings.catch_warnings():  # torch's notes on old formats: the error line says it
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused to load: the file asks to build objects other "
                              f"than tensors, which could run code ({_unpickling_reason(e)})"
                              ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError,
            AttributeError, IndexError, TypeError, UnicodeDecodeError, SafetensorError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupted?): "
                              f"{first[:200]}") from None
    meta = {}
    learner = obj.get("learner") if isinstance(obj, dict) else None
    if isinstance(learner, dict) and isinstance(learner.get("model"), dict):
        obj, meta = learner["model"], {"training_checkpoint": "1"}  # trainer.py's layout
    elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{path}: not a TD-MPC2 checkpoint (expected a dict of tensors, "
                              "optionally under 'model')")
    return dict(obj), meta


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupted safetensors file: {str(e)[:200]}") from None
    if meta.get("sha256") and meta["sha256"] != tensor_digest(state):
        raise CheckpointError(f"{path}: checksum mismatch, the file is corrupted")
    return state, meta


# ------------------------------------------------------------------------- conversion
def migrate_official_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename TD-MPC2 checkpoint keys to ours.

    * old API: ``_Qs.params.N`` / ``_target_Qs.params.N`` with ``N = 4*layer + k``,
      ``k`` indexing (weight, bias, ln.weight, ln.bias);
    * new API: ``_Qs.params.<layer>.<name>``, ``_target_Qs_params.<layer>.<name>``, plus
      ``_detach_Qs_params.*`` (a duplicate of ``_Qs``), ``__batch_size``/``__device`` entries
      and ``log_std_*``/``_action_masks`` buffers (derived from the config here), all dropped.
    """
    out = {}
    for key, val in state.items():
        if _DROPPED_KEYS.search(key):
            continue
        m = re.fullmatch(r"(_Qs|_target_Qs)\.params\.(\d+)", key)
        if m:
            n = int(m.group(2))
            out[f"{m.group(1)}.params.{n // 4}.{_Q_NAMES[n % 4]}"] = val
            continue
        if key.startswith("_target_Qs_params."):
            key = "_target_Qs.params." + key[len("_target_Qs_params."):]
        out[key] = val
    return out


def dequantize_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Turn every tensor into float32: torch-quantized ones are dequantized (scale, zero point).

    Raises:
        CheckpointError: a tensor is neither floating point nor quantized (e.g. int64).
    """
    for k, v in state.items():
        if not (v.is_floating_point() or v.is_quantized):
            raise CheckpointError(f"checkpoint tensor {k} has dtype {str(v.dtype)[6:]}; "
                                  "expected floating point or quantized weights")
    return {k: (v.dequantize() if v.is_quantized else v).float() for k, v in state.items()}


def _shape(state: dict, key: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"state dict fits no TD-MPC2 architecture: missing {key!r}")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"state dict fits no TD-MPC2 architecture: {key} has shape {shape}")
    return shape


def infer_model_config(state: dict[str, torch.Tensor], tasks: tuple[str, ...] | None = None,
                       **overrides) -> ModelConfig:
    """Derive the architecture from tensor shapes (state in our key layout).

    A multi-task model with 30 or 80 embeddings gets MT30 or MT80 task names; other counts
    need ``tasks``. ``overrides`` set fields the shapes do not determine (e.g. ``simnorm_dim``).
    """
    task_dim, num_tasks = 0, 0
    if "_task_emb.weight" in state:
        num_tasks, task_dim = _shape(state, "_task_emb.weight", 2)
    enc_layers = sum(1 for k in state if re.fullmatch(r"_encoder\.state\.\d+\.weight", k))
    enc_dim, enc_in = _shape(state, "_encoder.state.0.weight", 2)
    latent_dim = _shape(state, "_dynamics.2.weight", 2)[0]
    mlp_dim, dyn_in = _shape(state, "_dynamics.0.weight", 2)
    num_q = _shape(state, "_Qs.params.0.weight", 3)[0]
    num_bins = _shape(state, "_reward.2.weight", 2)[0]
    action_dim = dyn_in - latent_dim - task_dim
    obs_dim = enc_in - task_dim
    extra = _shape(state, "_pi.0.weight", 2)[1] - latent_dim - task_dim  # the policy reads [z, e]
    if extra > 0 and not task_dim:
        raise CheckpointError(f"state dict fits no TD-MPC2 architecture: its layers read a "
                              f"{extra}-value task embedding, but _task_emb.weight is missing")
    if action_dim <= 0 or obs_dim <= 0 or enc_layers < 2:
        raise CheckpointError("state dict fits no TD-MPC2 architecture (layer sizes disagree)")
    if tasks is None:
        tasks = task_set_for_count(num_tasks) if num_tasks else ()
        if tasks is None:
            raise CheckpointError(f"checkpoint has {num_tasks} task embeddings, which is no "
                                  "known task set; pass the task list explicitly")
    if num_tasks and len(tasks) != num_tasks:
        raise CheckpointError(f"checkpoint has {num_tasks} task embeddings but {len(tasks)} "
                              "tasks were given")
    infos = [TASKS[t] for t in tasks if t in TASKS]
    values = dict(
        obs_dim=obs_dim, action_dim=action_dim, tasks=tuple(tasks), task_dim=task_dim,
        action_dims=tuple(min(i.action_dim, action_dim) for i in infos) if num_tasks else (),
        episode_lengths=tuple(i.episode_length for i in infos),
        enc_dim=enc_dim, num_enc_layers=enc_layers, mlp_dim=mlp_dim, latent_dim=latent_dim,
        num_q=num_q, num_bins=num_bins if num_bins > 1 or "_reward.2.weight" in state else 0,
        episodic="_termination.0.weight" in state,
    )
    values.update(overrides)
    try:
        return ModelConfig(**values).validate()
    except (TypeError, ConfigError) as e:
        raise CheckpointError(f"state dict fits no TD-MPC2 architecture: {e}") from None


def check_finite(state: dict[str, torch.Tensor]) -> None:
    """Raise :class:`CheckpointError` naming the first tensor with a NaN or Inf."""
    for k, v in state.items():
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise CheckpointError(f"checkpoint tensor {k} contains NaN or Inf values")


# ------------------------------------------------------------------------ load & save
def build_model(state: dict[str, torch.Tensor], cfg: ModelConfig, device="cpu"):
    """Instantiate a :class:`WorldModel` for ``cfg`` and load ``state`` (float) into it."""
    from tdmpc_opt.world_model import WorldModel

    state = dict(state)
    if not any(k.startswith("_target_Qs.") for k in state):  # files saved without targets
        state.update({"_target_Qs." + k[len("_Qs."):]: v for k, v in state.items()
                      if k.startswith("_Qs.")})
    model = WorldModel(cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise CheckpointError(f"state dict fits no TD-MPC2 architecture: {detail[:300]}") from None
    return model.to(device).eval()


def load_world_model(path: str | Path, device="cpu", tasks: tuple[str, ...] | None = None,
                     **overrides):
    """Load any supported checkpoint into a float32 :class:`WorldModel` in eval mode.

    Returns ``(model, meta)`` where ``meta`` holds the file's metadata plus ``sha256``,
    ``source_format`` (``torch`` or ``tdmpc-opt``) and ``source_dtypes``.
    Raises:
        CheckpointError: anything wrong with the file (never a bare traceback).
    """
    path = Path(path)
    state, meta = read_state_dict(path)
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in state.values()})
    try:
        if meta.get("format") == FORMAT:
            state, cfg = _decode_own(state, meta, tasks, overrides)
        elif meta.get("training_checkpoint"):
            cfg = _config_with(_training_model_config(path), tasks, overrides)
        else:
            state = dequantize_state(migrate_official_keys(state))
            cfg = infer_model_config(state, tasks, **overrides)
        check_finite(state)
        model = build_model(state, cfg, device)
    except CheckpointError as e:  # name the file in every message
        if str(e).startswith(str(path)):
            raise
        raise CheckpointError(f"{path}: {e}") from None
    info = dict(meta, sha256=file_sha256(path), source_dtypes=dtypes,
                source_format="tdmpc-opt" if meta.get("format") == FORMAT else
                "tdmpc-opt training checkpoint" if meta.get("training_checkpoint") else "torch")
    if meta.get("training_checkpoint"):
        _check_training_checksum(path, info["sha256"])
    return model, info


def _training_model_config(path: Path) -> dict:
    """The model settings of the run a training checkpoint ``RUN/checkpoints/step-N.pt``
    belongs to (``RUN/config.json``'s ``model``)."""
    run_config = path.parent.parent / "config.json"
    try:
        return json.loads(run_config.read_text())["model"]
    except FileNotFoundError:
        raise CheckpointError(f"{path} is a training checkpoint; its model settings are in its "
                              f"run directory's config.json, and {run_config} does not exist"
                              ) from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{run_config}: unreadable run settings ({str(e)[:120]})"
                              ) from None


def _check_training_checksum(path: Path, sha256: str) -> None:
    """A training checkpoint's ``step-N.json`` beside it records its sha256: compare."""
    side = path.with_suffix(".json")
    try:
        recorded = json.loads(side.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError):
        return  # no record (a copied file): the zip records' CRCs were checked
    if recorded and recorded != sha256:
        raise CheckpointError(f"{path}: checksum mismatch with {side.name}; the file is "
                              "corrupted or was replaced")


def _decode_own(state, meta, tasks, overrides):
    try:
        version = int(meta.get("format_version", "0"))
        cfg_dict = json.loads(meta["model_config"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"tdmpc-opt checkpoint with bad metadata: {e}") from None
    if version > FORMAT_VERSION:
        raise CheckpointError(f"checkpoint format version {version} is newer than this "
                              f"tdmpc-opt understands ({FORMAT_VERSION}); upgrade tdmpc-opt")
    cfg = _config_with(cfg_dict, tasks, overrides)
    if meta.get("quantization"):
        from tdmpc_opt.quantization import dequantize_stored

        try:
            state = dequantize_stored(state, quantization_metadata(meta))
        except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
            raise CheckpointError(f"tdmpc-opt checkpoint with bad quantization metadata: "
                                  f"{str(e)[:200]}") from None
    return {k: v.float() for k, v in state.items()}, cfg


def _config_with(cfg_dict: dict, tasks: tuple[str, ...] | None, overrides: dict) -> ModelConfig:
    """A stored model config with the caller's task names and overrides applied, validated."""
    try:
        cfg = config_from_dict(ModelConfig, cfg_dict)
        if tasks is not None:
            overrides = dict(overrides, tasks=tuple(tasks))
        if overrides:
            import dataclasses

            cfg = dataclasses.replace(cfg, **overrides)
        return cfg.validate()
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"tdmpc-opt checkpoint with bad model_config: {e}") from None


def quantization_metadata(meta: dict) -> dict | None:
    """The ``quantization`` entry of a checkpoint's metadata, decoded (None if absent)."""
    if not meta.get("quantization"):
        return None
    try:
        value = json.loads(meta["quantization"])
    except ValueError as e:
        raise CheckpointError(f"tdmpc-opt checkpoint with bad quantization metadata (not "
                              f"JSON: {e})") from None
    if not isinstance(value, dict):
        raise CheckpointError("tdmpc-opt checkpoint with bad quantization metadata (expected "
                              f"a JSON object, got {type(value).__name__})")
    return value


def encode_metadata(cfg: ModelConfig, state: dict[str, torch.Tensor],
                    extra: dict | None = None, quantization: dict | None = None) -> dict:
    """String metadata of our format for ``state`` (checksum included)."""
    meta = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
            "model_config": json.dumps(config_to_dict(cfg)), "extra": json.dumps(extra or {}),
            "sha256": tensor_digest(state)}
    if quantization:
        meta["quantization"] = json.dumps(quantization)
    return meta


def save_tensors(path: str | Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    """Atomically write tensors and string metadata as a safetensors file."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def save_checkpoint(path: str | Path, model, extra: dict | None = None,
                    dtype: torch.dtype | None = None) -> None:
    """Save a world model in our safetensors format (optionally cast to ``dtype``)."""
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    save_tensors(path, state, encode_metadata(model.cfg, state, extra))


def save_official(path: str | Path, model, dtype: torch.dtype = torch.float32) -> None:
    """Write a TD-MPC2 ``.pt`` checkpoint (``{"model": state_dict}``, old Q key layout) that the
    original code loads (its loader migrates the old layout)."""
    out = {}
    for key, val in model.state_dict().items():
        m = re.fullmatch(r"(_Qs|_target_Qs)\.params\.(\d+)\.(.+)", key)
        if m:
            key = f"{m.group(1)}.params.{4 * int(m.group(2)) + _Q_NAMES.index(m.group(3))}"
        out[key] = val.detach().cpu().to(dtype)
    atomic_write(path, lambda tmp: torch.save({"model": out}, tmp))


def describe(path: str | Path) -> dict:
    """Summary of a checkpoint for ``tdmpc-opt info``."""
    path = Path(path)
    state, meta = read_state_dict(path)
    model, info = load_world_model(path)
    cfg = model.cfg
    return {
        "path": str(path), "sha256": info["sha256"], "format": info["source_format"],
        "file_bytes": path.stat().st_size, "stored_dtypes": info["source_dtypes"],
        "stored_numbers": sum(v.numel() for v in state.values()),
        "learnable_params": model.learnable_parameters(),
        "total_params": sum(p.numel() for p in model.parameters()),
        "multitask": cfg.multitask, "num_tasks": cfg.num_tasks,
        "task_set": next((n for n in ("mt30", "mt80") if cfg.tasks and n == _set_name(cfg)),
                         None),
        "tasks": list(cfg.tasks), "model_config": config_to_dict(cfg),
        "quantization": quantization_metadata(meta),
    }


def _set_name(cfg: ModelConfig) -> str | None:
    from tdmpc_opt.tasks import TASK_SETS

    return next((n for n, names in TASK_SETS.items() if names == cfg.tasks), None)


__all__ = ["load_world_model", "save_checkpoint", "save_official", "read_state_dict",
           "migrate_official_keys", "infer_model_config", "describe", "atomic_write",
           "file_sha256", "TdmpcError"]
