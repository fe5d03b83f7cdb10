"""The CUDA backend (numba-cuda): the kernel contract on the GPU, and a device-resident epoch.

Shape legend: B batch rows, I fan_in, O fan_out, K outputs (and the GEMM inner dimension in
the GEMM kernel: C[M, N] = op(A)[M, K] @ op(B)[K, N]), L dense layers, P parameters in all.

Twin of kernels/cpu.py, function for function: the per-op contract takes host NumPy arrays
(copy in, run, copy out: for tests), ``train_epoch`` / ``forward_inference`` take a driver.Net
and keep everything on the device (``net.cache["cuda"]``).

Paths, chosen per net (``_DeviceNet.fused``):
- Every width (inputs, fan_in, fan_out) <= FUSED_MAX_WIDTH (128) and no BatchNorm: the fully
  fused small-MLP path of kernels/cuda_fused.py (tiny-cuda-nn style: a block carries its batch
  rows through all layers, forward, loss and backward deltas, with the activations in shared
  memory; then one launch for every layer's weight gradients, then the update): 3 launches
  per step whatever the depth, or, when a step is small (FUSED_EPOCH_MAX_MACS), the whole
  epoch in one launch of one block. Inference likewise, one launch per chunk.
- Otherwise the tiled path below (2L + 3 launches per step).

GEMM strategy of the tiled path, chosen per shape by ``_use_cublas(M, N, K)``:
- Small and medium GEMMs (M*N*K < CUBLAS_MIN_MACS, or no CuPy): our own tiled shared-memory
  kernel ``gemm``: TILE_M x TILE_N output tiles, TILE_K deep, THREAD_M x THREAD_N register
  micro-tile per thread, transposes as flags (no copies). Its epilogue is fused:
    forward   bias + activation [+ noise, f(z) -> pre] + dropout (Philox regenerated per
              4-word group; the noise words, stream STREAM_NOISE, likewise)           -> out
    backward  dW = x^T dz with the bias gradient summed from the same dz tiles (the blocks of
              the first row-tile sum their shared-memory dz tiles over the batch, in row
              order: no atomics, deterministic), and in the SAME launch (blockIdx.z = 1)
              dx = dz W^T with the previous layer's backward epilogue (mask regenerated, f'
              from its stored output) applied, so dx lands as that layer's dz directly.
- Large GEMMs with CuPy installed: cuBLAS through CuPy on zero-copy views
  (``__cuda_array_interface__``), then one elementwise epilogue kernel (forward: bias,
  activation, dropout; backward: column sums for db, and the previous layer's transform).
  CuPy and numba both launch on the legacy default stream, so no synchronisation is needed.
- The tile sizes are module constants; kernels are built per (tiles, dtype) on first use, so a
  test can patch them small to exercise tile edges.

Launches per training step on the tiled path, L layers:
    1 gather (rows of X, Y by the permutation, input dropout fused)
  + L forward GEMMs (epilogue fused)
  + 1 loss (one block: loss, gradient, last layer's backward epilogue, device-side loss sum,
    finite check)
  + L backward GEMM launches (dW + db + dx in one launch each)
  + 1 penalized update of ALL parameter tensors (they live in one flat buffer; each block owns
    a chunk of one tensor) [+ 2 column passes when a layer has MaxNorm or GroupLasso: the
    group penalty before the update, the group prox and max-norm projection after it]
  = 2L + 3; e.g. 11 for the 4-layer `curve` MLP. Nothing is copied back per step: the loss
  and penalty sums, the step count and a stop flag live in a device `status` vector read once
  per train_epoch call. A non-finite batch loss sets the stop flag; every later update in that
  call is skipped (the kernels check the flag), which is the CPU's "stop before the update".

Compilation: kernels are built (closures over the tile constants and dtype) and compiled by
NVVM on first use, about 10-20 s per dtype, not cached on disk (numba's cache keys closures by
source line, which would mix tile configurations). kernels/cuda_ptxcheck.py compiles them all
to PTX without a GPU, so typing errors the simulator cannot see are caught in CI.

Randomness: the same Philox4x32-10 bits as kernels/philox.py, so masks equal the CPU's bit for
bit. Reductions are deterministic (fixed order) except the penalty sum (float64 atomics).
"""
import importlib.util
import math
import os

import numpy as np

from . import contract as C
from .philox import (MASK32, PHILOX_M0, PHILOX_M1, PHILOX_W0, PHILOX_W1, STREAM_DROPOUT,
                     STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE, STREAM_NOISE, TWO_PI, split_seed)
from .reference import output_transform as _ref_output_transform
from .reference import penalty_value as _ref_penalty_value

NAME = "cuda"

try:  # importing this module must never fail: numba-cuda (or a GPU) may be missing
    if importlib.util.find_spec("numba_cuda") is None:
        raise ImportError("the numba-cuda package is not installed")
    import numba
    from numba import cuda
    _IMPORT_ERROR = None
except Exception as exc:  # pragma: no cover - depends on the machine
    cuda = None
    numba = None
    _IMPORT_ERROR = exc
else:
    try:    # numba-cuda's own copy of the compile events (absent in older releases)
        import numba.cuda.core.event as _cuda_event
        from . import compile_notice
        compile_notice.install(_cuda_event, "numba-cuda", "numba-cuda:compile")
    except (ImportError, ValueError):  # pragma: no cover - depends on the release
        pass

# ---------------------------------------------------------------- tunables (patchable)
TILE_M = 64        # output rows per GEMM block
TILE_N = 64        # output columns per GEMM block
TILE_K = 16        # inner-dimension depth of one shared-memory stage
THREAD_M = 4       # micro-tile rows per thread
THREAD_N = 4       # micro-tile columns per thread  -> (64/4) * (64/4) = 256 threads
BLOCK = 256        # threads of the elementwise / reduction kernels (a power of two)
UPDATE_PER_THREAD = 8      # parameters per thread of the fused update (chunk = BLOCK * this)
CUBLAS_MIN_MACS = 1 << 22  # from this many multiply-adds on, cuBLAS + epilogue kernel
FORCE_SPLIT = False        # tests: take the "GEMM then epilogue" path with our own GEMM
# The fully fused small-MLP path (kernels/cuda_fused.py): nets no wider than FUSED_MAX_WIDTH
# and without BatchNorm train in 3 launches per step; 0 turns it off (the tiled path).
FUSED_MAX_WIDTH = 128      # widest input / fan_in / fan_out it takes (shared-memory rows)
FUSED_ROWS = 32            # batch rows per block (float64: half, to fit 48 KiB of shared)
FUSED_THREADS = 256        # threads per block: 8 warps, 2 per scheduler, to hide latency when
                           # one block runs the epoch alone on its SM
FUSED_TK = 16              # weight rows per shared-memory stage (float64: half)
FUSED_THREAD_M = 2         # micro-tile rows per thread: 2 x 4 keeps all 256 threads busy on
FUSED_THREAD_N = 4         # a 32 x 64 layer tile
# Fused nets whose step is at most this many multiply-adds (batch x sum(I*O) x 3: forward,
# backward deltas, weight gradients) train a whole epoch in ONE launch of one block
# (cuda_fused.fused_epoch): a launch from Python costs tens of microseconds, about what one
# SM needs for this much arithmetic. Bigger steps take the 3-launch multi-block path. A first
# guess, to calibrate on a GPU (python -m fastreg.kernels.cuda_bench reports both). Like
# FUSED_MAX_WIDTH, read when a net's device state is built (cuda.invalidate(net) re-decides).
FUSED_EPOCH_MAX_MACS = 1 << 23

EPI_NONE = 0
EPI_FORWARD = 1
EPI_BACKWARD = 2

# status vector (float64, on the device)
ST_LOSS = 0
ST_PEN = 1
ST_STEPS = 2
ST_STOP = 3
ST_BATCH = 4
ST_SIZE = 8


def on_simulator():
    """True when numba-cuda runs its Python simulator instead of a GPU."""
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def available():
    """(True, "") when this backend can run here, else (False, one sentence saying why)."""
    if cuda is None:
        return False, ("numba-cuda is not installed ({}); install it with "
                       "pip install \"fastreg[cuda]\"".format(_IMPORT_ERROR))
    if on_simulator():
        return True, "running on the numba-cuda simulator (NUMBA_ENABLE_CUDASIM=1): slow"
    try:
        ok = bool(cuda.is_available())
    except Exception:  # pragma: no cover - driver-level failures
        ok = False
    if not ok:
        return False, ("no CUDA GPU or driver was found by numba-cuda; run on a machine with an "
                       "NVIDIA GPU (or set NUMBA_ENABLE_CUDASIM=1 for the slow simulator)")
    return True, ""


def _require():
    ok, reason = available()
    if not ok:
        raise RuntimeError("the cuda backend is not available: " + reason)


_CUPY = []


def _cupy():
    """CuPy if installed (and not under the simulator, and not FASTREG_CUDA_CUBLAS=0), else
    None; looked up once."""
    if not _CUPY:
        mod = None
        if (not on_simulator() and os.environ.get("FASTREG_CUDA_CUBLAS", "1") != "0"
                and importlib.util.find_spec("cupy") is not None):
            try:
                import cupy as mod  # noqa: F811
            except Exception:  # pragma: no cover
                mod = None
        _CUPY.append(mod)
    return _CUPY[0]


def _use_cublas(M, N, K):
    """cuBLAS + epilogue for big GEMMs (our kernel stays for small ones: fused, one launch)."""
    if FORCE_SPLIT:
        return True
    return _cupy() is not None and M * N * K >= CUBLAS_MIN_MACS


# ---------------------------------------------------------------- kernel factory
_BUILT = {}


def _config(dtype):
    return (int(TILE_M), int(TILE_N), int(TILE_K), int(THREAD_M), int(THREAD_N), int(BLOCK),
            int(UPDATE_PER_THREAD), np.dtype(dtype).str,
            (int(FUSED_ROWS), int(FUSED_MAX_WIDTH), int(FUSED_THREADS), int(FUSED_TK),
             int(FUSED_THREAD_M), int(FUSED_THREAD_N)))


def _kernels(dtype):
    """The kernels for the current tile constants and dtype, compiled lazily, cached."""
    _require()
    key = _config(dtype)
    ns = _BUILT.get(key)
    if ns is None:
        ns = _build(*key)
        ns.dummy = cuda.to_device(np.zeros((1, 1), ns.dtype))
        ns.dummy1 = cuda.to_device(np.zeros(1, ns.dtype))
        _BUILT[key] = ns
    return ns


class _NS:
    pass


def _build(TM, TN, TK, RM, RN, NB, UPT, dtype_str, fused):
    if TM % RM or TN % RN or NB & (NB - 1):
        raise ValueError("TILE_M/THREAD_M, TILE_N/THREAD_N must divide and BLOCK be a power of 2")
    dtype = np.dtype(dtype_str)
    T = numba.from_dtype(dtype)
    FT = dtype.type
    ZERO = dtype.type(0)
    ONE = dtype.type(1)
    NTX = TN // RN
    NTY = TM // RM
    NT = NTX * NTY
    TMP = TM + 1    # padded rows of the shared tiles: no bank conflicts on transposed stores
    TNP = TN + 1
    DBN = (TN + NT - 1) // NT     # bias-gradient columns per thread
    CHUNK = NB * UPT
    sim = on_simulator()
    dev = dict(device=True) if sim else dict(device=True, forceinline=True)
    M0, M1, W0, W1, MASK = (np.uint64(PHILOX_M0), np.uint64(PHILOX_M1), np.uint64(PHILOX_W0),
                            np.uint64(PHILOX_W1), np.uint64(MASK32))
    S32 = np.uint64(32)
    U0 = np.uint64(0)

    # ------------------------------------------------------------ device functions
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
    def activate(z, act, slope):
        if act == C.ACT_RELU:
            return z if z > ZERO else ZERO
        if act == C.ACT_LEAKY_RELU:
            return z if z > ZERO else z * slope
        if act == C.ACT_TANH:
            return math.tanh(z)
        if act == C.ACT_SIGMOID:
            if z >= ZERO:
                return ONE / (ONE + math.exp(-z))
            e = math.exp(z)
            return e / (ONE + e)
        return z

    @cuda.jit(**dev)
    def activation_grad(a, act, slope):
        if act == C.ACT_RELU:
            return ONE if a > ZERO else ZERO
        if act == C.ACT_LEAKY_RELU:
            return ONE if a > ZERO else slope
        if act == C.ACT_TANH:
            return ONE - a * a
        if act == C.ACT_SIGMOID:
            return a * (ONE - a)
        return ONE

    @cuda.jit(**dev)
    def forward_value(z, act, slope, thr, scale, word):
        a = activate(z, act, slope)
        if thr > 0:
            if word >= np.uint64(thr):
                a = a * scale
            else:
                a = ZERO
        return a

    @cuda.jit(**dev)
    def backward_value(g, a, act, slope, thr, scale, word):
        """dL/dz from dL/d(out) and the stored out (cpu._backward_cols, one element)."""
        if thr > 0:
            if word >= np.uint64(thr):
                if act == C.ACT_TANH or act == C.ACT_SIGMOID:
                    a = a / scale
                return (g * scale) * activation_grad(a, act, slope)
            return ZERO
        return g * activation_grad(a, act, slope)

    # Gaussian noise (GaussianNoise / GaussianDropout): the Box-Muller of philox.standard_normals, float64
    # libdevice log / cos / sin, rounded once to the dtype by the callers.
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

    @cuda.jit(**dev)
    def noisy(v, noise, nstd, nrm):
        """NOISE_ADD: v + std * n; NOISE_MUL: v * (1 + std * n) (n in the dtype)."""
        if noise == C.NOISE_ADD:
            return v + nstd * nrm
        return v * (ONE + nstd * nrm)

    @cuda.jit(**dev)
    def noise_forward_value(z, act, slope, thr, scale, word, noise, nstd, nrm):
        """(out, pre) of one element of a layer with noise: pre = f(z), out = dropout(noise)."""
        a = activate(z, act, slope)
        v = noisy(a, noise, nstd, nrm)
        if thr > 0:
            if word >= np.uint64(thr):
                v = v * scale
            else:
                v = ZERO
        return v, a

    @cuda.jit(**dev)
    def noise_backward_value(g, p, act, slope, thr, scale, word, noise, nstd, nrm):
        """dL/dz of a layer with noise (cpu._dz_noise_loop, one element): p = pre (unused for
        a linear layer), nrm the regenerated normal (unused for NOISE_ADD)."""
        d = g
        if thr > 0:
            d = d * scale
        if noise == C.NOISE_MUL:
            d = d * (ONE + nstd * nrm)
        if act != C.ACT_LINEAR:
            d = d * activation_grad(p, act, slope)
        if thr > 0 and word < np.uint64(thr):
            d = ZERO
        return d

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
    def dense_epilogue(v, epi, has_b, bias_j, act, slope, thr, scale, noise, nstd, stored, e,
                       wc, nc, k0, k1, step, layer):
        """One element e of a dense layer's fused epilogue (the GEMM's and the fused MLP's).
        EPI_FORWARD: v = (x @ W)[e] -> (out, f(z)) with z = v (+ bias_j), activation, noise,
        dropout. EPI_BACKWARD: v = dL/d(out)[e] -> (dL/dz, 0), f' from `stored`: the layer's
        output, or with noise its pre-noise f(z). Dropout words and noise normals come from
        the cached Philox groups wc and nc (group_words)."""
        word = U0
        if thr > 0:
            w0, w1, w2, w3 = group_words(wc, e, k0, k1, step, layer, STREAM_DROPOUT)
            word = pick(w0, w1, w2, w3, e & 3)
        nrm = ZERO
        if noise != C.NOISE_NONE and (epi == EPI_FORWARD or noise == C.NOISE_MUL):
            n0, n1, n2, n3 = group_words(nc, e, k0, k1, step, layer, STREAM_NOISE)
            nrm = FT(normal_of(n0, n1, n2, n3, e & 3))
        if epi == EPI_FORWARD:
            if has_b:
                v = v + bias_j
            if noise != C.NOISE_NONE:
                return noise_forward_value(v, act, slope, thr, scale, word, noise, nstd, nrm)
            return forward_value(v, act, slope, thr, scale, word), ZERO
        if noise != C.NOISE_NONE:
            p = stored if act != C.ACT_LINEAR else ZERO
            return noise_backward_value(v, p, act, slope, thr, scale, word, noise, nstd,
                                        nrm), ZERO
        return backward_value(v, stored, act, slope, thr, scale, word), ZERO

    @cuda.jit(**dev)
    def sign(x):
        if x > ZERO:
            return ONE
        if x < ZERO:
            return -ONE
        return ZERO

    # ------------------------------------------------------------ GEMM with fused epilogues
    @cuda.jit(**dev)
    def tile_fma(As, Bs, acc, areg, breg, ty, tx):
        """acc += this thread's RM x RN micro-tile of As^T Bs over one TK-deep shared stage
        (As: TK x TM, Bs: TK x TN)."""
        for kk in range(TK):
            for r in range(RM):
                areg[r] = As[kk, ty * RM + r]
            for c in range(RN):
                breg[c] = Bs[kk, tx * RN + c]
            for r in range(RM):
                for c in range(RN):
                    acc[r, c] += areg[r] * breg[c]

    @cuda.jit(**dev)
    def stage_col_sums(dbacc, Bs, tid):
        """dbacc[c] += the column sums of the stage Bs for the columns tid + c * NT (batch
        rows in order, as the CPU sums db)."""
        for c in range(DBN):
            nn = tid + c * NT
            if nn < TN:
                for kk in range(TK):
                    dbacc[c] += Bs[kk, nn]

    @cuda.jit(**dev)
    def gemm_problem(As, Bs, acc, areg, breg, dbacc, A, B, Cm, ta, tb, M, N, K, epi, bias, has_bias,
                     act, slope, thr, scale, layer, eout, dbias, want_db, k0, k1, step, noise,
                     nstd):
        """One GEMM problem and its epilogue. eout: the stored output of the layer whose
        backward epilogue runs (EPI_BACKWARD), or with noise that layer's pre-noise f(z)
        (written in EPI_FORWARD, read in EPI_BACKWARD): CPython passes at most 30 arguments
        without packing them (which numba cannot compile), so pre shares eout's slot."""
        tid = cuda.threadIdx.x
        tx = tid % NTX
        ty = tid // NTX
        bm = cuda.blockIdx.y * TM
        bn = cuda.blockIdx.x * TN
        if bm >= M or bn >= N:
            return          # uniform over the block
        for r in range(RM):
            for c in range(RN):
                acc[r, c] = ZERO
        for c in range(DBN):
            dbacc[c] = ZERO
        for kt in range(0, K, TK):
            if ta == 0:     # A is (M, K): k runs along memory
                for idx in range(tid, TM * TK, NT):
                    mm = idx // TK
                    kk = idx - mm * TK
                    gm = bm + mm
                    gk = kt + kk
                    As[kk, mm] = A[gm, gk] if (gm < M and gk < K) else ZERO
            else:           # A is (K, M)
                for idx in range(tid, TM * TK, NT):
                    kk = idx // TM
                    mm = idx - kk * TM
                    gm = bm + mm
                    gk = kt + kk
                    As[kk, mm] = A[gk, gm] if (gm < M and gk < K) else ZERO
            if tb == 0:     # B is (K, N)
                for idx in range(tid, TK * TN, NT):
                    kk = idx // TN
                    nn = idx - kk * TN
                    gn = bn + nn
                    gk = kt + kk
                    Bs[kk, nn] = B[gk, gn] if (gn < N and gk < K) else ZERO
            else:           # B is (N, K)
                for idx in range(tid, TK * TN, NT):
                    nn = idx // TK
                    kk = idx - nn * TK
                    gn = bn + nn
                    gk = kt + kk
                    Bs[kk, nn] = B[gn, gk] if (gn < N and gk < K) else ZERO
            cuda.syncthreads()
            if want_db:
                stage_col_sums(dbacc, Bs, tid)
            tile_fma(As, Bs, acc, areg, breg, ty, tx)
            cuda.syncthreads()
        if want_db:
            for c in range(DBN):
                nn = tid + c * NT
                if nn < TN and bn + nn < N:
                    dbias[bn + nn] = dbacc[c]
        wc = cuda.local.array(5, numba.uint64)     # Philox group caches: dropout, noise
        nc = cuda.local.array(5, numba.uint64)
        for r in range(RM):
            i = bm + ty * RM + r
            if i < M:
                wc[0] = U0
                nc[0] = U0
                for c in range(RN):
                    j = bn + tx * RN + c
                    if j < N:
                        v = acc[r, c]
                        if epi != EPI_NONE:
                            keep = epi == EPI_FORWARD and noise != C.NOISE_NONE and \
                                act != C.ACT_LINEAR
                            stored = ZERO
                            if epi == EPI_BACKWARD and (noise == C.NOISE_NONE
                                                        or act != C.ACT_LINEAR):
                                stored = eout[i, j]
                            bj = bias[j] if (epi == EPI_FORWARD and has_bias) else ZERO
                            v, a = dense_epilogue(v, epi, has_bias, bj, act, slope, thr, scale,
                                                  noise, nstd, stored, i * N + j, wc, nc, k0,
                                                  k1, step, layer)
                            if keep:
                                eout[i, j] = a
                        Cm[i, j] = v

    @cuda.jit
    def gemm(A0, B0, C0, ta0, tb0, M0_, N0_, K0_, epi0, bias0, hb0, act0, slope0, thr0, scale0,
             layer0, eout0, db0, wdb0,
             A1, B1, C1, ta1, tb1, M1_, N1_, K1_, epi1, act1, slope1, thr1, scale1, layer1,
             eout1, k0, k1, step, noise0, nstd0, noise1, nstd1):
        """blockIdx.z = 0: problem 0 (any epilogue, optional bias gradient); z = 1: problem 1.
        noise*, nstd*: the noise of the layer whose epilogue a problem runs (its pre-noise
        f(z) then travels in eout*: see gemm_problem)."""
        As = cuda.shared.array((TK, TMP), T)
        Bs = cuda.shared.array((TK, TNP), T)
        acc = cuda.local.array((RM, RN), T)
        areg = cuda.local.array(RM, T)
        breg = cuda.local.array(RN, T)
        dbacc = cuda.local.array(DBN, T)
        if cuda.blockIdx.z == 0:
            gemm_problem(As, Bs, acc, areg, breg, dbacc, A0, B0, C0, ta0, tb0, M0_, N0_, K0_, epi0,
                         bias0, hb0, act0, slope0, thr0, scale0, layer0, eout0, db0,
                         wdb0 != 0 and cuda.blockIdx.y == 0, k0, k1, step, noise0, nstd0)
        else:
            gemm_problem(As, Bs, acc, areg, breg, dbacc, A1, B1, C1, ta1, tb1, M1_, N1_, K1_, epi1,
                         bias0, 0, act1, slope1, thr1, scale1, layer1, eout1, db0, False,
                         k0, k1, step, noise1, nstd1)

    # ------------------------------------------------------------ elementwise epilogues
    @cuda.jit
    def forward_epilogue(out, bias, has_bias, act, slope, thr, scale, k0, k1, step, layer,
                         noise, nstd, pre):
        """After a cuBLAS GEMM: out = dropout(noise(f(out + b))) in place (pre = f(out + b)
        with noise and a nonlinear f)."""
        B, O = out.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            v = out[i, j]
            if has_bias:
                v = v + bias[j]
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            if noise != C.NOISE_NONE:
                nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
                v, a = noise_forward_value(v, act, slope, thr, scale, word, noise, nstd, nrm)
                if act != C.ACT_LINEAR:
                    pre[i, j] = a
                out[i, j] = v
            else:
                out[i, j] = forward_value(v, act, slope, thr, scale, word)

    @cuda.jit
    def noise_backward_epilogue(grad, pre, act, slope, thr, scale, noise, nstd, k0, k1, step,
                                layer):
        """grad = dL/d(out) -> dL/dz in place for a layer with noise (mask and GaussianDropout
        factor regenerated, f' from pre)."""
        B, O = grad.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            nrm = ZERO
            if noise == C.NOISE_MUL:
                nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
            p = pre[i, j] if act != C.ACT_LINEAR else ZERO
            grad[i, j] = noise_backward_value(grad[i, j], p, act, slope, thr, scale, word,
                                              noise, nstd, nrm)

    @cuda.jit
    def backward_epilogue(grad, out, act, slope, thr, scale, k0, k1, step, layer):
        """grad = dL/d(out) -> dL/dz in place (mask regenerated, f' from the stored out)."""
        B, O = grad.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
            grad[i, j] = backward_value(grad[i, j], out[i, j], act, slope, thr, scale, word)

    @cuda.jit
    def column_sums(dz, db):
        """db[j] = sum_i dz[i, j], rows in order (the cuBLAS path's bias gradient)."""
        j = cuda.grid(1)
        if j < dz.shape[1]:
            s = ZERO
            for i in range(dz.shape[0]):
                s += dz[i, j]
            db[j] = s

    @cuda.jit
    def input_dropout(x, out, thr, scale, k0, k1, step, layer, noise, nstd):
        """out = dropout(noise(x)) (streams STREAM_INPUT_NOISE, STREAM_INPUT_DROPOUT)."""
        B, I = x.shape
        for e in range(cuda.grid(1), B * I, cuda.gridsize(1)):
            i = e // I
            j = e - i * I
            v = x[i, j]
            if noise != C.NOISE_NONE:
                v = noisy(v, noise, nstd, FT(normal_at(e, k0, k1, step, layer,
                                                       STREAM_INPUT_NOISE)))
            if thr > 0:
                word = philox_word(e, k0, k1, step, layer, STREAM_INPUT_DROPOUT)
                v = v * scale if word >= np.uint64(thr) else ZERO
            out[i, j] = v

    @cuda.jit
    def gather(X, Y, perm, start, n, xout, yout, thr, scale, k0, k1, step, noise, nstd):
        """Rows perm[start:start+n] of X and Y; input noise and dropout (layer 0) fused on X."""
        I0 = X.shape[1]
        Ky = Y.shape[1]
        width = I0 + Ky
        for e in range(cuda.grid(1), n * width, cuda.gridsize(1)):
            r = e // width
            j = e - r * width
            src = perm[start + r]
            if j < I0:
                v = X[src, j]
                if noise != C.NOISE_NONE:
                    v = noisy(v, noise, nstd, FT(normal_at(r * I0 + j, k0, k1, step, 0,
                                                           STREAM_INPUT_NOISE)))
                if thr > 0:
                    word = philox_word(r * I0 + j, k0, k1, step, 0, STREAM_INPUT_DROPOUT)
                    v = v * scale if word >= np.uint64(thr) else ZERO
                xout[r, j] = v
            else:
                yout[r, j - I0] = Y[src, j - I0]

    @cuda.jit
    def philox_words(counters, k0, k1, out):
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
        """Test helper: the first len(out) element words of one sequence."""
        for e in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
            out[e] = np.uint32(philox_word(e, k0, k1, step, layer, stream))

    # ------------------------------------------------------------ loss (one block)
    # The loss math, one row or element at a time: shared by loss_kernel and the fused
    # small-MLP kernel (kernels/cuda_fused.py).
    @cuda.jit(**dev)
    def sce_row(z, i, K, y, src, mixed):
        """Sparse CE of logits row z[i, :K] against the target row y[src] (a Mixup target
        (label_a, label_b, lam) when `mixed`, contract.SCE_*): (loss in float64, zmax, the
        softmax denominator in the dtype, label_a, label_b, lam)."""
        label = int(y[src, C.SCE_LABEL])
        label_b = label
        lam = ONE
        if mixed:
            label_b = int(y[src, C.SCE_LABEL_B])
            lam = y[src, C.SCE_LAM]
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
    def record_batch_loss(status, mean, accumulate, weight):
        """The batch mean into status[ST_BATCH]; with `accumulate`, the epoch's loss sum and
        step count, or the stop flag at the first non-finite mean (later steps' updates then
        skip: the CPU's "stop before the update")."""
        status[ST_BATCH] = mean
        if accumulate and status[ST_STOP] == 0.0:
            if math.isnan(mean) or math.isinf(mean):
                status[ST_STOP] = 1.0
            else:
                status[ST_LOSS] += mean * weight
                status[ST_STEPS] += 1.0

    @cuda.jit
    def loss_kernel(z, y, grad, loss, want_grad, status, accumulate, weight,
                    act, slope, thr, scale, k0, k1, step, layer):
        """Mean loss of the batch into status[ST_BATCH]; grad = d(mean)/dz, then the last
        layer's backward epilogue (identity for a linear layer without dropout). With
        `accumulate`: the loss sum, the step count and the stop flag of the epoch."""
        red = cuda.shared.array(NB, numba.float64)
        tid = cuda.threadIdx.x
        B, K = z.shape
        c, denom = loss_scale(loss, B, K)
        total = 0.0
        if loss == C.LOSS_SCE:
            mixed = y.shape[1] == C.SCE_MIXED_WIDTH
            for i in range(tid, B, NB):
                row, zmax, s, label, label_b, lam = sce_row(z, i, K, y, i, mixed)
                total += row
                if want_grad:
                    for k in range(K):
                        g = sce_grad(z[i, k], k, zmax, s, label, label_b, lam, mixed, c)
                        word = (philox_word(i * K + k, k0, k1, step, layer, STREAM_DROPOUT)
                                if thr > 0 else U0)
                        grad[i, k] = backward_value(g, z[i, k], act, slope, thr, scale, word)
        else:
            for e in range(tid, B * K, NB):
                i = e // K
                k = e - i * K
                zz = z[i, k]
                l64, g = pointwise_loss(zz, y[i, k], loss, c)
                total += l64
                if want_grad:
                    word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
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
            record_batch_loss(status, red[0] / denom, accumulate, weight)

    # ------------------------------------------------------------ fused penalized update
    # Block-level device functions (work item b, the block's nt threads, nt a power of two):
    # the kernels below run one item per block; the fused epoch kernel (cuda_fused) runs
    # them all in its one block.
    @cuda.jit(**dev)
    def update_chunk(b, nt, coef, red1, red2, P, G, Mm, Vv, blk_seg, blk_lo, blk_hi, seg_hp,
                     seg_has_m, opt, t, status, weight):
        """The update of P[blk_lo[b]:blk_hi[b]], a chunk of tensor blk_seg[b] (mirrors
        cpu._update_rows element for element); its penalty (before the step) added to
        status[ST_PEN]. coef (16), red1, red2 (nt): shared scratch."""
        tid = cuda.threadIdx.x
        s = blk_seg[b]
        if tid == 0:    # cpu._coefficients, in float64, rounded once to the param dtype
            h_lr = seg_hp[s, C.HP_LR]
            h_b1 = seg_hp[s, C.HP_BETA1]
            h_b2 = seg_hp[s, C.HP_BETA2]
            if opt == C.OPT_SGD:
                h_step = h_lr
                h_bc2 = 1.0
            else:
                h_step = h_lr / (1.0 - h_b1 ** np.float64(t))
                h_bc2 = math.sqrt(1.0 - h_b2 ** np.float64(t))
            h_decay = 1.0 - h_lr * seg_hp[s, C.HP_DECOUPLED] if opt == C.OPT_ADAMW else 1.0
            coef[0] = h_lr
            coef[1] = h_b1
            coef[2] = 1.0 - h_b1
            coef[3] = h_b2
            coef[4] = 1.0 - h_b2
            coef[5] = seg_hp[s, C.HP_EPS]
            coef[6] = seg_hp[s, C.HP_L1]
            coef[7] = seg_hp[s, C.HP_L2]
            coef[8] = h_decay
            coef[9] = h_step
            coef[10] = h_bc2
            coef[11] = h_lr * seg_hp[s, C.HP_L1]
        cuda.syncthreads()
        lr = coef[0]
        b1 = coef[1]
        omb1 = coef[2]
        b2 = coef[3]
        omb2 = coef[4]
        eps = coef[5]
        l1 = coef[6]
        l2 = coef[7]
        decay = coef[8]
        step_size = coef[9]
        bc2_sqrt = coef[10]
        lr_l1 = coef[11]
        nesterov = seg_hp[s, C.HP_NESTEROV] != 0.0
        proximal = seg_hp[s, C.HP_PROXIMAL] != 0.0
        has_m = seg_has_m[s] != 0
        p1 = 0.0
        p2 = 0.0
        for e in range(blk_lo[b] + tid, blk_hi[b], nt):
            wi = P[e]
            p1 += abs(np.float64(wi))
            p2 += np.float64(wi) * np.float64(wi)
            ge = G[e]
            if l2 != ZERO:
                ge = ge + l2 * wi
            if l1 != ZERO and not proximal:
                ge = ge + l1 * sign(wi)
            if opt == C.OPT_SGD:
                if has_m:
                    mi = Mm[e] * b1 + ge
                    Mm[e] = mi
                    d = ge + b1 * mi if nesterov else mi
                else:
                    d = ge
                wi = wi - lr * d
                tau = lr_l1
            else:
                if opt == C.OPT_ADAMW:
                    wi = wi * decay
                mi = Mm[e] + omb1 * (ge - Mm[e])
                vi = Vv[e] * b2 + (omb2 * ge) * ge
                Mm[e] = mi
                Vv[e] = vi
                denom = math.sqrt(vi) / bc2_sqrt + eps
                wi = wi - step_size * (mi / denom)
                tau = lr_l1 / denom
            if l1 != ZERO and proximal:
                wi = sign(wi) * max(abs(wi) - tau, ZERO)
            P[e] = wi
        red1[tid] = p1
        red2[tid] = p2
        cuda.syncthreads()
        half = nt // 2
        while half > 0:
            if tid < half:
                red1[tid] += red1[tid + half]
                red2[tid] += red2[tid + half]
            cuda.syncthreads()
            half //= 2
        if tid == 0:
            pen = seg_hp[s, C.HP_L1] * red1[0] + 0.5 * seg_hp[s, C.HP_L2] * red2[0]
            if pen != 0.0:
                cuda.atomic.add(status, ST_PEN, pen * weight)
        cuda.syncthreads()      # coef and red are reused by the block's next chunk

    @cuda.jit
    def update(P, G, Mm, Vv, blk_seg, blk_lo, blk_hi, seg_hp, seg_has_m, opt, t, status,
               weight):
        """One launch updates every parameter tensor: block b owns chunk b (update_chunk)."""
        if status[ST_STOP] != 0.0:
            return
        coef = cuda.shared.array(16, T)
        red1 = cuda.shared.array(NB, numba.float64)
        red2 = cuda.shared.array(NB, numba.float64)
        update_chunk(cuda.blockIdx.x, NB, coef, red1, red2, P, G, Mm, Vv, blk_seg, blk_lo,
                     blk_hi, seg_hp, seg_has_m, opt, t, status, weight)

    @cuda.jit(device=True)
    def column_norm(P, off, R, O, j):
        acc = 0.0
        for i in range(R):
            w = np.float64(P[off + i * O + j])
            acc += w * w
        return math.sqrt(acc)

    @cuda.jit(**dev)
    def group_penalty_cols(b, nt, P, cp_seg, cp_col, seg_off, seg_rows, seg_cols, seg_hp,
                           status, weight):
        """Before the step: group * ||w_j|| of the NB columns of item b into the penalty."""
        s = cp_seg[b]
        group = seg_hp[s, C.HP_GROUP]
        for jj in range(cuda.threadIdx.x, NB, nt):
            j = cp_col[b] + jj
            if j < seg_cols[s] and group > 0.0:
                nrm = column_norm(P, seg_off[s], seg_rows[s], seg_cols[s], j)
                cuda.atomic.add(status, ST_PEN, group * nrm * weight)

    @cuda.jit
    def group_penalty(P, cp_seg, cp_col, seg_off, seg_rows, seg_cols, seg_hp, status, weight):
        """group_penalty_cols, an item per block."""
        if status[ST_STOP] != 0.0:
            return
        group_penalty_cols(cuda.blockIdx.x, NB, P, cp_seg, cp_col, seg_off, seg_rows, seg_cols,
                           seg_hp, status, weight)

    @cuda.jit(**dev)
    def column_shrink(P, Vv, s, j, O, seg_off, seg_rows, seg_hp, opt, t):
        """Column j of tensor s: group shrink, then max-norm."""
        off = seg_off[s]
        R = seg_rows[s]
        group = seg_hp[s, C.HP_GROUP]
        if group > 0.0:
            h_lr = seg_hp[s, C.HP_LR]
            if opt == C.OPT_SGD:
                tau = h_lr * group
            else:   # the coefficients of `update`, rounded to the dtype as there
                step = np.float64(FT(h_lr / (1.0 - seg_hp[s, C.HP_BETA1] ** np.float64(t))))
                bc2 = np.float64(FT(math.sqrt(1.0 - seg_hp[s, C.HP_BETA2] ** np.float64(t))))
                eps = np.float64(FT(seg_hp[s, C.HP_EPS]))
                den = 0.0
                for i in range(R):
                    den += math.sqrt(np.float64(Vv[off + i * O + j])) / bc2 + eps
                tau = group * step / (den / R)
            nrm = column_norm(P, off, R, O, j)
            sc = FT(1.0 - tau / nrm) if nrm > tau else FT(0.0)
            for i in range(R):
                P[off + i * O + j] = P[off + i * O + j] * sc
        c = seg_hp[s, C.HP_MAXNORM]
        if c > 0.0:
            nrm = column_norm(P, off, R, O, j)
            if nrm > c:
                sc = FT(c / nrm)
                for i in range(R):
                    P[off + i * O + j] = P[off + i * O + j] * sc

    @cuda.jit(**dev)
    def column_pass(b, nt, P, Vv, cp_seg, cp_col, seg_off, seg_rows, seg_cols, seg_hp, opt, t):
        """After the step, a thread per column of item b (NB columns): the group-lasso block
        shrink (reference group_prox with the thresholds of group_thresholds), then the
        max-norm projection."""
        s = cp_seg[b]
        O = seg_cols[s]
        for jj in range(cuda.threadIdx.x, NB, nt):
            j = cp_col[b] + jj
            if j < O:
                column_shrink(P, Vv, s, j, O, seg_off, seg_rows, seg_hp, opt, t)

    @cuda.jit
    def columns(P, Vv, cp_seg, cp_col, seg_off, seg_rows, seg_cols, seg_hp, status, opt, t):
        """column_pass, an item per block."""
        if status[ST_STOP] != 0.0:
            return
        column_pass(cuda.blockIdx.x, NB, P, Vv, cp_seg, cp_col, seg_off, seg_rows, seg_cols,
                    seg_hp, opt, t)

    # ------------------------------------------------------------ BatchNorm (training)
    @cuda.jit
    def bn_forward(out, bias, has_bias, gb, xhat, save, act, slope, thr, scale, eps, k0, k1,
                   step, layer, noise, nstd, pre):
        """After a plain GEMM (out = x @ W), a thread per unit j, rows in order (the CPU's
        column sums): z = out + b; batch mean and biased variance (float64, two passes);
        inv_std rounded to the dtype; zhat -> xhat, out = dropout(noise(f(gamma * zhat +
        beta))) (pre = f(gamma * zhat + beta) with noise and a nonlinear f, as
        forward_epilogue)."""
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
            save[C.BN_SAVE_MEAN, j] = mean
            save[C.BN_SAVE_VAR, j] = var
            save[C.BN_SAVE_INVSTD, j] = np.float64(inv)
            mu = FT(mean)
            gam = gb[C.BN_GAMMA, j]
            bet = gb[C.BN_BETA, j]
            for i in range(B):
                xh = (out[i, j] - mu) * inv
                xhat[i, j] = xh
                e = i * O + j
                word = philox_word(e, k0, k1, step, layer, STREAM_DROPOUT) if thr > 0 else U0
                if noise != C.NOISE_NONE:
                    nrm = FT(normal_at(e, k0, k1, step, layer, STREAM_NOISE))
                    v, a = noise_forward_value(gam * xh + bet, act, slope, thr, scale, word,
                                               noise, nstd, nrm)
                    if act != C.ACT_LINEAR:
                        pre[i, j] = a
                    out[i, j] = v
                else:
                    out[i, j] = forward_value(gam * xh + bet, act, slope, thr, scale, word)

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
            dgb[C.BN_GAMMA, j] = FT(s2)
            dgb[C.BN_BETA, j] = FT(s1)
            c1 = FT(np.float64(gb[C.BN_GAMMA, j]) * save[C.BN_SAVE_INVSTD, j])
            c2 = FT(s1 / B)
            c3 = FT(s2 / B)
            for i in range(B):
                grad[i, j] = c1 * ((grad[i, j] - c2) - xhat[i, j] * c3)
            if has_bias:
                db[j] = ZERO
            if status[ST_STOP] == 0.0:
                rest = 1.0 - momentum
                stats[C.BN_MEAN, j] = FT(momentum * np.float64(stats[C.BN_MEAN, j])
                                         + rest * save[C.BN_SAVE_MEAN, j])
                stats[C.BN_VAR, j] = FT(momentum * np.float64(stats[C.BN_VAR, j])
                                        + rest * save[C.BN_SAVE_VAR, j])

    ns = _NS()
    ns.__dict__.update(dict(
        TM=TM, TN=TN, TK=TK, RM=RM, RN=RN, NT=NT, NB=NB, CHUNK=CHUNK, dtype=dtype,
        ST_STOP=ST_STOP,
        pick=pick, philox_word=philox_word, dense_epilogue=dense_epilogue, tile_fma=tile_fma,
        stage_col_sums=stage_col_sums, normal_of=normal_of, normal_at=normal_at,
        noisy=noisy, activate=activate, forward_value=forward_value,
        backward_value=backward_value, noise_forward_value=noise_forward_value,
        noise_backward_value=noise_backward_value, sce_row=sce_row, sce_grad=sce_grad,
        pointwise_loss=pointwise_loss, loss_scale=loss_scale,
        record_batch_loss=record_batch_loss, update_chunk=update_chunk,
        group_penalty_cols=group_penalty_cols, column_pass=column_pass,
        philox4x32=philox4x32, gemm=gemm, forward_epilogue=forward_epilogue,
        backward_epilogue=backward_epilogue, column_sums=column_sums,
        noise_backward_epilogue=noise_backward_epilogue,
        input_dropout=input_dropout, gather=gather, philox_words=philox_words,
        stream_words=stream_words, loss_kernel=loss_kernel, update=update,
        group_penalty=group_penalty, columns=columns, bn_forward=bn_forward,
        bn_backward=bn_backward))
    FR, FW, FNT, FTK, FRM, FRN = fused
    if dtype.itemsize > 4:      # twice the bytes per element: half the rows and the stage
        FR, FTK = max(FRM, FR // 2), max(1, FTK // 2)
    if FW > 0:
        from . import cuda_fused
        if cuda_fused.shared_bytes(FR, FW, FTK, FNT, dtype.itemsize) > 48 * 1024:
            raise ValueError("FUSED_ROWS, FUSED_MAX_WIDTH and FUSED_TK need more than the 48 "
                             "KiB of static shared memory a block may use")
        ns.__dict__.update(cuda_fused.build(ns, FR, FW, FNT, FTK, FRM, FRN, dev))
    return ns


# ---------------------------------------------------------------- launch helpers
def _grid1(n, nb):
    """Blocks for a grid-stride elementwise kernel over n elements."""
    return max(1, min((n + nb - 1) // nb, 65535))


def _gemm_grid(ns, M, N):
    return (N + ns.TN - 1) // ns.TN, (M + ns.TM - 1) // ns.TM


def _matmul(ns, A, B, Cm, ta, tb):
    """Cm = op(A) @ op(B) without epilogue: cuBLAS via CuPy (zero copy), else our kernel."""
    cp = _cupy()
    if cp is not None:
        a = cp.asarray(A)
        b = cp.asarray(B)
        cp.matmul(a.T if ta else a, b.T if tb else b, out=cp.asarray(Cm))
        return
    M = A.shape[1] if ta else A.shape[0]
    K = A.shape[0] if ta else A.shape[1]
    N = B.shape[0] if tb else B.shape[1]
    gx, gy = _gemm_grid(ns, M, N)
    d, d1 = ns.dummy, ns.dummy1
    z = ns.dtype.type(0)
    ns.gemm[(gx, gy, 1), ns.NT](A, B, Cm, ta, tb, M, N, K, EPI_NONE, d1, 0, 0, z, 0, z, 0, d,
                                d1, 0, d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0, z, 0, d,
                                0, 0, 0, 0, z, 0, z)


def _dense_forward_dev(ns, x, W, b, out, act, slope, thr, scale, k0, k1, step, layer,
                       noise=C.NOISE_NONE, nstd=None, pre=None):
    """out = dropout(noise(f(x @ W + b))) on device arrays (b: 1 element and has_bias=0 if
    none); pre (B, O) receives f(x @ W + b) when there is noise and f is nonlinear (it must
    then be a real array; None otherwise)."""
    M, K = x.shape
    N = W.shape[1]
    has_bias = 1 if b.shape[0] == N and N > 0 and b is not ns.dummy1 else 0
    z = ns.dtype.type(0)
    nstd = z if nstd is None else nstd
    pre = ns.dummy if pre is None else pre
    if _use_cublas(M, N, K):
        _matmul(ns, x, W, out, 0, 0)
        ns.forward_epilogue[_grid1(M * N, ns.NB), ns.NB](out, b, has_bias, act, slope, thr,
                                                         scale, k0, k1, step, layer, noise,
                                                         nstd, pre)
        return
    gx, gy = _gemm_grid(ns, M, N)
    d = ns.dummy
    ns.gemm[(gx, gy, 1), ns.NT](x, W, out, 0, 0, M, N, K, EPI_FORWARD, b, has_bias, act, slope,
                                thr, scale, layer, pre, ns.dummy1, 0,
                                d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0, z, 0, d,
                                k0, k1, step, noise, nstd, 0, z)


def _dense_backward_dev(ns, dz, x, W, dW, db, has_bias, dx, prev, k0, k1, step):
    """dW = x^T dz, db = colsum(dz), and (if dx is not None) dx = dz W^T followed by the
    backward epilogue of the previous layer `prev` = (out, act, slope, thr, scale, layer)
    [+ (noise, nstd, pre) for a layer with noise] or None for a plain dx. dz already holds
    dL/dz of this layer."""
    B, O = dz.shape
    I = x.shape[1]
    z = ns.dtype.type(0)
    d, d1 = ns.dummy, ns.dummy1
    if prev is not None and len(prev) == 6:
        prev = tuple(prev) + (C.NOISE_NONE, z, d)
    split_w = _use_cublas(I, O, B)
    split_x = dx is not None and _use_cublas(B, I, O)
    if split_w:
        _matmul(ns, x, dz, dW, 1, 0)
        if has_bias:
            ns.column_sums[(O + ns.NB - 1) // ns.NB, ns.NB](dz, db)
    if dx is not None and split_x:
        _matmul(ns, dz, W, dx, 0, 1)
        if prev is not None:
            out, act, slope, thr, scale, layer, noise, nstd, pre = prev
            if noise != C.NOISE_NONE:
                ns.noise_backward_epilogue[_grid1(B * I, ns.NB), ns.NB](
                    dx, pre, act, slope, thr, scale, noise, nstd, k0, k1, step, layer)
            else:
                ns.backward_epilogue[_grid1(B * I, ns.NB), ns.NB](dx, out, act, slope, thr,
                                                                  scale, k0, k1, step, layer)
    p0 = not split_w
    p1 = dx is not None and not split_x
    if not (p0 or p1):
        return
    if prev is not None:
        eout, act1, slope1, thr1, scale1, layer1, noise1, nstd1, pre1 = prev
        if noise1 != C.NOISE_NONE:      # its backward reads pre, not the output
            eout = pre1
        epi1 = EPI_BACKWARD
    else:
        eout, act1, slope1, thr1, scale1, layer1, epi1 = d, 0, z, 0, z, 0, EPI_NONE
        noise1, nstd1 = C.NOISE_NONE, z
    a0 = (x, dz, dW, 1, 0, I, O, B) if p0 else (d, d, d, 0, 0, 0, 0, 0)
    a1 = (dz, W, dx, 0, 1, B, I, O) if p1 else (d, d, d, 0, 0, 0, 0, 0)
    gx0, gy0 = _gemm_grid(ns, a0[5], a0[6]) if p0 else (1, 1)
    gx1, gy1 = _gemm_grid(ns, a1[5], a1[6]) if p1 else (1, 1)
    nz = 2 if (p0 and p1) else 1
    if not p0:      # only problem 1: put it in slot 0 (z = 0) with the backward epilogue
        ns.gemm[(gx1, gy1, 1), ns.NT](*a1, epi1, d1, 0, act1, slope1, thr1, scale1, layer1,
                                      eout, d1, 0, d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0,
                                      z, 0, d, k0, k1, step, noise1, nstd1, 0, z)
        return
    ns.gemm[(max(gx0, gx1), max(gy0, gy1), nz), ns.NT](
        *a0, EPI_NONE, d1, 0, 0, z, 0, z, 0, d, db if has_bias else d1, 1 if has_bias else 0,
        *a1, epi1, act1, slope1, thr1, scale1, layer1, eout, k0, k1, step, 0, z, noise1, nstd1)


def _bn_dense_forward_dev(ns, x, W, b, has_bias, out, xhat, gb, save, act, slope, thr, scale,
                         eps, k0, k1, step, layer, noise=C.NOISE_NONE, nstd=None, pre=None):
    """BatchNorm dense forward on device arrays: a plain GEMM, then bn_forward (the column
    statistics need the whole batch, so this epilogue cannot live in the GEMM's tiles).
    noise, nstd, pre as in _dense_forward_dev."""
    _matmul(ns, x, W, out, 0, 0)
    O = out.shape[1]
    nstd = ns.dtype.type(0) if nstd is None else nstd
    pre = ns.dummy if pre is None else pre
    ns.bn_forward[(O + ns.NB - 1) // ns.NB, ns.NB](out, b, has_bias, gb, xhat, save, act, slope,
                                                   thr, scale, eps, k0, k1, step, layer, noise,
                                                   nstd, pre)


def _bn_backward_dev(ns, dy, xhat, gb, save, dgb, db, has_bias, stats, momentum, status):
    """dy -> dz in place through the batch statistics; dgb, db = 0, the running statistics."""
    O = dy.shape[1]
    ns.bn_backward[(O + ns.NB - 1) // ns.NB, ns.NB](dy, xhat, gb, save, dgb, db, has_bias,
                                                    stats, momentum, status)


# ---------------------------------------------------------------- the contract (per op)
def _dev(a):
    return cuda.to_device(np.ascontiguousarray(a))


def _bias_dev(ns, b, O):
    return (_dev(b), 1) if b.size else (ns.dummy1, 0)


def _needs_pre(noise, act):
    return int(noise) != C.NOISE_NONE and int(act) != C.ACT_LINEAR


def dense_forward(x, W, b, out, act, slope, drop_threshold, drop_scale, seed, step, layer,
                  noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    ns = _kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    bd, _ = _bias_dev(ns, b, W.shape[1])
    od = cuda.device_array(out.shape, out.dtype)
    pd = cuda.device_array(out.shape, out.dtype) if _needs_pre(noise, act) else None
    _dense_forward_dev(ns, _dev(x), _dev(W), bd, od, int(act), dt(slope), int(drop_threshold),
                       dt(drop_scale), k0, k1, int(step), int(layer), int(noise),
                       dt(noise_std), pd)
    out[...] = od.copy_to_host()
    if pd is not None and pre is not None and pre.size:
        pre[...] = pd.copy_to_host()


def _output_grad_dev(ns, gd, out, act, slope, drop_threshold, drop_scale, k0, k1, step, layer,
                     noise, noise_std, pre):
    """dL/d(out) -> dL/d(f's input) in place on the device copy gd (host out / pre): the
    backward epilogue, or with noise its noise twin (f' from pre)."""
    dt = ns.dtype.type
    B, O = gd.shape
    if int(noise) != C.NOISE_NONE:
        pd = _dev(pre) if _needs_pre(noise, act) else ns.dummy
        ns.noise_backward_epilogue[_grid1(B * O, ns.NB), ns.NB](
            gd, pd, int(act), dt(slope), int(drop_threshold), dt(drop_scale), int(noise),
            dt(noise_std), k0, k1, int(step), int(layer))
    else:
        ns.backward_epilogue[_grid1(B * O, ns.NB), ns.NB](gd, _dev(out), int(act), dt(slope),
                                                          int(drop_threshold), dt(drop_scale),
                                                          k0, k1, int(step), int(layer))


def dense_backward(grad, out, x, W, dW, db, dx, act, slope, drop_threshold, drop_scale,
                   seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    ns = _kernels(out.dtype)
    k0, k1 = split_seed(seed)
    gd = _dev(grad)
    _output_grad_dev(ns, gd, out, act, slope, drop_threshold, drop_scale, k0, k1, step, layer,
                     noise, noise_std, pre)
    dWd = cuda.device_array(dW.shape, dW.dtype)
    has_bias = db.size > 0
    dbd = cuda.device_array(db.shape, db.dtype) if has_bias else ns.dummy1
    dxd = cuda.device_array(dx.shape, dx.dtype) if dx.size else None
    _dense_backward_dev(ns, gd, _dev(x), _dev(W), dWd, dbd, has_bias, dxd, None, k0, k1,
                        int(step))
    grad[...] = gd.copy_to_host()
    dW[...] = dWd.copy_to_host()
    if has_bias:
        db[...] = dbd.copy_to_host()
    if dxd is not None:
        dx[...] = dxd.copy_to_host()


def bn_dense_forward(x, W, b, out, xhat, gb, save, act, slope, drop_threshold, drop_scale,
                     eps, seed, step, layer, noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    ns = _kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    bd, hb = _bias_dev(ns, b, W.shape[1])
    od = cuda.device_array(out.shape, out.dtype)
    xd = cuda.device_array(xhat.shape, xhat.dtype)
    sd = cuda.to_device(np.ascontiguousarray(save, np.float64))
    pd = cuda.device_array(out.shape, out.dtype) if _needs_pre(noise, act) else None
    _bn_dense_forward_dev(ns, _dev(x), _dev(W), bd, hb, od, xd, _dev(gb), sd, int(act),
                          dt(slope), int(drop_threshold), dt(drop_scale), float(dt(eps)), k0,
                          k1, int(step), int(layer), int(noise), dt(noise_std), pd)
    out[...] = od.copy_to_host()
    xhat[...] = xd.copy_to_host()
    save[...] = sd.copy_to_host()
    if pd is not None and pre is not None and pre.size:
        pre[...] = pd.copy_to_host()


def bn_dense_backward(grad, out, xhat, x, W, gb, stats, save, dW, db, dgb, dx, act, slope,
                      drop_threshold, drop_scale, momentum, seed, step, layer,
                      noise=C.NOISE_NONE, noise_std=0.0, pre=None):
    ns = _kernels(out.dtype)
    k0, k1 = split_seed(seed)
    dt = out.dtype.type
    gd = _dev(grad)
    _output_grad_dev(ns, gd, out, act, slope, drop_threshold, drop_scale, k0, k1, step, layer,
                     noise, noise_std, pre)
    has_bias = db.size > 0
    dbd = cuda.to_device(np.ascontiguousarray(db)) if has_bias else ns.dummy1
    dgbd = cuda.device_array(dgb.shape, dgb.dtype)
    std = _dev(stats)
    status = cuda.to_device(np.zeros(ST_SIZE))
    _bn_backward_dev(ns, gd, _dev(xhat), _dev(gb), _dev(save), dgbd, dbd, 1 if has_bias else 0,
                     std, float(dt(momentum)), status)
    dWd = cuda.device_array(dW.shape, dW.dtype)
    dxd = cuda.device_array(dx.shape, dx.dtype) if dx.size else None
    _dense_backward_dev(ns, gd, _dev(x), _dev(W), dWd, ns.dummy1, False, dxd, None, k0, k1,
                        int(step))
    grad[...] = gd.copy_to_host()
    dW[...] = dWd.copy_to_host()
    dgb[...] = dgbd.copy_to_host()
    stats[...] = std.copy_to_host()
    if has_bias:
        db[...] = dbd.copy_to_host()
    if dxd is not None:
        dx[...] = dxd.copy_to_host()


def input_dropout(x, out, threshold, scale, seed, step, layer, noise=C.NOISE_NONE,
                  noise_std=0.0):
    ns = _kernels(x.dtype)
    k0, k1 = split_seed(seed)
    od = cuda.device_array(x.shape, x.dtype)
    ns.input_dropout[_grid1(x.size, ns.NB), ns.NB](_dev(x), od, int(threshold),
                                                   x.dtype.type(scale), k0, k1, int(step),
                                                   int(layer), int(noise),
                                                   x.dtype.type(noise_std))
    out[...] = od.copy_to_host()


def _loss(logits, y, grad, loss):
    ns = _kernels(logits.dtype)
    z = ns.dtype.type(0)
    status = cuda.to_device(np.zeros(ST_SIZE))
    gd = cuda.device_array(logits.shape, logits.dtype) if grad is not None else ns.dummy
    ns.loss_kernel[1, ns.NB](_dev(logits), _dev(y.astype(logits.dtype, copy=False)), gd,
                             int(loss), grad is not None, status, False, 1.0,
                             C.ACT_LINEAR, z, 0, z, 0, 0, 0, 0)
    if grad is not None:
        grad[...] = gd.copy_to_host()
    return float(status.copy_to_host()[ST_BATCH])


def loss_forward_backward(logits, y, grad, loss):
    return _loss(logits, y, grad, loss)


def loss_value(logits, y, loss):
    return _loss(logits, y, None, loss)


def penalized_update(w, g, m, v, hp, opt, t):
    """One tensor through the same fused update (and max-norm) kernels as train_epoch."""
    ns = _kernels(w.dtype)
    hp = np.asarray(hp, np.float64).reshape(1, C.HP_SIZE)
    shapes = [w.shape]
    tab = _segment_tables(ns, shapes, [m.size > 0], hp, [w.ndim == 2])
    Pd = _dev(w.reshape(-1))
    Gd = _dev(g.reshape(-1))
    Md = _dev(m.reshape(-1)) if m.size else ns.dummy1
    Vd = _dev(v.reshape(-1)) if v.size else ns.dummy1
    status = cuda.to_device(np.zeros(ST_SIZE))
    _launch_update(ns, tab, Pd, Gd, Md, Vd, int(opt), int(t), status, 1.0)
    w[...] = Pd.copy_to_host().reshape(w.shape)
    if m.size:
        m[...] = Md.copy_to_host().reshape(m.shape)
    if v.size:
        v[...] = Vd.copy_to_host().reshape(v.shape)
    return float(status.copy_to_host()[ST_PEN])


def penalty_value(w, hp):
    return _ref_penalty_value(w, hp)


def output_transform(logits, loss):
    return _ref_output_transform(logits, loss)


def philox_words_device(counters, key):
    """Philox4x32-10 of an (n, 4) array of counters through the device function (tests)."""
    ns = _kernels(np.float32)
    c = np.asarray(counters, np.uint64).reshape(-1, 4).astype(np.int64)
    od = cuda.device_array(c.shape, np.uint32)
    ns.philox_words[(c.shape[0] + ns.NB - 1) // ns.NB, ns.NB](
        _dev(c), int(key[0]) & MASK32, int(key[1]) & MASK32, od)
    return od.copy_to_host()


def stream_words_device(n, seed, step, layer, stream):
    """The first n element words of one (seed, step, layer, stream) sequence (tests)."""
    ns = _kernels(np.float32)
    k0, k1 = split_seed(seed)
    od = cuda.device_array(int(n), np.uint32)
    ns.stream_words[_grid1(int(n), ns.NB), ns.NB](od, k0, k1, int(step), int(layer),
                                                  int(stream))
    return od.copy_to_host()


# ---------------------------------------------------------------- fused update plumbing
def _segment_tables(ns, shapes, has_m, hp, is2d):
    """Offsets of the tensors in the flat buffer and the block -> (tensor, chunk) tables."""
    sizes = [int(np.prod(s)) for s in shapes]
    off = np.zeros(len(shapes) + 1, np.int64)
    off[1:] = np.cumsum(sizes)
    blk_seg, blk_lo, blk_hi, col_seg, col_lo = [], [], [], [], []
    rows = np.array([s[0] if len(s) == 2 else 1 for s in shapes], np.int64)
    cols = np.array([s[1] if len(s) == 2 else s[0] for s in shapes], np.int64)
    for s, size in enumerate(sizes):
        for lo in range(0, size, ns.CHUNK):
            blk_seg.append(s)
            blk_lo.append(off[s] + lo)
            blk_hi.append(off[s] + min(size, lo + ns.CHUNK))
        if is2d[s] and (hp[s, C.HP_MAXNORM] > 0 or hp[s, C.HP_GROUP] > 0):
            for c0 in range(0, int(cols[s]), ns.NB):
                col_seg.append(s)
                col_lo.append(c0)
    i64 = lambda a: cuda.to_device(np.asarray(a, np.int64))  # noqa: E731
    return dict(off=off, sizes=sizes, nblk=len(blk_seg), blk_seg=i64(blk_seg),
                blk_lo=i64(blk_lo), blk_hi=i64(blk_hi), hp=cuda.to_device(hp),
                has_m=i64([1 if h else 0 for h in has_m]), n_colblk=len(col_seg),
                col_seg=i64(col_seg or [0]), col_lo=i64(col_lo or [0]), off_d=i64(off),
                rows=i64(rows), cols=i64(cols))


def _launch_update(ns, tab, P, G, Mm, Vv, opt, t, status, weight):
    cols = (tab["col_seg"], tab["col_lo"], tab["off_d"], tab["rows"], tab["cols"], tab["hp"],
            status)
    if tab["n_colblk"]:
        ns.group_penalty[tab["n_colblk"], ns.NB](P, *cols, weight)
    if tab["nblk"]:
        ns.update[tab["nblk"], ns.NB](P, G, Mm, Vv, tab["blk_seg"], tab["blk_lo"], tab["blk_hi"],
                                      tab["hp"], tab["has_m"], opt, t, status, weight)
    if tab["n_colblk"]:
        ns.columns[tab["n_colblk"], ns.NB](P, Vv, *cols, opt, t)


# ---------------------------------------------------------------- device-resident Net
class _DeviceNet:
    """Device copies of a Net: parameters, gradients and moments in flat buffers (so one
    launch updates them all), the batch workspace, the cached training set, the status."""

    # host arrays of each segment kind: (parameters, first moments, second moments)
    HOST_NAMES = {"W": ("Ws", "mW", "vW"), "b": ("bs", "mb", "vb"), "gb": ("gbs", "mgb", "vgb")}

    def __init__(self, net):
        self.ns = ns = _kernels(net.dtype)
        dt = net.dtype
        L = net.n_layers
        self.L = L
        self.training = len(net.dWs) == L
        from .driver import ensure_bn_lists
        ensure_bn_lists(net)
        self.bn = [self.training and bool(net.li[l, C.LI_BN]) for l in range(L)]
        shapes, hps, has_m, is2d = [], [], [], []
        self.host = []          # (kind, layer) per segment, for sync_to_host
        for l in range(L):
            shapes.append(net.Ws[l].shape)
            hps.append(net.hpW[l])
            has_m.append(self.training and net.mW[l].size > 0)
            is2d.append(True)
            self.host.append(("W", l))
            if net.bs[l].size:
                shapes.append(net.bs[l].shape)
                hps.append(net.hpb[l])
                has_m.append(self.training and net.mb[l].size > 0)
                is2d.append(False)
                self.host.append(("b", l))
            if self.bn[l]:      # gamma; beta as one vector: the fused update, no penalty
                shapes.append((net.gbs[l].size,))
                hps.append(net.hpgb[l])
                has_m.append(net.mgb[l].size > 0)
                is2d.append(False)
                self.host.append(("gb", l))
        self.tab = _segment_tables(ns, shapes, has_m, np.array(hps, np.float64).reshape(
            len(shapes), C.HP_SIZE), is2d)
        off = self.tab["off"]
        total = int(off[-1])
        flat = np.concatenate([getattr(net, self.HOST_NAMES[k][0])[l].reshape(-1)
                               for k, l in self.host]).astype(dt)
        self.P = cuda.to_device(flat)
        self.Ws, self.bs = [None] * L, [ns.dummy1] * L
        self.has_bias = [net.bs[l].size > 0 for l in range(L)]
        views = {}
        for s, (k, l) in enumerate(self.host):
            views[(k, l)] = (int(off[s]), int(off[s + 1]), shapes[s])
        self.views = views
        self.gbs = [ns.dummy] * L
        for (k, l), (lo, hi, shp) in views.items():
            v = self.P[lo:hi].reshape(shp) if k == "W" else self.P[lo:hi]
            if k == "W":
                self.Ws[l] = v
            elif k == "b":
                self.bs[l] = v
            else:
                self.gbs[l] = v.reshape(net.gbs[l].shape)
        widths = [net.Ws[0].shape[0]] + [W.shape[1] for W in net.Ws]
        # the fused small-MLP path (kernels/cuda_fused.py) when every width fits and no layer
        # needs whole-batch statistics
        self.fused = hasattr(ns, "fused_step") and max(widths) <= ns.FW and not any(self.bn)
        if not self.training:
            if self.fused:
                self.lay_i, self.lay_f = self._fused_tables(net, widths, np.zeros(L + 1), [])
            return
        self.G = cuda.device_array(total, dt)
        self.dWs = [self.G[views[("W", l)][0]:views[("W", l)][1]].reshape(net.Ws[l].shape)
                    for l in range(L)]
        self.dbs = [self.G[views[("b", l)][0]:views[("b", l)][1]] if self.has_bias[l]
                    else ns.dummy1 for l in range(L)]
        self.dgbs = [self.G[views[("gb", l)][0]:views[("gb", l)][1]].reshape(net.gbs[l].shape)
                     if self.bn[l] else ns.dummy for l in range(L)]
        self.stats = [cuda.to_device(net.stats[l]) if self.bn[l] else ns.dummy
                      for l in range(L)]
        self.saves = [cuda.device_array((C.BN_SAVE_ROWS, net.Ws[l].shape[1]), np.float64)
                      if self.bn[l] else ns.dummy for l in range(L)]
        need_m = any(has_m)
        need_v = net.opt != C.OPT_SGD
        self.M = self._moments(net, 1, total, dt) if need_m else ns.dummy1
        self.V = self._moments(net, 2, total, dt) if need_v else ns.dummy1
        self.has_m = has_m
        B = net.batch
        # One flat buffer for the inputs and every layer's output (segment l + 1: layer l's
        # (B, O_l)), one for their dz (same layout), one for the pre-noise f(z) of the layers
        # that keep it: the per-layer arrays are views, the fused kernels use offsets.
        seg = np.concatenate([[0], np.cumsum([B * w for w in widths])]).astype(np.int64)
        self.ACTS = cuda.device_array(int(seg[-1]), dt)
        self.DZS = cuda.device_array(int(seg[-1]), dt)
        flat_view = lambda buf, l: buf[seg[l]:seg[l + 1]].reshape(B, widths[l])  # noqa: E731
        self.xbuf = flat_view(self.ACTS, 0)
        self.acts = [flat_view(self.ACTS, l + 1) for l in range(L)]
        self.grads = [flat_view(self.DZS, l + 1) for l in range(L)]
        self.xhats = [cuda.device_array((B, W.shape[1]), dt) if on else ns.dummy
                      for W, on in zip(net.Ws, self.bn)]
        from .driver import needs_pre, noise_of
        self.has_pre = [needs_pre(noise_of(net, l)[0], net.li[l, C.LI_ACT]) for l in range(L)]
        pre_off, n_pre = [], 0
        for l in range(L):
            pre_off.append(n_pre if self.has_pre[l] else -1)
            n_pre += B * widths[l + 1] if self.has_pre[l] else 0
        self.PRE = cuda.device_array(max(n_pre, 1), dt)
        self.pres = [self.PRE[pre_off[l]:pre_off[l] + B * widths[l + 1]].reshape(
            B, widths[l + 1]) if self.has_pre[l] else ns.dummy for l in range(L)]
        self.ybuf = cuda.device_array((B, net.ybuf.shape[1]), dt)
        if self.fused:
            self.lay_i, self.lay_f = self._fused_tables(net, widths, seg, pre_off)
            self.partials = cuda.device_array(max(1, -(-B // ns.FR)), np.float64)
        macs = 3 * B * sum(W.shape[0] * W.shape[1] for W in net.Ws)
        self.one_block_epoch = self.fused and macs <= FUSED_EPOCH_MAX_MACS
        self.status = cuda.to_device(np.zeros(ST_SIZE))
        self.data = None
        self._views = {}

    def _fused_tables(self, net, widths, seg, pre_off):
        """The per-layer tables of the fused kernels (cuda_fused.FI_* / FF_*): widths,
        offsets of W and b in P, of the input / output / pre-noise rows in the flat buffers
        (seg: segment l of the activation buffer starts at seg[l]; zeros for an inference
        plan, which stores none), activation, dropout and noise."""
        from . import cuda_fused as F
        from .driver import noise_of
        L = self.L
        lay_i = np.zeros((L, F.FI_SIZE), np.int64)
        lay_f = np.zeros((L, F.FF_SIZE), net.dtype)
        for l in range(L):
            noise, nstd = noise_of(net, l)
            lay_i[l, [F.FI_IN, F.FI_OUT]] = widths[l], widths[l + 1]
            lay_i[l, F.FI_W] = self.views[("W", l)][0]
            lay_i[l, F.FI_B] = self.views[("b", l)][0] if self.has_bias[l] else -1
            lay_i[l, [F.FI_ACT, F.FI_THR, F.FI_NOISE]] = (
                net.li[l, C.LI_ACT], net.li[l, C.LI_DROP_THR], noise)
            lay_i[l, [F.FI_X, F.FI_Y]] = seg[l], seg[l + 1]
            lay_i[l, F.FI_PRE] = pre_off[l] if pre_off else -1
            lay_f[l, [F.FF_SLOPE, F.FF_SCALE, F.FF_NSTD]] = (
                net.lf[l, C.LF_SLOPE], net.lf[l, C.LF_DROP_SCALE], nstd)
        return cuda.to_device(lay_i), cuda.to_device(lay_f)

    def _moments(self, net, which, total, dt):
        """Moment `which` (1: first, 2: second) of every segment, flat, on the device."""
        flat = np.zeros(total, dt)
        for s, (k, l) in enumerate(self.host):
            src = getattr(net, self.HOST_NAMES[k][which])[l]
            if src.size:
                lo, hi, _ = self.views[(k, l)]
                flat[lo:hi] = src.reshape(-1)
        return cuda.to_device(flat)

    def batch_views(self, n):
        """Row views [:n] of the workspace, made once per batch size."""
        v = self._views.get(n)
        if v is None:
            v = dict(acts=[a[:n] for a in self.acts], grads=[g[:n] for g in self.grads],
                     x=self.xbuf[:n], y=self.ybuf[:n],
                     xhats=[a[:n] if on else a for a, on in zip(self.xhats, self.bn)],
                     pres=[a[:n] if on else a for a, on in zip(self.pres, self.has_pre)])
            self._views[n] = v
        return v

    def dataset(self, X, Y):
        """The training set on the device, copied once while the same arrays come back."""
        d = self.data
        if d is None or d[0] is not X or d[1] is not Y or d[2] != (X.shape, Y.shape):
            self.data = d = (X, Y, (X.shape, Y.shape), _dev(X), _dev(Y))
        return d[3], d[4]

    def sync_to_host(self, net):
        P = self.P.copy_to_host()
        bufs = [(P, 0)]
        if self.training:
            if self.M is not self.ns.dummy1:
                bufs.append((self.M.copy_to_host(), 1))
            if self.V is not self.ns.dummy1:
                bufs.append((self.V.copy_to_host(), 2))
        for flat, which in bufs:
            for (k, l), (lo, hi, shp) in self.views.items():
                dst = getattr(net, self.HOST_NAMES[k][which])[l]
                if dst.size:
                    dst[...] = flat[lo:hi].reshape(dst.shape)
        if self.training:
            for l in range(self.L):
                if self.bn[l]:
                    net.stats[l][...] = self.stats[l].copy_to_host()


def _state(net):
    st = net.cache.get("cuda")
    if st is None:
        st = _DeviceNet(net)
        net.cache["cuda"] = st
    return st


def sync_to_host(net):
    """Copy device parameters and optimizer moments back into the Net's host arrays."""
    st = net.cache.get("cuda")
    if st is not None:
        st.sync_to_host(net)


def invalidate(net):
    """Drop the device copies: the next call re-uploads the (user-changed) host arrays."""
    net.cache.pop("cuda", None)


# ---------------------------------------------------------------- epoch / inference entry
def train_epoch(net, X, Y, perm, batch_size, step0, t0):
    """kernels/driver.train_epoch on the device: same steps, same order, same masks.

    Returns (loss_sum, pen_sum, steps, finite); the parameters stay on the device until
    sync_to_host(net)."""
    st = _state(net)
    ns = st.ns
    dt = ns.dtype.type
    Xd, Yd = st.dataset(X, Y)
    perm_d = _dev(np.asarray(perm, np.int64))
    st.status.copy_to_device(np.zeros(ST_SIZE))
    k0, k1 = split_seed(net.seed)
    L = st.L
    li = [[int(v) for v in row] for row in net.li]
    lf = [[dt(v) for v in row] for row in net.lf]
    in_thr = li[0][C.LI_IN_DROP_THR]
    in_scale = lf[0][C.LF_IN_DROP_SCALE]
    in_noise, in_nstd = li[0][C.LI_IN_NOISE], lf[0][C.LF_IN_NOISE_STD]
    noise = [li[l][C.LI_NOISE] for l in range(L)]
    nstd = [lf[l][C.LF_NOISE_STD] for l in range(L)]
    n_total = perm.shape[0]
    NB = ns.NB
    width = X.shape[1] + Y.shape[1]
    if st.fused:
        return _train_epoch_fused(net, st, Xd, Yd, perm_d, n_total, batch_size, step0, t0, k0,
                                  k1, in_thr, in_scale, in_noise, in_nstd)
    steps = 0
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        step = int(step0 + steps)
        t = int(t0 + steps)
        v = st.batch_views(n)
        acts, grads = v["acts"], v["grads"]
        ns.gather[_grid1(n * width, NB), NB](Xd, Yd, perm_d, start, n, v["x"], v["y"], in_thr,
                                             in_scale, k0, k1, step, in_noise, in_nstd)
        x = v["x"]
        for l in range(L):
            if st.bn[l]:
                _bn_dense_forward_dev(ns, x, st.Ws[l], st.bs[l], 1 if st.has_bias[l] else 0,
                                      acts[l], v["xhats"][l], st.gbs[l], st.saves[l],
                                      li[l][C.LI_ACT], lf[l][C.LF_SLOPE], li[l][C.LI_DROP_THR],
                                      lf[l][C.LF_DROP_SCALE], float(lf[l][C.LF_BN_EPS]), k0, k1,
                                      step, l, noise[l], nstd[l], v["pres"][l])
            else:
                _dense_forward_dev(ns, x, st.Ws[l], st.bs[l], acts[l], li[l][C.LI_ACT],
                                   lf[l][C.LF_SLOPE], li[l][C.LI_DROP_THR],
                                   lf[l][C.LF_DROP_SCALE], k0, k1, step, l, noise[l], nstd[l],
                                   v["pres"][l])
            x = acts[l]
        last = L - 1
        if noise[last] != C.NOISE_NONE:     # the loss kernel, then the noisy layer's backward
            z0 = dt(0)
            ns.loss_kernel[1, NB](acts[last], v["y"], grads[last], int(net.loss), True,
                                  st.status, True, float(n), C.ACT_LINEAR, z0, 0, z0, k0, k1,
                                  step, last)
            ns.noise_backward_epilogue[_grid1(n * acts[last].shape[1], NB), NB](
                grads[last], v["pres"][last], li[last][C.LI_ACT], lf[last][C.LF_SLOPE],
                li[last][C.LI_DROP_THR], lf[last][C.LF_DROP_SCALE], noise[last], nstd[last],
                k0, k1, step, last)
        else:
            ns.loss_kernel[1, NB](acts[last], v["y"], grads[last], int(net.loss), True,
                                  st.status, True, float(n), li[last][C.LI_ACT],
                                  lf[last][C.LF_SLOPE], li[last][C.LI_DROP_THR],
                                  lf[last][C.LF_DROP_SCALE], k0, k1, step, last)
        for l in range(L - 1, -1, -1):
            xin = acts[l - 1] if l > 0 else v["x"]
            if l > 0:
                p = l - 1
                prev = (acts[p], li[p][C.LI_ACT], lf[p][C.LF_SLOPE], li[p][C.LI_DROP_THR],
                        lf[p][C.LF_DROP_SCALE], p, noise[p], nstd[p], v["pres"][p])
                dx = grads[p]
            else:
                prev, dx = None, None
            if st.bn[l]:    # grads[l] holds dy (f' and the mask were applied upstream)
                _bn_backward_dev(ns, grads[l], v["xhats"][l], st.gbs[l], st.saves[l],
                                 st.dgbs[l], st.dbs[l], 1 if st.has_bias[l] else 0,
                                 st.stats[l], float(lf[l][C.LF_BN_MOMENTUM]), st.status)
            _dense_backward_dev(ns, grads[l], xin, st.Ws[l], st.dWs[l], st.dbs[l],
                                st.has_bias[l] and not st.bn[l], dx, prev, k0, k1, step)
        _launch_update(ns, st.tab, st.P, st.G, st.M, st.V, int(net.opt), t, st.status,
                       float(n))
        steps += 1
    res = st.status.copy_to_host()
    return float(res[ST_LOSS]), float(res[ST_PEN]), int(res[ST_STEPS]), bool(res[ST_STOP] == 0)


def _train_epoch_fused(net, st, Xd, Yd, perm_d, n_total, batch_size, step0, t0, k0, k1,
                       in_thr, in_scale, in_noise, in_nstd):
    """train_epoch on the fused small-MLP path (cuda_fused): the whole epoch in one launch
    for small steps, else 3 launches per step."""
    ns = st.ns
    L = st.L
    tab = st.tab
    if st.one_block_epoch:
        ns.fused_epoch[1, ns.FNT](
            Xd, Yd, perm_d, n_total, batch_size, int(step0), int(t0), st.P, st.G, st.M, st.V,
            st.lay_i, st.lay_f, st.ACTS, st.DZS, st.PRE, int(net.loss), k0, k1, in_thr,
            in_scale, in_noise, in_nstd, int(net.opt), st.status, tab["blk_seg"], tab["blk_lo"],
            tab["blk_hi"], tab["hp"], tab["has_m"], tab["nblk"], tab["col_seg"], tab["col_lo"],
            tab["off_d"], tab["rows"], tab["cols"], tab["n_colblk"])
        res = st.status.copy_to_host()
        return (float(res[ST_LOSS]), float(res[ST_PEN]), int(res[ST_STEPS]),
                bool(res[ST_STOP] == 0))
    gx = (max(W.shape[1] for W in net.Ws) + ns.TN - 1) // ns.TN
    gy = (max(W.shape[0] for W in net.Ws) + ns.TM - 1) // ns.TM
    steps = 0
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        nblk = -(-n // ns.FR)
        ns.fused_step[nblk, ns.FNT](Xd, Yd, perm_d, start, n, st.P, st.lay_i, st.lay_f, st.ACTS,
                                    st.DZS, st.PRE, st.partials, int(net.loss), k0, k1,
                                    int(step0 + steps), in_thr, in_scale, in_noise, in_nstd)
        ns.weight_grads[(gx, gy, L + 1), ns.NT](st.G, st.lay_i, st.ACTS, st.DZS, n, st.partials,
                                                nblk, int(net.loss), st.status, float(n))
        _launch_update(ns, tab, st.P, st.G, st.M, st.V, int(net.opt), int(t0 + steps),
                       st.status, float(n))
        steps += 1
    res = st.status.copy_to_host()
    return float(res[ST_LOSS]), float(res[ST_PEN]), int(res[ST_STEPS]), bool(res[ST_STOP] == 0)


def forward_inference(net, X, batch_size):
    """Logits for X, dropout off, in chunks of batch_size rows (parameters uploaded once)."""
    st = _state(net)
    ns = st.ns
    dt = ns.dtype.type
    n = X.shape[0]
    out = np.empty((n, net.Ws[-1].shape[1]), net.dtype)
    if n == 0:
        return out
    rows = max(1, min(int(batch_size), n))
    if st.fused:    # one launch per chunk, activations in shared memory only
        K = net.Ws[-1].shape[1]
        od = cuda.device_array(rows * K, net.dtype)
        for start in range(0, n, rows):
            m = min(rows, n - start)
            ns.fused_forward[-(-m // ns.FR), ns.FNT](_dev(X[start:start + m]), od, st.P,
                                                     st.lay_i, st.lay_f)
            out[start:start + m] = od[:m * K].copy_to_host().reshape(m, K)
        return out
    bufs = [cuda.device_array((rows, W.shape[1]), net.dtype) for W in net.Ws]
    for start in range(0, n, rows):
        m = min(rows, n - start)
        x = _dev(X[start:start + m])
        for l in range(st.L):
            _dense_forward_dev(ns, x, st.Ws[l], st.bs[l], bufs[l][:m], int(net.li[l, C.LI_ACT]),
                               dt(net.lf[l, C.LF_SLOPE]), 0, dt(1), 0, 0, 0, l)
            x = bufs[l][:m]
        out[start:start + m] = x.copy_to_host()
    return out
