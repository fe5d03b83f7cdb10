"""The reference dense layer with BatchNorm on its pre-activation (Ioffe & Szegedy 2015),
training only (inference folds it into W, b), forward and backward side by side.

Shape legend: B batch rows, I fan_in, O fan_out. Layouts of gb, stats, save:
kernels/contract.py (BN_*).
"""
import numpy as np

from .. import contract
from .dense import epilogue_backward
from .epilogue import activate_keeping, output_epilogue


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=contract.NOISE_NONE, noise_std=0.0, pre=None):
    """out = dropout(noise(f(gamma * zhat + beta))), zhat = (z - mean) / sqrt(var + eps),
    z = x @ W + b, with the batch mean and biased variance of every unit (Ioffe & Szegedy
    2015). The noise, dropout and pre are dense_forward's (output_epilogue).

    The statistics are summed in float64 in row order (mean first, then the squared
    deviations); inv_std = 1 / sqrt(var + eps) in float64; mean and inv_std are rounded once
    to the dtype, and zhat, y, f(y) are computed in the dtype. Writes out, xhat (zhat: what
    backward needs besides out) and save (mean, var, inv_std). The running statistics are
    not touched here: bn_dense_backward updates them once the step's loss is known finite.
    """
    dt = out.dtype.type
    n = x.shape[0]
    z = x @ W
    if b.size:
        z += b
    z64 = z.astype(np.float64)
    mean = z64.sum(axis=0) / n
    var = ((z64 - mean) ** 2).sum(axis=0) / n
    inv = (1.0 / np.sqrt(var + float(dt(eps)))).astype(out.dtype)
    save[contract.BN_SAVE_MEAN] = mean
    save[contract.BN_SAVE_VAR] = var
    save[contract.BN_SAVE_INVSTD] = inv
    xh = (z - mean.astype(out.dtype)) * inv
    xhat[...] = xh
    output_epilogue(activate_keeping(gb[contract.BN_GAMMA] * xh + gb[contract.BN_BETA], act,
                                     slope, pre),
                    out, drop_threshold, drop_scale, seed, step, layer, noise, noise_std, pre,
                    act)


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=contract.NOISE_NONE, noise_std=0.0, pre=None, activity_l1=0.0,
                      activity_l2=0.0):
    """The BatchNorm dense layer's backward, through the batch statistics; returns the
    layer's activity penalty of the step (dense_backward's).

    grad (B, O) holds dL/d(out) on entry and dL/dz on exit. dy = dL/d(gamma zhat + beta) comes
    from out (or pre, with noise) and the regenerated mask and noise exactly as in
    dense_backward (output_epilogue_backward, or activity_epilogue_backward with an activity
    penalty on f(gamma zhat + beta)); then, per unit, in float64
    in row order: dbeta = sum dy, dgamma = sum dy * zhat, and
        dz = c1 * ((dy - c2) - zhat * c3),  c1 = gamma * inv_std, c2 = dbeta / B, c3 = dgamma / B
    (c1, c2, c3 rounded once to the dtype). db is exactly 0: the output does not depend on b
    (the batch mean absorbs it). dgb = (dgamma, dbeta); dW, dx as in dense_backward. Last, the
    running statistics: stats = momentum * stats + (1 - momentum) * (batch mean, biased batch
    variance), in float64, rounded to the dtype (Keras' convention).
    """
    dt = out.dtype.type
    n = grad.shape[0]
    dy, pen = epilogue_backward(grad, out, act, slope, drop_threshold, drop_scale, seed, step,
                                layer, noise, noise_std, pre, activity_l1, activity_l2)
    dy64 = dy.astype(np.float64)
    s1 = dy64.sum(axis=0)
    s2 = (dy64 * xhat.astype(np.float64)).sum(axis=0)
    dgb[contract.BN_GAMMA] = s2
    dgb[contract.BN_BETA] = s1
    c1 = (gb[contract.BN_GAMMA].astype(np.float64) * \
          save[contract.BN_SAVE_INVSTD]).astype(out.dtype)
    c2 = (s1 / n).astype(out.dtype)
    c3 = (s2 / n).astype(out.dtype)
    dz = c1 * ((dy - c2) - xhat * c3)
    grad[...] = dz
    if db.size:
        db[...] = 0
    dW[...] = x.T @ dz
    if dx.size:
        dx[...] = dz @ W.T
    mom = float(dt(momentum))
    for row, srow in ((contract.BN_MEAN, contract.BN_SAVE_MEAN),
                      (contract.BN_VAR, contract.BN_SAVE_VAR)):
        stats[row] = mom * stats[row].astype(np.float64) + (1.0 - mom) * save[srow]
    return pen
