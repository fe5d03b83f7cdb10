"""The Numba epilogues (twin of kernels/reference/epilogue.py): what a dense layer does after
its GEMM (bias, activation, noise, dropout) and, in backward, before its GEMMs (dropout mask
and GaussianDropout factor regenerated, f', the bias gradient), and a part's input transform.

Shape legend: B batch rows, O fan_out, G Philox groups (4 words each).

- The activations' f and f' are in activation.py.
- The activation is a compile-time constant inside each elementwise loop (jit.specialized),
  so LLVM drops the branches and vectorises; a network compiles only the activations it
  uses (`uses`: jit.uses_of).
- Forward: one pass over rows (bias + activation), then, with noise or dropout, one over
  elements (noise and mask together). Backward: one pass over elements (mask, noise factor,
  f'), then the bias gradient over column blocks, each bias sum in row order on one thread.
- Parallel passes split the work in chunks of fixed sizes (never derived from the thread
  count), so every rounding is the same whatever NUMBA_NUM_THREADS is.
- Noise words sit in their own (4, G) buffer `nwords` beside the dropout words, so noise and
  mask are applied in one pass; `nwords` is None when no layer of the network has noise, and
  the noise code is then never compiled.
"""
import numpy as np
from numba import prange

from .. import contract
from ..contract import PARALLEL_MIN_ELEMENTS
from .activation import FROM_INPUT, UNSCALE, activate, activation_grad
from .jit import kernel, kernel_inline, kernel_parallel, specialized
from .philox import normal, normal_pair, philox_fill

ROW_CHUNK = 16       # rows per task in the forward epilogue
COL_CHUNK = 64       # columns per task in the bias gradient (each bias sum on one thread)
ELEM_CHUNK = 4 * 4096   # elements per task in the mask and dz passes

# ---------------------------------------------------------------- forward: bias + activation
@kernel_inline
def _bias_act_loop(out, b, pre, slope, r0, r1, act):
    """Rows [r0, r1): out = f(out + b); an activation whose f' needs z keeps z in pre."""
    O = out.shape[1]
    has_bias = b.shape[0] > 0
    for i in range(r0, r1):
        row = out[i]
        if FROM_INPUT[act]:
            for j in range(O):      # element loops, not pre[i, :] = row: Numba compiles
                v = row[j]          # an array assignment with its shape-error message, ~2 s
                if has_bias:
                    v = v + b[j]
                row[j] = v
                pre[i, j] = v
            for j in range(O):
                row[j] = activate(row[j], act, slope)
        elif has_bias:
            for j in range(O):
                row[j] = activate(row[j] + b[j], act, slope)
        else:
            for j in range(O):
                row[j] = activate(row[j], act, slope)


bias_act = specialized(_bias_act_loop)


@kernel
def mask_range(flat, words, thr, scale, e_lo, e_hi):
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


# ---------------------------------------------------------------- forward: noise + dropout
@kernel_inline
def noisy(v, noise, std, nrm):
    """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n) (n already in v's dtype)."""
    if noise == contract.NOISE_ADD:
        return v + std * nrm
    return v * (type(v)(1) + std * nrm)


@kernel_inline
def _noise_one(flat, pre, keep_f, e, nrm, noise, std, words, t, thr, scale, zero):
    v = flat[e]
    if keep_f:
        pre[e] = v
    v = noisy(v, noise, std, flat.dtype.type(nrm))
    if thr > 0:
        v = v * scale if words[e & 3, e >> 2] >= t else zero
    flat[e] = v


@kernel
def noise_range(flat, pre, keep_f, nwords, noise, std, words, thr, scale, e_lo, e_hi):
    """flat[e] <- dropout(noise(flat[e])) for e in [e_lo, e_hi); pre[e] <- flat[e] (the
    pre-noise f(z) backward needs) first when keep_f. Whole Box-Muller pairs in the middle,
    a lone element at either end."""
    zero = flat.dtype.type(0)
    t = np.uint32(thr)
    e = e_lo
    if e & 1 and e < e_hi:
        _noise_one(flat, pre, keep_f, e, normal(nwords, e), noise, std, words, t, thr, scale,
                   zero)
        e += 1
    while e + 1 < e_hi:
        c, s = normal_pair(nwords, e)
        _noise_one(flat, pre, keep_f, e, c, noise, std, words, t, thr, scale, zero)
        _noise_one(flat, pre, keep_f, e + 1, s, noise, std, words, t, thr, scale, zero)
        e += 2
    if e < e_hi:
        _noise_one(flat, pre, keep_f, e, normal(nwords, e), noise, std, words, t, thr, scale,
                   zero)


@kernel
def alpha_range(flat, pf, keep_f, words, thr, scale, shift, e_lo, e_hi):
    """AlphaDropout (contract NOISE_ALPHA) on the elements [e_lo, e_hi): flat[e] <-
    scale * (flat[e] if kept else ALPHA_DROPPED) + shift (pf[e] <- flat[e] first when
    keep_f); words: the dropout words, indexed by absolute group."""
    dropped = flat.dtype.type(contract.ALPHA_DROPPED)
    t = np.uint32(thr)
    for e in range(e_lo, e_hi):
        v = flat[e]
        if keep_f:
            pf[e] = v
        if thr > 0:
            if words[e & 3, e >> 2] < t:
                v = dropped
        flat[e] = v * scale + shift


@kernel
def output_range(flat, pf, keep_f, nwords, noise, nstd, words, thr, scale, lo, hi):
    """The part of the forward epilogue after the activation (plain and BatchNorm layers):
    flat <- dropout(noise(flat)) on the elements [lo, hi) (pf <- f(z) first when keep_f).
    A network with noise or AlphaDropout has noise words (nwords), else none of this is
    compiled."""
    if nwords is not None:
        if noise == contract.NOISE_ALPHA:
            alpha_range(flat, pf, keep_f, words, thr, scale, nstd, lo, hi)
            return
        if noise != contract.NOISE_NONE:
            noise_range(flat, pf, keep_f, nwords, noise, nstd, words, thr, scale, lo, hi)
            return
    if thr > 0:
        if keep_f:      # an activity penalty under dropout keeps a = f(z) for backward
            for e in range(lo, hi):
                pf[e] = flat[e]
        mask_range(flat, words, thr, scale, lo, hi)


@kernel
def fill_output_words(par, words, nwords, n, k0, k1, step, layer, thr, noise, backward, g0):
    """The dropout words (with dropout, AlphaDropout's too) and the noise words (forward:
    with Gaussian noise; backward: with GaussianDropout only, additive noise leaves no trace
    in the gradient) of a layer; g0: philox_fill's."""
    if thr > 0:
        philox_fill(par, words, n, k0, k1, step, layer, contract.STREAM_DROPOUT, g0)
    if nwords is not None:      # the kinds that draw normals (AlphaDropout draws none)
        if noise == contract.NOISE_MUL or (noise == contract.NOISE_ADD and not backward):
            philox_fill(par, nwords, n, k0, k1, step, layer, contract.STREAM_NOISE, g0)


@kernel
def keeps_f(pre, act):
    """Whether the noise pass stores f(z) in pre (an output-derivable f with a pre buffer;
    an input-derivable f has z there already)."""
    return pre.shape[0] > 0 and not FROM_INPUT[act]


@kernel_parallel
def _forward_epilogue_parallel(uses, out, b, act, slope, thr, scale, words, noise, nstd, pre,
                               nwords):
    B, O = out.shape
    n = B * O
    flat = out.reshape(n)
    n_chunks = (B + ROW_CHUNK - 1) // ROW_CHUNK
    for c in prange(n_chunks):
        bias_act(uses, act, out, b, pre, slope, c * ROW_CHUNK, min(B, (c + 1) * ROW_CHUNK))
    if noise != contract.NOISE_NONE or thr > 0:
        pf = pre.reshape(pre.size)
        keep_f = keeps_f(pre, act)
        n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
        for c in prange(n_chunks):
            output_range(flat, pf, keep_f, nwords, noise, nstd, words, thr, scale,
                         c * ELEM_CHUNK, min(n, (c + 1) * ELEM_CHUNK))


@kernel
def forward_epilogue(uses, par, out, b, act, slope, thr, scale, words, noise, nstd, pre,
                     nwords):
    """Bias, activation, noise, dropout: a pass over rows, then one over elements (noise and
    mask together) when there is noise or dropout."""
    if par is not None:
        if out.size >= PARALLEL_MIN_ELEMENTS:
            _forward_epilogue_parallel(uses, out, b, act, slope, thr, scale, words, noise,
                                       nstd, pre, nwords)
            return
    bias_act(uses, act, out, b, pre, slope, 0, out.shape[0])
    n = out.size
    output_range(out.reshape(n), pre.reshape(pre.size), keeps_f(pre, act), nwords, noise,
                 nstd, words, thr, scale, 0, n)


# ---------------------------------------------------------------- backward: mask, noise, f'
@kernel_inline
def _dz_one(gf, of, pf, words, t, scale, act, slope, e, q, g, zero):
    if FROM_INPUT[act]:
        a = pf[e]
    else:
        a = of[e] / scale if UNSCALE[act] else of[e]
    dz = (gf[e] * scale) * activation_grad(a, act, slope)
    gf[e] = dz if words[q, g] >= t else zero


@kernel_inline
def _dz_loop(gf, of, pf, words, thr, scale, slope, e_lo, e_hi, act):
    """gf[e] <- (gf[e] * scale) * f'(a) if kept else 0 (dropout), or gf[e] * f'(a) (none);
    a from the stored output of[e] (divided back by the scale when the table says f' needs
    the value), or z from pf for an input-derivable f."""
    if thr == 0:
        if act != contract.ACT_LINEAR:
            for e in range(e_lo, e_hi):
                a = pf[e] if FROM_INPUT[act] else of[e]
                gf[e] = gf[e] * activation_grad(a, act, slope)
        return
    zero = gf.dtype.type(0)
    t = np.uint32(thr)
    g_lo = (e_lo + 3) // 4
    g_hi = max(g_lo, e_hi // 4)
    for e in range(e_lo, min(4 * g_lo, e_hi)):
        _dz_one(gf, of, pf, words, t, scale, act, slope, e, e & 3, e >> 2, zero)
    for g in range(g_lo, g_hi):
        for q in range(4):
            _dz_one(gf, of, pf, words, t, scale, act, slope, 4 * g + q, q, g, zero)
    for e in range(max(4 * g_hi, e_lo), e_hi):
        _dz_one(gf, of, pf, words, t, scale, act, slope, e, e & 3, e >> 2, zero)


dz_range = specialized(_dz_loop)


@kernel_inline
def _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one):
    d = gf[e]
    if thr > 0:
        d = d * scale
    if noise == contract.NOISE_MUL:
        d = d * (one + std * gf.dtype.type(nrm))
    if act != contract.ACT_LINEAR:
        d = d * activation_grad(pf[e], act, slope)
    if thr > 0 and words[e & 3, e >> 2] < t:
        d = zero
    gf[e] = d


@kernel_inline
def _dz_noise_loop(gf, pf, nwords, noise, std, words, thr, scale, slope, lo, hi, act):
    """gf[e] <- ((g * scale) * (1 + std * n)) * f'(pre) if kept else 0 (reference order; the
    scale only with dropout, the factor only for NOISE_MUL, f' only for a nonlinear f)."""
    zero = gf.dtype.type(0)
    one = gf.dtype.type(1)
    t = np.uint32(thr)
    mul = noise == contract.NOISE_MUL
    e = lo
    if e & 1 and e < hi:
        nrm = normal(nwords, e) if mul else 0.0
        _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one)
        e += 1
    while e + 1 < hi:
        c, s = normal_pair(nwords, e) if mul else (0.0, 0.0)
        _dz_noise_one(gf, pf, e, c, noise, std, words, t, thr, scale, act, slope, zero, one)
        _dz_noise_one(gf, pf, e + 1, s, noise, std, words, t, thr, scale, act, slope, zero, one)
        e += 2
    if e < hi:
        nrm = normal(nwords, e) if mul else 0.0
        _dz_noise_one(gf, pf, e, nrm, noise, std, words, t, thr, scale, act, slope, zero, one)


dz_noise_range = specialized(_dz_noise_loop)


@kernel
def output_grad_range(uses, gf, of, pf, nwords, noise, nstd, words, thr, scale, act, slope,
                      lo, hi):
    """gf <- dL/d(f's input) from dL/d(out) in place on the elements [lo, hi): mask and noise
    factor regenerated, f' from the output of, or from pf (with noise, or an input-derivable
    f). The part of the backward epilogue shared by the plain and the BatchNorm layers."""
    if nwords is not None:
        if noise != contract.NOISE_NONE:
            dz_noise_range(uses, act, gf, pf, nwords, noise, nstd, words, thr, scale, slope,
                           lo, hi)
            return
    dz_range(uses, act, gf, of, pf, words, thr, scale, slope, lo, hi)


# ---------------------------------------------------------------- backward: activity penalty
# A layer with an activity penalty (contract LF_ACTIVITY_*) runs this pass instead of
# output_grad_range (kernels/reference/epilogue.py activity_epilogue_backward is its spec):
# `activity` = (c1, c2, has_l1, has_l2, partials), c1 = l1 / B, c2 = 2 l2 / B in the dtype,
# partials a float64 (chunks, 2) scratch for the sums of |a| and a^2 (float64, element order
# within a fixed chunk, chunks in order: the same sums for any thread count). None (no layer
# of the network has one): none of this is compiled.
@kernel_inline
def _sign(a):
    """np.sign: -1, 0 or 1, NaN for NaN (a itself for 0 and NaN)."""
    T = type(a)
    if a > 0:
        return T(1)
    if a < 0:
        return T(-1)
    return a


@kernel_inline
def _activity_loop(gf, of, pf, nwords, noise, std, words, thr, scale, slope, c1, c2, has1,
                   has2, partials, chunk, lo, hi, act):
    """gf[e] <- (d + c1 sign(a) + c2 a) * f' on [lo, hi), d = dL/da from the data (mask,
    scale, GaussianDropout's factor undone), a = f of every unit (the output without
    dropout and noise, else pre: a, or z for an input-derivable f); partials[chunk] <-
    (sum |a|, sum a^2) in float64."""
    zero = gf.dtype.type(0)
    one = gf.dtype.type(1)
    t = np.uint32(thr)
    plain = thr == 0 and noise == contract.NOISE_NONE
    mul = noise == contract.NOISE_MUL
    s1 = 0.0
    s2 = 0.0
    for e in range(lo, hi):
        d = gf[e]
        if thr > 0:
            d = d * scale
        if mul:
            d = d * (one + std * gf.dtype.type(normal(nwords, e)))
        if thr > 0:
            if words[e & 3, e >> 2] < t:
                d = zero
        if plain:
            a = of[e]
        elif FROM_INPUT[act]:
            a = activate(pf[e], act, slope)
        else:
            a = pf[e]
        if has1 and has2:
            d = d + (c1 * _sign(a) + c2 * a)
        elif has1:
            d = d + c1 * _sign(a)
        else:
            d = d + c2 * a
        if act != contract.ACT_LINEAR:
            d = d * activation_grad(pf[e] if FROM_INPUT[act] else a, act, slope)
        gf[e] = d
        a64 = np.float64(a)
        s1 += abs(a64)
        s2 += a64 * a64
    partials[chunk, 0] = s1
    partials[chunk, 1] = s2


activity_range = specialized(_activity_loop)


@kernel_parallel
def _activity_grads_parallel(uses, gf, of, pf, nwords, noise, nstd, words, thr, scale, act,
                             slope, c1, c2, has1, has2, partials):
    n = gf.shape[0]
    n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    for c in prange(n_chunks):
        activity_range(uses, act, gf, of, pf, nwords, noise, nstd, words, thr, scale, slope,
                       c1, c2, has1, has2, partials, c, c * ELEM_CHUNK,
                       min(n, (c + 1) * ELEM_CHUNK))


@kernel
def _words_or(nwords, words):
    """The noise words, or (None: no layer of the network draws normals, so no noise is
    GaussianDropout) the dropout words, never read as normals: one type for the loop."""
    if nwords is None:
        return words
    return nwords


@kernel
def activity_grads(uses, par, grad, out, act, slope, thr, scale, words, noise, nstd, pre,
                   nwords, activity):
    """The activity pass over every element of grad (dL/d(out) in, dL/d(f's input) out):
    returns (sum |a|, sum a^2), float64, summed over fixed chunks of ELEM_CHUNK elements in
    chunk order (one chunk below PARALLEL_MIN_ELEMENTS)."""
    c1, c2, has1, has2, partials = activity
    nwords = _words_or(nwords, words)
    n = grad.size
    gf = grad.reshape(n)
    of = out.reshape(n)
    pf = pre.reshape(pre.size)
    n_chunks = 1
    if par is not None:
        if n >= PARALLEL_MIN_ELEMENTS:
            n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
            _activity_grads_parallel(uses, gf, of, pf, nwords, noise, nstd, words, thr, scale,
                                     act, slope, c1, c2, has1, has2, partials)
    if n_chunks == 1:
        activity_range(uses, act, gf, of, pf, nwords, noise, nstd, words, thr, scale, slope,
                       c1, c2, has1, has2, partials, 0, 0, n)
    s1 = 0.0
    s2 = 0.0
    for c in range(n_chunks):
        s1 += partials[c, 0]
        s2 += partials[c, 1]
    return s1, s2


@kernel
def bias_grad_cols(dz, db, c0, c1):
    """db[j] = sum_i dz[i, j] in row order (the same order numpy's sum(axis=0) uses)."""
    for j in range(c0, c1):
        db[j] = dz[0, j]
    for i in range(1, dz.shape[0]):
        row = dz[i]
        for j in range(c0, c1):
            db[j] += row[j]


@kernel_parallel
def output_grads_parallel(uses, grad, out, act, slope, thr, scale, words, noise, nstd, pre,
                          nwords):
    """dL/d(out) -> dL/d(activation input) in place over every element, in parallel chunks
    (output_grad_range): the element pass of the plain and the BatchNorm backward."""
    n = grad.size
    gf = grad.reshape(n)
    of = out.reshape(n)
    pf = pre.reshape(pre.size)
    n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    for c in prange(n_chunks):
        output_grad_range(uses, gf, of, pf, nwords, noise, nstd, words, thr, scale, act, slope,
                          c * ELEM_CHUNK, min(n, (c + 1) * ELEM_CHUNK))


@kernel_parallel
def _bias_grad_parallel(grad, db):
    O = grad.shape[1]
    n_cchunks = (O + COL_CHUNK - 1) // COL_CHUNK
    for c in prange(n_cchunks):
        bias_grad_cols(grad, db, c * COL_CHUNK, min(O, (c + 1) * COL_CHUNK))


@kernel
def backward_epilogue(uses, par, grad, out, db, act, slope, thr, scale, words, noise, nstd,
                      pre, nwords, activity):
    """dL/dz in place (mask and noise regenerated, f' from the output, or from pre; with an
    activity penalty, activity_grads), then the bias gradient. Returns the activity pass's
    (sum |a|, sum a^2), (0, 0) without one. (`par is not None` stands alone in its `if`:
    Numba prunes only such a test, and a serial network then compiles no parallel pass.)"""
    n = grad.size
    sums = (0.0, 0.0)
    if activity is not None:
        sums = activity_grads(uses, par, grad, out, act, slope, thr, scale, words, noise,
                              nstd, pre, nwords, activity)
    if par is not None:
        if n >= PARALLEL_MIN_ELEMENTS:
            if activity is None:
                output_grads_parallel(uses, grad, out, act, slope, thr, scale, words, noise,
                                      nstd, pre, nwords)
            if db.shape[0] > 0:
                _bias_grad_parallel(grad, db)
            return sums
    if n == 0:
        return sums
    if activity is None:
        output_grad_range(uses, grad.reshape(n), out.reshape(n), pre.reshape(pre.size),
                          nwords, noise, nstd, words, thr, scale, act, slope, 0, n)
    if db.shape[0] > 0:
        bias_grad_cols(grad, db, 0, grad.shape[1])
    return sums


# ---------------------------------------------------------------- a part's input transform
@kernel_parallel
def noise_parallel(flat, nwords, noise, std, words, thr, scale):
    n = flat.shape[0]
    n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    for c in prange(n_chunks):
        noise_range(flat, flat[:0], False, nwords, noise, std, words, thr, scale,
                    c * ELEM_CHUNK, min(n, (c + 1) * ELEM_CHUNK))


@kernel_parallel
def _alpha_parallel(flat, words, thr, scale, shift):
    n = flat.shape[0]
    n_chunks = (n + ELEM_CHUNK - 1) // ELEM_CHUNK
    for c in prange(n_chunks):
        alpha_range(flat, flat[:0], False, words, thr, scale, shift, c * ELEM_CHUNK,
                    min(n, (c + 1) * ELEM_CHUNK))


@kernel
def input_dropout(par, x, out, thr, scale, k0, k1, step, layer, words, noise, nstd, nwords,
                  g0):
    """out = dropout(noise(x)): streams STREAM_INPUT_NOISE and STREAM_INPUT_DROPOUT
    (AlphaDropout: its mask, scale and shift nstd). out may be x (a gradient sent back
    through the transform: GaussianDropout's factor and the mask). g0: philox_fill's."""
    n = x.size
    if thr > 0:
        philox_fill(par, words, n, k0, k1, step, layer, contract.STREAM_INPUT_DROPOUT, g0)
    flat = out.reshape(n)
    flat[:] = x.reshape(n)
    if nwords is not None:
        if noise == contract.NOISE_ALPHA:
            if par is not None:
                if n >= PARALLEL_MIN_ELEMENTS:
                    _alpha_parallel(flat, words, thr, scale, nstd)
                    return
            alpha_range(flat, flat[:0], False, words, thr, scale, nstd, 0, n)
            return
        if noise != contract.NOISE_NONE:
            philox_fill(par, nwords, n, k0, k1, step, layer, contract.STREAM_INPUT_NOISE, g0)
            if par is not None:
                if n >= PARALLEL_MIN_ELEMENTS:
                    noise_parallel(flat, nwords, noise, nstd, words, thr, scale)
                    return
            noise_range(flat, flat[:0], False, nwords, noise, nstd, words, thr, scale, 0, n)
            return
    if thr > 0:
        mask_range(flat, words, thr, scale, 0, n)
