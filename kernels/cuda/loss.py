"""The losses from logits on the device (twin of kernels/reference/loss.py), and the status
vector where a device epoch keeps its sums (nothing is copied back per step).

Shape legend: B batch rows, K outputs, P parts.

The loss math is one row (the categorical losses) or one element (the others) at a time,
shared by `loss_kernel` (one block: the tiled path and the per-op contract) and the fused
small-MLP kernels (fused.py). Losses are summed in float64, gradients are in the dtype; a
part's loss parameter (contract PF_LOSS_PARAM) arrives as a float64 `param`.

The status vector (float64, on the device): the penalty sum, the step count, the stop flag,
then per part its loss sum and its batch mean (status_size). The loss kernel of a part
writes its batch mean; the one of the last part with a loss commits the step: every part's
mean finite -> the loss sums and the step count grow; else the stop flag is set, and every
later update of the call is skipped (the kernels check the flag): the reference's "stop
before the update".
"""
import math

import numpy as np

from .. import contract
from .jit import cuda, numba

ST_PEN = 0
ST_STEPS = 1
ST_STOP = 2
ST_PARTS = 4        # part p: loss sum at ST_PARTS + 2p, batch mean at ST_PARTS + 2p + 1


def status_size(n_parts):
    return ST_PARTS + 2 * int(n_parts)


def loss_slot(p):
    return ST_PARTS + 2 * p


def batch_slot(p):
    return ST_PARTS + 2 * p + 1


def build(ns):
    build_math(ns)
    build_kernel(ns)


def build_math(ns):
    dev, FT, ZERO, ONE = ns.dev, ns.FT, ns.ZERO, ns.ONE
    activate = ns.activate

    @cuda.jit(**dev)
    def row_lse(z, i, K):
        """(zmax, the softmax denominator in the dtype, log-sum-exp in float64) of logits
        row z[i, :K]."""
        zmax = z[i, 0]
        for k in range(1, K):
            if z[i, k] > zmax:
                zmax = z[i, k]
        s = ZERO
        s64 = 0.0
        for k in range(K):
            s += math.exp(z[i, k] - zmax)
            s64 += math.exp(np.float64(z[i, k]) - np.float64(zmax))
        return zmax, s, math.log(s64) + np.float64(zmax)

    @cuda.jit(**dev)
    def sce_row(z, i, K, y, src, y0, mixed, ls):
        """Sparse CE of logits row z[i, :K] against the target row y[src, y0:] (a Mixup
        target (label_a, label_b, lam) when `mixed`, contract.SCE_*), label smoothing ls:
        (loss in float64, zmax, the softmax denominator in the dtype, label_a, label_b,
        lam)."""
        label = int(y[src, y0 + contract.SCE_LABEL])
        label_b = label
        lam = ONE
        if mixed:
            label_b = int(y[src, y0 + contract.SCE_LABEL_B])
            lam = y[src, y0 + contract.SCE_LAM]
        zmax, s, lse = row_lse(z, i, K)
        lam64 = np.float64(lam)
        if ls != 0.0:
            zsum = 0.0
            for k in range(K):
                zsum += np.float64(z[i, k])
            on64 = 1.0 - ls
            off64 = ls / K
            if mixed:
                total = lse - off64 * zsum - on64 * (lam64 * np.float64(z[i, label])
                                                     + (1.0 - lam64) * np.float64(z[i, label_b]))
            else:
                total = lse - off64 * zsum - on64 * np.float64(z[i, label])
        elif mixed:
            total = (lam64 * (lse - np.float64(z[i, label]))
                     + (1.0 - lam64) * (lse - np.float64(z[i, label_b])))
        else:
            total = lse - np.float64(z[i, label])
        return total, zmax, s, label, label_b, lam

    @cuda.jit(**dev)
    def sce_grad(zk, k, zmax, s, label, label_b, lam, mixed, c, ls, K):
        """d(mean sparse CE)/dz of logit k of a row (sce_row's values; c = 1 / B)."""
        p = math.exp(zk - zmax) / s
        if ls != 0.0:
            on = FT(1.0 - ls)
            p = p - FT(ls / K)
            if mixed:
                if k == label:
                    p = p - on * lam
                if k == label_b:
                    p = p - on * (ONE - lam)
            elif k == label:
                p = p - on
        elif mixed:
            if k == label:
                p = p - lam
            if k == label_b:
                p = p - (ONE - lam)
        elif k == label:
            p = p - ONE
        return p * c

    @cuda.jit(**dev)
    def smoothed_target(t, ls, K):
        """(1 - ls) t + ls / K in the dtype; t itself when ls is 0."""
        if ls != 0.0:
            return t * FT(1.0 - ls) + FT(ls / K)
        return t

    @cuda.jit(**dev)
    def cce_row(z, i, K, y, src, y0, ls):
        """categorical_crossentropy of logits row z[i, :K] against the smoothed target row
        y[src, y0:y0 + K]: (S lse - sum t z in float64, zmax, the softmax denominator, S)."""
        zmax, s, lse = row_lse(z, i, K)
        S = ZERO
        S64 = 0.0
        tz64 = 0.0
        for k in range(K):
            t = smoothed_target(y[src, y0 + k], ls, K)
            S += t
            S64 += np.float64(t)
            tz64 += np.float64(t) * np.float64(z[i, k])
        return S64 * lse - tz64, zmax, s, S

    @cuda.jit(**dev)
    def cce_grad(zk, t, zmax, s, S, c, ls, K):
        """(p S - t) / B for logit zk with (unsmoothed) target t (cce_row's values)."""
        return (math.exp(zk - zmax) / s * S - smoothed_target(t, ls, K)) * c

    @cuda.jit(**dev)
    def sign(d):
        if d > ZERO:
            return ONE
        if d < ZERO:
            return -ONE
        return d * ZERO         # 0, or NaN for NaN

    @cuda.jit(**dev)
    def pointwise_loss(zz, t, loss, c, param):
        """(loss in float64, d(mean loss)/dz in the dtype) of one element under an
        elementwise loss (c = 2 / (B K) for mse, else 1 / (B K); param: huber's delta)."""
        if loss == contract.LOSS_MSE:
            d = zz - t
            return np.float64(d) * np.float64(d), d * c
        z64 = np.float64(zz)
        if loss == contract.LOSS_BCE:
            return ((max(z64, 0.0) - z64 * np.float64(t) + math.log1p(math.exp(-abs(z64)))),
                    (activate(zz, contract.ACT_SIGMOID, zz) - t) * c)
        if loss == contract.LOSS_POISSON:      # zz the log-rate: exp(z) - y z
            return math.exp(z64) - np.float64(t) * z64, (math.exp(zz) - t) * c
        d = zz - t
        a64 = abs(np.float64(d))
        if loss == contract.LOSS_MAE:
            return a64, sign(d) * c
        if loss == contract.LOSS_HUBER:
            delta = FT(param)
            if abs(d) > delta:          # NaN is not: its gradient stays NaN
                delta64 = np.float64(delta)
                return delta64 * (a64 - 0.5 * delta64), (sign(d) * delta) * c
            return 0.5 * np.float64(d) * np.float64(d), d * c
        # log_cosh
        return a64 + math.log1p(math.exp(-2.0 * a64)) - math.log(2.0), math.tanh(d) * c

    @cuda.jit(**dev)
    def row_loss(loss):
        """Whether the loss is taken per row (the categorical ones), not per element."""
        return loss == contract.LOSS_SCE or loss == contract.LOSS_CCE

    @cuda.jit(**dev)
    def loss_scale(loss, B, K):
        """c of sce_grad / cce_grad / pointwise_loss, and the denominator of the batch
        mean."""
        if loss == contract.LOSS_SCE or loss == contract.LOSS_CCE:
            return FT(1.0 / B), np.float64(B)
        if loss == contract.LOSS_MSE:
            return FT(2.0 / (B * K)), np.float64(B * K)
        return FT(1.0 / (B * K)), np.float64(B * K)

    @cuda.jit(**dev)
    def record_batch_loss(status, p, P, mean, accumulate, commit, weight):
        """Part p's batch mean into its slot; with `accumulate` and `commit` (the last part
        with a loss), the step's commit: the loss sums (weighted by `weight`, the batch
        rows) and the step count, or the stop flag at the first non-finite mean."""
        status[ST_PARTS + 2 * p + 1] = mean
        if accumulate and commit and status[ST_STOP] == 0.0:
            finite = True
            for q in range(P):
                m = status[ST_PARTS + 2 * q + 1]
                if math.isnan(m) or math.isinf(m):
                    finite = False
            if not finite:
                status[ST_STOP] = 1.0
            else:
                for q in range(P):
                    status[ST_PARTS + 2 * q] += status[ST_PARTS + 2 * q + 1] * weight
                status[ST_STEPS] += 1.0

    ns.__dict__.update(sce_row=sce_row, sce_grad=sce_grad, cce_row=cce_row, cce_grad=cce_grad,
                       pointwise_loss=pointwise_loss, row_loss=row_loss, loss_scale=loss_scale,
                       record_batch_loss=record_batch_loss, ST_STOP=ST_STOP)


def build_kernel(ns):
    NB, ONE = ns.NB, ns.ONE
    U0 = np.uint64(0)
    sce_row, sce_grad, pointwise_loss = ns.sce_row, ns.sce_grad, ns.pointwise_loss
    cce_row, cce_grad, row_loss = ns.cce_row, ns.cce_grad, ns.row_loss
    loss_scale, record_batch_loss = ns.loss_scale, ns.record_batch_loss
    philox_word, backward_value = ns.philox_word, ns.backward_value

    @cuda.jit
    def loss_kernel(z, y, y0, ky, wcol, grad, loss, param, want_grad, lw, status, part,
                    n_parts, commit, accumulate, weight, act, slope, thr, scale, k0, k1, step,
                    layer):
        """Part `part`'s mean loss of the batch (targets y[:, y0:y0 + ky], the loss's
        parameter `param`) into its status slot; grad = lw * d(mean)/dz (lw the part's loss
        weight), then the last layer's backward epilogue (identity for a linear layer
        without dropout). wcol >= 0: row i's sample weight y[i, wcol] multiplies its loss
        and gradient (reference weighted_loss_forward_backward). With `accumulate` and
        `commit`: the step's commit (record_batch_loss). One block of NB threads."""
        red = cuda.shared.array(NB, numba.float64)
        tid = cuda.threadIdx.x
        B, K = z.shape
        c, denom = loss_scale(loss, B, K)
        total = 0.0
        if row_loss(loss):
            mixed = loss == contract.LOSS_SCE and ky == contract.SCE_MIXED_WIDTH
            for i in range(tid, B, NB):
                S = ONE
                label = 0
                label_b = 0
                lam = ONE
                if loss == contract.LOSS_SCE:
                    row, zmax, s, label, label_b, lam = sce_row(z, i, K, y, i, y0, mixed, param)
                else:
                    row, zmax, s, S = cce_row(z, i, K, y, i, y0, param)
                wi = ONE if wcol < 0 else y[i, wcol]
                total += row * wi
                if want_grad:
                    for k in range(K):
                        if loss == contract.LOSS_SCE:
                            g = sce_grad(z[i, k], k, zmax, s, label, label_b, lam, mixed, c,
                                         param, K)
                        else:
                            g = cce_grad(z[i, k], y[i, y0 + k], zmax, s, S, c, param, K)
                        if wcol >= 0:
                            g = g * wi
                        if lw != ONE:
                            g = g * lw
                        word = (philox_word(i * K + k, k0, k1, step, layer, contract.STREAM_DROPOUT)
                                if thr > 0 else U0)
                        grad[i, k] = backward_value(g, z[i, k], act, slope, thr, scale, word)
        else:
            for e in range(tid, B * K, NB):
                i = e // K
                k = e - i * K
                zz = z[i, k]
                l64, g = pointwise_loss(zz, y[i, y0 + k], loss, c, param)
                if wcol >= 0:
                    wi = y[i, wcol]
                    l64 = l64 * wi
                    g = g * wi
                total += l64
                if want_grad:
                    if lw != ONE:
                        g = g * lw
                    word = (philox_word(e, k0, k1, step, layer, contract.STREAM_DROPOUT) if thr > 0
                            else U0)
                    grad[i, k] = backward_value(g, zz, act, slope, thr, scale, word)
        red[tid] = total
        cuda.syncthreads()
        half = NB // 2
        while half > 0:
            if tid < half:
                red[tid] += red[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            record_batch_loss(status, part, n_parts, red[0] / denom, accumulate, commit,
                              weight)

    ns.loss_kernel = loss_kernel
