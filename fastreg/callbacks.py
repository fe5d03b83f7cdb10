"""Callbacks and the History record of a fit; checkpoints and resuming (Keras' names and
semantics: EarlyStopping, ModelCheckpoint, BackupAndRestore, ReduceLROnPlateau,
LearningRateScheduler, CSVLogger, TerminateOnNaN, LambdaCallback).

The hooks a fit calls, in order: on_train_begin(logs); per epoch on_epoch_begin(epoch, logs),
then per chunk of batches on_train_batch_begin(batch, logs) and on_train_batch_end(batch,
logs), then on_epoch_end(epoch, logs); on_train_end(logs). fit runs an epoch's batches in
compiled chunks (fastreg/training.py), so the batch hooks are called once per chunk, with the
index of the chunk's first batch (begin) and last batch (end); the end's logs hold the
epoch's running "loss" so far. Setting model.stop_training in a batch hook ends the epoch
after that chunk (its logs then cover the batches trained), and the fit after it. An object
that is not a Callback but has some of these methods is accepted as one (duck typing); the
methods it lacks do nothing.
"""
import csv
import inspect
import math
import os

import numpy as np

from . import saving
from .validation import check_int, check_real


class Callback:
    """The base of fit's callbacks. After on_train_end, `report` may hold one line saying what
    the callback did (EarlyStopping: when it stopped, which weights it restored); fit's
    progress shows it at verbose > 0."""
    model = None
    report = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        pass

    def on_epoch_begin(self, epoch, logs=None):
        pass

    def on_train_batch_begin(self, batch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


HOOKS = ("on_train_begin", "on_epoch_begin", "on_train_batch_begin", "on_train_batch_end",
         "on_epoch_end", "on_train_end")


class _DuckCallback(Callback):
    """An object with some of the hook methods, as a Callback: its methods are called, the
    ones it lacks do nothing; set_model sets its .model when it has no set_model."""

    def __init__(self, obj):
        self.obj = obj
        for hook in HOOKS:
            method = getattr(obj, hook, None)
            if callable(method):
                setattr(self, hook, method)

    def set_model(self, model):
        self.model = model
        if callable(getattr(self.obj, "set_model", None)):
            self.obj.set_model(model)
        else:
            try:
                self.obj.model = model
            except AttributeError:      # a read-only object: its hooks get what they need
                pass

    @property
    def report(self):
        return getattr(self.obj, "report", None)


def as_callbacks(callbacks):
    """fit's callbacks argument as a list of Callbacks: None, or a list/tuple of Callback
    instances or objects with hook methods (HOOKS)."""
    if callbacks is None:
        return []
    if isinstance(callbacks, Callback) or any(callable(getattr(callbacks, h, None))
                                              for h in HOOKS):
        kind = type(callbacks).__name__
        raise TypeError(f"callbacks must be a list of callbacks, got a single {kind}: pass "
                        f"callbacks=[{kind}(...)]")
    if not isinstance(callbacks, (list, tuple)):
        raise TypeError(f"callbacks must be a list of fastreg Callback instances (or objects "
                        f"with on_epoch_end and the other hook methods), got "
                        f"{type(callbacks).__name__}")
    out = []
    for cb in callbacks:
        if isinstance(cb, Callback):
            out.append(cb)
        elif any(callable(getattr(cb, h, None)) for h in HOOKS):
            out.append(_DuckCallback(cb))
        else:
            raise TypeError(f"callbacks must be fastreg Callback instances or objects with "
                            f"hook methods ({', '.join(HOOKS)}), got {cb!r}")
    return out


class FitProgress:
    """What a fit tells its callbacks at on_train_begin (logs["fit"]): the History being
    written, and the epoch the fit starts at (BackupAndRestore moves it past the epochs a
    backup already holds)."""

    def __init__(self, history, epochs):
        self.history = history
        self.epochs = epochs
        self.initial_epoch = 0


class History(Callback):
    """history.history[key] is a list with one value per epoch: "loss" (data loss, mean over
    the epoch's batches), "penalty" (the regularization term, averaged the same way),
    "val_loss" (data loss on validation_data, dropout off)."""

    def __init__(self):
        self.history = {}
        self.epoch = []

    def on_epoch_end(self, epoch, logs=None):
        self.epoch.append(epoch)
        for k, v in (logs or {}).items():
            self.history.setdefault(k, []).append(v)


# metrics where larger is better (Keras 3's "auto" reads the metric's direction: up for
# these, down for losses and errors)
_LARGER_IS_BETTER = ("accuracy", "acc", "precision", "recall", "f1", "auc", "r2")


def _mode_sign(monitor, mode):
    """+1 when smaller is better, -1 when larger is ("auto": larger for the accuracy, precision,
    recall, f1, auc and r2 metrics, with or without val_)."""
    base = monitor[4:] if monitor.startswith("val_") else monitor
    if mode == "max" or (mode == "auto" and (base in _LARGER_IS_BETTER or "acc" in base)):
        return -1.0
    return 1.0


def _check_mode(mode):
    if mode not in ("auto", "min", "max"):
        raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
    return mode


def _check_monitor(monitor):
    if not isinstance(monitor, str):
        raise TypeError(f"monitor must be a metric name such as 'val_loss', got {monitor!r}")
    return monitor


def _check_monitor_available(who, monitor, logs):
    available = (logs or {}).get("available_metrics")
    if available is not None and monitor not in available:
        raise ValueError(f"{who} monitors {monitor!r}, which this fit does not report (it "
                         f"reports {sorted(available)}); pass validation_data to monitor "
                         f"val_loss")


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than min_delta for `patience` epochs.

    With restore_best_weights=True the best weights are restored when training ends, whether
    patience ran out or the epochs did. verbose=1 prints, at the end of training, when it
    stopped and which epoch's weights it restored (fit's own progress shows the same line).
    """

    def __init__(self, monitor="val_loss", patience=0, min_delta=0.0,
                 restore_best_weights=True, mode="auto", verbose=0):
        self.patience = check_int("patience", patience, 0, what="an integer >= 0")
        self.min_delta = check_real("min_delta", min_delta, 0.0)
        self.mode = _check_mode(mode)
        self.verbose = check_int("verbose", verbose, 0, 1, what="0 or 1")
        self.monitor = _check_monitor(monitor)
        self.restore_best_weights = bool(restore_best_weights)
        self.best = None
        self.best_epoch = None
        self.best_weights = None
        self.stopped_epoch = None
        self.wait = 0

    def on_train_begin(self, logs=None):
        _check_monitor_available("EarlyStopping", self.monitor, logs)
        self.best = None
        self.best_epoch = None
        self.best_weights = None
        self.stopped_epoch = None
        self.wait = 0
        self.report = None

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None or not np.isfinite(value):
            return
        s = _mode_sign(self.monitor, self.mode)
        if self.best is None or s * (value - self.best) < -self.min_delta:
            self.best = value
            self.best_epoch = epoch
            self.wait = 0
            if self.restore_best_weights:
                self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        restored = self.restore_best_weights and self.best_weights is not None
        if restored:
            self.model.set_weights(self.best_weights)
        parts = []
        if self.stopped_epoch is not None:
            parts.append(f"early stopping at epoch {self.stopped_epoch + 1}: {self.monitor} "
                         f"did not improve by more than {self.min_delta:g} for "
                         f"{self.patience} epoch(s)")
        if restored:
            parts.append(f"restored the weights of epoch {self.best_epoch + 1} "
                         f"({self.monitor} {self.best:.4g})")
        self.report = "; ".join(parts) or None
        if self.report and self.verbose:
            print(self.report)


def _check_save_freq(save_freq):
    if save_freq != "epoch":
        raise ValueError(f"save_freq must be 'epoch' (fastreg runs an epoch's batches in "
                         f"compiled chunks, without per-batch callbacks), got {save_freq!r}")
    return save_freq


def _check_path(name, path, what):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be {what}, got {path!r}")
    return os.fspath(path)


class ModelCheckpoint(Callback):
    """Save the model at the end of every epoch, or only when `monitor` improved.

    ModelCheckpoint(filepath, monitor="val_loss", verbose=0, save_best_only=False,
    save_weights_only=False, mode="auto", save_freq="epoch", initial_value_threshold=None),
    as Keras: filepath may hold format fields, the 1-based epoch and the epoch's logs, e.g.
    "ckpt-{epoch:02d}-{val_loss:.3f}.npz"; with save_best_only=True a file is written only
    when `monitor` is better than every earlier value (and than initial_value_threshold when
    given); mode "min"/"max"/"auto" (max for accuracies). save_weights_only=True writes
    model.save_weights(filepath) (read back with model.load_weights), else model.save
    (fr.load_model). Each write is atomic (a temporary file, then a rename).
    """

    def __init__(self, filepath, monitor="val_loss", verbose=0, save_best_only=False,
                 save_weights_only=False, mode="auto", save_freq="epoch",
                 initial_value_threshold=None):
        self.filepath = _check_path("filepath", filepath, "a path")
        self.monitor = _check_monitor(monitor)
        self.verbose = check_int("verbose", verbose, 0, 2, what="0, 1 or 2")
        self.save_best_only = bool(save_best_only)
        self.save_weights_only = bool(save_weights_only)
        self.mode = _check_mode(mode)
        self.save_freq = _check_save_freq(save_freq)
        self.initial_value_threshold = (None if initial_value_threshold is None else
                                        check_real("initial_value_threshold",
                                                   initial_value_threshold))
        self.best = None

    def on_train_begin(self, logs=None):
        if self.save_best_only:
            _check_monitor_available("ModelCheckpoint", self.monitor, logs)
        self.best = self.initial_value_threshold

    def _path(self, epoch, logs):
        try:
            return self.filepath.format(epoch=epoch + 1, **(logs or {}))
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"ModelCheckpoint filepath {self.filepath!r} names a field this "
                             f"fit does not report ({exc}); it reports epoch and "
                             f"{sorted(logs or {})}") from None

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        path = self._path(epoch, logs)
        if self.save_best_only:
            value = logs.get(self.monitor)
            if value is None or not math.isfinite(value):
                return
            s = _mode_sign(self.monitor, self.mode)
            if self.best is not None and not s * (value - self.best) < 0:
                if self.verbose:
                    print(f"Epoch {epoch + 1}: {self.monitor} did not improve from "
                          f"{self.best:.5g}")
                return
            if self.verbose:
                print(f"Epoch {epoch + 1}: {self.monitor} improved "
                      f"{'' if self.best is None else f'from {self.best:.5g} '}to "
                      f"{value:.5g}, saving the model to {path}")
            self.best = value
        elif self.verbose:
            print(f"Epoch {epoch + 1}: saving the model to {path}")
        if self.save_weights_only:
            self.model.save_weights(path)
        else:
            self.model.save(path)


class BackupAndRestore(Callback):
    """Resume a fit that was interrupted (Ctrl-C, a killed process), Keras' BackupAndRestore.

    BackupAndRestore(backup_dir, save_freq="epoch", delete_checkpoint=True): at the end of
    every epoch the model's whole training state (weights, optimizer moments, BatchNorm
    statistics, the step, optimizer-step, epoch and MC counters) and the fit's progress
    (epochs done, history) are written atomically to backup_dir/backup.npz. A fit that finds
    a backup there at its start restores it and runs only the epochs still to do, so the
    result is bitwise that of the fit that was never interrupted; its history holds every
    epoch. A successful fit deletes the backup (delete_checkpoint=True); an interrupted one
    leaves it. The backup must come from the same model (layers, input size, dtype, seed,
    loss, optimizer): anything else is a ValueError naming what differs.
    """

    FILE = "backup.npz"

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True):
        self.backup_dir = _check_path("backup_dir", backup_dir, "a directory path")
        self.save_freq = _check_save_freq(save_freq)
        self.delete_checkpoint = bool(delete_checkpoint)
        self._progress = None

    @property
    def path(self):
        return os.path.join(self.backup_dir, self.FILE)

    def on_train_begin(self, logs=None):
        self._progress = (logs or {}).get("fit")
        if not os.path.exists(self.path):
            return
        done, history = saving.read_backup(self.model, self.path)
        if self._progress is not None:
            self._progress.initial_epoch = done
            self._progress.history.history = {k: list(v) for k, v in history.items()}
            self._progress.history.epoch = list(range(done))

    def on_epoch_end(self, epoch, logs=None):
        os.makedirs(self.backup_dir, exist_ok=True)
        # History (last in the list) records this epoch after us: add its logs here
        history = {k: list(v) for k, v in
                   (self._progress.history.history if self._progress is not None else {}).items()}
        for k, v in (logs or {}).items():
            history.setdefault(k, []).append(v)
        saving.write_backup(self.model, self.path, epoch + 1, history)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.path):
            os.unlink(self.path)


def _optimizer_of(model, who):
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None:
        raise ValueError(f"{who} needs a compiled model (an optimizer's learning rate)")
    return optimizer


def _set_rate(optimizer, who, value):
    if optimizer.schedule is not None:
        raise TypeError(f"{who} sets the learning rate, but the optimizer's learning_rate is "
                        f"the schedule {optimizer.schedule!r}: use one or the other")
    optimizer.learning_rate = value


class LearningRateScheduler(Callback):
    """LearningRateScheduler(schedule, verbose=0), as Keras: at the start of every epoch the
    optimizer's learning rate becomes schedule(epoch, lr) (or schedule(epoch) for a
    one-argument function; epoch counts from 0), from that epoch's first step. The epoch's
    logs (History) hold "learning_rate"."""

    def __init__(self, schedule, verbose=0):
        if not callable(schedule):
            raise TypeError(f"schedule must be a function of (epoch, lr), got {schedule!r}")
        self.schedule = schedule
        self.verbose = check_int("verbose", verbose, 0, 1, what="0 or 1")
        try:
            params = inspect.signature(schedule).parameters.values()
            positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY,
                                                          p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
            self._two_arguments = (len(positional) >= 2
                                   or any(p.kind == p.VAR_POSITIONAL for p in positional))
        except (TypeError, ValueError):     # a builtin without a signature: Keras' form
            self._two_arguments = True

    def on_epoch_begin(self, epoch, logs=None):
        optimizer = _optimizer_of(self.model, "LearningRateScheduler")
        if optimizer.schedule is not None:
            _set_rate(optimizer, "LearningRateScheduler", None)     # raises, naming both
        lr = (self.schedule(epoch, float(optimizer.learning_rate)) if self._two_arguments
              else self.schedule(epoch))
        if isinstance(lr, bool) or not isinstance(lr, (int, float, np.integer, np.floating)) \
                or not math.isfinite(lr) or lr <= 0:
            raise ValueError(f"LearningRateScheduler: schedule({epoch}) returned {lr!r}; it "
                             f"must return a finite number > 0")
        _set_rate(optimizer, "LearningRateScheduler", float(lr))
        if self.verbose:
            print(f"Epoch {epoch + 1}: LearningRateScheduler setting learning rate to {lr:g}.")

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs["learning_rate"] = float(self.model.optimizer.learning_rate)


class ReduceLROnPlateau(Callback):
    """ReduceLROnPlateau(monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
    min_delta=1e-4, cooldown=0, min_lr=0.0), Keras 3's rule: when `monitor` has not improved
    by more than min_delta for `patience` epochs, lr <- max(lr * factor, min_lr) from the
    next step, then `cooldown` epochs without counting. The epoch's logs hold
    "learning_rate" (the rate the epoch trained with)."""

    def __init__(self, monitor="val_loss", factor=0.1, patience=10, verbose=0, mode="auto",
                 min_delta=1e-4, cooldown=0, min_lr=0.0):
        self.monitor = _check_monitor(monitor)
        self.factor = check_real("factor", factor, 0.0, 1.0, min_open=True, max_open=True)
        self.patience = check_int("patience", patience, 0, what="an integer >= 0")
        self.verbose = check_int("verbose", verbose, 0, 1, what="0 or 1")
        self.mode = _check_mode(mode)
        self.min_delta = check_real("min_delta", min_delta, 0.0)
        self.cooldown = check_int("cooldown", cooldown, 0, what="an integer >= 0")
        self.min_lr = check_real("min_lr", min_lr, 0.0)
        self._reset()

    def _reset(self):
        self.best = None
        self.wait = 0
        self.cooldown_counter = 0

    def on_train_begin(self, logs=None):
        _check_monitor_available("ReduceLROnPlateau", self.monitor, logs)
        self._reset()

    def on_epoch_end(self, epoch, logs=None):
        optimizer = _optimizer_of(self.model, "ReduceLROnPlateau")
        logs = logs if logs is not None else {}
        lr = float(optimizer.learning_rate)
        logs["learning_rate"] = lr
        value = logs.get(self.monitor)
        if value is None or not math.isfinite(value):
            return
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.wait = 0
        s = _mode_sign(self.monitor, self.mode)
        if self.best is None or s * (value - self.best) < -self.min_delta:
            self.best = value
            self.wait = 0
        elif self.cooldown_counter == 0:
            self.wait += 1
            if self.wait >= self.patience and lr > self.min_lr:
                new = max(lr * self.factor, self.min_lr)
                _set_rate(optimizer, "ReduceLROnPlateau", new)
                if self.verbose:
                    print(f"Epoch {epoch + 1}: ReduceLROnPlateau reducing learning rate to "
                          f"{new:g}.")
                self.cooldown_counter = self.cooldown
                self.wait = 0


class TerminateOnNaN(Callback):
    """Stop training when a loss in the logs is NaN or inf, as Keras. fit already stops on a
    non-finite training loss (restoring the last sound state, with a RuntimeWarning: see
    Trust); this callback also stops on a non-finite validation loss or metric, after the
    epoch it happened in, and on a non-finite running loss at a chunk's end."""

    def on_train_batch_end(self, batch, logs=None):
        self._check(logs, f"batch {batch}")

    def on_epoch_end(self, epoch, logs=None):
        self._check(logs, f"epoch {epoch + 1}")

    def _check(self, logs, where):
        for key, value in (logs or {}).items():
            if isinstance(value, float) and not math.isfinite(value):
                self.model.stop_training = True
                self.report = f"TerminateOnNaN: {key} was {value} at {where}; training stopped"
                return


class CSVLogger(Callback):
    """CSVLogger(filename, separator=",", append=False), as Keras: one row per epoch with
    "epoch" (from 0) and every key of the epoch's logs, in sorted order, header first
    (unless appending to a file that has rows). Written through the csv module, flushed
    every epoch."""

    def __init__(self, filename, separator=",", append=False):
        self.filename = _check_path("filename", filename, "a path")
        if not isinstance(separator, str) or len(separator) != 1:
            raise ValueError(f"separator must be one character, got {separator!r}")
        self.separator = separator
        self.append = bool(append)
        self._file = None
        self._writer = None
        self._keys = None

    def on_train_begin(self, logs=None):
        has_rows = (self.append and os.path.exists(self.filename)
                    and os.path.getsize(self.filename) > 0)
        self._file = open(self.filename, "a" if self.append else "w", newline="")
        self._keys = None
        self._header = not has_rows

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        if self._keys is None:
            self._keys = sorted(logs)
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch"] + self._keys,
                                          delimiter=self.separator, extrasaction="ignore",
                                          restval="NA")
            if self._header:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **{k: logs.get(k, "NA") for k in self._keys}})
        self._file.flush()

    def on_train_end(self, logs=None):
        if self._file is not None:
            self._file.close()
        self._file = self._writer = None


class LambdaCallback(Callback):
    """LambdaCallback(on_epoch_begin=None, on_epoch_end=None, on_train_begin=None,
    on_train_end=None, on_train_batch_begin=None, on_train_batch_end=None), as Keras: each
    given function is called at that hook with the hook's arguments (the batch hooks once
    per chunk of batches: the module docstring)."""

    def __init__(self, on_epoch_begin=None, on_epoch_end=None, on_train_begin=None,
                 on_train_end=None, on_train_batch_begin=None, on_train_batch_end=None):
        given = dict(on_epoch_begin=on_epoch_begin, on_epoch_end=on_epoch_end,
                     on_train_begin=on_train_begin, on_train_end=on_train_end,
                     on_train_batch_begin=on_train_batch_begin,
                     on_train_batch_end=on_train_batch_end)
        for hook, fn in given.items():
            if fn is None:
                continue
            if not callable(fn):
                raise TypeError(f"LambdaCallback {hook} must be a function, got {fn!r}")
            setattr(self, hook, fn)
