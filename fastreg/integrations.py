"""Integrations with other engines' training loops. Each engine stays optional: it is imported
when one of these objects is created, never by `import fastreg`.

OptunaPruningCallback(trial, monitor="val_loss"): reports a metric to an Optuna trial after
every epoch and stops the trial when Optuna's pruner says it is not promising.

    import optuna

    def objective(trial):
        model = fr.Sequential([fr.Dense(64, "relu", dropout=trial.suggest_float("p", 0, 0.5),
                                        regularizer=fr.L2(trial.suggest_float("l2", 1e-6, 1e-1,
                                                                              log=True))),
                               fr.Dense(1)], input_dim=X.shape[1], seed=0)
        model.compile(loss="mse", optimizer=fr.Adam(1e-3))
        h = model.fit(X, y, epochs=50, validation_data=(Xv, yv), verbose=0,
                      callbacks=[fr.integrations.OptunaPruningCallback(trial, "val_loss")])
        return min(h.history["val_loss"])

    study = optuna.create_study(direction="minimize", pruner=optuna.pruners.MedianPruner())
    study.optimize(objective, n_trials=30)

A full study: docs/examples/optuna_study.py.
"""
import math

from .callbacks import Callback


class OptunaPruningCallback(Callback):
    """Report `monitor` to an Optuna trial after each epoch; prune when the trial asks.

    trial: an optuna.trial.Trial (anything with report(value, step) and should_prune()).
    monitor: a metric of the fit's logs: "val_loss" (needs validation_data), "loss",
    "penalty", or for a MultiTask "val_loss_<head>" / "loss_<head>"; a metric the fit does
    not report is an error when training begins. The step reported is the number of epochs
    this callback has seen (the epoch within one fit; it keeps counting across fits, so a
    trial that trains in stages reports distinct steps). A non-finite value is reported as
    it is (Optuna's pruners treat NaN as the worst value).

    When the trial's pruner says to stop, on_epoch_end raises optuna.TrialPruned (as Optuna's
    own Keras and PyTorch Lightning callbacks do): the fit ends, leaves the model as it was
    before that fit (fastreg's rule for a fit that raises), and study.optimize records the
    trial as pruned. `pruned_at` keeps the step at which that happened (None otherwise). The
    study's direction must match the metric: "minimize" for the losses.
    """

    def __init__(self, trial, monitor="val_loss"):
        try:
            import optuna
        except ImportError as exc:
            raise ImportError("OptunaPruningCallback needs Optuna: pip install "
                              "\"fastreg[optuna]\"") from exc
        if not (callable(getattr(trial, "report", None))
                and callable(getattr(trial, "should_prune", None))):
            raise TypeError(f"trial must be an optuna Trial (with report and should_prune), "
                            f"got {trial!r}")
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a metric name such as 'val_loss', got "
                            f"{monitor!r}")
        self._pruned_error = optuna.TrialPruned
        self.trial = trial
        self.monitor = monitor
        self.step = 0
        self.pruned_at = None

    def on_train_begin(self, logs=None):
        available = (logs or {}).get("available_metrics")
        if available is not None and self.monitor not in available:
            hint = " (pass validation_data to report val_loss)" \
                if self.monitor.startswith("val_") else ""
            raise ValueError(f"OptunaPruningCallback monitors {self.monitor!r}, which this fit "
                             f"does not report (it reports {sorted(available)}){hint}")

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is None:
            return
        step = self.step
        self.step += 1
        value = float(value)
        self.trial.report(value if math.isfinite(value) else math.nan, step)
        if self.trial.should_prune():
            self.pruned_at = step
            raise self._pruned_error(f"trial pruned at step {step} ({self.monitor} = "
                                     f"{value:.6g})")


__all__ = ["OptunaPruningCallback"]
