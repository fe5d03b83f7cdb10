"""The dense layer on the device: a tiled shared-memory GEMM with the epilogue fused, and the
launches of a layer's forward and backward (twin of kernels/reference/dense.py).

Shape legend: B batch rows, I fan_in, O fan_out; in the GEMM kernel Cm[M, N] =
op(A)[M, K] @ op(B)[K, N].

`gemm`: TILE_M x TILE_N output tiles, TILE_K deep, THREAD_M x THREAD_N register micro-tile
per thread, transposes as flags (no copies). Its epilogue is fused:
    forward   bias + activation [+ noise, the pre buffer] + dropout (Philox regenerated per
              4-word group, the noise words likewise; epilogue.dense_epilogue)      -> out
    backward  dW = x^T dz with the bias gradient summed from the same dz tiles (the blocks
              of the first row-tile sum their shared-memory dz tiles over the batch, in row
              order: no atomics, deterministic), and in the SAME launch (blockIdx.z = 1)
              dx = dz W^T with the previous layer's backward epilogue applied (mask
              regenerated, f' from its output or pre buffer), so dx lands as that layer's dz.
Large GEMMs with CuPy installed (jit.use_cublas) go to cuBLAS through CuPy on zero-copy
views (`__cuda_array_interface__`), then one elementwise epilogue kernel (epilogue.py) and,
for db, `column_sums`. CuPy and numba both launch on the legacy default stream: no
synchronisation is needed.
"""
from collections import namedtuple

import numpy as np

from .. import contract
from .epilogue import EPI_BACKWARD, EPI_FORWARD, EPI_FORWARD_PRE, EPI_NONE
from .jit import cuda, cupy, grid1, numba, use_cublas

# The backward epilogue of a layer, applied to a dx that becomes its dz: `stored` is what
# f' reads (its output, or its pre buffer: contract.keeps_pre), the rest its configuration.
Epilogue = namedtuple("Epilogue", "stored act slope thr scale layer noise nstd")


def build(ns):
    build_tiles(ns)
    build_gemm(ns)


def build_tiles(ns):
    dev, TK, TN, RM, RN, NT = ns.dev, ns.TK, ns.TN, ns.RM, ns.RN, ns.NT
    DBN = (TN + NT - 1) // NT     # bias-gradient columns per thread

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

    ns.__dict__.update(tile_fma=tile_fma, stage_col_sums=stage_col_sums, DBN=DBN)


def build_gemm(ns):
    dev, T, ZERO = ns.dev, ns.T, ns.ZERO
    TM, TN, TK, RM, RN, NT, DBN = ns.TM, ns.TN, ns.TK, ns.RM, ns.RN, ns.NT, ns.DBN
    NTX = TN // RN
    TMP = TM + 1    # padded rows of the shared tiles: no bank conflicts on transposed stores
    TNP = TN + 1
    U0 = np.uint64(0)
    tile_fma, stage_col_sums, dense_epilogue = ns.tile_fma, ns.stage_col_sums, ns.dense_epilogue

    @cuda.jit(**dev)
    def gemm_problem(As, Bs, acc, areg, breg, dbacc, A, B, Cm, ta, tb, M, N, K, epi, bias,
                     has_bias, act, slope, thr, scale, layer, eout, dbias, want_db, k0, k1,
                     step, noise, nstd):
        """One GEMM problem and its epilogue. eout: what the backward epilogue's f' reads
        (EPI_BACKWARD), or the pre buffer the forward writes (EPI_FORWARD_PRE): a device
        function takes at most 30 arguments here, so the two share one slot."""
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
                            stored = ZERO
                            if epi == EPI_BACKWARD and (noise == contract.NOISE_NONE
                                                        or act != contract.ACT_LINEAR):
                                stored = eout[i, j]
                            bj = bias[j] if (epi != EPI_BACKWARD and has_bias) else ZERO
                            v, a = dense_epilogue(v, epi, has_bias, bj, act, slope, thr, scale,
                                                  noise, nstd, stored, i * N + j, wc, nc, k0,
                                                  k1, step, layer)
                            if epi == EPI_FORWARD_PRE:
                                eout[i, j] = a
                        Cm[i, j] = v

    @cuda.jit
    def gemm(A0, B0, C0, ta0, tb0, M0_, N0_, K0_, epi0, bias0, hb0, act0, slope0, thr0, scale0,
             layer0, eout0, db0, wdb0,
             A1, B1, C1, ta1, tb1, M1_, N1_, K1_, epi1, act1, slope1, thr1, scale1, layer1,
             eout1, k0, k1, step, noise0, nstd0, noise1, nstd1):
        """blockIdx.z = 0: problem 0 (any epilogue, optional bias gradient); z = 1: problem 1.
        noise*, nstd*: the noise of the layer whose epilogue a problem runs."""
        As = cuda.shared.array((TK, TMP), T)
        Bs = cuda.shared.array((TK, TNP), T)
        acc = cuda.local.array((RM, RN), T)
        areg = cuda.local.array(RM, T)
        breg = cuda.local.array(RN, T)
        dbacc = cuda.local.array(DBN, T)
        if cuda.blockIdx.z == 0:
            gemm_problem(As, Bs, acc, areg, breg, dbacc, A0, B0, C0, ta0, tb0, M0_, N0_, K0_,
                         epi0, bias0, hb0, act0, slope0, thr0, scale0, layer0, eout0, db0,
                         wdb0 != 0 and cuda.blockIdx.y == 0, k0, k1, step, noise0, nstd0)
        else:
            gemm_problem(As, Bs, acc, areg, breg, dbacc, A1, B1, C1, ta1, tb1, M1_, N1_, K1_,
                         epi1, bias0, 0, act1, slope1, thr1, scale1, layer1, eout1, db0, False,
                         k0, k1, step, noise1, nstd1)

    @cuda.jit
    def column_sums(dz, db):
        """db[j] = sum_i dz[i, j], rows in order (the cuBLAS path's bias gradient)."""
        j = cuda.grid(1)
        if j < dz.shape[1]:
            s = ZERO
            for i in range(dz.shape[0]):
                s += dz[i, j]
            db[j] = s

    ns.__dict__.update(gemm=gemm, column_sums=column_sums)


# ---------------------------------------------------------------- launches
def gemm_grid(ns, M, N):
    return (N + ns.TN - 1) // ns.TN, (M + ns.TM - 1) // ns.TM


def matmul(ns, A, B, Cm, ta, tb):
    """Cm = op(A) @ op(B) without epilogue: cuBLAS via CuPy (zero copy), else our kernel."""
    cp = cupy()
    if cp is not None:
        a = cp.asarray(A)
        b = cp.asarray(B)
        cp.matmul(a.T if ta else a, b.T if tb else b, out=cp.asarray(Cm))
        return
    M = A.shape[1] if ta else A.shape[0]
    K = A.shape[0] if ta else A.shape[1]
    N = B.shape[0] if tb else B.shape[1]
    gx, gy = gemm_grid(ns, M, N)
    d, d1 = ns.dummy, ns.dummy1
    z = ns.ZERO
    ns.gemm[(gx, gy, 1), ns.NT](A, B, Cm, ta, tb, M, N, K, EPI_NONE, d1, 0, 0, z, 0, z, 0, d,
                                d1, 0, d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0, z, 0, d,
                                0, 0, 0, 0, z, 0, z)


def forward(ns, x, W, b, has_bias, out, act, slope, thr, scale, k0, k1, step, layer,
            noise=contract.NOISE_NONE, nstd=None, pre=None):
    """out = dropout(noise(f(x @ W + b))) on device arrays (b: ns.dummy1 without a bias);
    pre (B, O), given when the layer keeps one (contract.keeps_pre), receives z or f(z)."""
    M, K = x.shape
    N = W.shape[1]
    nstd = ns.ZERO if nstd is None else nstd
    if use_cublas(M, N, K):
        matmul(ns, x, W, out, 0, 0)
        ns.forward_epilogue[grid1(M * N, ns.NB), ns.NB](
            out, b, has_bias, act, slope, thr, scale, k0, k1, step, layer, noise, nstd,
            ns.dummy if pre is None else pre, pre is not None)
        return
    gx, gy = gemm_grid(ns, M, N)
    d, z = ns.dummy, ns.ZERO
    epi = EPI_FORWARD if pre is None else EPI_FORWARD_PRE
    ns.gemm[(gx, gy, 1), ns.NT](x, W, out, 0, 0, M, N, K, epi, b, has_bias, act, slope,
                                thr, scale, layer, d if pre is None else pre, ns.dummy1, 0,
                                d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0, z, 0, d,
                                k0, k1, step, noise, nstd, 0, z)


def output_grad(ns, grad, epi, k0, k1, step):
    """grad = dL/d(out) -> dL/dz in place through the backward epilogue `epi` (Epilogue)."""
    B, O = grad.shape
    ns.output_grad[grid1(B * O, ns.NB), ns.NB](grad, epi.stored, epi.act, epi.slope, epi.thr,
                                               epi.scale, epi.noise, epi.nstd, k0, k1, step,
                                               epi.layer)


def backward(ns, dz, x, W, dW, db, has_bias, dx, prev, k0, k1, step):
    """dW = x^T dz, db = colsum(dz) (has_bias), and (dx not None) dx = dz W^T followed by
    the backward epilogue `prev` (Epilogue) of the layer before, or none (prev None). dz
    already holds this layer's dL/dz."""
    B, O = dz.shape
    I = x.shape[1]
    z = ns.ZERO
    d, d1 = ns.dummy, ns.dummy1
    split_w = use_cublas(I, O, B)
    split_x = dx is not None and use_cublas(B, I, O)
    if split_w:
        matmul(ns, x, dz, dW, 1, 0)
        if has_bias:
            ns.column_sums[(O + ns.NB - 1) // ns.NB, ns.NB](dz, db)
    if dx is not None and split_x:
        matmul(ns, dz, W, dx, 0, 1)
        if prev is not None:
            output_grad(ns, dx, prev, k0, k1, step)
    p0 = not split_w
    p1 = dx is not None and not split_x
    if not (p0 or p1):
        return
    if prev is not None:
        eout, act1, slope1, thr1, scale1, layer1, noise1, nstd1 = prev
        epi1 = EPI_BACKWARD
    else:
        eout, act1, slope1, thr1, scale1, layer1, epi1 = d, 0, z, 0, z, 0, EPI_NONE
        noise1, nstd1 = contract.NOISE_NONE, z
    a0 = (x, dz, dW, 1, 0, I, O, B) if p0 else (d, d, d, 0, 0, 0, 0, 0)
    a1 = (dz, W, dx, 0, 1, B, I, O) if p1 else (d, d, d, 0, 0, 0, 0, 0)
    gx0, gy0 = gemm_grid(ns, a0[5], a0[6]) if p0 else (1, 1)
    gx1, gy1 = gemm_grid(ns, a1[5], a1[6]) if p1 else (1, 1)
    nz = 2 if (p0 and p1) else 1
    if not p0:      # only problem 1: put it in slot 0 (z = 0) with the backward epilogue
        ns.gemm[(gx1, gy1, 1), ns.NT](*a1, epi1, d1, 0, act1, slope1, thr1, scale1, layer1,
                                      eout, d1, 0, d, d, d, 0, 0, 0, 0, 0, EPI_NONE, 0, z, 0,
                                      z, 0, d, k0, k1, step, noise1, nstd1, 0, z)
        return
    ns.gemm[(max(gx0, gx1), max(gy0, gy1), nz), ns.NT](
        *a0, EPI_NONE, d1, 0, 0, z, 0, z, 0, d, db if has_bias else d1, 1 if has_bias else 0,
        *a1, epi1, act1, slope1, thr1, scale1, layer1, eout, k0, k1, step, 0, z, noise1, nstd1)
