"""The fused penalized update on the device (twin of kernels/reference/update.py): every
parameter tensor of a network in one launch, since they live in one flat buffer (the plan's
ParamStore layout), each block owning a chunk of one tensor.

Shape legend: I fan_in (rows of W), O fan_out (its columns), S tensors (segments).

Per step: [group penalty] + update + [column pass], the bracketed launches only when a
matrix has group lasso or max-norm: the group penalty needs the norms before the step, the
group prox and the max-norm projection whole columns after it. Block-level device functions
(work item b, the block's nt threads, nt a power of two) run one item per block here; the
fused one-block epoch (fused.py) runs them all in its one block. The penalty (before the
step) is summed in float64 atomics into the status vector (loss.py), weighted by the batch
rows. Every kernel returns at once when the stop flag is set.
"""
import math

import numpy as np

from .. import contract
from .jit import cuda, numba
from .loss import ST_PEN, ST_STOP


def build(ns):
    build_chunks(ns)
    build_columns(ns)
    build_clip(ns)


def build_clip(ns):
    T, NB = ns.T, ns.NB

    @cuda.jit
    def clip_grads(G, seg_lo, seg_hi, mode, value, status):
        """contract CLIP_* on the flat gradients G (reference clip_gradients): CLIP_VALUE a
        grid over G; CLIP_NORM block b the segment [seg_lo[b], seg_hi[b]); CLIP_GLOBAL_NORM
        one block over all of G. Norms in float64 over NB threads, then one coefficient."""
        if status[ST_STOP] != 0.0:
            return
        if mode == contract.CLIP_VALUE:
            hi = T(value)
            for i in range(cuda.grid(1), G.shape[0], cuda.gridsize(1)):
                g = G[i]
                if g > hi:
                    G[i] = hi
                elif g < -hi:
                    G[i] = -hi
            return
        red = cuda.shared.array(NB, numba.float64)
        tid = cuda.threadIdx.x
        b = cuda.blockIdx.x
        lo = 0 if mode == contract.CLIP_GLOBAL_NORM else seg_lo[b]
        hi_i = G.shape[0] if mode == contract.CLIP_GLOBAL_NORM else seg_hi[b]
        acc = 0.0
        for i in range(lo + tid, hi_i, NB):
            acc += numba.float64(G[i]) * numba.float64(G[i])
        red[tid] = acc
        cuda.syncthreads()
        half = NB // 2
        while half > 0:
            if tid < half:
                red[tid] += red[tid + half]
            cuda.syncthreads()
            half //= 2
        coef = value / (math.sqrt(red[0]) + contract.CLIP_EPS)
        if coef < 1.0:
            c = T(coef)
            for i in range(lo + tid, hi_i, NB):
                G[i] = G[i] * c

    ns.clip_grads = clip_grads


def clip_launch(ns, G, seg_lo, seg_hi, mode, value, status):
    """The optimizer's clipping of the data gradients (before update.launch)."""
    if mode == contract.CLIP_NONE:
        return
    blocks = (max(1, min(1024, -(-G.shape[0] // ns.NB))) if mode == contract.CLIP_VALUE
              else seg_lo.shape[0] if mode == contract.CLIP_NORM else 1)
    ns.clip_grads[blocks, ns.NB](G, seg_lo, seg_hi, int(mode), float(value), status)


def build_chunks(ns):
    dev, T, ZERO, ONE, NB = ns.dev, ns.T, ns.ZERO, ns.ONE, ns.NB

    @cuda.jit(**dev)
    def sign(x):
        """np.sign: -1, 0 or 1, and NaN for NaN (the L1 prox must not turn NaN into 0)."""
        if x > ZERO:
            return ONE
        if x < ZERO:
            return -ONE
        if x == ZERO:
            return ZERO
        return x

    @cuda.jit(**dev)
    def update_chunk(b, nt, coef, red1, red2, P, G, Mm, Vv, blk_seg, blk_lo, blk_hi, seg_hp,
                     seg_has_m, opt, t, status, weight):
        """The update of P[blk_lo[b]:blk_hi[b]], a chunk of tensor blk_seg[b] (the reference's
        formulas element for element); its penalty (before the step) added to
        status[ST_PEN]. coef (16), red1, red2 (nt): shared scratch."""
        tid = cuda.threadIdx.x
        s = blk_seg[b]
        if tid == 0:    # reference update_coefficients: float64, rounded once to the dtype
            h_lr = seg_hp[s, contract.HP_LR]
            h_b1 = seg_hp[s, contract.HP_BETA1]
            h_b2 = seg_hp[s, contract.HP_BETA2]
            if opt == contract.OPT_SGD:
                h_step = h_lr
                h_bc2 = 1.0
            else:
                h_step = h_lr / (1.0 - h_b1 ** np.float64(t))
                h_bc2 = math.sqrt(1.0 - h_b2 ** np.float64(t))
            h_decay = 1.0 - h_lr * \
                seg_hp[s, contract.HP_DECOUPLED] if opt == contract.OPT_ADAMW else 1.0
            coef[0] = h_lr
            coef[1] = h_b1
            coef[2] = 1.0 - h_b1
            coef[3] = h_b2
            coef[4] = 1.0 - h_b2
            coef[5] = seg_hp[s, contract.HP_EPS]
            coef[6] = seg_hp[s, contract.HP_L1]
            coef[7] = seg_hp[s, contract.HP_L2]
            coef[8] = h_decay
            coef[9] = h_step
            coef[10] = h_bc2
            coef[11] = h_lr * seg_hp[s, contract.HP_L1]
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
        nesterov = seg_hp[s, contract.HP_NESTEROV] != 0.0
        proximal = seg_hp[s, contract.HP_PROXIMAL] != 0.0
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
            if opt == contract.OPT_SGD:
                if has_m:
                    mi = Mm[e] * b1 + ge
                    Mm[e] = mi
                    d = ge + b1 * mi if nesterov else mi
                else:
                    d = ge
                wi = wi - lr * d
                tau = lr_l1
            else:
                if opt == contract.OPT_ADAMW:
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
            pen = seg_hp[s, contract.HP_L1] * red1[0] + 0.5 * seg_hp[s, contract.HP_L2] * red2[0]
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

    ns.__dict__.update(sign=sign, update_chunk=update_chunk, update=update)


def build_columns(ns):
    dev, FT, NB = ns.dev, ns.FT, ns.NB

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
        group = seg_hp[s, contract.HP_GROUP]
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
        group = seg_hp[s, contract.HP_GROUP]
        if group > 0.0:
            h_lr = seg_hp[s, contract.HP_LR]
            if opt == contract.OPT_SGD:
                tau = h_lr * group
            else:   # the coefficients of `update`, rounded to the dtype as there
                step = np.float64(FT(h_lr / (1.0 - seg_hp[s, contract.HP_BETA1] ** np.float64(t))))
                bc2 = np.float64(FT(math.sqrt(1.0 - seg_hp[s, contract.HP_BETA2] ** np.float64(t))))
                eps = np.float64(FT(seg_hp[s, contract.HP_EPS]))
                den = 0.0
                for i in range(R):
                    den += math.sqrt(np.float64(Vv[off + i * O + j])) / bc2 + eps
                tau = group * step / (den / R)
            nrm = column_norm(P, off, R, O, j)
            sc = FT(1.0 - tau / nrm) if nrm > tau else FT(0.0)
            for i in range(R):
                P[off + i * O + j] = P[off + i * O + j] * sc
        c = seg_hp[s, contract.HP_MAXNORM]
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

    ns.__dict__.update(group_penalty_cols=group_penalty_cols, group_penalty=group_penalty,
                       column_pass=column_pass, columns=columns)


# ---------------------------------------------------------------- host side
def segment_tables(ns, segments, has_m):
    """The device tables of the update: segments = [(offset, shape, hp row, is_matrix)] of
    the tensors in the flat buffer (in buffer order); has_m: whether a first moment is kept.
    Returns the block -> (tensor, chunk) tables and the column-pass items."""
    blk_seg, blk_lo, blk_hi, col_seg, col_lo = [], [], [], [], []
    off, rows, cols, hps = [], [], [], []
    for s, (offset, shape, hp, matrix) in enumerate(segments):
        size = int(np.prod(shape))
        off.append(offset)
        rows.append(shape[0] if matrix else 1)
        cols.append(shape[1] if matrix else size)
        hps.append(hp)
        for lo in range(0, size, ns.CHUNK):
            blk_seg.append(s)
            blk_lo.append(offset + lo)
            blk_hi.append(offset + min(size, lo + ns.CHUNK))
        if matrix and (hp[contract.HP_MAXNORM] > 0 or hp[contract.HP_GROUP] > 0):
            for c0 in range(0, int(shape[1]), ns.NB):
                col_seg.append(s)
                col_lo.append(c0)
    i64 = lambda a: cuda.to_device(np.asarray(a, np.int64))  # noqa: E731
    hp = np.array(hps, np.float64).reshape(len(segments), contract.HP_SIZE)
    return dict(nblk=len(blk_seg), blk_seg=i64(blk_seg or [0]), blk_lo=i64(blk_lo or [0]),
                blk_hi=i64(blk_hi or [0]), hp=cuda.to_device(hp),
                has_m=i64([1 if has_m else 0] * max(1, len(segments))),
                n_colblk=len(col_seg), col_seg=i64(col_seg or [0]), col_lo=i64(col_lo or [0]),
                off_d=i64(off or [0]), rows=i64(rows or [0]), cols=i64(cols or [0]))


def launch(ns, tab, P, G, Mm, Vv, opt, t, status, weight):
    """Every tensor's penalized update at optimizer step t (weight: the batch rows)."""
    cols = (tab["col_seg"], tab["col_lo"], tab["off_d"], tab["rows"], tab["cols"], tab["hp"],
            status)
    if tab["n_colblk"]:
        ns.group_penalty[tab["n_colblk"], ns.NB](P, *cols, weight)
    if tab["nblk"]:
        ns.update[tab["nblk"], ns.NB](P, G, Mm, Vv, tab["blk_seg"], tab["blk_lo"],
                                      tab["blk_hi"], tab["hp"], tab["has_m"], opt, t, status,
                                      weight)
    if tab["n_colblk"]:
        ns.columns[tab["n_colblk"], ns.NB](P, Vv, *cols, opt, t)
