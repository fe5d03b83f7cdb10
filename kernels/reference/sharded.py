"""A data-parallel training step: one global batch split over the ranks of an MPI job,
written over a backend's per-op kernels (kernels/protocol.py) like the reference epoch
(kernels/reference/epoch.py), whose train_epoch runs it as its step_fn.

Each rank owns a contiguous block of the batch's rows (shard_rows) and runs the reference
forward_backward on it, its rows drawing the global batch's dropout masks and noise (the
kernels' row0: Philox is counter-based, element (row0 + i) * O + j of a (B, O) layer). The
losses are means over the rows given, so a rank scales its gradients by n_local / B; one
in-place sum of the flat gradient buffer over the ranks (plan.grad: every W, b in one
array) then leaves the global batch's gradient on every rank, and each runs the same fused
penalized update (epoch.update: clipping, the optimizer, proximal L1, max-norm) on it, so
the weights stay identical, exact zeros included, without ever averaging weights.

Per step, before the gradient sum, a small float64 sum carries the losses, the activity
penalty and a count of ranks with a non-finite loss: when any is not finite, no rank sums or
updates, and they all stop together. With training metrics, a third sum gathers the batch's
logits (each row from the rank that owns it, zeros elsewhere).

`reducer` is what the API floor hands in (fastreg/distributed.py): rank, size and
sum_in_place(array) (an Allreduce SUM, in place); kernels never import MPI.

Shape legend: B global batch rows, n a rank's rows, P parts.
"""
import numpy as np

from .epoch import forward_backward, update

# A shard starts at a multiple of this many rows: row0 * O is then whole Philox groups of 4
# words for every layer width O, which is what the compiled backends' row0 needs.
SHARD_ROW_ALIGN = 4


def shard_rows(batch_rows, rank, size):
    """[lo, hi): the rows of a batch of batch_rows that rank `rank` of `size` owns:
    contiguous blocks of ceil(B / size) rows rounded up to SHARD_ROW_ALIGN, in rank order
    (the last ranks of a small or ragged batch may own none)."""
    per = -(-int(batch_rows) // int(size))
    per = -(-per // SHARD_ROW_ALIGN) * SHARD_ROW_ALIGN
    lo = min(int(rank) * per, int(batch_rows))
    return lo, min(lo + per, int(batch_rows))


class ShardedStep:
    """epoch.train_step's signature and result, on this rank's shard of the batch."""

    def __init__(self, reducer):
        self.reducer = reducer

    def __call__(self, ops, plan, X, Y, idx, step, t, zrows=None):
        B = idx.shape[0]
        P = plan.n_parts
        lo, hi = shard_rows(B, self.reducer.rank, self.reducer.size)
        n = hi - lo
        # [losses per part, activity penalty] as this rank's share of the batch means, then
        # the count of ranks whose loss is not finite
        scalars = np.zeros(P + 2)
        if n:
            losses, finite, activity = forward_backward(
                ops, plan, X, Y, idx[lo:hi], step,
                None if zrows is None else zrows[lo:hi], row0=lo)
            share = n / B
            scalars[:P] = losses * share
            scalars[P] = activity * share
            scalars[P + 1] = 0.0 if finite else 1.0
            if finite:
                plan.grad *= plan.dtype.type(share)
        else:
            plan.grad[...] = 0
        self.reducer.sum_in_place(scalars)
        if scalars[P + 1]:
            return scalars[:P], 0.0, False
        self.reducer.sum_in_place(plan.grad)        # THE allreduce of the step
        if zrows is not None:
            # the running metrics' logits: each row from the rank that owns it
            zrows[:lo] = 0
            zrows[hi:] = 0
            self.reducer.sum_in_place(zrows)
        return scalars[:P], update(ops, plan, t) + scalars[P], True
