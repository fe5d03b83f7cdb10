"""The Numba activations (twin of kernels/reference/activation.py): one f and one f' per row
of contract.ACTIVATION_TABLE, picked by a compile-time constant code (jit.by_code), and the
rows' flags as tuples the loops index with that constant.
"""
import math

import numpy as np

from .. import contract
from .jit import by_code, kernel_inline

# per activation code, from the contract's table
UNSCALE = tuple(bool(contract.ACTIVATION_BY_CODE.get(c) and contract.ACTIVATION_BY_CODE[c].unscale)
                for c in range(contract.N_ACTIVATIONS))
FROM_INPUT = tuple(bool(contract.ACTIVATION_BY_CODE.get(c)
                        and contract.ACTIVATION_BY_CODE[c].grad_from == "input")
                   for c in range(contract.N_ACTIVATIONS))


# One f and one f' per row of contract.ACTIVATION_TABLE, named after it: _f_<name>(z, act,
# slope) and _df_<name>(v, act, slope), v what the row's grad_from names (the output a = f(z),
# or z); slope is the activation's parameter (leaky_relu's negative slope, elu's alpha), act
# the (constant) code itself. kernels/reference/activation.py is their spec. NaN stays NaN in
# every f (as the reference's np.maximum). `activate` / `activation_grad` pick the row's
# function at typing time (jit.by_code), so a loop copy compiles its own activation only.
@kernel_inline
def sigmoid(z):
    if z >= 0:
        return 1 / (1 + np.exp(-z))
    e = np.exp(z)
    return e / (1 + e)


@kernel_inline
def softplus(z):
    """max(z, 0) + log1p(exp(-|z|)): no overflow; NaN stays NaN (through the log1p)."""
    return (z if z > 0 else type(z)(0)) + np.log1p(np.exp(-abs(z)))


@kernel_inline
def gelu_cdf(z):
    """Phi(z) = 0.5 * erfc(-z / sqrt(2)), in z's type."""
    T = type(z)
    return T(0.5) * T(math.erfc(-z * T(contract.SQRT_HALF)))


@kernel_inline
def gelu_tanh_inner(z):
    T = type(z)
    return T(contract.GELU_K) * (z + T(contract.GELU_C) * (z * z * z))


def _f_linear(z, act, slope):
    return z


def _df_linear(v, act, slope):
    return type(v)(1)


def _f_relu(z, act, slope):
    return z if z > 0 or z != z else type(z)(0)


def _df_relu(v, act, slope):
    return type(v)(1) if v > 0 else type(v)(0)


def _f_leaky_relu(z, act, slope):
    return z if z > 0 else z * slope


def _df_leaky_relu(v, act, slope):
    return type(v)(1) if v > 0 else slope


def _f_tanh(z, act, slope):
    return np.tanh(z)


def _df_tanh(v, act, slope):
    return type(v)(1) - v * v


def _f_sigmoid(z, act, slope):
    return sigmoid(z)


def _df_sigmoid(v, act, slope):
    return v * (type(v)(1) - v)


def _f_gelu(z, act, slope):
    return z * gelu_cdf(z)


def _df_gelu(v, act, slope):
    T = type(v)
    return gelu_cdf(v) + v * (np.exp(T(-0.5) * (v * v)) * T(contract.INV_SQRT_2PI))


def _f_gelu_tanh(z, act, slope):
    T = type(z)
    return (T(0.5) * z) * (T(1) + np.tanh(gelu_tanh_inner(z)))


def _df_gelu_tanh(v, act, slope):
    T = type(v)
    one = T(1)
    t = np.tanh(gelu_tanh_inner(v))
    dtanh = one - t * t
    right = T(0)
    if dtanh != 0:      # saturated: 0, also where v^2 overflows (0 * inf)
        right = ((T(0.5) * v) * dtanh) * (T(contract.GELU_K)
                                          * (one + T(3 * contract.GELU_C) * (v * v)))
    return T(0.5) * (one + t) + right


def _f_elu(z, act, slope):
    return z if z > 0 else np.expm1(z) * slope


def _df_elu(v, act, slope):
    return type(v)(1) if v > 0 else v + slope


def _f_selu(z, act, slope):
    T = type(z)
    return z * T(contract.SELU_LAMBDA) if z > 0 else np.expm1(z) * T(contract.SELU_NEG)


def _df_selu(v, act, slope):
    T = type(v)
    return T(contract.SELU_LAMBDA) if v > 0 else v + T(contract.SELU_NEG)


def _f_silu(z, act, slope):
    return z * sigmoid(z)


def _df_silu(v, act, slope):
    one = type(v)(1)
    s = sigmoid(v)
    return s * (one + v * (one - s))


def _f_softplus(z, act, slope):
    return softplus(z)


def _df_softplus(v, act, slope):
    return sigmoid(v)


def _f_mish(z, act, slope):
    return z * np.tanh(softplus(z))


def _df_mish(v, act, slope):
    t = np.tanh(softplus(v))
    return t + v * sigmoid(v) * (type(v)(1) - t * t)


def _f_hard_sigmoid(z, act, slope):
    T = type(z)
    v = z + T(3)        # NaN passes both tests: stays NaN
    v = T(0) if v < 0 else v
    v = T(6) if v > 6 else v
    return v / T(6)


def _df_hard_sigmoid(v, act, slope):
    T = type(v)
    return T(1) / T(6) if v > 0 and v < 1 else T(0)


def activate(z, act, slope):
    """f(z) for a compile-time constant activation code: the row's _f_<name>."""
    raise NotImplementedError("activate runs in compiled code only")


def activation_grad(v, act, slope):
    """f'(z) from v (what the row's grad_from names) for a constant code: _df_<name>."""
    raise NotImplementedError("activation_grad runs in compiled code only")


by_code(activate, {a.code: globals()[f"_f_{a.name}"] for a in contract.ACTIVATION_TABLE})
by_code(activation_grad, {a.code: globals()[f"_df_{a.name}"] for a in contract.ACTIVATION_TABLE})


def activations_used(li):
    """The activation codes of a plan's layers (for jit.uses_of)."""
    return {int(a) for a in li[:, contract.LI_ACT]}
