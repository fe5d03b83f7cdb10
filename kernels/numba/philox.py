"""Philox4x32-10 and the Box-Muller normals in Numba: the twin of kernels/philox.py.

Random bits for a layer are made by `philox_fill` into a (4, G) word buffer: a branch-free
loop over groups that LLVM vectorises (about 7x the scalar loop). Element e of a (B, O)
matrix reads word ``words[e & 3, e >> 2]``: counter (e // 4, step, layer, stream), word e % 4,
the bits DESIGN.md fixes.

Shape legend: G Philox groups (4 words each).
"""
import math

import numpy as np
from numba import prange

from ..contract import PARALLEL_MIN_ELEMENTS
from ..philox import MASK32, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, TWO_PI
from .jit import kernel, kernel_inline, kernel_parallel

# Philox groups per parallel task: a fixed size (not derived from the thread count), so the
# partition is the same whatever NUMBA_NUM_THREADS is.
GROUP_CHUNK = 4096


@kernel
def philox_groups(words, g_lo, g_hi, k0, k1, step, layer, stream, g0):
    """words[:, g] = Philox((g0 + g, step, layer, stream), (k0, k1)) for g in [g_lo, g_hi)
    (g0: philox_fill's)."""
    mask = np.uint64(MASK32)
    s32 = np.uint64(32)
    for g in range(g_lo, g_hi):
        c0 = (np.uint64(g) + np.uint64(g0)) & mask
        c1 = np.uint64(step) & mask
        c2 = np.uint64(layer) & mask
        c3 = np.uint64(stream) & mask
        a0 = np.uint64(k0)
        a1 = np.uint64(k1)
        for _ in range(10):
            p0 = np.uint64(PHILOX_M0) * c0
            p1 = np.uint64(PHILOX_M1) * c2
            n0 = ((p1 >> s32) ^ c1 ^ a0) & mask
            n2 = ((p0 >> s32) ^ c3 ^ a1) & mask
            c1 = p1 & mask
            c3 = p0 & mask
            c0 = n0
            c2 = n2
            a0 = (a0 + np.uint64(PHILOX_W0)) & mask
            a1 = (a1 + np.uint64(PHILOX_W1)) & mask
        words[0, g] = np.uint32(c0)
        words[1, g] = np.uint32(c1)
        words[2, g] = np.uint32(c2)
        words[3, g] = np.uint32(c3)


@kernel_parallel
def _philox_fill_parallel(words, n_groups, k0, k1, step, layer, stream, g0):
    n_chunks = (n_groups + GROUP_CHUNK - 1) // GROUP_CHUNK
    for c in prange(n_chunks):
        lo = c * GROUP_CHUNK
        philox_groups(words, lo, min(lo + GROUP_CHUNK, n_groups), k0, k1, step, layer, stream,
                      g0)


@kernel
def philox_fill(par, words, n_elements, k0, k1, step, layer, stream, g0):
    """Words for elements 0..n_elements-1 of one (seed, step, layer, stream) sequence.
    par: None when no pass of the network is big enough to run in parallel (the parallel
    code is then never compiled: jit.py). g0: the Philox group of element 0 (0 but for a
    block of rows further down its batch, an MPI rank's shard: its element 0 is element
    4 * g0 of the batch)."""
    n_groups = (n_elements + 3) // 4
    if par is not None:
        if n_elements >= PARALLEL_MIN_ELEMENTS:
            _philox_fill_parallel(words, n_groups, k0, k1, step, layer, stream, g0)
            return
    philox_groups(words, 0, n_groups, k0, k1, step, layer, stream, g0)


# ---------------------------------------------------------------- Gaussian noise
# Element e's normal is Box-Muller on its word pair (kernels/philox.py standard_normals,
# element by element): e pairs with e ^ 1; the even word gives the radius, the odd the angle.
@kernel
def normal_from_words(w_radius, w_angle, odd):
    """The Box-Muller normal of one element from its pair of words (float64)."""
    u1 = (np.float64(w_radius) + 0.5) * (1.0 / 4294967296.0)
    u2 = (np.float64(w_angle) + 0.5) * (1.0 / 4294967296.0)
    r = math.sqrt(-2.0 * math.log(u1))
    t = TWO_PI * u2
    return r * math.sin(t) if odd else r * math.cos(t)


@kernel_inline
def normal(nwords, e):
    """The normal of element e from the noise words (4, G)."""
    g = e >> 2
    q = e & 3
    p = q & 2
    return normal_from_words(nwords[p, g], nwords[p + 1, g], (q & 1) == 1)


@kernel_inline
def normal_pair(nwords, p):
    """The normals of elements p and p + 1 (p even): normal_from_words' formula with the
    radius computed once (the same values, half the log / sqrt calls)."""
    g = p >> 2
    q = p & 3
    u1 = (np.float64(nwords[q, g]) + 0.5) * (1.0 / 4294967296.0)
    u2 = (np.float64(nwords[q + 1, g]) + 0.5) * (1.0 / 4294967296.0)
    r = math.sqrt(-2.0 * math.log(u1))
    t = TWO_PI * u2
    return r * math.cos(t), r * math.sin(t)
