"""Plot per-task returns of one or more evaluation results side by side.

Examples:
  tdmpc-opt plot teacher.json student.json student-int8.json --out compare.png
  tdmpc-opt plot a.json b.json --labels fp32,int8 --out fig.png
"""

from __future__ import annotations

NAME = "plot"
HELP = "compare evaluation results (per-task returns) in one figure"


IMAGE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")
"""Image formats ``--out`` may name (matplotlib writes each)."""


def image_file(text: str) -> str:
    """argparse type: an image file to write, named with one of :data:`IMAGE_SUFFIXES`."""
    import argparse
    from pathlib import Path

    from tdmpc_opt.cli._common import output_file

    if Path(text).suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text}: name an image file ending in "
                                         f"{', '.join(IMAGE_SUFFIXES)}")
    return output_file(text)


def add_arguments(p):
    p.add_argument("results", nargs="+", help="JSON files written by `tdmpc-opt eval --json`")
    p.add_argument("--out", required=True, type=image_file,
                   help="image file to write (.png, .pdf, .svg, .jpg)")
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
