"""How the CUDA backend builds its kernels: numba-cuda found or not, the device-function
flags, the namespace of one (dtype, tiles) configuration, and the cuBLAS choice.

Kernels are closures over the tile constants and the dtype (shared-memory shapes and local
arrays must be compile-time constants), built by the `build(ns)` functions of the modules
of this package into one namespace `ns` per configuration, in dependency order: a builder
reads the device functions it calls from ns and adds its own. They compile (NVVM) on first
launch, not cached on disk: numba's cache keys closures by source line, which would mix
tile configurations. The tunables live in the package (kernels/cuda/__init__.py), where
tests patch them; everything here reads them at call time.
"""
import importlib.util
import os
import sys

import numpy as np

try:  # importing the backend must never fail: numba-cuda (or a GPU) may be missing
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("not installed")
    import numba
    from numba import cuda
    IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    cuda = None
    numba = None
    IMPORT_ERROR = exc

# The order the builders run in: each reads what the earlier ones added.
BUILDERS = ("philox", "activation", "epilogue", "dense", "loss", "update", "batchnorm", "epoch",
            "fused", "fused_epoch")


def tunables():
    """The package module, whose tunables (TILE_M, FUSED_MAX_WIDTH, ...) tests patch."""
    return sys.modules[__package__]


def on_simulator():
    """True when numba-cuda runs its Python simulator instead of a GPU."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


class Namespace:
    """The device functions, kernels and constants of one (dtype, tiles) configuration."""


def config(dtype):
    """The configuration key: the tile constants now and the dtype."""
    t = tunables()
    return (int(t.TILE_M), int(t.TILE_N), int(t.TILE_K), int(t.THREAD_M), int(t.THREAD_N),
            int(t.BLOCK), int(t.UPDATE_PER_THREAD), np.dtype(dtype).str,
            (int(t.FUSED_ROWS), int(t.FUSED_MAX_WIDTH), int(t.FUSED_THREADS), int(t.FUSED_TK),
             int(t.FUSED_THREAD_M), int(t.FUSED_THREAD_N)))


def build(TM, TN, TK, RM, RN, NB, UPT, dtype_str, fused):
    """A fresh namespace of every kernel for this configuration (not compiled yet)."""
    if TM % RM or TN % RN or NB & (NB - 1):
        raise ValueError("TILE_M/THREAD_M, TILE_N/THREAD_N must divide and BLOCK be a power of 2")
    ns = Namespace()
    dtype = np.dtype(dtype_str)
    ns.dtype = dtype
    ns.T = numba.from_dtype(dtype)
    ns.FT = dtype.type
    ns.ZERO, ns.ONE = dtype.type(0), dtype.type(1)
    ns.TM, ns.TN, ns.TK, ns.RM, ns.RN, ns.NB, ns.UPT = TM, TN, TK, RM, RN, NB, UPT
    ns.NT = (TN // RN) * (TM // RM)         # threads of a GEMM block
    ns.CHUNK = NB * UPT                     # parameters per block of the fused update
    ns.fused_config = fused
    # device functions are inlined on the GPU; the simulator runs them as Python calls
    ns.dev = dict(device=True) if on_simulator() else dict(device=True, forceinline=True)
    for name in BUILDERS:
        importlib.import_module(f"{__package__}.{name}").build(ns)
    return ns


_BUILT = {}


def kernels(dtype):
    """The namespace for the current tile constants and dtype, built once, cached."""
    t = tunables()
    t.require()
    key = config(dtype)
    ns = _BUILT.get(key)
    if ns is None:
        ns = build(*key)
        ns.dummy = cuda.to_device(np.zeros((1, 1), ns.dtype))    # fills unused array slots
        ns.dummy1 = cuda.to_device(np.zeros(1, ns.dtype))
        _BUILT[key] = ns
    return ns


# ---------------------------------------------------------------- cuBLAS for big GEMMs
_CUPY = []


def cupy():
    """CuPy if installed (and not under the simulator, and not FASTREG_CUDA_CUBLAS=0), else
    None; looked up once."""
    if not _CUPY:
        mod = None
        if (not on_simulator() and os.environ.get("FASTREG_CUDA_CUBLAS", "1") != "0"
                and importlib.util.find_spec("cupy") is not None):
            try:
                import cupy as mod  # noqa: F811
            except Exception:  # pragma: no cover
                mod = None
        _CUPY.append(mod)
    return _CUPY[0]


def use_cublas(M, N, K):
    """cuBLAS + epilogue for big GEMMs (our kernel stays for small ones: fused, one launch)."""
    t = tunables()
    if t.FORCE_SPLIT:
        return True
    return cupy() is not None and M * N * K >= t.CUBLAS_MIN_MACS


# ---------------------------------------------------------------- launch helpers
def grid1(n, nb):
    """Blocks for a grid-stride elementwise kernel over n elements."""
    return max(1, min((n + nb - 1) // nb, 65535))


def to_dev(a):
    return cuda.to_device(np.ascontiguousarray(a))
