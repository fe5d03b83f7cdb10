"""The compiled epoch of the Numba backend: kernels/reference/epoch.py step for step (same
order, same masks, same roundings), a whole epoch in one call, nothing allocated inside, no
Python per step, layer or element. Trunk and heads (a plan's parts) included.

Shape legend: B batch rows, I fan_in, O fan_out, L layers, P parts.

The arrays come in named tuples of typed lists (one entry per layer, or per part); optional
features come as None so that a network compiles only what it uses (kernels/numba/jit.py):
`bn` (BatchNorm state) is None without BatchNorm, `wn` (WeightNoiseState) None without
weight noise, `nwords` None without noise, `xdrops`
None without input transforms, `columns` None without group lasso or max-norm, `par` None
when no pass of the network is big enough to run in parallel (PARALLEL_MIN_ELEMENTS).
"""
from collections import namedtuple

import numpy as np

from .. import contract
from .batchnorm import bn_dense_backward, bn_dense_forward
from .dense import dense_backward, dense_forward, weight_noise
from .epilogue import input_dropout
from .jit import kernel
from .loss import loss_of, weighted_loss_forward_backward
from .update import clip_gradients, penalized_update_1d, penalized_update_2d

# per layer: the parameters, their gradients and moments (views of the plan's flat buffers)
Tensors = namedtuple("Tensors", "W b dW db mW vW mb vb")
# per layer: what one step keeps (acts, grads, pres), and the step's scratch
Workspace = namedtuple("Workspace", "acts grads pres xbuf ybufs head_grad words coef scratch")
# per layer: a BatchNorm's gamma; beta, gradient, moments, running statistics, zhat, save
BatchNormState = namedtuple("BatchNormState", "gb dgb mgb vgb stats xhat save")
# weight noise: per layer the step's perturbed kernel Wn ((I, O), or (0, O) for a layer
# without), and the (4, G) Philox words of the largest one
WeightNoiseState = namedtuple("WeightNoiseState", "Wn words")
# the compile-time choices of a network (jit.uses_of tuples): its activations, update
# variants, losses, and the losses it weighs per row (none: the weighted path compiles empty)
Spec = namedtuple("Spec", "acts updates losses weighted_losses")


@kernel
def _step_kernel(T, wn, lf, l):
    """The kernel layer l's GEMMs read this step (reference step_kernel)."""
    W = T.W[l]
    if wn is not None:
        if lf[l, contract.LF_WEIGHT_NOISE_STD] > 0:
            W = wn.Wn[l]
    return W


@kernel
def _draw_weight_noise(par, T, wn, lf, k0, k1, step):
    """Every noisy layer's Wn for this step (reference draw_weight_noise)."""
    if wn is None:
        return
    for l in range(len(T.W)):
        if lf[l, contract.LF_WEIGHT_NOISE_STD] > 0:
            weight_noise(par, T.W[l], wn.Wn[l], lf[l, contract.LF_WEIGHT_NOISE_STD], k0, k1,
                         step, l, wn.words)


@kernel
def _layer_forward(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, n, k0, k1, step):
    """Dense layer l's training forward over the first n rows (reference layer_forward)."""
    W = _step_kernel(T, wn, lf, l)
    if bn is not None:
        if li[l, contract.LI_BN] != 0:
            bn_dense_forward(spec.acts, par, x, W, T.b[l], ws.acts[l][:n], bn.xhat[l][:n],
                             bn.gb[l], bn.save[l], li[l, contract.LI_ACT], lf[l, contract.LF_SLOPE],
                             li[l, contract.LI_DROP_THR], lf[l, contract.LF_DROP_SCALE],
                             np.float64(lf[l, contract.LF_BN_EPS]), k0, k1, step, l, ws.words,
                             li[l, contract.LI_NOISE], lf[l, contract.LF_NOISE_STD], ws.pres[l][:n],
                             nwords)
            return
    dense_forward(spec.acts, par, x, W, T.b[l], ws.acts[l][:n], li[l, contract.LI_ACT],
                  lf[l, contract.LF_SLOPE], li[l, contract.LI_DROP_THR],
                  lf[l, contract.LF_DROP_SCALE], k0, k1, step, l, ws.words,
                  li[l, contract.LI_NOISE], lf[l, contract.LF_NOISE_STD], ws.pres[l][:n], nwords,
                  0)


@kernel
def _layer_backward_with(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, dx, n, k0, k1, step,
                         activity):
    """Dense layer l's backward with `activity` (None, or its activity penalty); returns
    the activity pass's (sum |a|, sum a^2). dx reads the forward's kernel (weight noise)."""
    W = _step_kernel(T, wn, lf, l)
    if bn is not None:
        if li[l, contract.LI_BN] != 0:
            return bn_dense_backward(
                spec.acts, par, ws.grads[l][:n], ws.acts[l][:n], bn.xhat[l][:n], x, W,
                bn.gb[l], bn.stats[l], bn.save[l], T.dW[l], T.db[l], bn.dgb[l], dx,
                li[l, contract.LI_ACT], lf[l, contract.LF_SLOPE], li[l, contract.LI_DROP_THR],
                lf[l, contract.LF_DROP_SCALE], np.float64(lf[l, contract.LF_BN_MOMENTUM]), k0,
                k1, step, l, ws.words, li[l, contract.LI_NOISE], lf[l, contract.LF_NOISE_STD],
                ws.pres[l][:n], nwords, activity)
    return dense_backward(spec.acts, par, ws.grads[l][:n], ws.acts[l][:n], x, W, T.dW[l],
                          T.db[l], dx, li[l, contract.LI_ACT], lf[l, contract.LF_SLOPE],
                          li[l, contract.LI_DROP_THR], lf[l, contract.LF_DROP_SCALE], k0, k1,
                          step, l, ws.words, li[l, contract.LI_NOISE],
                          lf[l, contract.LF_NOISE_STD], ws.pres[l][:n], nwords, activity, 0)


@kernel
def _layer_backward(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, dx, n, k0, k1, step,
                    apart):
    """Dense layer l's backward (reference layer_backward); returns its activity penalty of
    the step, (l1 sum |a| + l2 sum a^2) / n (0 without one). apart: the activity pass's
    partial sums, or None when no layer of the network has an activity penalty (nothing of
    it is then compiled)."""
    if apart is not None:
        l1 = np.float64(lf[l, contract.LF_ACTIVITY_L1])
        l2 = np.float64(lf[l, contract.LF_ACTIVITY_L2])
        if l1 != 0.0 or l2 != 0.0:
            dt = lf.dtype.type
            s1, s2 = _layer_backward_with(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, dx, n,
                                          k0, k1, step, (dt(l1 / n), dt(2.0 * l2 / n),
                                                         l1 != 0.0, l2 != 0.0, apart))
            pen = 0.0
            if l1 != 0.0:
                pen += l1 * s1
            if l2 != 0.0:
                pen += l2 * s2
            return pen / n
    _layer_backward_with(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, dx, n, k0, k1, step,
                         None)
    return 0.0


@kernel
def _layer_update(spec, par, T, ws, bn, columns, hpW, hpb, hpgb, li, opt, l, t):
    """The fused update of layer l's tensors (reference layer_update); their penalty."""
    pen = penalized_update_2d(spec.updates, par, T.W[l], T.dW[l], T.mW[l], T.vW[l], hpW[l], opt, t,
                              ws.coef, ws.scratch, columns)
    if T.b[l].shape[0] > 0:
        pen += penalized_update_1d(spec.updates, par, T.b[l], T.db[l], T.mb[l], T.vb[l], hpb[l],
                                   opt, t, ws.coef, ws.scratch)
    if bn is not None:
        if li[l, contract.LI_BN] != 0:     # gamma/beta, flattened: never penalized
            g2 = bn.gb[l].size
            pen += penalized_update_1d(spec.updates, par, bn.gb[l].reshape(g2),
                                       bn.dgb[l].reshape(g2), bn.mgb[l].reshape(bn.mgb[l].size),
                                       bn.vgb[l].reshape(bn.vgb[l].size), hpgb[l], opt, t,
                                       ws.coef, ws.scratch)
    return pen


@kernel
def _part_input(ws, xdrops, parts, li, p, n):
    """The input part p's first layer reads: the gathered batch, the trunk's output, or its
    input transform's output."""
    first = parts[p, contract.PT_FIRST]
    if xdrops is not None:
        if (li[first, contract.LI_IN_DROP_THR] > 0
                or li[first, contract.LI_IN_NOISE] != contract.NOISE_NONE):
            return xdrops[p][:n]
    src = parts[p, contract.PT_INPUT]
    if src < 0:
        return ws.xbuf[:n]
    return ws.acts[parts[src, contract.PT_END] - 1][:n]


@kernel
def _input_transform(par, ws, xdrops, nwords, parts, li, lf, p, n, k0, k1, step, backward, dh):
    """Part p's input transform: forward, the part's input into xdrops[p]; backward (a
    head), dh in place through its mask and GaussianDropout factor (reference
    input_transform / input_transform_backward)."""
    if xdrops is None:
        return
    first = parts[p, contract.PT_FIRST]
    thr = li[first, contract.LI_IN_DROP_THR]
    noise = li[first, contract.LI_IN_NOISE]
    if thr == 0 and noise == contract.NOISE_NONE:
        return
    scale = lf[first, contract.LF_IN_DROP_SCALE]
    std = lf[first, contract.LF_IN_NOISE_STD]
    if backward:
        if noise != contract.NOISE_MUL:
            noise = contract.NOISE_NONE
            std = lf.dtype.type(0)
        if thr > 0 or noise != contract.NOISE_NONE:
            input_dropout(par, dh, dh, thr, scale, k0, k1, step, first, ws.words, noise, std,
                          nwords, 0)
        return
    src = parts[p, contract.PT_INPUT]
    x = ws.xbuf[:n] if src < 0 else ws.acts[parts[src, contract.PT_END] - 1][:n]
    input_dropout(par, x, xdrops[p][:n], thr, scale, k0, k1, step, first, ws.words, noise, std,
                  nwords, 0)


@kernel
def train_epoch(X, Y, perm, batch_size, spec, par, T, ws, bn, wn, xdrops, nwords, columns, li, lf,
                hpW, hpb, hpgb, parts, partf, opt, k0, k1, step0, t0, lrs, loss_sums, grad,
                segments, clip_mode, clip_value, zout, apart):
    """The batches of `perm`; loss_sums (P,) receives the per-part loss sums (weighted by
    batch rows); returns (penalty sum, steps, finite). Stops at the first batch with a
    non-finite loss, before its backward. lrs[k]: step k's learning rate, written into
    every hp row's HP_LR slot before its update (reference train_epoch). apart: the
    activity pass's scratch, or None (no activity penalty in the network)."""
    n_total = perm.shape[0]
    L = len(T.W)
    P = parts.shape[0]
    I0 = X.shape[1]
    pen_sum = 0.0
    steps = 0
    losses = np.zeros(P)
    for p in range(P):
        loss_sums[p] = 0.0
    trunk_end = parts[0, contract.PT_END]
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        step = step0 + steps
        t = t0 + steps
        xb = ws.xbuf[:n]
        for r in range(n):
            src = perm[start + r]
            for j in range(I0):
                xb[r, j] = X[src, j]
        _draw_weight_noise(par, T, wn, lf, k0, k1, step)
        finite = True
        for p in range(P):
            _input_transform(par, ws, xdrops, nwords, parts, li, lf, p, n, k0, k1, step, False,
                             xb)
            x = _part_input(ws, xdrops, parts, li, p, n)
            for l in range(parts[p, contract.PT_FIRST], parts[p, contract.PT_END]):
                _layer_forward(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, n, k0, k1, step)
                x = ws.acts[l][:n]
            losses[p] = 0.0
            loss = parts[p, contract.PT_LOSS]
            if loss >= 0:
                y0 = parts[p, contract.PT_Y0]
                yb = ws.ybufs[p][:n]
                for r in range(n):
                    src = perm[start + r]
                    for j in range(yb.shape[1]):
                        yb[r, j] = Y[src, y0 + j]
                end = parts[p, contract.PT_END]
                z0 = parts[p, contract.PT_Z0]
                if zout.shape[0] > 0 and z0 >= 0:       # the running metrics' logits
                    z = ws.acts[end - 1]
                    for r in range(n):
                        for k in range(z.shape[1]):
                            zout[start + r, z0 + k] = z[r, k]
                wcol = parts[p, contract.PT_W]
                if wcol < 0:
                    losses[p] = loss_of(spec.losses, loss, ws.acts[end - 1][:n], yb,
                                        ws.grads[end - 1][:n],
                                        partf[p, contract.PF_LOSS_PARAM], True)
                else:
                    losses[p] = weighted_loss_forward_backward(
                        spec.weighted_losses, ws.acts[end - 1][:n], yb, ws.grads[end - 1][:n],
                        loss,
                        partf[p, contract.PF_LOSS_PARAM], Y, perm, start, wcol)
                if not np.isfinite(losses[p]):
                    finite = False
        if not finite:
            return pen_sum, steps, False
        for p in range(P):
            loss_sums[p] += losses[p] * n
        activity = 0.0
        for k in range(P):               # the heads in order, then the trunk
            p = k + 1 if k + 1 < P else 0
            first = parts[p, contract.PT_FIRST]
            end = parts[p, contract.PT_END]
            w = partf[p, contract.PF_WEIGHT]
            if w != 1.0:
                g = ws.grads[end - 1][:n]
                g *= g.dtype.type(w)
            trunk_out = ws.grads[trunk_end - 1][:n]
            into = ws.xbuf[:0]                       # the trunk: no input gradient
            if p == 1:
                into = trunk_out
            elif p > 1:
                into = ws.head_grad[:n]
            for l in range(end - 1, first - 1, -1):
                x = ws.acts[l - 1][:n] if l > first else _part_input(ws, xdrops, parts, li, p,
                                                                     n)
                dx = ws.grads[l - 1][:n] if l > first else into
                activity += _layer_backward(spec, par, T, ws, bn, wn, nwords, li, lf, l, x, dx,
                                            n, k0, k1, step, apart)
            if p > 0:
                _input_transform(par, ws, xdrops, nwords, parts, li, lf, p, n, k0, k1, step, True,
                                 into)
                if p > 1:
                    trunk_out += into
        if segments is not None:    # None without clipping: the clip code is not compiled
            if clip_mode != contract.CLIP_NONE:     # on the data gradient, before penalties
                clip_gradients(grad, segments, clip_mode, clip_value)
        pen = 0.0
        for l in range(L):
            hpW[l, contract.HP_LR] = lrs[steps]
            hpb[l, contract.HP_LR] = lrs[steps]
            hpgb[l, contract.HP_LR] = lrs[steps]
        for l in range(L - 1, -1, -1):
            pen += _layer_update(spec, par, T, ws, bn, columns, hpW, hpb, hpgb, li, opt, l, t)
        pen_sum += (pen + activity) * n
        steps += 1
    return pen_sum, steps, True


@kernel
def forward_inference(uses, par, X, Ws, bs, li, lf, bufs, out, batch_size, first):
    """Logits of the layers Ws (a part's, the first one numbered `first`) for X, dropout and
    noise off, in chunks of batch_size rows."""
    L = len(Ws)
    n_total = X.shape[0]
    words = np.zeros((4, 1), np.uint32)
    for start in range(0, n_total, batch_size):
        n = min(batch_size, n_total - start)
        x = X[start:start + n]
        for k in range(L):
            l = first + k
            dense_forward(uses, par, x, Ws[k], bs[k], bufs[k][:n], li[l, contract.LI_ACT],
                          lf[l, contract.LF_SLOPE], 0, lf[l, contract.LF_DROP_SCALE], 0, 0, 0, l,
                          words, contract.NOISE_NONE, lf[l, contract.LF_NOISE_STD], bufs[k][:0],
                          None, 0)
            x = bufs[k][:n]
        for r in range(n):       # not out[start:start + n] = x (see _bias_act_loop)
            for j in range(x.shape[1]):
                out[start + r, j] = x[r, j]
