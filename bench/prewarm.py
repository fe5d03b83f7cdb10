"""A fresh install's Numba compile on every core: before `fastreg bench` times anything, each
workload's Numba kernels compile in their own worker process, as many at once as there are
cores, into the disk cache the timed process then loads from.

Why: a network's first Numba epoch compiles for 10-30 s of one core (a specialization per
activation set, loss and parallel/serial path: the three workloads need three), and the compiler
is single-threaded, so on a fresh machine `fastreg bench` used to compile them one after the
other while the other cores idled.

Only when the cache holds no compiled Numba epoch at all (a fresh install, or a changed
source): a warm run starts no process. Numba's cache index is a read-modify-write of one file
per entry point with no lock (numba/core/caching.py, IndexDataCacheFile.save), so two workers
saving at the same moment could lose an entry or, worse, give two entries one data file; the
workers therefore save under an exclusive file lock. Where that lock is not available (no
fcntl), or anything in a worker fails, the timed process compiles as before: the prewarm only
ever saves time.
"""
import contextlib
import importlib.util
import os
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context


def wanted(backends, workloads):
    """Whether to prewarm: Numba among the backends, two or more workloads, two or more
    cores, POSIX file locks, and no compiled Numba epoch on disk."""
    if "numba" not in backends or len(workloads) < 2 or (os.cpu_count() or 1) < 2:
        return False
    if importlib.util.find_spec("fcntl") is None:     # the workers' cache lock
        return False
    try:
        from fastreg.kernels import numba as numba_backend
    except ImportError:
        return False
    return numba_backend.disk_cache_is_empty()


def prewarm(workloads, quick, seed, status):
    """Compile the Numba kernels of `workloads` in min(cores, len(workloads)) processes;
    when a worker fails, the timed process compiles what is missing itself."""
    n_workers = min(os.cpu_count() or 1, len(workloads))
    status.say(f"compiling the Numba kernels of {len(workloads)} workloads in {n_workers} "
               f"processes, first run only (cached on disk for later runs)...")
    try:
        with ProcessPoolExecutor(n_workers, mp_context=get_context("spawn")) as pool:
            list(pool.map(_compile_workload, workloads, [quick] * len(workloads),
                          [seed] * len(workloads)))     # list: a worker's error is raised
    except Exception as exc:       # noqa: BLE001: any failure falls back to compiling here
        status.say(f"the parallel compile failed ({type(exc).__name__}: {exc}); compiling "
                   f"in this process instead")


def _compile_workload(name, quick, seed):
    """In a worker: one epoch and one evaluation of the bench's own Numba engine on the
    workload, so exactly the entry points the timed run calls are compiled and saved."""
    import sys

    import numba
    from threadpoolctl import threadpool_limits

    from .runner import FastregEngine
    from .workloads import initial_weights, make_workload

    sys.stderr = open(os.devnull, "w")     # the timed process says what is compiling
    _lock_cache_saves()
    numba.set_num_threads(1)       # the compiler is serial; the other cores are compiling
    with threadpool_limits(1):
        workload = make_workload(name, quick=quick, seed=seed)
        engine = FastregEngine(workload, initial_weights(workload, seed=seed), "numba")
        engine.run_epoch()
        engine.val_loss()
        engine.val_accuracy()
    return name


def _lock_cache_saves():
    """Numba's cache saves, under an exclusive lock on a file beside the cache (once per
    worker: a worker compiles several workloads, and a second wrapper would wait on the
    first's lock)."""
    import fcntl

    from numba.core import caching

    unlocked = caching.IndexDataCacheFile.save
    if getattr(unlocked, "fastreg_locked", False):
        return

    def save(self, key, data):
        with _locked(os.path.join(self._cache_path, ".fastreg-save.lock"), fcntl):
            unlocked(self, key, data)

    save.fastreg_locked = True
    caching.IndexDataCacheFile.save = save


@contextlib.contextmanager
def _locked(path, fcntl):
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
