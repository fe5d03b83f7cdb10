"""The fit frame and the inference of both front ends (Sequential and MultiTask).

A front end validates what the user gave (its targets: an array, or a dict by head) and
hands the frame the network, the inputs and the targets of every head; the frame runs the
epochs through the backend's compiled epoch (kernels/<backend>/epoch: trunk and heads in one
call, no Python per step), in chunks of whole batches (same steps, same masks), with the
callbacks, the seeded shuffles, augmentation, the state checks and the validation logs.

What a fit promises (`fit`): bad input raises before anything changes; a Ctrl-C stops the
fit between two chunks of batches and propagates, leaving the state of the last completed
step; any other exception puts the model back as it was; a state that is not sound at an
epoch's end (or a non-finite training loss) is replaced by the last sound one, with a
RuntimeWarning (FitFrame).

What the frame asks of a front end (both implement it):
    model._network                     the fastreg.network.Network
    model.optimizer, model.backend     what compile chose
    model.build(input_dim)             its weights from the seed (an unbuilt model's first fit)
    model._loss_logs(means)            {"loss": ..., ...} from the heads' mean losses
    model._augment_epoch(plans, X, Ys, perm, batch_size) -> (X, [Y per head])
    model._nonfinite_advice            the sentence the non-finite warning ends with
"""
import os
import sys
import warnings

import numpy as np

from . import backend as backends
from . import interrupts
from .callbacks import FitProgress, History, as_callbacks
from .kernels import contract
from .kernels import mc
from .progress import EpochProgress
from .validation import (as_chunk, as_features, check_int, check_positive_int, check_real,
                         check_seed, check_verbose, chunk_rows)

PREDICT_BATCH = 4096
# Multiply-adds of one chunk of training batches (a step costs about 3x its forward pass):
# the frame hands the backend an epoch a chunk at a time and acts on a Ctrl-C between
# chunks, so a chunk must be short (milliseconds on the compiled CPU backends, ~0.1 s on the
# NumPy reference). Chunks are whole batches: how an epoch is cut changes no result.
CHUNK_MACS = 1 << 27


# ---------------------------------------------------------------- arguments
def check_fit_arguments(epochs, batch_size, verbose, callbacks):
    """(epochs, batch_size, verbose, callbacks as a list), validated: what every fit takes."""
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    return epochs, batch_size, check_verbose(verbose), as_callbacks(callbacks)


def validation_pair(validation_data, width, dtype, targets, what="(X_val, y_val)",
                    sample_weights=None):
    """(X_val, targets(y_val, n_rows)) from validation_data, or (X_val, [Y_val], [w_val])
    from (X_val, y_val, w_val) (sample_weights(w_val, n_rows) checks the weights), or
    None."""
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) not in (2, 3):
        raise ValueError(f"validation_data must be a tuple {what} (or with the validation "
                         f"sample weights third)")
    Xv = as_features(validation_data[0], "X_val", width, dtype)
    Yv = targets(validation_data[1], Xv.shape[0], "y_val")
    if len(validation_data) == 2:
        return Xv, Yv
    if sample_weights is None:
        raise ValueError("validation sample weights are not supported here")
    return Xv, Yv, sample_weights(validation_data[2], Xv.shape[0], "validation sample_weight")


def split_validation(X, Ys, validation_split, has_validation_data, weights=None):
    """(X, Ys, val, weights): with validation_split=f > 0 the last int(n * f) rows (Keras:
    taken before any shuffling) become val = (X_val, [Y_val per head], [w_val per head]) and
    are not trained on (nor are their sample weights); else val is None. Ys are the
    validated targets, one array per head; weights None or one array (or None) per head."""
    f = check_real("validation_split", validation_split, 0.0, 1.0, max_open=True)
    if f == 0.0:
        return X, Ys, None, weights
    if has_validation_data:
        raise ValueError("pass validation_split or validation_data, not both")
    n = X.shape[0]
    n_val = int(n * f)
    if n_val == 0 or n_val == n:
        raise ValueError(f"validation_split={f:g} of {n} rows leaves {n - n_val} to train "
                         f"on and {n_val} to validate: both need at least one")
    cut = n - n_val
    if weights is None:
        return X[:cut], [Y[:cut] for Y in Ys], (X[cut:], [Y[cut:] for Y in Ys]), None
    return (X[:cut], [Y[:cut] for Y in Ys],
            (X[cut:], [Y[cut:] for Y in Ys], [None if w is None else w[cut:] for w in weights]),
            [None if w is None else w[:cut] for w in weights])


def check_mc_arguments(mc_samples, seed):
    """predict's (mc_samples, seed), validated (Sequential and MultiTask)."""
    if mc_samples is not None:
        mc_samples = check_int("mc_samples", mc_samples, 1,
                               what="an integer >= 1 (dropout masks per row)")
    if seed is not None:
        if mc_samples is None:
            raise ValueError("seed only applies to MC dropout: pass mc_samples too")
        seed = check_seed("seed", seed)
    return mc_samples, seed


# ---------------------------------------------------------------- the epoch loop's frame
def begin_training(model, callbacks, available, epochs):
    """The user's callbacks, then History, each bound to the model and told which
    metrics the fit reports and (logs["fit"]) the fit's progress, which BackupAndRestore may
    move past the epochs of a backup; returns (history, callbacks, progress)."""
    history = History()
    cbs = list(callbacks) + [history]   # History last, as Keras: it records the logs as the
    #                                     callbacks left them (ReduceLROnPlateau's learning_rate)
    progress = FitProgress(history, epochs)
    for cb in cbs:
        cb.set_model(model)
    for cb in cbs:
        cb.on_train_begin({"available_metrics": available, "fit": progress})
    model.stop_training = False
    return history, cbs, progress


def epoch_order(network, n, shuffle):
    """The rows of the next epoch in training order: seeded by (seed, epochs run)."""
    return (np.random.default_rng([network.seed, network.counters.epochs_run]).permutation(n)
            if shuffle else np.arange(n, dtype=np.int64)).astype(np.int64, copy=False)


def chunk_batches(batch, kernels):
    """Batches per chunk of an epoch: about CHUNK_MACS multiply-adds, at least one batch."""
    macs = 3 * int(batch) * sum(int(W.size) for W in kernels)
    return max(1, CHUNK_MACS // max(1, macs))


def end_epoch(model, progress, cbs, epoch, logs):
    """Count the epoch, show it, tell the callbacks; True when one asked to stop."""
    model._network.counters.epochs_run += 1
    progress.end_epoch(epoch, logs)
    for cb in cbs:
        cb.on_epoch_end(epoch, logs)
    return model.stop_training


def end_training(model, history, cbs, progress):
    """Keep the history on the model (first: a Ctrl-C during the callbacks still finds it),
    tell the callbacks, show what they report (unless they said it themselves)."""
    model.history = history
    for cb in cbs:
        cb.on_train_end({})
    for cb in cbs:
        if cb.report and not getattr(cb, "verbose", 0):
            progress.note(cb.report)
    return history


class FitFrame:
    """The state checks of a fit.

    `good` is the last state known to be sound: snapshot at the end of each epoch once it is
    checked, before the callbacks see it (the state the fit started from before the first).
    A state is sound when every parameter, BatchNorm statistic and optimizer moment is
    finite (second moments and variances >= 0 by construction) and the data loss of the last
    completed batch, dropout off, is finite. It is checked at the end of every epoch and when
    a Ctrl-C stops the fit; a state that fails, or a training loss that became NaN or inf, is
    replaced by `good`, with a RuntimeWarning saying which state that is.

    Used as a context manager around the epochs: a KeyboardInterrupt leaving it (raised at a
    chunk boundary by the guard, or by a callback) brings the device state to the host,
    checks it, sets model.history to the completed epochs and propagates.
    """

    def __init__(self, model, backend, plan, history):
        self.model = model
        self.network = model._network
        self.backend = backend
        self.plan = plan
        self.history = history
        self.good = None
        self.good_label = "those from before this fit"
        self.last = None            # (X, [Y per head], rows) of the last completed batch
        self.checked = True         # the current state is the one last checked
        self.on_device = False      # chunks ran since the device state was last synced

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, KeyboardInterrupt):
            self.sync()
            if not self.checked and self.good is not None and not self._sound():
                self._restore_good("the state at the Ctrl-C was not finite (or gave a NaN or "
                                   "inf loss on its last batch)")
            self.model.history = self.history
        return False

    def begin_epoch(self, initial_epoch):
        if self.good is None:       # the first epoch of the fit: the state it starts from
            self.good = self.network.snapshot()
            if initial_epoch:
                self.good_label = "those at the start of this fit (the backup's)"
        self.checked = True

    def completed(self, X, Ys, perm, batches_done, batch_size):
        """A chunk done: batches [0, batches_done) of the epoch's order `perm` are trained."""
        if batches_done:
            lo = (batches_done - 1) * batch_size
            self.last = (X, Ys, perm[lo:lo + batch_size])
            self.checked = False
            self.on_device = True

    def sync(self):
        if self.on_device:
            self.backend.sync_to_host(self.plan)
            self.on_device = False

    def _sound(self):
        if not self.network.store.finite():
            return False
        if self.last is None:
            return True
        X, Ys, rows = self.last
        with np.errstate(all="ignore"):
            # on the NumPy reference: one batch costs milliseconds there, and a first fit on
            # Numba does not compile its inference and loss entry points for this check
            means = head_loss_means(self.model, X[rows], [Y[rows] for Y in Ys],
                                    backend=backends.get("numpy"))
        return bool(np.isfinite(means).all())

    def verify(self, epoch):
        """At an epoch's end: True when sound (the state becomes `good`, before any callback
        sees it), else restore `good`, warn, False."""
        if self._sound():
            self.checked = True
            self.good = self.network.snapshot()
            self.good["counters"].epochs_run += 1   # the epoch it closes (end_epoch counts it)
            self.good_label = (f"those at the end of epoch {epoch + 1}, the last that were "
                               f"finite and gave a finite loss on its last batch")
            return True
        self._restore_good(f"at the end of epoch {epoch + 1} the weights or optimizer state "
                           f"were NaN or inf, or gave a NaN or inf loss on the epoch's last "
                           f"batch")
        return False

    def stop(self, reason):
        """A non-finite training loss: restore `good` and warn."""
        self._restore_good(reason)

    def _restore_good(self, reason):
        if self.good is not None:
            self.network.restore(self.good)
            self.backend.invalidate(self.plan)     # the device copies are not the host's now
            self.on_device = False
        self.checked = True
        warnings.warn(f"{reason}; training stopped with the weights, optimizer state and "
                      f"counters restored to {self.good_label}. {self.model._nonfinite_advice}",
                      RuntimeWarning, stacklevel=_user_stacklevel())


def _user_stacklevel():
    """The stacklevel of the first frame outside fastreg (the user's fit call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None:
        where = os.path.dirname(os.path.abspath(frame.f_code.co_filename))
        if where != here and not where.startswith(here + os.sep):
            break
        frame, level = frame.f_back, level + 1
    return level


def target_widths(network, Ys):
    """The target width of every part (0 for a trunk under heads) for arrays Ys (one per
    head, in head order)."""
    widths = [0] * len(network.parts)
    for p, Y in zip(network.heads, Ys):
        widths[p] = Y.shape[1]
    return widths


def side_by_side(Ys):
    """The heads' targets as one C-contiguous array (columns [PT_Y0, PT_Y1) per head)."""
    return Ys[0] if len(Ys) == 1 else np.ascontiguousarray(np.hstack(Ys))


def fit(model, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose, plans, available,
        weights=None, dist=None):
    """A fit of a front end (module docstring): X and Ys validated (arrays; one Y per head),
    plans the augmentation plans (one per head) or None, val (X_val, [Y_val]) or (X_val,
    [Y_val], [w_val or None]) or None, `available` the metrics the fit reports, weights
    None or one (n,) sample-weight array (or None) per head, dist None or the MPI job of a
    data-parallel fit (fastreg/distributed.py, checked). Returns the History.

    A Ctrl-C is held until a chunk of batches is done (fastreg/interrupts.py), then
    propagates as KeyboardInterrupt with the state of the last completed step (weights,
    optimizer moments and counters; model.history the completed epochs); any other exception
    puts the model back as it was before the fit."""
    network = model._network
    with interrupts.deferred() as guard:
        snapshot = network.snapshot()
        try:
            if not network.built:
                model.build(X.shape[1])
            return run_fit(model, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose,
                           plans, available, guard, weights, dist)
        except KeyboardInterrupt:
            raise       # the state of the last completed step, kept (FitFrame)
        except BaseException:
            network.restore(snapshot)
            raise


def weight_columns(network, Ys, widths, weights):
    """(W, weight_cols): the heads' sample weights as columns to append to the side-by-side
    targets (W (n, k) or None) and each part's weight column in that Y (-1: none)."""
    cols = [-1] * len(network.parts)
    if weights is None or all(w is None for w in weights):
        return None, None
    base = sum(widths)
    given = [(p, w) for p, w in zip(network.heads, weights) if w is not None]
    for k, (p, _) in enumerate(given):
        cols[p] = base + k
    dtype = Ys[0].dtype
    return np.stack([np.asarray(w, dtype) for _, w in given], axis=1), cols


class RunningMetrics:
    """The training-set metrics of an epoch, as Keras reports them: computed at the epoch's
    end on the logits every row had in its own training step (dropout on, before that
    step's update), which the compiled epoch hands back (train_epoch's zout, PT_Z0): no
    second pass over the training data."""

    def __init__(self, model, network, n):
        self.metrics = list(getattr(model, "_metric_list", []))
        self.z_cols = None
        if not self.metrics:
            return
        self.z_cols = [-1] * len(network.parts)
        self.cols = {}
        width = 0
        for h, _, _ in self.metrics:
            p = network.heads[h]
            self.z_cols[p] = width
            self.cols[h] = (width, width + network.n_outputs(p))
            width += network.n_outputs(p)
        self.Z = np.zeros((n, width), network.dtype)
        self.losses = head_losses(model)
        self.model = model

    def chunk(self, first_row, rows):
        """The zout of a chunk of `rows` rows starting at row first_row of the epoch."""
        return None if self.z_cols is None else self.Z[first_row:first_row + rows]

    def logs(self, Ys, perm, rows):
        """{prefix + name: value} over the epoch's first `rows` trained rows (perm order)."""
        if self.z_cols is None:
            return {}
        backend = inference_backend(self.model)
        order = perm[:rows]
        out = {}
        for h, prefix, metrics in self.metrics:
            a, b = self.cols[h]
            y_pred = backend.output_transform(self.Z[:rows, a:b], self.losses[h])
            y_true = Ys[h][order]
            if self.losses[h] == contract.LOSS_SCE and y_true.shape[1] == contract.SCE_MIXED_WIDTH:
                y_true = y_true[:, :1]      # Mixup's (label, partner, lam): the row's label
            for metric in metrics:
                out[prefix + metric.name] = metric(y_true, y_pred)
        return out


def with_weights(Y, W):
    """The side-by-side targets with the weight columns appended (Y itself without)."""
    return Y if W is None else np.ascontiguousarray(np.hstack([Y, W]))


def run_fit(model, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose, plans,
            available, guard, weights=None, dist=None):
    """The epochs of a fit (fit's arguments; guard: the Ctrl-C guard, checked between
    chunks). Under MPI (dist) every rank runs these epochs in step, on its shard of every
    batch; rank 0 alone has the callbacks, the validation and the display, and its
    decisions are broadcast (fastreg/distributed.py)."""
    network = model._network
    backend = backends.get(model.backend)
    if dist is not None:
        backend = dist.epoch_backend(backend)
        if not dist.is_root:
            callbacks, verbose, val = [], 0, None
    history, cbs, fit_progress = begin_training(model, callbacks, available, epochs)
    if dist is not None:    # after rank 0's on_train_begin (BackupAndRestore may resume)
        dist.start(model, fit_progress)
    n = X.shape[0]
    batch_size = min(batch_size, n)     # a batch of more rows than X has: all of them
    widths = target_widths(network, Ys)
    if plans:   # the targets trained on: (label, label, lam) after a Mixup of sparse labels
        from . import augment as augmentation
        for p, plan in zip(network.heads, plans):
            widths[p] = augmentation.target_width(plan, widths[p])
    W, weight_cols = weight_columns(network, Ys, widths, weights)
    train_metrics = RunningMetrics(model, network, n)
    plan = network.training_plan(model.optimizer, batch_size, widths, weight_cols,
                                 train_metrics.z_cols)
    Y = with_weights(side_by_side(Ys), W)
    heads = network.heads
    counters = network.counters
    n_batches = -(-n // batch_size)
    per_chunk = chunk_batches(batch_size, plan.Ws)
    progress = EpochProgress(epochs, n_batches, verbose)
    frame = FitFrame(model, backend, plan, history)
    try:
        with backend.epoch_context(plan), frame:   # the thread policy: once per fit
            for epoch in range(fit_progress.initial_epoch, epochs):
                guard.check()           # a Ctrl-C during the last epoch's end acts here
                perm = epoch_order(network, n, shuffle)
                Xe, Yes, Ye = X, Ys, Y
                if plans:
                    # The epoch's rows in training order, augmented as its batches (fresh
                    # arrays each epoch: the CUDA backend re-uploads a new array, not a reused
                    # one); the compiled loop then walks them in order.
                    Xe, Yes = model._augment_epoch(plans, X, Ys, perm, batch_size)
                    Ye = with_weights(side_by_side(Yes), None if W is None else W[perm])
                    perm = np.arange(n, dtype=np.int64)
                frame.begin_epoch(fit_progress.initial_epoch)
                for cb in cbs:
                    cb.on_epoch_begin(epoch, {})
                sums = np.zeros(len(network.parts))
                pen_sum = 0.0
                steps_done = 0
                rows = 0
                finite = True
                for first, last in progress.chunks(epoch, per_chunk):
                    for cb in cbs:
                        cb.on_train_batch_begin(first, {})
                    # the optimizer's rate for every step of the chunk, read now: a schedule,
                    # or a rate a callback assigned, applies from the next step
                    lrs = model.optimizer.step_rates(counters.t, last - first)
                    chunk = perm[first * batch_size:last * batch_size]
                    ls, ps, steps, finite = backend.train_epoch(
                        plan, Xe, Ye, chunk, batch_size, counters.step, counters.t + 1, lrs,
                        train_metrics.chunk(first * batch_size, len(chunk)))
                    sums += ls
                    pen_sum += ps
                    steps_done += steps
                    counters.step += steps
                    counters.t += steps
                    frame.completed(Xe, Yes, perm, first + steps, batch_size)
                    rows = min(n, (first + steps) * batch_size)
                    running = model._loss_logs(sums[heads] / max(rows, 1))["loss"]
                    progress.update(epoch, first + steps, running)
                    if not finite:
                        break
                    for cb in cbs:
                        cb.on_train_batch_end(first + steps - 1, {"loss": running})
                    if dist is not None:    # rank 0's batch hooks decide for every rank
                        model.stop_training = dist.root_decides(model.stop_training)
                    guard.check()       # a Ctrl-C acts here, between whole chunks
                    if model.stop_training:     # a batch hook asked: the epoch ends here
                        break
                frame.sync()
                if not finite:
                    frame.stop(f"the training loss became NaN or inf at epoch {epoch + 1} "
                               f"(step {steps_done + 1} of the epoch)")
                    break
                if not frame.verify(epoch):
                    break
                logs = model._loss_logs(sums[heads] / max(rows, 1))    # the rows trained
                logs["penalty"] = pen_sum / max(rows, 1)
                logs.update(train_metrics.logs(Yes, perm, rows))
                if val is not None:
                    logs.update({f"val_{k}": v for k, v in
                                 evaluate(model, val[0], val[1], None,
                                          val[2] if len(val) > 2 else None).items()})
                stop = end_epoch(model, progress, cbs, epoch, logs)
                if dist is not None:
                    stop = dist.follow_root(model, backend, plan, stop)
                if stop:
                    break
    finally:
        progress.close()
    history = end_training(model, history, cbs, progress)
    return history if dist is None else dist.finish(model, history)


# ---------------------------------------------------------------- inference
def inference_backend(model):
    """The compiled backend, or the default one for a model not compiled yet."""
    return backends.get(model.backend)


def head_logits(model, X, batch_size=None, backend=None):
    """[logits of every head] for X, dropout and noise off, BatchNorm folded: the trunk once
    per chunk, then every head on its output. X is any real 2-D array of the model's width:
    each chunk of rows is converted to the model dtype on its own (a view when X already is
    C-contiguous in it), never all of X at once; between chunks a pending Ctrl-C of an
    enclosing fit is acted on. backend: the model's (inference_backend) unless given."""
    network = model._network
    backend = backend or inference_backend(model)
    plan = network.inference_plan(model.optimizer)
    n = X.shape[0]
    batch_size = max(1, min(batch_size or PREDICT_BATCH, n))
    if len(network.parts) == 1:     # chunks of whole batches: each batch the same call
        chunk = max(1, chunk_rows(X.shape[1], network.dtype) // batch_size) * batch_size
    else:                           # bounds the trunk's output held at once
        chunk = max(batch_size, PREDICT_BATCH)
    out = [np.empty((n, network.n_outputs(p)), network.dtype) for p in network.heads]
    for start in range(0, n, chunk):
        if start:
            interrupts.check()
        x = as_chunk(X, start, start + chunk, network.dtype)
        if len(network.parts) == 1:
            out[0][start:start + x.shape[0]] = backend.forward_inference(plan, x, batch_size, 0)
        else:
            H = backend.forward_inference(plan, x, batch_size, 0)
            for o, p in zip(out, network.heads):
                o[start:start + H.shape[0]] = backend.forward_inference(plan, H, batch_size, p)
            del H
        del x       # before the next chunk is converted: one chunk at a time
    return out


def head_losses(model):
    """The loss code of every head (for a Sequential not compiled yet: outputs as they are,
    or their softmax after a "softmax" last Dense: Network.output_loss)."""
    return [model._network.output_loss(p) for p in model._network.heads]


def head_loss_params(model):
    """The loss parameter of every head (contract PF_LOSS_PARAM)."""
    return [model._network.parts[p].loss_param for p in model._network.heads]


def predict_heads(model, X, batch_size=None):
    """[outputs of every head]: probabilities for the cross-entropies."""
    backend = inference_backend(model)
    return [backend.output_transform(z, loss)
            for z, loss in zip(head_logits(model, X, batch_size), head_losses(model))]


def head_loss_means(model, X, Ys, batch_size=None, backend=None):
    """The data loss of every head on (X, Ys), dropout off, in head order."""
    backend = backend or inference_backend(model)
    return np.array([float(backend.loss_value(z, Y, loss, param)) for z, Y, loss, param in
                     zip(head_logits(model, X, batch_size, backend), Ys, head_losses(model),
                         head_loss_params(model))])


def weighted_loss_value(z, Y, loss, param, w):
    """sum_r w_r l_r / n (fit's weighted batch loss, Keras' sum over the batch size) on the
    host, row by row through the reference kernel (evaluation, not a hot path)."""
    from .kernels.reference.loss import loss_value
    total = 0.0
    for r in range(z.shape[0]):
        if w[r] != 0:
            total += float(w[r]) * float(loss_value(z[r:r + 1], Y[r:r + 1], loss, param))
    return total / z.shape[0]


def evaluate(model, X, Ys, batch_size=None, weights=None):
    """The data losses on (X, Ys), dropout off (the front end's logs of the heads' losses),
    and the compiled metrics (model._metric_list) on the same pass's predictions; weights:
    None or one (n,) sample-weight array (or None) per head, for the losses."""
    backend = inference_backend(model)
    losses = head_losses(model)
    logits = head_logits(model, X, batch_size)
    weights = weights or [None] * len(Ys)
    logs = model._loss_logs(np.array([
        float(backend.loss_value(z, Y, loss, param)) if w is None
        else weighted_loss_value(z, Y, loss, param, w)
        for z, Y, loss, param, w in zip(logits, Ys, losses, head_loss_params(model), weights)]))
    for h, prefix, metrics in getattr(model, "_metric_list", []):
        y_pred = backend.output_transform(logits[h], losses[h])
        for metric in metrics:
            logs[prefix + metric.name] = metric(Ys[h], y_pred)
    return logs


def predict_mc(model, X, n_samples, seed):
    """[(mean, std) of every head] over n_samples MC-dropout passes (kernels/mc.py): seed=s
    draws a pure function of (weights, X, n, s); seed=None the model's seed and its MC pass
    counter, which advances."""
    network = model._network
    backend = inference_backend(model)
    plan = network.inference_plan(model.optimizer)
    key, step0 = ((network.seed, network.counters.mc_step) if seed is None else (seed, 0))
    if not plan.has_dropout():      # every sample is the plain forward: std exactly 0
        single = len(network.parts) == 1
        means = predict_heads(model, X, mc.MC_STACK_ROWS if single else None)
        return [(m, np.zeros_like(m)) for m in means]
    out, passes = mc.mc_dropout(backend, plan, X, n_samples, key, step0, head_losses(model))
    if seed is None:
        network.counters.mc_step = (network.counters.mc_step + passes) % 2 ** 32
    return out
