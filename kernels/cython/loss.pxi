# The losses from logits (twin of kernels/reference/loss.py and kernels/numba/loss.py): the
# batch mean and its gradient. Included by _kernels.pyx. `param` is the part's PF_LOSS_PARAM
# (huber's delta, the categorical losses' label smoothing).
#
# Shape legend: B batch rows, K outputs.
cdef double _elementwise_loss(real* z, real* y, real* grad, Py_ssize_t n, int loss,
                              double param, bint want_grad) noexcept nogil:
    """mae, huber, log_cosh, poisson over the n = B * K elements: their sum (double)."""
    cdef double total = 0.0
    cdef double zz, a64
    cdef double delta64 = <double><real>param
    cdef real c = <real>(1.0 / <double>n)
    cdef real delta = <real>param
    cdef real d
    cdef Py_ssize_t i
    for i in range(n):
        if loss == LOSS_POISSON:        # z the log-rate: exp(z) - y z
            zz = <double>z[i]
            total += exp(zz) - <double>y[i] * zz
            if want_grad:
                grad[i] = (_exp(z[i]) - y[i]) * c
            continue
        d = z[i] - y[i]
        a64 = fabs(<double>d)
        if loss == LOSS_MAE:
            total += a64
            if want_grad:
                grad[i] = _sign(d) * c
        elif loss == LOSS_HUBER:
            if _abs(d) > delta:         # NaN is not: its gradient stays NaN
                total += delta64 * (a64 - 0.5 * delta64)
                if want_grad:
                    grad[i] = (_sign(d) * delta) * c
            else:
                total += 0.5 * <double>d * <double>d
                if want_grad:
                    grad[i] = d * c
        else:                           # log_cosh
            total += a64 + log1p(exp(-2.0 * a64)) - log(2.0)
            if want_grad:
                grad[i] = _tanh(d) * c
    return total


cdef double _categorical_loss(real* z, real* y, real* grad, Py_ssize_t B, Py_ssize_t K,
                              double ls, bint want_grad) noexcept nogil:
    """categorical_crossentropy from target rows t = (1 - ls) y + ls / K (y when ls is 0):
    the sum over rows of S lse - sum t z, gradient (p S - t) / B."""
    cdef double total = 0.0
    cdef double s64, S64, tz64, lse
    cdef real c = <real>(1.0 / <double>B)
    cdef real on = <real>(1.0 - ls)
    cdef real off = <real>(ls / <double>K)
    cdef bint smooth = ls != 0
    cdef real zmax, s, S, t, p
    cdef real* zi
    cdef real* yi
    cdef Py_ssize_t i, k
    for i in range(B):
        zi = z + i * K
        yi = y + i * K
        zmax = zi[0]
        for k in range(1, K):
            if zi[k] > zmax:
                zmax = zi[k]
        s = 0
        s64 = 0.0
        S = 0
        S64 = 0.0
        tz64 = 0.0
        for k in range(K):
            s = s + _exp(zi[k] - zmax)
            s64 += exp(<double>zi[k] - <double>zmax)
            t = yi[k] * on + off if smooth else yi[k]
            S = S + t
            S64 += <double>t
            tz64 += <double>t * <double>zi[k]
        lse = log(s64) + <double>zmax
        total += S64 * lse - tz64
        if want_grad:
            for k in range(K):
                t = yi[k] * on + off if smooth else yi[k]
                p = _exp(zi[k] - zmax) / s
                grad[i * K + k] = (p * S - t) * c
    return total


cdef double _sparse_smoothed_loss(real* z, real* y, real* grad, Py_ssize_t B, Py_ssize_t K,
                                  Py_ssize_t Ky, double ls, bint want_grad) noexcept nogil:
    """sparse_categorical_crossentropy with label smoothing ls > 0 (and Mixup's mixed
    targets): the sum over rows of lse - (ls / K) sum z - (1 - ls) z_label (lam-weighted
    labels when mixed), gradient p - ls / K - (1 - ls) [lam] at the label[s]."""
    cdef double total = 0.0
    cdef double s64, zsum, lse, lam64
    cdef double on64 = 1.0 - ls
    cdef double off64 = ls / <double>K
    cdef real c = <real>(1.0 / <double>B)
    cdef real on = <real>on64
    cdef real off = <real>off64
    cdef bint mixed = Ky == SCE_MIXED_WIDTH
    cdef real zmax, s, p, lam
    cdef real* zi
    cdef Py_ssize_t i, k, label, label_b
    for i in range(B):
        zi = z + i * K
        label = <Py_ssize_t>y[i * Ky + SCE_LABEL]
        label_b = label
        lam = 1
        if mixed:
            label_b = <Py_ssize_t>y[i * Ky + SCE_LABEL_B]
            lam = y[i * Ky + SCE_LAM]
        zmax = zi[0]
        for k in range(1, K):
            if zi[k] > zmax:
                zmax = zi[k]
        s = 0
        s64 = 0.0
        zsum = 0.0
        for k in range(K):
            s = s + _exp(zi[k] - zmax)
            s64 += exp(<double>zi[k] - <double>zmax)
            zsum += <double>zi[k]
        lse = log(s64) + <double>zmax
        if mixed:
            lam64 = <double>lam
            total += lse - off64 * zsum - on64 * (lam64 * <double>zi[label]
                                                  + (1.0 - lam64) * <double>zi[label_b])
        else:
            total += lse - off64 * zsum - on64 * <double>zi[label]
        if want_grad:
            for k in range(K):
                p = _exp(zi[k] - zmax) / s - off
                if mixed:
                    if k == label:
                        p = p - on * lam
                    if k == label_b:
                        p = p - on * (<real>1 - lam)
                elif k == label:
                    p = p - on
                grad[i * K + k] = p * c
    return total


cdef double _loss_forward_backward(real* z, real* y, real* grad, Py_ssize_t B, Py_ssize_t K,
                                   Py_ssize_t Ky, int loss, double param,
                                   bint want_grad) noexcept nogil:
    """Mean batch loss (double); grad = d(mean)/dz written when want_grad. y is (B, Ky): Ky = K
    but for sparse_categorical_crossentropy: 1 (labels) or SCE_MIXED_WIDTH (label a, label b,
    lam: lam * CE(a) + (1 - lam) * CE(b))."""
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
                grad[i] = (_f_sigmoid(z[i], z[i]) - y[i]) * c
        return total / <double>(B * K)
    if loss == LOSS_CCE:
        return _categorical_loss(z, y, grad, B, K, param, want_grad) / <double>B
    if loss != LOSS_SCE:
        return _elementwise_loss(z, y, grad, B * K, loss, param, want_grad) / <double>(B * K)
    if param != 0:
        return _sparse_smoothed_loss(z, y, grad, B, K, Ky, param, want_grad) / <double>B
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


cdef double _weighted_loss_forward_backward(real* z, real* y, real* grad, Py_ssize_t B,
                                            Py_ssize_t K, Py_ssize_t Ky, int loss,
                                            double param, real* Y, Py_ssize_t Kall,
                                            int64_t* rows, Py_ssize_t wcol) noexcept nogil:
    """The batch loss with the sample weights in column wcol of Y (rows `rows`):
    sum_r w_r l_r / B, each row's gradient times w_r / B (reference
    weighted_loss_forward_backward: every loss is a mean over rows)."""
    cdef double total = 0.0
    cdef double w
    cdef real scale
    cdef Py_ssize_t r, k
    for r in range(B):
        w = <double>Y[rows[r] * Kall + wcol]
        total += w * _loss_forward_backward(z + r * K, y + r * Ky, grad + r * K, 1, K, Ky,
                                            loss, param, True)
        scale = <real>(w / B)
        for k in range(K):
            grad[r * K + k] = grad[r * K + k] * scale
    return total / B


def loss_forward_backward(real[:, ::1] z, real[:, ::1] y, real[:, ::1] grad, int loss,
                          double param, bint want_grad):
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
                                       B, K, Ky, loss, param, want_grad)
    return value
