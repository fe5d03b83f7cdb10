"""The reference epoch: the readable specification of a training epoch of a plan
(kernels/plan.py), over any backend's per-op kernels. The compiled epochs of the numba,
cython and cuda backends follow it step for step, so every backend applies the same masks
and noise in the same order.

A network is parts (a tree of chains): part 0, the trunk, reads the inputs; every other
part, a head, reads the trunk's output; a part with a loss ends in logits. A Sequential is
one part. One training step on a batch:
    gather the batch's inputs; for each part in order: its input transform (dropout, noise
    on Philox layer word = its first layer), its layers' forward (layer word = the layer's
    index), and for a part with a loss, the loss (its parameter PF_LOSS_PARAM) and its
    gradient (scaled by the loss weight when it is not 1). A non-finite loss stops the
    epoch before any backward.
    Backward: the heads in order, then the trunk; a head's input gradient goes into the
    trunk's output gradient (the first head writes it, later ones add theirs, after their
    input transform's backward), then the trunk's layers; a layer with an activity penalty
    (contract LF_ACTIVITY_*) adds its gradient in its backward epilogue and returns its
    penalty. Last, the fused penalized update of every layer's tensors (W, b, a BatchNorm's
    gamma; beta), from the last layer to the first; their penalties summed in that order,
    then the step's activity penalties added.

Shape legend: B batch rows, I fan_in, O fan_out, L layers, P parts.
"""
import numpy as np

from .. import contract
from .update import clip_gradients


def step_kernel(plan, l):
    """The kernel layer l's forward and backward GEMMs read this step: the perturbed copy
    Wn (plan.wnoises[l], drawn by draw_weight_noise) with weight noise on, else W itself."""
    return plan.wnoises[l] if contract.weight_noise_on(plan.lf, l) else plan.Ws[l]


def draw_weight_noise(ops, plan, step):
    """Every noisy layer's Wn = W + sigma * n for this step (layer word l), before the
    forward; the clean W stays in the store and is what the update moves."""
    for l in range(plan.n_layers):
        if contract.weight_noise_on(plan.lf, l):
            ops.weight_noise(plan.Ws[l], plan.wnoises[l], plan.weight_noise_of(l), plan.seed,
                             step, l)


def shard_args(row0):
    """The kernels' row0 argument (the batch row of the rows given: an MPI rank's shard,
    kernels/reference/sharded.py) only when it is not 0, so a backend's kernels are called
    as before outside a sharded step."""
    return {"row0": int(row0)} if row0 else {}


def layer_forward(ops, plan, l, x, n, step, row0=0):
    """Dense layer l's training forward over the first n rows: x -> plan.acts[l][:n]
    through the BatchNorm kernel or the plain one, noise and dropout on layer word l; the
    step's kernel is step_kernel's (weight noise). row0: the batch row of x's row 0 (a
    shard's masks; a sharded step never has BatchNorm)."""
    noise, std = plan.noise_of(l)
    if plan.bn_on(l):
        ops.bn_dense_forward(x, step_kernel(plan, l), plan.bs[l], plan.acts[l][:n],
                             plan.xhats[l][:n],
                             plan.gbs[l], plan.saves[l], plan.li[l, contract.LI_ACT],
                             plan.lf[l, contract.LF_SLOPE], plan.li[l, contract.LI_DROP_THR],
                             plan.lf[l, contract.LF_DROP_SCALE], plan.lf[l, contract.LF_BN_EPS],
                             plan.seed, step, l, noise, std, plan.pres[l][:n])
    else:
        ops.dense_forward(x, step_kernel(plan, l), plan.bs[l], plan.acts[l][:n],
                          plan.li[l, contract.LI_ACT],
                          plan.lf[l, contract.LF_SLOPE], plan.li[l, contract.LI_DROP_THR],
                          plan.lf[l, contract.LF_DROP_SCALE], plan.seed, step, l, noise, std,
                          plan.pres[l][:n], **shard_args(row0))


def layer_backward(ops, plan, l, x, dx, n, step, row0=0):
    """Dense layer l's backward: plan.grads[l][:n] holds dL/d(output) -> dW, db (dgb and the
    running statistics of a BatchNorm layer), and dx = dL/d(input) unless dx has size 0.
    x is the layer's input of the forward; dx reads the forward's kernel (step_kernel).
    Returns the layer's activity penalty of the step (contract LF_ACTIVITY_*; 0.0
    without one). A layer without one calls the kernels without the activity
    arguments."""
    noise, std = plan.noise_of(l)
    act = shard_args(row0)
    if plan.activity_on(l):
        act.update(zip(("activity_l1", "activity_l2"), plan.activity_of(l)))
    if plan.bn_on(l):
        return ops.bn_dense_backward(plan.grads[l][:n], plan.acts[l][:n], plan.xhats[l][:n],
                                     x, step_kernel(plan, l), plan.gbs[l], plan.stats[l],
                                     plan.saves[l], plan.dWs[l], plan.dbs[l], plan.dgbs[l], dx,
                                     plan.li[l, contract.LI_ACT], plan.lf[l, contract.LF_SLOPE],
                                     plan.li[l, contract.LI_DROP_THR],
                                     plan.lf[l, contract.LF_DROP_SCALE],
                                     plan.lf[l, contract.LF_BN_MOMENTUM], plan.seed, step, l,
                                     noise, std, plan.pres[l][:n], **act) or 0.0
    return ops.dense_backward(plan.grads[l][:n], plan.acts[l][:n], x, step_kernel(plan, l),
                              plan.dWs[l], plan.dbs[l], dx, plan.li[l, contract.LI_ACT],
                              plan.lf[l, contract.LF_SLOPE], plan.li[l, contract.LI_DROP_THR],
                              plan.lf[l, contract.LF_DROP_SCALE], plan.seed, step, l, noise, std,
                              plan.pres[l][:n], **act) or 0.0


def layer_update(ops, plan, l, t):
    """The fused penalized update of dense layer l's tensors at optimizer step t: W, b, and
    a BatchNorm's gamma/beta (flattened: a vector, never penalized). Returns their penalty
    before the step."""
    pen = ops.penalized_update(plan.Ws[l], plan.dWs[l], plan.mW[l], plan.vW[l], plan.hpW[l],
                               plan.opt, t)
    if plan.bs[l].size:
        pen += ops.penalized_update(plan.bs[l], plan.dbs[l], plan.mb[l], plan.vb[l],
                                    plan.hpb[l], plan.opt, t)
    if plan.bn_on(l):
        pen += ops.penalized_update(plan.gbs[l].reshape(-1), plan.dgbs[l].reshape(-1),
                                    plan.mgb[l].reshape(-1), plan.vgb[l].reshape(-1),
                                    plan.hpgb[l], plan.opt, t)
    return pen


def input_transform(ops, plan, p, x, n, step, row0=0):
    """Part p's input after its dropout and noise (into plan.xdrops[p]), or x itself."""
    if not plan.has_input_transform(p):
        return x
    thr, scale, noise, std = plan.input_transform_of(p)
    first = int(plan.parts[p, contract.PT_FIRST])
    ops.input_dropout(x, plan.xdrops[p][:n], thr, scale, plan.seed, step, first, noise, std,
                      **shard_args(row0))
    return plan.xdrops[p][:n]


def input_transform_backward(ops, plan, p, dh, step, row0=0):
    """dh (in place) back through part p's input transform: the dropout mask and scale and,
    for GaussianDropout, its regenerated factor (input_dropout applied to the gradient);
    additive noise passes the gradient unchanged."""
    if not plan.has_input_transform(p):
        return
    thr, scale, noise, std = plan.input_transform_of(p)
    if noise != contract.NOISE_MUL:
        noise, std = contract.NOISE_NONE, 0.0
    if thr > 0 or noise != contract.NOISE_NONE:
        ops.input_dropout(dh, dh, thr, scale, plan.seed, step,
                          int(plan.parts[p, contract.PT_FIRST]), noise, std, **shard_args(row0))


def forward_backward(ops, plan, X, Y, idx, step, zrows=None, row0=0):
    """The forward and backward of one training step on the rows idx of X and Y (module
    docstring), no update: the gradients of every tensor are in plan.dWs / dbs / dgbs (and a
    BatchNorm's running statistics updated). Returns (losses per part, finite, activity
    penalty: the layers' summed in backward order); when a loss is not finite, nothing after
    the forward is run (the activity penalty is then 0). row0: the batch row of idx[0]
    when idx is one MPI rank's shard of the step's batch (its rows draw the batch's
    masks and noise: kernels/reference/sharded.py)."""
    n = idx.shape[0]
    P, L = plan.n_parts, plan.n_layers
    xb = plan.xbuf[:n]
    xb[...] = X[idx]
    draw_weight_noise(ops, plan, step)
    inputs = [None] * L
    losses = np.zeros(P)
    for p in range(P):
        first, end, src, loss, y0, y1, wcol, z0 = (int(v) for v in plan.parts[p])
        x = xb if src < 0 else plan.acts[int(plan.parts[src, contract.PT_END]) - 1][:n]
        x = input_transform(ops, plan, p, x, n, step, row0)
        for l in range(first, end):
            inputs[l] = x
            layer_forward(ops, plan, l, x, n, step, row0)
            x = plan.acts[l][:n]
        if loss >= 0:
            yb = plan.ybufs[p][:n]
            yb[...] = Y[idx, y0:y1]
            if zrows is not None and z0 >= 0:     # the running metrics' logits
                zrows[:, z0:z0 + x.shape[1]] = x
            param = plan.partf[p, contract.PF_LOSS_PARAM]
            if wcol < 0:
                losses[p] = ops.loss_forward_backward(x, yb, plan.grads[end - 1][:n], loss,
                                                      param)
            else:
                losses[p] = weighted_loss_forward_backward(ops, x, yb, plan.grads[end - 1][:n],
                                                           loss, param, Y[idx, wcol])
    if not np.isfinite(losses).all():
        return losses, False, 0.0
    activity = 0.0
    empty = np.zeros((0, 0), plan.dtype)
    for p in list(range(1, P)) + [0]:        # the heads in order, then the trunk
        first, end = int(plan.parts[p, contract.PT_FIRST]), int(plan.parts[p, contract.PT_END])
        w = plan.partf[p, contract.PF_WEIGHT]
        if w != 1.0:
            g = plan.grads[end - 1][:n]
            g *= plan.dtype.type(w)
        if p == 0:
            into = empty                     # nobody needs the inputs' gradient
        else:                                # the trunk's output gradient: the first head
            trunk_out = plan.grads[int(plan.parts[0, contract.PT_END]) - 1][:n]   # writes it
            into = trunk_out if p == 1 else plan.scratch[:n]
        for l in range(end - 1, first - 1, -1):
            dx = plan.grads[l - 1][:n] if l > first else into
            activity += layer_backward(ops, plan, l, inputs[l], dx, n, step, row0)
        if p > 0:
            input_transform_backward(ops, plan, p, into, step, row0)
            if p > 1:
                trunk_out += into
    return losses, True, activity


def weighted_loss_forward_backward(ops, z, y, grad, loss, param, w):
    """The batch loss with sample weights w (one per row): sum_r w_r l_r / B (Keras' sum over
    the batch size), each row's gradient that of its own loss times w_r / B. Every loss is a
    mean over rows, so row r's (l_r, dl_r/dz_r) is the loss kernel on that row alone."""
    n = z.shape[0]
    total = 0.0
    for r in range(n):
        lr = ops.loss_forward_backward(z[r:r + 1], y[r:r + 1], grad[r:r + 1], loss, param)
        total += float(w[r]) * lr
        grad[r] *= grad.dtype.type(float(w[r]) / n)
    return total / n


def train_step(ops, plan, X, Y, idx, step, t, zrows=None):
    """One training step on the rows idx of X and Y: forward_backward, then the fused
    penalized update of every layer's tensors, last layer first. Returns (losses per part
    (0 where a part has none), penalty, finite): the batch means, and the penalty: that of
    the tensors before their update (summed last layer first), plus the step's activity
    penalty (forward_backward's); when a loss is not finite, nothing is updated and the
    penalty is 0."""
    losses, finite, activity = forward_backward(ops, plan, X, Y, idx, step, zrows)
    if not finite:
        return losses, 0.0, False
    return losses, update(ops, plan, t) + activity, True


def update(ops, plan, t):
    """The step's update from the gradients in plan.grad (the whole batch's): clipping,
    then the fused penalized update of every layer's tensors, last layer first. Returns
    their penalty before the update (summed last layer first)."""
    if plan.clip_mode:
        clip_gradients(plan.grad, plan.grad_segments(), plan.clip_mode, plan.clip_value)
    pen = 0.0
    for l in range(plan.n_layers - 1, -1, -1):
        pen += layer_update(ops, plan, l, t)
    return pen


def train_epoch(ops, plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None,
                step_fn=train_step):
    """The batches of `perm` (an epoch, or a chunk of whole batches); returns
    (loss sums per part, penalty sum, steps, finite), the sums weighted by batch rows
    (divide by the rows seen for the means). Stops at the first batch with a non-finite
    loss, before updating. lrs: the learning rate of each step (Plan.step_rates), written
    into the hp rows before the step's update. zout (Plan.logits_out): row i receives, at
    columns [PT_Z0, PT_Z0 + outputs) of each part that keeps them, the logits of row perm[i]
    in its training step (dropout on, before the update): the running metrics. step_fn:
    train_step's signature and result (a sharded step: kernels/reference/sharded.py)."""
    lrs = plan.step_rates(perm.shape[0], batch_size, lrs)
    zout = plan.logits_out(perm.shape[0], zout)
    loss_sums = np.zeros(plan.n_parts)
    pen_sum = 0.0
    steps = 0
    for start in range(0, perm.shape[0], batch_size):
        idx = perm[start:start + batch_size]
        plan.set_learning_rate(lrs[steps])
        losses, pen, finite = step_fn(ops, plan, X, Y, idx, step0 + steps, t0 + steps,
                                      zout[start:start + batch_size] if zout.shape[0]
                                      else None)
        if not finite:
            return loss_sums, pen_sum, steps, False
        n = idx.shape[0]
        loss_sums += losses * n
        pen_sum += pen * n
        steps += 1
    return loss_sums, pen_sum, steps, True


def forward_inference(ops, plan, X, batch_size, part=0):
    """Logits of part `part` of an inference plan (BatchNorm folded into W, b) for X, that
    part's input, dropout and noise off, in chunks of `batch_size` rows."""
    layers = plan.part_layers(part)
    out = np.empty((X.shape[0], plan.Ws[layers[-1]].shape[1]), plan.dtype)
    bufs = {l: np.empty((min(batch_size, X.shape[0]), plan.Ws[l].shape[1]), plan.dtype)
            for l in layers}
    for start in range(0, X.shape[0], batch_size):
        x = X[start:start + batch_size]
        n = x.shape[0]
        for l in layers:
            ops.dense_forward(x, plan.Ws[l], plan.bs[l], bufs[l][:n], plan.li[l, contract.LI_ACT],
                              plan.lf[l, contract.LF_SLOPE], 0, 1.0, 0, 0, l)
            x = bufs[l][:n]
        out[start:start + n] = x
    return out
