"""The Numba dense layer with BatchNorm (twin of kernels/reference/batchnorm.py), pass for
pass. Column statistics run over column chunks, each column summed in row order in float64
by one thread (the same sums for any thread count, and the reference's order); elementwise
passes over rows / elements. Training only: inference folds BatchNorm into W, b.

Shape legend: B batch rows, I fan_in, O fan_out. Layouts of gb, stats, save:
kernels/contract.py (BN_*).
"""
import math

import numpy as np
from numba import prange

from .. import contract
from ..contract import PARALLEL_MIN_ELEMENTS
from .activation import FROM_INPUT, activate
from .dense import npdot
from .epilogue import (COL_CHUNK, ELEM_CHUNK, ROW_CHUNK, activity_grads, fill_output_words,
                       keeps_f, output_grad_range, output_grads_parallel, output_range)
from .jit import kernel, kernel_inline, kernel_parallel, specialized


@kernel
def _bn_stats_cols(out, b, save, eps, c0, c1):
    """Columns [c0, c1): z += b in place; batch mean, biased variance (float64, two passes)
    and inv_std = 1 / sqrt(var + eps) rounded to the dtype, into save."""
    B = out.shape[0]
    dt = out.dtype.type
    has_bias = b.shape[0] > 0
    for j in range(c0, c1):
        save[contract.BN_SAVE_MEAN, j] = 0.0
        save[contract.BN_SAVE_VAR, j] = 0.0
    for i in range(B):
        row = out[i]
        if has_bias:
            for j in range(c0, c1):
                row[j] = row[j] + b[j]
        for j in range(c0, c1):
            save[contract.BN_SAVE_MEAN, j] += np.float64(row[j])
    for j in range(c0, c1):
        save[contract.BN_SAVE_MEAN, j] = save[contract.BN_SAVE_MEAN, j] / B
    for i in range(B):
        row = out[i]
        for j in range(c0, c1):
            d = np.float64(row[j]) - save[contract.BN_SAVE_MEAN, j]
            save[contract.BN_SAVE_VAR, j] += d * d
    for j in range(c0, c1):
        var = save[contract.BN_SAVE_VAR, j] / B
        save[contract.BN_SAVE_VAR, j] = var
        save[contract.BN_SAVE_INVSTD, j] = np.float64(dt(1.0 / math.sqrt(var + eps)))


@kernel_inline
def _bn_act_loop(out, xhat, gb, save, pre, slope, r0, r1, act):
    """Rows [r0, r1): zhat = (z - mean) * inv_std -> xhat, out = f(gamma * zhat + beta); an
    activation whose f' needs its input keeps gamma * zhat + beta in pre."""
    O = out.shape[1]
    dt = out.dtype.type
    for i in range(r0, r1):
        row = out[i]
        xr = xhat[i]
        for j in range(O):
            xh = (row[j] - dt(save[contract.BN_SAVE_MEAN, j])) * \
                dt(save[contract.BN_SAVE_INVSTD, j])
            xr[j] = xh
            y = gb[contract.BN_GAMMA, j] * xh + gb[contract.BN_BETA, j]
            if FROM_INPUT[act]:
                pre[i, j] = y
            row[j] = activate(y, act, slope)


bn_act_rows = specialized(_bn_act_loop)


@kernel_parallel
def _bn_forward_epilogue_parallel(uses, out, b, xhat, gb, save, act, slope, thr, scale, eps,
                                  words, noise, nstd, pre, nwords):
    B, O = out.shape
    n = B * O
    n_cchunks = (O + COL_CHUNK - 1) // COL_CHUNK
    for c in prange(n_cchunks):
        _bn_stats_cols(out, b, save, eps, c * COL_CHUNK, min(O, (c + 1) * COL_CHUNK))
    n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        bn_act_rows(uses, act, out, xhat, gb, save, pre, slope, c * ROW_CHUNK,
                    min(B, (c + 1) * ROW_CHUNK))
    if noise != contract.NOISE_NONE or thr > 0:
        flat = out.reshape(n)
        pf = pre.reshape(pre.size)
        keep_f = keeps_f(pre, act)
        n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
        for c in prange(n_chunks):
            output_range(flat, pf, keep_f, nwords, noise, nstd, words, thr, scale,
                         c * ELEM_CHUNK, min(n, (c + 1) * ELEM_CHUNK))


@kernel
def _bn_forward_epilogue(uses, par, out, b, xhat, gb, save, act, slope, thr, scale, eps,
                         words, noise, nstd, pre, nwords):
    """Bias, batch statistics, normalize + scale/shift + activation, noise, dropout."""
    if par is not None:
        if out.size >= PARALLEL_MIN_ELEMENTS:
            _bn_forward_epilogue_parallel(uses, out, b, xhat, gb, save, act, slope, thr, scale,
                                          eps, words, noise, nstd, pre, nwords)
            return
    _bn_stats_cols(out, b, save, eps, 0, out.shape[1])
    bn_act_rows(uses, act, out, xhat, gb, save, pre, slope, 0, out.shape[0])
    n = out.size
    output_range(out.reshape(n), pre.reshape(pre.size), keeps_f(pre, act), nwords, noise,
                 nstd, words, thr, scale, 0, n)


@kernel
def bn_dense_forward(uses, par, x, W, b, out, xhat, gb, save, act, slope, thr, scale, eps, k0,
                     k1, step, layer, words, noise, nstd, pre, nwords):
    """out = dropout(noise(f(gamma * zhat + beta))); pre = what f' needs when pre is not
    empty (f(gamma * zhat + beta) before the noise, or its input for an input-derivable f)."""
    npdot(x, W, out)
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, False, 0)
    _bn_forward_epilogue(uses, par, out, b, xhat, gb, save, act, slope, thr, scale, eps, words,
                         noise, nstd, pre, nwords)


@kernel
def _bn_sums_cols(dy, xhat, gb, save, dgb, db, c0, c1):
    """Columns [c0, c1): dbeta = sum dy, dgamma = sum dy * zhat (float64, row order) into dgb;
    then the coefficients c1 = gamma * inv_std, c2 = dbeta / B, c3 = dgamma / B (rounded to
    the dtype, kept in save as float64); db = 0."""
    B = dy.shape[0]
    dt = dy.dtype.type
    for j in range(c0, c1):
        save[contract.BN_SAVE_C1, j] = 0.0
        save[contract.BN_SAVE_C2, j] = 0.0
    for i in range(B):
        for j in range(c0, c1):
            d = np.float64(dy[i, j])
            save[contract.BN_SAVE_C1, j] += d
            save[contract.BN_SAVE_C2, j] += d * np.float64(xhat[i, j])
    for j in range(c0, c1):
        s1 = save[contract.BN_SAVE_C1, j]
        s2 = save[contract.BN_SAVE_C2, j]
        dgb[contract.BN_GAMMA, j] = s2
        dgb[contract.BN_BETA, j] = s1
        save[contract.BN_SAVE_C1, j] = np.float64(dt(np.float64(gb[contract.BN_GAMMA, j])
                                                     * save[contract.BN_SAVE_INVSTD, j]))
        save[contract.BN_SAVE_C2, j] = np.float64(dt(s1 / B))
        save[contract.BN_SAVE_C3, j] = np.float64(dt(s2 / B))
        if db.shape[0] > 0:
            db[j] = 0


@kernel
def _bn_dz_rows(grad, xhat, save, r0, r1):
    """Rows [r0, r1): dz = c1 * ((dy - c2) - zhat * c3) in place."""
    O = grad.shape[1]
    dt = grad.dtype.type
    for i in range(r0, r1):
        g = grad[i]
        xr = xhat[i]
        for j in range(O):
            g[j] = dt(save[contract.BN_SAVE_C1, j]) * ((g[j] - dt(save[contract.BN_SAVE_C2, j]))
                                                       - xr[j] * dt(save[contract.BN_SAVE_C3, j]))


@kernel_parallel
def _bn_stats_parallel(grad, xhat, gb, save, db, dgb):
    """The column sums and dz of _bn_backward_epilogue_parallel, once dy is in grad."""
    B, O = grad.shape
    n_cchunks = (O + COL_CHUNK - 1) // COL_CHUNK
    for c in prange(n_cchunks):
        _bn_sums_cols(grad, xhat, gb, save, dgb, db, c * COL_CHUNK,
                      min(O, (c + 1) * COL_CHUNK))
    n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        _bn_dz_rows(grad, xhat, save, c * ROW_CHUNK, min(B, (c + 1) * ROW_CHUNK))


@kernel_parallel
def _bn_backward_epilogue_parallel(uses, grad, out, xhat, gb, save, db, dgb, act, slope, thr,
                                   scale, words, noise, nstd, pre, nwords):
    output_grads_parallel(uses, grad, out, act, slope, thr, scale, words, noise, nstd, pre,
                          nwords)
    _bn_stats_parallel(grad, xhat, gb, save, db, dgb)


@kernel
def _bn_backward_epilogue(uses, par, grad, out, xhat, gb, save, db, dgb, act, slope, thr,
                          scale, words, noise, nstd, pre, nwords, activity):
    """dy (mask and noise factor regenerated, f' from the output or from pre; with an
    activity penalty, epilogue.activity_grads), the gamma/beta gradients, dz in place.
    Returns the activity pass's (sum |a|, sum a^2), (0, 0) without one."""
    if activity is not None:
        sums = activity_grads(uses, par, grad, out, act, slope, thr, scale, words, noise,
                              nstd, pre, nwords, activity)
        if par is not None and grad.size >= PARALLEL_MIN_ELEMENTS:
            _bn_stats_parallel(grad, xhat, gb, save, db, dgb)
        elif grad.size > 0:
            _bn_sums_cols(grad, xhat, gb, save, dgb, db, 0, grad.shape[1])
            _bn_dz_rows(grad, xhat, save, 0, grad.shape[0])
        return sums
    _bn_plain_backward_epilogue(uses, par, grad, out, xhat, gb, save, db, dgb, act, slope,
                                thr, scale, words, noise, nstd, pre, nwords)
    return 0.0, 0.0


@kernel
def _bn_plain_backward_epilogue(uses, par, grad, out, xhat, gb, save, db, dgb, act, slope,
                                thr, scale, words, noise, nstd, pre, nwords):
    if par is not None:
        if grad.size >= PARALLEL_MIN_ELEMENTS:
            _bn_backward_epilogue_parallel(uses, grad, out, xhat, gb, save, db, dgb, act,
                                           slope, thr, scale, words, noise, nstd, pre, nwords)
            return
    n = grad.size
    if n == 0:
        return
    output_grad_range(uses, grad.reshape(n), out.reshape(n), pre.reshape(pre.size), nwords,
                      noise, nstd, words, thr, scale, act, slope, 0, n)
    _bn_sums_cols(grad, xhat, gb, save, dgb, db, 0, grad.shape[1])
    _bn_dz_rows(grad, xhat, save, 0, grad.shape[0])


@kernel
def _bn_running_update(stats, save, momentum):
    """stats = momentum * stats + (1 - momentum) * (batch mean, biased batch variance)."""
    rest = 1.0 - momentum
    for j in range(stats.shape[1]):
        stats[contract.BN_MEAN, j] = (momentum * np.float64(stats[contract.BN_MEAN, j])
                                      + rest * save[contract.BN_SAVE_MEAN, j])
        stats[contract.BN_VAR, j] = (momentum * np.float64(stats[contract.BN_VAR, j])
                                     + rest * save[contract.BN_SAVE_VAR, j])


@kernel
def bn_dense_backward(uses, par, grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act,
                      slope, thr, scale, momentum, k0, k1, step, layer, words, noise, nstd,
                      pre, nwords, activity):
    """grad: dL/d(out) in, dL/dz out; dgb, dW, db (= 0), dx; then the running statistics.
    activity as in dense.dense_backward; returns its (sum |a|, sum a^2)."""
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, True, 0)
    sums = _bn_backward_epilogue(uses, par, grad, out, xhat, gb, save, db, dgb, act, slope,
                                 thr, scale, words, noise, nstd, pre, nwords, activity)
    npdot(x.T, grad, dW)
    if dx.size > 0:
        npdot(grad, W.T, dx)
    _bn_running_update(stats, save, momentum)
    return sums
