"""Philox4x32-10 (Salmon et al., SC'11), the counter-based generator behind every random draw.

A draw is a pure function of (seed, step, layer, stream, element):
    key     = (seed & 0xffffffff, seed >> 32)
    counter = (element // 4, step, layer, stream)
    word    = philox4x32(counter, key)[element % 4]
A unit is kept iff ``word >= floor(rate * 2**32)`` (see :func:`dropout_threshold`).

This module is NumPy only (the reference backend and the API import it without importing
Numba); every compiled backend has its own twin of the round function (the Numba backend's
``_philox_groups``, the Cython and CUDA kernels), checked against these known answers.
"""
import math

import numpy as np

from .contract import (MC_LAYER_TAG, STREAM_AUGMENT_FLIP, STREAM_AUGMENT_JITTER,  # noqa: F401
                       STREAM_AUGMENT_MIXUP, STREAM_AUGMENT_PARTNER, STREAM_AUGMENT_SHIFT,
                       STREAM_DROPOUT, STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE, STREAM_MC,
                       STREAM_NOISE)

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

# The streams (a counter word per purpose) and the MC layer-word tag are contract facts:
# kernels/contract.py STREAM_TABLE. MC dropout's draws are told apart from training's by the
# layer word: dense layer l of an MC pass uses MC_LAYER_TAG | l (STREAM_MC in the high half),
# and training's layer words are the layer indices l < MAX_LAYER_WORDS, so no MC counter ever
# equals a training counter, whatever the step (kernels/mc.py).


def mc_layer_word(layer):
    """The Philox layer word of dense layer `layer` in an MC-dropout pass."""
    return MC_LAYER_TAG | int(layer)


def split_seed(seed):
    """The 64-bit seed as the two key words (low, high)."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    return seed & MASK32, seed >> 32


def dropout_threshold(rate):
    """floor(rate * 2**32): the integer every backend compares Philox words against."""
    return int(math.floor(float(rate) * 4294967296.0))


def dropout_scale(rate, dtype=np.float32):
    """1 / keep_prob, rounded once to the working dtype so all backends scale identically."""
    return dtype(1.0 / (1.0 - float(rate)))


def philox4x32(c0, c1, c2, c3, k0, k1):
    """Ten rounds of Philox4x32 on one 128-bit counter; returns four uint32 words."""
    return tuple(philox4x32_block([(c0, c1, c2, c3)], (k0, k1))[0])


def philox4x32_block(counters, key):
    """Vectorised Philox on an (n, 4) array of counters with one key; returns (n, 4) uint32."""
    c = np.asarray(counters, dtype=np.uint64).reshape(-1, 4).T.copy()
    k0 = np.uint64(key[0] & MASK32)
    k1 = np.uint64(key[1] & MASK32)
    m0, m1 = np.uint64(PHILOX_M0), np.uint64(PHILOX_M1)
    mask, s32 = np.uint64(MASK32), np.uint64(32)
    c0, c1, c2, c3 = c
    for _ in range(10):
        p0 = m0 * c0
        p1 = m1 * c2
        c0, c1, c2, c3 = ((p1 >> s32) ^ c1 ^ k0) & mask, p1 & mask, ((p0 >> s32) ^ c3 ^ k1) & mask, p0 & mask
        k0 = (k0 + np.uint64(PHILOX_W0)) & mask
        k1 = (k1 + np.uint64(PHILOX_W1)) & mask
    return np.stack([c0, c1, c2, c3], axis=1).astype(np.uint32)


def philox_words(n, seed, step, layer, stream, first=0):
    """The n words of the (seed, step, layer, stream) sequence from element `first` on,
    element-indexed: words of elements first .. first + n - 1 (first > 0: a block of rows
    that is not the batch's first, e.g. one MPI rank's shard of it)."""
    g0 = int(first) // 4
    groups = (int(first) + int(n) + 3) // 4 - g0
    counters = np.zeros((groups, 4), dtype=np.uint64)
    counters[:, 0] = np.arange(g0, g0 + groups, dtype=np.uint64) & np.uint64(MASK32)
    counters[:, 1] = int(step) & MASK32
    counters[:, 2] = int(layer) & MASK32
    counters[:, 3] = int(stream) & MASK32
    skip = int(first) - 4 * g0
    return philox4x32_block(counters, split_seed(seed)).reshape(-1)[skip:skip + int(n)]


def keep_mask(shape, threshold, seed, step, layer, stream, first=0):
    """Boolean keep-mask of `shape` (row-major element order) whose element 0 is element
    `first` of the sequence, the reference definition."""
    n = int(np.prod(shape))
    return (philox_words(n, seed, step, layer, stream, first) >= np.uint32(threshold)
            if threshold > 0 else np.ones(n, dtype=bool)).reshape(shape)


# ---------------------------------------------------------------- Gaussian noise
# A standard normal per element, Box-Muller on the word pairs of its group: element e (word
# e % 4 of group e // 4) pairs with e ^ 1; the even word gives the radius, the odd one the angle:
#     u1 = (w[e & ~1] + 0.5) / 2**32,  u2 = (w[e | 1] + 0.5) / 2**32      (both in (0, 1))
#     r = sqrt(-2 log u1),  theta = 2 pi u2,   n_e = r cos(theta) if e even else r sin(theta)
# in float64, rounded once to the working dtype. Every backend computes this formula in this
# order (libm / libdevice log, cos, sin), so the noise agrees to the rounding of the transform.
# fastreg.augment.GaussianJitter uses the same transform on its own stream.
TWO_PI = 2.0 * math.pi


def standard_normals(n, seed, step, layer, stream, first=0):
    """The n normals (float64) of the (seed, step, layer, stream) sequence from element
    `first` on, element-indexed: the reference definition of the noise (vectorised NumPy)."""
    start = 4 * (int(first) // 4)       # whole groups, so every element has its pair
    skip = int(first) - start
    words = philox_words(4 * ((skip + int(n) + 3) // 4), seed, step, layer, stream, start)
    u = ((words.astype(np.float64) + 0.5) * (1.0 / 4294967296.0)).reshape(-1, 2)
    r = np.sqrt(-2.0 * np.log(u[:, 0]))
    t = TWO_PI * u[:, 1]
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1).reshape(-1)[skip:skip + int(n)]
