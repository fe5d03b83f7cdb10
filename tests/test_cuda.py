"""The CUDA backend (kernels/cuda/) against the reference and the Numba backend, through plans
built directly (tests/planutil.py).

Runs on the numba-cuda simulator (NUMBA_ENABLE_CUDASIM=1, set by conftest.py before numba is
imported) unless a GPU is present: small shapes only, and the tile constants patched small
(netutil.small_cuda_tiles) so that tile edges, several blocks and the split (GEMM, then
epilogue kernel) path are all hit. FASTREG_TEST_GPU=1 runs the same tests on the real device
with the production tiles. Epochs are compared with the Numba backend in a few plans (each
new combination of features costs Numba a compile) and with the reference in the others.
"""
import os
import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pytest

from fastreg.kernels import contract
from fastreg.kernels.plan import make_plan
from fastreg.kernels import reference
from fastreg.kernels.philox import (STREAM_DROPOUT, STREAM_INPUT_DROPOUT, dropout_scale,
                                    dropout_threshold, philox_words)

from netutil import (OPTIMIZERS, PENALTIES, check_penalized_update, fresh_rng, randn,
                     small_cuda_tiles)
from planutil import clone_plan, random_plan, random_targets, run_epochs

cuda = pytest.importorskip("fastreg.kernels.cuda")
if not cuda.available()[0]:
    pytest.skip(cuda.available()[1], allow_module_level=True)

from fastreg.kernels.cuda import activation as cuda_activation  # noqa: E402
from fastreg.kernels.cuda import jit as cuda_jit  # noqa: E402

SIM = cuda.on_simulator()
ACTS = [a.code for a in contract.ACTIVATION_TABLE]


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    with small_cuda_tiles(monkeypatch, cuda):
        yield


def assert_close(actual, desired, dtype=np.float32):
    rtol, atol = (2e-5, 2e-6) if dtype == np.float32 else (1e-12, 1e-13)
    scale = max(1.0, float(np.abs(desired).max(initial=0.0)))
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale * 10)


def numba_backend():
    return pytest.importorskip("fastreg.kernels.numba")


# ---------------------------------------------------------------- availability
def test_available_here():
    ok, reason = cuda.available()
    assert ok
    assert cuda.NAME == "cuda"
    if SIM:
        assert "simulator" in reason


def test_available_without_numba_cuda(monkeypatch):
    monkeypatch.setattr(cuda, "cuda", None)
    monkeypatch.setattr(cuda, "_IMPORT_ERROR", ImportError("not installed"))
    ok, reason = cuda.available()
    assert not ok and 'pip install "fastreg[cuda]"' in reason and reason.count("installed") == 1
    with pytest.raises(RuntimeError, match="not available"):
        cuda.philox_counters([(0, 0, 0, 0)], (0, 0))


def test_available_without_gpu(monkeypatch):
    monkeypatch.setattr(cuda, "on_simulator", lambda: False)
    monkeypatch.setattr(cuda.cuda, "is_available", lambda: False)
    ok, reason = cuda.available()
    assert not ok and "GPU" in reason and reason.count(".") <= 1


def test_is_a_complete_backend():
    from fastreg.kernels.protocol import Backend
    backend = Backend(cuda)
    assert backend.name == "cuda"
    words = backend.philox_words(11, 12345, 6, 2, STREAM_DROPOUT)
    np.testing.assert_array_equal(words, philox_words(11, 12345, 6, 2, STREAM_DROPOUT))


def _run(code, **env_changes):
    env = dict(os.environ)
    for k, v in env_changes.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=600)


def test_import_never_fails_without_numba_cuda():
    code = ("import sys; sys.modules['numba_cuda'] = None\n"
            "from fastreg.kernels import cuda\n"
            "ok, why = cuda.available(); assert not ok and 'fastreg[cuda]' in why, why\n"
            "print('ok')")
    res = _run(code)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


@pytest.mark.skipif(not SIM, reason="a GPU is present")
def test_import_and_available_without_gpu_or_simulator():
    code = ("from fastreg.kernels import cuda\n"
            "ok, why = cuda.available(); assert not ok and 'GPU' in why, why\nprint('ok')")
    res = _run(code, NUMBA_ENABLE_CUDASIM=None)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr


# ---------------------------------------------------------------- Philox
KAT = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
       ((0xffffffff,) * 4, (0xffffffff, 0xffffffff),
        (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
       ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
        (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answers(counter, key, expected):
    words = cuda.philox_counters([counter], key)
    assert tuple(int(w) for w in words[0]) == expected


@pytest.mark.parametrize("stream", [STREAM_DROPOUT, STREAM_INPUT_DROPOUT])
def test_stream_words_match_numpy_and_numba(stream):
    rng = fresh_rng()
    seed = int(rng.integers(2**63))
    step, layer = int(rng.integers(2**32)), int(rng.integers(7))
    n = 103
    dev = cuda.philox_words(n, seed, step, layer, stream)
    np.testing.assert_array_equal(dev, philox_words(n, seed, step, layer, stream))
    np.testing.assert_array_equal(dev, numba_backend().philox_words(n, seed, step, layer,
                                                                    stream))


# ---------------------------------------------------------------- dense layer
def _dense_case(rng, shape, dtype, act, rate, noise=(contract.NOISE_NONE, 0.0)):
    """dense_forward / dense_backward of the device against the reference: values to
    rounding, the dropout masks bit for bit."""
    B, I, O = shape
    x, W, b = randn(rng, (B, I), dtype), randn(rng, (I, O), dtype, 0.3), randn(rng, O, dtype)
    thr, sc = dropout_threshold(rate), dropout_scale(rate, np.dtype(dtype).type)
    seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 2
    keeps = contract.keeps_pre(act, noise[0])
    outs, pres = {}, {}
    for K in (reference, cuda):
        out = np.zeros((B, O), dtype)
        pre = np.zeros((B if keeps else 0, O), dtype)
        K.dense_forward(x, W, b, out, act, 0.02, thr, sc, seed, step, layer, *noise, pre)
        outs[K], pres[K] = out, pre
    assert_close(outs[cuda], outs[reference], dtype)
    assert_close(pres[cuda], pres[reference], dtype)
    np.testing.assert_array_equal(outs[cuda] == 0, outs[reference] == 0)
    g = randn(rng, (B, O), dtype)
    res = []
    for K in (reference, cuda):
        gg = g.copy()
        dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(gg, outs[reference], x, W, dW, db, dx, act, 0.02, thr, sc, seed, step,
                         layer, *noise, pres[reference])
        res.append((gg, dW, db, dx))
    for a, bb in zip(*res):
        assert_close(bb, a, dtype)


@pytest.mark.parametrize("act", ACTS)
def test_dense_forward_backward_dropout(act):
    shape = (37, 19, 23) if act in (contract.ACT_RELU, contract.ACT_TANH) else (11, 7, 13)
    _dense_case(fresh_rng(), shape, np.float32, act, 0.35)


@pytest.mark.parametrize("act,shape", [(contract.ACT_RELU, (17, 9, 18)),
                                       (contract.ACT_TANH, (5, 3, 1)),
                                       (contract.ACT_LINEAR, (1, 9, 8))])
def test_dense_forward_backward_no_dropout(act, shape):
    _dense_case(fresh_rng(), shape, np.float32, act, 0.0)


@pytest.mark.parametrize("act,noise", [(contract.ACT_TANH, (contract.NOISE_MUL, 0.4)),
                                       (contract.ACT_LINEAR, (contract.NOISE_ADD, 0.3))])
def test_dense_with_noise(act, noise):
    _dense_case(fresh_rng(), (9, 6, 11), np.float32, act, 0.25, noise)


def test_dense_float64():
    _dense_case(fresh_rng(), (9, 5, 11), np.float64, contract.ACT_SIGMOID, 0.25)


@pytest.mark.parametrize("act", [contract.ACT_LEAKY_RELU, contract.ACT_SIGMOID])
def test_dense_split_path(monkeypatch, act):
    """GEMM without epilogue followed by the elementwise epilogue kernels (the cuBLAS path's
    structure; the GEMM is ours here, cuBLAS where CuPy is installed)."""
    monkeypatch.setattr(cuda, "FORCE_SPLIT", True)
    _dense_case(fresh_rng(), (13, 10, 17), np.float32, act, 0.3, (contract.NOISE_MUL, 0.2))


def test_backward_without_bias_or_dx():
    rng = fresh_rng()
    x, W = randn(rng, (9, 4)), randn(rng, (4, 6))
    out = np.zeros((9, 6), np.float32)
    reference.dense_forward(x, W, np.zeros(0, np.float32), out,
                            contract.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
    out_g = np.zeros_like(out)
    cuda.dense_forward(x, W, np.zeros(0, np.float32), out_g, contract.ACT_RELU, 0.0, 0, 1.0, 0,
                       0, 0)
    assert_close(out_g, out)
    g0 = randn(rng, (9, 6))
    res = []
    for K in (reference, cuda):
        g = g0.copy()
        dW = np.zeros_like(W)
        K.dense_backward(g, out, x, W, dW, np.zeros(0, np.float32),
                         np.zeros((0, 0), np.float32), contract.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
        res.append((g, dW))
    for a, b in zip(*res):
        assert_close(b, a)


@pytest.mark.parametrize("split", [False, True])
def test_relu_propagates_nan(monkeypatch, split):
    """relu(NaN) is NaN as in the reference (np.maximum), on the fused GEMM epilogue and on
    the split path's elementwise kernel: a diverged model is not hidden."""
    monkeypatch.setattr(cuda, "FORCE_SPLIT", split)
    rng = fresh_rng()
    x, W = randn(rng, (6, 4)), randn(rng, (4, 5))
    x[2, 1] = np.nan
    outs = []
    for K in (reference, cuda):
        out = np.zeros((6, 5), np.float32)
        K.dense_forward(x, W, np.zeros(5, np.float32), out, contract.ACT_RELU, 0.0, 0, 1.0, 0, 0, 0)
        outs.append(out)
    assert np.isnan(outs[0][2]).all()
    np.testing.assert_array_equal(np.isnan(outs[1]), np.isnan(outs[0]))
    assert_close(np.nan_to_num(outs[1]), np.nan_to_num(outs[0]))


def test_input_dropout_bitwise():
    rng = fresh_rng()
    x = randn(rng, (33, 17))
    a, b = np.zeros_like(x), np.zeros_like(x)
    thr, sc = dropout_threshold(0.2), dropout_scale(0.2)
    seed, step = int(rng.integers(2**63)), int(rng.integers(2**31))
    reference.input_dropout(x, a, thr, sc, seed, step, 3, contract.NOISE_MUL, 0.3)
    cuda.input_dropout(x, b, thr, sc, seed, step, 3, contract.NOISE_MUL, 0.3)
    assert_close(b, a)
    np.testing.assert_array_equal(a == 0, b == 0)


# ---------------------------------------------------------------- an activation whose f' reads z
@contextmanager
def relu_read_from_z():
    """relu flagged grad_from="input" in the contract's table: its f' (z > 0) is the same
    whether read from z or from f(z), so the results must not change while every kernel now
    keeps z in the pre buffer and reads f' from it (the path a GELU or SiLU takes)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(contract.ACTIVATION_BY_CODE, contract.ACT_RELU,
                   contract.Activation("relu", contract.ACT_RELU, grad_from="input"))
        mp.setattr(cuda_activation, "FROM_INPUT_MASK", 1 << contract.ACT_RELU)
        mp.setattr(cuda_jit, "_BUILT", {})         # kernels compiled with the new flag
        assert contract.keeps_pre(contract.ACT_RELU, contract.NOISE_NONE)
        yield


@pytest.fixture
def relu_from_input():
    with relu_read_from_z():
        yield


@pytest.mark.parametrize("noise", [(contract.NOISE_NONE, 0.0), (contract.NOISE_MUL, 0.3)])
def test_input_derivative_kernels(relu_from_input, noise):
    rng = fresh_rng()
    x, W, b = randn(rng, (7, 5)), randn(rng, (5, 9), scale=0.5), randn(rng, 9)
    thr, sc = dropout_threshold(0.3), dropout_scale(0.3)
    out, pre = np.zeros((7, 9), np.float32), np.zeros((7, 9), np.float32)
    cuda.dense_forward(x, W, b, out, contract.ACT_RELU, 0.0, thr, sc, 9, 4, 1, *noise, pre)
    assert_close(pre, x @ W + b)                     # z, not f(z)
    ref_out = np.zeros_like(out)
    reference.dense_forward(x, W, b, ref_out, contract.ACT_RELU, 0.0, thr, sc, 9, 4, 1, *noise,
                            np.zeros_like(out))
    assert_close(out, ref_out)
    g0 = randn(rng, (7, 9))
    res = []
    # the reference keeps f(z) with noise
    for K, p in ((reference, np.maximum(pre, 0)), (cuda, pre)):
        g, dW, db, dx = g0.copy(), np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
        K.dense_backward(g, ref_out, x, W, dW, db, dx, contract.ACT_RELU, 0.0, thr, sc, 9, 4, 1,
                         *noise, p)
        res.append((g, dW, db, dx))
    for a, bb in zip(*res):
        assert_close(bb, a)


# ---------------------------------------------------------------- losses
@pytest.mark.parametrize("loss", [contract.LOSS_MSE, contract.LOSS_BCE, contract.LOSS_SCE, "mixup"])
def test_losses(loss):
    rng = fresh_rng()
    z = randn(rng, (41, 7), np.float32, 3.0)
    if loss == "mixup":
        y = np.stack([rng.integers(0, 7, 41), rng.integers(0, 7, 41), rng.random(41)],
                     axis=1).astype(np.float32)
        loss = contract.LOSS_SCE
    elif loss == contract.LOSS_SCE:
        y = rng.integers(0, 7, (41, 1)).astype(np.float32)
    elif loss == contract.LOSS_BCE:
        y = rng.random((41, 7)).astype(np.float32)
    else:
        y = randn(rng, (41, 7))
    gr, gg = np.zeros_like(z), np.zeros_like(z)
    vr = reference.loss_forward_backward(z, y, gr, loss)
    vg = cuda.loss_forward_backward(z, y, gg, loss)
    assert vg == pytest.approx(vr, rel=1e-6)
    assert cuda.loss_value(z, y, loss) == pytest.approx(vr, rel=1e-6)
    np.testing.assert_allclose(gg, gr, rtol=2e-5, atol=2e-7)


# ---------------------------------------------------------------- penalized update
def _update_case(opt, b1, nesterov, l1, l2, proximal, maxnorm, group, shape):
    check_penalized_update(cuda, assert_close, np.float32, opt, b1, nesterov, l1, l2, proximal,
                           maxnorm, group, shape)


# every optimizer with two penalty settings, every penalty setting with two optimizers
UPDATE_CASES = [o + PENALTIES[(i + j) % len(PENALTIES)] for i, o in enumerate(OPTIMIZERS)
                for j in (0, 2)]


@pytest.mark.parametrize("opt,b1,nesterov,l1,l2,proximal,maxnorm,group", UPDATE_CASES)
def test_penalized_update(opt, b1, nesterov, l1, l2, proximal, maxnorm, group):
    _update_case(opt, b1, nesterov, l1, l2, proximal, maxnorm, group, (13, 9))


@pytest.mark.parametrize("opt,b1,nesterov", OPTIMIZERS[1:4])
def test_penalized_update_vector(opt, b1, nesterov):
    _update_case(opt, b1, nesterov, 0.05, 1e-2, 1, 0, 0, (11,))


def test_penalized_update_many_blocks_and_maxnorm_columns():
    # 20 x 21 = 420 parameters: several update chunks; 21 columns: two max-norm blocks
    _update_case(contract.OPT_ADAM, 0.9, 0, 0.02, 1e-3, 1, 0.5, 50.0, (20, 21))


# ---------------------------------------------------------------- whole epochs
def random_epoch_plan(rng, eps=1e-3, **kw):
    """random_plan with Adam's eps at 1e-3: with 1e-8 a gradient that is ~0 up to float32
    rounding makes the step any value in [-lr, lr], so two correct backends may differ by lr
    in such a coordinate (seen: one weight of 120, rarely)."""
    kw.setdefault("seed", int(rng.integers(2**63)))
    plan = random_plan(rng, **kw)
    for hp in (plan.hpW, plan.hpb, plan.hpgb):
        hp[:, contract.HP_EPS] = eps
    return plan


def mixup_targets(rng, plan, n):
    """Targets with Mixup's (label_a, label_b, lam) for the plan's last part (a sparse CE
    part), the plain targets of the parts before it; the last part's target columns and
    width become Mixup's."""
    p = plan.n_parts - 1
    assert int(plan.parts[p, contract.PT_LOSS]) == contract.LOSS_SCE
    y0 = int(plan.parts[p, contract.PT_Y0])
    plan.parts[p, contract.PT_Y1] = y0 + contract.SCE_MIXED_WIDTH
    plan.y_widths[p] = contract.SCE_MIXED_WIDTH
    K = plan.n_outputs[p]
    mixed = np.stack([rng.integers(0, K, n), rng.integers(0, K, n), rng.random(n)], axis=1)
    plain = random_targets(rng, plan, n)[:, :y0]
    return np.ascontiguousarray(np.hstack([plain, mixed]).astype(plan.dtype))


STORE_TOL = dict(rtol=1e-4, atol=1e-5)


def compare_epochs(plan, X, Y, batch, oracle=reference, epochs=2, tol=STORE_TOL):
    """`epochs` epochs of the same plan on the device and through `oracle`: the per-part loss
    sums, the penalty, the steps and the stop flag; then every parameter, moment and running
    statistic. Returns the device's plan."""
    ref, dev = clone_plan(plan), clone_plan(plan)
    rr = run_epochs(oracle, ref, X, Y, batch, epochs)
    rd = run_epochs(cuda, dev, X, Y, batch, epochs)
    for a, b in zip(rr, rd):
        assert b[2] == a[2] and b[3] == a[3]
        np.testing.assert_allclose(b[0], a[0], rtol=1e-4)
        assert b[1] == pytest.approx(a[1], rel=1e-4, abs=1e-12)
    for name in ("params", "m", "v", "stats"):
        np.testing.assert_allclose(getattr(dev.store, name), getattr(ref.store, name), **tol,
                                   err_msg=name)
    return dev


# The three ways the device trains a single-part plan (kernels/cuda/epoch.py, "Paths"): the
# fused small-MLP path with a whole epoch in one one-block launch (the default for these
# small plans), the fused path with 3 multi-block launches per step, and the tiled path.
PATHS = ["fused-epoch", "fused-step", "tiled"]


def use_path(monkeypatch, path):
    if path == "fused-step":
        monkeypatch.setattr(cuda, "FUSED_EPOCH_MAX_MACS", 0)
    elif path == "tiled":
        monkeypatch.setattr(cuda, "FUSED_MAX_WIDTH", 0)


def path_taken(plan):
    st = plan.cache["cuda"]
    if not st.fused:
        return "tiled"
    return "fused-epoch" if st.one_block_epoch else "fused-step"


TH, RL, LR, SG, LN = (contract.ACT_TANH, contract.ACT_RELU, contract.ACT_LEAKY_RELU,
                      contract.ACT_SIGMOID, contract.ACT_LINEAR)
EPOCH_CASES = {
    "tanh-mse-adam-elasticnet-indrop": dict(
        sizes=(3, 12, 10, 2), acts=[TH, TH, LN], drop=[0.25, 0.25, 0.0], in_drop=0.2,
        loss=contract.LOSS_MSE, opt=contract.OPT_ADAM, l1=1e-3, l2=1e-3),
    "relu-sce-sgd-nesterov-l2": dict(
        sizes=(4, 20, 5), acts=[RL, LN], drop=[0.1, 0.0], loss=contract.LOSS_SCE,
        opt=contract.OPT_SGD, momentum=0.9, nesterov=True, l2=1e-3),
    "sigmoid-bce-adamw-l1-maxnorm-noise": dict(
        sizes=(6, 9, 9, 2), acts=[SG, SG, LN], drop=[0.3, 0.3, 0.0], loss=contract.LOSS_BCE,
        opt=contract.OPT_ADAMW, l1=1e-3, maxnorm=1.0,
        noise=[(contract.NOISE_MUL, 0.3), (contract.NOISE_ADD, 0.2), (contract.NOISE_NONE, 0.0)],
        in_noise=(contract.NOISE_ADD, 0.1)),
    "leaky-mse-sgd-nobias-group": dict(
        sizes=(5, 11, 1), acts=[LR, LN], drop=[0.2, 0.0], loss=contract.LOSS_MSE,
        opt=contract.OPT_SGD, momentum=0.0, l2=1e-4, proximal=False, group=1e-3, bias=False),
}


def _data(rng, plan, n):
    return randn(rng, (n, plan.Ws[0].shape[0]), plan.dtype), random_targets(rng, plan, n)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(EPOCH_CASES))
def test_train_epoch_equals_reference(monkeypatch, name, path):
    use_path(monkeypatch, path)
    rng = fresh_rng()
    plan = random_epoch_plan(rng, **EPOCH_CASES[name])
    X, Y = _data(rng, plan, 24)
    dev = compare_epochs(plan, X, Y, 16)
    assert path_taken(dev) == path


# the same features as the single-part plan (so Numba compiles its epoch once): tanh, input
# dropout on the trunk and on a head, Adam with L1 + L2
NUMBA_HEADS = dict(EPOCH_CASES["tanh-mse-adam-elasticnet-indrop"], sizes=(3, 12),
                   acts=[TH, TH, LN, LN], drop=[0.25, 0.25, 0.0, 0.0],
                   heads=[((10, 2), contract.LOSS_MSE, 0.7, 0.2),
                          ((3,), contract.LOSS_SCE, 1.0, 0.0)])


@pytest.mark.parametrize("path", PATHS + ["heads"])
def test_train_epoch_equals_numba(monkeypatch, path):
    use_path(monkeypatch, path)
    rng = fresh_rng()
    plan = random_epoch_plan(rng, **(NUMBA_HEADS if path == "heads" else
                             EPOCH_CASES["tanh-mse-adam-elasticnet-indrop"]))
    X, Y = _data(rng, plan, 21)
    dev = compare_epochs(plan, X, Y, 8, oracle=numba_backend())
    assert path_taken(dev) == ("tiled" if path == "heads" else path)


@pytest.mark.parametrize("heads", [False, True])
def test_train_epoch_split_path(monkeypatch, heads):
    """Every GEMM, then its elementwise epilogue kernel (the cuBLAS path's structure)."""
    monkeypatch.setattr(cuda, "FORCE_SPLIT", True)
    use_path(monkeypatch, "tiled")
    rng = fresh_rng()
    plan = (_head_plan(rng, "three-heads-sgd-maxnorm-group") if heads else
            random_epoch_plan(rng, **EPOCH_CASES["sigmoid-bce-adamw-l1-maxnorm-noise"]))
    compare_epochs(plan, *_data(rng, plan, 19), 8, epochs=1)


@pytest.mark.parametrize("path", PATHS[:2])
def test_fused_ragged_blocks_and_full_width(monkeypatch, path):
    """Batches that end inside a block (13 rows: blocks of 8 and 5; the last batch 11),
    a layer exactly FUSED_MAX_WIDTH wide, an odd output width, several micro-tiles per
    thread; max-norm and group-lasso columns in the one-block epoch's update."""
    use_path(monkeypatch, path)
    rng = fresh_rng()
    case = dict(EPOCH_CASES["relu-sce-sgd-nesterov-l2"], sizes=(5, cuda.FUSED_MAX_WIDTH, 7, 3),
                acts=[RL, RL, LN], drop=[0.1, 0.1, 0.0], maxnorm=0.8, group=1e-3)
    plan = random_epoch_plan(rng, **case)
    dev = compare_epochs(plan, *_data(rng, plan, 37), 13)
    assert path_taken(dev) == path


@pytest.mark.parametrize("path", PATHS)
def test_mixup_targets(monkeypatch, path):
    """sparse_categorical_crossentropy with Mixup's (label_a, label_b, lam) targets."""
    use_path(monkeypatch, path)
    rng = fresh_rng()
    plan = random_epoch_plan(rng, **EPOCH_CASES["relu-sce-sgd-nesterov-l2"])
    X = randn(rng, (24, 4))
    Y = mixup_targets(rng, plan, 24)
    dev = compare_epochs(plan, X, Y, 16, epochs=1)
    assert path_taken(dev) == path
    plain = clone_plan(plan)        # label_a alone: another loss (the test can tell)
    plain.parts[0, contract.PT_Y1] = 1
    plain.y_widths = [1]
    mixed_loss = run_epochs(reference, clone_plan(plan), X, Y, 16, 1)[0][0][0]
    assert abs(run_epochs(reference, plain, X, Y, 16, 1)[0][0][0] - mixed_loss) > 1e-4 * mixed_loss


def test_input_derivative_epochs():
    """relu read from z (relu_read_from_z) trains bitwise as relu, on the fused path and on
    the tiled one with BatchNorm and noise: its z goes through the pre buffers of the fused,
    GEMM and BatchNorm epilogues."""
    rng = fresh_rng()
    plans = {"fused-epoch": random_epoch_plan(rng, **EPOCH_CASES["relu-sce-sgd-nesterov-l2"]),
             "tiled": random_epoch_plan(rng, sizes=(4, 8, 6, 3), acts=[RL, RL, LN],
                                        bn=[True, False, False], drop=[0.2, 0.2, 0.0],
                                        noise=[(contract.NOISE_NONE, 0.0),
                                               (contract.NOISE_MUL, 0.2),
                                               (contract.NOISE_NONE, 0.0)])}
    for path, plan in plans.items():
        X, Y = _data(rng, plan, 19)
        flagged, plain = clone_plan(plan), clone_plan(plan)
        with relu_read_from_z():
            run_epochs(cuda, flagged, X, Y, 8, epochs=1)
        run_epochs(cuda, plain, X, Y, 8, epochs=1)
        relu = plan.li[:, contract.LI_ACT] == RL
        assert all(np.array(flagged.cache["cuda"].keeps_pre)[relu])
        assert not any(np.array(plain.cache["cuda"].keeps_pre)[relu & (plan.li[:, contract.LI_NOISE]
                                                                       == 0)])
        assert path_taken(flagged) == path
        np.testing.assert_array_equal(flagged.store.params, plain.store.params)


# ---------------------------------------------------------------- trunk and heads
HEAD_CASES = {
    # BatchNorm in the trunk and a head, GaussianDropout on a layer and on a head's input,
    # dropout on both heads' inputs, loss weights, Adam + L1 / L2
    "bn-noise-adam": dict(
        sizes=(4, 9, 6), acts=[TH, RL, LN, TH, LN], bn=[True, False, False, True, False],
        drop=[0.2, 0.0, 0.0, 0.1, 0.0], in_drop=0.1,
        noise=[(contract.NOISE_NONE, 0.0), (contract.NOISE_MUL, 0.3), (contract.NOISE_NONE, 0.0),
               (contract.NOISE_ADD, 0.2), (contract.NOISE_NONE, 0.0)],
        heads=[((2,), contract.LOSS_MSE, 0.7, 0.25), ((5, 3), contract.LOSS_SCE, 1.0, 0.0)],
        opt=contract.OPT_ADAM, l1=1e-3, l2=1e-3),
    # three heads (the third adds its input gradient into the trunk's), SGD with momentum,
    # max-norm and group lasso, a trunk whose weight is not 1, binary CE
    "three-heads-sgd-maxnorm-group": dict(
        sizes=(5, 8), acts=[SG, LR, LN, LN, LN], drop=[0.1, 0.2, 0.0, 0.0, 0.0],
        heads=[((3, 2), contract.LOSS_BCE, 0.5, 0.0), ((2,), contract.LOSS_MSE, 1.0, 0.2),
               ((3,), contract.LOSS_SCE, 2.0, 0.1)],
        opt=contract.OPT_SGD, momentum=0.9, l2=1e-3, maxnorm=1.2, group=1e-3),
    # AdamW, Mixup targets on the sparse CE head
    "adamw-mixup": dict(
        sizes=(3, 7), acts=[RL, TH, LN, LN], drop=[0.2, 0.2, 0.0, 0.0],
        heads=[((4, 2), contract.LOSS_MSE, 1.0, 0.0), ((3,), contract.LOSS_SCE, 0.5, 0.3)],
        opt=contract.OPT_ADAMW, l2=1e-4),
}


def _head_plan(rng, name):
    plan = random_epoch_plan(rng, **HEAD_CASES[name])
    first = int(plan.parts[-1, contract.PT_FIRST])
    if name == "bn-noise-adam":          # GaussianDropout on the last head's input
        plan.li[first, contract.LI_IN_NOISE] = contract.NOISE_MUL
        plan.lf[first, contract.LF_IN_NOISE_STD] = 0.3
    if name == "three-heads-sgd-maxnorm-group":
        plan.partf[0, contract.PF_WEIGHT] = 0.5
    return plan


@pytest.mark.parametrize("name", list(HEAD_CASES))
def test_trunk_and_heads_equal_reference(name):
    """A trunk and heads (kernels/reference/epoch.py) on the tiled path: per-part input
    transforms, target columns, loss weights, the heads' input gradients summed into the
    trunk's, the per-part loss sums. Ragged last batch (19 rows in batches of 8)."""
    rng = fresh_rng()
    plan = _head_plan(rng, name)
    X = randn(rng, (19, plan.Ws[0].shape[0]))
    Y = mixup_targets(rng, plan, 19) if name == "adamw-mixup" else random_targets(rng, plan, 19)
    dev = compare_epochs(plan, X, Y, 8, epochs=2 if name == "bn-noise-adam" else 1)
    assert path_taken(dev) == "tiled"       # a trunk and heads never takes the fused path


def test_path_is_chosen_per_plan():
    """Too wide for the fused kernels (any width, inputs included), BatchNorm (whole-batch
    statistics), or trunk and heads: the tiled path, with the same results. At inference
    (BatchNorm folded) a chain that fits takes the fused forward."""
    rng = fresh_rng()
    width = cuda.FUSED_MAX_WIDTH
    for kw in (dict(sizes=(width + 1, 6, 2)), dict(sizes=(4, width + 1, 2)),
               dict(sizes=(4, 6, 2), bn=[True, False])):
        plan = random_epoch_plan(rng, acts=[LR, LN], opt=contract.OPT_SGD, momentum=0.0, **kw)
        dev = compare_epochs(plan, *_data(rng, plan, 10), 10, epochs=1)
        assert path_taken(dev) == "tiled"
    infer = random_epoch_plan(rng, sizes=(4, 6, 2), bn=[True, False], training=False)
    cuda.forward_inference(infer, randn(rng, (3, 4)), 3)
    assert infer.cache["cuda"].chains[0] is not None


def test_device_state_is_reused_and_invalidated():
    rng = fresh_rng()
    plan = random_epoch_plan(rng, **EPOCH_CASES["relu-sce-sgd-nesterov-l2"])
    X, Y = _data(rng, plan, 16)
    run_epochs(cuda, plan, X, Y, 16, epochs=1)
    st = plan.cache["cuda"]
    Xd = st.dataset(X, Y)[0]
    cuda.train_epoch(plan, X, Y, np.arange(16, dtype=np.int64), 16, 100, 100)
    assert plan.cache["cuda"] is st and st.dataset(X, Y)[0] is Xd   # nothing re-copied
    # the user changes the host weights: invalidate, and the next epoch starts from them
    plan.store.params[...] = 0.0
    cuda.invalidate(plan)
    assert "cuda" not in plan.cache
    cuda.train_epoch(plan, X, Y, np.arange(16, dtype=np.int64), 16, 101, 101)
    cuda.sync_to_host(plan)
    assert 0 < float(np.abs(plan.store.params).max()) < 0.5    # one small step from zero


@pytest.mark.filterwarnings("ignore::RuntimeWarning")   # the simulator computes in NumPy
@pytest.mark.parametrize("path", PATHS + ["heads"])
def test_train_epoch_stops_on_nonfinite_loss(monkeypatch, path):
    """A loss that is not finite stops the epoch before that step's update, as in the
    reference: the steps before it, their losses and weights. Single part: an infinite input
    row (inf and inf - inf in the logits); trunk and heads: a NaN input row, through a
    BatchNorm trunk (whose running statistics keep the first step's values) and
    leaky_relu / relu (NaN stays NaN). The row sits in the second batch."""
    use_path(monkeypatch, path)
    rng = fresh_rng()
    kw = dict(EPOCH_CASES["leaky-mse-sgd-nobias-group"], group=0.0)
    if path == "heads":
        kw.update(sizes=(5, 11), acts=[LR, RL, LN, LN], drop=[0.2, 0.0, 0.0, 0.0],
                  bn=[True, False, False, False],
                  heads=[((3, 1), contract.LOSS_MSE, 1.0, 0.0),
                         ((2,), contract.LOSS_SCE, 1.0, 0.0)])
    plan = random_epoch_plan(rng, **kw)
    X, Y = _data(rng, plan, 32)
    row = np.random.default_rng([1, 0]).permutation(32)[9]     # run_epochs' first order
    X[row] = np.nan if path == "heads" else np.inf
    ref, dev = clone_plan(plan), clone_plan(plan)
    rr = run_epochs(reference, ref, X, Y, 8, epochs=1)[0]
    rd = run_epochs(cuda, dev, X, Y, 8, epochs=1)[0]
    assert rr[3] is False and rd[3] is False
    assert rd[2] == rr[2] == 1
    np.testing.assert_allclose(rd[0], rr[0], rtol=1e-4)
    for name in ("params", "stats"):
        np.testing.assert_allclose(getattr(dev.store, name), getattr(ref.store, name),
                                   **STORE_TOL)
    assert path == "heads" or path_taken(dev) == path


@pytest.mark.parametrize("path", ["fused-step", "tiled"])
def test_forward_inference_equals_reference(monkeypatch, path):
    """Logits of every part of an inference plan (BatchNorm folded into W, b of one layer,
    as the API does), in chunks with a ragged last one; the fused forward for chains that
    fit it."""
    use_path(monkeypatch, path)
    rng = fresh_rng()
    train = random_epoch_plan(rng, **HEAD_CASES["three-heads-sgd-maxnorm-group"])
    folded = {1: (randn(rng, train.Ws[1].shape, scale=0.3), randn(rng, train.Ws[1].shape[1]))}
    infer = make_plan(train.store, train.li, train.lf, train.hpW, train.hpb, train.hpgb,
                      train.parts, train.partf, train.opt, train.seed, training=False,
                      folded=folded)
    X = randn(rng, (45, train.Ws[0].shape[0]))
    H = reference.forward_inference(infer, X, 16, part=0)
    for part, x in ((0, X), (1, H), (3, H)):
        assert_close(cuda.forward_inference(infer, x, 16, part),
                     reference.forward_inference(infer, x, 16, part))
        assert (infer.cache["cuda"].chains[part] is not None) == (path != "tiled")


@pytest.mark.parametrize("path", ["fused-epoch", "tiled"])
def test_nan_input_propagates_through_relu_inference(monkeypatch, path):
    use_path(monkeypatch, path)
    rng = fresh_rng()
    plan = random_epoch_plan(rng, sizes=(3, 6, 2), acts=[RL, LN], training=False)
    X = randn(rng, (5, 3))
    X[1, 0] = np.nan
    out = cuda.forward_inference(plan, X, 5)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(reference.forward_inference(plan, X, 5)))
    assert np.isnan(out[1]).all() and not np.isnan(out[[0, 2, 3, 4]]).any()


# ---------------------------------------------------------------- real compilation, no GPU
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("FASTREG_TEST_PTX") == "0",
                    reason="FASTREG_TEST_PTX=0: the PTX compile check (about 1 min) is off")
def test_kernels_compile_to_ptx():
    """The simulator runs kernels as Python and never type-checks them: compile them all with
    NVVM (no GPU needed), float32 and float64, in a process without the simulator."""
    res = _run("import sys; from fastreg.kernels.cuda import ptxcheck as p; "
               "sys.exit(max(p.main(['float32']), p.main(['float64'])))",
               NUMBA_ENABLE_CUDASIM=None)
    if res.returncode == 77:
        pytest.skip(res.stdout.strip())
    assert res.returncode == 0, res.stdout + res.stderr
    assert "FAIL" not in res.stdout and res.stdout.count("ok ") == 2 * 25, res.stdout
