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
"""
from contextlib import contextmanager

SMALL_STEP_MACS = 1 << 22
_CTL = {}


def is_small(net):
    return net.batch * sum(W.shape[0] * W.shape[1] for W in net.Ws) <= SMALL_STEP_MACS


def elementwise_threads(threads):
    """Threads for the elementwise passes of a large net when BLAS may use `threads`."""
    return max(1, int(threads) // 2)


def _controller():
    # Built once (a limit() then costs ~50 us), after the backend's libraries are loaded.
    from threadpoolctl import ThreadpoolController
    if "ctl" not in _CTL:
        _CTL["ctl"] = ThreadpoolController()
    return _CTL["ctl"]


def single_thread_blas():
    return _controller().limit(limits=1, user_api="blas")


@contextmanager
def numba_epoch(net):
    """The policy for an epoch of the Numba backend."""
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
    if is_small(net):
        with single_thread_blas():
            yield
        return
    n = elementwise_threads(openmp_threads())
    with _controller().limit(limits=n, user_api="openmp"):
        yield
