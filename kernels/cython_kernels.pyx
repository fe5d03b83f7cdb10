# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
# cython: initializedcheck=False, nonecheck=False, embedsignature=True
"""The Cython CPU backend: the kernel contract compiled ahead of time (no JIT warm-up).

Shape legend: B batch rows, I fan_in, O fan_out, K outputs, G Philox groups (4 words each).

This module mirrors kernels/cpu.py function for function (same operations, same order, same
masks; the kernels make the same BLAS calls as Numba's ``np.dot``), so in float64 the two CPU
backends agree bit for bit, and in float32 to rounding:
- Philox4x32-10 is C code (a scalar loop, and SSE2 / AVX2 loops picked at import by what the
  CPU has; all give the same bits). Words are stored in element order: element e of a
  (B, O) matrix reads ``words[e]`` = word e % 4 of counter (e // 4, step, layer, stream), the
  bits DESIGN.md fixes, so a mask is a contiguous compare that vectorises.
- Products call scipy's BLAS (``cython_blas``) directly, without the GIL, dispatched exactly
  like Numba's ``np.dot(a, b, out)``: gemm for matrices, gemv / dot when a side is a vector.
  Arrays are row-major and BLAS column-major, so ``C = A @ B`` is computed as
  ``C^T = B^T A^T``: transposes are flags, nothing is copied. The bias is added in the
  epilogue pass (a beta=1 pre-fill would cost a pass of its own and change the rounding).
- The elementwise loops are written once and called with literal activation / optimizer
  codes, so the C compiler emits a branch-free, vectorised copy per code.
- Elementwise passes run under OpenMP (``prange``) when they are big enough, over FIXED
  chunks (not derived from the thread count): the partition, and with it every rounding, is
  the same for any number of threads. The bias gradient is reduced over column blocks, each
  column summed in row order by one thread.
- Scalars of the update are computed in double and rounded once to the parameter dtype;
  everything else is computed in the parameter dtype (``real``). Built with
  ``-ffp-contract=off`` and without fast-math, so no FMA or reassociation changes a rounding
  (``-fno-trapping-math -fno-math-errno`` only let the compiler if-convert and vectorise:
  they change no value).
- ``train_epoch`` runs a whole epoch (gather, forward, loss, backward, updates) in C, nogil.
"""
import numpy as np

cimport numpy as cnp
from cython.parallel cimport prange
from libc.math cimport exp, expf, tanh, tanhf, sqrt, sqrtf, fabs, fabsf, log, log1p, pow
from libc.math cimport cos, sin
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy
from scipy.linalg.cython_blas cimport ddot, dgemm, dgemv, sdot, sgemm, sgemv

cnp.import_array()

ctypedef fused real:
    float
    double

# ---------------------------------------------------------------- contract codes
# Copies of kernels/contract.py (C needs them at compile time); cython_backend.py checks at
# import that they still agree, so a stale build is refused instead of computing nonsense.
cdef enum:
    ACT_LINEAR = 0
    ACT_RELU = 1
    ACT_LEAKY_RELU = 2
    ACT_TANH = 3
    ACT_SIGMOID = 4
    LOSS_MSE = 0
    LOSS_BCE = 1
    LOSS_SCE = 2
    OPT_SGD = 0
    OPT_ADAM = 1
    OPT_ADAMW = 2
    HP_LR = 0
    HP_BETA1 = 1
    HP_BETA2 = 2
    HP_EPS = 3
    HP_NESTEROV = 4
    HP_DECOUPLED = 5
    HP_L1 = 6
    HP_L2 = 7
    HP_PROXIMAL = 8
    HP_MAXNORM = 9
    HP_GROUP = 10
    HP_SIZE = 11
    LI_ACT = 0
    LI_DROP_THR = 1
    LI_HAS_BIAS = 2
    LI_IN_DROP_THR = 3
    LF_SLOPE = 0
    LF_DROP_SCALE = 1
    LF_IN_DROP_SCALE = 2
    LI_BN = 4
    LF_BN_EPS = 3
    LF_BN_MOMENTUM = 4
    BN_GAMMA = 0
    BN_BETA = 1
    BN_MEAN = 0
    BN_VAR = 1
    BN_SAVE_MEAN = 0
    BN_SAVE_VAR = 1
    BN_SAVE_INVSTD = 2
    BN_SAVE_C1 = 3
    BN_SAVE_C2 = 4
    BN_SAVE_C3 = 5
    BN_SAVE_ROWS = 6
    LI_NOISE = 5
    LI_IN_NOISE = 6
    LF_NOISE_STD = 5
    LF_IN_NOISE_STD = 6
    NOISE_NONE = 0
    NOISE_ADD = 1
    NOISE_MUL = 2
    STREAM_DROPOUT = 0
    STREAM_INPUT_DROPOUT = 1
    STREAM_NOISE = 2
    STREAM_INPUT_NOISE = 9
    SCE_LABEL = 0
    SCE_LABEL_B = 1
    SCE_LAM = 2
    SCE_MIXED_WIDTH = 3

# Work split of the parallel passes (the same numbers as kernels/cpu.py and kernels/config.py).
cdef enum:
    GROUP_CHUNK = 4096     # Philox groups per parallel task
    ROW_CHUNK = 16         # rows per task in the forward epilogue and the update
    COL_CHUNK = 64         # columns per task in the backward epilogue
    PARALLEL_MIN_ELEMENTS = 65536

CONTRACT = dict(
    ACT_LINEAR=ACT_LINEAR, ACT_RELU=ACT_RELU, ACT_LEAKY_RELU=ACT_LEAKY_RELU, ACT_TANH=ACT_TANH,
    ACT_SIGMOID=ACT_SIGMOID, LOSS_MSE=LOSS_MSE, LOSS_BCE=LOSS_BCE, LOSS_SCE=LOSS_SCE,
    OPT_SGD=OPT_SGD, OPT_ADAM=OPT_ADAM, OPT_ADAMW=OPT_ADAMW, HP_LR=HP_LR, HP_BETA1=HP_BETA1,
    HP_BETA2=HP_BETA2, HP_EPS=HP_EPS, HP_NESTEROV=HP_NESTEROV, HP_DECOUPLED=HP_DECOUPLED,
    HP_L1=HP_L1, HP_L2=HP_L2, HP_PROXIMAL=HP_PROXIMAL, HP_MAXNORM=HP_MAXNORM, HP_GROUP=HP_GROUP,
    HP_SIZE=HP_SIZE,
    LI_ACT=LI_ACT, LI_DROP_THR=LI_DROP_THR, LI_HAS_BIAS=LI_HAS_BIAS,
    LI_IN_DROP_THR=LI_IN_DROP_THR, LF_SLOPE=LF_SLOPE, LF_DROP_SCALE=LF_DROP_SCALE,
    LF_IN_DROP_SCALE=LF_IN_DROP_SCALE, STREAM_DROPOUT=STREAM_DROPOUT,
    STREAM_INPUT_DROPOUT=STREAM_INPUT_DROPOUT, PARALLEL_MIN_ELEMENTS=PARALLEL_MIN_ELEMENTS,
    LI_BN=LI_BN, LF_BN_EPS=LF_BN_EPS, LF_BN_MOMENTUM=LF_BN_MOMENTUM, BN_GAMMA=BN_GAMMA,
    BN_BETA=BN_BETA, BN_MEAN=BN_MEAN, BN_VAR=BN_VAR, BN_SAVE_MEAN=BN_SAVE_MEAN,
    BN_SAVE_VAR=BN_SAVE_VAR, BN_SAVE_INVSTD=BN_SAVE_INVSTD, BN_SAVE_C1=BN_SAVE_C1,
    BN_SAVE_C2=BN_SAVE_C2, BN_SAVE_C3=BN_SAVE_C3, BN_SAVE_ROWS=BN_SAVE_ROWS,
    LI_NOISE=LI_NOISE, LI_IN_NOISE=LI_IN_NOISE, LF_NOISE_STD=LF_NOISE_STD,
    LF_IN_NOISE_STD=LF_IN_NOISE_STD, NOISE_NONE=NOISE_NONE, NOISE_ADD=NOISE_ADD,
    NOISE_MUL=NOISE_MUL, STREAM_NOISE=STREAM_NOISE, STREAM_INPUT_NOISE=STREAM_INPUT_NOISE,
    SCE_LABEL=SCE_LABEL, SCE_LABEL_B=SCE_LABEL_B, SCE_LAM=SCE_LAM,
    SCE_MIXED_WIDTH=SCE_MIXED_WIDTH,
)


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


# ---------------------------------------------------------------- Philox words
# Philox4x32-10 in C: a scalar loop (the definition), and SSE2 / AVX2 loops chosen at import
# by what the CPU has (the build stays portable: AVX2 code is compiled for that one function
# only and run only where supported). All give the same bits; tests compare them.
cdef extern from *:
    """
/* Philox4x32-10 over groups [lo, hi):
   words[4g + k] = word k of Philox((g + off, c1, c2, c3), (k0, k1)).
   Scalar C everywhere; SSE2 (x86-64 baseline) and AVX2 (chosen at run time) paths keep
   each 32-bit word in the low half of a 64-bit lane, so the 32x32->64 products are single
   pmuludq and no lane shuffles are needed between rounds. All paths give the same bits. */
#include <stdint.h>
#include <stddef.h>
#define FR_PHILOX_M0 0xD2511F53u
#define FR_PHILOX_M1 0xCD9E8D57u
#define FR_PHILOX_W0 0x9E3779B9u
#define FR_PHILOX_W1 0xBB67AE85u

static void fr_philox_scalar(uint32_t *w, ptrdiff_t lo, ptrdiff_t hi, uint32_t k0, uint32_t k1,
                             uint32_t s1, uint32_t s2, uint32_t s3, uint32_t off) {
    for (ptrdiff_t g = lo; g < hi; g++) {
        uint32_t c0 = (uint32_t)g + off, c1 = s1, c2 = s2, c3 = s3, a0 = k0, a1 = k1;
        for (int r = 0; r < 10; r++) {
            uint64_t p0 = (uint64_t)FR_PHILOX_M0 * c0;
            uint64_t p1 = (uint64_t)FR_PHILOX_M1 * c2;
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ a0;
            uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ a1;
            c1 = (uint32_t)p1; c3 = (uint32_t)p0; c0 = n0; c2 = n2;
            a0 += FR_PHILOX_W0; a1 += FR_PHILOX_W1;
        }
        w[4 * g] = c0; w[4 * g + 1] = c1; w[4 * g + 2] = c2; w[4 * g + 3] = c3;
    }
}

#if defined(__x86_64__) || defined(_M_X64)
#define FR_PHILOX_X86 1
#include <emmintrin.h>
#if defined(__GNUC__)
#include <immintrin.h>
#define FR_PHILOX_AVX2 1
#endif

/* one round on NV independent register sets */
#define FR_ROUND(V, MUL, SRL, XOR, AND, NV)                                      \\
    for (int v = 0; v < NV; v++) {                                               \\
        V p0 = MUL(c0[v], m0), p1 = MUL(c2[v], m1);                              \\
        V n0 = XOR(XOR(SRL(p1, 32), c1[v]), ka);                                 \\
        V n2 = XOR(XOR(SRL(p0, 32), c3[v]), kb);                                 \\
        c1[v] = AND(p1, mask); c3[v] = AND(p0, mask); c0[v] = n0; c2[v] = n2;    \\
    }

static void fr_philox_sse2(uint32_t *w, ptrdiff_t lo, ptrdiff_t hi, uint32_t k0, uint32_t k1,
                           uint32_t s1, uint32_t s2, uint32_t s3, uint32_t off) {
    const __m128i mask = _mm_set1_epi64x(0xFFFFFFFFll);
    const __m128i m0 = _mm_set1_epi64x(FR_PHILOX_M0), m1 = _mm_set1_epi64x(FR_PHILOX_M1);
    __m128i ka_r[10], kb_r[10];
    for (int r = 0; r < 10; r++) {
        ka_r[r] = _mm_set1_epi64x((uint32_t)(k0 + (uint32_t)r * FR_PHILOX_W0));
        kb_r[r] = _mm_set1_epi64x((uint32_t)(k1 + (uint32_t)r * FR_PHILOX_W1));
    }
    ptrdiff_t g = lo;
    for (; g + 8 <= hi; g += 8) {
        __m128i c0[4], c1[4], c2[4], c3[4];
        for (int v = 0; v < 4; v++) {
            c0[v] = _mm_set_epi64x((uint32_t)(g + 2 * v + 1) + off, (uint32_t)(g + 2 * v) + off);
            c0[v] = _mm_and_si128(c0[v], mask);
            c1[v] = _mm_set1_epi64x(s1); c2[v] = _mm_set1_epi64x(s2); c3[v] = _mm_set1_epi64x(s3);
        }
        for (int r = 0; r < 10; r++) {
            __m128i ka = ka_r[r], kb = kb_r[r];
            FR_ROUND(__m128i, _mm_mul_epu32, _mm_srli_epi64, _mm_xor_si128, _mm_and_si128, 4)
        }
        for (int v = 0; v < 4; v++) {
            __m128i l01 = _mm_or_si128(c0[v], _mm_slli_epi64(c1[v], 32));
            __m128i l23 = _mm_or_si128(c2[v], _mm_slli_epi64(c3[v], 32));
            _mm_storeu_si128((__m128i *)(w + 4 * (g + 2 * v)), _mm_unpacklo_epi64(l01, l23));
            _mm_storeu_si128((__m128i *)(w + 4 * (g + 2 * v + 1)), _mm_unpackhi_epi64(l01, l23));
        }
    }
    fr_philox_scalar(w, g, hi, k0, k1, s1, s2, s3, off);
}

#ifdef FR_PHILOX_AVX2
__attribute__((target("avx2")))
static void fr_philox_avx2(uint32_t *w, ptrdiff_t lo, ptrdiff_t hi, uint32_t k0, uint32_t k1,
                           uint32_t s1, uint32_t s2, uint32_t s3, uint32_t off) {
    const __m256i mask = _mm256_set1_epi64x(0xFFFFFFFFll);
    const __m256i m0 = _mm256_set1_epi64x(FR_PHILOX_M0), m1 = _mm256_set1_epi64x(FR_PHILOX_M1);
    __m256i ka_r[10], kb_r[10];
    for (int r = 0; r < 10; r++) {
        ka_r[r] = _mm256_set1_epi64x((uint32_t)(k0 + (uint32_t)r * FR_PHILOX_W0));
        kb_r[r] = _mm256_set1_epi64x((uint32_t)(k1 + (uint32_t)r * FR_PHILOX_W1));
    }
    ptrdiff_t g = lo;
    for (; g + 8 <= hi; g += 8) {
        __m256i c0[2], c1[2], c2[2], c3[2];
        for (int v = 0; v < 2; v++) {
            ptrdiff_t b = g + 4 * v;
            c0[v] = _mm256_set_epi64x((uint32_t)(b + 3) + off, (uint32_t)(b + 2) + off,
                                      (uint32_t)(b + 1) + off, (uint32_t)b + off);
            c0[v] = _mm256_and_si256(c0[v], mask);
            c1[v] = _mm256_set1_epi64x(s1); c2[v] = _mm256_set1_epi64x(s2);
            c3[v] = _mm256_set1_epi64x(s3);
        }
        for (int r = 0; r < 10; r++) {
            __m256i ka = ka_r[r], kb = kb_r[r];
            FR_ROUND(__m256i, _mm256_mul_epu32, _mm256_srli_epi64, _mm256_xor_si256,
                     _mm256_and_si256, 2)
        }
        for (int v = 0; v < 2; v++) {
            __m256i l01 = _mm256_or_si256(c0[v], _mm256_slli_epi64(c1[v], 32));
            __m256i l23 = _mm256_or_si256(c2[v], _mm256_slli_epi64(c3[v], 32));
            __m256i a = _mm256_unpacklo_epi64(l01, l23);   /* groups b, b+2 */
            __m256i bq = _mm256_unpackhi_epi64(l01, l23);  /* groups b+1, b+3 */
            uint32_t *dst = w + 4 * (g + 4 * v);
            _mm256_storeu_si256((__m256i *)dst, _mm256_permute2x128_si256(a, bq, 0x20));
            _mm256_storeu_si256((__m256i *)(dst + 8), _mm256_permute2x128_si256(a, bq, 0x31));
        }
    }
    fr_philox_sse2(w, g, hi, k0, k1, s1, s2, s3, off);
}
#endif
#endif

static int fr_philox_path = -1;   /* 0 scalar, 1 SSE2, 2 AVX2 (chosen at import) */

static int fr_philox_select(void) {
#ifdef FR_PHILOX_X86
#ifdef FR_PHILOX_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) return 2;
#endif
    return 1;
#else
    return 0;
#endif
}

static void fr_philox(uint32_t *w, ptrdiff_t lo, ptrdiff_t hi, uint32_t k0, uint32_t k1,
                      uint32_t s1, uint32_t s2, uint32_t s3, uint32_t off) {
    int path = fr_philox_path;
    if (path < 0) path = fr_philox_path = fr_philox_select();
#ifdef FR_PHILOX_X86
#ifdef FR_PHILOX_AVX2
    if (path == 2) { fr_philox_avx2(w, lo, hi, k0, k1, s1, s2, s3, off); return; }
#endif
    if (path == 1) { fr_philox_sse2(w, lo, hi, k0, k1, s1, s2, s3, off); return; }
#endif
    fr_philox_scalar(w, lo, hi, k0, k1, s1, s2, s3, off);
}

static int fr_philox_set_path(int path) {
    int best = fr_philox_select();
    int old = fr_philox_path;
    fr_philox_path = (path < 0 || path > best) ? best : path;
    return old;
}
    """
    void fr_philox(uint32_t* w, Py_ssize_t lo, Py_ssize_t hi, uint32_t k0, uint32_t k1,
                   uint32_t s1, uint32_t s2, uint32_t s3, uint32_t off) nogil
    int fr_philox_select() nogil
    int fr_philox_set_path(int path) nogil


fr_philox_set_path(-1)
PHILOX_PATHS = ("scalar", "sse2", "avx2")[:fr_philox_select() + 1]


def _set_philox_path(int path):
    """Force a Philox code path (0 scalar, 1 SSE2, 2 AVX2; -1 the best); returns the old one."""
    return fr_philox_set_path(path)


cdef inline void _philox_groups(uint32_t* words, Py_ssize_t g_lo, Py_ssize_t g_hi, uint32_t k0,
                                uint32_t k1, uint32_t step, uint32_t layer, uint32_t stream,
                                uint32_t c0_offset) noexcept nogil:
    """words[4g:4g+4] = Philox((g + c0_offset, step, layer, stream), (k0, k1)), g in [g_lo, g_hi).

    Element order: element e reads words[e] (= word e % 4 of group e // 4), so the masks
    below are contiguous compares. c0_offset is 0 except in the known-answer tests.
    """
    fr_philox(words, g_lo, g_hi, k0, k1, step, layer, stream, c0_offset)


cdef void _philox_fill(uint32_t* words, Py_ssize_t n_elements, uint32_t k0, uint32_t k1,
                       uint32_t step, uint32_t layer, uint32_t stream) noexcept nogil:
    """Words for elements 0..n_elements-1 (rounded up to whole groups of 4) of one
    (seed, step, layer, stream) sequence; words holds >= 4 * ceil(n_elements / 4) values."""
    cdef Py_ssize_t n_groups = (n_elements + 3) // 4
    cdef Py_ssize_t n_chunks, c
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (n_groups + GROUP_CHUNK - 1) // GROUP_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _philox_groups(words, c * GROUP_CHUNK, _min(c * GROUP_CHUNK + GROUP_CHUNK, n_groups),
                           k0, k1, step, layer, stream, 0)
    else:
        _philox_groups(words, 0, n_groups, k0, k1, step, layer, stream, 0)


# ---------------------------------------------------------------- Gaussian noise
# kernels/philox.py normal_from_words: element e pairs with e ^ 1 (words in element order),
# the even word gives the radius, the odd one the angle; float64 libm, rounded by the caller.
cdef double TWO_PI = 6.283185307179586      # 2.0 * math.pi, exactly


cdef inline double _normal(uint32_t* nwords, Py_ssize_t e) noexcept nogil:
    cdef Py_ssize_t p = e - (e & 1)
    cdef double u1 = (<double>nwords[p] + 0.5) * (1.0 / 4294967296.0)
    cdef double u2 = (<double>nwords[p + 1] + 0.5) * (1.0 / 4294967296.0)
    cdef double r = sqrt(-2.0 * log(u1))
    cdef double t = TWO_PI * u2
    if e & 1:
        return r * sin(t)
    return r * cos(t)


cdef inline void _normal_pair(uint32_t* nwords, Py_ssize_t p, double* c,
                              double* s) noexcept nogil:
    """The normals of elements p and p + 1 (p even): _normal's formula with the radius
    computed once (the same values, half the log / sqrt calls)."""
    cdef double u1 = (<double>nwords[p] + 0.5) * (1.0 / 4294967296.0)
    cdef double u2 = (<double>nwords[p + 1] + 0.5) * (1.0 / 4294967296.0)
    cdef double r = sqrt(-2.0 * log(u1))
    cdef double t = TWO_PI * u2
    c[0] = r * cos(t)
    s[0] = r * sin(t)


cdef inline real _noisy(real v, int noise, real nstd, real nrm) noexcept nogil:
    """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n)."""
    if noise == NOISE_ADD:
        return v + nstd * nrm
    return v * (<real>1 + nstd * nrm)


# ---------------------------------------------------------------- activations
cdef inline real _activate(real z, int act, real slope) noexcept nogil:
    cdef real e
    if act == ACT_RELU:
        return z if z > 0 else z * 0
    if act == ACT_LEAKY_RELU:
        return z if z > 0 else z * slope
    if act == ACT_TANH:
        return _tanh(z)
    if act == ACT_SIGMOID:
        if z >= 0:
            return <real>1 / (<real>1 + _exp(-z))
        e = _exp(z)
        return e / (<real>1 + e)
    return z


cdef inline real _activation_grad(real a, int act, real slope) noexcept nogil:
    """f'(z) from a = f(z)."""
    if act == ACT_RELU:
        return 1 if a > 0 else 0
    if act == ACT_LEAKY_RELU:
        return 1 if a > 0 else slope
    if act == ACT_TANH:
        return <real>1 - a * a
    if act == ACT_SIGMOID:
        return a * (<real>1 - a)
    return 1


# ---------------------------------------------------------------- BLAS products
# np.dot(a, b, out) exactly as Numba lowers it (numba/np/linalg.py: dot_3_mm), so that both
# CPU backends make the same BLAS calls and get the same bits: a (m, k) and b (k, n) are
# row-major arrays or transposed views of them (a_t / b_t: "layout F"), out (m, n) row-major.
# Vector cases go to gemv / dot, the rest to gemm computing out^T = b^T a^T (BLAS is
# column-major): transposes are flags, nothing is copied.
cdef inline void _gemv(bint trans, int M, int N, real* a, int lda, real* x,
                       real* y) noexcept nogil:
    cdef char t = c't' if trans else c'n'
    cdef real alpha = 1
    cdef real beta = 0
    cdef int inc = 1
    if real is float:
        sgemv(&t, &M, &N, &alpha, a, &lda, x, &inc, &beta, y, &inc)
    else:
        dgemv(&t, &M, &N, &alpha, a, &lda, x, &inc, &beta, y, &inc)


cdef inline void _gemv_of(bint do_trans, bint mat_t, int rows, int cols, real* mat, real* v,
                          real* out) noexcept nogil:
    """numba's call_xxgemv for a matrix of shape (rows, cols), layout F iff mat_t."""
    if mat_t:
        _gemv(do_trans, rows, cols, mat, rows, v, out)
    else:
        _gemv(do_trans, cols, rows, mat, cols, v, out)


cdef void _npdot(real* a, bint a_t, real* b, bint b_t, real* out, Py_ssize_t m_,
                 Py_ssize_t k_, Py_ssize_t n_) noexcept nogil:
    """out (m, n) = a (m, k) @ b (k, n)."""
    cdef int m = <int>m_
    cdef int k = <int>k_
    cdef int n = <int>n_
    cdef int inc = 1
    cdef char ta, tb
    cdef int lda, ldb
    cdef real alpha = 1
    cdef real beta = 0
    cdef Py_ssize_t i
    if m == 0 or n == 0 or k == 0:
        for i in range(m_ * n_):
            out[i] = 0
        return
    if n == 1:
        if m == 1:
            if real is float:
                out[0] = sdot(&k, a, &inc, b, &inc)
            else:
                out[0] = ddot(&k, a, &inc, b, &inc)
        else:
            _gemv_of(not a_t, a_t, m, k, a, b, out)
        return
    if m == 1:
        _gemv_of(b_t, b_t, k, n, b, a, out)
        return
    ta = c't' if b_t else c'n'
    lda = k if b_t else n
    tb = c't' if a_t else c'n'
    ldb = m if a_t else k
    if real is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, b, &lda, a, &ldb, &beta, out, &n)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, b, &lda, a, &ldb, &beta, out, &n)


cdef inline void _matmul(real* x, real* W, real* out, Py_ssize_t B, Py_ssize_t I,
                         Py_ssize_t O) noexcept nogil:
    """out (B, O) = x (B, I) @ W (I, O)."""
    _npdot(x, False, W, False, out, B, I, O)


cdef inline void _matmul_tn(real* x, real* dz, real* dW, Py_ssize_t B, Py_ssize_t I,
                            Py_ssize_t O) noexcept nogil:
    """dW (I, O) = x.T @ dz, x (B, I), dz (B, O)."""
    _npdot(x, True, dz, False, dW, I, B, O)


cdef inline void _matmul_nt(real* dz, real* W, real* dx, Py_ssize_t B, Py_ssize_t I,
                            Py_ssize_t O) noexcept nogil:
    """dx (B, I) = dz @ W.T, dz (B, O), W (I, O)."""
    _npdot(dz, False, W, True, dx, B, O, I)


# ---------------------------------------------------------------- dense forward
cdef void _fill_output_words(uint32_t* words, uint32_t* nwords, Py_ssize_t n, uint32_t k0,
                             uint32_t k1, uint32_t step, uint32_t layer, uint32_t thr,
                             int noise, bint backward) noexcept nogil:
    """The dropout words (with dropout) and the noise words (forward: with noise; backward:
    with GaussianDropout only, additive noise leaves no trace in the gradient) of a layer."""
    if thr > 0:
        _philox_fill(words, n, k0, k1, step, layer, STREAM_DROPOUT)
    if noise == NOISE_MUL or (noise != NOISE_NONE and not backward):
        _philox_fill(nwords, n, k0, k1, step, layer, STREAM_NOISE)


# The elementwise loops take the activation as an argument and are always called with a
# literal code (the switch in the caller), so gcc specialises each copy: no branch per
# element, and the piecewise-linear ones vectorise.
cdef inline void _activate_span(real* row, Py_ssize_t n, int act, real slope) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        row[j] = _activate(row[j], act, slope)


cdef void _activate_row(real* row, Py_ssize_t n, int act, real slope) noexcept nogil:
    if act == ACT_RELU:
        _activate_span(row, n, ACT_RELU, slope)
    elif act == ACT_LEAKY_RELU:
        _activate_span(row, n, ACT_LEAKY_RELU, slope)
    elif act == ACT_TANH:
        _activate_span(row, n, ACT_TANH, slope)
    elif act == ACT_SIGMOID:
        _activate_span(row, n, ACT_SIGMOID, slope)


cdef inline void _noise_one(real* row, real* pre, uint32_t* w, Py_ssize_t j, double nrm,
                            uint32_t thr, real scale, int noise, real nstd) noexcept nogil:
    cdef real v = row[j]
    if pre != NULL:
        pre[j] = v
    v = _noisy(v, noise, nstd, <real>nrm)
    if thr > 0:
        v = v * scale if w[j] >= thr else 0
    row[j] = v


cdef void _noise_span(real* row, real* pre, uint32_t* w, uint32_t* nwords, Py_ssize_t e0,
                      Py_ssize_t n, uint32_t thr, real scale, int noise,
                      real nstd) noexcept nogil:
    """row[j] <- dropout(noise(row[j])) (pre[j] <- row[j] first unless NULL), j < n; e0 is
    row[0]'s element index (the noise index). Whole Box-Muller pairs in the middle."""
    cdef Py_ssize_t j = 0
    cdef double c, s
    if e0 & 1 and n > 0:
        _noise_one(row, pre, w, 0, _normal(nwords, e0), thr, scale, noise, nstd)
        j = 1
    while j + 1 < n:
        _normal_pair(nwords, e0 + j, &c, &s)
        _noise_one(row, pre, w, j, c, thr, scale, noise, nstd)
        _noise_one(row, pre, w, j + 1, s, thr, scale, noise, nstd)
        j += 2
    if j < n:
        _noise_one(row, pre, w, j, _normal(nwords, e0 + j), thr, scale, noise, nstd)


cdef inline void _output_row(real* out, real* pre, uint32_t* words, uint32_t* nwords,
                             Py_ssize_t e0, Py_ssize_t n, uint32_t thr, real scale, int noise,
                             real nstd) noexcept nogil:
    """The part of a dense layer's forward epilogue after the activation (plain and
    BatchNorm layers): the n elements from flat index e0 of out <- dropout(noise(a)), with
    pre <- a first (noise, pre not NULL). out, pre, words: the layer's base pointers."""
    cdef Py_ssize_t j
    cdef real* row = out + e0
    cdef uint32_t* w
    if noise != NOISE_NONE:
        _noise_span(row, pre + e0 if pre != NULL else NULL, words + e0, nwords, e0, n, thr,
                    scale, noise, nstd)
    elif thr > 0:
        w = words + e0
        for j in range(n):
            row[j] = row[j] * scale if w[j] >= thr else 0


cdef void _forward_rows(real* out, Py_ssize_t O, real* b, int act, real slope, uint32_t thr,
                        real scale, uint32_t* words, Py_ssize_t r0, Py_ssize_t r1, int noise,
                        real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """Rows r0..r1 of out: z = out + b, a = f(z), [pre = a, a = noise(a)], a * scale if kept
    else 0 (thr > 0)."""
    cdef Py_ssize_t i, j
    cdef real* row
    for i in range(r0, r1):
        row = out + i * O
        if b != NULL:
            for j in range(O):
                row[j] = row[j] + b[j]
        _activate_row(row, O, act, slope)
        _output_row(out, pre, words, nwords, i * O, O, thr, scale, noise, nstd)


cdef void _forward_epilogue(real* out, Py_ssize_t B, Py_ssize_t O, real* b, int act,
                            real slope, uint32_t thr, real scale, uint32_t* words, int noise,
                            real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    cdef Py_ssize_t c, n_chunks
    if B * O >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _forward_rows(out, O, b, act, slope, thr, scale, words, c * ROW_CHUNK,
                          _min(B, c * ROW_CHUNK + ROW_CHUNK), noise, nstd, pre, nwords)
    else:
        _forward_rows(out, O, b, act, slope, thr, scale, words, 0, B, noise, nstd, pre, nwords)


cdef void _dense_forward(real* x, real* W, real* b, real* out, Py_ssize_t B, Py_ssize_t I,
                         Py_ssize_t O, int act, real slope, uint32_t thr, real scale,
                         uint32_t k0, uint32_t k1, uint32_t step, uint32_t layer,
                         uint32_t* words, int noise, real nstd, real* pre,
                         uint32_t* nwords) noexcept nogil:
    """out = dropout(noise(f(x @ W + b))): one GEMM, then one pass over the output; pre
    (unless NULL) = f(x @ W + b) when there is noise. nwords: the noise words' buffer."""
    _matmul(x, W, out, B, I, O)
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, False)
    _forward_epilogue(out, B, O, b, act, slope, thr, scale, words, noise, nstd, pre, nwords)


# ---------------------------------------------------------------- dense backward
cdef inline void _backward_span(real* grad, real* out, uint32_t* w, real* db, Py_ssize_t n,
                                int act, real slope, uint32_t thr, real scale) noexcept nogil:
    """One row segment: grad <- dL/dz (mask regenerated, f' from the output), db += dz."""
    cdef Py_ssize_t j
    cdef real a, dz
    for j in range(n):
        a = out[j]
        if thr > 0:
            if act == ACT_TANH or act == ACT_SIGMOID:
                a = a / scale       # dropped units: 0 / scale, unused
            dz = (grad[j] * scale) * _activation_grad(a, act, slope) if w[j] >= thr else 0
        else:
            dz = grad[j] * _activation_grad(a, act, slope)
        grad[j] = dz
        if db != NULL:
            db[j] += dz


cdef void _backward_row(real* grad, real* out, uint32_t* w, real* db, Py_ssize_t n, int act,
                        real slope, uint32_t thr, real scale) noexcept nogil:
    if thr > 0:
        if act == ACT_RELU:
            _backward_span(grad, out, w, db, n, ACT_RELU, slope, thr, scale)
        elif act == ACT_LEAKY_RELU:
            _backward_span(grad, out, w, db, n, ACT_LEAKY_RELU, slope, thr, scale)
        elif act == ACT_TANH:
            _backward_span(grad, out, w, db, n, ACT_TANH, slope, thr, scale)
        elif act == ACT_SIGMOID:
            _backward_span(grad, out, w, db, n, ACT_SIGMOID, slope, thr, scale)
        else:
            _backward_span(grad, out, w, db, n, ACT_LINEAR, slope, thr, scale)
    else:
        if act == ACT_RELU:
            _backward_span(grad, out, w, db, n, ACT_RELU, slope, 0, scale)
        elif act == ACT_LEAKY_RELU:
            _backward_span(grad, out, w, db, n, ACT_LEAKY_RELU, slope, 0, scale)
        elif act == ACT_TANH:
            _backward_span(grad, out, w, db, n, ACT_TANH, slope, 0, scale)
        elif act == ACT_SIGMOID:
            _backward_span(grad, out, w, db, n, ACT_SIGMOID, slope, 0, scale)
        else:
            _backward_span(grad, out, w, db, n, ACT_LINEAR, slope, 0, scale)


cdef inline void _dz_noise_one(real* grad, real* pre, uint32_t* w, real* db, Py_ssize_t j,
                               double nrm, int act, real slope, uint32_t thr, real scale,
                               int noise, real nstd) noexcept nogil:
    cdef real d = grad[j]
    if thr > 0:
        d = d * scale
    if noise == NOISE_MUL:
        d = d * (<real>1 + nstd * <real>nrm)
    if act != ACT_LINEAR:
        d = d * _activation_grad(pre[j], act, slope)
    if thr > 0 and w[j] < thr:
        d = 0
    grad[j] = d
    if db != NULL:
        db[j] += d


cdef inline void _backward_noise_span(real* grad, real* pre, uint32_t* w, uint32_t* nwords,
                                      Py_ssize_t e0, real* db, Py_ssize_t n, int act,
                                      real slope, uint32_t thr, real scale, int noise,
                                      real nstd) noexcept nogil:
    """A row segment of a layer with noise: dz = ((g * scale) * (1 + std * n)) * f'(pre) if
    kept else 0 (reference order; scale with dropout only, the factor for NOISE_MUL only, f'
    for a nonlinear f only); e0 is the segment's first element (the noise index)."""
    cdef Py_ssize_t j = 0
    cdef double c = 0.0
    cdef double s = 0.0
    cdef bint mul = noise == NOISE_MUL
    if e0 & 1 and n > 0:
        _dz_noise_one(grad, pre, w, db, 0, _normal(nwords, e0) if mul else 0.0, act, slope, thr,
                      scale, noise, nstd)
        j = 1
    while j + 1 < n:
        if mul:
            _normal_pair(nwords, e0 + j, &c, &s)
        _dz_noise_one(grad, pre, w, db, j, c, act, slope, thr, scale, noise, nstd)
        _dz_noise_one(grad, pre, w, db, j + 1, s, act, slope, thr, scale, noise, nstd)
        j += 2
    if j < n:
        _dz_noise_one(grad, pre, w, db, j, _normal(nwords, e0 + j) if mul else 0.0, act, slope,
                      thr, scale, noise, nstd)


cdef void _backward_noise_row(real* grad, real* pre, uint32_t* w, uint32_t* nwords,
                              Py_ssize_t e0, real* db, Py_ssize_t n, int act, real slope,
                              uint32_t thr, real scale, int noise, real nstd) noexcept nogil:
    if act == ACT_RELU:
        _backward_noise_span(grad, pre, w, nwords, e0, db, n, ACT_RELU, slope, thr, scale,
                             noise, nstd)
    elif act == ACT_LEAKY_RELU:
        _backward_noise_span(grad, pre, w, nwords, e0, db, n, ACT_LEAKY_RELU, slope, thr,
                             scale, noise, nstd)
    elif act == ACT_TANH:
        _backward_noise_span(grad, pre, w, nwords, e0, db, n, ACT_TANH, slope, thr, scale,
                             noise, nstd)
    elif act == ACT_SIGMOID:
        _backward_noise_span(grad, pre, w, nwords, e0, db, n, ACT_SIGMOID, slope, thr, scale,
                             noise, nstd)
    else:
        _backward_noise_span(grad, pre, w, nwords, e0, db, n, ACT_LINEAR, slope, thr, scale,
                             noise, nstd)


cdef inline void _output_grad_row(real* grad, real* out, real* pre, uint32_t* words,
                                  uint32_t* nwords, Py_ssize_t e0, real* db, Py_ssize_t n,
                                  int act, real slope, uint32_t thr, real scale, int noise,
                                  real nstd) noexcept nogil:
    """_output_row and f undone (plain and BatchNorm layers): the n elements from flat index
    e0 of grad <- dL/d(f's input) from dL/d(out) (mask and noise factor regenerated, f' from
    out, or from pre with noise); db (unless NULL) += them. grad, out, pre, words: the
    layer's base pointers."""
    if noise != NOISE_NONE:
        _backward_noise_row(grad + e0, pre + e0 if pre != NULL else NULL, words + e0, nwords,
                            e0, db, n, act, slope, thr, scale, noise, nstd)
    else:
        _backward_row(grad + e0, out + e0, words + e0, db, n, act, slope, thr, scale)


cdef void _backward_cols(real* grad, real* out, Py_ssize_t B, Py_ssize_t O, real* db,
                         int act, real slope, uint32_t thr, real scale, uint32_t* words,
                         Py_ssize_t c0, Py_ssize_t c1, int noise, real nstd, real* pre,
                         uint32_t* nwords) noexcept nogil:
    """Columns c0..c1 of every row, rows in order: each bias sum runs in row order."""
    cdef Py_ssize_t i, j
    cdef real* dbc = db + c0 if db != NULL else NULL
    if db != NULL:
        for j in range(c0, c1):
            db[j] = 0
    for i in range(B):
        _output_grad_row(grad, out, pre, words, nwords, i * O + c0, dbc, c1 - c0, act, slope,
                         thr, scale, noise, nstd)


cdef void _dense_backward(real* grad, real* out, real* x, real* W, real* dW, real* db,
                          real* dx, Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, int act,
                          real slope, uint32_t thr, real scale, uint32_t k0, uint32_t k1,
                          uint32_t step, uint32_t layer, uint32_t* words, int noise, real nstd,
                          real* pre, uint32_t* nwords) noexcept nogil:
    """grad holds dL/d(out) on entry and dL/dz on exit; dW, db (if any), dx (if any).
    With noise, f' comes from pre (NULL for a linear layer) and GaussianDropout's factor is
    regenerated from the noise words."""
    cdef Py_ssize_t c, n_chunks
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, True)
    if B * O >= PARALLEL_MIN_ELEMENTS and O >= 32:
        n_chunks = (O + COL_CHUNK - 1) // COL_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _backward_cols(grad, out, B, O, db, act, slope, thr, scale, words,
                           c * COL_CHUNK, _min(O, c * COL_CHUNK + COL_CHUNK), noise, nstd, pre,
                           nwords)
    else:
        _backward_cols(grad, out, B, O, db, act, slope, thr, scale, words, 0, O, noise, nstd,
                       pre, nwords)
    _matmul_tn(x, grad, dW, B, I, O)
    if dx != NULL:
        _matmul_nt(grad, W, dx, B, I, O)


# ---------------------------------------------------------------- dense + BatchNorm (training)
# reference.bn_dense_forward / bn_dense_backward (and kernels/cpu.py's twins), pass for pass.
# Column statistics: each column summed in float64 in row order by one thread, over fixed
# column chunks; elementwise passes over row chunks. save is (BN_SAVE_ROWS, O) float64.
cdef void _bn_stats_cols(real* out, Py_ssize_t B, Py_ssize_t O, real* b, double* save,
                         double eps, Py_ssize_t c0, Py_ssize_t c1) noexcept nogil:
    """Columns c0..c1: z += b in place; batch mean, biased variance (float64, two passes),
    inv_std = 1 / sqrt(var + eps) rounded to the dtype."""
    cdef Py_ssize_t i, j
    cdef real* row
    cdef double d, var
    cdef double* mean = save + BN_SAVE_MEAN * O
    cdef double* vs = save + BN_SAVE_VAR * O
    cdef double* inv = save + BN_SAVE_INVSTD * O
    for j in range(c0, c1):
        mean[j] = 0.0
        vs[j] = 0.0
    for i in range(B):
        row = out + i * O
        if b != NULL:
            for j in range(c0, c1):
                row[j] = row[j] + b[j]
        for j in range(c0, c1):
            mean[j] += <double>row[j]
    for j in range(c0, c1):
        mean[j] = mean[j] / <double>B
    for i in range(B):
        row = out + i * O
        for j in range(c0, c1):
            d = <double>row[j] - mean[j]
            vs[j] += d * d
    for j in range(c0, c1):
        var = vs[j] / <double>B
        vs[j] = var
        inv[j] = <double><real>(1.0 / sqrt(var + eps))


cdef inline void _bn_act_span(real* row, real* xr, real* gam, real* bet, double* mean,
                              double* inv, Py_ssize_t O, int act, real slope) noexcept nogil:
    cdef Py_ssize_t j
    cdef real xh
    for j in range(O):
        xh = (row[j] - <real>mean[j]) * <real>inv[j]
        xr[j] = xh
        row[j] = _activate(gam[j] * xh + bet[j], act, slope)


cdef void _bn_act_rows(real* out, real* xhat, Py_ssize_t O, real* gb, double* save, int act,
                       real slope, uint32_t thr, real scale, uint32_t* words, Py_ssize_t r0,
                       Py_ssize_t r1, int noise, real nstd, real* pre,
                       uint32_t* nwords) noexcept nogil:
    """Rows r0..r1: zhat -> xhat, out = f(gamma * zhat + beta), [pre = out, noise], dropout
    (thr > 0)."""
    cdef Py_ssize_t i
    cdef real* row
    cdef real* xr
    cdef double* mean = save + BN_SAVE_MEAN * O
    cdef double* inv = save + BN_SAVE_INVSTD * O
    cdef real* gam = gb + BN_GAMMA * O
    cdef real* bet = gb + BN_BETA * O
    for i in range(r0, r1):
        row = out + i * O
        xr = xhat + i * O
        if act == ACT_RELU:
            _bn_act_span(row, xr, gam, bet, mean, inv, O, ACT_RELU, slope)
        elif act == ACT_LEAKY_RELU:
            _bn_act_span(row, xr, gam, bet, mean, inv, O, ACT_LEAKY_RELU, slope)
        elif act == ACT_TANH:
            _bn_act_span(row, xr, gam, bet, mean, inv, O, ACT_TANH, slope)
        elif act == ACT_SIGMOID:
            _bn_act_span(row, xr, gam, bet, mean, inv, O, ACT_SIGMOID, slope)
        else:
            _bn_act_span(row, xr, gam, bet, mean, inv, O, ACT_LINEAR, slope)
        _output_row(out, pre, words, nwords, i * O, O, thr, scale, noise, nstd)


cdef void _bn_dense_forward(real* x, real* W, real* b, real* out, real* xhat, real* gb,
                            double* save, Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, int act,
                            real slope, uint32_t thr, real scale, double eps, uint32_t k0,
                            uint32_t k1, uint32_t step, uint32_t layer, uint32_t* words,
                            int noise, real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """out = dropout(noise(f(gamma * zhat + beta))), zhat the batch-normalized x @ W + b;
    pre (unless NULL) = f(gamma * zhat + beta) with noise."""
    cdef Py_ssize_t c, n_chunks
    _matmul(x, W, out, B, I, O)
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, False)
    if B * O >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (O + COL_CHUNK - 1) // COL_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _bn_stats_cols(out, B, O, b, save, eps, c * COL_CHUNK,
                           _min(O, c * COL_CHUNK + COL_CHUNK))
        n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _bn_act_rows(out, xhat, O, gb, save, act, slope, thr, scale, words, c * ROW_CHUNK,
                         _min(B, c * ROW_CHUNK + ROW_CHUNK), noise, nstd, pre, nwords)
    else:
        _bn_stats_cols(out, B, O, b, save, eps, 0, O)
        _bn_act_rows(out, xhat, O, gb, save, act, slope, thr, scale, words, 0, B, noise, nstd,
                     pre, nwords)


cdef void _bn_backward_cols(real* grad, real* out, real* xhat, Py_ssize_t B, Py_ssize_t O,
                            real* gb, double* save, real* db, real* dgb, int act, real slope,
                            uint32_t thr, real scale, uint32_t* words, Py_ssize_t c0,
                            Py_ssize_t c1, int noise, real nstd, real* pre,
                            uint32_t* nwords) noexcept nogil:
    """Columns c0..c1, all three passes: dy in place (mask and noise factor regenerated, f'
    from the output, or from pre with noise);
    dbeta = sum dy, dgamma = sum dy * zhat (float64, row order) -> dgb, db = 0; then
    dz = c1 * ((dy - c2) - zhat * c3), c1 = gamma * inv_std, c2 = dbeta / B, c3 = dgamma / B."""
    cdef Py_ssize_t i, j
    cdef real* g
    cdef real* xr
    cdef double d, s_1, s_2
    cdef double* inv = save + BN_SAVE_INVSTD * O
    cdef double* k1_ = save + BN_SAVE_C1 * O
    cdef double* k2_ = save + BN_SAVE_C2 * O
    cdef double* k3_ = save + BN_SAVE_C3 * O
    for i in range(B):
        _output_grad_row(grad, out, pre, words, nwords, i * O + c0, NULL, c1 - c0, act, slope,
                         thr, scale, noise, nstd)
    for j in range(c0, c1):
        k1_[j] = 0.0
        k2_[j] = 0.0
    for i in range(B):
        g = grad + i * O
        xr = xhat + i * O
        for j in range(c0, c1):
            d = <double>g[j]
            k1_[j] += d
            k2_[j] += d * <double>xr[j]
    for j in range(c0, c1):
        s_1 = k1_[j]
        s_2 = k2_[j]
        dgb[BN_GAMMA * O + j] = <real>s_2
        dgb[BN_BETA * O + j] = <real>s_1
        k1_[j] = <double><real>(<double>gb[BN_GAMMA * O + j] * inv[j])
        k2_[j] = <double><real>(s_1 / <double>B)
        k3_[j] = <double><real>(s_2 / <double>B)
        if db != NULL:
            db[j] = 0
    for i in range(B):
        g = grad + i * O
        xr = xhat + i * O
        for j in range(c0, c1):
            g[j] = <real>k1_[j] * ((g[j] - <real>k2_[j]) - xr[j] * <real>k3_[j])


cdef void _bn_running_update(real* stats, double* save, Py_ssize_t O,
                             double momentum) noexcept nogil:
    """stats = momentum * stats + (1 - momentum) * (batch mean, biased batch variance)."""
    cdef Py_ssize_t j
    cdef double rest = 1.0 - momentum
    for j in range(O):
        stats[BN_MEAN * O + j] = <real>(momentum * <double>stats[BN_MEAN * O + j]
                                        + rest * save[BN_SAVE_MEAN * O + j])
        stats[BN_VAR * O + j] = <real>(momentum * <double>stats[BN_VAR * O + j]
                                       + rest * save[BN_SAVE_VAR * O + j])


cdef void _bn_dense_backward(real* grad, real* out, real* xhat, real* x, real* W, real* gb,
                             real* stats, double* save, real* dW, real* db, real* dgb,
                             real* dx, Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, int act,
                             real slope, uint32_t thr, real scale, double momentum,
                             uint32_t k0, uint32_t k1, uint32_t step, uint32_t layer,
                             uint32_t* words, int noise, real nstd, real* pre,
                             uint32_t* nwords) noexcept nogil:
    """grad: dL/d(out) in, dL/dz out; dgb, dW, db (= 0), dx; then the running statistics."""
    cdef Py_ssize_t c, n_chunks
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, True)
    if B * O >= PARALLEL_MIN_ELEMENTS and O >= 32:
        n_chunks = (O + COL_CHUNK - 1) // COL_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _bn_backward_cols(grad, out, xhat, B, O, gb, save, db, dgb, act, slope, thr, scale,
                              words, c * COL_CHUNK, _min(O, c * COL_CHUNK + COL_CHUNK), noise,
                              nstd, pre, nwords)
    else:
        _bn_backward_cols(grad, out, xhat, B, O, gb, save, db, dgb, act, slope, thr, scale,
                          words, 0, O, noise, nstd, pre, nwords)
    _matmul_tn(x, grad, dW, B, I, O)
    if dx != NULL:
        _matmul_nt(grad, W, dx, B, I, O)
    _bn_running_update(stats, save, O, momentum)


# ---------------------------------------------------------------- input dropout
cdef void _input_dropout(real* x, real* out, Py_ssize_t B, Py_ssize_t I, uint32_t thr,
                         real scale, uint32_t k0, uint32_t k1, uint32_t step, uint32_t layer,
                         uint32_t* words, int noise, real nstd, uint32_t* nwords) noexcept nogil:
    """out = dropout(noise(x)): streams STREAM_INPUT_NOISE and STREAM_INPUT_DROPOUT."""
    cdef Py_ssize_t e, c, n_chunks
    cdef Py_ssize_t n = B * I
    if thr > 0:
        _philox_fill(words, n, k0, k1, step, layer, STREAM_INPUT_DROPOUT)
    if noise == NOISE_NONE:
        for e in range(n):
            out[e] = x[e] * scale if words[e] >= thr else 0
        return
    _philox_fill(nwords, n, k0, k1, step, layer, STREAM_INPUT_NOISE)
    if n >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (n + ROW_CHUNK * 1024 - 1) // (ROW_CHUNK * 1024)
        for c in prange(n_chunks, schedule="static"):
            _input_noise_range(x, out, c * ROW_CHUNK * 1024,
                               _min(n, (c + 1) * ROW_CHUNK * 1024), thr, scale, words, noise,
                               nstd, nwords)
    else:
        _input_noise_range(x, out, 0, n, thr, scale, words, noise, nstd, nwords)


cdef void _input_noise_range(real* x, real* out, Py_ssize_t lo, Py_ssize_t hi, uint32_t thr,
                             real scale, uint32_t* words, int noise, real nstd,
                             uint32_t* nwords) noexcept nogil:
    cdef Py_ssize_t e
    for e in range(lo, hi):
        out[e] = x[e]
    _noise_span(out + lo, NULL, words + lo, nwords, lo, hi - lo, thr, scale, noise, nstd)


# ---------------------------------------------------------------- losses
cdef double _loss_forward_backward(real* z, real* y, real* grad, Py_ssize_t B, Py_ssize_t K,
                                   Py_ssize_t Ky, int loss, bint want_grad) noexcept nogil:
    """Mean batch loss (double); grad = d(mean)/dz written when want_grad. y is (B, Ky): Ky = K
    for mse / binary_crossentropy; for sparse_categorical_crossentropy 1 (labels) or
    SCE_MIXED_WIDTH (label a, label b, lam: lam * CE(a) + (1 - lam) * CE(b))."""
    cdef double total = 0.0
    cdef double zz, s64, lse, lam64
    cdef real c, d, zmax, s, p, lam, lam_b
    cdef Py_ssize_t i, k, label, label_b
    cdef bint mixed = Ky == SCE_MIXED_WIDTH
    cdef real* zi
    if loss == LOSS_MSE:
        c = <real>(2.0 / <double>(B * K))
        for i in range(B * K):
            d = z[i] - y[i]
            total += <double>d * <double>d
            if want_grad:
                grad[i] = d * c
        return total / <double>(B * K)
    if loss == LOSS_BCE:
        c = <real>(1.0 / <double>(B * K))
        for i in range(B * K):
            zz = <double>z[i]
            total += (zz if zz > 0.0 else 0.0) - zz * <double>y[i] + log1p(exp(-fabs(zz)))
            if want_grad:
                grad[i] = (_activate(z[i], ACT_SIGMOID, z[i]) - y[i]) * c
        return total / <double>(B * K)
    c = <real>(1.0 / <double>B)
    for i in range(B):
        zi = z + i * K
        label = <Py_ssize_t>y[i * Ky + SCE_LABEL]
        zmax = zi[0]
        for k in range(1, K):
            if zi[k] > zmax:
                zmax = zi[k]
        s = 0
        s64 = 0.0
        for k in range(K):
            s = s + _exp(zi[k] - zmax)
            s64 += exp(<double>zi[k] - <double>zmax)
        lse = log(s64) + <double>zmax
        if mixed:
            label_b = <Py_ssize_t>y[i * Ky + SCE_LABEL_B]
            lam = y[i * Ky + SCE_LAM]
            lam64 = <double>lam
            total += (lam64 * (lse - <double>zi[label])
                      + (1.0 - lam64) * (lse - <double>zi[label_b]))
            if want_grad:
                lam_b = <real>1 - lam
                for k in range(K):
                    p = _exp(zi[k] - zmax) / s
                    if k == label:
                        p = p - lam
                    if k == label_b:
                        p = p - lam_b
                    grad[i * K + k] = p * c
            continue
        total += lse - <double>zi[label]
        if want_grad:
            for k in range(K):
                p = _exp(zi[k] - zmax) / s
                if k == label:
                    p = p - 1
                grad[i * K + k] = p * c
    return total / <double>B


# ---------------------------------------------------------------- penalized update
cdef struct Coef:
    # the scalars of one update, in double, each rounded once to the dtype where used
    double lr, b1, omb1, b2, omb2, eps, l1, l2, decay, step_size, bc2_sqrt, lr_l1


cdef inline void _coefficients(double* hp, int opt, int64_t t, Coef* c) noexcept nogil:
    """Mirrors reference.update_coefficients (PyTorch bias corrections)."""
    cdef double lr = hp[HP_LR]
    cdef double b1 = hp[HP_BETA1]
    cdef double b2 = hp[HP_BETA2]
    if opt == OPT_SGD:
        c.step_size = lr
        c.bc2_sqrt = 1.0
    else:
        c.step_size = lr / (1.0 - pow(b1, <double>t))
        c.bc2_sqrt = sqrt(1.0 - pow(b2, <double>t))
    c.decay = 1.0 - lr * hp[HP_DECOUPLED] if opt == OPT_ADAMW else 1.0
    c.lr = lr
    c.b1 = b1
    c.omb1 = 1.0 - b1
    c.b2 = b2
    c.omb2 = 1.0 - b2
    c.eps = hp[HP_EPS]
    c.l1 = hp[HP_L1]
    c.l2 = hp[HP_L2]
    c.lr_l1 = lr * hp[HP_L1]


cdef inline void _update_span(real* w, real* g, real* m, real* v, Py_ssize_t n, int opt,
                              bint has_m, bint nesterov, bint l2_on, bint l1_sub, bint l1_prox,
                              Coef* coef) noexcept nogil:
    """The fused step on n contiguous values (kernels/cpu.py: _update_rows, same formulas).

    Called with literal opt / has_m / nesterov (see _update_row), so each copy is branch-free
    and vectorises; the penalty flags are loop-invariant selects.
    """
    cdef real lr = <real>coef.lr
    cdef real b1 = <real>coef.b1
    cdef real omb1 = <real>coef.omb1
    cdef real b2 = <real>coef.b2
    cdef real omb2 = <real>coef.omb2
    cdef real eps = <real>coef.eps
    cdef real l1 = <real>coef.l1
    cdef real l2 = <real>coef.l2
    cdef real decay = <real>coef.decay
    cdef real step_size = <real>coef.step_size
    cdef real bc2_sqrt = <real>coef.bc2_sqrt
    cdef real lr_l1 = <real>coef.lr_l1
    cdef Py_ssize_t j
    cdef real wi, ge, mi, vi, d, denom, tau, shrunk
    for j in range(n):
        wi = w[j]
        ge = g[j]
        if l2_on:
            ge = ge + l2 * wi
        if l1_sub:
            ge = ge + l1 * _sign(wi)
        if opt == OPT_SGD:
            if has_m:
                mi = m[j] * b1 + ge
                m[j] = mi
                d = ge + b1 * mi if nesterov else mi
            else:
                d = ge
            wi = wi - lr * d
            tau = lr_l1
        else:
            if opt == OPT_ADAMW:
                wi = wi * decay
            mi = m[j] + omb1 * (ge - m[j])
            vi = v[j] * b2 + (omb2 * ge) * ge
            m[j] = mi
            v[j] = vi
            denom = _sqrt(vi) / bc2_sqrt + eps
            wi = wi - step_size * (mi / denom)
            tau = lr_l1 / denom
        if l1_prox:
            shrunk = _abs(wi) - tau
            wi = _sign(wi) * (0 if shrunk < 0 else shrunk)
        w[j] = wi


cdef void _update_row(real* w, real* g, real* m, real* v, Py_ssize_t n, int opt,
                      bint nesterov, bint l2_on, bint l1_sub, bint l1_prox,
                      Coef* coef) noexcept nogil:
    if opt == OPT_ADAM:
        _update_span(w, g, m, v, n, OPT_ADAM, True, False, l2_on, l1_sub, l1_prox, coef)
    elif opt == OPT_ADAMW:
        _update_span(w, g, m, v, n, OPT_ADAMW, True, False, l2_on, l1_sub, l1_prox, coef)
    elif m == NULL:
        _update_span(w, g, m, v, n, OPT_SGD, False, False, l2_on, l1_sub, l1_prox, coef)
    elif nesterov:
        _update_span(w, g, m, v, n, OPT_SGD, True, True, l2_on, l1_sub, l1_prox, coef)
    else:
        _update_span(w, g, m, v, n, OPT_SGD, True, False, l2_on, l1_sub, l1_prox, coef)


cdef void _update_rows(real* w, real* g, real* m, real* v, Py_ssize_t O, int opt,
                       bint nesterov, bint proximal, Coef* coef, double* rowpen,
                       Py_ssize_t r0, Py_ssize_t r1) noexcept nogil:
    """Rows r0..r1: rowpen[2i], rowpen[2i+1] = sum |w|, sum w^2 of row i before the step
    (in double, in column order; skipped, as 0, when no penalty uses them), then the step."""
    cdef bint l2_on = <real>coef.l2 != 0
    cdef bint l1_on = <real>coef.l1 != 0
    cdef bint sums = coef.l1 != 0 or coef.l2 != 0
    cdef Py_ssize_t i, j, e
    cdef double p1, p2, wd
    cdef real* wr
    for i in range(r0, r1):
        e = i * O
        wr = w + e
        p1 = 0.0
        p2 = 0.0
        if sums:
            for j in range(O):
                wd = <double>wr[j]
                p1 += fabs(wd)
                p2 += wd * wd
        rowpen[2 * i] = p1
        rowpen[2 * i + 1] = p2
        _update_row(wr, g + e, m + e if m != NULL else NULL, v + e if v != NULL else NULL, O,
                    opt, nesterov, l2_on, l1_on and not proximal, l1_on and proximal, coef)


cdef void _column_norms(real* w, Py_ssize_t R, Py_ssize_t O, double* colnorm) noexcept nogil:
    cdef Py_ssize_t i, j
    for j in range(O):
        colnorm[j] = 0.0
    for i in range(R):
        for j in range(O):
            colnorm[j] += <double>w[i * O + j] * <double>w[i * O + j]
    for j in range(O):
        colnorm[j] = sqrt(colnorm[j])


cdef void _scale_cols(real* w, Py_ssize_t R, Py_ssize_t O, double* scale) noexcept nogil:
    """w[:, j] *= scale[j] (each scale already rounded to the param dtype), row by row: W is
    row-major, so a column at a time would stride by O."""
    cdef Py_ssize_t i, j
    cdef real* row
    for i in range(R):
        row = w + i * O
        for j in range(O):
            row[j] = row[j] * <real>scale[j]


cdef void _maxnorm_cols(real* w, Py_ssize_t R, Py_ssize_t O, double c,
                        double* colnorm) noexcept nogil:
    cdef Py_ssize_t j
    cdef bint any_over = False
    _column_norms(w, R, O, colnorm)
    for j in range(O):      # colnorm[j] becomes the column's scale (1: untouched)
        if colnorm[j] > c:
            colnorm[j] = <double><real>(c / colnorm[j])   # rounded to the param dtype, as
            any_over = True                                # the reference does
        else:
            colnorm[j] = 1.0
    if any_over:
        _scale_cols(w, R, O, colnorm)


cdef void _group_prox_cols(real* w, real* v, Py_ssize_t R, Py_ssize_t O, int opt,
                           double group, double lr, Coef* coef, double* colnorm,
                           double* coltau) noexcept nogil:
    """Block soft-thresholding of every column (reference.group_prox), with the thresholds
    of reference.group_thresholds; colnorm and coltau hold >= O doubles each."""
    cdef Py_ssize_t i, j
    cdef double n, step, bc2, eps
    if opt == OPT_SGD:
        for j in range(O):
            coltau[j] = lr * group
    else:
        step = <double><real>coef.step_size
        bc2 = <double><real>coef.bc2_sqrt
        eps = <double><real>coef.eps
        for j in range(O):
            coltau[j] = 0.0
        for i in range(R):
            for j in range(O):
                coltau[j] += sqrt(<double>v[i * O + j]) / bc2 + eps
        for j in range(O):
            coltau[j] = group * step / (coltau[j] / R)
    _column_norms(w, R, O, colnorm)
    for j in range(O):      # colnorm[j] becomes the column's scale
        n = colnorm[j]
        if n > coltau[j]:
            colnorm[j] = <double><real>(1.0 - coltau[j] / n)   # rounded to the param dtype,
        else:                                                 # as the reference does
            colnorm[j] = 0.0
    _scale_cols(w, R, O, colnorm)


cdef double _penalized_update(real* w, real* g, real* m, real* v, Py_ssize_t R, Py_ssize_t O,
                              bint matrix, double* hp, int opt, int64_t t,
                              double* scratch) noexcept nogil:
    """Fused step of a (R, O) tensor (a vector is R = 1, matrix False: no max-norm).

    m / v are NULL when absent; scratch (double) holds >= max(2R, 2O) values.
    Returns the penalty of w before the step.
    """
    cdef Coef coef
    cdef bint nesterov = hp[HP_NESTEROV] != 0
    cdef bint proximal = hp[HP_PROXIMAL] != 0
    cdef Py_ssize_t c, n_chunks, i
    cdef double p1 = 0.0
    cdef double p2 = 0.0
    cdef double group_pen = 0.0
    cdef bint group = matrix and hp[HP_GROUP] > 0
    _coefficients(hp, opt, t, &coef)
    if group:               # the penalty of w before the step, like the other terms
        _column_norms(w, R, O, scratch)
        for i in range(O):
            group_pen += scratch[i]
        group_pen *= hp[HP_GROUP]
    if matrix and R * O >= PARALLEL_MIN_ELEMENTS and R >= 2:
        n_chunks = (R + ROW_CHUNK - 1) // ROW_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _update_rows(w, g, m, v, O, opt, nesterov, proximal, &coef, scratch,
                         c * ROW_CHUNK, _min(R, c * ROW_CHUNK + ROW_CHUNK))
    else:
        _update_rows(w, g, m, v, O, opt, nesterov, proximal, &coef, scratch, 0, R)
    for i in range(R):
        p1 += scratch[2 * i]
        p2 += scratch[2 * i + 1]
    if group:
        _group_prox_cols(w, v, R, O, opt, hp[HP_GROUP], hp[HP_LR], &coef, scratch, scratch + O)
    if matrix and hp[HP_MAXNORM] > 0:
        _maxnorm_cols(w, R, O, hp[HP_MAXNORM], scratch)
    return hp[HP_L1] * p1 + 0.5 * hp[HP_L2] * p2 + group_pen


# ---------------------------------------------------------------- the compiled epoch
cdef struct LayerC:
    void* W
    void* b          # NULL: no bias
    void* dW
    void* db
    void* mW         # NULL: no moment (SGD without momentum)
    void* vW
    void* mb
    void* vb
    void* act        # (batch, O) what backward keeps
    void* grad       # (batch, O)
    Py_ssize_t n_in
    Py_ssize_t n_out
    int act_code
    uint32_t thr
    double slope     # in the param dtype already (lf), exact in double
    double scale
    double hpW[HP_SIZE]
    double hpb[HP_SIZE]
    # BatchNorm (bn = 1; pointers NULL otherwise)
    int bn
    void* gb         # (2, O) gamma; beta
    void* dgb
    void* mgb        # NULL: no moment
    void* vgb
    void* stats      # (2, O) running mean; variance
    void* xhat       # (batch, O) zhat: what the BatchNorm backward keeps
    double* save     # (BN_SAVE_ROWS, O) batch statistics and backward scratch
    double eps
    double momentum
    double hpgb[HP_SIZE]
    int noise        # NOISE_* on the output (li[l, LI_NOISE])
    double nstd      # its std, in the param dtype already (lf)
    void* pre        # (batch, O) f(z) before the noise, or NULL (driver.needs_pre)


cdef struct PlanC:
    int L
    LayerC* layers
    void* xbuf
    void* xdrop      # NULL: no input dropout
    void* ybuf
    Py_ssize_t batch
    Py_ssize_t I0
    Py_ssize_t Ky
    uint32_t in_thr
    double in_scale
    int opt
    int loss
    uint32_t k0
    uint32_t k1
    uint32_t* words  # element-indexed Philox words, >= batch * widest layer (+3)
    uint32_t* nwords # the same for the noise stream (GaussianNoise / GaussianDropout)
    int in_noise     # NOISE_* on the inputs (li[0, LI_IN_NOISE])
    double in_nstd
    double* scratch
    int is_double


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef class EpochPlan:
    """Raw pointers to every buffer of a Net, built once per workspace (kept in net.cache).

    Holds references to the arrays it points into, so they outlive the pointers.
    """
    cdef PlanC p
    cdef list keep
    cdef readonly object dtype
    cdef readonly tuple identity

    def __cinit__(self):
        self.p.layers = NULL

    def __dealloc__(self):
        free(self.p.layers)

    def __init__(self, net, seed_words):
        cdef int l, L = len(net.Ws)
        cdef int h
        cdef LayerC* ly
        dt = np.dtype(net.Ws[0].dtype)
        if dt != np.float32 and dt != np.float64:
            raise TypeError(f"the Cython kernels take float32 or float64, not {dt}")
        self.dtype = dt
        self.keep = []
        self.identity = _identity(net)
        self.p.L = L
        self.p.layers = <LayerC*>calloc(L, sizeof(LayerC))
        if self.p.layers == NULL:
            raise MemoryError()
        cols = max(W.shape[1] for W in net.Ws)
        rows = max(W.shape[0] for W in net.Ws)
        widest = max(cols, net.Ws[0].shape[0])
        words = np.zeros(4 * max(1, (net.batch * widest + 3) // 4), np.uint32)
        nwords = np.zeros(4 * max(1, (net.batch * widest + 3) // 4), np.uint32)
        scratch = np.zeros(max(2 * rows, 2 * cols, 2))
        for l in range(L):
            ly = &self.p.layers[l]
            W = net.Ws[l]
            ly.n_in = W.shape[0]
            ly.n_out = W.shape[1]
            ly.W = self._ptr(W, (ly.n_in, ly.n_out))
            ly.dW = self._ptr(net.dWs[l], (ly.n_in, ly.n_out))
            ly.mW = self._ptr_or_null(net.mW[l], (ly.n_in, ly.n_out))
            ly.vW = self._ptr_or_null(net.vW[l], (ly.n_in, ly.n_out))
            ly.b = self._ptr_or_null(net.bs[l], (ly.n_out,))
            if net.opt != OPT_SGD and (ly.mW == NULL or ly.vW == NULL):
                raise ValueError(f"EpochPlan: layer {l} has no Adam moments (mW, vW)")
            ly.db = self._ptr(net.dbs[l], (ly.n_out,)) if ly.b != NULL else NULL
            ly.mb = self._ptr_or_null(net.mb[l], (ly.n_out,)) if ly.b != NULL else NULL
            ly.vb = self._ptr_or_null(net.vb[l], (ly.n_out,)) if ly.b != NULL else NULL
            if ly.b != NULL and net.opt != OPT_SGD and (ly.mb == NULL or ly.vb == NULL):
                raise ValueError(f"EpochPlan: layer {l} has no Adam moments (mb, vb)")
            if l and ly.n_in != self.p.layers[l - 1].n_out:
                raise ValueError(f"EpochPlan: layer {l} takes {ly.n_in} inputs, the layer "
                                 f"before gives {self.p.layers[l - 1].n_out}")
            ly.act = self._ptr(net.acts[l], (net.batch, ly.n_out))
            ly.grad = self._ptr(net.grads[l], (net.batch, ly.n_out))
            ly.bn = 1 if net.li[l, LI_BN] != 0 else 0
            if ly.bn:
                two = (2, ly.n_out)
                ly.gb = self._ptr(net.gbs[l], two)
                ly.dgb = self._ptr(net.dgbs[l], two)
                ly.mgb = self._ptr_or_null(net.mgb[l], two)
                ly.vgb = self._ptr_or_null(net.vgb[l], two)
                if net.opt != OPT_SGD and (ly.mgb == NULL or ly.vgb == NULL):
                    raise ValueError(f"EpochPlan: layer {l} has no Adam moments (mgb, vgb)")
                ly.stats = self._ptr(net.stats[l], two)
                ly.xhat = self._ptr(net.xhats[l], (net.batch, ly.n_out))
                save = net.saves[l]
                if (not isinstance(save, np.ndarray) or save.dtype != np.float64
                        or save.shape != (BN_SAVE_ROWS, ly.n_out)
                        or not save.flags.c_contiguous or not save.flags.writeable):
                    raise ValueError(f"EpochPlan: layer {l} needs a writeable C-contiguous "
                                     f"float64 save array of shape {(BN_SAVE_ROWS, ly.n_out)}")
                self.keep.append(save)
                ly.save = <double*>_data(save)
            pres = getattr(net, "pres", [])
            ly.pre = (self._ptr(pres[l], (net.batch, ly.n_out))
                      if len(pres) > l and pres[l].size else NULL)
        self.p.batch = net.batch
        self.p.I0 = net.Ws[0].shape[0]
        self.p.Ky = net.ybuf.shape[1]
        self.p.xbuf = self._ptr(net.xbuf, (net.batch, self.p.I0))
        self.p.xdrop = (self._ptr(net.xdrop, (net.batch, self.p.I0))
                        if net.xdrop is not None and net.xdrop.size else NULL)
        self.p.ybuf = self._ptr(net.ybuf, (net.batch, self.p.Ky))
        self.p.opt = net.opt
        self.p.loss = net.loss
        self.p.k0 = seed_words[0]
        self.p.k1 = seed_words[1]
        self.keep += [words, scratch]
        self.p.words = <uint32_t*>_data(words)
        self.p.scratch = <double*>_data(scratch)
        self.keep.append(nwords)
        self.p.nwords = <uint32_t*>_data(nwords)
        self.p.is_double = dt == np.float64
        self.refresh(net)

    def refresh(self, net):
        """Re-read the per-layer configuration and hyperparameter rows (li, lf, hpW, hpb):
        cheap, done before every epoch so in-place changes (a learning-rate schedule) apply."""
        cdef int l, h
        cdef LayerC* ly
        li = np.asarray(net.li, np.int64)
        lf = np.asarray(net.lf, np.float64)
        hpW = np.asarray(net.hpW, np.float64)
        hpb = np.asarray(net.hpb, np.float64)
        hpgb = np.asarray(net.hpgb, np.float64)
        if li.shape[0] != self.p.L or lf.shape[0] != self.p.L or hpW.shape[0] != self.p.L \
                or hpb.shape[0] != self.p.L or hpW.shape[1] < HP_SIZE or hpb.shape[1] < HP_SIZE:
            raise ValueError("EpochPlan: li / lf / hpW / hpb do not have one row per layer")
        for l in range(self.p.L):
            ly = &self.p.layers[l]
            ly.act_code = li[l, LI_ACT]
            ly.thr = li[l, LI_DROP_THR]
            ly.slope = lf[l, LF_SLOPE]
            ly.scale = lf[l, LF_DROP_SCALE]
            ly.noise = li[l, LI_NOISE]
            ly.nstd = lf[l, LF_NOISE_STD]
            if ly.noise != NOISE_NONE and ly.act_code != ACT_LINEAR and ly.pre == NULL:
                raise ValueError(f"EpochPlan: layer {l} has noise and a nonlinear activation "
                                 f"but no pre-noise buffer (Net.pres)")
            for h in range(HP_SIZE):
                ly.hpW[h] = hpW[l, h]
                ly.hpb[h] = hpb[l, h]
            if (li[l, LI_BN] != 0) != (ly.bn != 0):
                raise ValueError("EpochPlan: BatchNorm turned on or off after the workspace "
                                 "was made")
            if ly.bn:
                ly.eps = lf[l, LF_BN_EPS]
                ly.momentum = lf[l, LF_BN_MOMENTUM]
                for h in range(HP_SIZE):
                    ly.hpgb[h] = hpgb[l, h]
        self.p.in_thr = li[0, LI_IN_DROP_THR]
        self.p.in_scale = lf[0, LF_IN_DROP_SCALE]
        self.p.in_noise = li[0, LI_IN_NOISE]
        self.p.in_nstd = lf[0, LF_IN_NOISE_STD]
        if (self.p.in_thr > 0 or self.p.in_noise != NOISE_NONE) and self.p.xdrop == NULL:
            raise ValueError("EpochPlan: input dropout or noise turned on after the workspace "
                             "was made")

    cdef void* _ptr(self, a, shape) except? NULL:
        if (not isinstance(a, np.ndarray) or a.dtype != self.dtype
                or tuple(a.shape) != tuple(shape) or not a.flags.c_contiguous
                or not a.flags.writeable):
            raise ValueError(f"EpochPlan: expected a writeable C-contiguous {self.dtype} array "
                             f"of shape {tuple(shape)}, got {getattr(a, 'shape', a)!r}")
        self.keep.append(a)
        return _data(a)

    cdef void* _ptr_or_null(self, a, shape) except? NULL:
        if a is None or np.size(a) == 0:
            return NULL
        return self._ptr(a, shape)

    def matches(self, net):
        """Whether this plan still points into `net`'s current buffers."""
        return self.identity == _identity(net)


def _identity(net):
    return (net.batch, net.seed, net.opt, net.loss,
            tuple(id(a) for name in ("Ws", "bs", "dWs", "dbs", "mW", "vW", "mb", "vb", "acts",
                                     "grads", "pres", "gbs", "dgbs", "mgb", "vgb", "stats", "xhats",
                                     "saves") for a in getattr(net, name, ())),
            id(net.xbuf), id(net.xdrop), id(net.ybuf))


cdef int _train_epoch(PlanC* p, real* X, real* Y, int64_t* perm, Py_ssize_t n_total,
                      Py_ssize_t batch_size, int64_t step0, int64_t t0,
                      double* out3) noexcept nogil:
    """kernels/driver.train_epoch in C: same steps, same order, same masks.

    out3 = (loss_sum, pen_sum, steps); returns 1 if every batch loss was finite, else 0.
    """
    cdef int L = p.L
    cdef Py_ssize_t I0 = p.I0
    cdef Py_ssize_t Ky = p.Ky
    cdef double loss_sum = 0.0
    cdef double pen_sum = 0.0
    cdef double pen, batch_loss
    cdef int64_t steps = 0
    cdef int64_t step, t
    cdef Py_ssize_t start, n, r, src
    cdef int l
    cdef real* xb = <real*>p.xbuf
    cdef real* yb = <real*>p.ybuf
    cdef real* x
    cdef real* xin
    cdef real* dx
    cdef LayerC* ly
    cdef uint32_t* words = p.words
    start = 0
    while start < n_total:
        n = _min(batch_size, n_total - start)
        step = step0 + steps
        t = t0 + steps
        for r in range(n):
            src = perm[start + r]
            memcpy(xb + r * I0, X + src * I0, I0 * sizeof(real))
            memcpy(yb + r * Ky, Y + src * Ky, Ky * sizeof(real))
        x = xb
        if p.in_thr > 0 or p.in_noise != NOISE_NONE:
            _input_dropout(xb, <real*>p.xdrop, n, I0, p.in_thr, <real>p.in_scale, p.k0, p.k1,
                           <uint32_t>step, 0, words, p.in_noise, <real>p.in_nstd, p.nwords)
            x = <real*>p.xdrop
        for l in range(L):
            ly = &p.layers[l]
            if ly.bn:
                _bn_dense_forward(x, <real*>ly.W, <real*>ly.b, <real*>ly.act, <real*>ly.xhat,
                                  <real*>ly.gb, ly.save, n, ly.n_in, ly.n_out, ly.act_code,
                                  <real>ly.slope, ly.thr, <real>ly.scale, ly.eps, p.k0, p.k1,
                                  <uint32_t>step, <uint32_t>l, words, ly.noise, <real>ly.nstd,
                                  <real*>ly.pre, p.nwords)
            else:
                _dense_forward(x, <real*>ly.W, <real*>ly.b, <real*>ly.act, n, ly.n_in,
                               ly.n_out, ly.act_code, <real>ly.slope, ly.thr, <real>ly.scale,
                               p.k0, p.k1, <uint32_t>step, <uint32_t>l, words, ly.noise,
                               <real>ly.nstd, <real*>ly.pre, p.nwords)
            x = <real*>ly.act
        ly = &p.layers[L - 1]
        batch_loss = _loss_forward_backward(<real*>ly.act, yb, <real*>ly.grad, n, ly.n_out, Ky,
                                            p.loss, True)
        if not isfinite(batch_loss):
            out3[0] = loss_sum
            out3[1] = pen_sum
            out3[2] = <double>steps
            return 0
        loss_sum += batch_loss * n
        pen = 0.0
        for l in range(L - 1, -1, -1):
            ly = &p.layers[l]
            if l > 0:
                xin = <real*>p.layers[l - 1].act
                dx = <real*>p.layers[l - 1].grad
            else:
                xin = <real*>p.xdrop if p.in_thr > 0 or p.in_noise != NOISE_NONE else xb
                dx = NULL
            if ly.bn:
                _bn_dense_backward(<real*>ly.grad, <real*>ly.act, <real*>ly.xhat, xin,
                                   <real*>ly.W, <real*>ly.gb, <real*>ly.stats, ly.save,
                                   <real*>ly.dW, <real*>ly.db, <real*>ly.dgb, dx, n, ly.n_in,
                                   ly.n_out, ly.act_code, <real>ly.slope, ly.thr,
                                   <real>ly.scale, ly.momentum, p.k0, p.k1, <uint32_t>step,
                                   <uint32_t>l, words, ly.noise, <real>ly.nstd, <real*>ly.pre,
                                   p.nwords)
            else:
                _dense_backward(<real*>ly.grad, <real*>ly.act, xin, <real*>ly.W, <real*>ly.dW,
                                <real*>ly.db, dx, n, ly.n_in, ly.n_out, ly.act_code,
                                <real>ly.slope, ly.thr, <real>ly.scale, p.k0, p.k1,
                                <uint32_t>step, <uint32_t>l, words, ly.noise, <real>ly.nstd,
                                <real*>ly.pre, p.nwords)
            # Layer l's weights are not read again this step: update them while dW is hot.
            pen += _penalized_update(<real*>ly.W, <real*>ly.dW, <real*>ly.mW, <real*>ly.vW,
                                     ly.n_in, ly.n_out, True, ly.hpW, p.opt, t, p.scratch)
            if ly.b != NULL:
                pen += _penalized_update(<real*>ly.b, <real*>ly.db, <real*>ly.mb, <real*>ly.vb,
                                         1, ly.n_out, False, ly.hpb, p.opt, t, p.scratch)
            if ly.bn:       # gamma/beta as one vector of 2 O values: never penalized
                pen += _penalized_update(<real*>ly.gb, <real*>ly.dgb, <real*>ly.mgb,
                                         <real*>ly.vgb, 1, 2 * ly.n_out, False, ly.hpgb, p.opt,
                                         t, p.scratch)
        pen_sum += pen * n
        steps += 1
        start += batch_size
    out3[0] = loss_sum
    out3[1] = pen_sum
    out3[2] = <double>steps
    return 1


def train_epoch(EpochPlan plan, X, Y, perm, Py_ssize_t batch_size, int64_t step0, int64_t t0):
    """One epoch (or a chunk of whole batches) over the rows `perm` of X, Y.

    Returns (loss_sum, penalty_sum, steps, finite) like kernels/driver.train_epoch.
    """
    cdef double out3[3]
    cdef int finite
    cdef PlanC* p = &plan.p
    X = np.ascontiguousarray(X, plan.dtype)
    Y = np.ascontiguousarray(Y, plan.dtype)
    perm = np.ascontiguousarray(perm, np.int64)
    if X.ndim != 2 or X.shape[1] != p.I0 or Y.ndim != 2 or Y.shape[1] != p.Ky \
            or Y.shape[0] != X.shape[0]:
        raise ValueError("train_epoch: X, Y do not match the plan's layer sizes")
    if batch_size < 1 or batch_size > p.batch:
        raise ValueError(f"train_epoch: batch_size {batch_size} outside 1..{p.batch}")
    cdef Py_ssize_t n_total = perm.shape[0]
    cdef int64_t* pp = <int64_t*>_data(perm)
    cdef void* xp = _data(X)
    cdef void* yp = _data(Y)
    if n_total and (perm.min() < 0 or perm.max() >= X.shape[0]):
        raise IndexError("train_epoch: perm holds a row index outside X")
    with nogil:
        if p.is_double:
            finite = _train_epoch(p, <double*>xp, <double*>yp, pp, n_total, batch_size, step0,
                                  t0, out3)
        else:
            finite = _train_epoch(p, <float*>xp, <float*>yp, pp, n_total, batch_size, step0,
                                  t0, out3)
    return out3[0], out3[1], int(out3[2]), bool(finite)


# ---------------------------------------------------------------- inference
cdef void _forward_inference(LayerC* layers, int L, real* X, Py_ssize_t n_total, real* out,
                             real* buf0, real* buf1, Py_ssize_t batch) noexcept nogil:
    """Logits of X with dropout off, `batch` rows at a time; the last layer writes `out`."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t n
    cdef int l
    cdef real* x
    cdef real* dst
    cdef LayerC* ly
    cdef Py_ssize_t K = layers[L - 1].n_out
    while start < n_total:
        n = _min(batch, n_total - start)
        x = X + start * layers[0].n_in
        for l in range(L):
            ly = &layers[l]
            dst = out + start * K if l == L - 1 else (buf0 if l % 2 == 0 else buf1)
            _dense_forward(x, <real*>ly.W, <real*>ly.b, dst, n, ly.n_in, ly.n_out, ly.act_code,
                           <real>ly.slope, 0, 1, 0, 0, 0, <uint32_t>l, NULL, NOISE_NONE, 0,
                           NULL, NULL)
            x = dst
        start += batch


def forward_inference(list Ws, list bs, li, lf, X, Py_ssize_t batch_size):
    """Logits (n, K) of X in chunks of batch_size rows (dropout off)."""
    cdef int l, L = len(Ws)
    cdef LayerC* layers
    cdef bint is_double
    cdef void* xp
    cdef void* op
    cdef void* p0
    cdef void* p1
    dt = np.dtype(Ws[0].dtype)
    if dt != np.float32 and dt != np.float64:
        raise TypeError(f"the Cython kernels take float32 or float64, not {dt}")
    X = np.ascontiguousarray(X, dt)
    cdef Py_ssize_t n = X.shape[0]
    cdef Py_ssize_t rows = max(1, min(batch_size, n))
    K = Ws[L - 1].shape[1]
    out = np.empty((n, K), dt)
    if n == 0:
        return out
    widest = max(W.shape[1] for W in Ws)
    buf0 = np.empty(rows * widest, dt)
    buf1 = np.empty(rows * widest, dt)
    keep = []
    li = np.asarray(li, np.int64)
    lf = np.asarray(lf, np.float64)
    if X.shape[1] != Ws[0].shape[0]:
        raise ValueError(f"X has {X.shape[1]} columns, the first layer takes {Ws[0].shape[0]}")
    layers = <LayerC*>calloc(L, sizeof(LayerC))
    if layers == NULL:
        raise MemoryError()
    try:
        for l in range(L):
            W = np.ascontiguousarray(Ws[l], dt)
            b = np.ascontiguousarray(bs[l], dt)
            if l and W.shape[0] != Ws[l - 1].shape[1] or b.size not in (0, W.shape[1]):
                raise ValueError(f"layer {l}: inconsistent shapes {W.shape}, {b.shape}")
            keep += [W, b]
            layers[l].W = _data(W)
            layers[l].b = _data(b) if b.size else NULL
            layers[l].n_in = W.shape[0]
            layers[l].n_out = W.shape[1]
            layers[l].act_code = li[l, LI_ACT]
            layers[l].slope = lf[l, LF_SLOPE]
        xp, op, p0, p1 = _data(X), _data(out), _data(buf0), _data(buf1)
        is_double = dt == np.float64
        with nogil:
            if is_double:
                _forward_inference(layers, L, <double*>xp, n, <double*>op, <double*>p0,
                                   <double*>p1, rows)
            else:
                _forward_inference(layers, L, <float*>xp, n, <float*>op, <float*>p0,
                                   <float*>p1, rows)
    finally:
        free(layers)
    return out


# ---------------------------------------------------------------- per-kernel entry points
# The contract's operations one at a time (tests, and callers that drive their own loop).
# Seeds arrive already split into the two key words (cython_backend.py splits them).

cdef inline real* _ptr1(real[::1] a) noexcept nogil:
    return &a[0] if a.shape[0] > 0 else NULL


cdef inline real* _ptr2(real[:, ::1] a) noexcept nogil:
    return &a[0, 0] if a.shape[0] > 0 and a.shape[1] > 0 else NULL


def _check(bint ok, str what):
    if not ok:
        raise ValueError(what)


def philox4x32(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1):
    """Philox4x32-10 of one counter: the same C loop the kernels use (known-answer tests)."""
    cdef uint32_t w[4]
    _philox_groups(w, 0, 1, k0, k1, c1, c2, c3, c0)
    return w[0], w[1], w[2], w[3]


def philox_fill(uint32_t[::1] words, Py_ssize_t n_elements, uint32_t k0, uint32_t k1,
                int64_t step, int64_t layer, int64_t stream):
    """words[e] = Philox word of element e, for e < n_elements (whole groups of 4 written)."""
    _check(words.shape[0] >= 4 * ((n_elements + 3) // 4), "words too small")
    if n_elements > 0:
        with nogil:
            _philox_fill(&words[0], n_elements, k0, k1, <uint32_t>step, <uint32_t>layer,
                         <uint32_t>stream)


def _words_for(Py_ssize_t n):
    return np.empty(4 * max(1, (n + 3) // 4), np.uint32)


def _threshold(int64_t thr):
    _check(0 <= thr <= 0xFFFFFFFF, f"dropout threshold {thr} outside 0..2**32-1")
    return thr


def dense_forward(real[:, ::1] x, real[:, ::1] W, real[::1] b, real[:, ::1] out, int act,
                  double slope, int64_t thr, double scale, uint32_t k0, uint32_t k1,
                  int64_t step, int64_t layer, int noise, double nstd, real[:, ::1] pre):
    """out = dropout(noise(f(x @ W + b))); pre (size 0: none) = f(x @ W + b) with noise."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and b.shape[0] in (0, O) and (pre.shape[0] * pre.shape[1] == 0
                                         or (pre.shape[0] == B and pre.shape[1] == O)),
           "dense_forward: shapes do not match")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise != NOISE_NONE else 0)
    if B == 0 or O == 0:
        return
    with nogil:
        _dense_forward(_ptr2(x), _ptr2(W), _ptr1(b), &out[0, 0], B, I, O, act, <real>slope,
                       t32, <real>scale, k0, k1, <uint32_t>step, <uint32_t>layer, &words[0],
                       noise, <real>nstd, _ptr2(pre), &nwords[0])


def dense_backward(real[:, ::1] grad, real[:, ::1] out, real[:, ::1] x, real[:, ::1] W,
                   real[:, ::1] dW, real[::1] db, real[:, ::1] dx, int act, double slope,
                   int64_t thr, double scale, uint32_t k0, uint32_t k1, int64_t step,
                   int64_t layer, int noise, double nstd, real[:, ::1] pre):
    """grad: dL/d(out) in, dL/dz out; dW, db (size 0: none), dx (size 0: none) written.
    With noise and a nonlinear activation, pre holds f(z) from the forward."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and grad.shape[0] == B and grad.shape[1] == O and dW.shape[0] == I
           and dW.shape[1] == O and db.shape[0] in (0, O)
           and (dx.shape[0] * dx.shape[1] == 0 or (dx.shape[0] == B and dx.shape[1] == I))
           and (pre.shape[0] * pre.shape[1] == 0 or (pre.shape[0] == B and pre.shape[1] == O)),
           "dense_backward: shapes do not match")
    _check(noise == NOISE_NONE or act == ACT_LINEAR or B == 0 or pre.shape[0] == B,
           "dense_backward: a noisy layer with a nonlinear activation needs pre")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise == NOISE_MUL else 0)
    if I == 0 or O == 0:
        return
    with nogil:
        _dense_backward(_ptr2(grad), _ptr2(out), _ptr2(x), &W[0, 0], &dW[0, 0], _ptr1(db),
                        _ptr2(dx), B, I, O, act, <real>slope, t32, <real>scale, k0, k1,
                        <uint32_t>step, <uint32_t>layer, &words[0], noise, <real>nstd,
                        _ptr2(pre), &nwords[0])


def bn_dense_forward(real[:, ::1] x, real[:, ::1] W, real[::1] b, real[:, ::1] out,
                     real[:, ::1] xhat, real[:, ::1] gb, double[:, ::1] save, int act,
                     double slope, int64_t thr, double scale, double eps, uint32_t k0,
                     uint32_t k1, int64_t step, int64_t layer, int noise, double nstd,
                     real[:, ::1] pre):
    """out = dropout(noise(f(gamma * zhat + beta))), zhat the batch-normalized x @ W + b;
    pre (size 0: none) = f(gamma * zhat + beta) with noise."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and xhat.shape[0] == B and xhat.shape[1] == O and gb.shape[0] == 2
           and gb.shape[1] == O and save.shape[0] == BN_SAVE_ROWS and save.shape[1] == O
           and b.shape[0] in (0, O) and (pre.shape[0] * pre.shape[1] == 0
                                         or (pre.shape[0] == B and pre.shape[1] == O)),
           "bn_dense_forward: shapes do not match")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise != NOISE_NONE else 0)
    if B == 0 or O == 0:
        return
    with nogil:
        _bn_dense_forward(_ptr2(x), _ptr2(W), _ptr1(b), &out[0, 0], &xhat[0, 0], &gb[0, 0],
                          &save[0, 0], B, I, O, act, <real>slope, t32, <real>scale, eps, k0,
                          k1, <uint32_t>step, <uint32_t>layer, &words[0], noise, <real>nstd,
                          _ptr2(pre), &nwords[0])


def bn_dense_backward(real[:, ::1] grad, real[:, ::1] out, real[:, ::1] xhat, real[:, ::1] x,
                      real[:, ::1] W, real[:, ::1] gb, real[:, ::1] stats, double[:, ::1] save,
                      real[:, ::1] dW, real[::1] db, real[:, ::1] dgb, real[:, ::1] dx, int act,
                      double slope, int64_t thr, double scale, double momentum, uint32_t k0,
                      uint32_t k1, int64_t step, int64_t layer, int noise, double nstd,
                      real[:, ::1] pre):
    """grad: dL/d(out) in, dL/dz out; dgb, dW, db (= 0), dx written; running stats updated.
    With noise and a nonlinear activation, pre holds f(gamma * zhat + beta) from the forward."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and grad.shape[0] == B and grad.shape[1] == O and xhat.shape[0] == B
           and xhat.shape[1] == O and dW.shape[0] == I and dW.shape[1] == O
           and db.shape[0] in (0, O) and gb.shape[0] == 2 and gb.shape[1] == O
           and dgb.shape[0] == 2 and dgb.shape[1] == O and stats.shape[0] == 2
           and stats.shape[1] == O and save.shape[0] == BN_SAVE_ROWS and save.shape[1] == O
           and (dx.shape[0] * dx.shape[1] == 0 or (dx.shape[0] == B and dx.shape[1] == I))
           and (pre.shape[0] * pre.shape[1] == 0 or (pre.shape[0] == B and pre.shape[1] == O)),
           "bn_dense_backward: shapes do not match")
    _check(noise == NOISE_NONE or act == ACT_LINEAR or B == 0 or pre.shape[0] == B,
           "bn_dense_backward: a noisy layer with a nonlinear activation needs pre")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise == NOISE_MUL else 0)
    if B == 0 or I == 0 or O == 0:
        return
    with nogil:
        _bn_dense_backward(&grad[0, 0], &out[0, 0], &xhat[0, 0], &x[0, 0], &W[0, 0], &gb[0, 0],
                           &stats[0, 0], &save[0, 0], &dW[0, 0], _ptr1(db), &dgb[0, 0],
                           _ptr2(dx), B, I, O, act, <real>slope, t32, <real>scale, momentum,
                           k0, k1, <uint32_t>step, <uint32_t>layer, &words[0], noise,
                           <real>nstd, _ptr2(pre), &nwords[0])


def input_dropout(real[:, ::1] x, real[:, ::1] out, int64_t thr, double scale, uint32_t k0,
                  uint32_t k1, int64_t step, int64_t layer, int noise, double nstd):
    """out = dropout(noise(x)): x * scale where kept, else 0 (stream STREAM_INPUT_DROPOUT),
    after the noise (stream STREAM_INPUT_NOISE)."""
    _check(x.shape[0] == out.shape[0] and x.shape[1] == out.shape[1],
           "input_dropout: shapes do not match")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(x.shape[0] * x.shape[1])
    cdef uint32_t[::1] nwords = _words_for(x.shape[0] * x.shape[1] if noise else 0)
    if x.shape[0] * x.shape[1] == 0:
        return
    with nogil:
        _input_dropout(&x[0, 0], &out[0, 0], x.shape[0], x.shape[1], t32, <real>scale, k0, k1,
                       <uint32_t>step, <uint32_t>layer, &words[0], noise, <real>nstd,
                       &nwords[0])


def loss_forward_backward(real[:, ::1] z, real[:, ::1] y, real[:, ::1] grad, int loss,
                          bint want_grad):
    """Mean loss of the batch; grad = d(mean loss)/dz written when want_grad."""
    cdef Py_ssize_t B = z.shape[0], K = z.shape[1], Ky = y.shape[1]
    cdef double value
    _check(y.shape[0] == B and (Ky in (1, SCE_MIXED_WIDTH) if loss == LOSS_SCE else Ky == K)
           and (not want_grad or (grad.shape[0] == B and grad.shape[1] == K)),
           "loss: shapes do not match")
    if B == 0 or K == 0:
        return float("nan")
    with nogil:
        value = _loss_forward_backward(&z[0, 0], &y[0, 0], _ptr2(grad) if want_grad else NULL,
                                       B, K, Ky, loss, want_grad)
    return value


def _update(real[:, ::1] w, real[:, ::1] g, real[:, ::1] m, real[:, ::1] v, double[::1] hp,
            int opt, int64_t t, bint matrix):
    cdef Py_ssize_t R = w.shape[0], O = w.shape[1]
    cdef double pen
    _check(g.shape[0] == R and g.shape[1] == O and hp.shape[0] >= HP_SIZE
           and (m.shape[0] * m.shape[1] == 0 or (m.shape[0] == R and m.shape[1] == O))
           and (v.shape[0] * v.shape[1] == 0 or (v.shape[0] == R and v.shape[1] == O))
           and (opt == OPT_SGD or (m.shape[0] * m.shape[1] > 0 and v.shape[0] * v.shape[1] > 0)),
           "penalized_update: shapes do not match")
    if R * O == 0:
        return 0.0
    scratch = np.zeros(max(2 * R, 2 * O, 2))
    cdef double[::1] s = scratch
    with nogil:
        pen = _penalized_update(&w[0, 0], &g[0, 0], _ptr2(m), _ptr2(v), R, O, matrix, &hp[0],
                                opt, t, &s[0])
    return pen


def penalized_update(w, g, m, v, hp, int opt, int64_t t):
    """One fused step of one parameter tensor (1-D or 2-D, in place); returns the penalty
    of w before the step. m / v of size 0 mean absent."""
    hp = np.ascontiguousarray(hp, np.float64)
    matrix = w.ndim == 2
    shape = w.shape if matrix else (1, w.shape[0])
    empty = np.zeros((0, shape[1]), w.dtype)
    as2d = lambda a: a.reshape(shape) if a.size else empty
    w2 = w.reshape(shape)
    if not np.shares_memory(w2, w):
        raise ValueError("penalized_update: w must be contiguous")
    return _update(w2, g.reshape(shape), as2d(m), as2d(v), hp, opt, t, matrix)
