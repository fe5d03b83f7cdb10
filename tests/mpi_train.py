"""A small seeded training, for tests/test_mpi.py: run it under `mpirun -n 2` (with
distributed="mpi") and as one plain process; rank 0 (or the lone process) saves the final
weights, the zero pattern's source and the history to OUT.

    python tests/mpi_train.py CASE BACKEND OUT [single|mpi]
"""
import sys

import numpy as np

import fastreg as fr


def data(n=203, d=12, k=3):
    """A fixed data set: n rows (203: the last batch of 32 is ragged, 11 rows)."""
    rng = np.random.default_rng(5)
    X = rng.standard_normal((n, d)).astype(np.float32)
    y = (X[:, :k].argmax(axis=1)).astype(np.int64)
    return X, y


def model_of(case, backend):
    """The case's model, compiled; cases cover dropout (input and fused), proximal L1, group
    lasso, max-norm, Gaussian noise, activity and weight noise, Adam and SGD."""
    if case == "adam_l1_dropout":
        layers = [fr.Dropout(0.1),
                  fr.Dense(16, activation="relu", dropout=0.3, regularizer=fr.L1(3e-3)),
                  fr.Dense(16, activation="tanh", dropout=0.2,
                           regularizer=fr.GroupLasso(2e-3)),
                  fr.Dense(3)]
        opt = fr.Adam(learning_rate=0.01)
    elif case == "sgd_maxnorm_noise":
        layers = [fr.Dense(16, activation="relu", dropout=0.25, constraint=fr.MaxNorm(0.5),
                           regularizer=fr.L1(1e-3)),
                  fr.GaussianNoise(0.1),
                  fr.Dense(16, activation="sigmoid", activity_regularizer=fr.L2(1e-3)),
                  fr.Dense(3, regularizer=fr.WeightNoise(0.01))]
        opt = fr.SGD(learning_rate=0.05, momentum=0.9)
    elif case == "nan_row":     # main makes one row overflow: one rank's loss only
        layers = [fr.Dense(16, activation="relu", dropout=0.2), fr.Dense(3)]
        opt = fr.Adam(learning_rate=0.01)
    else:
        raise SystemExit(f"unknown case {case!r}")
    model = fr.Sequential(layers, input_dim=12, seed=7)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=opt, backend=backend,
                  metrics=["accuracy"])
    return model


def main(case, backend, out, how="mpi"):
    X, y = data()
    if case == "nan_row":
        X[150] = 3e38       # finite, but its logits overflow: a non-finite loss
    model = model_of(case, backend)
    rank = 0
    if how == "mpi":
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
    # rank 0 alone runs the callbacks: the log names the rank that wrote it, and early
    # stopping's restored weights must reach every rank
    log = fr.LambdaCallback(on_epoch_end=lambda epoch, logs: open(
        f"{out}.rank{rank}.log", "a").write(f"{epoch} {logs['val_loss']}\n"))
    stop = fr.EarlyStopping(monitor="val_loss", patience=1, restore_best_weights=True)
    history = model.fit(X, y, epochs=4, batch_size=32, verbose=0,
                        validation_data=(X[:40], y[:40]), callbacks=[log, stop],
                        distributed="mpi" if how == "mpi" else None)
    weights = model.get_weights()
    if how == "mpi":        # every rank has rank 0's weights, bitwise
        from mpi4py import MPI
        gathered = MPI.COMM_WORLD.gather(weights, root=0)
        if rank == 0:
            for other in gathered[1:]:
                for a, b in zip(weights, other):
                    assert np.array_equal(a, b), "ranks ended with different weights"
    if rank == 0:
        np.savez(out, *weights, **{k: np.array(history.history.get(k, []))
                                   for k in ("loss", "val_loss", "accuracy")})


if __name__ == "__main__":
    main(*sys.argv[1:])
