"""The losses from logits on the device (twin of kernels/reference/loss.py), and the status
vector where a device epoch keeps its sums (nothing is copied back per step).

Shape legend: B batch rows, K outputs, P parts.

The loss math is one row (sparse CE) or one element (mse, binary CE) at a time, shared by
`loss_kernel` (one block: the tiled path and the per-op contract) and the fused small-MLP
kernels (fused.py). Losses are summed in float64, gradients are in the dtype.

The status vector (float64, on the device): the penalty sum, the step count, the stop flag,
then per part its loss sum and its batch mean (status_size). The loss kernel of a part
writes its batch mean; the one of the last part with a loss commits the step: every part's
mean finite -> the loss sums and the step count grow; else the stop flag is set, and every
later update of the call is skipped (the kernels check the flag): the reference's "stop
before the update".
"""
import math

import numpy as np

from .. import contract as C
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
    def sce_row(z, i, K, y, src, y0, mixed):
        """Sparse CE of logits row z[i, :K] against the target row y[src, y0:] (a Mixup
        target (label_a, label_b, lam) when `mixed`, contract.SCE_*): (loss in float64, zmax,
        the softmax denominator in the dtype, label_a, label_b, lam)."""
        label = int(y[src, y0 + C.SCE_LABEL])
        label_b = label
        lam = ONE
        if mixed:
            label_b = int(y[src, y0 + C.SCE_LABEL_B])
            lam = y[src, y0 + C.SCE_LAM]
        zmax = z[i, 0]
        for k in range(1, K):
            if z[i, k] > zmax:
                zmax = z[i, k]
        s = ZERO
        s64 = 0.0
        for k in range(K):
            s += math.exp(z[i, k] - zmax)
            s64 += math.exp(np.float64(z[i, k]) - np.float64(zmax))
        lse = math.log(s64) + np.float64(zmax)
        if mixed:
            lam64 = np.float64(lam)
            total = (lam64 * (lse - np.float64(z[i, label]))
                     + (1.0 - lam64) * (lse - np.float64(z[i, label_b])))
        else:
            total = lse - np.float64(z[i, label])
        return total, zmax, s, label, label_b, lam

    @cuda.jit(**dev)
    def sce_grad(zk, k, zmax, s, label, label_b, lam, mixed, c):
        """d(mean sparse CE)/dz of logit k of a row (sce_row's values; c = 1 / B)."""
        p = math.exp(zk - zmax) / s
        if mixed:
            if k == label:
                p = p - lam
            if k == label_b:
                p = p - (ONE - lam)
        elif k == label:
            p = p - ONE
        return p * c

    @cuda.jit(**dev)
    def pointwise_loss(zz, t, loss, c):
        """(loss in float64, d(mean loss)/dz in the dtype) of one element under mse or
        binary_crossentropy from logits (c = 2 / (B K) or 1 / (B K))."""
        if loss == C.LOSS_MSE:
            d = zz - t
            return np.float64(d) * np.float64(d), d * c
        z64 = np.float64(zz)
        return ((max(z64, 0.0) - z64 * np.float64(t) + math.log1p(math.exp(-abs(z64)))),
                (activate(zz, C.ACT_SIGMOID, zz) - t) * c)

    @cuda.jit(**dev)
    def loss_scale(loss, B, K):
        """c of sce_grad / pointwise_loss, and the denominator of the batch mean."""
        if loss == C.LOSS_SCE:
            return FT(1.0 / B), np.float64(B)
        if loss == C.LOSS_MSE:
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

    ns.__dict__.update(sce_row=sce_row, sce_grad=sce_grad, pointwise_loss=pointwise_loss,
                       loss_scale=loss_scale, record_batch_loss=record_batch_loss,
                       ST_STOP=ST_STOP)


def build_kernel(ns):
    NB, ONE = ns.NB, ns.ONE
    U0 = np.uint64(0)
    sce_row, sce_grad, pointwise_loss = ns.sce_row, ns.sce_grad, ns.pointwise_loss
    loss_scale, record_batch_loss = ns.loss_scale, ns.record_batch_loss
    philox_word, backward_value = ns.philox_word, ns.backward_value

    @cuda.jit
    def loss_kernel(z, y, y0, ky, grad, loss, want_grad, lw, status, part, n_parts, commit,
                    accumulate, weight, act, slope, thr, scale, k0, k1, step, layer):
        """Part `part`'s mean loss of the batch (targets y[:, y0:y0 + ky]) into its status
        slot; grad = lw * d(mean)/dz (lw the part's loss weight), then the last layer's
        backward epilogue (identity for a linear layer without dropout). With `accumulate`
        and `commit`: the step's commit (record_batch_loss). One block of NB threads."""
        red = cuda.shared.array(NB, numba.float64)
        tid = cuda.threadIdx.x
        B, K = z.shape
        c, denom = loss_scale(loss, B, K)
        total = 0.0
        if loss == C.LOSS_SCE:
            mixed = ky == C.SCE_MIXED_WIDTH
            for i in range(tid, B, NB):
                row, zmax, s, label, label_b, lam = sce_row(z, i, K, y, i, y0, mixed)
                total += row
                if want_grad:
                    for k in range(K):
                        g = sce_grad(z[i, k], k, zmax, s, label, label_b, lam, mixed, c)
                        if lw != ONE:
                            g = g * lw
                        word = (philox_word(i * K + k, k0, k1, step, layer, C.STREAM_DROPOUT)
                                if thr > 0 else U0)
                        grad[i, k] = backward_value(g, z[i, k], act, slope, thr, scale, word)
        else:
            for e in range(tid, B * K, NB):
                i = e // K
                k = e - i * K
                zz = z[i, k]
                l64, g = pointwise_loss(zz, y[i, y0 + k], loss, c)
                total += l64
                if want_grad:
                    if lw != ONE:
                        g = g * lw
                    word = (philox_word(e, k0, k1, step, layer, C.STREAM_DROPOUT) if thr > 0
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
