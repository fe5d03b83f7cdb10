"""Philox4x32-10 on the device (twin of kernels/philox.py and kernels/numba/philox.py): the
same words as the NumPy generator, bit for bit, so masks and noise equal the CPU backends'.

A draw is a pure function of (seed, step, layer, stream, element e): counter =
(e // 4, step, layer, stream), word e % 4 (DESIGN.md, "Randomness"). Words are carried in
uint64 (the products need 64 bits). The normals are philox.standard_normals' Box-Muller on
the pairs of words (0, 1) and (2, 3) of a group, in float64 with libdevice's log / cos /
sin, rounded once to the dtype by the callers.
"""
import math

import numpy as np

from ..philox import MASK32, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, TWO_PI, split_seed
from .jit import cuda, grid1, kernels, to_dev


def build(ns):
    dev = ns.dev
    M0, M1, W0, W1, MASK = (np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(PHILOX_W0),
                            np.uint64(PHILOX_W1), np.uint64(MASK32))
    S32 = np.uint64(32)

    @cuda.jit(**dev)
    def philox4x32(c0, c1, c2, c3, k0, k1):
        """Philox4x32-10 on one counter: four uint32 words carried in uint64s."""
        c0 = np.uint64(c0)
        c1 = np.uint64(c1)
        c2 = np.uint64(c2)
        c3 = np.uint64(c3)
        a0 = np.uint64(k0)
        a1 = np.uint64(k1)
        for _ in range(10):
            p0 = M0 * c0
            p1 = M1 * c2
            n0 = ((p1 >> S32) ^ c1 ^ a0) & MASK
            n2 = ((p0 >> S32) ^ c3 ^ a1) & MASK
            c1 = p1 & MASK
            c3 = p0 & MASK
            c0 = n0
            c2 = n2
            a0 = (a0 + W0) & MASK
            a1 = (a1 + W1) & MASK
        return c0, c1, c2, c3

    @cuda.jit(**dev)
    def pick(w0, w1, w2, w3, s):
        if s == 0:
            return w0
        if s == 1:
            return w1
        if s == 2:
            return w2
        return w3

    @cuda.jit(**dev)
    def element_group(e, k0, k1, step, layer, stream):
        """The 4 Philox words of element e's group (counter (e // 4, step, layer, stream))."""
        return philox4x32(np.uint64(e >> 2), np.uint64(step) & MASK, np.uint64(layer) & MASK,
                          np.uint64(stream) & MASK, k0, k1)

    @cuda.jit(**dev)
    def philox_word(e, k0, k1, step, layer, stream):
        """The word of element e of the (seed, step, layer, stream) sequence."""
        w0, w1, w2, w3 = element_group(e, k0, k1, step, layer, stream)
        return pick(w0, w1, w2, w3, e & 3)

    @cuda.jit(**dev)
    def group_words(cache, e, k0, k1, step, layer, stream):
        """The 4 Philox words of element e's group (e // 4) of a (seed, step, layer, stream)
        sequence, through `cache` (5 uint64: group + 1, then its words; cache[0] = 0 empties
        it): one Philox call per group of 4 consecutive elements of a row."""
        g = np.uint64(e >> 2)
        if cache[0] != g + np.uint64(1):
            w0, w1, w2, w3 = element_group(e, k0, k1, step, layer, stream)
            cache[0] = g + np.uint64(1)
            cache[1] = w0
            cache[2] = w1
            cache[3] = w2
            cache[4] = w3
        return cache[1], cache[2], cache[3], cache[4]

    @cuda.jit(**dev)
    def normal_pair(wa, wb, odd):
        u1 = (np.float64(wa) + 0.5) * (1.0 / 4294967296.0)
        u2 = (np.float64(wb) + 0.5) * (1.0 / 4294967296.0)
        r = math.sqrt(-2.0 * math.log(u1))
        t = TWO_PI * u2
        if odd:
            return r * math.sin(t)
        return r * math.cos(t)

    @cuda.jit(**dev)
    def normal_of(w0, w1, w2, w3, q):
        """The normal of word q of a group: Box-Muller on the pairs (0, 1) and (2, 3)."""
        if q < 2:
            return normal_pair(w0, w1, q == 1)
        return normal_pair(w2, w3, q == 3)

    @cuda.jit(**dev)
    def normal_at(e, k0, k1, step, layer, stream):
        """The normal of element e of the (seed, step, layer, stream) sequence (float64)."""
        w0, w1, w2, w3 = element_group(e, k0, k1, step, layer, stream)
        return normal_of(w0, w1, w2, w3, e & 3)

    @cuda.jit
    def philox_counters(counters, k0, k1, out):
        """Test helper: out[n, :] = Philox(counters[n, :], key)."""
        n = cuda.grid(1)
        if n < counters.shape[0]:
            w0, w1, w2, w3 = philox4x32(counters[n, 0], counters[n, 1], counters[n, 2],
                                        counters[n, 3], k0, k1)
            out[n, 0] = np.uint32(w0)
            out[n, 1] = np.uint32(w1)
            out[n, 2] = np.uint32(w2)
            out[n, 3] = np.uint32(w3)

    @cuda.jit
    def stream_words(out, k0, k1, step, layer, stream):
        """The first len(out) element words of one sequence."""
        for e in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[e] = np.uint32(philox_word(e, k0, k1, step, layer, stream))

    ns.__dict__.update(philox4x32=philox4x32, pick=pick, element_group=element_group,
                       philox_word=philox_word, group_words=group_words,
                       normal_pair=normal_pair, normal_of=normal_of, normal_at=normal_at,
                       philox_counters=philox_counters, stream_words=stream_words)


def counters_device(counters, key):
    """Philox4x32-10 of an (n, 4) array of counters through the device function (tests)."""
    ns = kernels(np.float32)
    c = np.asarray(counters, np.uint64).reshape(-1, 4).astype(np.int64)
    od = cuda.device_array(c.shape, np.uint32)
    ns.philox_counters[(c.shape[0] + ns.NB - 1) // ns.NB, ns.NB](
        to_dev(c), int(key[0]) & MASK32, int(key[1]) & MASK32, od)
    return od.copy_to_host()


def stream_words_device(n, seed, step, layer, stream):
    """The first n element words of one (seed, step, layer, stream) sequence."""
    ns = kernels(np.float32)
    k0, k1 = split_seed(seed)
    od = cuda.device_array(max(1, int(n)), np.uint32)
    ns.stream_words[grid1(int(n), ns.NB), ns.NB](od, k0, k1, int(step), int(layer),
                                                 int(stream))
    return od.copy_to_host()[:int(n)]

