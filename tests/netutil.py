"""Shared helpers for tests: random data that is never zeros, and Nets built like fit builds
them."""
import os
import sys
from contextlib import contextmanager

import numpy as np

import fastreg as fr
from fastreg.kernels import contract
from fastreg.kernels import reference


def backend_module(name):
    """The kernels module of a backend (skipping the test where it cannot run)."""
    import pytest
    from fastreg import backend as backends
    try:
        return backends.resolve(name).module
    except backends.BackendUnavailable as exc:
        pytest.skip(str(exc))


def available_backends(names):
    """[(name, module)] of the backends among `names` that can run here."""
    from fastreg import backend as backends
    out = []
    for name in names:
        try:
            out.append((name, backends.resolve(name).module))
        except backends.BackendUnavailable:
            pass
    return out


def fresh_rng():
    """A generator seeded from the OS: every run sees new inputs."""
    return np.random.default_rng()


def randn(rng, shape, dtype=np.float32, scale=1.0):
    a = rng.standard_normal(shape) * scale
    a[a == 0] = 0.5
    return a.astype(dtype)


def make_model(sizes=(5, 7, 6, 3), activation="tanh", dropout=0.2, regularizer=None,
               loss="mse", optimizer=None, input_dropout=0.0, dtype="float32", seed=3,
               backend="numpy"):
    layers = [fr.Dropout(input_dropout)] if input_dropout else []
    for units in sizes[1:-1]:
        layers.append(fr.Dense(units, activation, dropout=dropout, regularizer=regularizer))
    layers.append(fr.Dense(sizes[-1], regularizer=regularizer))
    model = fr.Sequential(layers, input_dim=sizes[0], seed=seed, dtype=dtype)
    model.compile(loss=loss, optimizer=optimizer or fr.Adam(1e-2), backend=backend)
    return model


def make_data(rng, n, sizes, loss, dtype=np.float32):
    X = randn(rng, (n, sizes[0]), dtype)
    if loss == "sparse_categorical_crossentropy":
        y = rng.integers(0, sizes[-1], n)
    elif loss == "binary_crossentropy":
        y = rng.random((n, sizes[-1])).astype(dtype)
    else:
        y = randn(rng, (n, sizes[-1]), dtype)
    return X, y


OPTIMIZERS = [(contract.OPT_SGD, 0.0, 0), (contract.OPT_SGD, 0.9, 0), (contract.OPT_SGD, 0.9, 1),
              (contract.OPT_ADAM, 0.9, 0), (contract.OPT_ADAMW, 0.9, 0)]
"""(opt, beta1/momentum, nesterov): SGD, momentum, Nesterov, Adam, AdamW."""
PENALTIES = [(0, 0, 1, 0, 0), (0, 1e-2, 1, 0, 0), (0.05, 0, 1, 0, 0), (0.05, 1e-2, 0, 0, 0),
             (0, 1e-3, 1, 0.8, 0), (0, 0, 1, 0, 50.0), (0.05, 1e-3, 1, 0.8, 50.0)]
"""(l1, l2, proximal, maxnorm, group)."""
PENALTY_IDS = ["none", "l2", "l1-prox", "l1-subgrad+l2", "l2+maxnorm", "group",
               "l1+l2+maxnorm+group"]


def central_difference(f, p, eps=1e-6):
    """d f() / d p by central differences: each element of p (float64) moved by +-eps in
    place, f() evaluated, the element restored exactly."""
    num = np.zeros_like(p)
    for i in np.ndindex(p.shape):
        old = p[i]
        p[i] = old + eps
        up = f()
        p[i] = old - eps
        down = f()
        p[i] = old
        num[i] = (up - down) / (2 * eps)
    return num


def check_penalized_update(ops, assert_close, dtype, opt, b1, nesterov, l1, l2, proximal,
                           maxnorm, group, shape):
    """One fused update of `ops` against the reference on fresh inputs: the penalty, w, m, v,
    the exact zeros of L1 and of the group prox, the max-norm bound."""
    rng = fresh_rng()
    matrix = len(shape) == 2
    hp = np.zeros(contract.HP_SIZE)
    hp[[contract.HP_LR, contract.HP_BETA1, contract.HP_BETA2, contract.HP_EPS, contract.HP_NESTEROV,
        contract.HP_DECOUPLED, contract.HP_L1, contract.HP_L2, contract.HP_PROXIMAL,
        contract.HP_MAXNORM, contract.HP_GROUP]] = (
        0.01, b1, 0.999, 1e-8, nesterov, 0.05, l1, l2, proximal,
        maxnorm if matrix else 0, group if matrix else 0)
    w = randn(rng, shape, dtype, 0.5)
    if group and matrix:
        w[:, :2] *= 1e-3        # two units the group threshold must zero exactly
    g = randn(rng, shape, dtype)
    needs_m = opt != contract.OPT_SGD or b1 > 0
    m = randn(rng, shape, dtype, 0.1) if needs_m else np.zeros((0,) * len(shape), dtype)
    v = (rng.random(shape).astype(dtype) * 0.1 + 0.01) if opt != contract.OPT_SGD \
        else np.zeros((0,) * len(shape), dtype)
    t = int(rng.integers(1, 50))
    states = [(w.copy(), m.copy(), v.copy()) for _ in range(2)]
    pr = reference.penalized_update(states[0][0], g, states[0][1], states[0][2], hp, opt, t)
    po = ops.penalized_update(states[1][0], g, states[1][1], states[1][2], hp, opt, t)
    assert abs(po - pr) <= 1e-9 * abs(pr) + 1e-12
    for a, b in zip(states[0], states[1]):
        assert_close(b, a)
    if l1 and proximal:
        np.testing.assert_array_equal(states[0][0] == 0, states[1][0] == 0)
    if maxnorm and matrix:
        norms = np.sqrt((states[1][0].astype(np.float64) ** 2).sum(axis=0))
        assert norms.max() <= maxnorm * (1 + 1e-6)
    if group and matrix:
        assert not states[1][0][:, :2].any() and states[1][0][:, 2:].all(axis=0).any()
        np.testing.assert_array_equal(states[0][0] == 0, states[1][0] == 0)


SMALL_CUDA_TILES = (("TILE_M", 16), ("TILE_N", 16), ("TILE_K", 8), ("THREAD_M", 4),
                    ("THREAD_N", 4), ("BLOCK", 16), ("UPDATE_PER_THREAD", 4),
                    # fused path: 8-row blocks, 2 x 2 micro-tiles of 16 threads (several per
                    # thread), weights staged 4 rows at a time, widths up to 24
                    ("FUSED_ROWS", 8), ("FUSED_THREADS", 16), ("FUSED_TK", 4),
                    ("FUSED_MAX_WIDTH", 24), ("FUSED_THREAD_M", 2), ("FUSED_THREAD_N", 2))


@contextmanager
def small_cuda_tiles(monkeypatch, G):
    """Tiles of 16 x 16 x 8 with 4 x 4 micro-tiles (16 threads), 16-thread elementwise blocks,
    for the CUDA module G on the simulator (or with FASTREG_TEST_SMALL_TILES=1): odd shapes then
    span several tiles with ragged edges, and the simulator stays fast. The simulator runs a
    block's threads as Python threads polled by the main thread: a short GIL switch interval
    makes syncthreads hand over quickly (about twice as fast on 2 cores). G may be None."""
    sim = G is not None and G.on_simulator()
    if G is not None and (sim or os.environ.get("FASTREG_TEST_SMALL_TILES") == "1"):
        for name, value in SMALL_CUDA_TILES:
            monkeypatch.setattr(G, name, value)
    interval = sys.getswitchinterval()
    if sim:
        sys.setswitchinterval(5e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)
