"""Writes the model files of tests/data/round1/ with the fastreg of round 1 (before the one
engine): run once with that version installed; test_saving.py loads them with today's."""
import os
import sys

import numpy as np

import fastreg as fr

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "round1")


def data(n=64, d=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, rng


def main():
    os.makedirs(OUT, exist_ok=True)
    X, rng = data()
    expected = {"X": X}
    seq = fr.Sequential([fr.GaussianNoise(0.1), fr.Dense(8, "relu", dropout=0.2,
                                                        regularizer=fr.L1(1e-3)),
                         fr.BatchNorm(), fr.GaussianDropout(0.2),
                         fr.Dense(6, "tanh", regularizer=[fr.GroupLasso(1e-3), fr.MaxNorm(2.0)]),
                         fr.Dense(3)], input_dim=5, seed=3)
    seq.compile(loss="sparse_categorical_crossentropy", optimizer=fr.AdamW(1e-2, weight_decay=0.01),
                backend="numpy")
    y = rng.integers(0, 3, 64)
    seq.fit(X, y, epochs=2, batch_size=16, verbose=0)
    seq.save(os.path.join(OUT, "sequential.npz"))
    expected["seq_predict"] = seq.predict(X)
    expected["seq_mc_mean"], _ = seq.predict(X, mc_samples=4, seed=1)
    seq.fit(X, y, epochs=1, batch_size=16, verbose=0)      # training continues from the file
    expected["seq_after"] = np.concatenate([w.ravel() for w in seq.get_weights()])

    multi = fr.MultiTask(trunk=[fr.Dense(8, "relu", dropout=0.1), fr.BatchNorm()],
                         heads={"v": ([fr.Dense(2)], "mse", 1.0),
                                "c": ([fr.Dropout(0.1), fr.Dense(4, "tanh"), fr.Dense(3)],
                                      "sparse_categorical_crossentropy", 0.5)},
                         input_dim=5, seed=4)
    multi.compile(optimizer=fr.SGD(1e-2, momentum=0.9), backend="numpy")
    targets = {"v": rng.standard_normal((64, 2)).astype(np.float32), "c": y}
    multi.fit(X, targets, epochs=2, batch_size=16, verbose=0)
    multi.save(os.path.join(OUT, "multitask.npz"))
    for head, value in multi.predict(X).items():
        expected[f"multi_predict_{head}"] = value
    multi.fit(X, targets, epochs=1, batch_size=16, verbose=0)
    expected["multi_after"] = np.concatenate([w.ravel() for w in multi.get_weights()])
    expected["targets_v"] = targets["v"]
    expected["y"] = y
    np.savez(os.path.join(OUT, "expected.npz"), **expected)
    print("wrote", sorted(os.listdir(OUT)), "with fastreg", fr.__version__, file=sys.stderr)


if __name__ == "__main__":
    main()
