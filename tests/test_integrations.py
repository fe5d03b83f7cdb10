"""fr.integrations.OptunaPruningCallback and the example study (docs/examples)."""
import importlib.util
import math
import os

import numpy as np
import pytest

import fastreg as fr

optuna = pytest.importorskip("optuna")
optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data(n=200, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3)).astype(np.float32)
    y = (np.sin(X[:, :1]) + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
    return X, y


def _model(seed=0):
    model = fr.Sequential([fr.Dense(16, "tanh"), fr.Dense(1)], input_dim=3, seed=seed)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2))
    return model


def test_every_epoch_is_reported_and_a_complete_trial_keeps_its_history():
    X, y = _data()
    Xv, yv = _data(64, seed=1)
    histories = []

    def objective(trial):
        h = _model().fit(X, y, epochs=5, batch_size=32, validation_data=(Xv, yv), verbose=0,
                         callbacks=[fr.integrations.OptunaPruningCallback(trial)])
        histories.append(h.history["val_loss"])
        return h.history["val_loss"][-1]

    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.COMPLETE
    assert trial.intermediate_values == dict(enumerate(histories[0]))


def test_a_pruned_trial_stops_the_fit_and_leaves_the_model_as_it_was():
    X, y = _data()
    Xv, yv = _data(64, seed=1)
    models, callbacks = [], []

    def objective(trial):
        model = _model()
        models.append((model, model.get_weights()))
        cb = fr.integrations.OptunaPruningCallback(trial, monitor="val_loss")
        callbacks.append(cb)
        model.fit(X, y, epochs=50, batch_size=32, validation_data=(Xv, yv), verbose=0,
                  callbacks=[cb])
        return 0.0

    # prunes as soon as a reported value is above 1e-9, after 2 warm-up steps
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=1e-9,
                                                                      n_warmup_steps=2))
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert callbacks[0].pruned_at == 2 and sorted(trial.intermediate_values) == [0, 1, 2]
    model, before = models[0]
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_steps_keep_counting_across_fits_and_multitask_metrics_work():
    X, y = _data()
    y2 = (X[:, 0] > 0).astype(np.int64)
    model = fr.MultiTask(trunk=[fr.Dense(16, "relu")],
                         heads={"value": ([fr.Dense(1)], "mse"),
                                "sign": ([fr.Dense(2)], "sparse_categorical_crossentropy")},
                         input_dim=3, seed=0)
    model.compile(optimizer=fr.Adam(1e-2))
    study = optuna.create_study(pruner=optuna.pruners.NopPruner())
    trial = study.ask()
    cb = fr.integrations.OptunaPruningCallback(trial, monitor="val_loss_sign")
    targets = {"value": y, "sign": y2}
    h1 = model.fit(X, targets, epochs=2, validation_data=(X, targets), callbacks=[cb],
                   verbose=0)
    h2 = model.fit(X, targets, epochs=3, validation_data=(X, targets), callbacks=[cb],
                   verbose=0)
    study.tell(trial, 0.0)
    reported = study.trials[0].intermediate_values
    assert reported == dict(enumerate(h1.history["val_loss_sign"] + h2.history["val_loss_sign"]))
    assert cb.step == 5 and cb.pruned_at is None


def test_an_unreported_metric_and_a_non_trial_are_refused():
    X, y = _data()
    trial = optuna.create_study().ask()
    cb = fr.integrations.OptunaPruningCallback(trial, monitor="val_loss")
    with pytest.raises(ValueError, match="validation_data"):
        _model().fit(X, y, epochs=1, verbose=0, callbacks=[cb])
    with pytest.raises(TypeError, match="optuna Trial"):
        fr.integrations.OptunaPruningCallback(object())
    with pytest.raises(TypeError, match="metric name"):
        fr.integrations.OptunaPruningCallback(trial, monitor=3)


def test_the_example_study_runs_and_prunes():
    pytest.importorskip("sklearn")
    path = os.path.join(ROOT, "docs", "examples", "optuna_study.py")
    spec = importlib.util.spec_from_file_location("optuna_study", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    study = example.run_study(n_trials=8, epochs=6, seed=0)
    states = [t.state for t in study.trials]
    assert len(states) == 8
    assert optuna.trial.TrialState.COMPLETE in states
    assert optuna.trial.TrialState.PRUNED in states       # the median pruner stopped some
    assert math.isfinite(study.best_value) and set(study.best_params) == {"l2", "dropout", "lr"}
    # the same seed gives the same study
    again = example.run_study(n_trials=8, epochs=6, seed=0)
    assert [t.params for t in again.trials] == [t.params for t in study.trials]
    assert [t.state for t in again.trials] == states
