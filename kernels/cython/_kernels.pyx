# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""The Cython CPU backend's extension: the kernel contract compiled ahead of time (no JIT
warm-up). One extension, so that every kernel can inline every other; its rooms are the
included .pxi files, with the module names of the other backends (kernels/numba/*.py):

    contract   constants and the activation dispatch, GENERATED from kernels/contract.py
    philox     Philox words and normals       activation f and f' of every activation
    epilogue   noise, mask, input transform   dense      BLAS products + epilogue
    batchnorm  the BatchNorm dense layer
    loss       losses from logits              update     the fused penalized update
    state      the plan as C structs (EpochPlan)
    epoch      the compiled epoch (trunk and heads) and inference

Shape legend: B batch rows, I fan_in, O fan_out, K outputs, L layers, P parts,
G Philox groups (4 words each).

Every kernel mirrors kernels/numba (same operations, same order, same masks; the products
make the same BLAS calls as Numba's ``np.dot``), so in float64 the two CPU backends agree bit
for bit, and in float32 to rounding:
- Philox4x32-10 is C code (a scalar loop, and SSE2 / AVX2 loops picked at import by what the
  CPU has; all give the same bits). Words are stored in element order: element e of a
  (B, O) matrix reads ``words[e]`` = word e % 4 of counter (e // 4, step, layer, stream), the
  bits DESIGN.md fixes, so a mask is a contiguous compare that vectorises.
- Products call scipy's BLAS (``cython_blas``) directly, without the GIL, dispatched exactly
  like Numba's ``np.dot(a, b, out)``.
- The elementwise loops are written once and compiled once per activation (a fused tag type,
  generated from the contract's table by kernels/cython/generate.py) or called with literal
  optimizer codes, so each copy is branch-free and vectorised.
- Elementwise passes run under OpenMP (``prange``) when they are big enough, over FIXED
  chunks (not derived from the thread count): the partition, and with it every rounding, is
  the same for any number of threads.
- Scalars of the update are computed in double and rounded once to the parameter dtype;
  everything else is computed in the parameter dtype (``real``). Built with
  ``-ffp-contract=off`` and without fast-math, so no FMA or reassociation changes a rounding
  (``-fno-trapping-math -fno-math-errno`` only let the compiler if-convert and vectorise:
  they change no value).
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, expf, tanh, tanhf, sqrt, sqrtf, fabs, fabsf, log, log1p, pow
from libc.math cimport cos, sin, erfc, erfcf, expm1, expm1f, log1pf
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport ddot, dgemm, dgemv, sdot, sgemm, sgemv

cnp.import_array()

ctypedef fused real:
    float
    double

# Every integer constant of kernels/contract.py as a C enum, the CONTRACT dict of them, and
# the activation dispatch: written by setup.py before cythonize (never by hand).
include "contract.pxi"

# Work split of the parallel passes (the same numbers as kernels/numba).
cdef enum:
    GROUP_CHUNK = 4096     # Philox groups per parallel task
    ROW_CHUNK = 16         # rows per task in the forward epilogue and the update
    COL_CHUNK = 64         # columns per task in the backward epilogue


cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    static int fastreg_omp_threads(void) { return omp_get_max_threads(); }
    static const int fastreg_openmp = 1;
    #else
    static int fastreg_omp_threads(void) { return 1; }
    static const int fastreg_openmp = 0;
    #endif
    """
    int fastreg_omp_threads() nogil
    const int fastreg_openmp


OPENMP = bool(fastreg_openmp)


def openmp_threads():
    """Threads an OpenMP pass may use (1 in a serial build)."""
    return fastreg_omp_threads()


# ---------------------------------------------------------------- scalar helpers
cdef inline real _exp(real x) noexcept nogil:
    if real is float:
        return expf(x)
    else:
        return exp(x)


cdef inline real _tanh(real x) noexcept nogil:
    if real is float:
        return tanhf(x)
    else:
        return tanh(x)


cdef inline real _erfc(real x) noexcept nogil:
    if real is float:
        return erfcf(x)
    else:
        return erfc(x)


cdef inline real _expm1(real x) noexcept nogil:
    if real is float:
        return expm1f(x)
    else:
        return expm1(x)


cdef inline real _log1p(real x) noexcept nogil:
    if real is float:
        return log1pf(x)
    else:
        return log1p(x)


cdef inline real _sqrt(real x) noexcept nogil:
    if real is float:
        return sqrtf(x)
    else:
        return sqrt(x)


cdef inline real _abs(real x) noexcept nogil:
    if real is float:
        return fabsf(x)
    else:
        return fabs(x)


cdef inline real _sign(real x) noexcept nogil:
    """np.sign: -1, 0 or 1, and NaN for NaN."""
    if x > 0:
        return 1
    if x < 0:
        return -1
    return x * 0


cdef inline Py_ssize_t _min(Py_ssize_t a, Py_ssize_t b) noexcept nogil:
    return a if a < b else b


# ---------------------------------------------------------------- helpers of the entry points
# The contract's operations one at a time (tests, MC dropout, callers that drive their own
# loop) are the def functions at the end of each room; seeds arrive already split into the
# two key words (kernels/cython/__init__.py splits them).
cdef inline real* _ptr1(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


cdef inline real* _ptr2(real[:, ::1] a) noexcept nogil:
    return &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


def _check(bint ok, str what):
    if not ok:
        raise ValueError(what)


def _words_for(Py_ssize_t n):
    return np.empty(4 * max(1, (n + 3) // 4), np.uint32)


def _group_of_row(int64_t row0, Py_ssize_t width):
    """The Philox group of element 0 of a (rows, width) block whose row 0 is row row0 of
    its batch: row0 * width / 4, which must be whole (an MPI shard starts at a multiple of 4
    rows: kernels/reference/sharded.py)."""
    _check(row0 >= 0 and (row0 * width) % 4 == 0,
           "row0 * width must be a non-negative multiple of 4 (whole Philox groups)")
    return <uint32_t>((row0 * width) // 4)


def _threshold(int64_t thr):
    _check(0 <= thr <= 0xFFFFFFFF, f"dropout threshold {thr} outside 0..2**32-1")
    return thr


include "philox.pxi"
include "activation.pxi"
include "epilogue.pxi"
include "dense.pxi"
include "batchnorm.pxi"
include "loss.pxi"
include "update.pxi"
include "state.pxi"
include "epoch.pxi"
