# The activations (twin of kernels/reference/activation.py and kernels/numba/activation.py):
# one f and one f' per row of contract.ACTIVATION_TABLE. Included by _kernels.pyx; the
# dispatch over them (one loop copy per activation) is generated into contract.pxi by
# kernels/cython/generate.py.
#
# Each row's functions are named after it: _f_<name>(z, slope) and _df_<name>(v, slope), v
# what the row's grad_from names (the output a = f(z), or z itself). NaN stays NaN in every f
# (DESIGN.md).
cdef inline real _f_linear(real z, real slope) noexcept nogil:
    return z


cdef inline real _df_linear(real a, real slope) noexcept nogil:
    return 1


cdef inline real _f_relu(real z, real slope) noexcept nogil:
    return 0 if z <= 0 else z       # np.maximum(z, 0): NaN <= 0 is false; negatives give +0


cdef inline real _df_relu(real a, real slope) noexcept nogil:
    return 1 if a > 0 else 0


cdef inline real _f_leaky_relu(real z, real slope) noexcept nogil:
    return z if z > 0 else z * slope


cdef inline real _df_leaky_relu(real a, real slope) noexcept nogil:
    return 1 if a > 0 else slope


cdef inline real _f_tanh(real z, real slope) noexcept nogil:
    return _tanh(z)


cdef inline real _df_tanh(real a, real slope) noexcept nogil:
    return <real>1 - a * a


cdef inline real _f_sigmoid(real z, real slope) noexcept nogil:
    cdef real e
    if z >= 0:
        return <real>1 / (<real>1 + _exp(-z))
    e = _exp(z)
    return e / (<real>1 + e)


cdef inline real _df_sigmoid(real a, real slope) noexcept nogil:
    return a * (<real>1 - a)


# The rows below (kernels/reference/activation.py is their spec) read z where grad_from is
# "input" (the GELUs, silu, softplus, mish) and the output a elsewhere (elu, selu,
# hard_sigmoid); slope is elu's alpha.
cdef inline real _softplus(real z) noexcept nogil:
    """max(z, 0) + log1p(exp(-|z|)): no overflow; NaN stays NaN (through the log1p)."""
    return (z if z > 0 else <real>0) + _log1p(_exp(-_abs(z)))


cdef inline real _gelu_cdf(real z) noexcept nogil:
    return <real>0.5 * _erfc(-z * <real>SQRT_HALF)


cdef inline real _gelu_tanh_inner(real z) noexcept nogil:
    return <real>GELU_K * (z + <real>GELU_C * (z * z * z))


cdef inline real _f_gelu(real z, real slope) noexcept nogil:
    return z * _gelu_cdf(z)


cdef inline real _df_gelu(real z, real slope) noexcept nogil:
    return _gelu_cdf(z) + z * (_exp(<real>-0.5 * (z * z)) * <real>INV_SQRT_2PI)


cdef inline real _f_gelu_tanh(real z, real slope) noexcept nogil:
    return (<real>0.5 * z) * (<real>1 + _tanh(_gelu_tanh_inner(z)))


cdef inline real _df_gelu_tanh(real z, real slope) noexcept nogil:
    cdef real t = _tanh(_gelu_tanh_inner(z))
    cdef real dtanh = <real>1 - t * t
    cdef real right = 0
    if dtanh != 0:      # saturated: 0, also where z^2 overflows (0 * inf)
        right = ((<real>0.5 * z) * dtanh) * (<real>GELU_K * (<real>1 + <real>(3 * GELU_C)
                                                            * (z * z)))
    return <real>0.5 * (<real>1 + t) + right


cdef inline real _f_elu(real z, real slope) noexcept nogil:
    return z if z > 0 else _expm1(z) * slope


cdef inline real _df_elu(real a, real slope) noexcept nogil:
    return 1 if a > 0 else a + slope


cdef inline real _f_selu(real z, real slope) noexcept nogil:
    return z * <real>SELU_LAMBDA if z > 0 else _expm1(z) * <real>SELU_NEG


cdef inline real _df_selu(real a, real slope) noexcept nogil:
    return <real>SELU_LAMBDA if a > 0 else a + <real>SELU_NEG


cdef inline real _f_silu(real z, real slope) noexcept nogil:
    return z * _f_sigmoid(z, slope)


cdef inline real _df_silu(real z, real slope) noexcept nogil:
    cdef real s = _f_sigmoid(z, slope)
    return s * (<real>1 + z * (<real>1 - s))


cdef inline real _f_softplus(real z, real slope) noexcept nogil:
    return _softplus(z)


cdef inline real _df_softplus(real z, real slope) noexcept nogil:
    return _f_sigmoid(z, slope)


cdef inline real _f_mish(real z, real slope) noexcept nogil:
    return z * _tanh(_softplus(z))


cdef inline real _df_mish(real z, real slope) noexcept nogil:
    cdef real t = _tanh(_softplus(z))
    return t + z * _f_sigmoid(z, slope) * (<real>1 - t * t)


cdef inline real _f_hard_sigmoid(real z, real slope) noexcept nogil:
    cdef real v = z + <real>3       # NaN passes both tests: stays NaN
    if v < 0:
        v = 0
    if v > 6:
        v = 6
    return v / <real>6


cdef inline real _df_hard_sigmoid(real a, real slope) noexcept nogil:
    return <real>1 / <real>6 if a > 0 and a < 1 else 0
