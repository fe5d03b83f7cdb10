"""The fit frame and the inference of both front ends (Sequential and MultiTask).

A front end validates what the user gave (its targets: an array, or a dict by head) and
hands the frame the network, the inputs and the targets of every head; the frame runs the
epochs through the backend's compiled epoch (kernels/<backend>/epoch: trunk and heads in one
call, no Python per step), in chunks of whole batches (same steps, same masks), with the
callbacks, the seeded shuffles, augmentation, the non-finite stop and the validation logs.

What the frame asks of a front end (both implement it):
    model._network                     the fastreg.network.Network
    model.optimizer, model.backend     what compile chose
    model._loss_logs(means)            {"loss": ..., ...} from the heads' mean losses
    model._augment_epoch(plans, X, Ys, perm, batch_size) -> (X, [Y per head])
    model._nonfinite_advice            the sentence the non-finite warning ends with
"""
import warnings

import numpy as np

from . import backend as backends
from .callbacks import Callback, History
from .kernels import mc
from .progress import EpochProgress
from .validation import as_features, check_positive_int

PREDICT_BATCH = 4096


# ---------------------------------------------------------------- arguments
def check_fit_arguments(epochs, batch_size, verbose, callbacks):
    """(epochs, batch_size, callbacks as a list), validated: what every fit takes."""
    epochs = check_positive_int("epochs", epochs)
    batch_size = check_positive_int("batch_size", batch_size)
    if verbose not in (0, 1, 2):
        raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
    callbacks = list(callbacks or [])
    for cb in callbacks:
        if not isinstance(cb, Callback):
            raise TypeError(f"callbacks must be fastreg Callback instances, got {cb!r}")
    return epochs, batch_size, callbacks


def validation_pair(validation_data, width, dtype, targets, what="(X_val, y_val)"):
    """(X_val, targets(y_val, n_rows)) from validation_data, or None."""
    if validation_data is None:
        return None
    if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
        raise ValueError(f"validation_data must be a tuple {what}")
    Xv = as_features(validation_data[0], "X_val", width, dtype)
    return Xv, targets(validation_data[1], Xv.shape[0], "y_val")


def check_mc_arguments(mc_samples, seed):
    """predict's (mc_samples, seed), validated (Sequential and MultiTask)."""
    if mc_samples is not None:
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, (int, np.integer)) \
                or mc_samples < 1:
            raise ValueError(f"mc_samples must be an integer >= 1 (dropout masks per row), "
                             f"got {mc_samples!r}")
        mc_samples = int(mc_samples)
    if seed is not None:
        if mc_samples is None:
            raise ValueError("seed only applies to MC dropout: pass mc_samples too")
        from .network import check_seed
        seed = check_seed(seed)
    return mc_samples, seed


# ---------------------------------------------------------------- the epoch loop's frame
def begin_training(model, callbacks, available):
    """History first, then the user's callbacks, each bound to the model and told which
    metrics the fit reports; returns (history, callbacks)."""
    history = History()
    cbs = [history] + list(callbacks)
    for cb in cbs:
        cb.set_model(model)
    for cb in cbs:
        cb.on_train_begin({"available_metrics": available})
    model.stop_training = False
    return history, cbs


def epoch_order(network, n, shuffle):
    """The rows of the next epoch in training order: seeded by (seed, epochs run)."""
    return (np.random.default_rng([network.seed, network.counters.epochs_run]).permutation(n)
            if shuffle else np.arange(n)).astype(np.int64)


def end_epoch(model, progress, cbs, epoch, logs):
    """Count the epoch, show it, tell the callbacks; True when one asked to stop."""
    model._network.counters.epochs_run += 1
    progress.end_epoch(epoch, logs)
    for cb in cbs:
        cb.on_epoch_end(epoch, logs)
    return model.stop_training


def end_training(model, history, cbs, progress):
    """Tell the callbacks, show what they report (unless they said it themselves), keep the
    history on the model."""
    for cb in cbs:
        cb.on_train_end({})
    for cb in cbs:
        if cb.report and not getattr(cb, "verbose", 0):
            progress.note(cb.report)
    model.history = history
    return history


def stop_on_nonfinite(model, epoch, steps_done, start_state, stacklevel=4):
    """After a non-finite batch loss: keep the last finite weights (the failing batch's update
    was skipped), or restore the epoch's starting weights if any parameter is not finite;
    then warn with the epoch and step (Keras' TerminateOnNaN, as a RuntimeWarning), pointed at
    the user's fit call (stacklevel: here <- run_fit <- fit <- caller)."""
    network = model._network
    where = "the last finite weights kept"
    store = network.store
    if not (np.isfinite(store.params).all() and np.isfinite(store.stats).all()):
        network.restore(start_state)
        where = "the weights restored to the start of that epoch"
    warnings.warn(f"the training loss became NaN or inf at epoch {epoch + 1} (step "
                  f"{steps_done + 1} of the epoch); training stopped with {where}. "
                  f"{model._nonfinite_advice}", RuntimeWarning, stacklevel=stacklevel)


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


def run_fit(model, X, Ys, epochs, batch_size, val, shuffle, callbacks, verbose, plans,
            available):
    """The epochs of a fit (module docstring); returns the History. X and Ys are validated;
    plans: the augmentation plans (one per head) or None; val: (X_val, [Y_val]) or None."""
    network = model._network
    backend = backends.get(model.backend)
    history, cbs = begin_training(model, callbacks, available)
    n = X.shape[0]
    batch = min(batch_size, n)
    widths = target_widths(network, Ys)
    if plans:   # the targets trained on: (label, label, lam) after a Mixup of sparse labels
        from . import augment as augmentation
        for p, plan in zip(network.heads, plans):
            widths[p] = augmentation.target_width(plan, widths[p])
    plan = network.training_plan(model.optimizer, batch, widths)
    Y = side_by_side(Ys)
    heads = network.heads
    counters = network.counters
    n_batches = -(-n // batch_size)
    progress = EpochProgress(epochs, n_batches, verbose)
    try:
        for epoch in range(epochs):
            perm = epoch_order(network, n, shuffle)
            Xe, Ye = X, Y
            if plans:
                # The epoch's rows in training order, augmented as its batches (fresh arrays
                # each epoch: the CUDA backend re-uploads a new array, not a reused one); the
                # compiled loop then walks them in order.
                Xe, Yes = model._augment_epoch(plans, X, Ys, perm, batch_size)
                Ye = side_by_side(Yes)
                perm = np.arange(n, dtype=np.int64)
            start_state = network.snapshot()
            sums = np.zeros(len(network.parts))
            pen_sum = 0.0
            steps_done = 0
            finite = True
            for first, last in progress.chunks(epoch):
                with backend.epoch_context(plan):
                    ls, ps, steps, finite = backend.train_epoch(
                        plan, Xe, Ye, perm[first * batch_size:last * batch_size], batch_size,
                        counters.step, counters.t + 1)
                sums += ls
                pen_sum += ps
                steps_done += steps
                counters.step += steps
                counters.t += steps
                rows = min(n, (first + steps) * batch_size) if steps else 1
                progress.update(epoch, first + steps,
                                model._loss_logs(sums[heads] / max(rows, 1))["loss"])
                if not finite:
                    break
            backend.sync_to_host(plan)
            if not finite:
                stop_on_nonfinite(model, epoch, steps_done, start_state)
                break
            logs = model._loss_logs(sums[heads] / n)
            logs["penalty"] = pen_sum / n
            if val is not None:
                logs.update({f"val_{k}": v for k, v in evaluate(model, *val).items()})
            if end_epoch(model, progress, cbs, epoch, logs):
                break
    finally:
        progress.close()
    return end_training(model, history, cbs, progress)


# ---------------------------------------------------------------- inference
def inference_backend(model):
    """The compiled backend, or the default one for a model not compiled yet."""
    return backends.get(model.backend)


def head_logits(model, X, batch_size=None):
    """[logits of every head] for X, dropout and noise off, BatchNorm folded: the trunk once
    per chunk, then every head on its output."""
    network = model._network
    backend = inference_backend(model)
    plan = network.inference_plan(model.optimizer)
    batch_size = batch_size or PREDICT_BATCH
    if len(network.parts) == 1:
        return [backend.forward_inference(plan, X, batch_size, 0)]
    out = [np.empty((X.shape[0], network.n_outputs(p)), network.dtype) for p in network.heads]
    chunk = max(batch_size, PREDICT_BATCH)   # bounds the trunk's output held at once
    for start in range(0, X.shape[0], chunk):
        H = backend.forward_inference(plan, X[start:start + chunk], batch_size, 0)
        for o, p in zip(out, network.heads):
            o[start:start + H.shape[0]] = backend.forward_inference(plan, H, batch_size, p)
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


def evaluate(model, X, Ys, batch_size=None):
    """The data losses on (X, Ys), dropout off: the front end's logs of the heads' losses."""
    backend = inference_backend(model)
    means = np.array([float(backend.loss_value(z, Y, loss, param)) for z, Y, loss, param in
                      zip(head_logits(model, X, batch_size), Ys, head_losses(model),
                          head_loss_params(model))])
    return model._loss_logs(means)


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
