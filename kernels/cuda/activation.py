"""The CUDA activations (twin of kernels/reference/activation.py): f and f' of every row of
contract.ACTIVATION_TABLE as device functions, `activate(z, act, slope)` and
`activation_grad(v, act, slope)` with one `if` per code, and the table's flags as bit masks
(`unscales(act)`, `from_input(act)`). The epilogues (epilogue.py), the GEMMs, BatchNorm and
the fused kernels call them.
"""
import math

from .. import contract
from .jit import cuda

# The activation table's flags as bit masks over the codes (read on the device).
UNSCALE_MASK = sum(1 << a.code for a in contract.ACTIVATION_TABLE
                   if a.unscale and a.grad_from == "output")
FROM_INPUT_MASK = sum(1 << a.code for a in contract.ACTIVATION_TABLE if a.grad_from == "input")


def build(ns):
    """activate, activation_grad, unscales, from_input (device functions) into ns."""
    dev, ZERO, ONE, FT = ns.dev, ns.ZERO, ns.ONE, ns.FT
    HALF, THREE, SIX = FT(0.5), FT(3), FT(6)
    SQRT_HALF, INV_SQRT_2PI = FT(contract.SQRT_HALF), FT(contract.INV_SQRT_2PI)
    GELU_K, GELU_C, GELU_3C = FT(contract.GELU_K), FT(contract.GELU_C), FT(3 * contract.GELU_C)
    SELU_LAMBDA, SELU_NEG = FT(contract.SELU_LAMBDA), FT(contract.SELU_NEG)

    @cuda.jit(**dev)
    def sigmoid(z):
        if z >= ZERO:
            return ONE / (ONE + math.exp(-z))
        e = math.exp(z)
        return e / (ONE + e)

    @cuda.jit(**dev)
    def softplus(z):
        """max(z, 0) + log1p(exp(-|z|)): no overflow; NaN stays NaN (through the log1p)."""
        return (z if z > ZERO else ZERO) + math.log1p(math.exp(-abs(z)))

    @cuda.jit(**dev)
    def gelu_cdf(z):
        return HALF * math.erfc(-z * SQRT_HALF)

    @cuda.jit(**dev)
    def gelu_tanh_inner(z):
        return GELU_K * (z + GELU_C * (z * z * z))

    @cuda.jit(**dev)
    def activate(z, act, slope):
        """f(z) (kernels/reference/activation.py is the spec); NaN stays NaN (the reference's
        np.maximum), negatives give +0."""
        if act == contract.ACT_RELU:
            return z if z > ZERO or z != z else ZERO
        if act == contract.ACT_LEAKY_RELU:
            return z if z > ZERO else z * slope
        if act == contract.ACT_TANH:
            return math.tanh(z)
        if act == contract.ACT_SIGMOID:
            return sigmoid(z)
        if act == contract.ACT_GELU:
            return z * gelu_cdf(z)
        if act == contract.ACT_GELU_TANH:
            return (HALF * z) * (ONE + math.tanh(gelu_tanh_inner(z)))
        if act == contract.ACT_ELU:
            return z if z > ZERO else math.expm1(z) * slope
        if act == contract.ACT_SELU:
            return z * SELU_LAMBDA if z > ZERO else math.expm1(z) * SELU_NEG
        if act == contract.ACT_SILU:
            return z * sigmoid(z)
        if act == contract.ACT_SOFTPLUS:
            return softplus(z)
        if act == contract.ACT_MISH:
            return z * math.tanh(softplus(z))
        if act == contract.ACT_HARD_SIGMOID:
            v = z + THREE
            if v < ZERO:
                v = ZERO
            if v > SIX:
                v = SIX
            return v / SIX
        return z

    @cuda.jit(**dev)
    def activation_grad(a, act, slope):
        """f' from what the table's grad_from names: the output a = f(z) ("output"), or z
        itself ("input": the GELUs, silu, softplus, mish)."""
        if act == contract.ACT_RELU:
            return ONE if a > ZERO else ZERO
        if act == contract.ACT_LEAKY_RELU:
            return ONE if a > ZERO else slope
        if act == contract.ACT_TANH:
            return ONE - a * a
        if act == contract.ACT_SIGMOID:
            return a * (ONE - a)
        if act == contract.ACT_GELU:
            return gelu_cdf(a) + a * (math.exp(-HALF * (a * a)) * INV_SQRT_2PI)
        if act == contract.ACT_GELU_TANH:
            t = math.tanh(gelu_tanh_inner(a))
            dtanh = ONE - t * t
            right = ZERO
            if dtanh != ZERO:   # saturated: 0, also where z^2 overflows (0 * inf)
                right = ((HALF * a) * dtanh) * (GELU_K * (ONE + GELU_3C * (a * a)))
            return HALF * (ONE + t) + right
        if act == contract.ACT_ELU:
            return ONE if a > ZERO else a + slope
        if act == contract.ACT_SELU:
            return SELU_LAMBDA if a > ZERO else a + SELU_NEG
        if act == contract.ACT_SILU:
            s = sigmoid(a)
            return s * (ONE + a * (ONE - s))
        if act == contract.ACT_SOFTPLUS:
            return sigmoid(a)
        if act == contract.ACT_MISH:
            t = math.tanh(softplus(a))
            return t + a * sigmoid(a) * (ONE - t * t)
        if act == contract.ACT_HARD_SIGMOID:
            return ONE / SIX if a > ZERO and a < ONE else ZERO
        return ONE

    @cuda.jit(**dev)
    def unscales(act):
        """Whether f' needs a dropout-scaled output divided back (contract `unscale`)."""
        return ((UNSCALE_MASK >> act) & 1) != 0

    @cuda.jit(**dev)
    def from_input(act):
        """Whether f' reads z (contract grad_from == "input"), kept in the pre buffer."""
        return ((FROM_INPUT_MASK >> act) & 1) != 0

    ns.__dict__.update(activate=activate, activation_grad=activation_grad, unscales=unscales,
                       from_input=from_input)
