"""The activations beyond relu / tanh / sigmoid (gelu, gelu_tanh, elu, selu, silu / swish,
softplus, mish, hard_sigmoid), "softmax" on a categorical model's last Dense, and
AlphaDropout: the reference against calculus (float64 central differences) and against
torch.nn.functional, every backend against the reference, the front end's rules.

test_kernels.py runs every backend over the whole activation and noise tables inside the
dense / BatchNorm kernels; this file adds the values a table-driven test does not pick:
the tails (|z| up to 60, +-inf, NaN), the torch peer, AlphaDropout's statistics and masks.
"""
import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract
from fastreg.kernels import reference
from fastreg.kernels.philox import dropout_scale, dropout_threshold

from netutil import available_backends, central_difference, fresh_rng, randn

NEW = ["gelu", "gelu_tanh", "elu", "selu", "silu", "softplus", "mish", "hard_sigmoid"]
COMPILED = ["numba", "cython", "cuda"]
ELU_ALPHA = 0.7          # not 1: the parameter must reach the kernels


def _code(name):
    return contract.ACTIVATIONS[name]


def _param(name):
    return ELU_ALPHA if name == "elu" else 0.01


def _grad_arg(name, z, a):
    """What backward keeps for f' (the table's grad_from): z itself or the output f(z)."""
    return z if contract.ACTIVATION_BY_CODE[_code(name)].grad_from == "input" else a


def _torch_f(name, alpha=ELU_ALPHA):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    return {"gelu": lambda z: F.gelu(z), "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
            "elu": lambda z: F.elu(z, alpha=alpha), "selu": F.selu, "silu": F.silu,
            "softplus": F.softplus, "mish": F.mish, "hard_sigmoid": F.hardsigmoid}[name]


def _tails(dtype):
    """Values a random draw rarely hits: the tails, near the kinks, signed zeros, inf, NaN."""
    v = [-60, -35, -20, -9, -6, -3.5, -3, -2.9, -1e-3, -1e-8, -0.0, 0.0, 1e-8, 1e-3, 2.9, 3,
         3.5, 6, 9, 20, 35, 60, np.inf, -np.inf, np.nan]
    return np.array(v, dtype)


# ---------------------------------------------------------------- the reference, by calculus
@pytest.mark.parametrize("name", NEW)
def test_reference_derivative_is_the_central_difference_in_float64(name):
    rng = fresh_rng()
    z = rng.standard_normal(300) * 3
    z = z[(np.abs(z) > 1e-3) & (np.abs(z + 3) > 1e-3) & (np.abs(z - 3) > 1e-3)]  # off kinks
    code, p = _code(name), _param(name)
    got = reference.activation_grad(_grad_arg(name, z, reference.activation(z, code, p)), code, p)
    num = (reference.activation(z + 1e-6, code, p) - reference.activation(z - 1e-6, code, p)) / 2e-6
    np.testing.assert_allclose(got, num, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", NEW)
def test_reference_is_finite_in_the_tails_and_keeps_nan(name):
    """Stable forms: no overflow to inf or NaN for large |z| (softplus, the erfc CDF, expm1),
    the derivative too; +-inf gives f's limit, NaN stays NaN."""
    for dtype in (np.float32, np.float64):
        z = _tails(dtype)
        code, p = _code(name), _param(name)
        with np.errstate(invalid="ignore", over="ignore"):    # -inf * Phi(-inf) = NaN, as torch
            a = reference.activation(z, code, p)
            d = reference.activation_grad(_grad_arg(name, z, a), code, p)
        assert a.dtype == dtype and d.dtype == dtype
        finite = np.isfinite(z)
        assert np.isfinite(a[finite]).all() and np.isfinite(d[finite]).all()
        assert np.isnan(a[-1])
        # f'(NaN): NaN, but 0 for the piecewise-constant hard_sigmoid (as relu's, and torch's
        # mask (x > -3) & (x < 3)): its output is NaN already, the gradient below it too
        assert np.isnan(d[-1]) != (name == "hard_sigmoid")


# ---------------------------------------------------------------- against torch.nn.functional
@pytest.mark.parametrize("name", NEW)
def test_reference_equals_torch_functional_and_autograd(name):
    """f and f' against torch's forward and autograd, float64 (the formulas) and float32
    (the rounding of a few operations), on random values and the finite tails."""
    torch = pytest.importorskip("torch")
    f = _torch_f(name)
    rng = fresh_rng()
    z = np.concatenate([rng.standard_normal(500) * 4, _tails(np.float64)[:-3]])
    z = z[(np.abs(z + 3) > 1e-3) & (np.abs(z - 3) > 1e-3)]         # hard_sigmoid's kinks
    code, p = _code(name), _param(name)
    # |ours - torch| / max(|torch|, 1): f' is O(1) where f's tails are tiny, and seen here:
    # about 1e-15 in float64, 1e-6 in float32 (torch's float64 hardsigmoid backward uses a
    # float32 1/6: 5e-9)
    for dtype, tol in ((np.float64, 1e-8 if name == "hard_sigmoid" else 1e-12),
                       (np.float32, 4e-6)):
        zd = z.astype(dtype)
        t = torch.from_numpy(zd.copy()).requires_grad_(True)
        out = f(t)
        out.sum().backward()
        a = reference.activation(zd, code, p)
        d = reference.activation_grad(_grad_arg(name, zd, a), code, p)
        for ours, theirs in ((a, out.detach().numpy()), (d, t.grad.numpy())):
            err = np.abs(ours.astype(np.float64) - theirs) / np.maximum(np.abs(theirs), 1.0)
            assert err.max() <= tol, (dtype.__name__, float(err.max()))


# ---------------------------------------------------------------- every backend, the reference
def _elementwise(ops, z, code, p, dtype):
    """f(z) and g * f'(z) through a backend's dense kernels: one input, W = 1, b = 0 per
    column block, so z reaches the epilogue exactly (also +-inf and NaN)."""
    x = z.reshape(-1, 1).astype(dtype)
    W = np.ones((1, 1), dtype)
    b = np.zeros(1, dtype)
    out = np.zeros_like(x)
    pre = (np.zeros_like(x) if contract.keeps_pre(code, contract.NOISE_NONE)
           else np.zeros((0, 1), dtype))
    ops.dense_forward(x, W, b, out, code, p, 0, 1.0, 0, 0, 0, contract.NOISE_NONE, 0.0, pre)
    g = np.full_like(x, 0.75)
    dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
    ops.dense_backward(g, out, x, W, dW, db, dx, code, p, 0, 1.0, 0, 0, 0, contract.NOISE_NONE, 0.0,
                       pre)
    return out[:, 0], dx[:, 0]


@pytest.mark.parametrize("name", NEW)
def test_every_backend_equals_the_reference_elementwise(name):
    """Fresh random values and the tails through every backend's kernels: float32 (and
    float64 on the CPU) tolerance, NaN and inf where the reference has them."""
    rng = fresh_rng()
    z = np.concatenate([rng.standard_normal(200) * 5, _tails(np.float64)])
    code, p = _code(name), _param(name)
    backends = available_backends(COMPILED)
    assert backends, "no compiled backend can run here"
    for bname, K in backends:
        for dtype in (np.float32,) if bname == "cuda" else (np.float32, np.float64):
            want = _elementwise(reference, z, code, p, dtype)
            got = _elementwise(K, z, code, p, dtype)
            # atol: a few ulps of 1, f' is O(1) and its tails are differences near 1
            # (gelu_tanh's 1 + tanh near -1), which libm / NumPy / libdevice round apart
            tol = dict(rtol=2e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13,
                                                                              atol=2e-14)
            for g, w in zip(got, want):
                np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=bname)
                np.testing.assert_allclose(g, w, err_msg=f"{bname} {dtype.__name__}", **tol)


@pytest.mark.parametrize("name", NEW)
def test_pre_activation_is_kept_and_counted_where_f_prime_needs_it(name):
    """grad_from="input": backward reads z (the pre buffer), and the kept bytes count it."""
    model = fr.Sequential([fr.Dense(8, name), fr.Dense(2)], input_dim=3, seed=0)
    model.compile(backend="numpy")
    net = model._network.training_plan(model.optimizer, 16, [2])
    needs_z = contract.ACTIVATION_BY_CODE[_code(name)].grad_from == "input"
    assert [p.shape[0] for p in net.pres] == [16 if needs_z else 0, 0]
    assert net.kept_bytes_per_element() == pytest.approx(4 * (10 + (8 if needs_z else 0)) / 10)


# ---------------------------------------------------------------- whole models, vs torch
def _torch_copy(model, names):
    torch = pytest.importorskip("torch")
    weights = model.get_weights()
    mods = []
    for i in range(len(weights) // 2):
        W, b = weights[2 * i], weights[2 * i + 1]
        lin = torch.nn.Linear(*W.shape)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
        mods.append(lin)
        if i < len(names):
            f = _torch_f(names[i])
            mods.append(torch.nn.Module())
            mods[-1].forward = f
    return torch.nn.Sequential(*mods)


@pytest.mark.parametrize("name", NEW)
def test_training_follows_pytorch(name):
    """The same net, the same weights, Adam on mse for 8 steps (dropout off): the weights
    agree with torch's to float32 rounding, so f and f' are torch's in the whole loop."""
    torch = pytest.importorskip("torch")
    rng = fresh_rng()
    X, y = randn(rng, (64, 5)), randn(rng, (64, 2))
    alpha = {"alpha": ELU_ALPHA} if name == "elu" else {}
    model = fr.Sequential([fr.Dense(12, name, **alpha), fr.Dense(9, name, **alpha),
                           fr.Dense(2)], input_dim=5, seed=1)
    model.compile(loss="mse", optimizer=fr.Adam(1e-2))
    peer = _torch_copy(model, [name, name])
    opt = torch.optim.Adam(peer.parameters(), lr=1e-2)
    for s in range(8):
        sl = slice(8 * s, 8 * s + 8)
        opt.zero_grad()
        torch.nn.functional.mse_loss(peer(torch.from_numpy(X[sl])),
                                     torch.from_numpy(y[sl])).backward()
        opt.step()
    model.fit(X, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    lins = [m for m in peer if isinstance(m, torch.nn.Linear)]
    want = [a for m in lins for a in (m.weight.detach().numpy().T, m.bias.detach().numpy())]
    for got, w in zip(model.get_weights(), want):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", NEW)
def test_export_peers_equal_predict(name):
    """to_torch and ONNX (onnxruntime) give predict's outputs for every new activation."""
    rng = fresh_rng()
    X = randn(rng, (50, 4)) * 3
    model = fr.Sequential([fr.Dense(10, name, alpha=ELU_ALPHA), fr.Dense(7, name),
                           fr.Dense(2)], input_dim=4, seed=2)
    model.compile()
    want = model.predict(X)
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        got = model.to_torch()(torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fastreg import export
    session = ort.InferenceSession(export.to_onnx(model).SerializeToString())
    np.testing.assert_allclose(session.run(None, {"input": X})[0], want, rtol=2e-5, atol=2e-6)


def test_swish_is_silu_and_saves_as_given():
    a = fr.Sequential([fr.Dense(4, "swish"), fr.Dense(1)], input_dim=3, seed=5)
    b = fr.Sequential([fr.Dense(4, "silu"), fr.Dense(1)], input_dim=3, seed=5)
    X = randn(fresh_rng(), (20, 3))
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def test_unknown_activation_and_bad_alpha_are_refused():
    with pytest.raises(ValueError, match="unknown activation 'gelu_fast'.*mish"):
        fr.Dense(3, "gelu_fast")
    with pytest.raises(ValueError, match="elu's alpha"):
        fr.Dense(3, "elu", alpha=float("nan"))


# ---------------------------------------------------------------- softmax on the last Dense
def _classes(rng, n=96, k=3):
    X = randn(rng, (n, 4))
    return X, rng.integers(0, k, n)


@pytest.mark.parametrize("loss", ["sparse_categorical_crossentropy", "categorical_crossentropy"])
def test_softmax_last_layer_is_the_logits_path(loss):
    """softmax on the last Dense trains exactly as the linear last Dense (the loss fuses the
    softmax either way) and predict returns the same probabilities."""
    rng = fresh_rng()
    X, labels = _classes(rng)
    y = labels if loss.startswith("sparse") else np.eye(3, dtype=np.float32)[labels]
    preds, weights = [], []
    for last in ("softmax", None):
        model = fr.Sequential([fr.Dense(8, "gelu"), fr.Dense(3, last)], input_dim=4, seed=4)
        model.compile(loss=loss, optimizer=fr.Adam(1e-2))
        model.fit(X, y, epochs=2, batch_size=32, verbose=0)
        preds.append(model.predict(X))
        weights.append(model.get_weights())
    for a, b in zip(weights[0], weights[1]):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(preds[0], preds[1])
    np.testing.assert_allclose(preds[0].sum(axis=1), 1, rtol=1e-5)


def test_softmax_last_layer_uncompiled_predict_and_export():
    rng = fresh_rng()
    X = randn(rng, (30, 4))
    model = fr.Sequential([fr.Dense(6, "tanh"), fr.Dense(3, "softmax")], input_dim=4, seed=0)
    p = model.predict(X)
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=1e-5)
    model.compile(loss="categorical_crossentropy")
    np.testing.assert_array_equal(model.predict(X), p)
    torch = pytest.importorskip("torch")
    peer = model.to_torch()
    assert sum(isinstance(m, torch.nn.Softmax) for m in peer) == 1    # not twice
    with torch.no_grad():
        np.testing.assert_allclose(peer(torch.from_numpy(X)).numpy(), p, rtol=2e-5, atol=2e-6)


def test_softmax_anywhere_else_is_a_clear_error_and_the_model_is_untouched():
    with pytest.raises(ValueError, match="softmax is only accepted on the last Dense"):
        fr.Sequential([fr.Dense(4, "softmax"), fr.Dense(2)], input_dim=3)
    model = fr.Sequential([fr.Dense(4, "softmax")], seed=0)
    with pytest.raises(ValueError, match="softmax is only accepted on the last Dense"):
        model.add(fr.Dense(2))
    assert len(model.layers) == 1
    for loss in ("mse", "binary_crossentropy", "poisson", fr.losses.Huber(0.5)):
        m = fr.Sequential([fr.Dense(4, "relu"), fr.Dense(3, "softmax")], input_dim=3)
        with pytest.raises(ValueError, match="softmax on the last Dense needs a categorical"):
            m.compile(loss=loss)
        assert m.loss is None and m.optimizer is None
    with pytest.raises(ValueError, match="no dropout"):
        fr.Sequential([fr.Dense(3, "softmax", dropout=0.2)], input_dim=3)
    with pytest.raises(ValueError, match="not on the trunk"):
        fr.MultiTask(trunk=[fr.Dense(4, "softmax")],
                     heads={"a": ([fr.Dense(2)], "sparse_categorical_crossentropy")},
                     input_dim=3)
    # a categorical head may end with softmax
    fr.MultiTask(trunk=[fr.Dense(4, "relu")],
                 heads={"a": ([fr.Dense(2, "softmax")], "sparse_categorical_crossentropy")},
                 input_dim=3)


# ---------------------------------------------------------------- AlphaDropout
def _alpha_kernel(ops, x, rate, dtype, seed=9, step=2, act=contract.ACT_LINEAR):
    """x through a backend's dense kernel (W = identity, b = 0) with AlphaDropout(rate) on
    its output, and the gradient of sum(g * out) with respect to x."""
    n = x.shape[1]
    layer = fr.AlphaDropout(rate)
    W, b = np.eye(n, dtype=dtype), np.zeros(n, dtype)
    out = np.zeros_like(x)
    pre = (np.zeros_like(x) if contract.keeps_pre(act, contract.NOISE_ALPHA)
           else np.zeros((0, n), dtype))
    args = (act, 0.01, dropout_threshold(rate), dtype(layer.scale), seed, step, 1,
            contract.NOISE_ALPHA, dtype(layer.shift))
    ops.dense_forward(x, W, b, out, *args, pre)
    g = np.full_like(x, 1.0)
    dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
    ops.dense_backward(g, out, x, W, dW, db, dx, *args, pre)
    return out, dx


def test_alpha_dropout_keeps_zero_mean_and_unit_variance():
    """The affine a, b restore mean 0 and variance 1 of standard inputs (the point of
    AlphaDropout), where plain dropout values would not; the seed fixes the masks."""
    x = np.random.default_rng(0).standard_normal((2000, 100))
    for rate in (0.1, 0.3, 0.5):
        out, _ = _alpha_kernel(reference, x, rate, np.float64)
        assert abs(out.mean()) < 0.01 and abs(out.var() - 1) < 0.01
        dropped = np.isclose(out, fr.AlphaDropout(rate).scale * contract.ALPHA_DROPPED
                             + fr.AlphaDropout(rate).shift, rtol=0, atol=1e-12)
        assert abs(dropped.mean() - rate) < 0.01


def test_alpha_dropout_values_are_torchs_for_torchs_mask():
    """torch.nn.functional.alpha_dropout's output, its mask read off: the kept values
    a * x + b and the dropped value a * alpha' + b are ours (a, b as Keras and torch)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).standard_normal((400, 50))
    for rate in (0.2, 0.5):
        layer = fr.AlphaDropout(rate)
        t = torch.nn.functional.alpha_dropout(torch.from_numpy(x), rate, training=True).numpy()
        kept = np.isclose(t, layer.scale * x + layer.shift, rtol=0, atol=1e-12)
        assert 0.4 < kept.mean() < 0.9
        np.testing.assert_allclose(t[~kept], layer.scale * contract.ALPHA_DROPPED + layer.shift,
                                   rtol=1e-14)


def test_alpha_dropout_uses_the_dropout_mask_on_every_backend():
    """The units AlphaDropout(rate) drops are the ones Dropout(rate) drops at the same place
    (the dropout stream, the same bits) on every backend; values and gradients are the
    reference's, the gradient scale where kept and 0 where dropped."""
    rng = fresh_rng()
    rate = 0.3
    x = randn(rng, (37, 23), np.float32)
    W, b = np.eye(23, dtype=np.float32), np.zeros(23, np.float32)
    drop = np.zeros_like(x)
    reference.dense_forward(x, W, b, drop, contract.ACT_LINEAR, 0.0, dropout_threshold(rate),
                            dropout_scale(rate, np.float32), 9, 2, 1, contract.NOISE_NONE, 0.0)
    want, want_dx = _alpha_kernel(reference, x, rate, np.float32)
    layer = fr.AlphaDropout(rate)
    np.testing.assert_array_equal(want_dx == 0, drop == 0)
    np.testing.assert_allclose(want_dx[drop != 0], layer.scale, rtol=1e-6)
    for name, K in available_backends(COMPILED):
        got, got_dx = _alpha_kernel(K, x, rate, np.float32)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-7, err_msg=name)
        np.testing.assert_array_equal(got_dx, want_dx, err_msg=name)


def test_alpha_dropout_gradient_is_the_central_difference():
    """Through a selu layer (f' read from the kept f(z)) and AlphaDropout, float64."""
    rng = fresh_rng()
    x = randn(rng, (6, 4), np.float64)
    W, b = randn(rng, (4, 5), np.float64), randn(rng, 5, np.float64, 0.1)
    g = randn(rng, (6, 5), np.float64)
    layer = fr.AlphaDropout(0.4)
    args = (contract.ACT_SELU, 0.0, dropout_threshold(0.4), layer.scale, 3, 1, 0,
            contract.NOISE_ALPHA, layer.shift)

    def value():
        out, pre = np.zeros((6, 5)), np.zeros((6, 5))
        reference.dense_forward(x, W, b, out, *args, pre)
        return float((g * out).sum())
    out, pre = np.zeros((6, 5)), np.zeros((6, 5))
    reference.dense_forward(x, W, b, out, *args, pre)
    dW, db, dx = np.zeros_like(W), np.zeros_like(b), np.zeros_like(x)
    reference.dense_backward(g.copy(), out, x, W, dW, db, dx, *args, pre)
    for p, d in ((W, dW), (b, db), (x, dx)):
        np.testing.assert_allclose(d, central_difference(value, p), rtol=1e-6, atol=1e-8)


def _selu_net(layer, seed=3):
    return fr.Sequential([fr.Dense(16, "selu"), layer, fr.Dense(1)], input_dim=4, seed=seed)


def test_alpha_dropout_model_same_seed_same_weights_on_every_cpu_backend():
    rng = np.random.default_rng(0)
    X, y = randn(rng, (64, 4)), randn(rng, (64, 1))
    weights = {}
    for name in ["numpy"] + [n for n, _ in available_backends(["numba", "cython"])]:
        model = _selu_net(fr.AlphaDropout(0.2))
        model.compile(optimizer=fr.Adam(1e-2), backend=name)
        model.fit(X, y, epochs=2, batch_size=16, verbose=0)
        weights[name] = model.get_weights()
    for name, ws in weights.items():
        for a, b in zip(ws, weights["numpy"]):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
    off = _selu_net(fr.Dropout(0.0))
    off.compile(optimizer=fr.Adam(1e-2), backend="numpy")
    off.fit(X, y, epochs=2, batch_size=16, verbose=0)
    assert any(not np.allclose(a, b) for a, b in zip(off.get_weights(), weights["numpy"]))


def test_alpha_dropout_is_identity_at_inference_and_saves(tmp_path):
    rng = fresh_rng()
    X = randn(rng, (40, 4))
    with_ad, without = _selu_net(fr.AlphaDropout(0.3)), _selu_net(fr.Dropout(0.0))
    np.testing.assert_array_equal(with_ad.predict(X), without.predict(X))
    with_ad.compile()
    with_ad.fit(X, randn(rng, (40, 1)), epochs=1, batch_size=8, verbose=0)
    with_ad.save(tmp_path / "m")
    loaded = fr.load_model(tmp_path / "m")
    assert isinstance(loaded.layers[1], fr.AlphaDropout) and loaded.layers[1].rate == 0.3
    np.testing.assert_array_equal(loaded.predict(X), with_ad.predict(X))
    torch = pytest.importorskip("torch")
    assert any(isinstance(m, torch.nn.AlphaDropout) for m in with_ad.to_torch())


def test_alpha_dropout_misuse_is_a_clear_error_and_the_model_is_untouched():
    for rate in (-0.1, 1.0, float("nan"), "0.2"):
        with pytest.raises((ValueError, TypeError), match="AlphaDropout rate"):
            fr.AlphaDropout(rate)
    model = fr.Sequential([fr.Dense(4, "selu"), fr.AlphaDropout(0.2)])
    for bad in (fr.Dropout(0.1), fr.GaussianNoise(0.1)):
        with pytest.raises(ValueError, match="AlphaDropout"):
            model.add(bad)
        assert len(model.layers) == 2
    with pytest.raises(ValueError, match="AlphaDropout is that output's dropout"):
        fr.Sequential([fr.Dense(4, "selu", dropout=0.1), fr.AlphaDropout(0.2)], input_dim=3)
    with pytest.raises(ValueError, match="AlphaDropout is that output's dropout"):
        fr.Sequential([fr.Dropout(0.1), fr.AlphaDropout(0.2), fr.Dense(2)], input_dim=3)


def test_keras_peer_equals_predict():
    """to_keras for every new activation, AlphaDropout (Keras' own layer) and a softmax last
    Dense (one Softmax, not two)."""
    from test_export import _keras
    keras = _keras()
    X = randn(fresh_rng(), (40, 4)) * 2
    models = [fr.Sequential([fr.Dense(8, name, alpha=ELU_ALPHA), fr.Dense(2)], input_dim=4,
                            seed=1) for name in NEW]
    models.append(fr.Sequential([fr.Dense(8, "selu"), fr.AlphaDropout(0.2), fr.Dense(2)],
                                input_dim=4, seed=1))
    models.append(fr.Sequential([fr.Dense(8, "tanh"), fr.Dense(3, "softmax")], input_dim=4,
                                seed=1))
    for model in models:
        model.compile(loss="categorical_crossentropy" if model.layers[-1].units == 3
                      else "mse")
        peer = model.to_keras()
        np.testing.assert_allclose(peer.predict(X, verbose=0), model.predict(X), rtol=2e-5,
                                   atol=2e-6)
    kinds = [type(layer).__name__ for layer in peer.layers]
    assert kinds.count("Softmax") == 1
    assert any(isinstance(la, keras.layers.AlphaDropout) for la in models[-2].to_keras().layers)


def test_mc_dropout_samples_alpha_dropout_alike_on_the_cpu_backends():
    """predict(mc_samples=...) draws AlphaDropout's masks as it draws Dropout's: a spread
    around the deterministic output, the same (mean, std) on every backend for a seed."""
    X = randn(fresh_rng(), (20, 4))
    results = {}
    for name in ["numpy"] + [n for n, _ in available_backends(["numba", "cython"])]:
        model = _selu_net(fr.AlphaDropout(0.3), seed=0)
        model.compile(backend=name)
        results[name] = model.predict(X, mc_samples=30, seed=1)
    mean, std = results["numpy"]
    assert (std > 0).all()
    for name, (m, s) in results.items():
        np.testing.assert_allclose(m, mean, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(s, std, rtol=2e-5, atol=2e-6, err_msg=name)
