"""SIGINT and SIGTERM during a merge: exceptions on the main thread, and a section they cannot split.

``mergekernels merge`` turns SIGINT into :class:`KeyboardInterrupt` and SIGTERM into
:class:`Terminated` (:func:`raising_signals`), so a signal unwinds the merge like any failure: the
reader and writer threads are told to stop and not waited for (a shard being written stays a
temporary file, which ``--resume`` removes), the output lock is let go, and the command reports where
the work stands and exits with 128 + the signal's number. Python runs signal handlers on the main
thread between bytecodes, so the exception comes as soon as the main thread is back from the C call
it is in: within a unit's kernel call at worst (a row chunk of at most ``chunk_bytes`` per input
for element-wise methods; a whole matrix for the SVD-based ones).

:func:`deferred_signals` makes a section atomic with respect to both signals (publishing: the plan
file's removal and the rename of the partial directory): a signal that arrives inside it is recorded,
and its handler runs, or its default action is taken, when the section ends. Masking the signals
(``pthread_sigmask``) would not do: it holds for the calling thread only, and the kernel hands a
process-directed signal to any thread that does not block it (torch's and tqdm's threads among them),
where Python's C handler marks it for the main thread regardless.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(BaseException):  # noqa: N818 - named after the signal, as KeyboardInterrupt
    """SIGTERM arrived (a BaseException, as KeyboardInterrupt: ``except Exception`` lets it pass)."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def signal_number(exc: BaseException) -> int:
    """The signal an interruption came from (KeyboardInterrupt: SIGINT)."""
    return getattr(exc, "signum", signal.SIGINT)


_command = False  # raising_signals is active: the process ends once an interruption has unwound


def ends_process(exc: BaseException) -> bool:
    """Whether ``exc`` is an interruption after which the process ends (the command's): then the
    threads of a merge need not be waited for. A library caller's KeyboardInterrupt is not: its
    process goes on, and may start another merge into the same directory."""
    return _command and isinstance(exc, (KeyboardInterrupt, Terminated))


def _on_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def raising_signals(second: Callable[[int], None] | None = None) -> Iterator[None]:
    """For a command that ends its process after the block: within it, SIGINT raises
    KeyboardInterrupt and SIGTERM :class:`Terminated` on the main thread; a later one of either calls
    ``second(signum)`` instead (the command: leave at once; the first is still unwinding). A signal
    the process ignored when the block began stays ignored (a background job's SIGINT); off the main
    thread nothing changes. The previous handlers come back when the block ends."""
    if not _on_main_thread():
        yield
        return
    raised: list[int] = []

    def handle(signum, frame):
        if raised and second is not None:
            second(signum)
            return
        raised.append(signum)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Terminated(signum)

    global _command
    previous = {}
    for signum in SIGNALS:
        current = signal.getsignal(signum)
        if current is not signal.SIG_IGN and current is not None:
            previous[signum] = signal.signal(signum, handle)
    _command = True
    try:
        yield
    finally:
        _command = False
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block has run (see the module docstring); the first one that
    came is then handled as it would have been (the others of the block are dropped). Off the main
    thread, or where a handler was not set from Python, the block runs as it is."""
    if not _on_main_thread():
        yield
        return
    received: list[int] = []

    def record(signum, frame):
        received.append(signum)

    previous = {}
    for signum in SIGNALS:
        if signal.getsignal(signum) is not None:
            previous[signum] = signal.signal(signum, record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)
            elif handler == signal.SIG_DFL:
                sys.stderr.flush()
                os.kill(os.getpid(), received[0])
