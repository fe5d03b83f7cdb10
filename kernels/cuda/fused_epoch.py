"""The weight gradients of the fused small-MLP path (fused.py), and its one-launch epoch.

Shape legend: B batch rows, I fan_in, O fan_out, L dense layers.

    weight_grads   the second launch of a fused step, grid (O tiles, I tiles, L + 1):
        z = l < L: a tile of dW_l = x_l^T dz_l (rows staged TILE_K at a time, in order, the
        tiled GEMM's device functions) and db_l from the blocks of the first tile row;
        z = L: the batch loss from the per-block partials (in block order), the commit
    fused_epoch    ONE block, ONE launch for the whole epoch (FUSED_EPOCH_MAX_MACS): per
        step rows_pass over the batch R rows at a time, block_weight_grads, the commit,
        then the update's device functions over every item (group penalty, update chunks,
        column pass) one after another, exactly as the update kernels do them
"""
import numpy as np

from .. import contract
from .fused import FI_B, FI_IN, FI_OUT, FI_W, FI_X, FI_Y
from .jit import cuda, numba


def build(ns):
    if not hasattr(ns, "rows_pass"):        # FUSED_MAX_WIDTH = 0: no fused path
        return
    build_weight_grads(ns)
    build_epoch(ns)


def build_weight_grads(ns):
    dev, T, ZERO = ns.dev, ns.T, ns.ZERO
    NT, RM, RN = ns.FNT, ns.FRM, ns.FRN
    GTM, GTN, GTK, GRM, GRN, GNT, DBN = ns.TM, ns.TN, ns.TK, ns.RM, ns.RN, ns.NT, ns.DBN
    GTX = GTN // GRN
    GTMP = GTM + 1      # padded shared rows (shapes must be compile-time constants)
    GTNP = GTN + 1
    tile_fma, stage_col_sums = ns.tile_fma, ns.stage_col_sums
    loss_scale, record_batch_loss = ns.loss_scale, ns.record_batch_loss

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
    def weight_grads(G, lay_i, ACTS, DZS, n, partials, nparts, loss, status, weight):
        """blockIdx.z = l < L: a GTM x GTN tile of dW_l = x_l^T dz_l, db_l from the blocks of
        the first tile row. z = L: the batch loss from the partials and the commit."""
        l = cuda.blockIdx.z
        tid = cuda.threadIdx.x
        if l == lay_i.shape[0]:
            if tid == 0 and cuda.blockIdx.x == 0 and cuda.blockIdx.y == 0:
                total = 0.0
                for b in range(nparts):
                    total += partials[b]
                _, denom = loss_scale(loss, n, lay_i[l - 1, FI_OUT])
                record_batch_loss(status, 0, 1, total / denom, True, True, weight)
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

    ns.__dict__.update(block_weight_grads=block_weight_grads, weight_grads=weight_grads)


def build_epoch(ns):
    T, R, NT, TK, RM, RN, WP, TPT = ns.T, ns.FR, ns.FNT, ns.FTK, ns.FRM, ns.FRN, ns.FWP, ns.TPT
    ST_STOP = ns.ST_STOP
    clear, rows_pass, block_weight_grads = ns.fused_clear, ns.rows_pass, ns.block_weight_grads
    loss_scale, record_batch_loss = ns.loss_scale, ns.record_batch_loss
    update_chunk, group_penalty_cols, column_pass = (ns.update_chunk, ns.group_penalty_cols,
                                                     ns.column_pass)

    @cuda.jit
    def fused_epoch(X, Y, perm, n_total, batch, step0, t0, P, G, Mm, Vv, lay_i, lay_f, ACTS,
                    DZS, PRE, loss, param, k0, k1, in_thr, in_scale, in_noise, in_nstd, opt,
                    status,
                    blk_seg, blk_lo, blk_hi, seg_hp, seg_has_m, nblk, cp_seg, cp_col, seg_off,
                    seg_rows, seg_cols, ncol, lrs):
        """A whole epoch (every step of perm) in ONE block and one launch, for small nets and
        batches where a step's launches would cost more than its arithmetic (module
        docstring); step si updates with learning rate lrs[si]."""
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
            for s in range(tid, seg_hp.shape[0], NT):     # read after the barriers below
                seg_hp[s, contract.HP_LR] = lrs[si]
            total = 0.0
            for row0 in range(0, n, R):
                nr = min(R, n - row0)
                rows_pass(H, Wsh, acc, areg, breg, rowloss, X, Y, perm, start, n, row0, nr, P,
                          lay_i, lay_f, ACTS, DZS, PRE, loss, param, k0, k1, step, in_thr,
                          in_scale, in_noise, in_nstd)
                if tid == 0:
                    for r in range(nr):
                        total += rowloss[r]
                cuda.syncthreads()
            block_weight_grads(acc, areg, breg, G, lay_i, ACTS, DZS, n)
            weight = np.float64(n)
            if tid == 0:
                _, denom = loss_scale(loss, n, K)
                record_batch_loss(status, 0, 1, total / denom, True, True, weight)
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

    ns.fused_epoch = fused_epoch
