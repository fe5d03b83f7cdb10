"""The reference activations: f and f' of every row of contract.ACTIVATION_TABLE, by code,
in the dtype of z. The spec of every backend's activation module (numba/activation.py,
cython/activation.pxi, cuda/activation.py).
"""
import numpy as np

from .. import contract


def activation(z, act, slope):
    """f(z) for an activation code (contract.ACTIVATION_TABLE), in z's dtype; `slope` is the
    activation's parameter (leaky_relu's negative slope, elu's alpha). NaN stays NaN
    (np.maximum propagates it): every backend's activation must do the same. The forms are
    the stable ones for large |z|: softplus as max(z, 0) + log1p(exp(-|z|)), the GELU CDF as
    erfc (no cancellation for z << 0), expm1 for elu / selu."""
    dt = z.dtype.type
    if act == contract.ACT_RELU:
        return np.maximum(z, 0)
    if act == contract.ACT_LEAKY_RELU:
        return np.where(z > 0, z, z * dt(slope))
    if act == contract.ACT_TANH:
        return np.tanh(z)
    if act == contract.ACT_SIGMOID:
        return sigmoid(z)
    if act == contract.ACT_GELU:
        return z * gelu_cdf(z)
    if act == contract.ACT_GELU_TANH:
        return (dt(0.5) * z) * (dt(1) + np.tanh(gelu_tanh_inner(z)))
    if act == contract.ACT_ELU:
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0)) * dt(slope))
    if act == contract.ACT_SELU:
        return np.where(z > 0, z * dt(contract.SELU_LAMBDA),
                        np.expm1(np.minimum(z, 0)) * dt(contract.SELU_NEG))
    if act == contract.ACT_SILU:
        return z * sigmoid(z)
    if act == contract.ACT_SOFTPLUS:
        return softplus(z)
    if act == contract.ACT_MISH:
        return z * np.tanh(softplus(z))
    if act == contract.ACT_HARD_SIGMOID:
        return np.minimum(np.maximum(z + dt(3), 0), dt(6)) / dt(6)
    return z


def activation_grad(v, act, slope):
    """f'(z), from what the table's `grad_from` names: v = the output a = f(z) ("output":
    relu, tanh, elu, ...) or v = z itself ("input": the GELUs, silu, softplus, mish)."""
    dt = v.dtype.type
    one = dt(1)
    if act == contract.ACT_RELU:
        return (v > 0).astype(v.dtype)
    if act == contract.ACT_LEAKY_RELU:
        return np.where(v > 0, one, dt(slope))
    if act == contract.ACT_TANH:
        return one - v * v
    if act == contract.ACT_SIGMOID:
        return v * (one - v)
    if act == contract.ACT_GELU:            # Phi(z) + z * phi(z)
        return gelu_cdf(v) + v * (np.exp(dt(-0.5) * (v * v)) * dt(contract.INV_SQRT_2PI))
    if act == contract.ACT_GELU_TANH:       # torch's order of the terms
        t = np.tanh(gelu_tanh_inner(v))
        dtanh = one - t * t
        inner = dt(contract.GELU_K) * (one + dt(3 * contract.GELU_C) * (v * v))
        # where tanh is saturated the second term is 0, also when z^2 overflows (0 * inf)
        right = np.where(dtanh != 0, ((dt(0.5) * v) * dtanh) * inner, dt(0))
        return dt(0.5) * (one + t) + right
    if act == contract.ACT_ELU:             # f(z) + alpha = alpha * exp(z) for z <= 0
        return np.where(v > 0, one, v + dt(slope))
    if act == contract.ACT_SELU:
        return np.where(v > 0, dt(contract.SELU_LAMBDA), v + dt(contract.SELU_NEG))
    if act == contract.ACT_SILU:
        s = sigmoid(v)
        return s * (one + v * (one - s))
    if act == contract.ACT_SOFTPLUS:
        return sigmoid(v)
    if act == contract.ACT_MISH:
        t = np.tanh(softplus(v))
        return t + v * sigmoid(v) * (one - t * t)
    if act == contract.ACT_HARD_SIGMOID:
        return np.where((v > 0) & (v < 1), one / dt(6), dt(0))
    return np.ones_like(v)


def sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype)


def softplus(z):
    """log(1 + exp(z)) without overflow: max(z, 0) + log1p(exp(-|z|))."""
    return np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z)))


def gelu_cdf(z):
    """Phi(z) = 0.5 * erfc(-z / sqrt(2)), in z's dtype."""
    from scipy.special import erfc      # here: scipy.special costs 0.4 s to import
    dt = z.dtype.type
    return (dt(0.5) * erfc(-z * dt(contract.SQRT_HALF))).astype(z.dtype)


def gelu_tanh_inner(z):
    """GELU_K * (z + GELU_C * z^3), the argument of the tanh approximation's tanh."""
    dt = z.dtype.type
    return dt(contract.GELU_K) * (z + dt(contract.GELU_C) * (z * z * z))
