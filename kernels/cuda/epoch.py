"""The device-resident plan and the launch sequence of an epoch: kernels/reference/epoch.py
on the GPU, step for step (same order, same masks), trunk and heads (a plan's parts).

Shape legend: B batch rows, I fan_in, O fan_out, L layers, P parts.

The plan's state on the device is state.DevicePlan, built once per plan workspace
(plan.cache["cuda"]; plan.allocate and invalidate() drop it).

Paths, chosen per plan (`DevicePlan.fused`):
- A single part, no BatchNorm, every width <= FUSED_MAX_WIDTH: the fused small-MLP path
  (fused.py): 3 launches per step whatever the depth, or the whole epoch in one launch of
  one block when a step is at most FUSED_EPOCH_MAX_MACS multiply-adds.
- Otherwise (trunk and heads always) the tiled path, per step:
    1 gather (rows of X and Y by the permutation, the trunk's input transform fused)
  + per head with an input transform: 1 (forward) + 1 (backward)
  + L forward GEMMs (epilogue fused; BatchNorm: GEMM + bn_forward)
  + 1 loss per part with a loss (one block: loss, gradient times the loss weight, the last
    layer's backward epilogue, the step's commit in the last one) [+ 1 epilogue kernel when
    that layer keeps a pre buffer]
  + L backward GEMM launches (dW + db + dx in one, the previous layer's epilogue fused into
    dx) [+ bn_backward per BatchNorm layer]; a head's input gradient goes into the trunk's
    output gradient (the first head writes it, the others add theirs: 1 launch each), then
    the trunk's last layer's epilogue (1 launch)
  + 1 penalized update of every tensor [+ 2 column passes with max-norm / group lasso]
  = 2L + 3 for a Sequential (11 for the 4-layer `curve` MLP).
"""
import numpy as np

from .. import contract
from . import batchnorm, dense, fused, update
from .jit import cuda, grid1, to_dev
from .loss import status_size


def build(ns):
    """The epoch's own kernels: the batch gather, and the sums of the heads' gradients."""
    input_value = ns.input_value

    @cuda.jit
    def gather(X, Y, perm, start, n, xout, yout, thr, scale, k0, k1, step, noise, nstd):
        """Rows perm[start:start+n] of X and the first yout.shape[1] columns of Y; the trunk's
        input noise and dropout (layer word 0, its first layer) fused on X."""
        I0 = X.shape[1]
        Ky = yout.shape[1]
        width = I0 + Ky
        for e in range(cuda.grid(1), n * width, cuda.gridsize(1)):
            r = e // width
            j = e - r * width
            src = perm[start + r]
            if j < I0:
                xout[r, j] = input_value(X[src, j], r * I0 + j, thr, scale, noise, nstd, k0,
                                         k1, step, 0)
            else:
                yout[r, j - I0] = Y[src, j - I0]

    @cuda.jit
    def add_into(dst, src):
        """dst += src (a head's input gradient into the trunk's output gradient)."""
        B, O = dst.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            dst[i, j] = dst[i, j] + src[i, j]

    @cuda.jit
    def scale_by(a, w):
        """a *= w (a part's loss weight on an output gradient no loss kernel wrote)."""
        B, O = a.shape
        for e in range(cuda.grid(1), B * O, cuda.gridsize(1)):
            i = e // O
            j = e - i * O
            a[i, j] = a[i, j] * w

    @cuda.jit
    def copy_block(dst, r0, c0, src):
        """dst[r0 + i, c0 + k] = src[i, k] (a part's logits into the running-metrics zout)."""
        B, K = src.shape
        for e in range(cuda.grid(1), B * K, cuda.gridsize(1)):
            i = e // K
            k = e - i * K
            dst[r0 + i, c0 + k] = src[i, k]

    @cuda.jit
    def set_learning_rate(seg_hp, lrs, k):
        """Step k's learning rate into the HP_LR slot of every segment's hp row (one
        optimizer: the same in every row; reference Plan.set_learning_rate)."""
        for s in range(cuda.grid(1), seg_hp.shape[0], cuda.gridsize(1)):
            seg_hp[s, contract.HP_LR] = lrs[k]

    ns.__dict__.update(gather=gather, add_into=add_into, scale_by=scale_by,
                       set_learning_rate=set_learning_rate, copy_block=copy_block)


# ---------------------------------------------------------------- the epoch
def _set_learning_rate(st, lrs, lrs_d, k):
    """Step k's rate into the device hp rows, when it is not the rate already there."""
    if st.lr_now != lrs[k]:
        ns = st.ns
        rows = st.tab["hp"].shape[0]
        ns.set_learning_rate[grid1(rows, ns.NB), ns.NB](st.tab["hp"], lrs_d, k)
        st.lr_now = lrs[k]


def train_epoch(st, plan, X, Y, perm, batch_size, step0, t0, k0, k1, lrs, zout):
    """The batches of `perm` on the device with step k's learning rate lrs[k], the parts'
    logits into zout (Plan.logits_out; empty: not kept); returns DevicePlan.results()."""
    ns = st.ns
    Xd, Yd = st.dataset(X, Y)
    perm_d = to_dev(np.asarray(perm, np.int64))
    lrs_d = to_dev(lrs)
    st.zout_d = cuda.device_array(zout.shape, zout.dtype) if zout.shape[0] else None
    st.status.copy_to_device(np.zeros(status_size(st.P_count)))
    if st.fused:
        _fused_epoch(st, plan, Xd, Yd, perm_d, perm.shape[0], batch_size, step0, t0, k0, k1,
                     lrs, lrs_d)
        return st.results()
    st.z_start = 0
    thr, scale, noise, nstd = st.in_cfg[0]
    dt = plan.dtype.type
    in0 = (int(thr), dt(scale), int(noise), dt(nstd))
    n_total = perm.shape[0]
    width = X.shape[1] + st.ybuf.shape[1]
    steps = 0
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        step = int(step0 + steps)
        v = st.views(n)
        st.z_start = start
        ns.gather[grid1(n * width, ns.NB), ns.NB](Xd, Yd, perm_d, start, n, v.x, v.y, in0[0],
                                                  in0[1], k0, k1, step, in0[2], in0[3])
        _draw_weight_noise(st, k0, k1, step)
        for p in range(st.P_count):
            _part_forward(st, v, p, n, k0, k1, step)
        for p in list(range(1, st.P_count)) + [0]:     # the heads in order, then the trunk
            _part_backward(st, v, p, k0, k1, step)
        update.clip_launch(ns, st.G, st.seg_lo, st.seg_hi, *st.clip, st.status)
        _set_learning_rate(st, lrs, lrs_d, steps)
        update.launch(ns, st.tab, st.P, st.G, st.M, st.V, int(plan.opt), int(t0 + steps),
                      st.status, float(n))
        steps += 1
    if st.zout_d is not None:
        st.zout_d.copy_to_host(zout)
        st.zout_d = None
    return st.results()


def _step_kernel(st, l):
    """The kernel layer l's GEMMs read this step (reference step_kernel)."""
    return st.Wns[l] if st.Wns[l] is not None else st.Ws[l]


def _draw_weight_noise(st, k0, k1, step):
    """Every noisy layer's Wn for this step (reference draw_weight_noise)."""
    ns = st.ns
    for l, std in enumerate(st.wnstd):
        if std is not None:
            W = st.Ws[l]
            ns.weight_noise[grid1(W.size, ns.NB), ns.NB](W, st.Wns[l], std, k0, k1, step, l)


def _part_input(st, v, p):
    """What part p's first layer reads: the batch, a head's input transform, the trunk's
    output."""
    if p == 0:
        return v.x      # the trunk's input transform is fused into the gather
    return v.xdrops[p] if st.has_in[p] else v.acts[st.trunk_last]


def _layer_forward(st, v, l, x, k0, k1, step):
    ns, c = st.ns, st.cfg[l]
    hb = 1 if st.has_bias[l] else 0
    if st.bn[l]:
        batchnorm.forward(ns, x, _step_kernel(st, l), st.bs[l], hb, v.acts[l], v.xhats[l],
                          st.gbs[l], st.saves[l], c["act"], c["slope"], c["thr"], c["scale"],
                          c["eps"], k0, k1, step, l, c["noise"], c["nstd"], v.pres[l])
    else:
        dense.forward(ns, x, _step_kernel(st, l), st.bs[l], hb, v.acts[l], c["act"], c["slope"],
                      c["thr"], c["scale"], k0, k1, step, l, c["noise"], c["nstd"], v.pres[l])


def _part_forward(st, v, p, n, k0, k1, step):
    """Part p's input transform (a head's), its layers, and its loss (reference train_step)."""
    ns = st.ns
    first, end, _, loss, y0, y1, wcol, z0 = st.parts[p]
    if p > 0 and st.has_in[p]:
        thr, scale, noise, nstd = st.in_cfg[p]
        src = v.acts[st.trunk_last]
        ns.input_dropout[grid1(src.size, ns.NB), ns.NB](src, v.xdrops[p], int(thr),
                                                        src.dtype.type(scale), k0, k1, step,
                                                        first, int(noise),
                                                        src.dtype.type(nstd))
    x = _part_input(st, v, p)
    for l in range(first, end):
        _layer_forward(st, v, l, x, k0, k1, step)
        x = v.acts[l]
    if loss < 0:
        return
    if st.zout_d is not None and z0 >= 0:      # the running metrics' logits
        ns.copy_block[grid1(x.size, ns.NB), ns.NB](st.zout_d, st.z_start, z0, x)
    last = end - 1
    epi = v.epis[last]
    fuse = (epi.noise == contract.NOISE_NONE and not st.keeps_pre[last]
            and st.activity[last] is None)
    z0 = ns.ZERO
    act, slope, thr, scale = ((epi.act, epi.slope, epi.thr, epi.scale) if fuse
                              else (contract.ACT_LINEAR, z0, 0, z0))
    ns.loss_kernel[1, ns.NB](x, v.y, y0, y1 - y0, wcol, v.grads[last], loss, st.loss_params[p],
                             True, st.weights[p], st.status, p, st.P_count,
                             p == st.loss_parts[-1], True, float(n), act, slope, thr, scale, k0,
                             k1, step, last)
    if not fuse and st.activity[last] is None:   # it reads its pre buffer (or noise); an
        #                     activity penalty's waits for the backward (_part_backward), once
        #                     every part's loss has committed the step (or stopped it)
        dense.output_grad(ns, v.grads[last], epi, k0, k1, step)


def _output_grad(st, v, l, g, k0, k1, step):
    """g = dL/d(layer l's output) -> dL/dz in place: its backward epilogue as a kernel of
    its own (dense.output_grad), or activity_grad for a layer with an activity penalty."""
    if st.activity[l] is None:
        dense.output_grad(st.ns, g, v.epis[l], k0, k1, step)
        return
    activity_grad(st.ns, g, v.acts[l], v.pres[l], v.epis[l], st.activity[l], k0, k1, step,
                  st.status)


def activity_grad(ns, g, out, pre, epi, activity, k0, k1, step, status):
    """The activity_grad kernel (epilogue.py) on g (B, O) of a layer with epilogue `epi`
    and activity penalty (l1, l2) (in the dtype's values): c1 = l1 / B, c2 = 2 l2 / B
    rounded to the dtype; the penalty times B into status[ST_PEN]."""
    l1, l2 = activity
    B = g.shape[0]
    dt = ns.dtype.type
    ns.activity_grad[grid1(g.size, ns.NB), ns.NB](
        g, out, ns.dummy if pre is None else pre, epi.act, epi.slope, epi.thr, epi.scale,
        epi.noise, epi.nstd, k0, k1, step, epi.layer, dt(l1 / B), dt(2.0 * l2 / B), l1 != 0.0,
        l2 != 0.0, float(l1), float(l2), status)


def _part_backward(st, v, p, k0, k1, step):
    """Part p's layers backward, last to first (reference train_step). A head's input
    gradient goes into the trunk's output gradient; the trunk starts with its last layer's
    backward epilogue once every head has added its share."""
    ns = st.ns
    first, end, _, loss, _, _, _, _ = st.parts[p]
    trunk_out = v.grads[st.trunk_last]
    if loss < 0:    # the trunk under heads: no loss kernel applied its weight and epilogue
        g = v.grads[end - 1]
        if st.weights[p] != 1:
            ns.scale_by[grid1(g.size, ns.NB), ns.NB](g, st.weights[p])
        _output_grad(st, v, end - 1, g, k0, k1, step)
    elif st.activity[end - 1] is not None:     # the loss kernel left dL/d(out)
        _output_grad(st, v, end - 1, v.grads[end - 1], k0, k1, step)
    into = None if p == 0 else (trunk_out if p == 1 else v.scratch)
    for l in range(end - 1, first - 1, -1):
        c = st.cfg[l]
        if st.bn[l]:    # grads[l] holds dy (f' and the mask were applied upstream)
            batchnorm.backward(ns, v.grads[l], v.xhats[l], st.gbs[l], st.saves[l], st.dgbs[l],
                               st.dbs[l], 1 if st.has_bias[l] else 0, st.stats[l],
                               c["momentum"], st.status)
        xin = v.acts[l - 1] if l > first else _part_input(st, v, p)
        dx, prev = (v.grads[l - 1], v.epis[l - 1]) if l > first else (into, None)
        separate = l > first and st.activity[l - 1] is not None
        dense.backward(ns, v.grads[l], xin, _step_kernel(st, l), st.dWs[l], st.dbs[l],
                       st.has_bias[l] and not st.bn[l], dx, None if separate else prev, k0,
                       k1, step)
        if separate:    # the layer before has an activity penalty: its own epilogue kernel
            _output_grad(st, v, l - 1, dx, k0, k1, step)
    if p == 0:
        return
    thr, scale, noise, nstd = st.in_cfg[p]
    if noise != contract.NOISE_MUL:    # additive noise passes the gradient unchanged
        noise, nstd = contract.NOISE_NONE, 0.0
    if thr > 0 or noise != contract.NOISE_NONE:
        ns.input_dropout[grid1(into.size, ns.NB), ns.NB](into, into, int(thr),
                                                         into.dtype.type(scale), k0, k1, step,
                                                         first, int(noise),
                                                         into.dtype.type(nstd))
    if p > 1:
        ns.add_into[grid1(into.size, ns.NB), ns.NB](trunk_out, into)


def _fused_epoch(st, plan, Xd, Yd, perm_d, n_total, batch_size, step0, t0, k0, k1, lrs, lrs_d):
    """The fused small-MLP path (fused.py): the whole epoch in one launch for small steps,
    else 3 launches per step."""
    ns, tab = st.ns, st.tab
    loss = int(st.parts[0][contract.PT_LOSS])
    thr, scale, noise, nstd = st.in_cfg[0]
    dt = plan.dtype.type
    ins = (int(thr), dt(scale), int(noise), dt(nstd))
    if st.one_block_epoch:
        ns.fused_epoch[1, ns.FNT](
            Xd, Yd, perm_d, n_total, batch_size, int(step0), int(t0), st.P, st.G, st.M, st.V,
            st.lay_i, st.lay_f, st.ACTS, st.DZS, st.PRE, loss, st.loss_params[0], k0, k1, *ins,
            int(plan.opt),
            st.status, tab["blk_seg"], tab["blk_lo"], tab["blk_hi"], tab["hp"], tab["has_m"],
            tab["nblk"], tab["col_seg"], tab["col_lo"], tab["off_d"], tab["rows"], tab["cols"],
            tab["n_colblk"], lrs_d)
        st.lr_now = lrs[-1] if len(lrs) else st.lr_now
        return
    gx = (max(o for _, o in st.widths) + ns.TN - 1) // ns.TN
    gy = (max(i for i, _ in st.widths) + ns.TM - 1) // ns.TM
    steps = 0
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        nblk = -(-n // ns.FR)
        ns.fused_step[nblk, ns.FNT](Xd, Yd, perm_d, start, n, st.P, st.lay_i, st.lay_f, st.ACTS,
                                    st.DZS, st.PRE, st.partials, loss, st.loss_params[0], k0,
                                    k1, int(step0 + steps), *ins)
        ns.weight_grads[(gx, gy, st.L + 1), ns.NT](st.G, st.lay_i, st.ACTS, st.DZS, n,
                                                   st.partials, nblk, loss, st.status,
                                                   float(n))
        _set_learning_rate(st, lrs, lrs_d, steps)
        update.launch(ns, tab, st.P, st.G, st.M, st.V, int(plan.opt), int(t0 + steps),
                      st.status, float(n))
        steps += 1


# ---------------------------------------------------------------- inference
def forward_inference(st, plan, X, batch_size, part):
    """Logits of part `part` for X (that part's input), dropout and noise off, in chunks of
    batch_size rows; the fused forward when the chain fits it."""
    ns = st.ns
    layers = list(plan.part_layers(part))
    n = X.shape[0]
    K = plan.Ws[layers[-1]].shape[1]
    out = np.empty((n, K), plan.dtype)
    if n == 0:
        return out
    rows = max(1, min(int(batch_size), n))
    chain = _chain_tables(st, plan, part, layers)
    if chain is not None:   # one launch per chunk, activations in shared memory only
        lay_i, lay_f = chain
        od = cuda.device_array(rows * K, plan.dtype)
        for start in range(0, n, rows):
            m = min(rows, n - start)
            ns.fused_forward[-(-m // ns.FR), ns.FNT](to_dev(X[start:start + m]), od, st.P,
                                                     lay_i, lay_f)
            out[start:start + m] = od[:m * K].copy_to_host().reshape(m, K)
        return out
    bufs = {l: cuda.device_array((rows, plan.Ws[l].shape[1]), plan.dtype) for l in layers}
    dt = plan.dtype.type
    for start in range(0, n, rows):
        m = min(rows, n - start)
        x = to_dev(X[start:start + m])
        for l in layers:
            dense.forward(ns, x, st.Ws[l], st.bs[l], 1 if st.has_bias[l] else 0, bufs[l][:m],
                          int(plan.li[l, contract.LI_ACT]), dt(plan.lf[l, contract.LF_SLOPE]), 0,
                          dt(1), 0, 0, 0, l)
            x = bufs[l][:m]
        out[start:start + m] = x.copy_to_host()
    return out


def _chain_tables(st, plan, part, layers):
    """The fused inference tables of a part's chain (cached), or None when it does not fit."""
    chains = getattr(st, "chains", None)
    if chains is None:
        st.chains = chains = {}
    if part not in chains:
        ns = st.ns
        fits = hasattr(ns, "fused_forward") and max(
            max(plan.Ws[l].shape) for l in layers) <= ns.FW
        chains[part] = None
        if fits:
            lay_i, lay_f = fused.tables(plan, layers, {l: st._P_offsets(l) for l in layers})
            chains[part] = (cuda.to_device(lay_i), cuda.to_device(lay_f))
    return chains[part]
