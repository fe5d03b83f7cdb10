"""The CUDA epilogues (twin of kernels/reference/epilogue.py): what a dense layer does to one
element after its GEMM (forward: bias, activation, noise, dropout) and before its GEMMs
(backward: dropout mask and GaussianDropout factor regenerated, f'), and a part's input
transform. One element at a time: the GEMM (dense.py), BatchNorm (batchnorm.py), the loss
(loss.py) and the fused small-MLP kernels (fused.py) call these device functions in their
own loops; the kernels here run them over whole arrays after a cuBLAS GEMM and for the
per-op contract.

Shape legend: B batch rows, O fan_out.

The activations are the contract's table (contract.ACTIVATION_TABLE): f in `activate`, f'
in `activation_grad`, one `if` per code; the table's flags arrive as bit masks. f' reads
what the table's `grad_from` names: the output a = f(z) ("output": divided back by the
dropout scale first when `unscale`), or z itself ("input": the layer then keeps z in its
pre buffer, contract.keeps_pre). With noise, f' reads the pre buffer: f(z) for an
"output" activation (the noisy output no longer tells f(z)), z for an "input" one.
"""
import math

import numpy as np

from .. import contract
from ..contract import STREAM_DROPOUT, STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE, STREAM_NOISE
from .jit import cuda
from .loss import ST_PEN, ST_STOP

# Modes of dense_epilogue and of the GEMM's epilogue (dense.py).
EPI_NONE = 0          # no epilogue (a plain GEMM)
EPI_FORWARD = 1       # bias, f, noise, dropout -> out
EPI_BACKWARD = 2      # dL/d(out) -> dL/dz: mask, noise factor, f'
EPI_FORWARD_PRE = 3   # EPI_FORWARD that also writes the pre buffer (contract.keeps_pre)

# The activation table's flags as bit masks over the codes (read on the device).
UNSCALE_MASK = sum(1 << a.code for a in contract.ACTIVATION_TABLE
                   if a.unscale and a.grad_from == "output")
FROM_INPUT_MASK = sum(1 << a.code for a in contract.ACTIVATION_TABLE if a.grad_from == "input")


def build(ns):
    """activate, activation_grad and the element epilogues (device functions), and the
    elementwise kernels."""
    build_activations(ns)
    build_elements(ns)
    build_kernels(ns)


def build_activations(ns):
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
        """f(z) (kernels/reference/epilogue.py is the spec); NaN stays NaN (the reference's
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


def build_elements(ns):
    dev, ZERO, ONE, FT = ns.dev, ns.ZERO, ns.ONE, ns.FT
    ALPHA_DROPPED = FT(contract.ALPHA_DROPPED)
    U0 = np.uint64(0)
    activate, activation_grad = ns.activate, ns.activation_grad
    unscales, from_input = ns.unscales, ns.from_input
    group_words, pick, normal_of = ns.group_words, ns.pick, ns.normal_of
    philox_word, normal_at = ns.philox_word, ns.normal_at

    @cuda.jit(**dev)
    def forward_value(z, act, slope, thr, scale, word):
        a = activate(z, act, slope)
        if thr > 0:
            if word >= np.uint64(thr):
                a = a * scale
            else:
                a = ZERO
        return a

    @cuda.jit(**dev)
    def backward_value(g, a, act, slope, thr, scale, word):
        """dL/dz from dL/d(out) and what f' reads (the stored out, or z)."""
        if thr > 0:
            if word >= np.uint64(thr):
                if unscales(act):
                    a = a / scale
                return (g * scale) * activation_grad(a, act, slope)
            return ZERO
        return g * activation_grad(a, act, slope)

    @cuda.jit(**dev)
    def noisy(v, noise, nstd, nrm):
        """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n) (n in the dtype)."""
        if noise == contract.NOISE_ADD:
            return v + nstd * nrm
        return v * (ONE + nstd * nrm)

    @cuda.jit(**dev)
    def alpha_value(v, thr, scale, shift, word):
        """AlphaDropout (contract NOISE_ALPHA): scale * (v if kept else ALPHA_DROPPED) +
        shift."""
        if thr > 0:
            if word < np.uint64(thr):
                v = ALPHA_DROPPED
        return v * scale + shift

    @cuda.jit(**dev)
    def noise_forward_value(z, act, slope, thr, scale, word, noise, nstd, nrm):
        """(out, f(z)) of one element of a layer with noise: out = dropout(noise(f(z))), or
        AlphaDropout's out (its shift in nstd)."""
        a = activate(z, act, slope)
        if noise == contract.NOISE_ALPHA:
            return alpha_value(a, thr, scale, nstd, word), a
        v = noisy(a, noise, nstd, nrm)
        if thr > 0:
            if word >= np.uint64(thr):
                v = v * scale
            else:
                v = ZERO
        return v, a

    @cuda.jit(**dev)
    def noise_backward_value(g, p, act, slope, thr, scale, word, noise, nstd, nrm):
        """dL/dz of a layer with noise (the reference's order): p = the pre buffer (unused
        for a linear layer), nrm the regenerated normal (unused for NOISE_ADD)."""
        d = g
        if thr > 0:
            d = d * scale
        if noise == contract.NOISE_MUL:
            d = d * (ONE + nstd * nrm)
        if act != contract.ACT_LINEAR:
            d = d * activation_grad(p, act, slope)
        if thr > 0 and word < np.uint64(thr):
            d = ZERO
        return d

    @cuda.jit(**dev)
    def dense_epilogue(v, epi, has_b, bias_j, act, slope, thr, scale, noise, nstd, stored, e,
                       wc, nc, k0, k1, step, layer):
        """One element e of a dense layer's fused epilogue (the GEMM's and the fused MLP's).
        Forward (EPI_FORWARD, EPI_FORWARD_PRE): v = (x @ W)[e] -> (out, what the pre buffer
        keeps: z for an "input" activation, else f(z)). EPI_BACKWARD: v = dL/d(out)[e] ->
        (dL/dz, 0), f' from `stored`: the layer's output, or its pre buffer. Dropout words
        and noise normals come from the cached Philox groups wc and nc (group_words)."""
        word = U0
        if thr > 0:
            w0, w1, w2, w3 = group_words(wc, e, k0, k1, step, layer, STREAM_DROPOUT)
            word = pick(w0, w1, w2, w3, e & 3)
        nrm = ZERO
        if noise == contract.NOISE_MUL or (noise == contract.NOISE_ADD and epi != EPI_BACKWARD):
            n0, n1, n2, n3 = group_words(nc, e, k0, k1, step, layer, STREAM_NOISE)
            nrm = FT(normal_of(n0, n1, n2, n3, e & 3))
        if epi != EPI_BACKWARD:
            if has_b:
                v = v + bias_j
            if noise != contract.NOISE_NONE:
                out, a = noise_forward_value(v, act, slope, thr, scale, word, noise, nstd, nrm)
                if from_input(act):
                    a = v
                return out, a
            a = activate(v, act, slope)
            out = a
            if thr > 0:
                if word >= np.uint64(thr):
                    out = a * scale
                else:
                    out = ZERO
            # what a pre buffer keeps: z for an "input" activation, else f(z) (an activity
            # penalty under dropout: contract.keeps_pre)
            return out, (v if from_input(act) else a)
        if noise != contract.NOISE_NONE:
            p = stored if act != contract.ACT_LINEAR else ZERO
            return noise_backward_value(v, p, act, slope, thr, scale, word, noise, nstd,
                                        nrm), ZERO
        return backward_value(v, stored, act, slope, thr, scale, word), ZERO

    @cuda.jit(**dev)
    def input_value(v, e, thr, scale, noise, nstd, k0, k1, step, layer):
        """Element e of a part's input transform: dropout(noise(v)) (streams
        STREAM_INPUT_NOISE, STREAM_INPUT_DROPOUT), or AlphaDropout (its shift in nstd).
        Shared by input_dropout, the epoch's gather and the fused rows' gather."""
        word = U0
        if thr > 0:
            word = philox_word(e, k0, k1, step, layer, STREAM_INPUT_DROPOUT)
        if noise == contract.NOISE_ALPHA:
            return alpha_value(v, thr, scale, nstd, word)
        if noise != contract.NOISE_NONE:
            v = noisy(v, noise, nstd, FT(normal_at(e, k0, k1, step, layer, STREAM_INPUT_NOISE)))
        if thr > 0:
            v = v * scale if word >= np.uint64(thr) else ZERO
        return v

    @cuda.jit(**dev)
    def activity_value(g, o, p, act, slope, thr, scale, word, noise, nstd, nrm, c1, c2, has1,
                       has2):
        """(dL/dz, a) of one element of a layer with an activity penalty (kernels/reference/
        epilogue.py activity_epilogue_backward): g = dL/d(out), o its output, p its pre
        buffer (a, or z for an "input" activation; unread without dropout and noise), nrm
        the regenerated normal (GaussianDropout), c1 = l1 / B, c2 = 2 l2 / B."""
        d = g
        if thr > 0:
            d = d * scale
        if noise == contract.NOISE_MUL:
            d = d * (ONE + nstd * nrm)
        if thr > 0 and word < np.uint64(thr):
            d = ZERO
        if thr == 0 and noise == contract.NOISE_NONE:
            a = o
        elif from_input(act):
            a = activate(p, act, slope)
        else:
            a = p
        sgn = a
        if a > ZERO:
            sgn = ONE
        elif a < ZERO:
            sgn = -ONE
        if has1 and has2:
            d = d + (c1 * sgn + c2 * a)
        elif has1:
            d = d + c1 * sgn
        else:
            d = d + c2 * a
        if act != contract.ACT_LINEAR:
            d = d * activation_grad(p if from_input(act) else a, act, slope)
        return d, a

    ns.__dict__.update(forward_value=forward_value, backward_value=backward_value, noisy=noisy,
                       alpha_value=alpha_value, input_value=input_value,
                       activity_value=activity_value,
                       noise_forward_value=noise_forward_value,
                       noise_backward_value=noise_backward_value, dense_epilogue=dense_epilogue)


def build_kernels(ns):
    FT, ZERO = ns.FT, ns.ZERO
    U0 = np.uint64(0)
    philox_word, normal_at, noisy = ns.philox_word, ns.normal_at, ns.noisy
    from_input, forward_value = ns.from_input, ns.forward_value
    backward_value, noise_forward_value = ns.backward_value, ns.noise_forward_value
    noise_backward_value = ns.noise_backward_value
    input_value = ns.input_value
    activity_value, activate = ns.activity_value, ns.activate

    @cuda.jit
    def forward_epilogue(out, bias, has_bias, act, slope, thr, scale, k0, k1, step, layer,
                         noise, nstd, pre, keep_pre):
        """After a cuBLAS GEMM: out = dropout(noise(f(out + b))) in place; with keep_pre,
        pre = z (an "input" activation) or f(z) (with noise)."""
        B, O = out.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            v = out[i, j]
            if has_bias:
                v = v + bias[j]
            if keep_pre and from_input(act):
                pre[i, j] = v
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            if noise != contract.NOISE_NONE:
                nrm = ZERO
                if noise != contract.NOISE_ALPHA:
                    nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
                v, a = noise_forward_value(v, act, slope, thr, scale, word, noise, nstd, nrm)
                if keep_pre and not from_input(act):
                    pre[i, j] = a
                out[i, j] = v
            elif keep_pre and not from_input(act):     # an activity penalty under dropout
                a = activate(v, act, slope)
                pre[i, j] = a
                out[i, j] = forward_value(v, act, slope, thr, scale, word)
            else:
                out[i, j] = forward_value(v, act, slope, thr, scale, word)

    @cuda.jit
    def activity_grad(grad, out, pre, act, slope, thr, scale, noise, nstd, k0, k1, step,
                      layer, c1, c2, has1, has2, l1, l2, status):
        """grad = dL/d(out) -> dL/dz in place for a layer with an activity penalty
        (activity_value), and status[ST_PEN] += l1 sum |a| + l2 sum a^2 (float64 atomics,
        one per thread; the step's penalty times its B rows, as the update adds its own).
        Nothing when the step stopped on a non-finite loss."""
        if status[ST_STOP] != 0.0:
            return
        B, O = grad.shape
        s = 0.0
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            nrm = ZERO
            if noise == contract.NOISE_MUL:
                nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
            p = ZERO
            if thr > 0 or noise != contract.NOISE_NONE or from_input(act):
                p = pre[i, j]
            d, a = activity_value(grad[i, j], out[i, j], p, act, slope, thr, scale, word,
                                  noise, nstd, nrm, c1, c2, has1, has2)
            grad[i, j] = d
            a64 = np.float64(a)
            if has1:
                s += l1 * abs(a64)
            if has2:
                s += l2 * (a64 * a64)
        if s != 0.0 or s != s:
            cuda.atomic.add(status, ST_PEN, s)

    @cuda.jit
    def output_grad(grad, stored, act, slope, thr, scale, noise, nstd, k0, k1, step, layer):
        """grad = dL/d(out) -> dL/dz in place: the mask (and GaussianDropout's factor)
        regenerated, f' from `stored`: the layer's output, or its pre buffer (with noise or
        an "input" activation; unused with noise on a linear layer)."""
        B, O = grad.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            if noise != contract.NOISE_NONE:
                nrm = ZERO
                if noise == contract.NOISE_MUL:
                    nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
                p = stored[i, j] if act != contract.ACT_LINEAR else ZERO
                grad[i, j] = noise_backward_value(grad[i, j], p, act, slope, thr, scale, word,
                                                  noise, nstd, nrm)
            else:
                grad[i, j] = backward_value(grad[i, j], stored[i, j], act, slope, thr, scale,
                                            word)

    @cuda.jit
    def input_dropout(x, out, thr, scale, k0, k1, step, layer, noise, nstd):
        """out = dropout(noise(x)) (input_value); out may be x (a gradient sent back through
        a head's input transform)."""
        B, I = x.shape
        for e in range(cuda.grid(1), B * I, cuda.gridsize(1)):
            i = e // I
            j = e - i * I
            out[i, j] = input_value(x[i, j], e, thr, scale, noise, nstd, k0, k1, step, layer)

    ns.__dict__.update(forward_epilogue=forward_epilogue, output_grad=output_grad,
                       input_dropout=input_dropout, activity_grad=activity_grad)
