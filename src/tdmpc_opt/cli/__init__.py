"""Command-line interface: ``tdmpc-opt <command> ...``.

Each command lives in its own module of this package and defines ``NAME``, ``HELP`` and
``add_arguments(parser)`` plus ``run(args) -> int``, and may set ``INTERRUPTED``, the note
printed on Ctrl-C (default :data:`INTERRUPTED`). Commands are discovered automatically, so
adding one is adding a file. Every :class:`~tdmpc_opt.errors.TdmpcError` is printed as one line
``error: ...`` with exit code 2, and so are failures of the machine rather than of the code
(an operating-system error such as a folder that cannot be created, memory exhausted); a
closed output pipe (``| head``) ends quietly; Ctrl-C exits with 130 and the command's note.
SIGTERM (``kill PID``, ``timeout``, a scheduler's preemption) and SIGHUP (the terminal closed,
e.g. a dropped SSH connection) are handled as Ctrl-C -- the same clean-up, the same note -- and
exit with 143 and 129 (:mod:`tdmpc_opt.stops`). Every command runs with
:func:`~tdmpc_opt.allocator.keep_freed_memory`.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import pkgutil
import signal
import sys
import threading
import warnings

from tdmpc_opt.errors import TdmpcError
from tdmpc_opt.stops import STOP_SIGNALS, act_on, held_back

INTERRUPTED = "interrupted; finished work is saved, run the same command again to continue"
"""Ctrl-C note of a command that does not set its own ``INTERRUPTED``."""
_OUT_OF_MEMORY = "error: out of memory; try a smaller batch, model or sample count"


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread as Ctrl-C is, so that the same clean-up runs
    (worker processes stopped, partial outputs removed, finished work kept). The command exits
    with 128 + ``signum``."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _stops_as_interrupt():
    """Within: the first SIGTERM or SIGHUP raises :class:`Terminated`; later ones are ignored,
    so they cannot cut that clean-up short (SIGKILL still ends the process). A signal already
    handled or ignored (SIGHUP under ``nohup``) is left so, and nothing changes off the main
    thread (``main()`` called from a library)."""
    ours = [sig for sig in STOP_SIGNALS if sig != signal.SIGINT
            and signal.getsignal(sig) is signal.SIG_DFL]
    if threading.current_thread() is not threading.main_thread() or not ours:
        yield
        return

    def terminated(signum, frame):
        for sig in ours:
            signal.signal(sig, signal.SIG_IGN)
        raise Terminated(signum)

    for sig in ours:
        signal.signal(sig, terminated)
    try:
        yield
    finally:
        for sig in ours:
            signal.signal(sig, signal.SIG_DFL)


def _import_torch_whole() -> None:
    """Import PyTorch with stop signals held back until it is done, then act on them. Torch's
    C start-up imports NumPy and swallows an exception raised inside it: a stop landing there
    left a half-imported NumPy behind, and the command failed later with a traceback (seen:
    RecursionError in ``numpy.__getattr__`` after SIGTERM 0.4 s into ``collect``)."""
    with held_back() as caught:
        import torch  # noqa: F401
    act_on(caught)


def _say(line: str) -> None:
    """Print to stderr; quietly nothing where it is gone (a closed terminal after SIGHUP)."""
    with contextlib.suppress(OSError):
        print(line, file=sys.stderr)


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
        p.set_defaults(_run=mod.run, _interrupted=getattr(mod, "INTERRUPTED", INTERRUPTED))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``tdmpc-opt`` console script."""
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")
    warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*deprecated.*")
    # dm_control probes GLFW at import and warns when there is no display; rendering uses EGL
    warnings.filterwarnings("ignore", category=UserWarning, module="glfw")
    note = INTERRUPTED  # the command's own once its arguments are read
    try:
        with _stops_as_interrupt():  # from the start: a stop while importing is no traceback
            parser = build_parser()
            args = parser.parse_args(argv)
            if not getattr(args, "_run", None):
                parser.print_help()
                return 2
            note = args._interrupted
            _import_torch_whole()
            from tdmpc_opt import products
            from tdmpc_opt.allocator import keep_freed_memory

            keep_freed_memory()  # planning reuses its freed activations (tdmpc_opt.allocator)
            products.check_environment()  # a bad TDMPC_OPT_PRODUCTS before any work
            return int(args._run(args) or 0)
    except TdmpcError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        _say(note)
        return 128 + (e.signum if isinstance(e, Terminated) else signal.SIGINT)
    except BrokenPipeError:  # the reader of stdout went away (``| head``): nothing to say
        _silence_stdout()
        return 141
    except MemoryError:
        print(_OUT_OF_MEMORY, file=sys.stderr)
        return 2
    except OSError as e:  # the machine refused (no such folder, permission, disk full)
        where = f": {e.filename}" if getattr(e, "filename", None) else ""
        print(f"error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not _out_of_memory(e):
            raise  # a bug: keep its traceback
        print(_OUT_OF_MEMORY, file=sys.stderr)
        return 2


def _out_of_memory(err: RuntimeError) -> bool:
    """Whether ``err`` is PyTorch's allocation failure (CPU or GPU)."""
    text = str(err)
    return "can't allocate memory" in text or "out of memory" in text.lower()


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's final flush of a closed pipe
    does not print a second error."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass

if __name__ == "__main__":
    sys.exit(main())
