"""MC dropout at inference: predictive mean and std over dropout (and noise) samples, through
any backend's per-op kernels, for every part of a network.

Pass c takes the rows [c*R, (c+1)*R) of X, R = mc_rows_per_pass(n_samples), stacks
`n_samples` consecutive copies of each (stacked row r*n_samples + k is copy k of local row r)
and runs the forward once over them: the trunk once, then every head on the trunk's stacked
output, so within a sample all heads see the same trunk masks. Dropout and noise run as in
training (same thresholds and scales, input transforms included), their Philox words
    key = seed,  counter = (element // 4, step0 + c, mc_layer_word(l), stream)
(element the row-major index in the stacked (R * n_samples, O_l) matrix), so the result is a
pure function of (weights, X, n_samples, seed, step0), identical on every backend up to
float32 rounding.
"""
import numpy as np

from . import contract as C
from .philox import MASK32, mc_layer_word

MC_STACK_ROWS = 8192   # stacked rows (rows x samples) of one MC pass: bounds its memory


def mc_rows_per_pass(n_samples):
    """Rows of X per MC pass: max(1, MC_STACK_ROWS // n_samples). A function of n_samples
    only (not of batch_size or len(X)), so a row's masks never depend on how X is cut."""
    return max(1, MC_STACK_ROWS // int(n_samples))


def forward_pass(ops, plan, p, x, acts, xdrop, seed, step):
    """One MC pass of part p of an inference plan over the stacked rows x: its input
    transform into xdrop (None: it has none), then its layers into acts[l] with their
    training dropout and noise, Philox layer words mc_layer_word(l). Returns the output."""
    m = x.shape[0]
    first = int(plan.parts[p, C.PT_FIRST])
    if xdrop is not None:
        thr, scale, noise, std = plan.input_transform_of(p)
        ops.input_dropout(x, xdrop[:m], thr, scale, seed, step, mc_layer_word(first), noise,
                          std)
        x = xdrop[:m]
    for l in plan.part_layers(p):
        ops.dense_forward(x, plan.Ws[l], plan.bs[l], acts[l][:m], plan.li[l, C.LI_ACT],
                          plan.lf[l, C.LF_SLOPE], plan.li[l, C.LI_DROP_THR],
                          plan.lf[l, C.LF_DROP_SCALE], seed, step, mc_layer_word(l),
                          *plan.noise_of(l))
        x = acts[l][:m]
    return x


def mc_dropout(ops, plan, X, n_samples, seed, step0, losses):
    """([(mean, std) per head], passes) for X over `n_samples` samples per row (module
    docstring). `losses[h]`: the loss code of head h (the parts with a loss, in part order;
    a Sequential's only part), choosing the output transform (probabilities for the
    cross-entropies): mean and std (population std, ddof=0) are over the transformed outputs,
    in float64, returned in the plan's dtype."""
    N = X.shape[0]
    n = int(n_samples)
    heads = plan.heads
    out = [(np.empty((N, plan.n_outputs[p]), plan.dtype),
            np.zeros((N, plan.n_outputs[p]), plan.dtype)) for p in heads]
    rows = mc_rows_per_pass(n)
    stacked = min(rows, N) * n
    acts = [np.empty((stacked, W.shape[1]), plan.dtype) for W in plan.Ws]
    xdrops = [np.empty((stacked, plan.part_input_width(p)), plan.dtype)
              if plan.has_input_transform(p) else None for p in range(plan.n_parts)]
    passes = 0
    for start in range(0, N, rows):
        xs = np.repeat(X[start:start + rows], n, axis=0)
        m = xs.shape[0]
        step = (int(step0) + passes) & MASK32
        outputs = {}
        for p in range(plan.n_parts):
            src = int(plan.parts[p, C.PT_INPUT])
            x = xs if src < 0 else outputs[src]
            outputs[p] = forward_pass(ops, plan, p, x, acts, xdrops[p], seed, step)
        for (mean, std), p, loss in zip(out, heads, losses):
            K = mean.shape[1]
            prob = np.asarray(ops.output_transform(outputs[p], loss), np.float64)
            prob = prob.reshape(m // n, n, K)
            mean[start:start + m // n] = prob.mean(axis=1)
            std[start:start + m // n] = prob.std(axis=1)
        passes += 1
    return out, passes
