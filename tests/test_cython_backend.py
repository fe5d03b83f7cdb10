"""The Cython backend (kernels/cython/: one extension of .pxi rooms) against the reference:
every kernel on fresh random inputs, float32 and float64, parametrized over the contract's
tables; the Philox bits and masks against kernels/philox.py and the Numba backend; whole
epochs of plans (single part and trunk + heads, every feature) against kernels/reference and,
in float64, bit for bit against the Numba epoch; the generated constants; and the fallback
when the extension is missing or switched off.

Every test but the fallback and generator ones skips (with the reason) when the extension is
not built or FASTREG_NO_CYTHON=1 is set; the fallback tests run either way (in a subprocess).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import (dropout_scale, dropout_threshold, keep_mask, philox_words,
                                    STREAM_DROPOUT, STREAM_INPUT_DROPOUT)
from fastreg.kernels.protocol import Backend

from netutil import (OPTIMIZERS, PENALTIES, PENALTY_IDS, check_penalized_update, fresh_rng,
                     randn)
from planutil import clone_plan, random_plan, random_targets, run_epochs

try:
    from fastreg.kernels import cython as Cy
    SKIP_REASON = ""
except ImportError as exc:  # not built, or FASTREG_NO_CYTHON=1
    Cy = None
    SKIP_REASON = f"the Cython backend is not importable: {exc}"

needs_ext = pytest.mark.skipif(Cy is None, reason=SKIP_REASON)

KERNELS = Path(contract.__file__).parent
ACTS = [a.code for a in contract.ACTIVATION_TABLE]
ACT_IDS = [a.name for a in contract.ACTIVATION_TABLE]
NOISES = [n.code for n in contract.NOISE_TABLE]
NOISE_IDS = [n.name for n in contract.NOISE_TABLE]
# B*O crosses the parallel threshold (65536) in the big case: the OpenMP passes run too
SHAPES = [(37, 19, 23), (300, 40, 260)]
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF, 0xFFFFFFFF), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def _tol(dtype):
    return dict(rtol=1e-5, atol=2e-6) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-13)


def assert_close(actual, desired, dtype):
    """Within rtol, and within atol scaled by the array's magnitude (GEMM rounding grows
    with the summands, not with the possibly cancelled result)."""
    tol = _tol(dtype)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=tol["rtol"], atol=tol["atol"] * scale * 10)


def _pre(B, O, act, noise, dtype):
    return np.zeros((B if contract.keeps_pre(act, noise) else 0, O), dtype)


# ---------------------------------------------------------------- Philox
@needs_ext
@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers_every_code_path(counter, key, expected):
    old = Cy._K._set_philox_path(-1)
    try:
        for path in range(len(Cy._K.PHILOX_PATHS)):   # scalar, SSE2, AVX2 where the CPU has it
            Cy._K._set_philox_path(path)
            assert tuple(Cy.philox4x32(*counter, *key)) == expected, Cy._K.PHILOX_PATHS[path]
    finally:
        Cy._K._set_philox_path(old)


@needs_ext
@pytest.mark.parametrize("n", [1, 7, 1001, 70001])   # 70001: the parallel fill
def test_philox_words_match_reference_on_every_code_path(n):
    rng = fresh_rng()
    seed = int(rng.integers(0, 2**64, dtype=np.uint64))
    step, layer, stream = (int(v) for v in rng.integers(0, 2**32, 3, dtype=np.uint64))
    want = philox_words(n, seed, step, layer, stream)
    old = Cy._K._set_philox_path(-1)
    try:
        for path in range(len(Cy._K.PHILOX_PATHS)):
            Cy._K._set_philox_path(path)
            np.testing.assert_array_equal(Cy.philox_words(n, seed, step, layer, stream), want,
                                          err_msg=Cy._K.PHILOX_PATHS[path])
    finally:
        Cy._K._set_philox_path(old)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_dropout_masks_bitwise_equal_to_numba_and_reference(dtype, shape):
    from fastreg.kernels import numba
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(0.3), dropout_scale(0.3, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 1
    outs = []
    for K in (numba, Cy):
        out = np.zeros((B, O), dtype)
        # sigmoid output is never 0, so every zero is a dropped unit
        K.dense_forward(x, W, b, out, contract.ACT_SIGMOID, 0.0, thr, sc, seed, step, layer)
        outs.append(out)
    keep = keep_mask((B, O), thr, seed, step, layer, STREAM_DROPOUT)
    np.testing.assert_array_equal(outs[0] == 0, outs[1] == 0)
    np.testing.assert_array_equal(outs[1] != 0, keep)


# ---------------------------------------------------------------- dense layer
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("rate", [0.0, 0.35])
@pytest.mark.parametrize("noise", NOISES, ids=NOISE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_dense_forward_backward_against_reference(dtype, act, rate, noise, shape):
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 2
    outs, pres = [], []
    for K in (reference, Cy):
        out, pre = np.zeros((B, O), dtype), _pre(B, O, act, noise, dtype)
        K.dense_forward(x, W, b, out, act, 0.02, thr, sc, seed, step, layer, noise, 0.3, pre)
        outs.append(out)
        pres.append(pre)
    assert_close(outs[1], outs[0], dtype)
    assert_close(pres[1], pres[0], dtype)
    # no output is 0 but dropped ones
    if act == contract.ACT_SIGMOID and noise == contract.NOISE_NONE:
        np.testing.assert_array_equal(outs[1] == 0, outs[0] == 0)
    g = randn(rng, (B, O), dtype)
    res = []
    for K in (reference, Cy):
        gg = g.copy()
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(gg, outs[0], x, W, dW, db, dx, act, 0.02, thr, sc, seed, step, layer,
                         noise, 0.3, pres[0])
        res.append((gg, dW, db, dx))
    for name, a, c in zip(("dz", "dW", "db", "dx"), *res):
        assert_close(c, a, dtype), name


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
def test_every_activation_propagates_nan_like_the_reference(dtype, act):
    """NaN stays NaN, and the reference's value (np.maximum's +0 for a negative relu input)
    comes out bit for bit where there is no rounding to disagree on."""
    z = np.array([np.nan, -2.0, -0.5, -0.0, 0.0, 0.5, 3.0, np.inf, -np.inf], dtype)
    x, W = np.zeros((1, 1), dtype), np.zeros((1, z.size), dtype)    # x @ W + b = b = z
    out_r, out_c = np.zeros((1, z.size), dtype), np.zeros((1, z.size), dtype)
    reference.dense_forward(x, W, z, out_r, act, 0.1, 0, 1.0, 0, 0, 0)
    Cy.dense_forward(x, W, z, out_c, act, 0.1, 0, 1.0, 0, 0, 0)
    assert np.isnan(out_c[0, 0])
    # exact: compare the bits
    if act in (contract.ACT_LINEAR, contract.ACT_RELU, contract.ACT_LEAKY_RELU):
        np.testing.assert_array_equal(out_c.view(np.uint8), out_r.view(np.uint8))
    assert_close(out_c, out_r, dtype)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 5, 4), (9, 1, 6), (9, 4, 1), (1, 1, 1), (7, 3, 5)])
def test_vector_shaped_products(dtype, shape):
    """B, I or O of 1: the gemv / dot paths of the BLAS dispatch."""
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype), randn(rng, O, dtype)
    out_r, out_c = np.zeros((B, O), dtype), np.zeros((B, O), dtype)
    reference.dense_forward(x, W, b, out_r, contract.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
    Cy.dense_forward(x, W, b, out_c, contract.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
    assert_close(out_c, out_r, dtype)
    res = []
    for K in (reference, Cy):
        g = randn(np.random.default_rng(7), (B, O), dtype)
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(g, out_r, x, W, dW, db, dx, contract.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0)
        res.append((g, dW, db, dx))
    for a, c in zip(*res):
        assert_close(c, a, dtype)


@needs_ext
def test_backward_without_bias_or_dx():
    rng = fresh_rng()
    x, W = randn(rng, (9, 4)), randn(rng, (4, 6))
    none = np.zeros(0, np.float32)
    out, ref = np.zeros((9, 6), np.float32), np.zeros((9, 6), np.float32)
    Cy.dense_forward(x, W, none, out, contract.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    reference.dense_forward(x, W, none, ref, contract.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    assert_close(out, ref, np.float32)
    g0 = randn(rng, (9, 6))
    res = []
    for K in (reference, Cy):
        g, dW = g0.copy(), np.zeros_like(W)
        K.dense_backward(g, ref, x, W, dW, none, np.zeros((0, 0), np.float32), contract.ACT_RELU,
                         0.0, 0, 1.0, 0, 0, 0)
        res.append((g, dW))
    for a, c in zip(*res):
        assert_close(c, a, np.float32)


@needs_ext
def test_backward_that_needs_pre_refuses_to_run_without_it():
    rng = fresh_rng()
    x, W, b = randn(rng, (5, 3)), randn(rng, (3, 4)), randn(rng, 4)
    out = np.zeros((5, 4), np.float32)
    with pytest.raises(ValueError, match="keeps_pre"):
        Cy.dense_backward(out.copy(), out, x, W, np.zeros_like(W), np.zeros_like(b),
                          np.zeros_like(x), contract.ACT_TANH, 0.0, 0, 1.0, 0, 0, 0,
                          contract.NOISE_MUL, 0.2, None)


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("noise", NOISES, ids=NOISE_IDS)
@pytest.mark.parametrize("shape", [(33, 17), (300, 260)])
def test_input_dropout_against_reference(dtype, noise, shape):
    """Bit for bit without noise (a mask and a scale); with noise to the rounding of the
    Box-Muller transform (libm against NumPy's log / cos / sin)."""
    rng = fresh_rng()
    x = randn(rng, shape, dtype)
    a, b = np.zeros_like(x), np.zeros_like(x)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2, np.dtype(dtype).type)
    seed, step = int(rng.integers(2**63)), int(rng.integers(2**31))
    reference.input_dropout(x, a, thr, sc, seed, step, 3, noise, 0.25)
    Cy.input_dropout(x, b, thr, sc, seed, step, 3, noise, 0.25)
    if noise == contract.NOISE_NONE:
        np.testing.assert_array_equal(a, b)
    assert_close(b, a, dtype)
    # a dropped input is 0, or AlphaDropout's value a * alpha' + b (the std slot is its b)
    dt = np.dtype(dtype).type
    dropped = dt(0) if noise != contract.NOISE_ALPHA else dt(contract.ALPHA_DROPPED) * sc + dt(0.25)
    np.testing.assert_array_equal(b != dropped, keep_mask(x.shape, thr, seed, step, 3,
                                                          STREAM_INPUT_DROPOUT))


# ---------------------------------------------------------------- BatchNorm
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ACTS, ids=ACT_IDS)
@pytest.mark.parametrize("noise", NOISES, ids=NOISE_IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bn_dense_against_reference(dtype, act, noise, shape):
    rng = fresh_rng()
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    gb = np.stack([1 + 0.1 * randn(rng, O, dtype), 0.1 * randn(rng, O, dtype)]).astype(dtype)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 4
    fwd = []
    for K in (reference, Cy):
        out, xhat, save = np.zeros((B, O), dtype), np.zeros((B, O), dtype), np.zeros((6, O))
        pre = _pre(B, O, act, noise, dtype)
        K.bn_dense_forward(x, W, b, out, xhat, gb, save, act, 0.02, thr, sc, 1e-3, seed, step,
                           layer, noise, 0.3, pre)
        fwd.append((out, xhat, save, pre))
    for a, c in zip(*fwd):
        assert_close(c, a, dtype)
    out, xhat, save, pre = fwd[0]
    g = randn(rng, (B, O), dtype)
    res = []
    for K in (reference, Cy):
        gg, stats = g.copy(), np.stack([np.zeros(O), np.ones(O)]).astype(dtype)
        dW, db, dgb, dx = (np.zeros_like(a) for a in (W, b, gb, x))
        K.bn_dense_backward(gg, out, xhat, x, W, gb, stats, save.copy(), dW, db, dgb, dx, act,
                            0.02, thr, sc, 0.9, seed, step, layer, noise, 0.3, pre)
        res.append((gg, dW, db, dgb, dx, stats))
    for name, a, c in zip(("dz", "dW", "db", "dgb", "dx", "stats"), *res):
        assert_close(c, a, dtype), name


# ---------------------------------------------------------------- losses
def _targets(rng, loss, B, K, dtype, mixed=False):
    if loss == contract.LOSS_SCE and mixed:
        return np.stack([rng.integers(0, K, B), rng.integers(0, K, B), rng.random(B)],
                        axis=1).astype(dtype)
    if loss == contract.LOSS_SCE:
        return rng.integers(0, K, (B, 1)).astype(dtype)
    if loss == contract.LOSS_BCE:
        return rng.random((B, K)).astype(dtype)
    return randn(rng, (B, K), dtype)


LOSS_CASES = [(loss.code, False) for loss in contract.LOSS_TABLE] + [(contract.LOSS_SCE, True)]
LOSS_IDS = [loss.name for loss in contract.LOSS_TABLE] + ["sce-mixup"]


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("loss,mixed", LOSS_CASES, ids=LOSS_IDS)
def test_losses_against_reference(dtype, loss, mixed):
    rng = fresh_rng()
    z = randn(rng, (41, 7), dtype, 3.0)
    y = _targets(rng, loss, 41, 7, dtype, mixed)
    gr, gc = np.zeros_like(z), np.zeros_like(z)
    vr = reference.loss_forward_backward(z, y, gr, loss)
    vc = Cy.loss_forward_backward(z, y, gc, loss)
    assert vc == pytest.approx(vr, rel=1e-6 if dtype == np.float32 else 1e-12)
    assert Cy.loss_value(z, y, loss) == vc
    np.testing.assert_allclose(gc, gr, **_tol(dtype))


@needs_ext
@pytest.mark.parametrize("loss", [loss.code for loss in contract.LOSS_TABLE],
                         ids=[loss.name for loss in contract.LOSS_TABLE])
def test_output_transform_and_penalty_value_are_the_reference(loss):
    z = randn(fresh_rng(), (13, 4), np.float32, 3.0)
    np.testing.assert_array_equal(Cy.output_transform(z, loss), reference.output_transform(z, loss))
    hp = np.zeros(contract.HP_SIZE)
    hp[[contract.HP_L1, contract.HP_L2, contract.HP_GROUP]] = (0.1, 0.2, 0.3)
    assert Cy.penalty_value(z, hp) == reference.penalty_value(z, hp)


# ---------------------------------------------------------------- penalized update
@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opt,b1,nesterov", OPTIMIZERS,
                         ids=["sgd", "momentum", "nesterov", "adam", "adamw"])
@pytest.mark.parametrize("l1,l2,proximal,maxnorm,group", PENALTIES, ids=PENALTY_IDS)
@pytest.mark.parametrize("shape", [(13, 9), (400, 300), (11,)])
def test_penalized_update_against_reference(dtype, opt, b1, nesterov, l1, l2, proximal,
                                            maxnorm, group, shape):
    check_penalized_update(Cy, lambda x, y: assert_close(x, y, dtype), dtype, opt, b1,
                           nesterov, l1, l2, proximal, maxnorm, group, shape)


# ---------------------------------------------------------------- whole epochs of plans
# Adam's eps is raised in these comparisons: with eps=1e-8 a gradient that is ~0 up to float32
# rounding (a cancelled sum) makes the step lr * g / (|g| + eps) any value in [-lr, lr], so two
# correct backends may differ by lr in such a coordinate. Not what these tests are about.
N_ADD, N_MUL, N_OFF = contract.NOISE_ADD, contract.NOISE_MUL, (contract.NOISE_NONE, 0.0)
EPOCH_CASES = {
    "sgd-linear": dict(sizes=(5, 8, 1), acts=[contract.ACT_LINEAR] * 2, opt=contract.OPT_SGD,
                       momentum=0.0),
    "momentum-relu-sce-indrop-l2": dict(
        sizes=(4, 20, 5), acts=[contract.ACT_RELU, contract.ACT_LINEAR], drop=[0.1, 0],
        loss=contract.LOSS_SCE, opt=contract.OPT_SGD, momentum=0.9, in_drop=0.2, l2=1e-3),
    "nesterov-leaky-bce-l1-subgradient": dict(
        sizes=(6, 9, 9, 2), acts=[contract.ACT_LEAKY_RELU] * 2 + [contract.ACT_LINEAR],
        drop=[0.3, 0.3, 0], loss=contract.LOSS_BCE, opt=contract.OPT_SGD, nesterov=True, l1=1e-3,
        proximal=False),
    "adam-tanh-mse-l1-prox-group": dict(
        sizes=(3, 16, 12, 2), drop=[0.25, 0.25, 0], opt=contract.OPT_ADAM, l1=1e-3, l2=1e-3,
        group=1e-2),
    "adamw-sigmoid-bce-maxnorm-nobias": dict(
        sizes=(6, 9, 9, 2), acts=[contract.ACT_SIGMOID] * 2 + [contract.ACT_LINEAR],
        drop=[0.3, 0.3, 0], loss=contract.LOSS_BCE, opt=contract.OPT_ADAMW, l1=1e-3, maxnorm=1.0,
        bias=False),
    "adam-batchnorm-noise-input-noise": dict(
        sizes=(5, 12, 10, 3), acts=[contract.ACT_RELU, contract.ACT_TANH, contract.ACT_LINEAR],
        bn=[True, True, False], noise=[(N_ADD, 0.3), (N_MUL, 0.4), N_OFF], drop=[0.2, 0.1, 0],
        in_noise=(N_MUL, 0.2), in_drop=0.1, group=1e-2, l2=1e-3),
    "momentum-sce-mixup-noise": dict(
        sizes=(4, 10, 3), acts=[contract.ACT_TANH, contract.ACT_LINEAR], loss=contract.LOSS_SCE,
        opt=contract.OPT_SGD, momentum=0.9, noise=[(N_ADD, 0.5), N_OFF], in_noise=(N_ADD, 0.1),
        mixup=True),
    "one-head-adamw": dict(
        sizes=(4, 6), heads=[((5, 2), contract.LOSS_MSE, 0.5, 0.3)], opt=contract.OPT_ADAMW,
        acts=[contract.ACT_RELU, contract.ACT_TANH, contract.ACT_LINEAR],
        noise=[(N_MUL, 0.3), N_OFF, N_OFF], head_noise=(N_MUL, 0.2), l2=1e-3),
    "heads-every-feature": dict(
        sizes=(5, 12, 9, 8), heads=[((7, 3), contract.LOSS_SCE, 0.7, 0.2),
                                    ((5, 2), contract.LOSS_MSE, 1.0, 0.0),
                                    ((4,), contract.LOSS_BCE, 2.0, 0.1)],
        acts=[contract.ACT_RELU, contract.ACT_TANH, contract.ACT_SIGMOID, contract.ACT_LEAKY_RELU,
              contract.ACT_LINEAR, contract.ACT_RELU, contract.ACT_LINEAR, contract.ACT_TANH],
        bn=[True, False, True, False, True, False, False, True],
        noise=[(N_ADD, 0.2), (N_MUL, 0.3), N_OFF, (N_MUL, 0.2), N_OFF, (N_ADD, 0.1), N_OFF,
               N_OFF],
        drop=[0.2] * 8, in_drop=0.1, in_noise=(N_MUL, 0.2), head_noise=(N_ADD, 0.1),
        l1=1e-3, l2=1e-3, group=1e-2, maxnorm=2.0, mixup=True),
}


def _mixup(plan):
    """Every sparse-CE part takes Mixup targets (label a, label b, lam): width 3."""
    y0 = 0
    for p in range(plan.n_parts):
        first, end, src, loss, a, b = (int(v) for v in plan.parts[p, :contract.PT_Y1 + 1])
        if loss < 0:
            continue
        width = contract.SCE_MIXED_WIDTH if loss == contract.LOSS_SCE else b - a
        plan.parts[p, contract.PT_Y0], plan.parts[p, contract.PT_Y1] = y0, y0 + width
        plan.y_widths[p] = width
        y0 += width


def _plan_targets(rng, plan, n):
    """Targets of every part with a loss, side by side at their columns [PT_Y0, PT_Y1)."""
    cols = []
    for p in range(plan.n_parts):
        loss = int(plan.parts[p, contract.PT_LOSS])
        if loss >= 0:
            width = int(plan.parts[p, contract.PT_Y1] - plan.parts[p, contract.PT_Y0])
            cols.append(_targets(rng, loss, n, plan.n_outputs[p], plan.dtype.type,
                                 mixed=(loss == contract.LOSS_SCE
                                        and width == contract.SCE_MIXED_WIDTH)))
    return np.ascontiguousarray(np.hstack(cols))


def _epoch_case(name, dtype, rows=90, rng=None):
    """(plan, X, Y) of EPOCH_CASES[name] on fresh random weights and data."""
    cfg = dict(EPOCH_CASES[name])
    mixup, head_noise = cfg.pop("mixup", False), cfg.pop("head_noise", None)
    rng = rng or fresh_rng()
    plan = random_plan(rng, dtype=dtype, seed=int(rng.integers(2**62)), **cfg)
    for hp in (plan.hpW, plan.hpb, plan.hpgb):
        hp[:, contract.HP_EPS] = 1e-3
    for p in range(1, plan.n_parts):
        if head_noise:
            first = int(plan.parts[p, contract.PT_FIRST])
            (plan.li[first, contract.LI_IN_NOISE],
             plan.lf[first, contract.LF_IN_NOISE_STD]) = head_noise
    if mixup:
        _mixup(plan)
    X = randn(rng, (rows, cfg["sizes"][0]), dtype)
    return plan, X, _plan_targets(rng, plan, rows)


def _store_arrays(plan):
    s = plan.store
    return {"params": s.params, "m": s.m, "v": s.v, "stats": s.stats}


def _assert_same_training(a, b, res_a, res_b, tol):
    """Two trainings of one plan: the same parameters, moments and running statistics, the
    same steps; loss and penalty sums to `tol` (None: bit for bit)."""
    for name, x in _store_arrays(a).items():
        y = _store_arrays(b)[name]
        if tol is None:
            np.testing.assert_array_equal(y, x, err_msg=name)
        else:
            np.testing.assert_allclose(y, x, **tol, err_msg=name)
    for (la, pa, sa, fa), (lb, pb, sb, fb) in zip(res_a, res_b):
        assert (sa, fa) == (sb, fb)
        assert la.shape == lb.shape == (a.n_parts,)
        if tol is None:
            np.testing.assert_array_equal(lb, la)
        else:
            np.testing.assert_allclose(lb, la, rtol=10 * tol["rtol"])
        assert pb == pytest.approx(pa, rel=10 * (tol or dict(rtol=1e-12))["rtol"])


EPOCH_TOL = {"float32": dict(rtol=1e-4, atol=1e-5), "float64": dict(rtol=1e-9, atol=1e-11)}


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(EPOCH_CASES))
def test_epochs_against_reference(case, dtype):
    plan, X, Y = _epoch_case(case, np.dtype(dtype))
    other = clone_plan(plan)
    res_r = run_epochs(reference, plan, X, Y, 16)
    res_c = run_epochs(Cy, other, X, Y, 16)
    _assert_same_training(plan, other, res_r, res_c, EPOCH_TOL[dtype])


@needs_ext
@pytest.mark.parametrize("case", ["adam-batchnorm-noise-input-noise", "momentum-sce-mixup-noise",
                                  "heads-every-feature"])
def test_float64_epochs_bitwise_equal_to_numba(case):
    """The two CPU backends make the same BLAS calls and the same passes in the same order:
    in float64 the weights, moments, running statistics and loss sums agree bit for bit (the
    penalty sums to rounding: the backends sum them in different blocks)."""
    from fastreg.kernels import numba
    plan, X, Y = _epoch_case(case, np.float64)
    other = clone_plan(plan)
    res_n = run_epochs(numba, plan, X, Y, 16)
    res_c = run_epochs(Cy, other, X, Y, 16)
    _assert_same_training(plan, other, res_n, res_c, None)


@needs_ext
@pytest.mark.parametrize("case", ["sgd-linear", "heads-every-feature"])
def test_batch_larger_than_the_rows(case):
    plan, X, Y = _epoch_case(case, np.float64, rows=23)
    other = clone_plan(plan)
    res_r = run_epochs(reference, plan, X, Y, 1000)
    res_c = run_epochs(Cy, other, X, Y, 1000)
    assert [r[2] for r in res_c] == [1, 1]
    _assert_same_training(plan, other, res_r, res_c, EPOCH_TOL["float64"])


@needs_ext
@pytest.mark.parametrize("case", ["adam-tanh-mse-l1-prox-group", "heads-every-feature"])
def test_epoch_stops_before_updating_on_nonfinite_loss(case):
    plan, X, Y = _epoch_case(case, np.float64, rows=64)
    p = next(p for p in range(plan.n_parts) if plan.parts[p, contract.PT_LOSS] == contract.LOSS_MSE)
    Y[40:, plan.parts[p, contract.PT_Y0]] = np.inf     # the second batch of 32 has an infinite loss
    perm = np.arange(X.shape[0], dtype=np.int64)
    outs = []
    for K in (reference, Cy):
        p = clone_plan(plan)
        p.allocate(32, p.y_widths)
        outs.append((K.train_epoch(p, X, Y, perm, 32, 0, 1), p))
    (rr, pr), (rc, pc) = outs
    assert rr[2:] == (1, False) and rc[2:] == (1, False)   # one step, then stop before updating
    np.testing.assert_allclose(rc[0], rr[0], rtol=1e-12)
    _assert_same_training(pr, pc, [], [], EPOCH_TOL["float64"])


def _wide_plan(rng, dtype=np.float32):
    """Layers whose B*O crosses the parallel threshold: every OpenMP pass runs."""
    return random_plan(rng, dtype=dtype, sizes=(3, 280, 240, 2),
                       acts=[contract.ACT_SIGMOID, contract.ACT_RELU, contract.ACT_LINEAR],
                       bn=[True, False, False],
                       drop=[0.2, 0.3, 0], noise=[(N_MUL, 0.3), (N_ADD, 0.2), N_OFF],
                       in_noise=(N_MUL, 0.1), opt=contract.OPT_ADAMW, l1=1e-4, maxnorm=2.0,
                       group=1e-3, seed=int(rng.integers(2**62)))


@needs_ext
def test_results_do_not_depend_on_the_thread_count():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = fresh_rng()
    plan = _wide_plan(rng)
    X = randn(rng, (600, 3))
    Y = random_targets(rng, plan, 600)
    perm = np.arange(600, dtype=np.int64)
    plans = [clone_plan(plan) for _ in range(2)]
    results = []
    for threads, p in zip((1, 3), plans):
        p.allocate(300, p.y_widths)
        # our OpenMP passes only (OpenBLAS may split a product differently with other counts)
        with threadpoolctl.threadpool_limits(threads, user_api="openmp"):
            results.append(Cy.train_epoch(p, X, Y, perm, 300, 0, 1))
    _assert_same_training(plans[0], plans[1], [results[0]], [results[1]], None)


@needs_ext
def test_wide_epoch_against_reference():
    rng = fresh_rng()
    plan = _wide_plan(rng, np.float64)
    X, other = randn(rng, (300, 3), np.float64), clone_plan(plan)
    Y = random_targets(rng, plan, 300)
    res_r = run_epochs(reference, plan, X, Y, 300, epochs=1)
    res_c = run_epochs(Cy, other, X, Y, 300, epochs=1)
    _assert_same_training(plan, other, res_r, res_c, EPOCH_TOL["float64"])


@needs_ext
def test_in_place_row_changes_apply_between_epochs():
    """A schedule may edit the hyperparameter rows (and a part's loss weight) in place: the
    next epoch must use the new values."""
    plan, X, Y = _epoch_case("heads-every-feature", np.float64, rows=64)
    perm = np.arange(X.shape[0], dtype=np.int64)
    plans = [clone_plan(plan) for _ in range(2)]
    for K, p in zip((reference, Cy), plans):
        p.allocate(32, p.y_widths)
        K.train_epoch(p, X, Y, perm, 32, 0, 1)
        p.hpW[:, contract.HP_LR] *= 0.1
        p.hpb[:, contract.HP_LR] *= 0.1
        p.hpW[:, contract.HP_L1] = 0.0
        p.partf[1, contract.PF_WEIGHT] = 3.0
        K.train_epoch(p, X, Y, perm, 32, 2, 3)
    _assert_same_training(plans[0], plans[1], [], [], EPOCH_TOL["float64"])


@needs_ext
def test_epoch_plan_follows_the_plan_buffers():
    plan, X, Y = _epoch_case("adam-tanh-mse-l1-prox-group", np.float32, rows=64)
    perm = np.arange(X.shape[0], dtype=np.int64)
    plan.allocate(32, plan.y_widths)
    Cy.train_epoch(plan, X, Y, perm, 32, 0, 1)
    built = plan.cache["cython"]
    Cy.train_epoch(plan, X, Y, perm, 32, 2, 3)
    assert plan.cache["cython"] is built                # kept while the buffers are the same
    plan.acts[0] = plan.acts[0].copy()                  # a new array: never write the old one
    Cy.train_epoch(plan, X, Y, perm, 32, 4, 5)
    assert plan.cache["cython"] is not built
    with pytest.raises(ValueError, match="workspace"):
        Cy.train_epoch(plan, X, Y, perm, 64, 0, 1)      # batches larger than the workspace


@needs_ext
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_inference_of_every_part_matches_reference(dtype):
    rng = fresh_rng()
    plan = random_plan(rng, dtype=np.dtype(dtype), sizes=(4, 9, 7),
                       heads=[((5, 3), contract.LOSS_SCE, 1.0, 0.0),
                              ((2,), contract.LOSS_MSE, 1.0, 0.0)],
                       acts=ACTS + [contract.ACT_RELU], training=False)
    for part in range(plan.n_parts):
        X = randn(rng, (101, plan.part_input_width(part)), np.dtype(dtype))
        a = reference.forward_inference(plan, X, 16, part)
        for batch in (16, 1000, 1):
            assert_close(Cy.forward_inference(plan, X, batch, part), a, np.dtype(dtype).type)
    assert Cy.forward_inference(plan, X[:0], 16, part).shape == (0, plan.n_outputs[part])


@needs_ext
def test_the_package_is_a_complete_backend():
    backend = Backend(Cy)
    assert backend.name == "cython" and backend.available() == (True, "")
    plan = random_plan(fresh_rng())
    plan.allocate(8, plan.y_widths)
    with backend.epoch_context(plan):
        pass
    np.testing.assert_array_equal(backend.philox_words(9, 3, 4, 5, 6),
                                  philox_words(9, 3, 4, 5, 6))


# ---------------------------------------------------------------- the generated contract
def _generate():
    """kernels/cython/generate.py, loaded by path as setup.py does (it imports nothing)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_fastreg_test_generate",
                                                  KERNELS / "cython" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_ext
def test_compiled_constants_are_the_contract():
    assert Cy._K.CONTRACT == contract.integer_constants()
    assert Cy._K.ACTIVATION_FLAGS == {a.code: (int(a.unscale), int(a.grad_from == "input"))
                                      for a in contract.ACTIVATION_TABLE}


def test_contract_pxi_is_generated_from_the_contract():
    pxi = KERNELS / "cython" / "contract.pxi"
    if not pxi.exists():
        pytest.skip("contract.pxi is written by the build (setup.py); not built here")
    assert pxi.read_text() == _generate().contract_pxi(contract), \
        "contract.pxi is stale: rebuild with `pip install -e .`"


def test_every_activation_of_the_table_is_dispatched_and_defined():
    """A row of ACTIVATION_TABLE needs its f and f' in activation.pxi (the generated ladders
    call them by name); every generated ladder has a case per row."""
    text = _generate().activation_dispatch(contract)
    defined = (KERNELS / "cython" / "activation.pxi").read_text()
    for a in contract.ACTIVATION_TABLE:
        for fn in (f"_f_{a.name}", f"_df_{a.name}"):
            assert f"{fn}(" in text
            assert f"cdef inline real {fn}(" in defined, f"activation.pxi lacks {fn}"
    generate = _generate()
    for name, _, call in generate.SPECIALIZED:
        body = text.split(f"cdef void {name}(")[1].split("\ncdef ")[0]
        for a in contract.ACTIVATION_TABLE:
            assert call.format(tag=generate.tag_argument(a)) in body, (name, a.name)
    for fn in ("_tag_f", "_tag_df"):     # one compile-time case per row in the tagged f, f'
        body = text.split(f"cdef inline real {fn}(")[1].split("\ncdef ")[0]
        for a in contract.ACTIVATION_TABLE:
            assert f"act_tag is {generate.tag(a)}:" in body, (fn, a.name)


# ---------------------------------------------------------------- fallback (no extension)
def _run_without_extension(code):
    env = dict(os.environ, FASTREG_NO_CYTHON="1")
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)


def test_fallback_import_error_says_how_to_get_it():
    code = ("try:\n"
            "    import fastreg.kernels.cython\n"
            "except ImportError as exc:\n"
            "    print('IMPORTERROR:', exc)\n"
            "else:\n"
            "    print('IMPORTED')\n"
            "from fastreg.backend import BackendUnavailable, resolve\n"
            "try:\n"
            "    resolve('cython')\n"
            "except BackendUnavailable as exc:\n"
            "    print('UNAVAILABLE:', exc)\n")
    proc = _run_without_extension(code)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines() if ": " in line)
    assert "IMPORTED" not in proc.stdout
    msg = lines["IMPORTERROR"]
    assert "FASTREG_NO_CYTHON" in msg and msg.count(". ") == 0   # one sentence
    assert "cython" in lines["UNAVAILABLE"] and "FASTREG_NO_CYTHON" in lines["UNAVAILABLE"]
