# The dense layer (twin of kernels/reference/dense.py and kernels/numba/dense.py): one GEMM
# and the epilogue (epilogue.pxi), forward and backward side by side. Included by
# _kernels.pyx.
#
# Shape legend: B batch rows, I fan_in, O fan_out.

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


# ---------------------------------------------------------------- the layer
cdef void _dense_forward(real* x, real* W, real* b, real* out, Py_ssize_t B, Py_ssize_t I,
                         Py_ssize_t O, int act, real slope, uint32_t thr, real scale,
                         uint32_t k0, uint32_t k1, uint32_t step, uint32_t layer,
                         uint32_t* words, int noise, real nstd, real* pre,
                         uint32_t* nwords, uint32_t g0) noexcept nogil:
    """out = dropout(noise(f(x @ W + b))): one GEMM, then one pass over the output; pre
    (unless NULL) = what backward's f' needs (contract.keeps_pre). nwords: the noise words.
    g0: the Philox group of out's element 0 (_philox_fill)."""
    _matmul(x, W, out, B, I, O)
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, False, g0)
    _forward_epilogue(out, B, O, b, act, slope, thr, scale, words, noise, nstd, pre, nwords)


cdef void _dense_backward(real* grad, real* out, real* x, real* W, real* dW, real* db,
                          real* dx, Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, int act,
                          real slope, uint32_t thr, real scale, uint32_t k0, uint32_t k1,
                          uint32_t step, uint32_t layer, uint32_t* words, int noise, real nstd,
                          real* pre, uint32_t* nwords, real c1, real c2, bint has1,
                          bint has2, double* sums, uint32_t g0) noexcept nogil:
    """grad holds dL/d(out) on entry and dL/dz on exit; dW, db (if any), dx (if any).
    f' comes from out, or from pre where the forward kept it; GaussianDropout's factor is
    regenerated from the noise words. With an activity penalty (has1 or has2; c1 = l1 / B,
    c2 = 2 l2 / B) the element pass is _activity_backward, its (sum |a|, sum a^2) into
    sums. g0: _dense_forward's."""
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, True, g0)
    if has1 or has2:
        _activity_backward(grad, out, B, O, db, act, slope, thr, scale, words, noise, nstd,
                           pre, nwords, c1, c2, has1, has2, sums)
    else:
        _backward_epilogue(grad, out, B, O, db, act, slope, thr, scale, words, noise, nstd,
                           pre, nwords)
    _matmul_tn(x, grad, dW, B, I, O)
    if dx != NULL:
        _matmul_nt(grad, W, dx, B, I, O)


cdef void _weight_noise(real* W, real* out, Py_ssize_t n, real std, uint32_t k0, uint32_t k1,
                        uint32_t step, uint32_t layer, uint32_t* words) noexcept nogil:
    """out = W + std * n over the n elements of a kernel in row-major order (reference
    weight_noise): the step's perturbed kernel, normals of stream STREAM_WEIGHT_NOISE
    rounded to the dtype first; words holds >= 4 * ceil(n / 4) values. The noise layers'
    additive pass (NOISE_ADD, no mask: _input_noise_range), over fixed chunks when big."""
    cdef Py_ssize_t c, n_chunks
    _philox_fill(words, n, k0, k1, step, layer, STREAM_WEIGHT_NOISE, 0)   # per weight
    if n >= PARALLEL_MIN_ELEMENTS:
        n_chunks = (n + ROW_CHUNK * 1024 - 1) // (ROW_CHUNK * 1024)
        for c in prange(n_chunks, schedule="static"):
            _input_noise_range(W, out, c * ROW_CHUNK * 1024,
                               _min(n, (c + 1) * ROW_CHUNK * 1024), 0, <real>1, words,
                               NOISE_ADD, std, words)
    else:
        _input_noise_range(W, out, 0, n, 0, <real>1, words, NOISE_ADD, std, words)


def weight_noise(real[:, ::1] W, real[:, ::1] out, double std, uint32_t k0, uint32_t k1,
                 int64_t step, int64_t layer):
    """out = W + std * n, the step's perturbed kernel (stream STREAM_WEIGHT_NOISE)."""
    _check(W.shape[0] == out.shape[0] and W.shape[1] == out.shape[1],
           "weight_noise: shapes do not match")
    cdef Py_ssize_t n = W.shape[0] * W.shape[1]
    cdef uint32_t[::1] words = _words_for(n)
    if n == 0:
        return
    with nogil:
        _weight_noise(&W[0, 0], &out[0, 0], n, <real>std, k0, k1, <uint32_t>step,
                      <uint32_t>layer, &words[0])


def dense_forward(real[:, ::1] x, real[:, ::1] W, real[::1] b, real[:, ::1] out, int act,
                  double slope, int64_t thr, double scale, uint32_t k0, uint32_t k1,
                  int64_t step, int64_t layer, int noise, double nstd, real[:, ::1] pre,
                  int64_t row0=0):
    """out = dropout(noise(f(x @ W + b))); pre (size 0: none) = what backward's f' needs
    (contract.keeps_pre: z, or f(z) before the noise). row0: the batch row of x's row 0
    (_group_of_row)."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and b.shape[0] in (0, O) and (pre.shape[0] * pre.shape[1] == 0
                                         or (pre.shape[0] == B and pre.shape[1] == O)),
           "dense_forward: shapes do not match")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t g0 = _group_of_row(row0, O)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise != NOISE_NONE else 0)
    if B == 0 or O == 0:
        return
    with nogil:
        _dense_forward(_ptr2(x), _ptr2(W), _ptr1(b), &out[0, 0], B, I, O, act, <real>slope,
                       t32, <real>scale, k0, k1, <uint32_t>step, <uint32_t>layer, &words[0],
                       noise, <real>nstd, _ptr2(pre), &nwords[0], g0)


def dense_backward(real[:, ::1] grad, real[:, ::1] out, real[:, ::1] x, real[:, ::1] W,
                   real[:, ::1] dW, real[::1] db, real[:, ::1] dx, int act, double slope,
                   int64_t thr, double scale, uint32_t k0, uint32_t k1, int64_t step,
                   int64_t layer, int noise, double nstd, real[:, ::1] pre,
                   double activity_l1=0.0, double activity_l2=0.0, int64_t row0=0):
    """grad: dL/d(out) in, dL/dz out; dW, db (size 0: none), dx (size 0: none) written.
    pre: the forward's, where contract.keeps_pre says backward needs it (the wrapper in
    __init__.py checks that it is there). activity_l1, activity_l2 (in the dtype already):
    the layer's activity penalty; returns its (sum |a|, sum a^2). row0: dense_forward's."""
    cdef Py_ssize_t B = x.shape[0], I = x.shape[1], O = W.shape[1]
    _check(W.shape[0] == I and out.shape[0] == B and out.shape[1] == O
           and grad.shape[0] == B and grad.shape[1] == O and dW.shape[0] == I
           and dW.shape[1] == O and db.shape[0] in (0, O)
           and (dx.shape[0] * dx.shape[1] == 0 or (dx.shape[0] == B and dx.shape[1] == I))
           and (pre.shape[0] * pre.shape[1] == 0 or (pre.shape[0] == B and pre.shape[1] == O)),
           "dense_backward: shapes do not match")
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t g0 = _group_of_row(row0, O)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise == NOISE_MUL else 0)
    cdef double sums[2]
    cdef double n = max(1, B)
    sums[0] = 0.0
    sums[1] = 0.0
    if I == 0 or O == 0:
        return 0.0, 0.0
    with nogil:
        _dense_backward(_ptr2(grad), _ptr2(out), _ptr2(x), &W[0, 0], &dW[0, 0], _ptr1(db),
                        _ptr2(dx), B, I, O, act, <real>slope, t32, <real>scale, k0, k1,
                        <uint32_t>step, <uint32_t>layer, &words[0], noise, <real>nstd,
                        _ptr2(pre), &nwords[0], <real>(activity_l1 / n),
                        <real>(2.0 * activity_l2 / n), activity_l1 != 0.0, activity_l2 != 0.0,
                        sums, g0)
    return sums[0], sums[1]


