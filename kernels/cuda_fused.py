"""The fully fused small-MLP path of the CUDA backend: a whole training step in three launches.

For nets whose every width (inputs, each layer's fan_in and fan_out) is at most
cuda.FUSED_MAX_WIDTH and that have no BatchNorm (its batch statistics need every row of the
batch in one place), in the spirit of NVIDIA's tiny-cuda-nn (Mueller et al. 2021, "Real-time
neural radiance caching for path tracing"): a block owns R = FUSED_ROWS rows of the batch and
carries them through ALL layers with the activations in shared memory, so a layer costs no
launch and no round trip of its input through global memory.

Shape legend: B batch rows, R rows per block, I fan_in, O fan_out, K outputs, L dense layers,
W the widest width a fused plan takes (FUSED_MAX_WIDTH).

    fused_step     grid: one block per R batch rows; per block:
        gather its rows of X by the permutation, input noise + dropout (stream and element
        numbering of cuda.gather)
        forward, every layer: H[cur] (R x I) @ W_l, W_l staged through shared memory TK rows
            at a time, R x O accumulated in registers (RM x RN micro-tiles), then the epilogue
            (bias, activation, noise, dropout: the device functions of kernels/cuda.py) into
            H[1 - cur]; the output is written once to global memory (the weight gradients and
            backward's f' read it)
        loss, a thread per row: float64 row losses (summed in row order into one partial per
            block), d(mean loss)/d(logits), the last layer's backward epilogue
        backward, l = L-1 .. 1: H[cur] (dz_l, R x O) @ W_l^T, then layer l-1's backward
            epilogue (mask and noise regenerated from Philox, f' from its stored output or its
            pre-noise f(z)) -> dz_{l-1} into H[1 - cur] and global memory
    weight_grads   grid: (O tiles, I tiles, L + 1)
        z = l < L: dW_l = x_l^T dz_l and db_l = colsum(dz_l) (rows in order, like the tiled
            GEMM's bias gradient), every layer in the one launch
        z = L: one block sums the partials in block order (deterministic), writes the batch
            loss, the epoch sums and the stop flag exactly as cuda.loss_kernel does
    update         cuda.update (+ the column passes), unchanged

So a step is 3 launches whatever the depth; the tiled path takes 2L + 3 (11 for `curve`).

    fused_epoch    ONE block, ONE launch for the whole epoch, when a step is small
        (cuda.FUSED_EPOCH_MAX_MACS): a launch from Python costs tens of microseconds (numba
        prepares its arguments in Python), about what a single SM needs for such a step, so
        the launches, not the arithmetic, would set the pace. Per step: rows_pass over the
        batch R rows at a time, block_weight_grads, the batch loss and stop flag, then the
        update through the device functions of cuda's update kernels (group penalty, update
        chunks, column pass) one item after another. No grid-wide barrier is needed (one
        block), so it also runs on numba-cuda's simulator as it runs on a GPU.
Masks, noise and the numbering of every random element are those of the tiled path and the
CPU backends (element e = batch_row * O + unit of the (seed, step, layer, stream) sequence),
so the results agree with them to float32 rounding. Inference (`fused_forward`) runs the
same forward with dropout and noise off, nothing stored but the last layer's output.

The activations and dz of every layer live in one flat buffer each (the (B, O_l) arrays of
the tiled path are views of it), so a kernel finds layer l's by the offsets of the per-layer
table below, and the parameters and their gradients in the flat P / G buffers of the update.
"""
import numba
import numpy as np
from numba import cuda  # a module global: the simulator swaps it (kernels/cuda.py imports us
                        # only once numba-cuda is known to be there)

from . import contract as C
from .philox import STREAM_INPUT_DROPOUT, STREAM_INPUT_NOISE

# Columns of a fused plan's per-layer integer table lay_i (int64, L x FI_SIZE).
FI_IN = 0       # fan_in I
FI_OUT = 1      # fan_out O
FI_W = 2        # offset of W (I x O, row-major) in the flat parameters P (and gradients G)
FI_B = 3        # offset of b in P and G; -1 without a bias
FI_ACT = 4      # activation code
FI_THR = 5      # dropout threshold of the output (0: none)
FI_NOISE = 6    # NOISE_* code of the output
FI_X = 7        # offset of the layer's input (B x I) in the flat activation buffer
FI_Y = 8        # offset of its output (B x O) in the activation buffer and the dz buffer
FI_PRE = 9      # offset of its pre-noise f(z) (B x O) in the pre buffer; -1 if not kept
FI_SIZE = 10
# Columns of the float table lay_f (parameter dtype, L x FF_SIZE).
FF_SLOPE = 0
FF_SCALE = 1    # 1 / keep_prob of the output dropout
FF_NSTD = 2     # noise std
FF_SIZE = 3

MODE_TRAIN = 0  # forward epilogue of training: dropout and noise, output stored
MODE_INFER = 1  # forward epilogue of inference: no dropout, no noise, nothing stored
MODE_BACK = 2   # backward epilogue: dL/d(out) -> dL/dz of the layer
EPI_FORWARD = 1     # cuda.EPI_*: the modes of cuda.dense_epilogue
EPI_BACKWARD = 2


def shared_bytes(R, W, TK, NT, itemsize):
    """Bytes of static shared memory a fused_epoch block uses (H, the weight stage, the row
    losses, the update's coefficients and reductions; fused_step uses less): must stay within
    48 KiB, the static limit."""
    return (2 * R * (W + 1) + TK * (W + 1) + 16) * itemsize + 8 * R + 16 * NT


def build(ns, R, W, NT, TK, RM, RN, dev):
    """Compile-time closures of the fused kernels over the device functions of ns (built by
    cuda._build for the same dtype); returns them in a dict."""
    if R % RM or W % RN or NT & (NT - 1):
        raise ValueError("FUSED_ROWS must be a multiple of FUSED_THREAD_M, FUSED_MAX_WIDTH of "
                         "FUSED_THREAD_N, and FUSED_THREADS a power of two")
    T = numba.from_dtype(ns.dtype)
    FT = ns.dtype.type
    ZERO = FT(0)
    ONE = FT(1)
    U0 = np.uint64(0)
    WP = W + 1
    TPT = -(-((R // RM) * (W // RN)) // NT)     # micro-tiles per thread, at most
    GTM, GTN, GTK, GRM, GRN, GNT = ns.TM, ns.TN, ns.TK, ns.RM, ns.RN, ns.NT
    GTX = GTN // GRN
    GTMP = GTM + 1      # padded shared rows (shapes must be compile-time constants)
    GTNP = GTN + 1
    DBN = (GTN + GNT - 1) // GNT
    philox_word, normal_at, noisy = ns.philox_word, ns.normal_at, ns.noisy
    dense_epilogue, tile_fma, stage_col_sums = ns.dense_epilogue, ns.tile_fma, ns.stage_col_sums
    sce_row, sce_grad, pointwise_loss = ns.sce_row, ns.sce_grad, ns.pointwise_loss
    loss_scale, record_batch_loss = ns.loss_scale, ns.record_batch_loss
    update_chunk, group_penalty_cols, column_pass = (ns.update_chunk, ns.group_penalty_cols,
                                                     ns.column_pass)
    ST_STOP = ns.ST_STOP

    @cuda.jit(**dev)
    def clear(H, Wsh):
        """Zero the shared buffers once per kernel: rows past the block's last and columns past
        a layer's width are then zeros or earlier finite values, read into accumulators that
        are never stored (no NaN from uninitialised memory, even there)."""
        tid = cuda.threadIdx.x
        for idx in range(tid, R * WP, NT):
            r = idx // WP
            k = idx - r * WP
            H[0, r, k] = ZERO
            H[1, r, k] = ZERO
        for idx in range(tid, TK * WP, NT):
            kk = idx // WP
            Wsh[kk, idx - kk * WP] = ZERO
        cuda.syncthreads()

    @cuda.jit(**dev)
    def stage_gemm(H, cur, Wsh, acc, areg, breg, P, woff, Kd, Nd, trans, nr):
        """acc = this thread's RM x RN micro-tiles of H[cur, :nr, :Kd] @ B, B (Kd x Nd) the
        weights at P[woff:]: W (Kd x Nd, row-major) when trans == 0, W^T of a (Nd x Kd) W
        when trans == 1. Inner products in k order."""
        tid = cuda.threadIdx.x
        ntc = (Nd + RN - 1) // RN
        ncol = ntc * RN
        ntiles = ((nr + RM - 1) // RM) * ntc
        for s in range(TPT):
            for r in range(RM):
                for c in range(RN):
                    acc[s, r, c] = ZERO
        for kt in range(0, Kd, TK):
            for idx in range(tid, TK * ncol, NT):
                kk = idx // ncol
                nn = idx - kk * ncol
                gk = kt + kk
                v = ZERO
                if gk < Kd and nn < Nd:
                    if trans == 0:
                        v = P[woff + gk * Nd + nn]
                    else:
                        v = P[woff + nn * Kd + gk]
                Wsh[kk, nn] = v
            cuda.syncthreads()
            kn = min(TK, Kd - kt)
            for s in range(TPT):
                t = s * NT + tid
                if t < ntiles:
                    tr = t // ntc
                    tc = t - tr * ntc
                    for kk in range(kn):
                        for r in range(RM):
                            areg[r] = H[cur, tr * RM + r, kt + kk]
                        for c in range(RN):
                            breg[c] = Wsh[kk, tc * RN + c]
                        for r in range(RM):
                            for c in range(RN):
                                acc[s, r, c] += areg[r] * breg[c]
            cuda.syncthreads()

    @cuda.jit(**dev)
    def epilogue(H, cur, acc, P, lay_i, lay_f, l, mode, nr, row0, ACTS, DZS, PRE, k0, k1,
                 step):
        """The micro-tiles in acc -> H[1 - cur] (and global memory) through layer l's
        epilogue: forward (MODE_TRAIN / MODE_INFER) takes acc = x @ W_l; backward
        (MODE_BACK) takes acc = dL/d(out_l) and leaves dL/dz_l. One Philox call per group of
        4 consecutive elements (cuda.dense_epilogue, as the tiled GEMM)."""
        tid = cuda.threadIdx.x
        O = lay_i[l, FI_OUT]
        boff = lay_i[l, FI_B]
        act = lay_i[l, FI_ACT]
        thr = lay_i[l, FI_THR]
        noise = lay_i[l, FI_NOISE]
        if mode == MODE_INFER:
            thr = 0
            noise = C.NOISE_NONE
        slope = lay_f[l, FF_SLOPE]
        scale = lay_f[l, FF_SCALE]
        nstd = lay_f[l, FF_NSTD]
        yoff = lay_i[l, FI_Y]
        poff = lay_i[l, FI_PRE]
        epi = EPI_BACKWARD if mode == MODE_BACK else EPI_FORWARD
        keep = mode == MODE_TRAIN and noise != C.NOISE_NONE and poff >= 0
        ntc = (O + RN - 1) // RN
        ntiles = ((nr + RM - 1) // RM) * ntc
        wc = cuda.local.array(5, numba.uint64)     # Philox group caches: dropout, noise
        nc = cuda.local.array(5, numba.uint64)
        for s in range(TPT):
            t = s * NT + tid
            if t < ntiles:
                tr = t // ntc
                tc = t - tr * ntc
                for r in range(RM):
                    row = tr * RM + r
                    if row < nr:
                        i = row0 + row
                        wc[0] = U0
                        nc[0] = U0
                        for c in range(RN):
                            j = tc * RN + c
                            if j < O:
                                e = i * O + j
                                stored = ZERO
                                if mode == MODE_BACK:
                                    if noise == C.NOISE_NONE:
                                        stored = ACTS[yoff + e]
                                    elif act != C.ACT_LINEAR:
                                        stored = PRE[poff + e]
                                bj = P[boff + j] if (mode != MODE_BACK and boff >= 0) else ZERO
                                v, a = dense_epilogue(acc[s, r, c], epi, boff >= 0, bj, act,
                                                      slope, thr, scale, noise, nstd, stored, e,
                                                      wc, nc, k0, k1, step, l)
                                if mode == MODE_BACK:
                                    DZS[yoff + e] = v
                                else:
                                    if keep:
                                        PRE[poff + e] = a
                                    if mode == MODE_TRAIN:
                                        ACTS[yoff + e] = v
                                H[1 - cur, row, j] = v

    @cuda.jit(**dev)
    def loss_rows(H, cur, Y, perm, start, nr, row0, n, loss, lay_i, lay_f, ACTS, DZS, PRE,
                  rowloss, k0, k1, step):
        """A thread per row: the row's loss (float64) into rowloss, dL/dz of the last layer
        into H[cur] (in place of its output) and DZS: cuda.loss_kernel's loss math (its
        device functions; the gradient of the batch mean), then the last layer's backward
        epilogue."""
        tid = cuda.threadIdx.x
        last = lay_i.shape[0] - 1
        K = lay_i[last, FI_OUT]
        act = lay_i[last, FI_ACT]
        thr = lay_i[last, FI_THR]
        noise = lay_i[last, FI_NOISE]
        slope = lay_f[last, FF_SLOPE]
        scale = lay_f[last, FF_SCALE]
        nstd = lay_f[last, FF_NSTD]
        yoff = lay_i[last, FI_Y]
        poff = lay_i[last, FI_PRE]
        mixed = loss == C.LOSS_SCE and Y.shape[1] == C.SCE_MIXED_WIDTH
        c, _ = loss_scale(loss, n, K)
        z = H[cur]
        wc = cuda.local.array(5, numba.uint64)     # Philox group caches: dropout, noise
        nc = cuda.local.array(5, numba.uint64)
        for r in range(tid, nr, NT):
            i = row0 + r
            src = perm[start + i]
            wc[0] = U0
            nc[0] = U0
            total = 0.0
            zmax = ZERO
            s = ONE
            la = 0
            lb = 0
            lam = ONE
            if loss == C.LOSS_SCE:
                total, zmax, s, la, lb, lam = sce_row(z, r, K, Y, src, mixed)
            for k in range(K):
                zz = z[r, k]
                if loss == C.LOSS_SCE:
                    g = sce_grad(zz, k, zmax, s, la, lb, lam, mixed, c)
                else:
                    l64, g = pointwise_loss(zz, Y[src, k], loss, c)
                    total += l64
                e = i * K + k
                stored = zz
                if noise != C.NOISE_NONE:
                    stored = PRE[poff + e] if act != C.ACT_LINEAR else ZERO
                dz, _ = dense_epilogue(g, EPI_BACKWARD, False, ZERO, act, slope, thr, scale,
                                       noise, nstd, stored, e, wc, nc, k0, k1, step, last)
                z[r, k] = dz
                DZS[yoff + e] = dz
            rowloss[r] = total

    @cuda.jit(**dev)
    def rows_pass(H, Wsh, acc, areg, breg, rowloss, X, Y, perm, start, n, row0, nr, P, lay_i,
                  lay_f, ACTS, DZS, PRE, loss, k0, k1, step, in_thr, in_scale, in_noise,
                  in_nstd):
        """Batch rows [row0, row0 + nr) of the batch perm[start:start + n] through the whole
        net: gather (input noise + dropout), forward, loss, backward deltas. Leaves every
        layer's input and dz in ACTS / DZS and the rows' losses in rowloss[:nr]."""
        tid = cuda.threadIdx.x
        L = lay_i.shape[0]
        I0 = lay_i[0, FI_IN]
        xoff = lay_i[0, FI_X]
        for idx in range(tid, nr * I0, NT):
            r = idx // I0
            j = idx - r * I0
            e = (row0 + r) * I0 + j
            v = X[perm[start + row0 + r], j]
            if in_noise != C.NOISE_NONE:
                v = noisy(v, in_noise, in_nstd, FT(normal_at(e, k0, k1, step, 0,
                                                             STREAM_INPUT_NOISE)))
            if in_thr > 0:
                word = philox_word(e, k0, k1, step, 0, STREAM_INPUT_DROPOUT)
                v = v * in_scale if word >= np.uint64(in_thr) else ZERO
            H[0, r, j] = v
            ACTS[xoff + e] = v
        cuda.syncthreads()
        cur = 0
        for l in range(L):
            stage_gemm(H, cur, Wsh, acc, areg, breg, P, lay_i[l, FI_W], lay_i[l, FI_IN],
                       lay_i[l, FI_OUT], 0, nr)
            epilogue(H, cur, acc, P, lay_i, lay_f, l, MODE_TRAIN, nr, row0, ACTS, DZS, PRE,
                     k0, k1, step)
            cuda.syncthreads()
            cur = 1 - cur
        loss_rows(H, cur, Y, perm, start, nr, row0, n, loss, lay_i, lay_f, ACTS, DZS, PRE,
                  rowloss, k0, k1, step)
        cuda.syncthreads()
        for l in range(L - 1, 0, -1):
            stage_gemm(H, cur, Wsh, acc, areg, breg, P, lay_i[l, FI_W], lay_i[l, FI_OUT],
                       lay_i[l, FI_IN], 1, nr)
            epilogue(H, cur, acc, P, lay_i, lay_f, l - 1, MODE_BACK, nr, row0, ACTS, DZS, PRE,
                     k0, k1, step)
            cuda.syncthreads()
            cur = 1 - cur

    @cuda.jit
    def fused_step(X, Y, perm, start, n, P, lay_i, lay_f, ACTS, DZS, PRE, partials, loss, k0,
                   k1, step, in_thr, in_scale, in_noise, in_nstd):
        """rows_pass of batch rows [R*blockIdx.x, +R) of the batch perm[start:start + n]; the
        sum of their losses (in row order) into partials[blockIdx.x]."""
        H = cuda.shared.array((2, R, WP), T)
        Wsh = cuda.shared.array((TK, WP), T)
        rowloss = cuda.shared.array(R, numba.float64)
        acc = cuda.local.array((TPT, RM, RN), T)
        areg = cuda.local.array(RM, T)
        breg = cuda.local.array(RN, T)
        row0 = cuda.blockIdx.x * R
        nr = min(R, n - row0)
        clear(H, Wsh)
        rows_pass(H, Wsh, acc, areg, breg, rowloss, X, Y, perm, start, n, row0, nr, P, lay_i,
                  lay_f, ACTS, DZS, PRE, loss, k0, k1, step, in_thr, in_scale, in_noise,
                  in_nstd)
        if cuda.threadIdx.x == 0:
            total = 0.0
            for r in range(nr):
                total += rowloss[r]
            partials[cuda.blockIdx.x] = total

    @cuda.jit(**dev)
    def block_weight_grads(acc, areg, breg, G, lay_i, ACTS, DZS, n):
        """Every layer's dW = x^T dz and db = colsum(dz) by one block: RM x RN micro-tiles of
        dW read straight from the (cache-resident) activations, rows in order."""
        tid = cuda.threadIdx.x
        for l in range(lay_i.shape[0]):
            I = lay_i[l, FI_IN]
            O = lay_i[l, FI_OUT]
            xoff = lay_i[l, FI_X]
            doff = lay_i[l, FI_Y]
            woff = lay_i[l, FI_W]
            boff = lay_i[l, FI_B]
            nti = (I + RM - 1) // RM
            ntj = (O + RN - 1) // RN
            for t in range(tid, nti * ntj, NT):
                ti = t // ntj
                tj = t - ti * ntj
                for r in range(RM):
                    for c in range(RN):
                        acc[0, r, c] = ZERO
                for row in range(n):
                    for r in range(RM):
                        i = ti * RM + r
                        areg[r] = ACTS[xoff + row * I + i] if i < I else ZERO
                    for c in range(RN):
                        j = tj * RN + c
                        breg[c] = DZS[doff + row * O + j] if j < O else ZERO
                    for r in range(RM):
                        for c in range(RN):
                            acc[0, r, c] += areg[r] * breg[c]
                for r in range(RM):
                    i = ti * RM + r
                    for c in range(RN):
                        j = tj * RN + c
                        if i < I and j < O:
                            G[woff + i * O + j] = acc[0, r, c]
            if boff >= 0:
                for j in range(tid, O, NT):
                    sdb = ZERO
                    for row in range(n):
                        sdb += DZS[doff + row * O + j]
                    G[boff + j] = sdb

    @cuda.jit
    def fused_epoch(X, Y, perm, n_total, batch, step0, t0, P, G, Mm, Vv, lay_i, lay_f, ACTS,
                    DZS, PRE, loss, k0, k1, in_thr, in_scale, in_noise, in_nstd, opt, status,
                    blk_seg, blk_lo, blk_hi, seg_hp, seg_has_m, nblk, cp_seg, cp_col, seg_off,
                    seg_rows, seg_cols, ncol):
        """A whole epoch (every step of perm) in ONE block and one launch, for small nets and
        batches where a step's launches would cost more than its arithmetic: per step,
        rows_pass over the batch R rows at a time, block_weight_grads, the batch loss and the
        stop flag (cuda.record_batch_loss), then cuda's update device functions over every
        item (group penalty, update chunks, column pass), exactly as the tiled path's
        kernels do them, one item after another."""
        H = cuda.shared.array((2, R, WP), T)
        Wsh = cuda.shared.array((TK, WP), T)
        rowloss = cuda.shared.array(R, numba.float64)
        coef = cuda.shared.array(16, T)
        red1 = cuda.shared.array(NT, numba.float64)
        red2 = cuda.shared.array(NT, numba.float64)
        acc = cuda.local.array((TPT, RM, RN), T)
        areg = cuda.local.array(RM, T)
        breg = cuda.local.array(RN, T)
        tid = cuda.threadIdx.x
        K = lay_i[lay_i.shape[0] - 1, FI_OUT]
        clear(H, Wsh)
        for si in range((n_total + batch - 1) // batch):
            start = si * batch
            n = min(batch, n_total - start)
            step = step0 + si
            total = 0.0
            for row0 in range(0, n, R):
                nr = min(R, n - row0)
                rows_pass(H, Wsh, acc, areg, breg, rowloss, X, Y, perm, start, n, row0, nr, P,
                          lay_i, lay_f, ACTS, DZS, PRE, loss, k0, k1, step, in_thr, in_scale,
                          in_noise, in_nstd)
                if tid == 0:
                    for r in range(nr):
                        total += rowloss[r]
                cuda.syncthreads()
            block_weight_grads(acc, areg, breg, G, lay_i, ACTS, DZS, n)
            weight = np.float64(n)
            if tid == 0:
                _, denom = loss_scale(loss, n, K)
                record_batch_loss(status, total / denom, True, weight)
            cuda.syncthreads()
            if status[ST_STOP] != 0.0:      # a non-finite loss: stop before the update, as
                break                       # the CPU does (uniform: read after the barrier)
            t = t0 + si
            for b in range(ncol):
                group_penalty_cols(b, NT, P, cp_seg, cp_col, seg_off, seg_rows, seg_cols,
                                   seg_hp, status, weight)
            cuda.syncthreads()
            for b in range(nblk):
                update_chunk(b, NT, coef, red1, red2, P, G, Mm, Vv, blk_seg, blk_lo, blk_hi,
                             seg_hp, seg_has_m, opt, t, status, weight)
            for b in range(ncol):
                column_pass(b, NT, P, Vv, cp_seg, cp_col, seg_off, seg_rows, seg_cols, seg_hp,
                            opt, t)
            cuda.syncthreads()

    @cuda.jit
    def fused_forward(X, out, P, lay_i, lay_f):
        """Inference: out (flat, rows of K) = the net's logits for the rows of X, dropout and
        noise off. (out also fills the epilogue's unused buffer slots: one array type.)"""
        H = cuda.shared.array((2, R, WP), T)
        Wsh = cuda.shared.array((TK, WP), T)
        acc = cuda.local.array((TPT, RM, RN), T)
        areg = cuda.local.array(RM, T)
        breg = cuda.local.array(RN, T)
        tid = cuda.threadIdx.x
        row0 = cuda.blockIdx.x * R
        nr = min(R, X.shape[0] - row0)
        L = lay_i.shape[0]
        clear(H, Wsh)
        I0 = lay_i[0, FI_IN]
        for idx in range(tid, nr * I0, NT):
            r = idx // I0
            j = idx - r * I0
            H[0, r, j] = X[row0 + r, j]
        cuda.syncthreads()
        cur = 0
        for l in range(L):
            stage_gemm(H, cur, Wsh, acc, areg, breg, P, lay_i[l, FI_W], lay_i[l, FI_IN],
                       lay_i[l, FI_OUT], 0, nr)
            epilogue(H, cur, acc, P, lay_i, lay_f, l, MODE_INFER, nr, row0, out, out, out,
                     0, 0, 0)
            cuda.syncthreads()
            cur = 1 - cur
        K = lay_i[L - 1, FI_OUT]
        for idx in range(tid, nr * K, NT):
            r = idx // K
            k = idx - r * K
            out[(row0 + r) * K + k] = H[cur, r, k]

    @cuda.jit
    def weight_grads(G, lay_i, ACTS, DZS, n, partials, nparts, loss, status, weight):
        """blockIdx.z = l < L: a GTM x GTN tile of dW_l = x_l^T dz_l (rows staged GTK at a
        time, in order), db_l from the blocks of the first tile row. z = L: the batch loss
        from the partials, the epoch sums and the stop flag (cuda.loss_kernel's tail)."""
        l = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        if l == lay_i.shape[0]:
            if tid == 0 and cuda.blockIdx.x == 0 and cuda.blockIdx.y == 0:
                total = 0.0
                for b in range(nparts):
                    total += partials[b]
                _, denom = loss_scale(loss, n, lay_i[l - 1, FI_OUT])
                record_batch_loss(status, total / denom, True, weight)
            return
        I = lay_i[l, FI_IN]
        O = lay_i[l, FI_OUT]
        bm = cuda.blockIdx.y * GTM
        bn = cuda.blockIdx.x * GTN
        if bm >= I or bn >= O:
            return          # uniform over the block
        Xs = cuda.shared.array((GTK, GTMP), T)
        Ds = cuda.shared.array((GTK, GTNP), T)
        acc = cuda.local.array((GRM, GRN), T)
        areg = cuda.local.array(GRM, T)
        breg = cuda.local.array(GRN, T)
        dbacc = cuda.local.array(DBN, T)
        tx = tid % GTX
        ty = tid // GTX
        xoff = lay_i[l, FI_X]
        doff = lay_i[l, FI_Y]
        boff = lay_i[l, FI_B]
        want_db = boff >= 0 and cuda.blockIdx.y == 0
        for r in range(GRM):
            for c in range(GRN):
                acc[r, c] = ZERO
        for c in range(DBN):
            dbacc[c] = ZERO
        for r0 in range(0, n, GTK):
            for idx in range(tid, GTK * GTM, GNT):
                kk = idx // GTM
                mm = idx - kk * GTM
                rr = r0 + kk
                gi = bm + mm
                Xs[kk, mm] = ACTS[xoff + rr * I + gi] if (rr < n and gi < I) else ZERO
            for idx in range(tid, GTK * GTN, GNT):
                kk = idx // GTN
                nn = idx - kk * GTN
                rr = r0 + kk
                gj = bn + nn
                Ds[kk, nn] = DZS[doff + rr * O + gj] if (rr < n and gj < O) else ZERO
            cuda.syncthreads()
            if want_db:
                stage_col_sums(dbacc, Ds, tid)
            tile_fma(Xs, Ds, acc, areg, breg, ty, tx)
            cuda.syncthreads()
        woff = lay_i[l, FI_W]
        for r in range(GRM):
            i = bm + ty * GRM + r
            if i < I:
                for c in range(GRN):
                    j = bn + tx * GRN + c
                    if j < O:
                        G[woff + i * O + j] = acc[r, c]
        if want_db:
            for c in range(DBN):
                nn = tid + c * GNT
                if nn < GTN and bn + nn < O:
                    G[boff + bn + nn] = dbacc[c]

    return dict(fused_step=fused_step, fused_forward=fused_forward, weight_grads=weight_grads,
                fused_epoch=fused_epoch, FR=R, FW=W, FNT=NT)
