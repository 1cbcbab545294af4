"""Datasets: convert TD-MPC2's published files to tdmpc-opt's memory-mapped format, or
describe a dataset.

The published MT30 dataset is four files chunk_0.pt .. chunk_3.pt (TensorDicts of episodes of
501 steps). They are read without tensordict, through torch's weights-only unpickler and an
explicit allow-list, memory-mapped so that RAM stays small; the output is a directory of .npy
arrays plus meta.json that training memory-maps.

Examples:
  tdmpc-opt data convert datasets/mt30 --out data/mt30
  tdmpc-opt data convert chunk_0.pt chunk_1.pt --out data/mt30-half --tasks mt30
  tdmpc-opt data info data/mt30
"""

from __future__ import annotations

import json

NAME = "data"
HELP = "convert TD-MPC2 dataset files to tdmpc-opt's format; describe a dataset"
INTERRUPTED = ("interrupted; nothing was written: the partial output is removed and a dataset "
               "that --overwrite was replacing is kept as it was; run the command again to "
               "convert from the start")


def add_arguments(p):
    from tdmpc_opt.cli._common import output_dir, positive_int

    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    c = sub.add_parser("convert", help="convert published .pt dataset files")
    c.add_argument("inputs", nargs="+", help=".pt files, or directories holding them")
    c.add_argument("--out", required=True, type=output_dir,
                   help="output directory (must not exist unless --overwrite)")
    c.add_argument("--tasks", default="mt30",
                   help="task set the files' task ids index: mt30 (default), mt80 or names")
    c.add_argument("--chunk", type=positive_int, default=1024,
                   help="episodes converted at a time")
    c.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that is an empty folder or a dataset")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    i = sub.add_parser("info", help="describe a tdmpc-opt dataset directory")
    i.add_argument("path", help="dataset directory")
    i.add_argument("--json", action="store_true", help="print JSON")


def _inputs(items: list[str]) -> list:
    from pathlib import Path

    from tdmpc_opt.errors import DataError

    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(p.glob("*.pt"))
            if not found:
                raise DataError(f"{p}: no .pt files in this directory")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"{p}: no such file or directory")
    return files


def run(args) -> int:
    from tdmpc_opt.data import Dataset, convert_official

    if args.data_command == "info":
        ds = Dataset(args.path)
        if args.json:
            print(json.dumps(ds.meta, indent=1))
        else:
            m = ds.meta
            print(f"{ds.path}: {m['num_episodes']:,} episodes, {m['num_transitions']:,} "
                  f"transitions, {len(ds.tasks)} tasks, obs {m['obs_dim']}, "
                  f"actions {m['action_dim']}, episode length {m['min_length']}-"
                  f"{m['max_length']}")
        return 0
    from tqdm import tqdm

    from tdmpc_opt.data import check_output, read_official
    from tdmpc_opt.tasks import resolve_tasks

    files = _inputs(args.inputs)
    check_output(args.out, args.overwrite, [*args.inputs, *files])
    tasks = resolve_tasks(args.tasks)
    total = sum(int(read_official(f)["obs"].shape[0]) for f in files)
    with tqdm(total=total, unit="ep", disable=args.quiet, desc="convert") as bar:
        ds = convert_official(files, args.out, tasks, chunk=args.chunk,
                              overwrite=args.overwrite, progress=bar.update)
    print(f"wrote {ds.path}: {ds.num_episodes:,} episodes, {len(ds):,} transitions")
    return 0
