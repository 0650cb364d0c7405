"""SIGINT, SIGTERM and SIGHUP: one way out, and critical sections they cannot cut in two.

While the command line runs (``handling_signals``), each of the three signals raises ``Interrupted``
(a ``KeyboardInterrupt``), so that every ``except BaseException`` clean-up that serves Ctrl-C serves
a ``kill`` or a closed terminal too. Inside ``deferred()`` (removing a temporary folder, renaming the
output into place) a signal is only recorded, and raised when the section ends; once the process is
stopping, further signals are ignored, so a second Ctrl-C cannot interrupt the clean-up of the first.
Outside ``handling_signals`` (the Python API in someone else's program) nothing here changes how
signals behave: ``deferred()`` is then a no-op.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    def __init__(self) -> None:
        self.active = False  # our handlers are installed
        self.depth = 0  # nesting of deferred() sections
        self.pending: int | None = None  # a signal received inside a deferred section
        self.stopping: int | None = None  # the signal that is stopping the run; later ones are ignored
        self.written: list[Path] = []  # outputs that were complete before the run was stopped


_state = _State()


def _handler(signum: int, frame) -> None:
    if _state.stopping is not None:
        return
    if _state.depth > 0:
        _state.pending = _state.pending or signum
        return
    _state.stopping = signum
    raise Interrupted(signum)


@contextmanager
def handling_signals(restore: bool = True) -> Iterator[None]:
    """Install the handlers for the block (main thread only; elsewhere a no-op). With ``restore=False``
    (the process is about to exit) signals stay ignored after the block instead of getting the previous
    handlers back: a signal during interpreter shutdown must not print a traceback either."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    global _state
    _state = _State()
    _state.active = True
    previous = {s: signal.signal(s, _handler) for s in SIGNALS}
    try:
        yield
    finally:
        _state.stopping = _state.stopping or 0  # from here on: ignored
        for s, handler in previous.items():
            signal.signal(s, handler if restore else signal.SIG_IGN)
        _state.active = False


def stop_raising() -> None:
    """The run is over (its result is being reported): from now on signals are ignored."""
    if _state.active and _state.stopping is None:
        _state.stopping = 0


def stopped_by() -> int | None:
    """The signal that stopped the run, if one did."""
    return _state.stopping or None


@contextmanager
def deferred() -> Iterator[None]:
    """A critical section: a signal received inside is raised when it ends (unless it ends by an error)."""
    _state.depth += 1
    try:
        yield
    except BaseException:
        _state.depth -= 1
        raise
    _state.depth -= 1
    if _state.depth == 0 and _state.pending is not None and _state.stopping is None:
        _state.stopping, _state.pending = _state.pending, None
        raise Interrupted(_state.stopping)


def output_written(path: Path) -> None:
    """Record that ``path`` is complete, so that an interruption afterwards does not claim otherwise."""
    if _state.active:
        _state.written.append(path)


def outputs_written() -> list[Path]:
    return list(_state.written)
