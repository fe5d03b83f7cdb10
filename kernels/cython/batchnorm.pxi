# The dense layer with BatchNorm on its pre-activation, training only (inference folds it
# into W, b): the twin of kernels/reference/batchnorm.py and kernels/numba/batchnorm.py, pass
# for pass. Included by _kernels.pyx.
#
# Shape legend: B batch rows, I fan_in, O fan_out. Layouts of gb, stats, save:
# kernels/contract.py (BN_*); save is (BN_SAVE_ROWS, O) float64.
#
# Column statistics: each column summed in float64 in row order by one thread, over fixed
# column chunks; elementwise passes over row chunks.
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


cdef inline void _bn_act_span(real* row, real* xr, real* pr, real* gam, real* bet,
                              double* mean, double* inv, Py_ssize_t O, act_tag* tag,
                              real slope) noexcept nogil:
    """One row (through the generated _bn_act_row; one copy per activation): zhat -> xr, y = gamma * zhat + beta,
    row = f(y); an f whose f' reads its input keeps y in pr (unless NULL)."""
    cdef Py_ssize_t j
    cdef real xh, y
    for j in range(O):
        xh = (row[j] - <real>mean[j]) * <real>inv[j]
        xr[j] = xh
        y = gam[j] * xh + bet[j]
        if _tag_from_input(tag) and pr != NULL:
            pr[j] = y
        row[j] = _tag_f(y, tag, slope)


cdef void _bn_act_rows(real* out, real* xhat, Py_ssize_t O, real* gb, double* save, int act,
                       real slope, uint32_t thr, real scale, uint32_t* words, Py_ssize_t r0,
                       Py_ssize_t r1, int noise, real nstd, real* pre,
                       uint32_t* nwords) noexcept nogil:
    """Rows r0..r1: zhat -> xhat, out = f(gamma * zhat + beta), [pre = out, noise], dropout
    (thr > 0)."""
    cdef Py_ssize_t i
    cdef double* mean = save + BN_SAVE_MEAN * O
    cdef double* inv = save + BN_SAVE_INVSTD * O
    cdef real* gam = gb + BN_GAMMA * O
    cdef real* bet = gb + BN_BETA * O
    cdef real* keep_f = _noise_keeps(pre, act)
    for i in range(r0, r1):
        _bn_act_row(out + i * O, xhat + i * O, pre + i * O if pre != NULL else NULL, gam, bet,
                    mean, inv, O, act, slope)
        _output_row(out, keep_f, words, nwords, i * O, O, thr, scale, noise, nstd)


cdef void _bn_dense_forward(real* x, real* W, real* b, real* out, real* xhat, real* gb,
                            double* save, Py_ssize_t B, Py_ssize_t I, Py_ssize_t O, int act,
                            real slope, uint32_t thr, real scale, double eps, uint32_t k0,
                            uint32_t k1, uint32_t step, uint32_t layer, uint32_t* words,
                            int noise, real nstd, real* pre, uint32_t* nwords) noexcept nogil:
    """out = dropout(noise(f(gamma * zhat + beta))), zhat the batch-normalized x @ W + b;
    pre (unless NULL) = what backward's f' needs (contract.keeps_pre)."""
    cdef Py_ssize_t c, n_chunks
    _matmul(x, W, out, B, I, O)
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, False, 0)
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
                            uint32_t* nwords, bint dy_ready) noexcept nogil:
    """Columns c0..c1, all three passes: dy in place (mask and noise factor regenerated, f'
    from the output, or from pre with noise; skipped when dy_ready: the activity pass wrote
    dy already);
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
    if not dy_ready:
        for i in range(B):
            _output_grad_row(grad, out, pre, words, nwords, i * O + c0, NULL, c1 - c0, act,
                             slope, thr, scale, noise, nstd)
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
                             uint32_t* nwords, real ac1, real ac2, bint has1, bint has2,
                             double* sums) noexcept nogil:
    """grad: dL/d(out) in, dL/dz out; dgb, dW, db (= 0), dx; then the running statistics.
    With an activity penalty (has1 or has2) dy comes from _activity_backward (ac1 = l1 / B,
    ac2 = 2 l2 / B; its (sum |a|, sum a^2) into sums)."""
    cdef Py_ssize_t c, n_chunks
    cdef bint dy_ready = has1 or has2
    _fill_output_words(words, nwords, B * O, k0, k1, step, layer, thr, noise, True, 0)
    if dy_ready:
        _activity_backward(grad, out, B, O, NULL, act, slope, thr, scale, words, noise, nstd,
                           pre, nwords, ac1, ac2, has1, has2, sums)
    if B * O >= PARALLEL_MIN_ELEMENTS and O >= 32:
        n_chunks = (O + COL_CHUNK - 1) // COL_CHUNK
        for c in prange(n_chunks, schedule="static"):
            _bn_backward_cols(grad, out, xhat, B, O, gb, save, db, dgb, act, slope, thr, scale,
                              words, c * COL_CHUNK, _min(O, c * COL_CHUNK + COL_CHUNK), noise,
                              nstd, pre, nwords, dy_ready)
    else:
        _bn_backward_cols(grad, out, xhat, B, O, gb, save, db, dgb, act, slope, thr, scale,
                          words, 0, O, noise, nstd, pre, nwords, dy_ready)
    _matmul_tn(x, grad, dW, B, I, O)
    if dx != NULL:
        _matmul_nt(grad, W, dx, B, I, O)
    _bn_running_update(stats, save, O, momentum)


def bn_dense_forward(real[:, ::1] x, real[:, ::1] W, real[::1] b, real[:, ::1] out,
                     real[:, ::1] xhat, real[:, ::1] gb, double[:, ::1] save, int act,
                     double slope, int64_t thr, double scale, double eps, uint32_t k0,
                     uint32_t k1, int64_t step, int64_t layer, int noise, double nstd,
                     real[:, ::1] pre):
    """out = dropout(noise(f(gamma * zhat + beta))), zhat the batch-normalized x @ W + b;
    pre (size 0: none) = what backward's f' needs (contract.keeps_pre)."""
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
                      real[:, ::1] pre, double activity_l1=0.0, double activity_l2=0.0):
    """grad: dL/d(out) in, dL/dz out; dgb, dW, db (= 0), dx written; running stats updated.
    pre: the forward's, where contract.keeps_pre says backward needs it (checked in
    __init__.py). activity_l1, activity_l2: as dense_backward's; returns (sum |a|,
    sum a^2)."""
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
    cdef uint32_t t32 = _threshold(thr)
    cdef uint32_t[::1] words = _words_for(B * O if thr > 0 else 0)
    cdef uint32_t[::1] nwords = _words_for(B * O if noise == NOISE_MUL else 0)
    cdef double sums[2]
    cdef double n = max(1, B)
    sums[0] = 0.0
    sums[1] = 0.0
    if B == 0 or I == 0 or O == 0:
        return 0.0, 0.0
    with nogil:
        _bn_dense_backward(&grad[0, 0], &out[0, 0], &xhat[0, 0], &x[0, 0], &W[0, 0], &gb[0, 0],
                           &stats[0, 0], &save[0, 0], &dW[0, 0], _ptr1(db), &dgb[0, 0],
                           _ptr2(dx), B, I, O, act, <real>slope, t32, <real>scale, momentum,
                           k0, k1, <uint32_t>step, <uint32_t>layer, &words[0], noise,
                           <real>nstd, _ptr2(pre), &nwords[0], <real>(activity_l1 / n),
                           <real>(2.0 * activity_l2 / n), activity_l1 != 0.0,
                           activity_l2 != 0.0, sums)
    return sums[0], sums[1]


