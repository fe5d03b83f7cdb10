"""Ctrl-C (SIGINT) held until the model's state is consistent, then acted on.

Python raises KeyboardInterrupt at the next bytecode after the signal: between a kernel's
return and the counters that describe what it did, or in the middle of copying a restored
state back. ``deferred()`` installs, for the duration of a block, a SIGINT handler that only
records the press; the block calls ``guard.check()`` where the state is consistent (between
chunks of batches in fit), which runs the handler that was there before (the default one
raises KeyboardInterrupt), and at the end of the block a press still pending is acted on the
same way. Presses during the block's own state changes (a restore, set_weights) therefore
never land half-way. A nested block (set_weights inside a fit's callback) leaves the press
to the outer one.

The guard is active only in the main thread (the only one Python delivers signals to) and only
when the handler in place is a Python callable (the default handler, or a user's); SIG_IGN
and SIG_DFL are left alone. Nested blocks share the outer guard.
"""
import signal
import threading
from contextlib import contextmanager


class _Guard:
    """The presses recorded while fastreg's handler is installed."""

    def __init__(self, previous):
        self.previous = previous
        self.pending = 0

    def _handler(self, signum, frame):
        self.pending += 1

    def check(self):
        """Act on a pending press now (the previous handler: KeyboardInterrupt by default)."""
        if self.pending:
            self.pending = 0
            self.previous(signal.SIGINT, None)


class _NoGuard:
    pending = 0

    @staticmethod
    def check():
        pass


_NO_GUARD = _NoGuard()
_ACTIVE = []        # the installed guard, when there is one (main thread only)


@contextmanager
def deferred():
    """Hold SIGINT during the block (see the module docstring); yields the guard, whose
    check() acts on a pending press at a point the caller knows to be consistent."""
    if threading.current_thread() is not threading.main_thread():
        yield _NO_GUARD
        return
    if _ACTIVE:     # nested: the outer block acts on a press, at its safe points
        yield _ACTIVE[0]
        return
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:      # not the main interpreter
        previous = None
    if not callable(previous):
        yield _NO_GUARD
        return
    guard = _Guard(previous)
    signal.signal(signal.SIGINT, guard._handler)
    _ACTIVE.append(guard)
    try:
        yield guard
    finally:
        _ACTIVE.clear()
        signal.signal(signal.SIGINT, previous)
    guard.check()


def check():
    """guard.check() of the active guard, if any (a safe point outside a fit's own loop)."""
    if _ACTIVE and threading.current_thread() is threading.main_thread():
        _ACTIVE[0].check()
