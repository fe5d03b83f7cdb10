"""Model files written by round 1's fastreg (before the one engine; tests/data/
make_round1_files.py) load in today's, predict the same and train on the same."""
import os

import numpy as np
import pytest

import fastreg as fr

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "round1")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(HERE, "expected.npz")) as f:
        return {k: f[k] for k in f.files}


def test_a_round1_sequential_predicts_and_trains_on_the_same(expected, tmp_path):
    X, y = expected["X"], expected["y"]
    model = fr.load_model(os.path.join(HERE, "sequential.npz"))
    assert model.backend == "numpy"      # the saved backend; compile() would reset the moments
    np.testing.assert_array_equal(model.predict(X), expected["seq_predict"])
    mean, _ = model.predict(X, mc_samples=4, seed=1)
    np.testing.assert_array_equal(mean, expected["seq_mc_mean"])
    model.fit(X, y, epochs=1, batch_size=16, verbose=0)   # the moments and counters came along
    after = np.concatenate([w.ravel() for w in model.get_weights()])
    np.testing.assert_array_equal(after, expected["seq_after"])


def test_a_round1_multitask_predicts_and_trains_on_the_same(expected):
    X = expected["X"]
    model = fr.load_model(os.path.join(HERE, "multitask.npz"))
    assert model.backend == "numpy"
    for head, value in model.predict(X).items():
        np.testing.assert_array_equal(value, expected[f"multi_predict_{head}"])
    model.fit(X, {"v": expected["targets_v"], "c": expected["y"]}, epochs=1, batch_size=16,
              verbose=0)
    after = np.concatenate([w.ravel() for w in model.get_weights()])
    np.testing.assert_array_equal(after, expected["multi_after"])
