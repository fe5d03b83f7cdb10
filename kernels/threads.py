"""How a CPU epoch shares the cores between BLAS and the backend's own elementwise passes.

Both pools busy-wait for a while after their work (OpenBLAS's workers after a GEMM, the
OpenMP/Numba workers after a parallel pass), and a training step alternates between them
hundreds of times an epoch. On a machine where the two pools together ask for more threads
than there are cores, each one's spinning steals the cores the other needs. Measured on the
2-core bench machine (wide --quick, 4,096 samples, median epoch): numba 1,300 ms with both
pools on 2 threads, 497 ms with the elementwise passes on 1; cython 571 -> 461 ms.

The policy, one place for both CPU backends:
- small nets (forward multiply-adds per step <= SMALL_STEP_MACS; curve is 1.1M, wide 476M):
  BLAS on one thread. At these shapes a second BLAS thread gains nothing (43 vs 45 GFLOP/s
  at 128x64x64, measured) and pays the wake-up and sync of its pool on ~900 GEMMs an epoch;
  the elementwise passes are under PARALLEL_MIN_ELEMENTS and serial anyway.
- larger nets: BLAS keeps its threads, the elementwise passes get half of them (one on two
  cores). The half is a choice for machines with more cores, not a measurement from one.

Per fit, and exactly undone: fit enters the policy once (``epoch_policy``) and the backends'
train_epoch enter it again only when called on their own (a nested entry in the same thread
is a no-op). The BLAS limit is process-wide (OpenBLAS has one pool), so it is counted: the
first fit that needs one BLAS thread sets it, the last one to finish puts back what was there
before, however several fits in several Python threads interleave. (threadpoolctl's own
limit() saves and restores around each call; two threads doing that at once left the pools
at 1 thread for good.) The Numba and OpenMP thread counts are per calling thread already.
"""
import threading
from contextlib import contextmanager, nullcontext

SMALL_STEP_MACS = 1 << 22
_CTL = {}
_LOCK = threading.Lock()
_BLAS = {"count": 0, "limiter": None}
_LOCAL = threading.local()


def is_small(net):
    return net.batch * sum(W.shape[0] * W.shape[1] for W in net.Ws) <= SMALL_STEP_MACS


def elementwise_threads(threads):
    """Threads for the elementwise passes of a large net when BLAS may use `threads`."""
    return max(1, int(threads) // 2)


def _controller():
    # Built once (a limit() then costs ~50 us), after the backend's libraries are loaded.
    from threadpoolctl import ThreadpoolController
    with _LOCK:
        if "ctl" not in _CTL:
            _CTL["ctl"] = ThreadpoolController()
        return _CTL["ctl"]


def _blas_control():
    """Let this thread change OpenBLAS's process-wide pool now. threadpoolctl >= 3.6 lets one
    "controlling" thread change it and silently ignores the others (so a restore made by the
    last fit to finish, in another thread than the first, would be lost); the counted limit
    below is the one owner of those changes, so it takes control for each change and hands
    it back right after (under _LOCK)."""
    try:
        from threadpoolctl import OpenBLASController
    except ImportError:         # older threadpoolctl: any thread may set the pool
        return
    clear = getattr(OpenBLASController, "clear_controlling_thread", None)
    if clear is not None:
        clear(force=True)


@contextmanager
def single_thread_blas():
    """BLAS on one thread while any holder of this is inside it (counted, process-wide)."""
    ctl = _controller()
    with _LOCK:
        if _BLAS["count"] == 0:
            _blas_control()
            _BLAS["limiter"] = ctl.limit(limits=1, user_api="blas")
            _blas_control()
        _BLAS["count"] += 1
    try:
        yield
    finally:
        with _LOCK:
            _BLAS["count"] -= 1
            if _BLAS["count"] == 0:
                limiter, _BLAS["limiter"] = _BLAS["limiter"], None
                _blas_control()
                limiter.restore_original_limits()
                _blas_control()


@contextmanager
def _once_per_thread():
    """True for the outermost policy of this thread, False inside one already entered."""
    depth = getattr(_LOCAL, "depth", 0)
    _LOCAL.depth = depth + 1
    try:
        yield depth == 0
    finally:
        _LOCAL.depth = depth


@contextmanager
def numba_epoch(net):
    """The policy for an epoch of the Numba backend."""
    with _once_per_thread() as outer:
        if not outer:
            yield
            return
        if is_small(net):
            with single_thread_blas():
                yield
            return
        import numba
        previous = numba.get_num_threads()
        numba.set_num_threads(elementwise_threads(previous))
        try:
            yield
        finally:
            numba.set_num_threads(previous)


@contextmanager
def openmp_epoch(net, openmp_threads):
    """The policy for an epoch of a backend whose elementwise passes are OpenMP loops
    (the Cython backend); openmp_threads() says how many threads they would use."""
    with _once_per_thread() as outer:
        if not outer:
            yield
            return
        if is_small(net):
            with single_thread_blas():
                yield
            return
        n = elementwise_threads(openmp_threads())
        with _controller().limit(limits=n, user_api="openmp"):
            yield


def epoch_policy(ops, net):
    """The thread policy of backend `ops` for a fit of `net` (anything with .batch and .Ws):
    entered once around the whole fit."""
    name = getattr(ops, "NAME", None)
    if name == "numba":
        return numba_epoch(net)
    if name == "cython":
        return openmp_epoch(net, ops._K.openmp_threads)
    return nullcontext()
