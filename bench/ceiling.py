"""The GEMM ceiling of a workload: the time the GEMMs of one training epoch take alone.

Every GEMM of every training step (forward x @ W, weight gradient x.T @ dz, input gradient
dz @ W.T; workloads.Workload.gemm_shapes), on float32 operands of the same shapes, through
NumPy's matmul, measured two ways on all the cores the run may use:
- multi-threaded: one BLAS call per GEMM with BLAS on all its threads;
- row blocks: every GEMM split into one block of rows per core, each core running its own
  blocks with single-threaded BLAS (threads started together, the time of the slowest);
and the ceiling is the faster of the two. Small GEMMs (64-wide layers) do not speed up with
BLAS's own threads, but do split across cores by rows, so the second way is the honest
all-core ceiling there; large ones are faster in one multi-threaded call.

Python call overhead must not pose as arithmetic: the operands of up to STACK steps of the
same GEMM shape are stacked, and one batched matmul (a loop in C over the stack) runs them.
A `GemmCeiling` is timed like an engine, interleaved with them (A B C ceiling A B C ...), so
it sees the same machine as the engines it is compared with.
"""
import threading
import time

import numpy as np

STACK = 16                    # steps' operands per batched matmul
STACK_BYTES = 256 << 20       # at most this much of stacked operands per GEMM shape


def _stack_size(shape, steps):
    m, k, n = shape
    per_step = 4 * (m * k + k * n + m * n)
    return max(1, min(steps, STACK, STACK_BYTES // max(per_step, 1)))


def _operands(shapes, stack, rng):
    """[(a (S, m, k), b (S, k, n), out (S, m, n)), ...] float32 for each (m, k, n)."""
    return [(rng.standard_normal((stack, m, k), dtype=np.float32),
             rng.standard_normal((stack, k, n), dtype=np.float32),
             np.empty((stack, m, n), np.float32)) for m, k, n in shapes]


def _row_blocks(ops, parts):
    """The operands split into `parts` blocks of rows (per GEMM, contiguous copies)."""
    blocks = [[] for _ in range(parts)]
    for a, b, out in ops:
        m = a.shape[1]
        edges = np.linspace(0, m, parts + 1).astype(int)
        for p in range(parts):
            lo, hi = edges[p], edges[p + 1]
            if hi > lo:
                blocks[p].append((np.ascontiguousarray(a[:, lo:hi]), b,
                                  np.empty((a.shape[0], hi - lo, b.shape[2]), np.float32)))
    return [blk for blk in blocks if blk]


class _Plan:
    """The epoch's GEMMs as batched calls: `reps` calls of every stacked shape (plus the
    last partial batch's shapes once), scaled back to the epoch by `scale`."""

    def __init__(self, workload, parts, rng):
        n, B = workload.n_train, workload.batch_size
        full, last = divmod(n, B)
        shapes = workload.gemm_shapes(B)
        self.groups = []        # (ops, row blocks, calls per epoch as a float)
        if full:
            stack = min(_stack_size(s, full) for s in shapes)
            ops = _operands(shapes, stack, rng)
            self.groups.append((ops, _row_blocks(ops, parts), full / stack))
        if last:
            ops = _operands(workload.gemm_shapes(last), 1, rng)
            self.groups.append((ops, _row_blocks(ops, parts), 1.0))


def _run(ops, calls):
    for _ in range(calls):
        for a, b, out in ops:
            np.matmul(a, b, out=out)


class GemmCeiling:
    """The ceiling as an engine of the interleaved rounds: run_epoch() measures both ways
    once; `times_s` holds the ceiling (the faster way) of every round."""

    name = "gemm-ceiling"

    def __init__(self, workload, threads, seed=0):
        self.workload = workload
        self.threads = max(1, int(threads))
        self.plan = _Plan(workload, self.threads, np.random.default_rng(seed))
        self.multi_s, self.blocks_s, self.times_s = [], [], []

    def _multi_threaded(self):
        t = 0.0
        for ops, _, calls in self.plan.groups:
            reps = max(1, int(calls))
            t0 = time.perf_counter()
            _run(ops, reps)
            t += (time.perf_counter() - t0) * calls / reps
        return t

    def _row_blocks(self):
        from threadpoolctl import threadpool_limits
        t = 0.0
        with threadpool_limits(limits=1, user_api="blas"):
            for _, blocks, calls in self.plan.groups:
                reps = max(1, int(calls))
                start = threading.Barrier(len(blocks) + 1)
                workers = [threading.Thread(target=self._worker, args=(start, blk, reps))
                           for blk in blocks]
                for w in workers:
                    w.start()
                start.wait()
                t0 = time.perf_counter()
                for w in workers:
                    w.join()
                t += (time.perf_counter() - t0) * calls / reps
        return t

    @staticmethod
    def _worker(start, blocks, reps):
        start.wait()
        _run(blocks, reps)

    def run_epoch(self):
        multi, blocks = self._multi_threaded(), self._row_blocks()
        self.multi_s.append(multi)
        self.blocks_s.append(blocks)
        self.times_s.append(min(multi, blocks))
