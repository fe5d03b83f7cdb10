"""Callbacks and the History record of a fit."""
import numpy as np

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
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.verbose = check_int("verbose", verbose, 0, 1, what="0 or 1")
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a metric name such as 'val_loss', got {monitor!r}")
        self.monitor = monitor
        self.restore_best_weights = bool(restore_best_weights)
        self.mode = mode
        self.best = None
        self.best_epoch = None
        self.best_weights = None
        self.stopped_epoch = None
        self.wait = 0

    def _sign(self):
        if self.mode == "max" or (self.mode == "auto" and "acc" in self.monitor):
            return -1.0
        return 1.0

    def on_train_begin(self, logs=None):
        available = (logs or {}).get("available_metrics")
        if available is not None and self.monitor not in available:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this fit does not "
                             f"report (it reports {sorted(available)}); pass validation_data "
                             f"to monitor val_loss")
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
        s = self._sign()
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
