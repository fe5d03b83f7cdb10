"""A thread-safe cuda.shared.array for numba-cuda's simulator (numba-cuda 0.30, still so upstream).

The simulator runs a block's threads as Python threads, and its FakeCUDAShared.array finds a
block's shared array by the caller's (file, line) with a check-then-set on a dict: two threads
that switch between the check and the set each allocate their own array, the block no longer
shares it, and a GEMM tile reads another thread's never-written stage. Under load (the GIL
switches more often) this turned a CUDA epoch's losses or step count into garbage in 1 run of
~5 (tests/test_activity.py, tests/test_cuda.py). Here the same lookup, keyed the same way, runs
under a lock. A real GPU is unaffected: this is installed only on the simulator.
"""
import sys
import threading

import numpy as np

_LOCK = threading.Lock()


def install():
    """Replace FakeCUDAShared.array with the locked lookup (idempotent)."""
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "fastreg_locked", False):
        return
    unlocked = shared.array

    def array(self, shape, dtype, alignment=None):
        if alignment is not None or shape == 0:     # errors and dynamic memory: no lookup
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, kernelapi.types.Type):
            dtype = kernelapi.numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)
        with _LOCK:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array.fastreg_locked = True
    shared.array = array
