"""The simulator's shared arrays are shared (tests/cudasim.py): threads that ask for the same
cuda.shared.array at once all get one array."""
import sys
import threading

import numpy as np
import pytest

import cudasim


def test_threads_share_one_shared_array():
    kernelapi = pytest.importorskip("numba.cuda.simulator.kernelapi")
    cudasim.install()
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)     # switch as often as the interpreter can
    try:
        for _ in range(20):
            shared = kernelapi.FakeCUDAShared(0)
            got, start = [], threading.Barrier(32)

            def ask():
                start.wait()
                got.append(shared.array((4, 4), np.float64))     # one call site for all

            threads = [threading.Thread(target=ask) for _ in range(32)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(got) == 32 and all(a is got[0] for a in got)
    finally:
        sys.setswitchinterval(interval)


def test_call_sites_stay_distinct():
    """Two call sites are two arrays, as the simulator keys them (file, line)."""
    kernelapi = pytest.importorskip("numba.cuda.simulator.kernelapi")
    cudasim.install()
    shared = kernelapi.FakeCUDAShared(0)
    a = shared.array(3, np.float32)
    b = shared.array(3, np.float32)
    assert a is not b and a.dtype == np.float32 and a.shape == (3,)
