"""MC dropout at inference: predictive mean and std over dropout (and noise) samples, through
any backend's per-op kernels, for every part of a network.

The passes (mc_passes) stack at most MC_STACK_ROWS rows each: with n_samples <=
MC_STACK_ROWS pass c takes the rows [c*R, (c+1)*R) of X, R = mc_rows_per_pass(n_samples),
and stacks `n_samples` consecutive copies of each (stacked row r*n_samples + k is copy k of
local row r); with more samples, each row's samples are cut into passes of MC_STACK_ROWS.
A pass runs the forward once over its stack: the trunk once, then every head on the trunk's
stacked output, so within a sample all heads see the same trunk masks. Dropout and noise
run as in training (same thresholds and scales, input transforms included), their Philox
words
    key = seed,  counter = (element // 4, step0 + c, mc_layer_word(l), stream)
(element the row-major index in the stacked (rows, O_l) matrix of the pass), so the result
is a pure function of (weights, X, n_samples, seed, step0), identical on every backend up
to float32 rounding. X may be any real 2-D array: each pass converts only its own rows.
"""
import numpy as np

from . import contract
from .philox import MASK32, mc_layer_word

MC_STACK_ROWS = 8192   # stacked rows (rows x samples) of one MC pass: bounds its memory


def mc_rows_per_pass(n_samples):
    """Rows of X per MC pass: max(1, MC_STACK_ROWS // n_samples). A function of n_samples
    only (not of batch_size or len(X)), so a row's masks never depend on how X is cut."""
    return max(1, MC_STACK_ROWS // int(n_samples))


def mc_passes(n_rows, n_samples):
    """The MC passes over n_rows rows, in order: (first row, end row, first sample, end
    sample). With n_samples <= MC_STACK_ROWS a pass takes mc_rows_per_pass rows and all their
    samples; with more, a row's samples are cut into passes of MC_STACK_ROWS (row r's pass j
    covers samples [j * MC_STACK_ROWS, (j + 1) * MC_STACK_ROWS)), so no pass stacks more than
    MC_STACK_ROWS rows. Pass c draws its masks at step step0 + c: a function of
    (row index, n_samples) only."""
    n = int(n_samples)
    if n <= MC_STACK_ROWS:
        rows = mc_rows_per_pass(n)
        for start in range(0, n_rows, rows):
            yield start, min(n_rows, start + rows), 0, n
        return
    for r in range(n_rows):
        for s0 in range(0, n, MC_STACK_ROWS):
            yield r, r + 1, s0, min(n, s0 + MC_STACK_ROWS)


def mc_stack(X, start, stop, s0, s1, dtype):
    """The stacked rows of a pass: samples s0..s1 of each of the rows [start, stop) of X
    (converted to dtype for this pass only), row r's copies consecutive."""
    x = np.ascontiguousarray(X[start:stop], dtype=dtype)
    return np.repeat(x, s1 - s0, axis=0)


class MCMoments:
    """Mean and population std over the samples of each row, from the passes of mc_passes:
    a pass holding all of its rows' samples gives them directly (float64, two passes); a
    row cut over several passes is combined pass by pass (Chan et al.'s update of the mean
    and the sum of squared deviations, in float64)."""

    def __init__(self, n_rows, width, n_samples, dtype):
        self.n = int(n_samples)
        self.mean = np.empty((n_rows, width), dtype)
        self.std = np.zeros((n_rows, width), dtype)
        self._acc = None        # (samples so far, mean, sum of squared deviations) of a row

    def add(self, start, stop, s0, s1, p):
        """p: (rows * samples, width) float64 outputs of the pass, row-major by row."""
        k = s1 - s0
        p = p.reshape(stop - start, k, p.shape[1])
        if s0 == 0 and s1 == self.n:
            self.mean[start:stop] = p.mean(axis=1)
            self.std[start:stop] = p.std(axis=1)
            return
        mb = p[0].mean(axis=0)
        m2b = ((p[0] - mb) ** 2).sum(axis=0)
        if s0 == 0:
            self._acc = (k, mb, m2b)
        else:
            count, mean, m2 = self._acc
            total = count + k
            delta = mb - mean
            self._acc = (total, mean + delta * (k / total),
                         m2 + m2b + delta * delta * (count * k / total))
        if s1 == self.n:
            _, mean, m2 = self._acc
            self.mean[start] = mean
            self.std[start] = np.sqrt(m2 / self.n)


def forward_pass(ops, plan, p, x, acts, xdrop, seed, step):
    """One MC pass of part p of an inference plan over the stacked rows x: its input
    transform into xdrop (None: it has none), then its layers into acts[l] with their
    training dropout and noise, Philox layer words mc_layer_word(l). Returns the output."""
    m = x.shape[0]
    first = int(plan.parts[p, contract.PT_FIRST])
    if xdrop is not None:
        thr, scale, noise, std = plan.input_transform_of(p)
        ops.input_dropout(x, xdrop[:m], thr, scale, seed, step, mc_layer_word(first), noise,
                          std)
        x = xdrop[:m]
    for l in plan.part_layers(p):
        ops.dense_forward(x, plan.Ws[l], plan.bs[l], acts[l][:m], plan.li[l, contract.LI_ACT],
                          plan.lf[l, contract.LF_SLOPE], plan.li[l, contract.LI_DROP_THR],
                          plan.lf[l, contract.LF_DROP_SCALE], seed, step, mc_layer_word(l),
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
    accs = [MCMoments(N, plan.n_outputs[p], n, plan.dtype) for p in heads]
    stacked = min(mc_rows_per_pass(n), N) * n if n <= MC_STACK_ROWS else MC_STACK_ROWS
    acts = [np.empty((stacked, W.shape[1]), plan.dtype) for W in plan.Ws]
    xdrops = [np.empty((stacked, plan.part_input_width(p)), plan.dtype)
              if plan.has_input_transform(p) else None for p in range(plan.n_parts)]
    passes = 0
    for start, stop, s0, s1 in mc_passes(N, n):
        xs = mc_stack(X, start, stop, s0, s1, plan.dtype)
        step = (int(step0) + passes) & MASK32
        outputs = {}
        for p in range(plan.n_parts):
            src = int(plan.parts[p, contract.PT_INPUT])
            x = xs if src < 0 else outputs[src]
            outputs[p] = forward_pass(ops, plan, p, x, acts, xdrops[p], seed, step)
        for acc, p, loss in zip(accs, heads, losses):
            acc.add(start, stop, s0, s1,
                    np.asarray(ops.output_transform(outputs[p], loss), np.float64))
        del xs, x, outputs  # one pass's stacked rows at a time
        passes += 1
    return [(acc.mean, acc.std) for acc in accs], passes
