"""SIGTERM and SIGINT: every ``stagewise`` command stops promptly, says so in one line and exits 143 / 130.

``stagewise`` (``lightning_modules.cli.main``) runs each command under :func:`stopping_on_signals`: either
signal raises :class:`Stopped` at once, wherever the command is. Files are written through
``datamodules.shards.atomic_path``, so a write that is cut leaves the previous file whole and no temporary
file behind. A fit defers instead (``callbacks.safety.PreemptionCheck``, with :func:`defer_signals`): the
batch in progress finishes, ``last.ckpt`` is saved, and the fit stops, so ``--ckpt_path last`` continues
exactly. A command that runs another as a process (``pipeline``) passes the signal on to it and waits for
it to stop (:func:`run_forwarding_signals`). Here, at the bottom of the imports: the data, the callbacks
and the commands all stop this way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the stop signals this process received, in order, since stopping_on_signals began


class Stopped(BaseException):
    """The command was stopped by signal ``signum``. A ``BaseException``, as ``KeyboardInterrupt`` is, so that
    no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        """``SIGTERM`` or ``SIGINT``."""
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        """``128 + signum``, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for SIGINT."""
        return 128 + self.signum


def received() -> int | None:
    """The first stop signal received since :func:`stopping_on_signals` began, or None."""
    return _received[0] if _received else None


def _record(signum: int, frame: Any = None) -> None:
    _received.append(signum)


def _handlers() -> dict[int, Any]:
    return {s: signal.getsignal(s) for s in STOP_SIGNALS}


def _install(handler: Callable[[int, Any], None]) -> dict[int, Any]:
    """Set ``handler`` for both stop signals; returns the handlers it replaced."""
    before = _handlers()
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    return before


def _restore(handlers: dict[int, Any]) -> None:
    for s, handler in handlers.items():
        signal.signal(s, handler if handler is not None else signal.SIG_DFL)


_NOT_INHERITED: set[Callable[[int, Any], None]] = {_record}  # handlers a forked child resets (_defaults_in_child)


def _defaults_in_child() -> None:
    """Right after a fork: a child (a worker pool's) does not keep the handler of :func:`stopping_on_signals`, so
    a stop signal ends it at once, as it ends any process, and its pool's owner reports the stop. A Python
    handler runs only between bytecodes: a worker that ``Pool.terminate`` signalled just before it blocked on its
    task queue would wait there for ever (a prepare hung so, at the end of a pool)."""
    for s in STOP_SIGNALS:
        if signal.getsignal(s) in _NOT_INHERITED:
            signal.signal(s, signal.SIG_DFL)


os.register_at_fork(after_in_child=_defaults_in_child)


def pool_worker_signals() -> None:
    """Initializer of a worker pool's processes: SIGTERM ends a worker at once (``Pool.terminate`` sends it) and
    SIGINT is left to the pool's owner, which stops and terminates the pool. Whatever Python handler the worker
    inherited (ours, Lightning's, a test runner's) only records a signal, so a worker signalled as it blocked on
    its task queue would wait there for ever, and its owner with it. Then the stop signals are unblocked
    (:func:`fork_pool` forks with them blocked): one that came before this ran takes its default effect now."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    pool_worker_signals()
    if initializer is not None:
        initializer(*initargs)


def fork_pool(processes: int, initializer: Callable[..., None] | None = None, initargs: tuple = ()):
    """A ``multiprocessing`` pool of ``processes`` forked workers that end on ``Pool.terminate`` whenever it comes.

    The workers are forked with SIGTERM and SIGINT blocked; each first puts their defaults in place and unblocks
    them (:func:`pool_worker_signals`), then runs ``initializer(*initargs)``. Without the block, a pool closed
    right after it opened (a reader stopped early) could signal a worker still running the owner's inherited
    handler, which only recorded it; the worker then waited on its task queue for ever, and the owner in
    ``Pool.terminate`` with it (``make test`` hung so in test_prepare twice on 2026-12-01, the second time with
    the defaults already set by the initializer: the signal came before it ran)."""
    import multiprocessing

    before = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        return multiprocessing.get_context("fork").Pool(processes, _start_worker, (initializer, initargs))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


@contextmanager
def stopping_on_signals() -> Iterator[None]:
    """Within: SIGTERM and SIGINT raise :class:`Stopped` (once: later ones are only recorded, so stopping is
    never interrupted itself). Processes forked meanwhile (worker pools) keep the signals' default effect. The
    previous handlers come back at exit."""

    def stop(signum: int, frame: Any) -> None:
        first = not _received
        _record(signum)
        if first:
            _install(_record)
            raise Stopped(signum)

    _received.clear()
    _NOT_INHERITED.add(stop)
    before = _install(stop)
    try:
        yield
    finally:
        _restore(before)
        _NOT_INHERITED.discard(stop)


def defer_signals(on_signal: Callable[[int], None] | None = None) -> dict[int, Any]:
    """From now on SIGTERM and SIGINT are only recorded (:func:`received`) and passed to ``on_signal``; the caller
    stops at its next safe point. Returns the handlers replaced, for :func:`restore_signals`."""

    def defer(signum: int, frame: Any) -> None:
        _record(signum)
        if on_signal is not None:
            on_signal(signum)

    return _install(defer)


def restore_signals(handlers: dict[int, Any]) -> None:
    """Put back the handlers :func:`defer_signals` replaced."""
    _restore(handlers)


def run_forwarding_signals(cmd: list[str], **popen: Any) -> int:
    """Run ``cmd`` as a process to its end and return its exit status; a SIGTERM or SIGINT received meanwhile is
    passed on to it and it is waited for (it stops at its own safe point), then :class:`Stopped` is raised here.
    Off the main thread (the workers of ``experiments/``), where Python lets no handler be set, the process is
    only waited for: a signal does there what the main thread's handler does."""
    earlier = len(_received)
    proc = subprocess.Popen(cmd, **popen)
    main_thread = threading.current_thread() is threading.main_thread()
    before = defer_signals(lambda signum: proc.poll() is None and proc.send_signal(signum)) if main_thread else {}
    try:
        status = proc.wait()
    finally:
        restore_signals(before)
    if len(_received) > earlier:
        raise Stopped(_received[earlier])
    return status
