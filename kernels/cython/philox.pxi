# Philox4x32-10 words and the Box-Muller normals: the twin of kernels/philox.py (the
# definition) and kernels/numba/philox.py. Included by _kernels.pyx.
#
# Shape legend: G Philox groups (4 words each).

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
                       uint32_t step, uint32_t layer, uint32_t stream,
                       uint32_t g0) noexcept nogil:
    """Words for elements 0..n_elements-1 (rounded up to whole groups of 4) of one
    (seed, step, layer, stream) sequence; words holds >= 4 * ceil(n_elements / 4) values.
    g0: the Philox group of element 0 (0 but for a block of rows further down its batch:
    an MPI rank's shard, whose element 0 is element 4 * g0 of the batch)."""
    cdef Py_ssize_t n_groups = (n_elements + 3) // 4
    cdef Py_ssize_t n_chunks, c
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (n_groups + GROUP_CHUNK - 1) // GROUP_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _philox_groups(words, c * GROUP_CHUNK, _min(c * GROUP_CHUNK + GROUP_CHUNK, n_groups),
                           k0, k1, step, layer, stream, g0)
    else:
        _philox_groups(words, 0, n_groups, k0, k1, step, layer, stream, g0)


# ---------------------------------------------------------------- Gaussian noise
# kernels/philox.py standard_normals: element e pairs with e ^ 1 (words in element order),
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
                         <uint32_t>stream, 0)

