"""An Optuna study of a regularized MLP on scikit-learn's digits, with pruning.

    pip install "fastreg[optuna]" scikit-learn
    python docs/examples/optuna_study.py --trials 30 --epochs 40

Each trial draws an L2 strength (log scale), a dropout rate and a learning rate, trains a
64 -> 128 -> 10 ReLU network, and reports its validation loss to the trial after every epoch
through fr.integrations.OptunaPruningCallback; Optuna's MedianPruner stops a trial whose
validation loss is worse than the median of the earlier trials at the same epoch. The study
is seeded (TPE sampler and model seeds), so a run is reproducible.
"""
import argparse

import numpy as np

import fastreg as fr


def digits(seed=0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    return train_test_split(X, y, test_size=0.5, random_state=seed, stratify=y)


def make_objective(X, Xv, y, yv, epochs):
    def objective(trial):
        l2 = trial.suggest_float("l2", 1e-6, 1e-1, log=True)
        dropout = trial.suggest_float("dropout", 0.0, 0.5)
        lr = trial.suggest_float("lr", 1e-4, 1e-2, log=True)
        model = fr.Sequential([fr.Dense(128, "relu", dropout=dropout, regularizer=fr.L2(l2)),
                               fr.Dense(10)], input_dim=X.shape[1], seed=trial.number)
        model.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(lr))
        history = model.fit(X, y, epochs=epochs, batch_size=64, validation_data=(Xv, yv),
                            verbose=0,
                            callbacks=[fr.integrations.OptunaPruningCallback(trial, "val_loss")])
        return min(history.history["val_loss"])
    return objective


def run_study(n_trials=30, epochs=40, seed=0):
    """The study: returns the optuna Study (best_params, trials with their states)."""
    import optuna
    X, Xv, y, yv = digits(seed)
    study = optuna.create_study(direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3,
                                                                   n_warmup_steps=3))
    study.optimize(make_objective(X, Xv, y, yv, epochs), n_trials=n_trials)
    return study


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = run_study(args.trials, args.epochs, args.seed)
    states = [t.state.name for t in study.trials]
    print(f"{len(states)} trials: {states.count('COMPLETE')} complete, "
          f"{states.count('PRUNED')} pruned")
    print(f"best validation loss {study.best_value:.4f} with {study.best_params}")


if __name__ == "__main__":
    main()
