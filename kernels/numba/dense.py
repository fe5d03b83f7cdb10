"""The Numba dense layer (twin of kernels/reference/dense.py): one GEMM and the epilogue,
forward and backward side by side.

Shape legend: B batch rows, I fan_in, O fan_out. GEMMs are ``np.dot(a, b, out)``: BLAS
sgemm/dgemm, transposes passed as flags, no copies.
"""
import numpy as np

from .epilogue import backward_epilogue, fill_output_words, forward_epilogue
from .jit import kernel


@kernel
def dense_forward(uses, par, x, W, b, out, act, slope, thr, scale, k0, k1, step, layer,
                  words, noise, nstd, pre, nwords):
    """out = dropout(noise(f(x @ W + b))); pre = what f' needs when pre is not empty."""
    np.dot(x, W, out)
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, False)
    forward_epilogue(uses, par, out, b, act, slope, thr, scale, words, noise, nstd, pre,
                     nwords)


@kernel
def dense_backward(uses, par, grad, out, x, W, dW, db, dx, act, slope, thr, scale, k0, k1,
                   step, layer, words, noise, nstd, pre, nwords, activity):
    """grad (B, O) holds dL/d(out) on entry and dL/dz on exit; dW, db (if any), dx (if any).
    activity: None, or the layer's activity penalty (epilogue.activity_grads); returns its
    (sum |a|, sum a^2), (0, 0) without one."""
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, True)
    sums = backward_epilogue(uses, par, grad, out, db, act, slope, thr, scale, words, noise,
                             nstd, pre, nwords, activity)
    np.dot(x.T, grad, dW)
    if dx.size > 0:
        np.dot(grad, W.T, dx)
    return sums
