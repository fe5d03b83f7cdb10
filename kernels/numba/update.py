"""The Numba penalized update (twin of kernels/reference/update.py): one fused pass per
parameter tensor does gradient + penalty gradient + optimizer moments + step + L1 prox, then
the column passes (group lasso, max-norm) of a matrix.

The loops are written once and specialized per update variant (optimizer, momentum, the L1
mode) at compile time; they carry no per-element branches and vectorise. Fixed chunks
(UPDATE_CHUNK, never derived from the thread count) keep the penalty sums and every rounding
the same for any number of threads.
"""
import math

import numpy as np
from numba import njit, prange

from .. import contract
from ..contract import PARALLEL_MIN_ELEMENTS
from .jit import kernel, kernel_inline, kernel_parallel, specialized

COEF_SIZE = 16   # the update's scalars (coef[0..15]); the group prox's column scales follow
UPDATE_CHUNK = 8192  # elements per task in the update and its penalty partial sums


@kernel
def _coefficients(hp, opt, t, coef):
    """Scalars of one update in float64, stored into `coef` (param dtype) to round them once.

    Order: lr, b1, 1-b1, b2, 1-b2, eps, l1, l2, decay, step_size, sqrt(bc2), lr*l1.
    Mirrors reference.update_coefficients.
    """
    lr = hp[contract.HP_LR]
    b1 = hp[contract.HP_BETA1]
    b2 = hp[contract.HP_BETA2]
    if opt == contract.OPT_SGD:
        step_size = lr
        bc2_sqrt = 1.0
    else:
        step_size = lr / (1.0 - b1 ** np.float64(t))
        bc2_sqrt = math.sqrt(1.0 - b2 ** np.float64(t))
    decay = 1.0 - lr * hp[contract.HP_DECOUPLED] if opt == contract.OPT_ADAMW else 1.0
    coef[0] = lr
    coef[1] = b1
    coef[2] = 1.0 - b1
    coef[3] = b2
    coef[4] = 1.0 - b2
    coef[5] = hp[contract.HP_EPS]
    coef[6] = hp[contract.HP_L1]
    coef[7] = hp[contract.HP_L2]
    coef[8] = decay
    coef[9] = step_size
    coef[10] = bc2_sqrt
    coef[11] = lr * hp[contract.HP_L1]


# The gradient of the smooth part: g + l2*w (+ l1*sign(w) for the subgradient). Adding a zero
# l2*w or l1*sign(w) term changes no bit of the result (only the sign of a zero), so the loops
# carry no per-element branches and vectorise; AdamW's decay of 1.0 for Adam is exact too.
@kernel_inline
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


@kernel_inline
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


# Update variants: a compile-time constant per loop copy, like the activation in the
# epilogues. variant = 3 * kind + l1_mode, kind 0 SGD, 1 SGD + momentum, 2 SGD + Nesterov,
# 3 Adam / AdamW (AdamW's decay of 1.0 for Adam is exact); l1_mode 0 none, 1 proximal,
# 2 subgradient. A network compiles the variants its tensors use (uses_of(update_variants)).
N_UPDATE_VARIANTS = 12


def update_variant(opt, has_m, nesterov, l1, proximal):
    """The update variant of a tensor (the same rule as the compiled code's)."""
    kind = 3 if opt != contract.OPT_SGD else (0 if not has_m else (2 if nesterov else 1))
    l1_mode = 0 if l1 == 0 else (1 if proximal else 2)
    return 3 * kind + l1_mode


variant_of = kernel(update_variant)


@kernel_inline
def _update_loop(w, g, m, v, coef, lo, hi, variant):
    """One fused step over the flat elements [lo, hi) with a constant variant."""
    kind = variant // 3
    l1_mode = variant % 3
    if kind == 3:
        _adam_loop(w, g, m, v, lo, hi, coef, l1_mode == 2, l1_mode == 1)
    else:
        _sgd_loop(w, g, m, lo, hi, coef, l1_mode == 2, l1_mode == 1, kind > 0, kind == 2)


update_range = specialized(_update_loop)


@njit(nogil=True, fastmath={"reassoc", "nsz"})
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


@kernel
def _update_chunk(uses, wf, gf, mf, vf, variant, coef, want_penalty, partial, c, n):
    lo = c * UPDATE_CHUNK
    hi = min(n, lo + UPDATE_CHUNK)
    if want_penalty:
        p1, p2 = _penalty_sums(wf, lo, hi)
        partial[2 * c] = p1
        partial[2 * c + 1] = p2
    update_range(uses, variant, wf, gf, mf, vf, coef, lo, hi)


@kernel_parallel
def _update_parallel(uses, wf, gf, mf, vf, variant, coef, want_penalty, partial, n):
    n_chunks = (n + UPDATE_CHUNK - 1) // UPDATE_CHUNK
    for c in prange(n_chunks):
        _update_chunk(uses, wf, gf, mf, vf, variant, coef, want_penalty, partial, c, n)


@kernel
def _column_norms(w, colnorm):
    R, O = w.shape
    for j in range(O):
        colnorm[j] = 0.0
    for i in range(R):
        for j in range(O):
            colnorm[j] += np.float64(w[i, j]) * np.float64(w[i, j])
    for j in range(O):
        colnorm[j] = math.sqrt(colnorm[j])


@kernel
def _group_prox_cols(w, v, opt, group, lr, coef, colnorm, coltau):
    """Block soft-thresholding of every column (reference.group_prox), with the thresholds
    of reference.group_thresholds; coltau and colnorm are float64 scratch of >= O values,
    coef holds COEF_SIZE scalars then >= O values of the param dtype."""
    R, O = w.shape
    if opt == contract.OPT_SGD:
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


@kernel
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


@kernel
def _penalized_update_flat(uses, par, wf, gf, mf, vf, hp, opt, t, coef, scratch):
    """Fused step of a flattened tensor; scratch (float64) holds >= 2*ceil(n/chunk) values."""
    _coefficients(hp, opt, t, coef)
    n = wf.shape[0]
    variant = variant_of(opt, mf.shape[0] > 0, hp[contract.HP_NESTEROV] != 0, hp[contract.HP_L1],
                         hp[contract.HP_PROXIMAL] != 0)
    want_penalty = hp[contract.HP_L1] != 0 or hp[contract.HP_L2] != 0
    n_chunks = (n + UPDATE_CHUNK - 1) // UPDATE_CHUNK
    serial = True
    if par is not None:
        if n >= PARALLEL_MIN_ELEMENTS:
            _update_parallel(uses, wf, gf, mf, vf, variant, coef, want_penalty, scratch, n)
            serial = False
    if serial:
        for c in range(n_chunks):
            _update_chunk(uses, wf, gf, mf, vf, variant, coef, want_penalty, scratch, c, n)
    if not want_penalty:
        return 0.0
    p1 = 0.0
    p2 = 0.0
    for c in range(n_chunks):
        p1 += scratch[2 * c]
        p2 += scratch[2 * c + 1]
    return hp[contract.HP_L1] * p1 + 0.5 * hp[contract.HP_L2] * p2


@kernel
def penalized_update_2d(uses, par, w, g, m, v, hp, opt, t, coef, scratch, columns):
    """The fused step of a matrix W (the flat step, then its column passes: group lasso,
    max-norm). columns is None when no tensor of the network has a column pass: they are
    then never compiled."""
    n = w.size
    mf = m.reshape(m.size)
    vf = v.reshape(v.size)
    if columns is None:
        return _penalized_update_flat(uses, par, w.reshape(n), g.reshape(n), mf, vf, hp, opt,
                                      t, coef, scratch)
    group = hp[contract.HP_GROUP]
    group_pen = 0.0
    if group > 0:           # the penalty of w before the step, like the other terms
        _column_norms(w, scratch)
        for j in range(w.shape[1]):
            group_pen += scratch[j]
        group_pen *= group
    pen = _penalized_update_flat(uses, par, w.reshape(n), g.reshape(n), mf, vf, hp, opt, t,
                                 coef, scratch)
    pen += group_pen
    if group > 0:
        O = w.shape[1]
        _group_prox_cols(w, v, opt, group, hp[contract.HP_LR], coef, scratch[:O], scratch[O:2 * O])
    c = hp[contract.HP_MAXNORM]
    if c > 0:
        _maxnorm_cols(w, c, coef, scratch)
    return pen


@kernel
def penalized_update_1d(uses, par, w, g, m, v, hp, opt, t, coef, scratch):
    """The fused step of a vector (a bias; a BatchNorm's gamma; beta, flattened)."""
    return _penalized_update_flat(uses, par, w, g, m, v, hp, opt, t, coef, scratch)


def scratch_size(n_params, widest):
    """float64 scratch for the penalty partial sums and the column passes."""
    return max(2 * (n_params // UPDATE_CHUNK + 1), 2 * widest, 2)


@kernel
def clip_gradients(grad, segments, mode, value):
    """contract CLIP_* on the flat gradient buffer, in place (reference clip_gradients)."""
    if mode == contract.CLIP_NONE:
        return
    dt = grad.dtype.type
    if mode == contract.CLIP_VALUE:
        hi = dt(value)
        lo = dt(-value)
        for i in range(grad.shape[0]):
            g = grad[i]
            if g > hi:
                grad[i] = hi
            elif g < lo:
                grad[i] = lo
        return
    n_seg = 1 if mode == contract.CLIP_GLOBAL_NORM else segments.shape[0]
    for s in range(n_seg):
        a = 0 if mode == contract.CLIP_GLOBAL_NORM else segments[s, 0]
        b = grad.shape[0] if mode == contract.CLIP_GLOBAL_NORM else segments[s, 1]
        acc = 0.0
        for i in range(a, b):
            acc += np.float64(grad[i]) * np.float64(grad[i])
        coef = value / (math.sqrt(acc) + contract.CLIP_EPS)
        if coef < 1.0:
            c = dt(coef)
            for i in range(a, b):
                grad[i] *= c
