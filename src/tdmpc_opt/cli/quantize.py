"""Quantize a float checkpoint after training: fp16, bf16, int8 or int8-dynamic.

int8 stores linear weights as int8 with one float scale per output channel (LayerNorm
parameters, biases, the task embedding, the encoder and the reward/Q/policy output layers
stay float16; see docs/quantization.md). int8-dynamic is the same file, planned with int8
activations when loaded with tdmpc_opt.quantization.load_fast_agent. Target Q-networks are
dropped (inference never uses them) unless --keep-target-q. Output: tdmpc-opt safetensors,
loadable like any checkpoint (load_agent dequantizes to float32).

Examples:
  tdmpc-opt quantize --checkpoint ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt \\
      --format int8 --out student-int8.safetensors
  tdmpc-opt quantize --checkpoint model.pt --format int8-dynamic --out m.safetensors \\
      --calibrate-data calib/
"""

from __future__ import annotations

NAME = "quantize"
HELP = "quantize a checkpoint (fp16, bf16, int8, int8-dynamic)"


def add_arguments(p):
    from tdmpc_opt.cli._common import output_file, positive_int

    p.add_argument("--checkpoint", required=True, help="float checkpoint (.pt or .safetensors)")
    p.add_argument("--format", required=True, dest="fmt",
                   help="fp16, bf16, int8 or int8-dynamic")
    p.add_argument("--out", required=True, type=output_file, help="output file (.safetensors)")
    p.add_argument("--calibrate-data", default=None, metavar="DIR",
                   help="a tdmpc-opt dataset folder, or a folder of *.npz files with 'obs' "
                        "[N, D] and 'task' [N] arrays: int8 formats then pick per-channel "
                        "clip ratios minimising each layer's output error on them")
    p.add_argument("--calibrate-rows", type=positive_int, default=4096,
                   help="observations used for calibration (evenly spaced; default 4096)")
    p.add_argument("--keep-target-q", action="store_true",
                   help="keep the target Q-networks (needed only to resume training)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output file if it exists (refused otherwise)")


def load_calibration(directory: str, cfg, rows: int = 4096):
    """``(obs [M, obs_dim], task [M] or None)`` from a dataset folder or ``*.npz`` files.

    Raises:
        InputError: missing folder, no data, unreadable files, wrong shapes or types,
            NaN or Inf observations, or tasks not in the model.
    """
    from pathlib import Path

    import numpy as np
    import torch

    from tdmpc_opt.errors import InputError

    path = Path(directory)
    if (path / "meta.json").is_file():
        from tdmpc_opt.data import Dataset

        ds = Dataset(path)
        names = ds.tasks
        task_of_row = np.repeat(ds.episodes[:, 2], ds.episodes[:, 1])
        idx = np.linspace(0, len(ds.obs) - 1, min(rows, len(ds.obs))).astype(int)
        obs, task = np.asarray(ds.obs[idx]), task_of_row[idx]
    else:
        files = sorted(path.glob("*.npz")) if path.is_dir() else []
        if not files:
            raise InputError(f"{directory}: no calibration data (a dataset folder or *.npz "
                             "files with 'obs' and 'task' arrays)")
        arrays = [_read_npz(f) for f in files]
        if not all("obs" in a and a["obs"].ndim == 2 and _numeric(a["obs"]) for a in arrays):
            raise InputError(f"{directory}: every .npz needs a numeric 'obs' array [N, D]")
        if any("task" in a and not (a["task"].ndim == 1 and np.issubdtype(a["task"].dtype,
                                                                          np.integer))
               for a in arrays):
            raise InputError(f"{directory}: 'task' arrays must hold integer task indices [N]")
        obs = np.concatenate([a["obs"] for a in arrays])[:rows]
        task = (np.concatenate([a["task"] for a in arrays])[:rows]
                if all("task" in a for a in arrays) else None)
        names = cfg.tasks
    if len(obs) == 0:
        raise InputError(f"{directory}: the calibration data holds no observations")
    if not np.isfinite(obs).all():
        raise InputError(f"{directory}: the calibration observations contain NaN or Inf")
    if obs.shape[1] > cfg.obs_dim:
        raise InputError(f"{directory}: observations have {obs.shape[1]} values, the model "
                         f"takes {cfg.obs_dim}")
    x = torch.nn.functional.pad(torch.as_tensor(obs, dtype=torch.float32),
                                (0, cfg.obs_dim - obs.shape[1]))
    if not cfg.multitask:
        return x, None
    if task is None or len(task) != len(x) or not all(0 <= t < len(names) for t in task):
        raise InputError(f"{directory}: needs a 'task' index per observation")
    missing = {names[t] for t in task} - set(cfg.tasks)
    if missing:
        raise InputError(f"{directory}: tasks {sorted(missing)} are not in the model")
    return x, torch.tensor([cfg.tasks.index(names[t]) for t in task])


def _read_npz(path) -> dict:
    """The arrays of one ``.npz`` file, refusing pickled (object) arrays and broken files."""
    import zipfile

    import numpy as np

    from tdmpc_opt.errors import InputError

    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except ValueError as e:  # object arrays need pickle: refused
        raise InputError(f"{path}: unreadable calibration file ({str(e)[:120]})") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:
        raise InputError(f"{path}: not a readable .npz file ({str(e)[:120]})") from None


def _numeric(a) -> bool:
    import numpy as np

    return np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating)


def run(args) -> int:
    from pathlib import Path

    from tdmpc_opt.cli._common import check_new_file
    from tdmpc_opt.errors import InputError
    from tdmpc_opt.quantization import check_format, quantize_checkpoint

    check_format(args.fmt)
    if Path(args.out).suffix != ".safetensors":
        raise InputError(f"{args.out}: output must end in .safetensors")
    check_new_file(args.out, args.overwrite, args.checkpoint)
    calib = None
    if args.calibrate_data:
        from tdmpc_opt.checkpoints import load_world_model

        cfg = load_world_model(args.checkpoint)[0].cfg
        calib = load_calibration(args.calibrate_data, cfg, args.calibrate_rows)
    s = quantize_checkpoint(args.checkpoint, args.out, args.fmt, calib,
                            keep_target_q=args.keep_target_q)
    src = Path(args.checkpoint).stat().st_size
    print(f"wrote {args.out} ({s['file_bytes']:,} bytes, {args.fmt}; input {src:,} bytes; "
          f"{s['quantized']} int8 tensors{', calibrated' if s['calibrated'] else ''})")
    return 0
