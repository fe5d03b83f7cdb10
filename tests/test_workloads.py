"""bench/workloads.py: the built-in benchmark workloads (fastreg.bench.workloads)."""
import math

import numpy as np
import pytest

from fastreg.bench.workloads import WORKLOADS, Workload, initial_weights, make_workload


def _tiny(n=10, d=5, batch=4):
    rng = np.random.default_rng(1)
    return Workload(
        name="tiny", X_train=rng.standard_normal((n, d)).astype(np.float32),
        y_train=rng.standard_normal((n, 1)).astype(np.float32),
        X_val=rng.standard_normal((3, d)).astype(np.float32),
        y_val=rng.standard_normal((3, 1)).astype(np.float32),
        layers=[(3, "relu", 0.0), (2, None, 0.0)], loss="mse", l2=1e-4, lr=1e-3,
        batch_size=batch, epochs=1, seed=0)


def test_flops_match_a_hand_count():
    wl = _tiny()
    # 5 -> 3 -> 2, batches 4, 4, 2. Per row: forward 5*3 + 3*2, dW 5*3 + 3*2, dx of the
    # second layer only 3*2: 48 multiply-adds, 96 flops; 10 rows -> 960.
    assert wl.flops_per_epoch() == 960.0
    assert sorted(wl.gemm_shapes(4)) == sorted([(4, 5, 3), (4, 3, 2),      # x @ W
                                                (5, 4, 3), (3, 4, 2),      # x.T @ dz
                                                (4, 2, 3)])                # dz @ W.T
    assert wl.batch_sizes() == [4, 4, 2] and wl.n_batches() == 3
    assert wl.layer_dims() == [(5, 3), (3, 2)]
    assert wl.param_count() == 5 * 3 + 3 + 3 * 2 + 2


def test_flops_of_wide_by_formula():
    wl = make_workload("wide", quick=True)
    macs_per_row = sum(I * O for I, O in [(784, 1024), (1024, 1024), (1024, 10)])
    dx_per_row = 1024 * 1024 + 1024 * 10
    assert wl.flops_per_epoch() == 2.0 * wl.n_train * (2 * macs_per_row + dx_per_row)


@pytest.mark.parametrize("name", ["curve", "wide"])
def test_deterministic_by_seed(name):
    a, b = make_workload(name, quick=True, seed=3), make_workload(name, quick=True, seed=3)
    c = make_workload(name, quick=True, seed=4)
    for f in ("X_train", "y_train", "X_val", "y_val"):
        np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
    assert not np.array_equal(a.X_train, c.X_train)


def test_curve_shapes_and_target_scale():
    wl, full = make_workload("curve", quick=True), make_workload("curve")
    assert wl.X_train.shape == (10_000, 1) and wl.y_train.shape == (10_000, 1)
    assert wl.X_val.shape == (2_000, 1) and wl.y_val.shape == (2_000, 1)
    for a in (wl.X_train, wl.y_train, wl.X_val, wl.y_val):
        assert a.dtype == np.float32
    assert 0.5 < wl.y_train.var() < 2.0
    np.testing.assert_array_equal(wl.X_train, full.X_train)     # quick: fewer epochs only
    assert wl.epochs < full.epochs
    assert wl.layers == [(64, "leaky_relu", 0.1)] * 3 + [(1, None, 0.0)]
    assert (wl.loss, wl.l2, wl.lr, wl.batch_size) == ("mse", 1e-4, 1e-3, 128)


def test_wide_shapes_labels_and_learnability():
    wl = make_workload("wide", quick=True)
    assert wl.X_train.shape == (4096, 784) and wl.X_train.dtype == np.float32
    assert wl.y_train.shape == (4096,) and wl.y_train.dtype == np.int64
    assert wl.X_val.shape == (2048, 784) and wl.y_val.dtype == np.int64
    assert wl.y_train.min() >= 0 and wl.y_train.max() < 10
    counts = np.bincount(wl.y_train, minlength=10)
    assert counts.min() > 0.05 * len(wl.y_train)                 # roughly balanced
    assert wl.layers == [(1024, "relu", 0.2), (1024, "relu", 0.2), (10, None, 0.0)]
    assert (wl.loss, wl.batch_size) == ("sparse_categorical_crossentropy", 256)
    # A nearest-centroid probe already beats chance (0.1) by far: the labels are a function
    # of the features.
    M = np.stack([wl.X_train[wl.y_train == c].mean(axis=0) for c in range(10)])
    pred = (wl.X_val @ M.T - 0.5 * (M ** 2).sum(axis=1)).argmax(axis=1)
    assert (pred == wl.y_val).mean() > 0.3


def test_digits():
    pytest.importorskip("sklearn")
    wl = make_workload("digits", seed=0)
    assert wl.X_train.shape[1] == 64 and wl.X_train.dtype == np.float32
    assert wl.X_train.min() >= 0.0 and wl.X_train.max() <= 1.0
    assert wl.X_train.shape[0] + wl.X_val.shape[0] == 1797
    assert abs(wl.X_val.shape[0] - 0.2 * 1797) <= 1
    assert wl.y_train.dtype == np.int64 and set(np.unique(wl.y_val)) == set(range(10))
    # stratified: every class has about the same share in both splits
    share_tr = np.bincount(wl.y_train) / len(wl.y_train)
    share_va = np.bincount(wl.y_val) / len(wl.y_val)
    assert np.abs(share_tr - share_va).max() < 0.01
    assert wl.layers == [(128, "relu", 0.2), (10, None, 0.0)] and wl.batch_size == 64


def test_unknown_workload_is_a_clear_error():
    with pytest.raises(ValueError, match="curve, wide, digits"):
        make_workload("mnist")
    assert WORKLOADS == ("curve", "wide", "digits")


def test_initial_weights_glorot_uniform():
    wl = make_workload("curve", quick=True)
    ws = initial_weights(wl, seed=5)
    assert len(ws) == 2 * len(wl.layers)
    for (I, O), W, b in zip(wl.layer_dims(), ws[0::2], ws[1::2]):
        assert W.shape == (I, O) and W.dtype == np.float32
        assert b.shape == (O,) and b.dtype == np.float32 and not b.any()
        assert np.abs(W).max() <= math.sqrt(6.0 / (I + O))
    ws2 = initial_weights(wl, seed=5)
    for a, b in zip(ws, ws2):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(ws[2], initial_weights(wl, seed=6)[2])
