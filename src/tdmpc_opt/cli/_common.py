"""Helpers shared by the command modules: argument types and JSON output."""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def thread_count(text: str) -> int:
    """argparse type: a number of torch threads, 1 to
    :data:`tdmpc_opt.config.MAX_THREADS`."""
    from tdmpc_opt.config import MAX_THREADS

    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"at most {MAX_THREADS}, got {value}")
    return value


def noise_stds(text: str) -> float | tuple[float, ...]:
    """argparse type: one std >= 0, or comma-separated stds that episodes cycle through."""
    parts = [nonnegative_float(t) for t in text.split(",")]
    return parts[0] if len(parts) == 1 else tuple(parts)


def nonnegative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers, e.g. ``1,16,64`` (at least one)."""
    values = [positive_int(t) for t in text.split(",") if t.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def output_file(text: str) -> str:
    """argparse type: a file this command will write; refused before any work if a folder
    stands at that path or a file stands where one of its folders should be."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file name")
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file name")
    _check_parents(path)
    return text


def check_new_file(path: str | Path, overwrite: bool, input_path: str | Path | None = None) -> None:
    """Refuse, before any work, to write a file over ``input_path`` or, without
    ``overwrite``, over any file already there (a trained checkpoint is hours of work).

    Raises:
        InputError: the output is refused; the message says why and what to do.
    """
    from tdmpc_opt.errors import InputError

    path = Path(path)
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise InputError(f"{path}: the output would replace the input; choose another file name")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise InputError(f"{path}: already exists; choose another file name or pass "
                         "--overwrite to replace it")


def output_dir(text: str) -> str:
    """argparse type: a folder this command will write into (created if missing); refused
    before any work if a file stands at that path or where one of its parents should be."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a folder")
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file; give a folder")
    _check_parents(path)
    return text


def _check_parents(path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{path}: {parent} is a file, not a folder")
            return


def write_json(path: str | Path, data) -> None:
    """Write JSON atomically (indent 1); imports the checkpoint module only when called."""
    from tdmpc_opt.checkpoints import write_json as write

    write(path, data)


def add_backend_arguments(p: argparse.ArgumentParser) -> None:
    """``--backend``, ``--workers`` and ``--ray-address`` of the rollout commands."""
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local (this process, or --workers processes) or ray")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="local worker processes (default 1), or Ray CPUs to use (default all)")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join: auto or HOST:PORT (default: start one here)")


def check_backend_options(backend: str, ray_address: str | None) -> None:
    """Refuse ``--ray-address`` without ``--backend ray``, and Ray backends without Ray."""
    from tdmpc_opt.errors import ConfigError

    if ray_address and backend != "ray":
        raise ConfigError("--ray-address needs --backend ray")
    if backend == "ray":
        from tdmpc_opt.backends import import_ray

        import_ray()
