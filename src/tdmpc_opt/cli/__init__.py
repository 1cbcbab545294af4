"""Command-line interface: ``tdmpc-opt <command> ...``.

Each command lives in its own module of this package and defines ``NAME``, ``HELP`` and
``add_arguments(parser)`` plus ``run(args) -> int``. Commands are discovered automatically, so
adding one is adding a file. Every :class:`~tdmpc_opt.errors.TdmpcError` is printed as one line
``error: ...`` with exit code 2; Ctrl-C exits with 130 and a short note. Every command runs
with :func:`~tdmpc_opt.allocator.keep_freed_memory`.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings

from tdmpc_opt.errors import TdmpcError


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line and exit code 2."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every discovered command."""
    parser = _Parser(prog="tdmpc-opt", description="TD-MPC2 agents made small, fast and "
                     "deployable (TD-MPC-Opt).",
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from tdmpc_opt import __version__

    parser.add_argument("--version", action="version", version=f"tdmpc-opt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for mod_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if mod_info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"{__name__}.{mod_info.name}")
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tdmpc-opt`` console script."""
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
    # dm_control probes GLFW at import and warns when there is no display; rendering uses EGL
    warnings.filterwarnings("ignore", category=UserWarning, module="glfw")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from tdmpc_opt.allocator import keep_freed_memory

    keep_freed_memory()  # planning reuses its freed activations (tdmpc_opt.allocator)
    try:
        from tdmpc_opt import products

        products.check_environment()  # a bad TDMPC_OPT_PRODUCTS before any work
        return int(args._run(args) or 0)
    except TdmpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished work is saved, run the same command again to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
