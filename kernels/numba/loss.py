"""The Numba losses, from logits (twin of kernels/reference/loss.py): the batch mean in
float64 and its gradient in the dtype, one pass over the logits.

Shape legend: B batch rows, K outputs.
"""
import math

import numpy as np

from .. import contract as C
from .epilogue import activate
from .jit import kernel


@kernel
def loss_forward_backward(z, y, grad, loss, want_grad):
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
                    grad[i, k] = (activate(z[i, k], C.ACT_SIGMOID, z[i, k]) - y[i, k]) * c
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
