"""Data-parallel training with MPI: `model.fit(X, y, ..., distributed="mpi")` under
`mpirun -n N python train.py` trains ONE model on N processes.

Why a fit argument and not a compile option: how many processes share a fit is a property
of how the script was launched, not of the model; the same compiled (or saved) model fits
in one process or in many, and nothing of it (loss, optimizer, backend, the saved file)
changes with N.

The step (kernels/reference/sharded.py): every rank takes its block of rows of each global
batch (contiguous, starts at multiples of 4 rows), runs the backend's per-op kernels on it
(its rows drawing the global batch's dropout masks: Philox is counter-based), scales its
gradients by n_local / B, and ONE in-place Allreduce (SUM) of the flat gradient buffer
gives every rank the global batch's gradient; every rank then runs the same fused
penalized update, so the weights stay identical on all ranks (weights are never averaged:
that would destroy L1's and group lasso's exact zeros). A second, tiny Allreduce per step
carries the losses, the activity penalty and the finite flag, so a NaN on any rank stops
every rank at the same step.

Every rank must be given the same X and y (checked on a sample of rows) and starts from rank
0's weights, seed and optimizer state (broadcast when the fit begins). Rank 0 alone runs the
callbacks (checkpoints, early stopping, logs), the validation and the progress display; its
decisions (stop, a new learning rate, weights a callback changed) are broadcast at the end
of every epoch, and the History and final state of rank 0 at the end of the fit.

mpi4py is optional: it is imported when a fit asks for MPI (`pip install "fastreg[mpi]"`).
"""
import hashlib

import numpy as np

from .kernels.reference import epoch as reference_epoch
from .kernels.reference.sharded import ShardedStep

INSTALL_HINT = 'pip install "fastreg[mpi]"'

# Backends whose per-op kernels take row0 (the shard's masks); the CUDA backend's do not.
SUPPORTED_BACKENDS = ("numpy", "cython", "numba")

# Rows of X and y compared across ranks to check that every rank got the same data.
DATA_CHECK_ROWS = 64


def import_mpi():
    """mpi4py's MPI module, or an ImportError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ImportError(f"fit(distributed='mpi') needs mpi4py and an MPI library: "
                          f"{INSTALL_HINT} (then launch with `mpirun -n 2 python "
                          f"train.py`)") from exc
    return MPI


def resolve(distributed):
    """fit's `distributed` argument: None (one process) or "mpi" -> an MPIRun."""
    if distributed is None:
        return None
    if not isinstance(distributed, str) or distributed.lower() != "mpi":
        raise ValueError(f"distributed must be None or 'mpi', got {distributed!r}")
    MPI = import_mpi()
    return MPIRun(MPI.COMM_WORLD, MPI)


def unsupported_features(model, weights, augment_plans):
    """What fit(distributed='mpi') cannot train yet (the model's features and fit's
    arguments), as a list of phrases; empty when it can."""
    network = model._network
    found = []
    if model.backend not in SUPPORTED_BACKENDS:
        found.append(f"the {model.backend!r} backend (MPI training runs on "
                     f"{', '.join(SUPPORTED_BACKENDS)})")
    if any(blk.bn is not None for blk in network.blocks):
        found.append("BatchNormalization (its batch statistics would be each rank's, not the "
                     "global batch's)")
    if len(network.parts) > 1:
        found.append("multi-task heads")
    if weights is not None and any(w is not None for w in weights):
        found.append("sample_weight / class_weight")
    if augment_plans:
        found.append("augment (Mixup and the augmenters)")
    return found


class MPIRun:
    """One fit's view of the MPI job: its rank, the sums and broadcasts the fit needs."""

    def __init__(self, comm, MPI):
        self.comm = comm
        self.MPI = MPI
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()

    @property
    def is_root(self):
        return self.rank == 0

    # ------------------------------------------------------------ what the step uses
    def sum_in_place(self, array):
        """array <- its sum over the ranks (Allreduce SUM, in place; the same bits on every
        rank)."""
        self.comm.Allreduce(self.MPI.IN_PLACE, array, op=self.MPI.SUM)

    def epoch_backend(self, backend):
        """`backend` with train_epoch replaced by the sharded epoch over its per-op kernels
        (the other hooks are its own)."""
        return ShardedBackend(backend, ShardedStep(self))

    # ------------------------------------------------------------ before, during, after
    def check(self, model, X, Ys, weights, augment_plans):
        """Refuse what MPI training does not support, and data that differs across ranks;
        raises the same error on every rank before anything changes."""
        found = unsupported_features(model, weights, augment_plans)
        if found:
            raise ValueError(f"fit(distributed='mpi') does not support {'; '.join(found)}; "
                             f"train without distributed= for these")
        rows = np.unique(np.linspace(0, X.shape[0] - 1, DATA_CHECK_ROWS).astype(np.int64))
        digest = hashlib.sha1()     # of the bytes: a NaN in the data is still the same data
        for a in [X] + list(Ys):
            digest.update(np.ascontiguousarray(a[rows]).tobytes())
        fingerprint = (X.shape, [Y.shape for Y in Ys], digest.hexdigest())
        prints = self.comm.allgather(fingerprint)
        if any(p != prints[0] for p in prints):
            raise ValueError("fit(distributed='mpi') needs the same X and y on every rank "
                             "(each rank takes its rows of every global batch itself); "
                             f"the ranks got different data: {prints}")

    def start(self, model, progress):
        """Every rank starts from rank 0's seed, weights, optimizer moments, counters,
        learning rate and first epoch (after rank 0's callbacks began: a BackupAndRestore
        there may have resumed an interrupted fit)."""
        network = model._network
        state = self.comm.bcast((network.seed, network.snapshot(), model.optimizer.learning_rate,
                                 progress.initial_epoch) if self.is_root else None, root=0)
        if not self.is_root:
            network.seed, snap, model.optimizer.learning_rate, progress.initial_epoch = state
            network.restore(snap)

    def root_decides(self, flag):
        """Rank 0's value of a decision (a callback's stop request), on every rank."""
        return bool(self.comm.bcast(bool(flag) if self.is_root else None, root=0))

    def follow_root(self, model, backend, plan, stop):
        """The end of an epoch: rank 0's stop decision, learning rate and state (what its
        callbacks may have changed) on every rank; returns the stop decision."""
        network = model._network
        state = self.comm.bcast((bool(stop), model.optimizer.learning_rate,
                                 network.snapshot()) if self.is_root else None, root=0)
        if not self.is_root:
            stop, model.optimizer.learning_rate, snap = state
            network.restore(snap)
            backend.invalidate(plan)
        return bool(state[0])

    def finish(self, model, history):
        """The end of the fit: rank 0's History and final state (after its callbacks'
        on_train_end, e.g. EarlyStopping's restored weights) on every rank."""
        network = model._network
        logs, epochs, snap = self.comm.bcast(
            (history.history, history.epoch, network.snapshot()) if self.is_root else None,
            root=0)
        if not self.is_root:
            history.history, history.epoch = logs, epochs
            network.restore(snap)
        return history


class ShardedBackend:
    """A backend whose train_epoch runs the reference epoch over the backend's own per-op
    kernels with the sharded step (kernels/reference/sharded.py); every other operation and
    hook is the backend's."""

    def __init__(self, backend, step):
        self.backend = backend
        self.step = step

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def train_epoch(self, plan, X, Y, perm, batch_size, step0, t0, lrs=None, zout=None):
        return reference_epoch.train_epoch(self.backend.module, plan, X, Y, perm, batch_size,
                                           step0, t0, lrs, zout, step_fn=self.step)
