"""Convert a checkpoint between TD-MPC2's .pt format and tdmpc-opt's safetensors format.

The output format follows the output file's extension: .safetensors (ours: tensors + JSON
architecture and task list) or .pt (TD-MPC2's {"model": state_dict}, loadable by the
original code).

Examples:
  tdmpc-opt convert ../shared/checkpoints/tdmpc-opt-mt30-1M-fp16.pt student.safetensors
  tdmpc-opt convert student.safetensors student.pt --dtype float16
"""

from __future__ import annotations

NAME = "convert"
HELP = "convert a checkpoint between TD-MPC2 .pt and tdmpc-opt .safetensors"

_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def add_arguments(p):
    from tdmpc_opt.cli._common import output_file

    p.add_argument("input", help="checkpoint to read (.pt or .safetensors)")
    p.add_argument("output", type=output_file, help="file to write; .safetensors or .pt")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="float32",
                   help="floating-point type of the written tensors (default float32)")
    p.add_argument("--tasks", default=None,
                   help="task list for checkpoints whose task set cannot be inferred")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output file if it exists (refused otherwise)")


def run(args) -> int:
    from pathlib import Path

    import torch

    from tdmpc_opt.checkpoints import load_world_model, save_checkpoint, save_official
    from tdmpc_opt.cli._common import check_new_file
    from tdmpc_opt.errors import InputError
    from tdmpc_opt.tasks import resolve_tasks

    out = Path(args.output)
    if out.suffix not in (".safetensors", ".pt"):
        raise InputError(f"{out}: output must end in .safetensors or .pt")
    check_new_file(out, args.overwrite, args.input)
    tasks = resolve_tasks(args.tasks) if args.tasks is not None else None
    model, info = load_world_model(args.input, tasks=tasks)
    dtype = getattr(torch, _DTYPES[args.dtype])
    if out.suffix == ".pt":
        save_official(out, model, dtype)
    else:
        save_checkpoint(out, model, extra={"converted_from": info["sha256"]}, dtype=dtype)
    print(f"wrote {out} ({out.stat().st_size:,} bytes, {args.dtype})")
    return 0
