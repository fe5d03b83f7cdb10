"""Callbacks and the History record of a fit; checkpoints and resuming (Keras' names and
semantics: EarlyStopping, ModelCheckpoint, BackupAndRestore)."""
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

    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_end(self, logs=None):
        pass


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


def _mode_sign(monitor, mode):
    """+1 when smaller is better, -1 when larger is (Keras' "auto": larger for accuracies)."""
    if mode == "max" or (mode == "auto" and "acc" in monitor):
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
        history = self._progress.history.history if self._progress is not None else {}
        saving.write_backup(self.model, self.path, epoch + 1, history)

    def on_train_end(self, logs=None):
        if self.delete_checkpoint and os.path.exists(self.path):
            os.unlink(self.path)
