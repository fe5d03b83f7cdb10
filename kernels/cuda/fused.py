"""The fully fused small-MLP path of the CUDA backend: a whole training step in three launches.

For single-part plans whose every width (inputs, each layer's fan_in and fan_out) is at most
FUSED_MAX_WIDTH and that have no BatchNorm (its batch statistics need every row of the batch
in one place), in the spirit of NVIDIA's tiny-cuda-nn (Mueller et al. 2021, "Real-time
neural radiance caching for path tracing"): a block owns R = FUSED_ROWS rows of the batch and
carries them through ALL layers with the activations in shared memory, so a layer costs no
launch and no round trip of its input through global memory.

Shape legend: B batch rows, R rows per block, I fan_in, O fan_out, K outputs, L dense layers,
W the widest width a fused plan takes (FUSED_MAX_WIDTH).

    fused_step     grid: one block per R batch rows; per block (rows_pass):
        gather its rows of X by the permutation, input noise + dropout (the numbering of
        epoch.gather); forward, every layer: H[cur] (R x I) @ W_l, W_l staged through
        shared memory TK rows at a time, R x O accumulated in registers (RM x RN
        micro-tiles), then the epilogue (epilogue.dense_epilogue) into H[1 - cur] and
        global memory (the weight gradients and backward's f' read it); the loss, a thread
        per row (float64 row losses, summed in row order into one partial per block), the
        last layer's backward epilogue; backward, l = L-1 .. 1: H[cur] (dz_l) @ W_l^T, then
        layer l-1's backward epilogue -> dz_{l-1} into H[1 - cur] and global memory
    weight_grads   grid: (O tiles, I tiles, L + 1); z = l < L: dW_l = x_l^T dz_l and db_l =
        colsum(dz_l) (rows in order, like the tiled GEMM's bias gradient); z = L: one block
        sums the partials in block order (deterministic) and commits the step as
        loss.loss_kernel does
    update         update.update (+ the column passes), unchanged
    fused_epoch    ONE block, ONE launch for the whole epoch, when a step is small
        (FUSED_EPOCH_MAX_MACS): a launch from Python costs tens of microseconds, about what
        one SM needs for such a step. Per step: rows_pass over the batch R rows at a time,
        block_weight_grads, the commit, then the update's device functions one item after
        another. One block needs no grid-wide barrier, so it runs on the simulator as on a GPU.
Masks, noise and the numbering of every random element are those of the tiled path and the
CPU backends, so the results agree with them to float32 rounding. Inference
(`fused_forward`) runs the same forward with dropout and noise off, nothing stored but the
last layer's output.

The activations and dz of every layer live in one flat buffer each (epoch.py), so a kernel
finds layer l's by the offsets of the per-layer table below, and the parameters and their
gradients in the flat P / G buffers (the plan's ParamStore layout).
"""
import numpy as np

from .. import contract
from .epilogue import EPI_BACKWARD, EPI_FORWARD
from .jit import cuda, numba

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
FI_PRE = 9      # offset of its pre buffer (B x O) (contract.keeps_pre); -1 if none
FI_Y0 = 10      # the part's target columns [FI_Y0, FI_Y0 + FI_YW) of Y (read on the last row)
FI_YW = 11
FI_SIZE = 12
# Columns of the float table lay_f (parameter dtype, L x FF_SIZE).
FF_SLOPE = 0
FF_SCALE = 1    # 1 / keep_prob of the output dropout
FF_NSTD = 2     # noise std
FF_WEIGHT = 3   # the part's loss weight (read on the last row)
FF_SIZE = 4

MODE_TRAIN = 0  # forward epilogue of training: dropout and noise, output stored
MODE_INFER = 1  # forward epilogue of inference: no dropout, no noise, nothing stored
MODE_BACK = 2   # backward epilogue: dL/d(out) -> dL/dz of the layer


def shared_bytes(R, W, TK, NT, itemsize):
    """Bytes of static shared memory a fused_epoch block uses (H, the weight stage, the row
    losses, the update's coefficients and reductions; fused_step uses less): must stay within
    48 KiB, the static limit."""
    return (2 * R * (W + 1) + TK * (W + 1) + 16) * itemsize + 8 * R + 16 * NT


def build(ns):
    """The fused kernels for ns's dtype and FUSED_* tiles (none when FUSED_MAX_WIDTH is 0)."""
    R, W, NT, TK, RM, RN = ns.fused_config
    if ns.dtype.itemsize > 4:   # twice the bytes per element: half the rows and the stage
        R, TK = max(RM, R // 2), max(1, TK // 2)
    if W <= 0:
        return
    if R % RM or W % RN or NT & (NT - 1):
        raise ValueError("FUSED_ROWS must be a multiple of FUSED_THREAD_M, FUSED_MAX_WIDTH of "
                         "FUSED_THREAD_N, and FUSED_THREADS a power of two")
    if shared_bytes(R, W, TK, NT, ns.dtype.itemsize) > 48 * 1024:
        raise ValueError("FUSED_ROWS, FUSED_MAX_WIDTH and FUSED_TK need more than the 48 KiB "
                         "of static shared memory a block may use")
    ns.FR, ns.FW, ns.FNT, ns.FTK, ns.FRM, ns.FRN = R, W, NT, TK, RM, RN
    ns.FWP = W + 1
    ns.TPT = -(-((R // RM) * (W // RN)) // NT)     # micro-tiles per thread, at most
    build_layers(ns)
    build_rows(ns)
    build_step(ns)


def build_layers(ns):
    """The block-level layer pieces: shared buffers, staged GEMM, epilogue."""
    dev, ZERO, U0 = ns.dev, ns.ZERO, np.uint64(0)
    R, NT, TK, RM, RN, WP, TPT = ns.FR, ns.FNT, ns.FTK, ns.FRM, ns.FRN, ns.FWP, ns.TPT
    dense_epilogue = ns.dense_epilogue

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
        4 consecutive elements (epilogue.dense_epilogue, as the tiled GEMM)."""
        tid = cuda.threadIdx.x
        O = lay_i[l, FI_OUT]
        boff = lay_i[l, FI_B]
        act = lay_i[l, FI_ACT]
        thr = lay_i[l, FI_THR]
        noise = lay_i[l, FI_NOISE]
        if mode == MODE_INFER:
            thr = 0
            noise = contract.NOISE_NONE
        slope = lay_f[l, FF_SLOPE]
        scale = lay_f[l, FF_SCALE]
        nstd = lay_f[l, FF_NSTD]
        yoff = lay_i[l, FI_Y]
        poff = lay_i[l, FI_PRE]
        epi = EPI_BACKWARD if mode == MODE_BACK else EPI_FORWARD
        keep = mode == MODE_TRAIN and poff >= 0
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
                                    if poff >= 0:
                                        stored = PRE[poff + e]
                                    elif noise == contract.NOISE_NONE:
                                        stored = ACTS[yoff + e]
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

    ns.__dict__.update(fused_clear=clear, stage_gemm=stage_gemm, fused_epilogue=epilogue)


def build_rows(ns):
    """rows_pass: a block's batch rows through the whole net (forward, loss, backward)."""
    dev, ZERO, ONE, U0 = ns.dev, ns.ZERO, ns.ONE, np.uint64(0)
    NT = ns.FNT
    stage_gemm, epilogue = ns.stage_gemm, ns.fused_epilogue
    input_value = ns.input_value
    dense_epilogue, sce_row, sce_grad = ns.dense_epilogue, ns.sce_row, ns.sce_grad
    cce_row, cce_grad = ns.cce_row, ns.cce_grad
    pointwise_loss, loss_scale = ns.pointwise_loss, ns.loss_scale

    @cuda.jit(**dev)
    def loss_rows(H, cur, Y, perm, start, nr, row0, n, loss, param, lay_i, lay_f, ACTS, DZS,
                  PRE, rowloss, k0, k1, step):
        """A thread per row: the row's loss (float64) into rowloss, dL/dz of the last layer
        into H[cur] (in place of its output) and DZS: loss.loss_kernel's loss math (the
        gradient of the batch mean, times the loss weight; param the loss's parameter), then
        the last layer's backward epilogue."""
        tid = cuda.threadIdx.x
        last = lay_i.shape[0] - 1
        K = lay_i[last, FI_OUT]
        act = lay_i[last, FI_ACT]
        thr = lay_i[last, FI_THR]
        noise = lay_i[last, FI_NOISE]
        slope = lay_f[last, FF_SLOPE]
        scale = lay_f[last, FF_SCALE]
        nstd = lay_f[last, FF_NSTD]
        lw = lay_f[last, FF_WEIGHT]
        yoff = lay_i[last, FI_Y]
        poff = lay_i[last, FI_PRE]
        y0 = lay_i[last, FI_Y0]
        mixed = loss == contract.LOSS_SCE and lay_i[last, FI_YW] == contract.SCE_MIXED_WIDTH
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
            S = ONE
            if loss == contract.LOSS_SCE:
                total, zmax, s, la, lb, lam = sce_row(z, r, K, Y, src, y0, mixed, param)
            elif loss == contract.LOSS_CCE:
                total, zmax, s, S = cce_row(z, r, K, Y, src, y0, param)
            for k in range(K):
                zz = z[r, k]
                if loss == contract.LOSS_SCE:
                    g = sce_grad(zz, k, zmax, s, la, lb, lam, mixed, c, param, K)
                elif loss == contract.LOSS_CCE:
                    g = cce_grad(zz, Y[src, y0 + k], zmax, s, S, c, param, K)
                else:
                    l64, g = pointwise_loss(zz, Y[src, y0 + k], loss, c, param)
                    total += l64
                if lw != ONE:
                    g = g * lw
                e = i * K + k
                stored = zz
                if poff >= 0:
                    stored = PRE[poff + e]
                elif noise != contract.NOISE_NONE:
                    stored = ZERO
                dz, _ = dense_epilogue(g, EPI_BACKWARD, False, ZERO, act, slope, thr, scale,
                                       noise, nstd, stored, e, wc, nc, k0, k1, step, last)
                z[r, k] = dz
                DZS[yoff + e] = dz
            rowloss[r] = total

    @cuda.jit(**dev)
    def rows_pass(H, Wsh, acc, areg, breg, rowloss, X, Y, perm, start, n, row0, nr, P, lay_i,
                  lay_f, ACTS, DZS, PRE, loss, param, k0, k1, step, in_thr, in_scale, in_noise,
                  in_nstd):
        """Batch rows [row0, row0 + nr) of the batch perm[start:start + n] through the whole
        net: gather (input noise + dropout on layer word 0), forward, loss, backward deltas.
        Leaves every layer's input and dz in ACTS / DZS and the rows' losses in rowloss."""
        tid = cuda.threadIdx.x
        L = lay_i.shape[0]
        I0 = lay_i[0, FI_IN]
        xoff = lay_i[0, FI_X]
        for idx in range(tid, nr * I0, NT):
            r = idx // I0
            j = idx - r * I0
            e = (row0 + r) * I0 + j
            v = input_value(X[perm[start + row0 + r], j], e, in_thr, in_scale, in_noise,
                            in_nstd, k0, k1, step, 0)
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
        loss_rows(H, cur, Y, perm, start, nr, row0, n, loss, param, lay_i, lay_f, ACTS, DZS,
                  PRE, rowloss, k0, k1, step)
        cuda.syncthreads()
        for l in range(L - 1, 0, -1):
            stage_gemm(H, cur, Wsh, acc, areg, breg, P, lay_i[l, FI_W], lay_i[l, FI_OUT],
                       lay_i[l, FI_IN], 1, nr)
            epilogue(H, cur, acc, P, lay_i, lay_f, l - 1, MODE_BACK, nr, row0, ACTS, DZS, PRE,
                     k0, k1, step)
            cuda.syncthreads()
            cur = 1 - cur

    ns.rows_pass = rows_pass


def build_step(ns):
    """fused_step (the first launch of a step) and fused_forward (inference)."""
    T, R, NT, TK, RM, RN, WP, TPT = ns.T, ns.FR, ns.FNT, ns.FTK, ns.FRM, ns.FRN, ns.FWP, ns.TPT
    clear, rows_pass, stage_gemm, epilogue = (ns.fused_clear, ns.rows_pass, ns.stage_gemm,
                                              ns.fused_epilogue)

    @cuda.jit
    def fused_step(X, Y, perm, start, n, P, lay_i, lay_f, ACTS, DZS, PRE, partials, loss,
                   param, k0, k1, step, in_thr, in_scale, in_noise, in_nstd):
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
                  lay_f, ACTS, DZS, PRE, loss, param, k0, k1, step, in_thr, in_scale,
                  in_noise, in_nstd)
        if cuda.threadIdx.x == 0:
            total = 0.0
            for r in range(nr):
                total += rowloss[r]
            partials[cuda.blockIdx.x] = total

    @cuda.jit
    def fused_forward(X, out, P, lay_i, lay_f):
        """Inference: out (flat, rows of K) = the chain's logits for the rows of X, dropout
        and noise off. (out also fills the epilogue's unused buffer slots: one array type.)"""
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

    ns.__dict__.update(fused_step=fused_step, fused_forward=fused_forward)


# ---------------------------------------------------------------- host side
def tables(plan, layers, P_offsets, seg=None, pre_off=None):
    """The per-layer tables (lay_i, lay_f, host arrays) of the chain `layers` of a plan:
    widths, the offsets of W and b in P (P_offsets[l] = (W offset, b offset or -1)), of the
    input / output / pre rows in the flat workspace buffers (seg[k]: segment k of the
    activation buffer; none for inference, which stores nothing), activation, dropout,
    noise, the last layer's targets and loss weight."""
    L = len(layers)
    lay_i = np.zeros((L, FI_SIZE), np.int64)
    lay_f = np.zeros((L, FF_SIZE), plan.dtype)
    part = next(p for p in range(plan.n_parts) if layers[0] in plan.part_layers(p))
    y0, y1 = int(plan.parts[part, contract.PT_Y0]), int(plan.parts[part, contract.PT_Y1])
    for k, l in enumerate(layers):
        noise, nstd = plan.noise_of(l)
        lay_i[k, [FI_IN, FI_OUT]] = plan.Ws[l].shape
        lay_i[k, [FI_W, FI_B]] = P_offsets[l]
        lay_i[k, [FI_ACT, FI_THR, FI_NOISE]] = (plan.li[l, contract.LI_ACT],
                                                plan.li[l, contract.LI_DROP_THR], noise)
        if seg is not None:
            lay_i[k, [FI_X, FI_Y]] = seg[k], seg[k + 1]
        lay_i[k, FI_PRE] = pre_off[l] if pre_off is not None else -1
        lay_i[k, [FI_Y0, FI_YW]] = y0, y1 - y0
        lay_f[k, [FF_SLOPE, FF_SCALE, FF_NSTD, FF_WEIGHT]] = (
            plan.lf[l, contract.LF_SLOPE], plan.lf[l, contract.LF_DROP_SCALE], nstd,
            plan.partf[part, contract.PF_WEIGHT])
    return lay_i, lay_f
