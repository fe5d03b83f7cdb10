"""The training-step driver shared by the backends that run their epoch loop in Python.

The reference (NumPy) backend uses this loop as the readable specification of one epoch; the
Numba backend compiles the same loop (kernels/cpu.py: ``_train_epoch``), step for step, so
both apply the same masks in the same order.

A ``Net`` is the compute-side view of a model: parameter tensors, their gradients and optimizer
moments, the per-layer configuration rows (contract.LI_* / LF_*), the per-tensor
hyperparameter rows (contract.HP_*), and the workspace sized for one batch.
"""
from dataclasses import dataclass, field

import numpy as np

from . import contract as C


@dataclass
class Net:
    Ws: list
    bs: list
    dWs: list
    dbs: list
    mW: list
    vW: list
    mb: list
    vb: list
    li: np.ndarray          # (L, LI_SIZE) int64
    lf: np.ndarray          # (L, LF_SIZE) in the parameter dtype
    hpW: np.ndarray         # (L, HP_SIZE) float64
    hpb: np.ndarray         # (L, HP_SIZE) float64
    opt: int
    loss: int
    seed: int
    # workspace for one batch of at most `batch` rows
    batch: int = 0
    acts: list = field(default_factory=list)    # (batch, O_l): what backward keeps
    grads: list = field(default_factory=list)   # (batch, O_l): upstream gradients
    xbuf: np.ndarray = None                     # (batch, I0) gathered inputs
    xdrop: np.ndarray = None                    # (batch, I0) inputs after input dropout
    ybuf: np.ndarray = None                     # (batch, Ky) gathered targets
    cache: dict = field(default_factory=dict)   # backend-private (typed lists, scratch...)
    # BatchNorm (layers with li[l, LI_BN] = 1; the others hold empty (0, 0) arrays, and
    # empty lists mean no BatchNorm anywhere): gamma/beta, their gradient and moments, the
    # running statistics, and the update rows of gamma/beta (never penalized).
    gbs: list = field(default_factory=list)     # (2, O_l) gamma; beta
    dgbs: list = field(default_factory=list)
    mgb: list = field(default_factory=list)
    vgb: list = field(default_factory=list)
    stats: list = field(default_factory=list)   # (2, O_l) running mean; running variance
    hpgb: np.ndarray = None                     # (L, HP_SIZE) float64
    xhats: list = field(default_factory=list)   # (batch, O_l) zhat: what BN backward keeps
    saves: list = field(default_factory=list)   # (BN_SAVE_ROWS, O_l) float64 batch statistics
    # Noise layers: (batch, O_l) f(z) before the noise, for a layer with output noise and a
    # nonlinear activation (needs_pre); (0, O_l) for the others.
    pres: list = field(default_factory=list)

    @property
    def n_layers(self):
        return len(self.Ws)

    @property
    def dtype(self):
        return self.Ws[0].dtype


def has_bn(net):
    """Whether any layer of the plan runs BatchNorm (training plans only)."""
    return net.li.shape[1] > C.LI_BN and bool((net.li[:, C.LI_BN] != 0).any())


def ensure_bn_lists(net):
    """Fill the BatchNorm lists of a Net made without them with empty (0, 0) arrays, so every
    backend sees one array per layer (a Net built by hand, or without BatchNorm)."""
    L = net.n_layers
    dt = net.dtype
    for name, dtype in (("gbs", dt), ("dgbs", dt), ("mgb", dt), ("vgb", dt), ("stats", dt),
                        ("xhats", dt), ("saves", np.float64)):
        if len(getattr(net, name)) != L:
            setattr(net, name, [np.zeros((0, 0), dtype) for _ in range(L)])
    if net.hpgb is None:
        net.hpgb = np.zeros((L, C.HP_SIZE))


def noise_of(net, l):
    """(NOISE_* code, std) of the noise on layer l's output; (NOISE_NONE, 0) without."""
    if net.li.shape[1] <= C.LI_NOISE:
        return C.NOISE_NONE, net.dtype.type(0)
    return int(net.li[l, C.LI_NOISE]), net.lf[l, C.LF_NOISE_STD]


def input_noise_of(net):
    """(NOISE_* code, std) of the noise on the inputs (before the first dense layer)."""
    if net.li.shape[1] <= C.LI_IN_NOISE:
        return C.NOISE_NONE, net.dtype.type(0)
    return int(net.li[0, C.LI_IN_NOISE]), net.lf[0, C.LF_IN_NOISE_STD]


def needs_pre(noise, act):
    """Whether backward needs the pre-noise activation f(z) kept (Net.pres): with noise, f'
    can no longer be read off the output, except for a linear layer (f' = 1)."""
    return noise != C.NOISE_NONE and act != C.ACT_LINEAR


def has_input_transform(net):
    """Whether the inputs pass through dropout and/or noise (into Net.xdrop) in training."""
    return net.li[0, C.LI_IN_DROP_THR] > 0 or input_noise_of(net)[0] != C.NOISE_NONE


def allocate_workspace(net, batch, y_width):
    """Preallocate every buffer one training step touches, for batches of <= `batch` rows."""
    dt = net.dtype
    net.pres = [np.zeros((batch if needs_pre(noise_of(net, l)[0], net.li[l, C.LI_ACT]) else 0,
                          W.shape[1]), dt) for l, W in enumerate(net.Ws)]
    ensure_bn_lists(net)
    bn = [bool(net.li[l, C.LI_BN]) if net.li.shape[1] > C.LI_BN else False
          for l in range(net.n_layers)]
    net.xhats = [np.zeros((batch, W.shape[1]) if on else (0, 0), dt)
                 for W, on in zip(net.Ws, bn)]
    net.saves = [np.zeros((C.BN_SAVE_ROWS, W.shape[1]) if on else (0, 0))
                 for W, on in zip(net.Ws, bn)]
    net.batch = int(batch)
    net.acts = [np.zeros((batch, W.shape[1]), dt) for W in net.Ws]
    net.grads = [np.zeros((batch, W.shape[1]), dt) for W in net.Ws]
    i0 = net.Ws[0].shape[0]
    net.xbuf = np.zeros((batch, i0), dt)
    net.xdrop = np.zeros((batch, i0) if has_input_transform(net) else (0, i0), dt)
    net.ybuf = np.zeros((batch, y_width), dt)
    net.cache.clear()


def kept_bytes_per_element(net):
    """What one training step keeps between forward and backward, per activation element:
    the layer output only, and for a BatchNorm layer its zhat too (plus per unit, not counted
    here: inv_std and the batch mean and variance for the running update, float64)."""
    units = sum(W.shape[1] for W in net.Ws)
    bn = sum(W.shape[1] for l, W in enumerate(net.Ws)
             if net.li.shape[1] > C.LI_BN and net.li[l, C.LI_BN])
    # a layer with noise and a nonlinear activation keeps f(z) before the noise too
    pre = sum(W.shape[1] for l, W in enumerate(net.Ws)
              if needs_pre(noise_of(net, l)[0], net.li[l, C.LI_ACT]))
    return net.dtype.itemsize * (units + bn + pre) / units


def bn_on(net, l):
    """Whether dense layer l of a training plan runs BatchNorm."""
    return net.li.shape[1] > C.LI_BN and bool(net.li[l, C.LI_BN])


def layer_forward(ops, net, l, x, n, step, word):
    """Dense layer l's training forward over the first n rows: x -> net.acts[l][:n] through
    the BatchNorm kernel or the plain one, noise and dropout on Philox layer word `word`."""
    if bn_on(net, l):
        ops.bn_dense_forward(x, net.Ws[l], net.bs[l], net.acts[l][:n], net.xhats[l][:n],
                             net.gbs[l], net.saves[l], net.li[l, C.LI_ACT],
                             net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                             net.lf[l, C.LF_DROP_SCALE], net.lf[l, C.LF_BN_EPS], net.seed,
                             step, word, *noise_of(net, l), net.pres[l][:n])
    else:
        ops.dense_forward(x, net.Ws[l], net.bs[l], net.acts[l][:n], net.li[l, C.LI_ACT],
                          net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                          net.lf[l, C.LF_DROP_SCALE], net.seed, step, word,
                          *noise_of(net, l), net.pres[l][:n])


def layer_backward(ops, net, l, x, dx, n, step, word):
    """Dense layer l's backward: net.grads[l][:n] holds dL/d(output) -> dW, db (dgb, and the
    running statistics of a BatchNorm layer), and dx = dL/d(input) unless dx has size 0.
    x is the layer's input of the forward."""
    if bn_on(net, l):
        ops.bn_dense_backward(net.grads[l][:n], net.acts[l][:n], net.xhats[l][:n], x,
                              net.Ws[l], net.gbs[l], net.stats[l], net.saves[l], net.dWs[l],
                              net.dbs[l], net.dgbs[l], dx, net.li[l, C.LI_ACT],
                              net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                              net.lf[l, C.LF_DROP_SCALE], net.lf[l, C.LF_BN_MOMENTUM],
                              net.seed, step, word, *noise_of(net, l), net.pres[l][:n])
    else:
        ops.dense_backward(net.grads[l][:n], net.acts[l][:n], x, net.Ws[l], net.dWs[l],
                           net.dbs[l], dx, net.li[l, C.LI_ACT], net.lf[l, C.LF_SLOPE],
                           net.li[l, C.LI_DROP_THR], net.lf[l, C.LF_DROP_SCALE], net.seed,
                           step, word, *noise_of(net, l), net.pres[l][:n])


def layer_update(ops, net, l, t):
    """The fused penalized update of dense layer l's tensors at Adam step t: W, b, and a
    BatchNorm's gamma/beta (flattened: a vector, never penalized). Returns their penalty
    before the step."""
    pen = ops.penalized_update(net.Ws[l], net.dWs[l], net.mW[l], net.vW[l], net.hpW[l],
                               net.opt, t)
    if net.bs[l].size:
        pen += ops.penalized_update(net.bs[l], net.dbs[l], net.mb[l], net.vb[l], net.hpb[l],
                                    net.opt, t)
    if bn_on(net, l):
        pen += ops.penalized_update(net.gbs[l].reshape(-1), net.dgbs[l].reshape(-1),
                                    net.mgb[l].reshape(-1), net.vgb[l].reshape(-1),
                                    net.hpgb[l], net.opt, t)
    return pen


def train_epoch(ops, net, X, Y, perm, batch_size, step0, t0):
    """One epoch in Python over `ops` kernels; returns (loss_sum, penalty_sum, steps, finite).

    loss_sum and penalty_sum are weighted by batch rows (divide by the rows seen for the
    epoch means). Stops at the first batch whose loss is not finite, before updating.
    """
    n_total = perm.shape[0]   # the rows of this call: an epoch or a chunk of whole batches
    L = net.n_layers
    loss_sum = 0.0
    pen_sum = 0.0
    steps = 0
    empty = np.zeros((0, 0), net.dtype)
    for start in range(0, n_total, batch_size):
        idx = perm[start:start + batch_size]
        n = idx.shape[0]
        step = step0 + steps
        t = t0 + steps
        xb = net.xbuf[:n]
        xb[...] = X[idx]
        yb = net.ybuf[:n]
        yb[...] = Y[idx]
        x = xb
        if has_input_transform(net):
            ops.input_dropout(xb, net.xdrop[:n], net.li[0, C.LI_IN_DROP_THR],
                              net.lf[0, C.LF_IN_DROP_SCALE], net.seed, step, 0,
                              *input_noise_of(net))
            x = net.xdrop[:n]
        inputs = []
        for l in range(L):
            inputs.append(x)
            layer_forward(ops, net, l, x, n, step, l)
            x = net.acts[l][:n]
        batch_loss = ops.loss_forward_backward(net.acts[L - 1][:n], yb, net.grads[L - 1][:n],
                                               net.loss)
        if not np.isfinite(batch_loss):
            return loss_sum, pen_sum, steps, False
        loss_sum += batch_loss * n
        pen = 0.0
        for l in range(L - 1, -1, -1):
            dx = net.grads[l - 1][:n] if l > 0 else empty
            layer_backward(ops, net, l, inputs[l], dx, n, step, l)
            # Layer l's weights are not read again this step: update them while dW is hot.
            pen += layer_update(ops, net, l, t)
        pen_sum += pen * n
        steps += 1
    return loss_sum, pen_sum, steps, True


def forward_inference(ops, net, X, batch_size):
    """Logits for X with dropout off, in chunks of `batch_size` rows. `net` is an inference
    plan: BatchNorm already folded into its W, b (Sequential._make_net(training=False))."""
    L = net.n_layers
    out = np.empty((X.shape[0], net.Ws[-1].shape[1]), net.dtype)
    bufs = [np.empty((min(batch_size, X.shape[0]), W.shape[1]), net.dtype) for W in net.Ws]
    for start in range(0, X.shape[0], batch_size):
        x = X[start:start + batch_size]
        n = x.shape[0]
        for l in range(L):
            ops.dense_forward(x, net.Ws[l], net.bs[l], bufs[l][:n], net.li[l, C.LI_ACT],
                              net.lf[l, C.LF_SLOPE], 0, 1.0, 0, 0, l)
            x = bufs[l][:n]
        out[start:start + n] = x
    return out


# ---------------------------------------------------------------- MC dropout at inference
MC_STACK_ROWS = 8192   # stacked rows (rows x samples) of one MC pass: bounds its memory


def mc_rows_per_pass(n_samples):
    """Rows of X per MC pass: max(1, MC_STACK_ROWS // n_samples). A function of n_samples
    only (not of batch_size or len(X)), so a row's masks never depend on how X is cut."""
    return max(1, MC_STACK_ROWS // int(n_samples))


def has_dropout(net):
    """Whether any dropout or noise layer (on a layer's output, or on the inputs) is active
    in training: what MC sampling draws."""
    return bool((net.li[:, C.LI_DROP_THR] > 0).any() or net.li[0, C.LI_IN_DROP_THR] > 0
                or has_input_transform(net)
                or any(noise_of(net, l)[0] for l in range(net.n_layers)))


def mc_forward_pass(ops, net, x, acts, xdrop, seed, step, base=0):
    """One MC pass of an inference plan over the stacked rows x (m of them): input noise and
    dropout into xdrop (None: the plan has none), then every layer into acts[l][:m] with its
    training dropout and noise, Philox layer words mc_layer_word(base + l). Returns the
    output rows. (base: the first layer's word, for a part of a MultiTask.)"""
    from .philox import mc_layer_word  # here: philox imports Numba, which cython needs not
    m = x.shape[0]
    if xdrop is not None:
        ops.input_dropout(x, xdrop[:m], net.li[0, C.LI_IN_DROP_THR],
                          net.lf[0, C.LF_IN_DROP_SCALE], seed, step, mc_layer_word(base),
                          *input_noise_of(net))
        x = xdrop[:m]
    for l in range(net.n_layers):
        ops.dense_forward(x, net.Ws[l], net.bs[l], acts[l][:m], net.li[l, C.LI_ACT],
                          net.lf[l, C.LF_SLOPE], net.li[l, C.LI_DROP_THR],
                          net.lf[l, C.LF_DROP_SCALE], seed, step, mc_layer_word(base + l),
                          *noise_of(net, l))
        x = acts[l][:m]
    return x


def mc_dropout_forward(ops, net, X, n_samples, seed, step0, loss):
    """MC dropout: (mean, std, passes) of the outputs over `n_samples` dropout masks per row.

    Dropout runs as in training (same thresholds and scales, input dropout included; noise
    layers too, on streams STREAM_NOISE / STREAM_INPUT_NOISE with the same layer words), through
    the same fused kernels: pass c takes the rows [c*R, (c+1)*R) of X, R = mc_rows_per_pass,
    stacks `n_samples` consecutive copies of each (stacked row r*n_samples + k is copy k of
    local row r) and runs the forward once over them. Its masks are the Philox words of
        key = seed,  counter = (element // 4, step0 + c, mc_layer_word(l), stream)
    (stream STREAM_DROPOUT for layer l's outputs, STREAM_INPUT_DROPOUT for the inputs, element
    the row-major index in the stacked (R * n_samples, O_l) matrix), so the result is a pure
    function of (weights, X, n_samples, seed, step0), identical on every backend up to float32
    rounding. `loss` picks the output transform (probabilities for the cross-entropies):
    mean and std (population std, ddof=0) are over the transformed outputs, in float64,
    returned in the net's dtype. Without any dropout every sample is the plain forward:
    mean is that, std is exactly 0, and no pass is drawn (passes = 0).
    """
    from .philox import MASK32  # here: philox imports Numba, which cython needs not
    N = X.shape[0]
    K = net.Ws[-1].shape[1]
    n = int(n_samples)
    mean = np.empty((N, K), net.dtype)
    std = np.zeros((N, K), net.dtype)
    if N == 0:
        return mean, std, 0
    if not has_dropout(net):
        mean[...] = ops.output_transform(ops.forward_inference(net, X, MC_STACK_ROWS), loss)
        return mean, std, 0
    rows = mc_rows_per_pass(n)
    stacked = min(rows, N) * n
    bufs = [np.empty((stacked, W.shape[1]), net.dtype) for W in net.Ws]
    xdrop = np.empty((stacked, X.shape[1]), net.dtype) if has_input_transform(net) else None
    passes = 0
    for start in range(0, N, rows):
        xs = np.repeat(X[start:start + rows], n, axis=0)
        m = xs.shape[0]
        step = (int(step0) + passes) & MASK32
        x = mc_forward_pass(ops, net, xs, bufs, xdrop, seed, step)
        p = np.asarray(ops.output_transform(x, loss), np.float64).reshape(m // n, n, K)
        mean[start:start + m // n] = p.mean(axis=1)
        std[start:start + m // n] = p.std(axis=1)
        passes += 1
    return mean, std, passes
