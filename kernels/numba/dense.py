"""The Numba dense layer (twin of kernels/reference/dense.py): one GEMM and the epilogue,
forward and backward side by side.

Shape legend: B batch rows, I fan_in, O fan_out. GEMMs are ``np.dot(a, b, out)``: BLAS
sgemm/dgemm, transposes passed as flags, no copies.
"""
import numpy as np

from .. import contract
from .epilogue import (backward_epilogue, fill_output_words, forward_epilogue, noise_parallel,
                       noise_range)
from .jit import kernel
from .philox import philox_fill


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
                   step, layer, words, noise, nstd, pre, nwords):
    """grad (B, O) holds dL/d(out) on entry and dL/dz on exit; dW, db (if any), dx (if any)."""
    fill_output_words(par, words, nwords, out.size, k0, k1, step, layer, thr, noise, True)
    backward_epilogue(uses, par, grad, out, db, act, slope, thr, scale, words, noise, nstd,
                      pre, nwords)
    np.dot(x.T, grad, dW)
    if dx.size > 0:
        np.dot(grad, W.T, dx)


@kernel
def weight_noise(par, W, out, std, k0, k1, step, layer, words):
    """out = W + std * n (reference weight_noise): the step's perturbed kernel, n the normals
    of stream STREAM_WEIGHT_NOISE in W's row-major order (words: (4, G) scratch, G >=
    ceil(W.size / 4)), rounded to the dtype first; std in the dtype. The additive noise
    pass of the noise layers (NOISE_ADD, no mask), over fixed chunks when big enough."""
    n = W.size
    philox_fill(par, words, n, k0, k1, step, layer, contract.STREAM_WEIGHT_NOISE)
    flat = out.reshape(n)
    flat[:] = W.reshape(n)
    one = flat.dtype.type(1)
    if par is not None:
        if n >= contract.PARALLEL_MIN_ELEMENTS:
            noise_parallel(flat, words, contract.NOISE_ADD, std, words, 0, one)
            return
    noise_range(flat, flat[:0], False, words, contract.NOISE_ADD, std, words, 0, one, 0, n)
