"""Plot per-task returns of one or more evaluation results side by side.

Examples:
  tdmpc-opt plot teacher.json student.json student-int8.json --out compare.png
  tdmpc-opt plot a.json b.json --labels fp32,int8 --out fig.png
"""

from __future__ import annotations

NAME = "plot"
HELP = "compare evaluation results (per-task returns) in one figure"


def add_arguments(p):
    from tdmpc_opt.cli._common import output_file

    p.add_argument("results", nargs="+", help="JSON files written by `tdmpc-opt eval --json`")
    p.add_argument("--out", required=True, type=output_file,
                   help="image file to write (.png, .pdf, .svg)")
    p.add_argument("--labels", default=None, help="comma-separated names, one per result")


def run(args) -> int:
    from tdmpc_opt.errors import InputError
    from tdmpc_opt.plots import load_results, plot_task_returns

    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.results):
        raise InputError(f"{len(labels)} labels for {len(args.results)} results")
    results = load_results(args.results)
    plot_task_returns(results, labels, args.out)
    print(f"wrote {args.out}")
    return 0
