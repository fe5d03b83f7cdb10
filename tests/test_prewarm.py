"""bench/prewarm.py: when `fastreg bench` compiles the Numba kernels in worker processes
first, and the workers' locked cache saves."""
import os
import subprocess
import sys
import types

import pytest

from fastreg.bench import prewarm


def test_wanted_only_with_numba_and_two_workloads(monkeypatch):
    from fastreg.kernels import numba as numba_backend
    monkeypatch.setattr(numba_backend, "disk_cache_is_empty", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert prewarm.wanted(["numba", "cython"], ["curve", "wide"])
    assert not prewarm.wanted(["cython"], ["curve", "wide"])        # nothing to compile
    assert not prewarm.wanted(["numba"], ["curve"])                 # one workload: no gain
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert not prewarm.wanted(["numba"], ["curve", "wide"])         # one core: no gain
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(numba_backend, "disk_cache_is_empty", lambda: False)
    assert not prewarm.wanted(["numba"], ["curve", "wide"])         # a warm cache: no process


def test_disk_cache_is_empty_follows_the_cache_dir(tmp_path):
    """A fresh NUMBA_CACHE_DIR reads empty; after one small Numba fit it does not."""
    code = ("import numpy as np, fastreg as fr\n"
            "from fastreg.kernels import numba as nb\n"
            "print(nb.disk_cache_is_empty())\n"
            "m = fr.Sequential([fr.Dense(3, 'relu'), fr.Dense(1)], input_dim=2, seed=0)\n"
            "m.compile(loss='mse', backend='numba')\n"
            "m.fit(np.ones((8, 2), np.float32), np.ones((8, 1), np.float32), epochs=1, "
            "verbose=0)\n"
            "print(nb.disk_cache_is_empty())\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "False"]


def test_cache_saves_are_locked_once(monkeypatch, tmp_path):
    """A worker compiles several workloads: the lock wraps Numba's save once (a second
    wrapper would wait forever on the first's lock), and the save still saves."""
    pytest.importorskip("fcntl")
    from numba.core import caching
    calls = []
    monkeypatch.setattr(caching.IndexDataCacheFile, "save",
                        lambda self, key, data: calls.append((key, data)))
    prewarm._lock_cache_saves()
    locked = caching.IndexDataCacheFile.save
    prewarm._lock_cache_saves()
    assert caching.IndexDataCacheFile.save is locked

    cache_file = types.SimpleNamespace(_cache_path=str(tmp_path))
    locked(cache_file, "k", "v")
    assert calls == [("k", "v")]
    assert (tmp_path / ".fastreg-save.lock").exists()
