# The losses from logits (twin of kernels/reference/loss.py and kernels/numba/loss.py): the
# batch mean and its gradient. Included by _kernels.pyx.
#
# Shape legend: B batch rows, K outputs.
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
                grad[i] = (_f_sigmoid(z[i], z[i]) - y[i]) * c
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
