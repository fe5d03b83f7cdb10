# The fused penalized update (twin of kernels/reference/update.py and kernels/numba/update.py):
# one pass per parameter tensor does gradient + penalty gradient + optimizer moments + step +
# proximal L1, then the column passes (group lasso, max-norm) of a matrix. Included by
# _kernels.pyx.
#
# Shape legend: R rows (fan_in, or 1 for a vector), O columns.
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
    """The fused step on n contiguous values (kernels/numba/update.py, same formulas).

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


cdef void _clip_gradients(real* g, Py_ssize_t n, int64_t* segs, Py_ssize_t n_seg, int mode,
                          double value) noexcept nogil:
    """contract CLIP_* on the flat gradient buffer, in place (reference clip_gradients)."""
    cdef Py_ssize_t s, i, a, b
    cdef double acc, coef
    cdef real c
    cdef real hi = <real>value
    cdef real lo = <real>(-value)
    if mode == CLIP_VALUE:
        for i in range(n):
            if g[i] > hi:
                g[i] = hi
            elif g[i] < lo:
                g[i] = lo
        return
    for s in range(1 if mode == CLIP_GLOBAL_NORM else n_seg):
        a = 0 if mode == CLIP_GLOBAL_NORM else segs[2 * s]
        b = n if mode == CLIP_GLOBAL_NORM else segs[2 * s + 1]
        acc = 0.0
        for i in range(a, b):
            acc += <double>g[i] * <double>g[i]
        coef = value / (sqrt(acc) + CLIP_EPS)
        if coef < 1.0:
            c = <real>coef
            for i in range(a, b):
                g[i] = g[i] * c
