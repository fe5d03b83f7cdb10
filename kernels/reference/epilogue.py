"""The reference epilogues: what a dense layer does to its pre-activation after the GEMM
(forward: activation, noise, dropout) and before it (backward: dropout mask, noise factor,
f'), and a part's input transform. Forward and backward side by side. The activations
themselves are in activation.py.

Shape legend: B batch rows, O fan_out.
"""
import numpy as np

from .. import contract
from ..philox import keep_mask, standard_normals
from .activation import activation, activation_grad


# ---------------------------------------------------------------- Gaussian noise
def noise_values(shape, dtype, seed, step, layer, stream, row0=0):
    """Standard normals of `shape` (row-major element order), rounded once to dtype; row 0
    of a (B, O) shape draws as row row0 of its batch (element row0 * O + e)."""
    n = int(np.prod(shape))
    first = int(row0) * int(shape[-1]) if len(shape) > 1 else 0
    return standard_normals(n, seed, step, layer, stream, first).astype(dtype).reshape(shape)


def row_keep_mask(shape, threshold, seed, step, layer, stream, row0=0):
    """keep_mask of a (B, O) block whose row 0 is row row0 of its batch: the rows an MPI
    rank owns draw the global batch's mask (element (row0 + i) * O + j)."""
    return keep_mask(shape, threshold, seed, step, layer, stream, int(row0) * int(shape[1]))


def noise_factor(std, nrm, dtype):
    """1 + std * n, GaussianDropout's multiplier, in the working dtype."""
    return dtype.type(1) + dtype.type(std) * nrm


def apply_noise(a, noise, std, seed, step, layer, stream, row0=0):
    """NOISE_ADD: a + std * n; NOISE_MUL: a * (1 + std * n); in a's dtype, n rounded first.
    (NOISE_ALPHA draws no normals: its mask is the dropout's, alpha_dropout.)"""
    if noise in (contract.NOISE_NONE, contract.NOISE_ALPHA):
        return a
    nrm = noise_values(a.shape, a.dtype, seed, step, layer, stream, row0)
    if noise == contract.NOISE_ADD:
        return a + a.dtype.type(std) * nrm
    return a * noise_factor(std, nrm, a.dtype)


def alpha_dropout(a, threshold, scale, shift, seed, step, layer, stream, row0=0):
    """AlphaDropout (contract NOISE_ALPHA): scale * (a if kept else ALPHA_DROPPED) + shift,
    in a's dtype, the mask of the dropout stream `stream` (all kept when threshold is 0)."""
    dt = a.dtype.type
    if threshold > 0:
        keep = row_keep_mask(a.shape, threshold, seed, step, layer, stream, row0)
        a = np.where(keep, a, dt(contract.ALPHA_DROPPED))
    return a * dt(scale) + dt(shift)


# ---------------------------------------------------------------- the output epilogue
def activate_keeping(z, act, slope, pre):
    """f(z); an activation whose f' needs its input keeps z in pre (contract.keeps_pre)."""
    if contract.ACTIVATION_BY_CODE[int(act)].grad_from == "input" and pre is not None and pre.size:
        pre[...] = z
    return activation(z, act, slope)


def output_epilogue(a, out, drop_threshold, drop_scale, seed, step, layer, noise, noise_std,
                    pre, act=contract.ACT_LINEAR, row0=0):
    """out = dropout(noise(a)) for the activation a = f(.) of a dense layer (plain or
    BatchNorm); pre = a first when pre is given and not empty and f' reads its output (an
    input-derivable f has z there already): the layer has noise, or an activity penalty
    under dropout (contract.keeps_pre). row0: the batch row of a's row 0 (the masks and
    noise of those rows of the batch; 0 but on an MPI rank's shard)."""
    if (pre is not None and pre.size
            and contract.ACTIVATION_BY_CODE[int(act)].grad_from != "input"):
        pre[...] = a
    if noise != contract.NOISE_NONE:
        if noise == contract.NOISE_ALPHA:
            out[...] = alpha_dropout(a, drop_threshold, drop_scale, noise_std, seed, step,
                                     layer, contract.STREAM_DROPOUT, row0)
            return
        a = apply_noise(a, noise, noise_std, seed, step, layer, contract.STREAM_NOISE, row0)
    if drop_threshold > 0:
        keep = row_keep_mask(a.shape, drop_threshold, seed, step, layer,
                             contract.STREAM_DROPOUT, row0)
        a = np.where(keep, a * a.dtype.type(drop_scale), a.dtype.type(0))
    out[...] = a


def output_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed, step,
                             layer, noise, noise_std, pre, row0=0):
    """dL/d(f's input) from grad = dL/d(out): output_epilogue and f undone, a new array
    (row0: output_epilogue's).

    The dropout mask is regenerated from Philox, never stored. f' comes from the output:
    a = out / scale for kept units when the table says f' needs the value back (tanh,
    sigmoid; dropped units have zero gradient whatever f' is). With noise, f' comes from
    pre (the kept f(.); f' = 1 for a linear layer) and, for NOISE_MUL, the factor
    1 + std * n is regenerated: ((g * scale) * (1 + std * n)) * f'. AlphaDropout
    (NOISE_ALPHA) is additive past its mask: (g * scale) * f' where kept, else 0.
    """
    scale = out.dtype.type(drop_scale)
    if noise != contract.NOISE_NONE:
        d = grad * scale if drop_threshold > 0 else grad
        if noise == contract.NOISE_MUL:
            nrm = noise_values(out.shape, out.dtype, seed, step, layer, contract.STREAM_NOISE,
                               row0)
            d = d * noise_factor(noise_std, nrm, out.dtype)
        if act != contract.ACT_LINEAR:
            d = d * activation_grad(pre, act, slope)
        if drop_threshold > 0:
            keep = row_keep_mask(out.shape, drop_threshold, seed, step, layer,
                                 contract.STREAM_DROPOUT, row0)
            d = np.where(keep, d, out.dtype.type(0))
        return d
    if contract.ACTIVATION_BY_CODE[int(act)].grad_from == "input":
        a = pre                      # z itself, kept by the forward
    elif drop_threshold > 0:
        a = out / scale if contract.unscale_output(act) else out
    else:
        a = out
    if drop_threshold > 0:
        keep = row_keep_mask(out.shape, drop_threshold, seed, step, layer,
                             contract.STREAM_DROPOUT, row0)
        return np.where(keep, (grad * scale) * activation_grad(a, act, slope),
                        out.dtype.type(0))
    return grad * activation_grad(a, act, slope)


def activity_coefficients(l1, l2, n, dtype):
    """(c1, c2) = (l1 / B, 2 * l2 / B) of the activity gradient l1 * sign(a) / B + 2 * l2 *
    a / B, computed in float64 from the dtype's values of l1, l2 and rounded once to the
    dtype (every backend's)."""
    dt = np.dtype(dtype).type
    return dt(float(dt(l1)) / n), dt(2.0 * float(dt(l2)) / n)


def activity_value(a, l1, l2):
    """The activity penalty of the rows of a, before the division by B: l1 * sum |a| +
    l2 * sum a^2, in float64 (a term whose strength is 0 is left out: no 0 * inf)."""
    dt = a.dtype.type
    a64 = a.astype(np.float64)
    pen = 0.0
    if l1:
        pen += float(dt(l1)) * float(np.abs(a64).sum())
    if l2:
        pen += float(dt(l2)) * float((a64 * a64).sum())
    return pen


def activity_epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed, step,
                               layer, noise, noise_std, pre, l1, l2, row0=0):
    """output_epilogue_backward for a layer with an activity penalty (l1, l2 not both 0):
    (dL/d(f's input), the step's activity penalty (l1 sum |a| + l2 sum a^2) / B).

    dL/da = d + c1 * sign(a) + c2 * a, d the data gradient with the output epilogue undone
    (d = (g * scale) * (1 + std * n) where kept, else 0; the scale with dropout only, the
    factor for GaussianDropout only), c1, c2 = activity_coefficients; then times f'. a is
    the layer's activation f(.) of EVERY unit: the output itself without dropout and
    noise, else the pre buffer (which holds a, or z for an input-derivable f: a = f(z)).
    A strength of 0 leaves its term out. row0: output_epilogue's."""
    dt = out.dtype.type
    n = out.shape[0]
    d = grad * dt(drop_scale) if drop_threshold > 0 else grad
    if noise == contract.NOISE_MUL:
        nrm = noise_values(out.shape, out.dtype, seed, step, layer, contract.STREAM_NOISE,
                           row0)
        d = d * noise_factor(noise_std, nrm, out.dtype)
    if drop_threshold > 0:
        keep = row_keep_mask(out.shape, drop_threshold, seed, step, layer,
                             contract.STREAM_DROPOUT, row0)
        d = np.where(keep, d, dt(0))
    from_input = contract.ACTIVATION_BY_CODE[int(act)].grad_from == "input"
    if drop_threshold == 0 and noise == contract.NOISE_NONE:
        a = out
    else:
        a = activation(pre, act, slope) if from_input else pre
    c1, c2 = activity_coefficients(l1, l2, n, out.dtype)
    if l1 and l2:
        d = d + (c1 * np.sign(a) + c2 * a)
    elif l1:
        d = d + c1 * np.sign(a)
    else:
        d = d + c2 * a
    if act != contract.ACT_LINEAR:
        d = d * activation_grad(pre if from_input else a, act, slope)
    return d.astype(out.dtype, copy=False), activity_value(a, l1, l2) / n


# ---------------------------------------------------------------- a part's input transform
def input_dropout(x, out, threshold, scale, seed, step, layer, noise=contract.NOISE_NONE,
                  noise_std=0.0, row0=0):
    """out = dropout(noise(x)) on a part's input (standalone Dropout / GaussianNoise /
    GaussianDropout layers before its first Dense); noise on stream STREAM_INPUT_NOISE.
    AlphaDropout (NOISE_ALPHA) takes the input-dropout mask, threshold and scale, and its
    shift in noise_std. Applied to a gradient (out = x allowed) it is its own backward for
    GaussianDropout's factor and the mask (additive noise and AlphaDropout's shift pass the
    gradient unchanged: pass NOISE_NONE). row0: output_epilogue's."""
    if noise == contract.NOISE_ALPHA:
        out[...] = alpha_dropout(x, threshold, scale, noise_std, seed, step, layer,
                                 contract.STREAM_INPUT_DROPOUT, row0)
        return
    v = apply_noise(x, noise, noise_std, seed, step, layer, contract.STREAM_INPUT_NOISE, row0)
    if threshold > 0:
        keep = row_keep_mask(x.shape, threshold, seed, step, layer,
                             contract.STREAM_INPUT_DROPOUT, row0)
        v = np.where(keep, v * x.dtype.type(scale), x.dtype.type(0))
    out[...] = v
