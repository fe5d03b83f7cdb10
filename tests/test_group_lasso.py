"""GroupLasso: the penalty per unit, block soft-thresholding in the fused update, every backend."""
import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract
from fastreg.layers import from_config as layer_from_config
from fastreg.kernels import reference
from fastreg.kernels.reference.update import group_prox
from netutil import fresh_rng, make_data, make_model, randn


def test_group_prox_is_the_proximal_map_of_the_column_norm():
    rng = fresh_rng()
    w = randn(rng, (7, 5), np.float64)
    w[:, 1] *= 1e-3
    tau = 0.3
    out = w.copy()
    group_prox(out, tau)
    norms = np.linalg.norm(w, axis=0)
    assert not out[:, 1].any()                                  # norm <= tau: exactly zero
    for j in np.flatnonzero(norms > tau):                       # else shrunk by tau along w_j
        np.testing.assert_allclose(out[:, j], w[:, j] * (1 - tau / norms[j]), rtol=1e-12)
        assert np.linalg.norm(out[:, j]) == pytest.approx(norms[j] - tau, rel=1e-12)
    # it minimises tau * ||u|| + ||u - w||^2 / 2 column by column: no perturbation does better
    def objective(u):
        return tau * np.linalg.norm(u, axis=0).sum() + 0.5 * ((u - w) ** 2).sum()
    base = objective(out)
    for _ in range(50):
        assert objective(out + 1e-3 * rng.standard_normal(w.shape)) >= base - 1e-12


def test_penalty_value_counts_each_unit_once():
    rng = fresh_rng()
    w = randn(rng, (6, 4), np.float32)
    hp = np.zeros(contract.HP_SIZE)
    hp[contract.HP_GROUP] = 0.7
    assert reference.penalty_value(w, hp) == pytest.approx(
        0.7 * np.linalg.norm(w.astype(np.float64), axis=0).sum(), rel=1e-12)
    assert reference.penalty_value(w[0], hp) == 0.0          # vectors (biases) have no groups


def test_regularizer_validation_and_config():
    with pytest.raises(ValueError, match="GroupLasso strength"):
        fr.GroupLasso(-1.0)
    with pytest.raises(TypeError):
        fr.GroupLasso("big")
    with pytest.raises(ValueError, match="bias"):
        fr.Dense(4, bias_regularizer=fr.GroupLasso(0.1))
    d = fr.Dense(4, regularizer=[fr.GroupLasso(0.1), fr.L2(1e-3)])
    assert layer_from_config(d.get_config()).regularizer == d.regularizer


@pytest.mark.parametrize("backend", ["numba", "cython"])
def test_training_zeroes_whole_units_identically_on_every_backend(backend):
    rng = fresh_rng()
    sizes = (5, 24, 16, 2)
    X, y = make_data(rng, 96, sizes, "mse")
    kw = dict(sizes=sizes, dropout=0.1, regularizer=[fr.GroupLasso(0.05), fr.L2(1e-3)],
              optimizer=fr.Adam(2e-2, eps=1e-3))
    ref = make_model(**kw, backend="numpy")
    try:
        other = make_model(**kw, backend=backend)
    except fr.BackendUnavailable as exc:
        pytest.skip(str(exc))
    other.set_weights(ref.get_weights())
    h_ref = ref.fit(X, y, epochs=12, batch_size=32, verbose=0)
    h_other = other.fit(X, y, epochs=12, batch_size=32, verbose=0)
    Wr, Wo = ref.get_weights(), other.get_weights()
    for a, b in zip(Wr, Wo):
        np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-5)
    dead = [np.flatnonzero(~W.any(axis=0)) for W in Wr[::2]]
    assert sum(len(d) for d in dead[:-1]) > 0                  # some hidden units died whole
    for W, d in zip(Wo[::2], dead):
        assert not W[:, d].any()                               # the same units, exactly zero
    # the reported penalty includes the group term (the reference's penalty_value has it)
    np.testing.assert_allclose(h_other.history["penalty"], h_ref.history["penalty"], rtol=1e-4)


def test_stronger_group_lasso_kills_more_units():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((256, 4)).astype(np.float32)
    y = (np.sin(X[:, :1]) + 0.5 * X[:, 1:2]).astype(np.float32)
    alive = []
    for lam in (0.0, 0.01, 0.1):
        model = fr.Sequential([fr.Dense(32, "relu", regularizer=fr.GroupLasso(lam)),
                               fr.Dense(1)], input_dim=4, seed=1)
        model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend="numba")
        model.fit(X, y, epochs=30, batch_size=32, verbose=0)
        alive.append(int(model.get_weights()[0].any(axis=0).sum()))
    assert alive[0] == 32 and alive[0] > alive[1] > alive[2]
