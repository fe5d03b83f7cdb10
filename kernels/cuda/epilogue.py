"""The CUDA epilogues (twin of kernels/reference/epilogue.py): what a dense layer does to one
element after its GEMM (forward: bias, activation, noise, dropout) and before its GEMMs
(backward: dropout mask and GaussianDropout factor regenerated, f'), and a part's input
transform. One element at a time: the GEMM (dense.py), BatchNorm (batchnorm.py), the loss
(loss.py) and the fused small-MLP kernels (fused.py) call these device functions in their
own loops; the kernels here run them over whole arrays after a cuBLAS GEMM and for the
per-op contract.

Shape legend: B batch rows, O fan_out.

The activations (activation.py) are the contract's table (contract.ACTIVATION_TABLE): f in
`activate`, f' in `activation_grad`, one `if` per code; the table's flags arrive as bit
masks. f' reads
what the table's `grad_from` names: the output a = f(z) ("output": divided back by the
dropout scale first when `unscale`), or z itself ("input": the layer then keeps z in its
pre buffer, contract.keeps_pre). With noise, f' reads the pre buffer: f(z) for an
"output" activation (the noisy output no longer tells f(z)), z for an "input" one.
"""
import numpy as np

from .. import contract
from ..contract import (STREAM_DROPOUT, STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE, STREAM_NOISE,
                        STREAM_WEIGHT_NOISE)
from .jit import cuda
from .loss import ST_PEN, ST_STOP

# Modes of dense_epilogue and of the GEMM's epilogue (dense.py).
EPI_NONE = 0          # no epilogue (a plain GEMM)
EPI_FORWARD = 1       # bias, f, noise, dropout -> out
EPI_BACKWARD = 2      # dL/d(out) -> dL/dz: mask, noise factor, f'
EPI_FORWARD_PRE = 3   # EPI_FORWARD that also writes the pre buffer (contract.keeps_pre)


def build(ns):
    """The element epilogues (device functions, on activation.py's activate / activation_grad)
    and the elementwise kernels."""
    build_elements(ns)
    build_kernels(ns)


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

    @cuda.jit
    def weight_noise(W, out, std, k0, k1, step, layer):
        """out = W + std * n, the step's perturbed kernel (reference weight_noise): element
        e = i * O + j of W takes the normal of stream STREAM_WEIGHT_NOISE, rounded first."""
        I, O = W.shape
        for e in range(cuda.grid(1), I * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            out[i, j] = W[i, j] + std * FT(normal_at(e, k0, k1, step, layer,
                                                     STREAM_WEIGHT_NOISE))

    ns.__dict__.update(forward_epilogue=forward_epilogue, output_grad=output_grad,
                       input_dropout=input_dropout, weight_noise=weight_noise,
                       activity_grad=activity_grad)
