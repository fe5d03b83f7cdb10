"""The dense layer with BatchNorm on its pre-activation, on the device (twin of
kernels/reference/batchnorm.py), training only (inference folds it into W, b).

Shape legend: B batch rows, I fan_in, O fan_out. Layouts of gb, stats, save: contract BN_*.

The column statistics need the whole batch, so this epilogue cannot live in the GEMM's
tiles: forward is a plain GEMM (dense.matmul), then `bn_forward`, a thread per unit with the
rows in order (the CPU's column sums). Backward: the layer's output epilogue is applied by
whoever writes its dL/d(out) (the loss kernel, or the next layer's dx GEMM), then
`bn_backward` turns dy into dz in place, then the dense backward's GEMMs with no bias
gradient (db is exactly 0).
"""
import math

import numpy as np

from .. import contract
from ..contract import STREAM_DROPOUT, STREAM_NOISE
from .dense import matmul
from .jit import cuda
from .loss import ST_STOP


def build(ns):
    FT, ZERO = ns.FT, ns.ZERO
    U0 = np.uint64(0)
    philox_word, normal_at, from_input = ns.philox_word, ns.normal_at, ns.from_input
    forward_value, noise_forward_value = ns.forward_value, ns.noise_forward_value
    activate = ns.activate

    @cuda.jit
    def bn_forward(out, bias, has_bias, gb, xhat, save, act, slope, thr, scale, eps, k0, k1,
                   step, layer, noise, nstd, pre, keep_pre):
        """After a plain GEMM (out = x @ W), a thread per unit j, rows in order: z = out + b;
        batch mean and biased variance (float64, two passes); inv_std rounded to the dtype;
        zhat -> xhat, y = gamma * zhat + beta, out = dropout(noise(f(y))); with keep_pre,
        pre = y (an "input" activation) or f(y) (with noise)."""
        j = cuda.grid(1)
        B, O = out.shape
        if j < O:
            s = 0.0
            for i in range(B):
                v = out[i, j]
                if has_bias:
                    v = v + bias[j]
                    out[i, j] = v
                s += np.float64(v)
            mean = s / B
            q = 0.0
            for i in range(B):
                d = np.float64(out[i, j]) - mean
                q += d * d
            var = q / B
            inv = FT(1.0 / math.sqrt(var + eps))
            save[contract.BN_SAVE_MEAN, j] = mean
            save[contract.BN_SAVE_VAR, j] = var
            save[contract.BN_SAVE_INVSTD, j] = np.float64(inv)
            mu = FT(mean)
            gam = gb[contract.BN_GAMMA, j]
            bet = gb[contract.BN_BETA, j]
            for i in range(B):
                xh = (out[i, j] - mu) * inv
                xhat[i, j] = xh
                e = i * O + j
                y = gam * xh + bet
                if keep_pre and from_input(act):
                    pre[i, j] = y
                word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
                if noise != contract.NOISE_NONE:
                    nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
                    v, a = noise_forward_value(y, act, slope, thr, scale, word, noise, nstd,
                                               nrm)
                    if keep_pre and not from_input(act):
                        pre[i, j] = a
                    out[i, j] = v
                else:
                    if keep_pre and not from_input(act):   # activity penalty under dropout
                        pre[i, j] = activate(y, act, slope)
                    out[i, j] = forward_value(y, act, slope, thr, scale, word)

    @cuda.jit
    def bn_backward(grad, xhat, gb, save, dgb, db, has_bias, stats, momentum, status):
        """grad holds dy (the activation / dropout backward already applied); a thread per
        unit: dbeta = sum dy, dgamma = sum dy * zhat (float64, rows in order) -> dgb; dz =
        c1 * ((dy - c2) - zhat * c3) in place; db = 0; then, unless the step stopped on a
        non-finite loss, the running statistics (Keras' momentum, biased variance)."""
        j = cuda.grid(1)
        B, O = grad.shape
        if j < O:
            s1 = 0.0
            s2 = 0.0
            for i in range(B):
                d = np.float64(grad[i, j])
                s1 += d
                s2 += d * np.float64(xhat[i, j])
            dgb[contract.BN_GAMMA, j] = FT(s2)
            dgb[contract.BN_BETA, j] = FT(s1)
            c1 = FT(np.float64(gb[contract.BN_GAMMA, j]) * save[contract.BN_SAVE_INVSTD, j])
            c2 = FT(s1 / B)
            c3 = FT(s2 / B)
            for i in range(B):
                grad[i, j] = c1 * ((grad[i, j] - c2) - xhat[i, j] * c3)
            if has_bias:
                db[j] = ZERO
            if status[ST_STOP] == 0.0:
                rest = 1.0 - momentum
                stats[contract.BN_MEAN, j] = FT(momentum * np.float64(stats[contract.BN_MEAN, j])
                                                + rest * save[contract.BN_SAVE_MEAN, j])
                stats[contract.BN_VAR, j] = FT(momentum * np.float64(stats[contract.BN_VAR, j])
                                               + rest * save[contract.BN_SAVE_VAR, j])

    ns.__dict__.update(bn_forward=bn_forward, bn_backward=bn_backward)


# ---------------------------------------------------------------- launches
def forward(ns, x, W, b, has_bias, out, xhat, gb, save, act, slope, thr, scale, eps, k0, k1,
            step, layer, noise=contract.NOISE_NONE, nstd=None, pre=None):
    """BatchNorm dense forward on device arrays: a plain GEMM, then bn_forward. noise, nstd,
    pre as in dense.forward."""
    matmul(ns, x, W, out, 0, 0)
    O = out.shape[1]
    nstd = ns.ZERO if nstd is None else nstd
    ns.bn_forward[(O + ns.NB - 1) // ns.NB, ns.NB](
        out, b, has_bias, gb, xhat, save, act, slope, thr, scale, eps, k0, k1, step, layer,
        noise, nstd, ns.dummy if pre is None else pre, pre is not None)


def backward(ns, dy, xhat, gb, save, dgb, db, has_bias, stats, momentum, status):
    """dy -> dz in place through the batch statistics; dgb, db = 0, the running statistics."""
    O = dy.shape[1]
    ns.bn_backward[(O + ns.NB - 1) // ns.NB, ns.NB](dy, xhat, gb, save, dgb, db, has_bias,
                                                    stats, momentum, status)
