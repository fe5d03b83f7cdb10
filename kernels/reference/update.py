"""The reference penalized update: one fused step of one parameter tensor, the spec of every
backend's update (PyTorch's optimizer formulas; the penalties of DESIGN.md).

The step, in order: the smooth penalties' gradient (L2, and L1's subgradient when not
proximal) added to the data gradient; the optimizer step (SGD with momentum / Nesterov,
Adam, AdamW's decoupled decay first); then the proximal maps and projections: L1's
soft-thresholding, the group lasso's block soft-thresholding, the max-norm projection.
"""
import math

import numpy as np

from .. import contract


def update_coefficients(hp, opt, t, dtype):
    """Every scalar the fused update needs, computed once in float64, rounded to dtype.

    Returns (lr, b1, omb1, b2, omb2, eps, l1, l2, decay, step_size, bc2_sqrt, lr_l1, maxnorm).
    Bias corrections follow PyTorch: step_size = lr / (1 - b1**t), denominator
    sqrt(v) / sqrt(1 - b2**t) + eps; AdamW multiplies w by (1 - lr * wd) first.
    """
    lr, b1, b2 = hp[contract.HP_LR], hp[contract.HP_BETA1], hp[contract.HP_BETA2]
    if opt == contract.OPT_SGD:
        step_size, bc2_sqrt = lr, 1.0
    else:
        step_size = lr / (1.0 - b1 ** float(t))
        bc2_sqrt = math.sqrt(1.0 - b2 ** float(t))
    decay = 1.0 - lr * hp[contract.HP_DECOUPLED] if opt == contract.OPT_ADAMW else 1.0
    vals = (lr, b1, 1.0 - b1, b2, 1.0 - b2, hp[contract.HP_EPS], hp[contract.HP_L1],
            hp[contract.HP_L2], decay, step_size, bc2_sqrt, lr * hp[contract.HP_L1],
            hp[contract.HP_MAXNORM])
    return tuple(dtype(v) for v in vals)


def column_norms(w):
    """The L2 norm of every column of a matrix (every unit's incoming weights), in float64."""
    return np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))


def penalty_value(w, hp):
    """l1 * sum|w| + l2 / 2 * sum w^2 (+ group * sum_j ||w[:, j]|| for a matrix), in float64."""
    w64 = w.astype(np.float64)
    pen = float(hp[contract.HP_L1] * np.abs(w64).sum() + \
                0.5 * hp[contract.HP_L2] * (w64 * w64).sum())
    if hp[contract.HP_GROUP] > 0 and w.ndim == 2:
        pen += float(hp[contract.HP_GROUP] * column_norms(w).sum())
    return pen


def group_prox(w, tau):
    """Block soft-thresholding of every column: w_j <- w_j * max(0, 1 - tau_j / ||w_j||).

    The proximal map of tau_j * ||w_j|| (tau a scalar or one value per column): a column
    whose norm is at most tau_j becomes exactly zero (the unit is dead), the others shrink
    toward zero along their own direction. The scale is computed in float64 and rounded to
    the parameter dtype before it multiplies.
    """
    norms = column_norms(w)
    tau = np.broadcast_to(np.asarray(tau, np.float64), norms.shape)
    alive = norms > tau
    scale = np.zeros_like(norms)
    scale[alive] = 1.0 - tau[alive] / norms[alive]
    w *= scale.astype(w.dtype)


def group_thresholds(v, hp, opt, step_size, bc2_sqrt, eps):
    """The block-prox threshold of every column for group strength hp[HP_GROUP].

    SGD: lr * group. Adam/AdamW: the prox is taken in the column's mean Adam metric,
    group * step_size / mean_i(sqrt(v_ij) / bc2_sqrt + eps), the block analogue of taking the
    L1 threshold in Adam's per-coordinate metric (an exact block prox in a diagonal metric
    has no closed form). A unit whose gradients are small relative to the penalty then dies,
    as with SGD; with the Euclidean threshold lr * group, Adam's normalised steps would keep
    every unit alive. Everything in float64 from the dtype-rounded coefficients, summed over
    rows in order, so every backend computes the same thresholds.
    """
    group = float(hp[contract.HP_GROUP])
    if opt == contract.OPT_SGD:
        return float(hp[contract.HP_LR]) * group
    den = (np.sqrt(v.astype(np.float64)) / float(bc2_sqrt) + float(eps)).sum(axis=0)
    return group * float(step_size) / (den / v.shape[0])


def penalized_update(w, g, m, v, hp, opt, t):
    """One fused step of one parameter tensor; returns the penalty of w before the step.

    g is the data gradient. The L2 gradient (and the L1 subgradient when not proximal) is
    added here, then the optimizer step, then the L1 proximal shrink, the group-lasso block
    shrink (group_thresholds) and the max-norm projection. t is the 1-based optimizer step.
    m / v are empty when not needed.
    """
    dt = w.dtype.type
    lr, b1, omb1, b2, omb2, eps, l1, l2, decay, step_size, bc2_sqrt, lr_l1, maxnorm = \
        update_coefficients(hp, opt, t, dt)
    proximal = hp[contract.HP_PROXIMAL] != 0
    penalty = penalty_value(w, hp)
    ge = g.copy()
    if l2 != 0:
        ge = ge + l2 * w
    if l1 != 0 and not proximal:
        ge = ge + l1 * np.sign(w)
    if opt == contract.OPT_SGD:
        if m.size:
            m[...] = m * b1 + ge
            d = ge + b1 * m if hp[contract.HP_NESTEROV] != 0 else m
        else:
            d = ge
        w -= lr * d
        tau = lr_l1
    else:
        if opt == contract.OPT_ADAMW:
            w *= decay
        m[...] = m + omb1 * (ge - m)
        v[...] = v * b2 + (omb2 * ge) * ge
        denom = np.sqrt(v) / bc2_sqrt + eps
        w -= step_size * (m / denom)
        tau = lr_l1 / denom
    if l1 != 0 and proximal:
        w[...] = np.sign(w) * np.maximum(np.abs(w) - tau, dt(0))
    if hp[contract.HP_GROUP] > 0 and w.ndim == 2:
        group_prox(w, group_thresholds(v, hp, opt, step_size, bc2_sqrt, eps))
    c = hp[contract.HP_MAXNORM]
    if c > 0 and w.ndim == 2:
        norms = np.sqrt((w.astype(np.float64) ** 2).sum(axis=0))
        over = norms > c
        w[:, over] *= (c / norms[over]).astype(w.dtype)
    return penalty


def clip_gradients(grad, segments, mode, value):
    """contract CLIP_* on the flat gradient buffer, in place: clamp each element (CLIP_VALUE),
    or scale each tensor [offset, end) of `segments` (CLIP_NORM) or all of them
    (CLIP_GLOBAL_NORM) by value / (norm + CLIP_EPS) where that is below 1 (the norms in
    float64, the coefficient rounded once to the dtype)."""
    if mode == contract.CLIP_NONE:
        return
    dt = grad.dtype.type
    if mode == contract.CLIP_VALUE:
        np.clip(grad, dt(-value), dt(value), out=grad)
        return
    if mode == contract.CLIP_GLOBAL_NORM:
        segments = [(0, grad.shape[0])]
    for lo, hi in segments:
        g = grad[lo:hi]
        norm = math.sqrt(float(np.sum(g.astype(np.float64) ** 2)))
        coef = value / (norm + contract.CLIP_EPS)
        if coef < 1.0:
            g *= dt(coef)
