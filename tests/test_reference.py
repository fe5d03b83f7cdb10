"""The reference backend against calculus: central differences in float64, masks fixed by seed."""
import numpy as np
import pytest

from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import dropout_scale, dropout_threshold

from netutil import central_difference, fresh_rng, randn

ACTS = [contract.ACT_LINEAR, contract.ACT_RELU,
        contract.ACT_LEAKY_RELU, contract.ACT_TANH, contract.ACT_SIGMOID]
SLOPE = 0.07


def _two_layer_loss(params, x, y, loss, act, rate, seed=11, step=4):
    """Scalar loss of x -> dense(act, dropout) -> dense(linear) -> loss, and its grads."""
    W0, b0, W1, b1 = params
    B = x.shape[0]
    thr, sc = dropout_threshold(rate), dropout_scale(rate, np.float64)
    h = np.zeros((B, W0.shape[1]))
    out = np.zeros((B, W1.shape[1]))
    reference.dense_forward(x, W0, b0, h, act, SLOPE, thr, sc, seed, step, 0)
    reference.dense_forward(h, W1, b1, out, contract.ACT_LINEAR, SLOPE, 0, 1.0, seed, step, 1)
    g = np.zeros_like(out)
    value = reference.loss_forward_backward(out, y, g, loss)
    dW1, db1, dh = np.zeros_like(W1), np.zeros_like(b1), np.zeros_like(h)
    reference.dense_backward(g, out, h, W1, dW1, db1, dh,
                             contract.ACT_LINEAR, SLOPE, 0, 1.0, seed, step, 1)
    dW0, db0, dx = np.zeros_like(W0), np.zeros_like(b0), np.zeros_like(x)
    reference.dense_backward(dh, h, x, W0, dW0, db0, dx, act, SLOPE, thr, sc, seed, step, 0)
    return value, [dW0, db0, dW1, db1, dx]


def _targets(rng, loss, B, K):
    if loss == contract.LOSS_SCE:
        return rng.integers(0, K, (B, 1)).astype(np.float64)
    if loss == contract.LOSS_BCE:
        return rng.random((B, K))
    return rng.standard_normal((B, K))


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("rate", [0.0, 0.3])
@pytest.mark.parametrize("loss", [contract.LOSS_MSE, contract.LOSS_BCE, contract.LOSS_SCE])
def test_gradients_match_central_differences(act, rate, loss):
    rng = fresh_rng()
    B, I, H, K = 6, 4, 5, 3
    x = randn(rng, (B, I), np.float64)
    params = [randn(rng, (I, H), np.float64), randn(rng, H, np.float64, 0.1),
              randn(rng, (H, K), np.float64), randn(rng, K, np.float64, 0.1)]
    y = _targets(rng, loss, B, K)
    _, grads = _two_layer_loss(params, x, y, loss, act, rate)
    for p, g in zip(params + [x], grads):
        num = central_difference(lambda: _two_layer_loss(params, x, y, loss, act, rate)[0], p)
        # relu kinks: a perturbation crossing z=0 is measure-zero with random inputs
        np.testing.assert_allclose(g, num, rtol=1e-5, atol=1e-7)


def test_dropout_mask_is_inverted_and_off_at_rate_zero():
    rng = fresh_rng()
    x = randn(rng, (50, 8), np.float64)
    W = randn(rng, (8, 40), np.float64)
    b = np.zeros(40)
    plain, dropped = np.zeros((50, 40)), np.zeros((50, 40))
    reference.dense_forward(x, W, b, plain, contract.ACT_TANH, 0, 0, 1.0, 1, 0, 0)
    reference.dense_forward(x, W, b, dropped, contract.ACT_TANH, 0, dropout_threshold(0.25),
                            dropout_scale(0.25, np.float64), 1, 0, 0)
    kept = dropped != 0
    assert 0.6 < kept.mean() < 0.9
    np.testing.assert_allclose(dropped[kept], plain[kept] / 0.75)


def _penalty_grad_via_update(w, hp):
    """SGD, lr=1, zero data gradient: w - w_new is exactly the penalty's (sub)gradient."""
    w_new = w.copy()
    reference.penalized_update(w_new, np.zeros_like(w), np.zeros((0, 0)), np.zeros((0, 0)), hp,
                               contract.OPT_SGD, 1)
    return w - w_new


@pytest.mark.parametrize("l1,l2", [(0.0, 0.3), (0.2, 0.0), (0.2, 0.3)])
def test_penalty_gradient_matches_central_differences(l1, l2):
    rng = fresh_rng()
    w = randn(rng, (4, 3), np.float64)
    hp = np.zeros(contract.HP_SIZE)
    hp[contract.HP_LR], hp[contract.HP_L1], hp[contract.HP_L2], hp[contract.HP_PROXIMAL] = (
        1.0, l1, l2, 0.0)
    g = _penalty_grad_via_update(w, hp)
    wc = w.copy()
    num = central_difference(lambda: reference.penalty_value(wc, hp), wc)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)
    assert reference.penalty_value(w, hp) == pytest.approx(
        l1 * np.abs(w).sum() + l2 / 2 * (w**2).sum())


def test_proximal_l1_gives_exact_zeros_subgradient_does_not():
    rng = fresh_rng()
    w = randn(rng, (30, 20), np.float64, 0.01)
    hp = np.zeros(contract.HP_SIZE)
    hp[contract.HP_LR], hp[contract.HP_L1] = 0.1, 0.05
    prox, sub = w.copy(), w.copy()
    hp[contract.HP_PROXIMAL] = 1.0
    reference.penalized_update(prox, np.zeros_like(w), np.zeros((0, 0)), np.zeros((0, 0)), hp, 0, 1)
    hp[contract.HP_PROXIMAL] = 0.0
    reference.penalized_update(sub, np.zeros_like(w), np.zeros((0, 0)), np.zeros((0, 0)), hp, 0, 1)
    # |w| < lr*l1 = 0.005 for most entries: prox zeroes exactly those
    np.testing.assert_array_equal(prox == 0, np.abs(w) <= 0.005)
    assert (sub == 0).sum() == 0


def test_maxnorm_projects_columns():
    rng = fresh_rng()
    w = randn(rng, (10, 6), np.float64) * 3
    hp = np.zeros(contract.HP_SIZE)
    hp[contract.HP_LR], hp[contract.HP_MAXNORM] = 1e-3, 1.5
    before = np.linalg.norm(w, axis=0)
    reference.penalized_update(w, np.zeros_like(w), np.zeros((0, 0)), np.zeros((0, 0)), hp, 0, 1)
    after = np.linalg.norm(w, axis=0)
    assert (after <= 1.5 + 1e-12).all()
    small = before <= 1.5
    np.testing.assert_allclose(after[small], before[small])
