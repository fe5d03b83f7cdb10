"""The CPU epochs' thread policy (kernels/threads.py): who gets the cores, and that it is undone."""
from types import SimpleNamespace

import numba
import numpy as np
from threadpoolctl import threadpool_info

from fastreg.kernels import threads


def _net(batch, dims):
    return SimpleNamespace(batch=batch, Ws=[np.zeros((i, o), np.float32)
                                            for i, o in zip(dims[:-1], dims[1:])])


CURVE = _net(128, [1, 64, 64, 64, 1])
WIDE = _net(256, [784, 1024, 1024, 10])


def test_small_and_large_nets():
    assert threads.is_small(CURVE) and not threads.is_small(WIDE)
    assert threads.elementwise_threads(1) == 1 and threads.elementwise_threads(2) == 1
    assert threads.elementwise_threads(16) == 8


def test_numba_epoch_halves_the_elementwise_threads_and_restores_them():
    before = numba.get_num_threads()
    with threads.numba_epoch(WIDE):
        inside = numba.get_num_threads()
    assert inside == threads.elementwise_threads(before)
    assert numba.get_num_threads() == before


def test_small_net_runs_blas_on_one_thread_and_restores_it():
    blas = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    with threads.numba_epoch(CURVE):
        assert all(i["num_threads"] == 1 for i in threadpool_info() if i["user_api"] == "blas")
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas
