"""The Numba CPU backend: the kernel contract as @njit functions, and one compiled epoch.

Shape legend: B batch rows, I fan_in, O fan_out, K outputs, G Philox groups (4 words each).

Design:
- Random bits for a layer are made by ``philox_fill`` into a (4, G) word buffer: a branch-free
  loop over groups that LLVM vectorises (about 7x the scalar loop). Element e of a (B, O)
  matrix reads word ``words[e & 3, e >> 2]``, the bits DESIGN.md fixes.
- Forward epilogue (bias, activation, then noise and dropout) is one pass over rows and, with
  noise or dropout, one over elements; backward epilogue (mask and GaussianDropout factor
  regenerated, f' from the stored output, or from the kept pre-noise f(z) with noise, bias
  gradient) is one pass over column blocks, so each
  bias sum runs in row order on one thread: the result is the same for any thread count.
- GEMMs are ``np.dot(a, b, out)``: BLAS sgemm/dgemm, transposes passed as flags, no copies.
- ``_train_epoch`` runs a whole epoch in one call: no Python per step, layer or element, and
  nothing allocated inside.
"""
import math

import numpy as np
from numba import njit, prange
from numba.core import event as _numba_event
from numba.typed import List

from . import compile_notice, contract as C
from . import driver, threads
from .config import JIT, JIT_PARALLEL, PARALLEL_MIN_ELEMENTS
from .philox import (MASK32, STREAM_DROPOUT, STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE,
                     STREAM_NOISE, TWO_PI, split_seed)
from .reference import update_coefficients as _coefficients_py  # noqa: F401  (documented twin)

compile_notice.install(_numba_event, "Numba")

COEF_SIZE = 16   # the update's scalars (coef[0..15]); the group prox's column scales follow

NAME = "numba"
# Work split of the parallel passes: fixed sizes (not derived from the thread count), so the
# partition, and with it every rounding, is the same whatever NUMBA_NUM_THREADS is.
_GROUP_CHUNK = 4096   # Philox groups per parallel task
_ROW_CHUNK = 16       # rows per task in the forward epilogue and the update
_COL_CHUNK = 64       # columns per task in the bias gradient (each bias sum on one thread)
_UPDATE_CHUNK = 8192  # elements per task in the update and its penalty partial sums
_ELEM_CHUNK = 4 * _GROUP_CHUNK  # elements per task in the mask and dz passes


# ---------------------------------------------------------------- Philox words
@njit(**JIT)
def _philox_groups(words, g_lo, g_hi, k0, k1, step, layer, stream):
    """words[:, g] = Philox((g, step, layer, stream), (k0, k1)) for g in [g_lo, g_hi)."""
    mask = np.uint64(MASK32)
    s32 = np.uint64(32)
    for g in range(g_lo, g_hi):
        c0 = np.uint64(g)
        c1 = np.uint64(step) & mask
        c2 = np.uint64(layer) & mask
        c3 = np.uint64(stream) & mask
        a0 = np.uint64(k0)
        a1 = np.uint64(k1)
        for _ in range(10):
            p0 = np.uint64(0xD2511F53) * c0
            p1 = np.uint64(0xCD9E8D57) * c2
            n0 = ((p1 >> s32) ^ c1 ^ a0) & mask
            n2 = ((p0 >> s32) ^ c3 ^ a1) & mask
            c1 = p1 & mask
            c3 = p0 & mask
            c0 = n0
            c2 = n2
            a0 = (a0 + np.uint64(0x9E3779B9)) & mask
            a1 = (a1 + np.uint64(0xBB67AE85)) & mask
        words[0, g] = np.uint32(c0)
        words[1, g] = np.uint32(c1)
        words[2, g] = np.uint32(c2)
        words[3, g] = np.uint32(c3)


@njit(**JIT_PARALLEL)
def _philox_fill_parallel(words, n_groups, k0, k1, step, layer, stream):
    n_chunks = (n_groups + _GROUP_CHUNK - 1) // _GROUP_CHUNK
    for c in prange(n_chunks):
        lo = c * _GROUP_CHUNK
        _philox_groups(words, lo, min(lo + _GROUP_CHUNK, n_groups), k0, k1, step, layer, stream)


@njit(**JIT)
def philox_fill(words, n_elements, k0, k1, step, layer, stream):
    """Words for elements 0..n_elements-1 of one (seed, step, layer, stream) sequence."""
    n_groups = (n_elements + 3) // 4
    if n_elements >= PARALLEL_MIN_ELEMENTS:
        _philox_fill_parallel(words, n_groups, k0, k1, step, layer, stream)
    else:
        _philox_groups(words, 0, n_groups, k0, k1, step, layer, stream)


# ---------------------------------------------------------------- activations
@njit(inline="always", **JIT)
def _activate(z, act, slope):
    if act == C.ACT_RELU:
        return z if z > 0 else type(z)(0)
    if act == C.ACT_LEAKY_RELU:
        return z if z > 0 else z * slope
    if act == C.ACT_TANH:
        return np.tanh(z)
    if act == C.ACT_SIGMOID:
        if z >= 0:
            return 1 / (1 + np.exp(-z))
        e = np.exp(z)
        return e / (1 + e)
    return z


@njit(inline="always", **JIT)
def _activation_grad(a, act, slope):
    """f'(z) from a = f(z)."""
    one = type(a)(1)
    if act == C.ACT_RELU:
        return one if a > 0 else type(a)(0)
    if act == C.ACT_LEAKY_RELU:
        return one if a > 0 else slope
    if act == C.ACT_TANH:
        return one - a * a
    if act == C.ACT_SIGMOID:
        return a * (one - a)
    return one


# Loops below are written once and inlined (inline="always") into a dispatcher that passes the
# activation code as a constant: LLVM then drops the branches and vectorises each variant.
@njit(inline="always", **JIT)
def _bias_act_loop(out, b, act, slope, r0, r1):
    O = out.shape[1]
    has_bias = b.shape[0] > 0
    for i in range(r0, r1):
        row = out[i]
        if has_bias:
            for j in range(O):
                row[j] = _activate(row[j] + b[j], act, slope)
        else:
            for j in range(O):
                row[j] = _activate(row[j], act, slope)


@njit(**JIT)
def _bias_act_rows(out, b, act, slope, r0, r1):
    if act == C.ACT_RELU:
        _bias_act_loop(out, b, C.ACT_RELU, slope, r0, r1)
    elif act == C.ACT_LEAKY_RELU:
        _bias_act_loop(out, b, C.ACT_LEAKY_RELU, slope, r0, r1)
    elif act == C.ACT_TANH:
        _bias_act_loop(out, b, C.ACT_TANH, slope, r0, r1)
    elif act == C.ACT_SIGMOID:
        _bias_act_loop(out, b, C.ACT_SIGMOID, slope, r0, r1)
    else:
        _bias_act_loop(out, b, C.ACT_LINEAR, slope, r0, r1)


@njit(**JIT)
def _mask_range(flat, words, thr, scale, e_lo, e_hi):
    """flat[e] *= scale if kept else 0, for e in [e_lo, e_hi); words indexed by absolute group.

    Whole groups of 4 in the middle (the vectorised loop), odd elements at either end."""
    zero = flat.dtype.type(0)
    t = np.uint32(thr)
    g_lo = (e_lo + 3) // 4
    g_hi = max(g_lo, e_hi // 4)
    for e in range(e_lo, min(4 * g_lo, e_hi)):
        flat[e] = flat[e] * (scale if words[e & 3, e >> 2] >= t else zero)
    for g in range(g_lo, g_hi):
        e = 4 * g
        flat[e] = flat[e] * (scale if words[0, g] >= t else zero)
        flat[e + 1] = flat[e + 1] * (scale if words[1, g] >= t else zero)
        flat[e + 2] = flat[e + 2] * (scale if words[2, g] >= t else zero)
        flat[e + 3] = flat[e + 3] * (scale if words[3, g] >= t else zero)
    for e in range(max(4 * g_hi, e_lo), e_hi):
        flat[e] = flat[e] * (scale if words[e & 3, e >> 2] >= t else zero)


@njit(inline="always", **JIT)
def _dz_one(gf, of, words, t, scale, act, slope, recover, e, q, g, zero):
    a = of[e] / scale if recover else of[e]
    dz = (gf[e] * scale) * _activation_grad(a, act, slope)
    gf[e] = dz if words[q, g] >= t else zero


@njit(inline="always", **JIT)
def _dz_loop(gf, of, words, thr, scale, act, slope, recover, e_lo, e_hi):
    """gf[e] <- (gf[e] * scale) * f'(a) if kept else 0, a from the stored output of[e]."""
    zero = gf.dtype.type(0)
    t = np.uint32(thr)
    g_lo = (e_lo + 3) // 4
    g_hi = max(g_lo, e_hi // 4)
    for e in range(e_lo, min(4 * g_lo, e_hi)):
        _dz_one(gf, of, words, t, scale, act, slope, recover, e, e & 3, e >> 2, zero)
    for g in range(g_lo, g_hi):
        for q in range(4):
            _dz_one(gf, of, words, t, scale, act, slope, recover, 4 * g + q, q, g, zero)
    for e in range(max(4 * g_hi, e_lo), e_hi):
        _dz_one(gf, of, words, t, scale, act, slope, recover, e, e & 3, e >> 2, zero)


@njit(inline="always", **JIT)
def _dz_plain_loop(gf, of, act, slope, lo, hi):
    for e in range(lo, hi):
        gf[e] = gf[e] * _activation_grad(of[e], act, slope)


@njit(**JIT)
def _dz_range(gf, of, words, thr, scale, act, slope, lo, hi):
    """dL/dz in place for the flat elements [lo, hi)."""
    if thr == 0:
        if act == C.ACT_RELU:
            _dz_plain_loop(gf, of, C.ACT_RELU, slope, lo, hi)
        elif act == C.ACT_LEAKY_RELU:
            _dz_plain_loop(gf, of, C.ACT_LEAKY_RELU, slope, lo, hi)
        elif act == C.ACT_TANH:
            _dz_plain_loop(gf, of, C.ACT_TANH, slope, lo, hi)
        elif act == C.ACT_SIGMOID:
            _dz_plain_loop(gf, of, C.ACT_SIGMOID, slope, lo, hi)
        return
    if act == C.ACT_RELU:
        _dz_loop(gf, of, words, thr, scale, C.ACT_RELU, slope, False, lo, hi)
    elif act == C.ACT_LEAKY_RELU:
        _dz_loop(gf, of, words, thr, scale, C.ACT_LEAKY_RELU, slope, False, lo, hi)
    elif act == C.ACT_TANH:
        _dz_loop(gf, of, words, thr, scale, C.ACT_TANH, slope, True, lo, hi)
    elif act == C.ACT_SIGMOID:
        _dz_loop(gf, of, words, thr, scale, C.ACT_SIGMOID, slope, True, lo, hi)
    else:
        _dz_loop(gf, of, words, thr, scale, C.ACT_LINEAR, slope, False, lo, hi)


@njit(**JIT)
def _bias_grad_cols(dz, db, c0, c1):
    """db[j] = sum_i dz[i, j] in row order (the same order numpy's sum(axis=0) uses)."""
    for j in range(c0, c1):
        db[j] = dz[0, j]
    for i in range(1, dz.shape[0]):
        row = dz[i]
        for j in range(c0, c1):
            db[j] += row[j]


# ---------------------------------------------------------------- Gaussian noise
# Noise words sit in their own (4, G) buffer `nwords` (stream STREAM_NOISE, or
# STREAM_INPUT_NOISE on the inputs), next to the dropout words, so that noise and mask are
# applied in one pass. Element e's normal is Box-Muller on its word pair (philox.py's
# standard_normals, element by element).
@njit(**JIT)
def normal_from_words(w_radius, w_angle, odd):
    """The Box-Muller normal of one element from its pair of words (float64)."""
    u1 = (np.float64(w_radius) + 0.5) * (1.0 / 4294967296.0)
    u2 = (np.float64(w_angle) + 0.5) * (1.0 / 4294967296.0)
    r = math.sqrt(-2.0 * math.log(u1))
    t = TWO_PI * u2
    return r * math.sin(t) if odd else r * math.cos(t)


@njit(inline="always", **JIT)
def _normal(nwords, e):
    g = e >> 2
    q = e & 3
    p = q & 2
    return normal_from_words(nwords[p, g], nwords[p + 1, g], (q & 1) == 1)


@njit(inline="always", **JIT)
def _normal_pair(nwords, p):
    """The normals of elements p and p + 1 (p even): normal_from_words' formula with the
    radius computed once (the same values, half the log / sqrt calls)."""
    g = p >> 2
    q = p & 3
    u1 = (np.float64(nwords[q, g]) + 0.5) * (1.0 / 4294967296.0)
    u2 = (np.float64(nwords[q + 1, g]) + 0.5) * (1.0 / 4294967296.0)
    r = math.sqrt(-2.0 * math.log(u1))
    t = TWO_PI * u2
    return r * math.cos(t), r * math.sin(t)


@njit(inline="always", **JIT)
def _noisy(v, noise, std, nrm):
    """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n) (n already in v's dtype)."""
    if noise == C.NOISE_ADD:
        return v + std * nrm
    return v * (type(v)(1) + std * nrm)


@njit(inline="always", **JIT)
def _noise_one(flat, pre, has_pre, e, nrm, noise, std, words, t, thr, scale, zero):
    v = flat[e]
    if has_pre:
        pre[e] = v
    v = _noisy(v, noise, std, flat.dtype.type(nrm))
    if thr > 0:
        v = v * scale if words[e & 3, e >> 2] >= t else zero
    flat[e] = v


@njit(**JIT)
def _noise_range(flat, pre, nwords, noise, std, words, thr, scale, e_lo, e_hi):
    """flat[e] <- dropout(noise(flat[e])) for e in [e_lo, e_hi); pre[e] <- flat[e] (the
    pre-noise value backward needs) first when pre is not empty. Whole Box-Muller pairs in
    the middle, a lone element at either end."""
    has_pre = pre.shape[0] > 0
    zero = flat.dtype.type(0)
    t = np.uint32(thr)
    e = e_lo
    if e & 1 and e < e_hi:
        _noise_one(flat, pre, has_pre, e, _normal(nwords, e), noise, std, words, t, thr, scale,
                   zero)
        e += 1
    while e + 1 < e_hi:
        c, s = _normal_pair(nwords, e)
        _noise_one(flat, pre, has_pre, e, c, noise, std, words, t, thr, scale, zero)
        _noise_one(flat, pre, has_pre, e + 1, s, noise, std, words, t, thr, scale, zero)
        e += 2
    if e < e_hi:
        _noise_one(flat, pre, has_pre, e, _normal(nwords, e), noise, std, words, t, thr, scale,
                   zero)


@njit(**JIT_PARALLEL)
def _noise_parallel(flat, pre, nwords, noise, std, words, thr, scale):
    n = flat.shape[0]
    n_chunks = (n + _ELEM_CHUNK - 1) // _ELEM_CHUNK
    for c in prange(n_chunks):
        _noise_range(flat, pre, nwords, noise, std, words, thr, scale, c * _ELEM_CHUNK,
                     min(n, (c + 1) * _ELEM_CHUNK))


@njit(**JIT)
def _noise_pass(flat, pre, nwords, noise, std, words, thr, scale):
    if flat.shape[0] >= PARALLEL_MIN_ELEMENTS:
        _noise_parallel(flat, pre, nwords, noise, std, words, thr, scale)
    else:
        _noise_range(flat, pre, nwords, noise, std, words, thr, scale, 0, flat.shape[0])


@njit(inline="always", **JIT)
def _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one):
    d = gf[e]
    if thr > 0:
        d = d * scale
    if noise == C.NOISE_MUL:
        d = d * (one + std * gf.dtype.type(nrm))
    if act != C.ACT_LINEAR:
        d = d * _activation_grad(pf[e], act, slope)
    if thr > 0 and words[e & 3, e >> 2] < t:
        d = zero
    gf[e] = d


@njit(inline="always", **JIT)
def _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, act, slope, lo, hi):
    """gf[e] <- ((g * scale) * (1 + std * n)) * f'(pre) if kept else 0 (reference order; the
    scale only with dropout, the factor only for NOISE_MUL, f' only for a nonlinear f)."""
    zero = gf.dtype.type(0)
    one = gf.dtype.type(1)
    t = np.uint32(thr)
    mul = noise == C.NOISE_MUL
    e = lo
    if e & 1 and e < hi:
        nrm = _normal(nwords, e) if mul else 0.0
        _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one)
        e += 1
    while e + 1 < hi:
        c, s = _normal_pair(nwords, e) if mul else (0.0, 0.0)
        _dz_noise_one(gf, pf, e, c, noise, std, words, t, thr, scale, act, slope, zero, one)
        _dz_noise_one(gf, pf, e + 1, s, noise, std, words, t, thr, scale, act, slope, zero, one)
        e += 2
    if e < hi:
        nrm = _normal(nwords, e) if mul else 0.0
        _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one)


@njit(**JIT)
def _dz_noise_range(gf, pf, nwords, noise, std, words, thr, scale, act, slope, lo, hi):
    if act == C.ACT_RELU:
        _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, C.ACT_RELU, slope, lo, hi)
    elif act == C.ACT_LEAKY_RELU:
        _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, C.ACT_LEAKY_RELU, slope,
                       lo, hi)
    elif act == C.ACT_TANH:
        _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, C.ACT_TANH, slope, lo, hi)
    elif act == C.ACT_SIGMOID:
        _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, C.ACT_SIGMOID, slope,
                       lo, hi)
    else:
        _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, C.ACT_LINEAR, slope,
                       lo, hi)


# The part of the epilogues after (forward) / before (backward) the activation, shared by the
# plain and the BatchNorm dense layers: noise and dropout on the flat elements [lo, hi).
@njit(**JIT)
def _output_range(flat, pf, nwords, noise, nstd, words, thr, scale, lo, hi):
    """flat <- dropout(noise(flat)) in place (pf <- the pre-noise values, when not empty)."""
    if noise != C.NOISE_NONE:
        _noise_range(flat, pf, nwords, noise, nstd, words, thr, scale, lo, hi)
    elif thr > 0:
        _mask_range(flat, words, thr, scale, lo, hi)


@njit(**JIT)
def _output_grad_range(gf, of, pf, nwords, noise, nstd, words, thr, scale, act, slope, lo, hi):
    """gf <- dL/d(f's input) from dL/d(out) in place: mask and noise factor regenerated, f'
    from the output of, or from the pre-noise pf with noise."""
    if noise != C.NOISE_NONE:
        _dz_noise_range(gf, pf, nwords, noise, nstd, words, thr, scale, act, slope, lo, hi)
    else:
        _dz_range(gf, of, words, thr, scale, act, slope, lo, hi)


@njit(**JIT)
def _fill_output_words(words, nwords, n, k0, k1, step, layer, thr, noise, backward):
    """The dropout words (with dropout) and the noise words (forward: with noise; backward:
    with GaussianDropout only, additive noise leaves no trace in the gradient) of a layer."""
    if thr > 0:
        philox_fill(words, n, k0, k1, step, layer, STREAM_DROPOUT)
    if noise == C.NOISE_MUL or (noise != C.NOISE_NONE and not backward):
        philox_fill(nwords, n, k0, k1, step, layer, STREAM_NOISE)


# ---------------------------------------------------------------- dense forward
@njit(**JIT_PARALLEL)
def _forward_epilogue_parallel(out, b, act, slope, thr, scale, words, noise, nstd, pre,
                               nwords):
    B, O = out.shape
    n = B * O
    flat = out.reshape(n)
    n_chunks = (B + _ROW_CHUNK - 1) // _ROW_CHUNK
    for c in prange(n_chunks):
        _bias_act_rows(out, b, act, slope, c * _ROW_CHUNK, min(B, (c + 1) * _ROW_CHUNK))
    if noise != C.NOISE_NONE or thr > 0:
        pf = pre.reshape(pre.size)
        n_chunks = (n + _ELEM_CHUNK - 1) // _ELEM_CHUNK
        for c in prange(n_chunks):
            _output_range(flat, pf, nwords, noise, nstd, words, thr, scale, c * _ELEM_CHUNK,
                          min(n, (c + 1) * _ELEM_CHUNK))


@njit(**JIT)
def _forward_epilogue(out, b, act, slope, thr, scale, words, noise, nstd, pre, nwords):
    """Bias, activation, noise, dropout: a pass over rows, then one over elements (noise and
    mask together) when there is noise or dropout."""
    if out.size >= PARALLEL_MIN_ELEMENTS:
        _forward_epilogue_parallel(out, b, act, slope, thr, scale, words, noise, nstd, pre,
                                   nwords)
        return
    _bias_act_rows(out, b, act, slope, 0, out.shape[0])
    n = out.size
    _output_range(out.reshape(n), pre.reshape(pre.size), nwords, noise, nstd, words, thr, scale,
                  0, n)


@njit(**JIT)
def _dense_forward(x, W, b, out, act, slope, thr, scale, k0, k1, step, layer, words, noise,
                   nstd, pre, nwords):
    """out = dropout(noise(f(x @ W + b))); pre = f(x @ W + b) when pre is not empty."""
    np.dot(x, W, out)
    _fill_output_words(words, nwords, out.size, k0, k1, step, layer, thr, noise, False)
    _forward_epilogue(out, b, act, slope, thr, scale, words, noise, nstd, pre, nwords)


# ---------------------------------------------------------------- dense backward
@njit(**JIT_PARALLEL)
def _output_grads_parallel(grad, out, act, slope, thr, scale, words, noise, nstd, pre, nwords):
    """dL/d(out) -> dL/d(activation input) in place over every element, in parallel chunks
    (_output_grad_range): the element pass of the plain and the BatchNorm backward."""
    n = grad.size
    gf = grad.reshape(n)
    of = out.reshape(n)
    pf = pre.reshape(pre.size)
    n_chunks = (n + _ELEM_CHUNK - 1) // _ELEM_CHUNK
    for c in prange(n_chunks):
        _output_grad_range(gf, of, pf, nwords, noise, nstd, words, thr, scale, act, slope,
                           c * _ELEM_CHUNK, min(n, (c + 1) * _ELEM_CHUNK))


@njit(**JIT_PARALLEL)
def _backward_epilogue_parallel(grad, out, db, act, slope, thr, scale, words, noise, nstd, pre,
                                nwords):
    O = grad.shape[1]
    _output_grads_parallel(grad, out, act, slope, thr, scale, words, noise, nstd, pre, nwords)
    if db.shape[0] > 0:
        n_cchunks = (O + _COL_CHUNK - 1) // _COL_CHUNK
        for c in prange(n_cchunks):
            _bias_grad_cols(grad, db, c * _COL_CHUNK, min(O, (c + 1) * _COL_CHUNK))


@njit(**JIT)
def _backward_epilogue(grad, out, db, act, slope, thr, scale, words, noise, nstd, pre, nwords):
    """dL/dz in place (mask and noise regenerated, f' from the output, or from pre with
    noise), then the bias gradient."""
    if grad.size >= PARALLEL_MIN_ELEMENTS:
        _backward_epilogue_parallel(grad, out, db, act, slope, thr, scale, words, noise, nstd,
                                    pre, nwords)
        return
    n = grad.size
    if n == 0:
        return
    _output_grad_range(grad.reshape(n), out.reshape(n), pre.reshape(pre.size), nwords, noise,
                       nstd, words, thr, scale, act, slope, 0, n)
    if db.shape[0] > 0:
        _bias_grad_cols(grad, db, 0, grad.shape[1])


@njit(**JIT)
def _dense_backward(grad, out, x, W, dW, db, dx, act, slope, thr, scale, k0, k1, step, layer,
                    words, noise, nstd, pre, nwords):
    _fill_output_words(words, nwords, out.size, k0, k1, step, layer, thr, noise, True)
    _backward_epilogue(grad, out, db, act, slope, thr, scale, words, noise, nstd, pre, nwords)
    np.dot(x.T, grad, dW)
    if dx.size > 0:
        np.dot(grad, W.T, dx)


# ---------------------------------------------------------------- dense + BatchNorm (training)
# reference.bn_dense_forward / bn_dense_backward, pass for pass. Column statistics run over
# column chunks, each column summed in row order in float64 by one thread (the same sums for
# any thread count, and the reference's order); elementwise passes over rows / elements.
@njit(**JIT)
def _bn_stats_cols(out, b, save, eps, c0, c1):
    """Columns [c0, c1): z += b in place; batch mean, biased variance (float64, two passes)
    and inv_std = 1 / sqrt(var + eps) rounded to the dtype, into save."""
    B = out.shape[0]
    dt = out.dtype.type
    has_bias = b.shape[0] > 0
    for j in range(c0, c1):
        save[C.BN_SAVE_MEAN, j] = 0.0
        save[C.BN_SAVE_VAR, j] = 0.0
    for i in range(B):
        row = out[i]
        if has_bias:
            for j in range(c0, c1):
                row[j] = row[j] + b[j]
        for j in range(c0, c1):
            save[C.BN_SAVE_MEAN, j] += np.float64(row[j])
    for j in range(c0, c1):
        save[C.BN_SAVE_MEAN, j] = save[C.BN_SAVE_MEAN, j] / B
    for i in range(B):
        row = out[i]
        for j in range(c0, c1):
            d = np.float64(row[j]) - save[C.BN_SAVE_MEAN, j]
            save[C.BN_SAVE_VAR, j] += d * d
    for j in range(c0, c1):
        var = save[C.BN_SAVE_VAR, j] / B
        save[C.BN_SAVE_VAR, j] = var
        save[C.BN_SAVE_INVSTD, j] = np.float64(dt(1.0 / math.sqrt(var + eps)))


@njit(inline="always", **JIT)
def _bn_act_loop(out, xhat, gb, save, act, slope, r0, r1):
    O = out.shape[1]
    dt = out.dtype.type
    for i in range(r0, r1):
        row = out[i]
        xr = xhat[i]
        for j in range(O):
            xh = (row[j] - dt(save[C.BN_SAVE_MEAN, j])) * dt(save[C.BN_SAVE_INVSTD, j])
            xr[j] = xh
            row[j] = _activate(gb[C.BN_GAMMA, j] * xh + gb[C.BN_BETA, j], act, slope)


@njit(**JIT)
def _bn_act_rows(out, xhat, gb, save, act, slope, r0, r1):
    """Rows [r0, r1): zhat = (z - mean) * inv_std -> xhat, out = f(gamma * zhat + beta)."""
    if act == C.ACT_RELU:
        _bn_act_loop(out, xhat, gb, save, C.ACT_RELU, slope, r0, r1)
    elif act == C.ACT_LEAKY_RELU:
        _bn_act_loop(out, xhat, gb, save, C.ACT_LEAKY_RELU, slope, r0, r1)
    elif act == C.ACT_TANH:
        _bn_act_loop(out, xhat, gb, save, C.ACT_TANH, slope, r0, r1)
    elif act == C.ACT_SIGMOID:
        _bn_act_loop(out, xhat, gb, save, C.ACT_SIGMOID, slope, r0, r1)
    else:
        _bn_act_loop(out, xhat, gb, save, C.ACT_LINEAR, slope, r0, r1)


@njit(**JIT_PARALLEL)
def _bn_forward_epilogue_parallel(out, b, xhat, gb, save, act, slope, thr, scale, eps, words,
                                  noise, nstd, pre, nwords):
    B, O = out.shape
    n = B * O
    n_cchunks = (O + _COL_CHUNK - 1) // _COL_CHUNK
    for c in prange(n_cchunks):
        _bn_stats_cols(out, b, save, eps, c * _COL_CHUNK, min(O, (c + 1) * _COL_CHUNK))
    n_chunks = (B + _ROW_CHUNK - 1) // _ROW_CHUNK
    for c in prange(n_chunks):
        _bn_act_rows(out, xhat, gb, save, act, slope, c * _ROW_CHUNK,
                     min(B, (c + 1) * _ROW_CHUNK))
    if noise != C.NOISE_NONE or thr > 0:
        flat = out.reshape(n)
        pf = pre.reshape(pre.size)
        n_chunks = (n + _ELEM_CHUNK - 1) // _ELEM_CHUNK
        for c in prange(n_chunks):
            _output_range(flat, pf, nwords, noise, nstd, words, thr, scale, c * _ELEM_CHUNK,
                          min(n, (c + 1) * _ELEM_CHUNK))


@njit(**JIT)
def _bn_forward_epilogue(out, b, xhat, gb, save, act, slope, thr, scale, eps, words, noise,
                         nstd, pre, nwords):
    """Bias, batch statistics, normalize + scale/shift + activation, noise, dropout."""
    if out.size >= PARALLEL_MIN_ELEMENTS:
        _bn_forward_epilogue_parallel(out, b, xhat, gb, save, act, slope, thr, scale, eps,
                                      words, noise, nstd, pre, nwords)
        return
    _bn_stats_cols(out, b, save, eps, 0, out.shape[1])
    _bn_act_rows(out, xhat, gb, save, act, slope, 0, out.shape[0])
    n = out.size
    _output_range(out.reshape(n), pre.reshape(pre.size), nwords, noise, nstd, words, thr, scale,
                  0, n)


@njit(**JIT)
def _bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, thr, scale, eps, k0, k1, step,
                      layer, words, noise, nstd, pre, nwords):
    """out = dropout(noise(f(gamma * zhat + beta))); pre = f(gamma * zhat + beta) when pre is
    not empty (noise and a nonlinear f)."""
    np.dot(x, W, out)
    _fill_output_words(words, nwords, out.size, k0, k1, step, layer, thr, noise, False)
    _bn_forward_epilogue(out, b, xhat, gb, save, act, slope, thr, scale, eps, words, noise,
                         nstd, pre, nwords)


@njit(**JIT)
def _bn_sums_cols(dy, xhat, gb, save, dgb, db, c0, c1):
    """Columns [c0, c1): dbeta = sum dy, dgamma = sum dy * zhat (float64, row order) into dgb;
    then the coefficients c1 = gamma * inv_std, c2 = dbeta / B, c3 = dgamma / B (rounded to
    the dtype, kept in save as float64); db = 0."""
    B = dy.shape[0]
    dt = dy.dtype.type
    for j in range(c0, c1):
        save[C.BN_SAVE_C1, j] = 0.0
        save[C.BN_SAVE_C2, j] = 0.0
    for i in range(B):
        for j in range(c0, c1):
            d = np.float64(dy[i, j])
            save[C.BN_SAVE_C1, j] += d
            save[C.BN_SAVE_C2, j] += d * np.float64(xhat[i, j])
    for j in range(c0, c1):
        s1 = save[C.BN_SAVE_C1, j]
        s2 = save[C.BN_SAVE_C2, j]
        dgb[C.BN_GAMMA, j] = s2
        dgb[C.BN_BETA, j] = s1
        save[C.BN_SAVE_C1, j] = np.float64(dt(np.float64(gb[C.BN_GAMMA, j])
                                              * save[C.BN_SAVE_INVSTD, j]))
        save[C.BN_SAVE_C2, j] = np.float64(dt(s1 / B))
        save[C.BN_SAVE_C3, j] = np.float64(dt(s2 / B))
        if db.shape[0] > 0:
            db[j] = 0


@njit(**JIT)
def _bn_dz_rows(grad, xhat, save, r0, r1):
    """Rows [r0, r1): dz = c1 * ((dy - c2) - zhat * c3) in place."""
    O = grad.shape[1]
    dt = grad.dtype.type
    for i in range(r0, r1):
        g = grad[i]
        xr = xhat[i]
        for j in range(O):
            g[j] = dt(save[C.BN_SAVE_C1, j]) * ((g[j] - dt(save[C.BN_SAVE_C2, j]))
                                                 - xr[j] * dt(save[C.BN_SAVE_C3, j]))


@njit(**JIT_PARALLEL)
def _bn_backward_epilogue_parallel(grad, out, xhat, gb, save, db, dgb, act, slope, thr, scale,
                                   words, noise, nstd, pre, nwords):
    B, O = grad.shape
    _output_grads_parallel(grad, out, act, slope, thr, scale, words, noise, nstd, pre, nwords)
    n_cchunks = (O + _COL_CHUNK - 1) // _COL_CHUNK
    for c in prange(n_cchunks):
        _bn_sums_cols(grad, xhat, gb, save, dgb, db, c * _COL_CHUNK,
                      min(O, (c + 1) * _COL_CHUNK))
    n_chunks = (B + _ROW_CHUNK - 1) // _ROW_CHUNK
    for c in prange(n_chunks):
        _bn_dz_rows(grad, xhat, save, c * _ROW_CHUNK, min(B, (c + 1) * _ROW_CHUNK))


@njit(**JIT)
def _bn_backward_epilogue(grad, out, xhat, gb, save, db, dgb, act, slope, thr, scale, words,
                          noise, nstd, pre, nwords):
    """dy (mask and noise factor regenerated, f' from the output or, with noise, from pre),
    the gamma/beta gradients, dz in place."""
    if grad.size >= PARALLEL_MIN_ELEMENTS:
        _bn_backward_epilogue_parallel(grad, out, xhat, gb, save, db, dgb, act, slope, thr,
                                       scale, words, noise, nstd, pre, nwords)
        return
    n = grad.size
    if n == 0:
        return
    _output_grad_range(grad.reshape(n), out.reshape(n), pre.reshape(pre.size), nwords, noise,
                       nstd, words, thr, scale, act, slope, 0, n)
    _bn_sums_cols(grad, xhat, gb, save, dgb, db, 0, grad.shape[1])
    _bn_dz_rows(grad, xhat, save, 0, grad.shape[0])


@njit(**JIT)
def _bn_running_update(stats, save, momentum):
    """stats = momentum * stats + (1 - momentum) * (batch mean, biased batch variance)."""
    rest = 1.0 - momentum
    for j in range(stats.shape[1]):
        stats[C.BN_MEAN, j] = (momentum * np.float64(stats[C.BN_MEAN, j])
                               + rest * save[C.BN_SAVE_MEAN, j])
        stats[C.BN_VAR, j] = (momentum * np.float64(stats[C.BN_VAR, j])
                              + rest * save[C.BN_SAVE_VAR, j])


@njit(**JIT)
def _bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                       thr, scale, momentum, k0, k1, step, layer, words, noise, nstd, pre,
                       nwords):
    _fill_output_words(words, nwords, out.size, k0, k1, step, layer, thr, noise, True)
    _bn_backward_epilogue(grad, out, xhat, gb, save, db, dgb, act, slope, thr, scale, words,
                          noise, nstd, pre, nwords)
    np.dot(x.T, grad, dW)
    if dx.size > 0:
        np.dot(grad, W.T, dx)
    _bn_running_update(stats, save, momentum)


# ---------------------------------------------------------------- input dropout
@njit(**JIT)
def _input_dropout(x, out, thr, scale, k0, k1, step, layer, words, noise, nstd, nwords):
    """out = dropout(noise(x)): streams STREAM_INPUT_NOISE and STREAM_INPUT_DROPOUT."""
    n = x.size
    if thr > 0:
        philox_fill(words, n, k0, k1, step, layer, STREAM_INPUT_DROPOUT)
    flat = out.reshape(n)
    flat[:] = x.reshape(n)
    if noise != C.NOISE_NONE:
        philox_fill(nwords, n, k0, k1, step, layer, STREAM_INPUT_NOISE)
        _noise_pass(flat, flat[:0], nwords, noise, nstd, words, thr, scale)
    elif thr > 0:
        _mask_range(flat, words, thr, scale, 0, n)


# ---------------------------------------------------------------- losses
@njit(**JIT)
def _loss_forward_backward(z, y, grad, loss, want_grad):
    """Mean batch loss (float64); grad = d(mean)/dz written when want_grad."""
    B, K = z.shape
    total = 0.0
    if loss == C.LOSS_MSE:
        c = z.dtype.type(2.0 / (B * K))
        for i in range(B):
            for k in range(K):
                d = z[i, k] - y[i, k]
                total += np.float64(d) * np.float64(d)
                if want_grad:
                    grad[i, k] = d * c
        return total / (B * K)
    if loss == C.LOSS_BCE:
        c = z.dtype.type(1.0 / (B * K))
        for i in range(B):
            for k in range(K):
                zz = np.float64(z[i, k])
                total += max(zz, 0.0) - zz * y[i, k] + math.log1p(math.exp(-abs(zz)))
                if want_grad:
                    grad[i, k] = (_activate(z[i, k], C.ACT_SIGMOID, z[i, k]) - y[i, k]) * c
        return total / (B * K)
    c = z.dtype.type(1.0 / B)
    mixed = y.shape[1] == C.SCE_MIXED_WIDTH    # Mixup: lam * CE(a) + (1 - lam) * CE(b)
    for i in range(B):
        label = int(y[i, C.SCE_LABEL])
        zmax = z[i, 0]
        for k in range(1, K):
            if z[i, k] > zmax:
                zmax = z[i, k]
        s = z.dtype.type(0)
        s64 = 0.0
        for k in range(K):
            s += np.exp(z[i, k] - zmax)
            s64 += math.exp(np.float64(z[i, k]) - np.float64(zmax))
        lse = math.log(s64) + np.float64(zmax)
        if mixed:
            label_b = int(y[i, C.SCE_LABEL_B])
            lam64 = np.float64(y[i, C.SCE_LAM])
            total += (lam64 * (lse - np.float64(z[i, label]))
                      + (1.0 - lam64) * (lse - np.float64(z[i, label_b])))
            if want_grad:
                # in float64, as the one-column path below (Numba promotes its p - 1): with
                # lam = 1 (or 0) the gradient is that path's, bit for bit
                lam_b64 = 1.0 - lam64
                for k in range(K):
                    p = np.exp(z[i, k] - zmax) / s
                    if k == label:
                        p = p - lam64
                    if k == label_b:
                        p = p - lam_b64
                    grad[i, k] = p * c
            continue
        total += lse - np.float64(z[i, label])
        if want_grad:
            for k in range(K):
                p = np.exp(z[i, k] - zmax) / s
                if k == label:
                    p = p - 1
                grad[i, k] = p * c
    return total / B


# ---------------------------------------------------------------- penalized update
@njit(**JIT)
def _coefficients(hp, opt, t, coef):
    """Scalars of one update in float64, stored into `coef` (param dtype) to round them once.

    Order: lr, b1, 1-b1, b2, 1-b2, eps, l1, l2, decay, step_size, sqrt(bc2), lr*l1.
    Mirrors reference.update_coefficients.
    """
    lr = hp[C.HP_LR]
    b1 = hp[C.HP_BETA1]
    b2 = hp[C.HP_BETA2]
    if opt == C.OPT_SGD:
        step_size = lr
        bc2_sqrt = 1.0
    else:
        step_size = lr / (1.0 - b1 ** np.float64(t))
        bc2_sqrt = math.sqrt(1.0 - b2 ** np.float64(t))
    decay = 1.0 - lr * hp[C.HP_DECOUPLED] if opt == C.OPT_ADAMW else 1.0
    coef[0] = lr
    coef[1] = b1
    coef[2] = 1.0 - b1
    coef[3] = b2
    coef[4] = 1.0 - b2
    coef[5] = hp[C.HP_EPS]
    coef[6] = hp[C.HP_L1]
    coef[7] = hp[C.HP_L2]
    coef[8] = decay
    coef[9] = step_size
    coef[10] = bc2_sqrt
    coef[11] = lr * hp[C.HP_L1]


# The gradient of the smooth part: g + l2*w (+ l1*sign(w) for the subgradient). Adding a zero
# l2*w or l1*sign(w) term changes no bit of the result (only the sign of a zero), so the loops
# carry no per-element branches and vectorise; AdamW's decay of 1.0 for Adam is exact too.
@njit(inline="always", **JIT)
def _adam_loop(w, g, m, v, lo, hi, coef, subgradient, prox):
    b1, omb1, b2, omb2, eps = coef[1], coef[2], coef[3], coef[4], coef[5]
    l1, l2, decay, step_size, bc2_sqrt, lr_l1 = coef[6], coef[7], coef[8], coef[9], coef[10], \
        coef[11]
    zero = w.dtype.type(0)
    for k in range(lo, hi):
        wi = w[k]
        ge = g[k] + l2 * wi
        if subgradient:
            ge = ge + l1 * np.sign(wi)
        wi = wi * decay
        mi = m[k] + omb1 * (ge - m[k])
        vi = v[k] * b2 + (omb2 * ge) * ge
        m[k] = mi
        v[k] = vi
        denom = np.sqrt(vi) / bc2_sqrt + eps
        wi = wi - step_size * (mi / denom)
        if prox:
            wi = np.sign(wi) * max(abs(wi) - lr_l1 / denom, zero)
        w[k] = wi


@njit(inline="always", **JIT)
def _sgd_loop(w, g, m, lo, hi, coef, subgradient, prox, momentum, nesterov):
    lr, b1, l1, l2, lr_l1 = coef[0], coef[1], coef[6], coef[7], coef[11]
    zero = w.dtype.type(0)
    for k in range(lo, hi):
        wi = w[k]
        ge = g[k] + l2 * wi
        if subgradient:
            ge = ge + l1 * np.sign(wi)
        if momentum:
            mi = m[k] * b1 + ge
            m[k] = mi
            d = ge + b1 * mi if nesterov else mi
        else:
            d = ge
        wi = wi - lr * d
        if prox:
            wi = np.sign(wi) * max(abs(wi) - lr_l1, zero)
        w[k] = wi


@njit(**JIT)
def _update_range(w, g, m, v, opt, nesterov, l1_mode, coef, lo, hi):
    """One fused step over the flat elements [lo, hi). l1_mode: 0 none, 1 prox, 2 subgradient."""
    if opt == C.OPT_SGD:
        if m.shape[0] == 0:
            if l1_mode == 1:
                _sgd_loop(w, g, m, lo, hi, coef, False, True, False, False)
            elif l1_mode == 2:
                _sgd_loop(w, g, m, lo, hi, coef, True, False, False, False)
            else:
                _sgd_loop(w, g, m, lo, hi, coef, False, False, False, False)
        elif nesterov:
            if l1_mode == 1:
                _sgd_loop(w, g, m, lo, hi, coef, False, True, True, True)
            elif l1_mode == 2:
                _sgd_loop(w, g, m, lo, hi, coef, True, False, True, True)
            else:
                _sgd_loop(w, g, m, lo, hi, coef, False, False, True, True)
        else:
            if l1_mode == 1:
                _sgd_loop(w, g, m, lo, hi, coef, False, True, True, False)
            elif l1_mode == 2:
                _sgd_loop(w, g, m, lo, hi, coef, True, False, True, False)
            else:
                _sgd_loop(w, g, m, lo, hi, coef, False, False, True, False)
    else:
        if l1_mode == 1:
            _adam_loop(w, g, m, v, lo, hi, coef, False, True)
        elif l1_mode == 2:
            _adam_loop(w, g, m, v, lo, hi, coef, True, False)
        else:
            _adam_loop(w, g, m, v, lo, hi, coef, False, False)


@njit(**dict(JIT, fastmath={"reassoc", "nsz"}))
def _penalty_sums(w, lo, hi):
    """(sum|w|, sum w^2) of a chunk in float64; reassociation lets it vectorise, and fixed
    chunks keep the total independent of the thread count."""
    p1 = 0.0
    p2 = 0.0
    for k in range(lo, hi):
        x = np.float64(w[k])
        p1 += abs(x)
        p2 += x * x
    return p1, p2


@njit(**JIT)
def _update_chunk(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, want_penalty, partial, c, n):
    lo = c * _UPDATE_CHUNK
    hi = min(n, lo + _UPDATE_CHUNK)
    if want_penalty:
        p1, p2 = _penalty_sums(wf, lo, hi)
        partial[2 * c] = p1
        partial[2 * c + 1] = p2
    _update_range(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, lo, hi)


@njit(**JIT_PARALLEL)
def _update_parallel(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, want_penalty, partial, n):
    n_chunks = (n + _UPDATE_CHUNK - 1) // _UPDATE_CHUNK
    for c in prange(n_chunks):
        _update_chunk(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, want_penalty, partial, c, n)


@njit(**JIT)
def _column_norms(w, colnorm):
    R, O = w.shape
    for j in range(O):
        colnorm[j] = 0.0
    for i in range(R):
        for j in range(O):
            colnorm[j] += np.float64(w[i, j]) * np.float64(w[i, j])
    for j in range(O):
        colnorm[j] = math.sqrt(colnorm[j])


@njit(**JIT)
def _group_prox_cols(w, v, opt, group, lr, coef, colnorm, coltau):
    """Block soft-thresholding of every column (reference.group_prox), with the thresholds
    of reference.group_thresholds; coltau and colnorm are float64 scratch of >= O values,
    coef holds COEF_SIZE scalars then >= O values of the param dtype."""
    R, O = w.shape
    if opt == C.OPT_SGD:
        for j in range(O):
            coltau[j] = lr * group
    else:
        step = np.float64(coef[9])
        bc2 = np.float64(coef[10])
        eps = np.float64(coef[5])
        for j in range(O):
            coltau[j] = 0.0
        for i in range(R):
            for j in range(O):
                coltau[j] += math.sqrt(np.float64(v[i, j])) / bc2 + eps
        for j in range(O):
            coltau[j] = group * step / (coltau[j] / R)
    _column_norms(w, colnorm)
    scale = coef[COEF_SIZE:COEF_SIZE + O]     # in the param dtype: rounded as the reference
    for j in range(O):
        n = colnorm[j]
        scale[j] = 1.0 - coltau[j] / n if n > coltau[j] else 0.0
    for i in range(R):                      # row-major: contiguous, vectorisable
        for j in range(O):
            w[i, j] = w[i, j] * scale[j]


@njit(**JIT)
def _maxnorm_cols(w, c, coef, colnorm):
    R, O = w.shape
    _column_norms(w, colnorm)
    for j in range(O):
        n = colnorm[j]
        if n > c:
            coef[12] = c / n        # rounded to the param dtype, as the reference does
            s = coef[12]
            for i in range(R):
                w[i, j] = w[i, j] * s


@njit(**JIT)
def _penalized_update_flat(wf, gf, mf, vf, hp, opt, t, coef, scratch):
    """Fused step of a flattened tensor; scratch (float64) holds >= 2*ceil(n/chunk) values."""
    _coefficients(hp, opt, t, coef)
    n = wf.shape[0]
    l1_mode = 0
    if hp[C.HP_L1] != 0:
        l1_mode = 1 if hp[C.HP_PROXIMAL] != 0 else 2
    nesterov = hp[C.HP_NESTEROV] != 0
    want_penalty = hp[C.HP_L1] != 0 or hp[C.HP_L2] != 0
    n_chunks = (n + _UPDATE_CHUNK - 1) // _UPDATE_CHUNK
    if n >= PARALLEL_MIN_ELEMENTS:
        _update_parallel(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, want_penalty, scratch, n)
    else:
        for c in range(n_chunks):
            _update_chunk(wf, gf, mf, vf, opt, nesterov, l1_mode, coef, want_penalty, scratch,
                          c, n)
    if not want_penalty:
        return 0.0
    p1 = 0.0
    p2 = 0.0
    for c in range(n_chunks):
        p1 += scratch[2 * c]
        p2 += scratch[2 * c + 1]
    return hp[C.HP_L1] * p1 + 0.5 * hp[C.HP_L2] * p2


@njit(**JIT)
def _penalized_update_2d(w, g, m, v, hp, opt, t, coef, scratch):
    n = w.size
    mf = m.reshape(m.size)
    vf = v.reshape(v.size)
    group = hp[C.HP_GROUP]
    group_pen = 0.0
    if group > 0:           # the penalty of w before the step, like the other terms
        _column_norms(w, scratch)
        for j in range(w.shape[1]):
            group_pen += scratch[j]
        group_pen *= group
    pen = _penalized_update_flat(w.reshape(n), g.reshape(n), mf, vf, hp, opt, t, coef, scratch)
    pen += group_pen
    if group > 0:
        O = w.shape[1]
        _group_prox_cols(w, v, opt, group, hp[C.HP_LR], coef, scratch[:O], scratch[O:2 * O])
    c = hp[C.HP_MAXNORM]
    if c > 0:
        _maxnorm_cols(w, c, coef, scratch)
    return pen


@njit(**JIT)
def _penalized_update_1d(w, g, m, v, hp, opt, t, coef, scratch):
    return _penalized_update_flat(w, g, m, v, hp, opt, t, coef, scratch)


def _scratch_size(n_params, widest):
    return max(2 * (n_params // _UPDATE_CHUNK + 1), 2 * widest, 2)


# ---------------------------------------------------------------- the compiled epoch
@njit(**JIT)
def _train_epoch(X, Y, perm, batch_size, Ws, bs, dWs, dbs, mW, vW, mb, vb, acts, grads,
                 xbuf, xdrop, ybuf, words, li, lf, hpW, hpb, opt, loss, k0, k1, step0, t0,
                 coef, scratch, gbs, dgbs, mgb, vgb, stats, xhats, saves, hpgb, pres, nwords):
    """kernels/driver.train_epoch, compiled: same steps, same order, same masks.

    gbs ... saves: the BatchNorm arrays of the layers with li[l, LI_BN] (empty elsewhere).
    pres: the pre-noise activations (Net.pres); nwords: the noise words' buffer."""
    n_total = perm.shape[0]   # the rows of this call: an epoch or a chunk of whole batches
    L = len(Ws)
    I0 = X.shape[1]
    Ky = Y.shape[1]
    loss_sum = 0.0
    pen_sum = 0.0
    steps = 0
    in_thr = li[0, C.LI_IN_DROP_THR]
    in_noise = li[0, C.LI_IN_NOISE]
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        step = step0 + steps
        t = t0 + steps
        xb = xbuf[:n]
        yb = ybuf[:n]
        for r in range(n):
            src = perm[start + r]
            for j in range(I0):
                xb[r, j] = X[src, j]
            for j in range(Ky):
                yb[r, j] = Y[src, j]
        x = xb
        if in_thr > 0 or in_noise != C.NOISE_NONE:
            _input_dropout(xb, xdrop[:n], in_thr, lf[0, C.LF_IN_DROP_SCALE], k0, k1, step, 0,
                           words, in_noise, lf[0, C.LF_IN_NOISE_STD], nwords)
            x = xdrop[:n]
        for l in range(L):
            if li[l, C.LI_BN] != 0:
                _bn_dense_forward(x, Ws[l], bs[l], acts[l][:n], xhats[l][:n], gbs[l], saves[l],
                                  li[l, C.LI_ACT], lf[l, C.LF_SLOPE], li[l, C.LI_DROP_THR],
                                  lf[l, C.LF_DROP_SCALE], np.float64(lf[l, C.LF_BN_EPS]), k0,
                                  k1, step, l, words, li[l, C.LI_NOISE], lf[l, C.LF_NOISE_STD],
                                  pres[l][:n], nwords)
            else:
                _dense_forward(x, Ws[l], bs[l], acts[l][:n], li[l, C.LI_ACT],
                               lf[l, C.LF_SLOPE], li[l, C.LI_DROP_THR], lf[l, C.LF_DROP_SCALE],
                               k0, k1, step, l, words, li[l, C.LI_NOISE],
                               lf[l, C.LF_NOISE_STD], pres[l][:n], nwords)
            x = acts[l][:n]
        batch_loss = _loss_forward_backward(acts[L - 1][:n], yb, grads[L - 1][:n], loss, True)
        if not np.isfinite(batch_loss):
            return loss_sum, pen_sum, steps, False
        loss_sum += batch_loss * n
        pen = 0.0
        for l in range(L - 1, -1, -1):
            if l > 0:
                xin = acts[l - 1][:n]
                dx = grads[l - 1][:n]
            elif in_thr > 0 or in_noise != C.NOISE_NONE:
                xin = xdrop[:n]
                dx = grads[0][:0]
            else:
                xin = xb
                dx = grads[0][:0]
            if li[l, C.LI_BN] != 0:
                _bn_dense_backward(grads[l][:n], acts[l][:n], xhats[l][:n], xin, Ws[l], gbs[l],
                                   stats[l], saves[l], dWs[l], dbs[l], dgbs[l], dx,
                                   li[l, C.LI_ACT], lf[l, C.LF_SLOPE], li[l, C.LI_DROP_THR],
                                   lf[l, C.LF_DROP_SCALE], np.float64(lf[l, C.LF_BN_MOMENTUM]),
                                   k0, k1, step, l, words, li[l, C.LI_NOISE],
                                   lf[l, C.LF_NOISE_STD], pres[l][:n], nwords)
            else:
                _dense_backward(grads[l][:n], acts[l][:n], xin, Ws[l], dWs[l], dbs[l], dx,
                                li[l, C.LI_ACT], lf[l, C.LF_SLOPE], li[l, C.LI_DROP_THR],
                                lf[l, C.LF_DROP_SCALE], k0, k1, step, l, words,
                                li[l, C.LI_NOISE], lf[l, C.LF_NOISE_STD], pres[l][:n], nwords)
            pen += _penalized_update_2d(Ws[l], dWs[l], mW[l], vW[l], hpW[l], opt, t, coef,
                                        scratch)
            if bs[l].shape[0] > 0:
                pen += _penalized_update_1d(bs[l], dbs[l], mb[l], vb[l], hpb[l], opt, t, coef,
                                            scratch)
            if li[l, C.LI_BN] != 0:     # gamma/beta, flattened: never penalized
                g2 = gbs[l].size
                pen += _penalized_update_1d(gbs[l].reshape(g2), dgbs[l].reshape(g2),
                                            mgb[l].reshape(mgb[l].size),
                                            vgb[l].reshape(vgb[l].size), hpgb[l], opt, t, coef,
                                            scratch)
        pen_sum += pen * n
        steps += 1
    return loss_sum, pen_sum, steps, True


@njit(**JIT)
def _forward_inference(X, Ws, bs, li, lf, bufs, out, batch_size):
    L = len(Ws)
    n_total = X.shape[0]
    words = np.zeros((4, 1), np.uint32)
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        x = X[start:start + n]
        for l in range(L):
            _dense_forward(x, Ws[l], bs[l], bufs[l][:n], li[l, C.LI_ACT], lf[l, C.LF_SLOPE],
                           0, lf[l, C.LF_DROP_SCALE], 0, 0, 0, l, words, C.NOISE_NONE,
                           lf[l, C.LF_NOISE_STD], bufs[l][:0], words)
            x = bufs[l][:n]
        out[start:start + n] = x


# ---------------------------------------------------------------- the contract (per op)
def _words_for(n_elements):
    return np.empty((4, (n_elements + 3) // 4), np.uint32)


def _scalar(x, like):
    return like.dtype.type(x)


def _noise_args(noise, noise_std, pre, out):
    """(code, std in out's dtype, pre or an empty (0, O) view, the noise words' buffer)."""
    noise = int(noise)
    pre = out[:0] if pre is None or pre.size == 0 else pre
    return noise, _scalar(noise_std, out), pre, _words_for(out.size if noise else 0)


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    _dense_forward(x, W, b, out, int(act), _scalar(slope, out), int(drop_threshold),
                   _scalar(drop_scale, out), k0, k1, int(step), int(layer),
                   _words_for(out.size), *_noise_args(noise, noise_std, pre, out))


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    if dx.size == 0:
        dx = grad[:0]
    _dense_backward(grad, out, x, W, dW, db, dx, int(act), _scalar(slope, out),
                    int(drop_threshold), _scalar(drop_scale, out), k0, k1, int(step),
                    int(layer), _words_for(out.size), *_noise_args(noise, noise_std, pre, out))


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    _bn_dense_forward(x, W, b, out, xhat, gb, save, int(act), _scalar(slope, out),
                      int(drop_threshold), _scalar(drop_scale, out),
                      np.float64(_scalar(eps, out)), k0, k1, int(step), int(layer),
                      _words_for(out.size), *_noise_args(noise, noise_std, pre, out))


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    k0, k1 = split_seed(seed)
    if dx.size == 0:
        dx = grad[:0]
    _bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, int(act),
                       _scalar(slope, out), int(drop_threshold), _scalar(drop_scale, out),
                       np.float64(_scalar(momentum, out)), k0, k1, int(step), int(layer),
                       _words_for(out.size), *_noise_args(noise, noise_std, pre, out))


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=C.NOISE_NONE,
                  noise_std=0.0):
    k0, k1 = split_seed(seed)
    noise = int(noise)
    _input_dropout(x, out, int(threshold), _scalar(scale, x), k0, k1, int(step), int(layer),
                   _words_for(x.size), noise, _scalar(noise_std, x),
                   _words_for(x.size if noise else 0))


def loss_forward_backward(logits, y, grad, loss):
    return _loss_forward_backward(logits, y.astype(logits.dtype, copy=False), grad, int(loss),
                                  True)


def loss_value(logits, y, loss):
    return _loss_forward_backward(logits, y.astype(logits.dtype, copy=False), logits[:0],
                                  int(loss), False)


def penalized_update(w, g, m, v, hp, opt, t):
    coef = np.zeros(COEF_SIZE + w.shape[-1], w.dtype)
    hp = np.asarray(hp, np.float64)
    scratch = np.zeros(_scratch_size(w.size, w.shape[-1]))
    if w.ndim == 1:
        return _penalized_update_1d(w, g, m, v, hp, int(opt), int(t), coef, scratch)
    if m.size == 0:
        m = v = np.zeros((0, w.shape[1]), w.dtype)
    return _penalized_update_2d(w, g, m, v, hp, int(opt), int(t), coef, scratch)


def output_transform(logits, loss):
    from .reference import output_transform as ref
    return ref(logits, loss)


# ---------------------------------------------------------------- epoch / inference entry
def _typed(net):
    """Typed lists and scratch for the compiled epoch, built once per workspace."""
    cache = net.cache
    if "Ws" not in cache:
        driver.ensure_bn_lists(net)
        dt = net.dtype
        cols = max(W.shape[1] for W in net.Ws)
        widest = max(cols, net.Ws[0].shape[0])
        for name in ("Ws", "bs", "dWs", "dbs", "mW", "vW", "mb", "vb", "acts", "grads", "gbs",
                     "dgbs", "mgb", "vgb", "stats", "xhats", "saves"):
            arrays = getattr(net, name)
            if name in ("mW", "vW"):
                arrays = [a if a.size else np.zeros((0, W.shape[1]), dt)
                          for a, W in zip(arrays, net.Ws)]
            cache[name] = List(arrays)
        cache["words"] = np.zeros((4, (net.batch * widest + 3) // 4), np.uint32)
        noisy = any(driver.noise_of(net, l)[0] for l in range(net.n_layers)) \
            or driver.input_noise_of(net)[0]
        cache["nwords"] = np.zeros((4, (net.batch * widest + 3) // 4 if noisy else 0),
                                   np.uint32)
        pres = net.pres if len(net.pres) == net.n_layers else \
            [np.zeros((0, W.shape[1]), dt) for W in net.Ws]
        cache["pres"] = List(pres)
        cache["coef"] = np.zeros(COEF_SIZE + cols, dt)
        cache["scratch"] = np.zeros(_scratch_size(
            max([W.size for W in net.Ws] + [g.size for g in net.gbs]), cols))
    return cache


def train_epoch(net, X, Y, perm, batch_size, step0, t0):
    with threads.numba_epoch(net):
        return _train_epoch_call(net, X, Y, perm, batch_size, step0, t0)


def _train_epoch_call(net, X, Y, perm, batch_size, step0, t0):
    c = _typed(net)
    k0, k1 = split_seed(net.seed)
    return _train_epoch(X, Y, perm, int(batch_size), c["Ws"], c["bs"], c["dWs"], c["dbs"],
                        c["mW"], c["vW"], c["mb"], c["vb"], c["acts"], c["grads"],
                        net.xbuf, net.xdrop, net.ybuf, c["words"], net.li, net.lf, net.hpW,
                        net.hpb, int(net.opt), int(net.loss), k0, k1, int(step0), int(t0),
                        c["coef"], c["scratch"], c["gbs"], c["dgbs"], c["mgb"], c["vgb"],
                        c["stats"], c["xhats"], c["saves"], net.hpgb, c["pres"], c["nwords"])


def forward_inference(net, X, batch_size):
    n = X.shape[0]
    rows = max(1, min(batch_size, n))
    bufs = List([np.empty((rows, W.shape[1]), net.dtype) for W in net.Ws])
    Ws = List(net.Ws)
    bs = List(net.bs)
    out = np.empty((n, net.Ws[-1].shape[1]), net.dtype)
    if n:
        _forward_inference(X, Ws, bs, net.li, net.lf, bufs, out, int(rows))
    return out


# Keep the Python driver importable from here too (the reference uses it directly).
driver_train_epoch = driver.train_epoch
