"""How a running command is stopped, and how work in progress waits for a safe point.

The signals that mean "stop" (:data:`STOP_SIGNALS`): Ctrl-C (SIGINT), SIGTERM (``kill PID``,
``timeout``, a scheduler's preemption) and SIGHUP (the terminal closed: an SSH connection that
dropped). The command line raises the last two as a ``KeyboardInterrupt`` (its ``Terminated``),
so one clean-up path serves all three. :func:`held_back` delays them over a block that must not
be cut in half -- a training update, PyTorch's import -- and :func:`act_on` then raises them.
:func:`noted` and :func:`raise_noted` keep a stop from being lost where Python drops the
exception (one raised inside a ``__del__``). Nothing here imports PyTorch.
"""

from __future__ import annotations

import contextlib
import signal
import threading

STOP_SIGNALS: tuple[int, ...] = tuple(
    getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))
"""Signals that stop a command (SIGHUP does not exist on Windows)."""


@contextlib.contextmanager
def held_back():
    """Within: the first of each stop signal is only recorded, in the yielded list; the same
    signal a second time restores the handlers in place before and acts at once (a block that
    runs long -- a first update that compiles -- never keeps a user waiting twice). On the way
    out the handlers are restored; recorded signals are left to the caller (:func:`act_on`).
    Off the main thread (no signals arrive there) it records nothing. Costs ~30 us."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    previous = {sig: h for sig, h in previous.items() if h is not None}  # None: not Python's

    def restore():
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def record(signum, frame):
        if signum not in caught:
            caught.append(signum)
            return
        caught.clear()  # asked twice: now
        restore()
        signal.raise_signal(signum)

    for sig in previous:
        signal.signal(sig, record)
    try:
        yield caught
    finally:
        restore()


def act_on(caught: list[int]) -> None:
    """Raise again, once each, the signals a :func:`held_back` block recorded."""
    for sig in dict.fromkeys(caught):
        signal.raise_signal(sig)


@contextlib.contextmanager
def finish_first():
    """Within: stop signals wait for the block to finish, then act as they would have."""
    with held_back() as caught:
        yield
    act_on(caught)


@contextlib.contextmanager
def noted(seen: list[int] | None = None):
    """Within: every stop signal is also noted, in ``seen`` (default: a new list; yielded),
    before its handler runs. An exception a handler raises while Python runs a ``__del__`` or
    a weakref callback is printed and dropped (an evaluation frees MuJoCo's objects after
    every episode, so a Ctrl-C can land there): :func:`raise_noted` at the loop's next safe
    point raises it again. Off the main thread it notes nothing; handlers not set from Python
    are left alone."""
    seen = [] if seen is None else seen
    if threading.current_thread() is not threading.main_thread():
        yield seen
        return
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    previous = {sig: h for sig, h in previous.items() if callable(h)}

    def note(signum, frame):
        seen.append(signum)
        previous[signum](signum, frame)

    for sig in previous:
        signal.signal(sig, note)
    try:
        yield seen
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def raise_noted(seen: list[int]) -> None:
    """Raise again, through its handler, the first stop signal a :func:`noted` block saw: its
    exception was dropped, or this code would not be running. Nothing when none was seen."""
    if seen:
        sig = seen[0]
        seen.clear()
        signal.raise_signal(sig)
