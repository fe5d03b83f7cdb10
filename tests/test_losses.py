"""The losses beyond mse / binary / sparse cross-entropy (mae, huber, log_cosh,
categorical_crossentropy, poisson), label smoothing, multi-label binary cross-entropy, and
fastreg.losses: the reference against calculus (float64 central differences) and torch.nn's
losses, every backend against the reference with the loss parameters, the front end
(compile, targets, saving, export).

test_kernels.py runs every backend over the loss table at the default parameters; here the
parameters (huber's delta, label smoothing, with Mixup) and torch's numbers.
"""
import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract
from fastreg.kernels import reference

from netutil import available_backends, central_difference, fresh_rng, randn
from planutil import targets_for

COMPILED = ["numba", "cython", "cuda"]
B, K = 23, 5

# (loss code, parameter, id): the parameters a default-only table test never sets
CASES = [(contract.LOSS_MAE, None, "mae"), (contract.LOSS_HUBER, None, "huber"),
         (contract.LOSS_HUBER, 0.3, "huber-0.3"), (contract.LOSS_LOG_COSH, None, "log_cosh"),
         (contract.LOSS_CCE, None, "cce"), (contract.LOSS_CCE, 0.1, "cce-ls0.1"),
         (contract.LOSS_SCE, 0.1, "sce-ls0.1"), (contract.LOSS_SCE, 0.2, "sce-ls0.2-mixup"),
         (contract.LOSS_BCE, None, "bce-multilabel"), (contract.LOSS_POISSON, None, "poisson")]
IDS = [c[2] for c in CASES]


def _targets(rng, loss, case_id, n=B, k=K, dtype=np.float64):
    if case_id.endswith("mixup"):
        return np.stack([rng.integers(0, k, n), rng.integers(0, k, n), rng.random(n)],
                        axis=1).astype(dtype)
    if case_id == "bce-multilabel":
        return (rng.random((n, k)) < 0.4).astype(dtype)
    return targets_for(rng, loss, n, k, dtype)


def _logits(rng, dtype=np.float64):
    z = randn(rng, (B, K), dtype, 2.0)
    return z


# ---------------------------------------------------------------- the reference, by calculus
@pytest.mark.parametrize("loss,param,case_id", CASES, ids=IDS)
def test_reference_gradient_is_the_central_difference_in_float64(loss, param, case_id):
    rng = fresh_rng()
    z, y = _logits(rng), _targets(rng, loss, case_id)
    if loss in (contract.LOSS_MAE, contract.LOSS_HUBER):     # off the kinks |d| = 0 and |d| = delta
        d = z - y
        z[np.abs(np.abs(d) - (param or 1.0)) < 1e-3] += 0.01
        z[np.abs(d) < 1e-3] += 0.01
    g = np.zeros_like(z)
    value = reference.loss_forward_backward(z, y, g, loss, param)
    assert value == pytest.approx(reference.loss_value(z, y, loss, param), rel=1e-15)
    num = central_difference(lambda: reference.loss_value(z, y, loss, param), z)
    np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-9)


def test_reference_huber_and_log_cosh_are_finite_for_large_differences():
    z = np.array([[1e4, -1e4, 500.0, -800.0]])
    y = np.zeros_like(z)
    for loss in (contract.LOSS_HUBER, contract.LOSS_LOG_COSH, contract.LOSS_MAE):
        g = np.zeros_like(z)
        assert np.isfinite(reference.loss_forward_backward(z, y, g, loss))
        assert np.isfinite(g).all()
    # log cosh(d) = |d| - log 2 for large |d|
    assert reference.loss_value(z, y, contract.LOSS_LOG_COSH) == pytest.approx(
        float(np.mean(np.abs(z))) - np.log(2.0), rel=1e-12)


def test_one_hot_categorical_is_the_sparse_one():
    """categorical_crossentropy on one-hot rows = the sparse loss on the labels: value and
    gradient, with and without label smoothing."""
    rng = fresh_rng()
    z = _logits(rng)
    labels = rng.integers(0, K, B)
    for ls in (0.0, 0.15):
        g1, g2 = np.zeros_like(z), np.zeros_like(z)
        v1 = reference.loss_forward_backward(z, np.eye(K)[labels], g1, contract.LOSS_CCE, ls)
        v2 = reference.loss_forward_backward(
            z, labels[:, None].astype(float), g2, contract.LOSS_SCE, ls)
        assert v1 == pytest.approx(v2, rel=1e-12)
        np.testing.assert_allclose(g1, g2, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- against torch.nn
def _torch_loss(loss, param, case_id, z, y):
    """torch's value of the same loss on the same logits (a tensor with grad)."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    yt = torch.from_numpy(y)
    if loss == contract.LOSS_MAE:
        return nn.L1Loss()(z, yt)
    if loss == contract.LOSS_HUBER:
        return nn.HuberLoss(delta=1.0 if param is None else param)(z, yt)
    if loss == contract.LOSS_LOG_COSH:      # torch has no log-cosh loss: its definition
        return torch.log(torch.cosh(z - yt)).mean()
    if loss == contract.LOSS_POISSON:
        return nn.PoissonNLLLoss(log_input=True, full=False)(z, yt)
    if loss == contract.LOSS_BCE:
        return nn.BCEWithLogitsLoss()(z, yt)
    ls = param or 0.0
    if loss == contract.LOSS_CCE:           # probabilities as targets
        return nn.CrossEntropyLoss(label_smoothing=ls)(z, yt)
    ce = nn.CrossEntropyLoss(label_smoothing=ls)
    if case_id.endswith("mixup"):
        lam = yt[:, contract.SCE_LAM]
        per_a = nn.CrossEntropyLoss(label_smoothing=ls, reduction="none")(
            z, yt[:, contract.SCE_LABEL].long())
        per_b = nn.CrossEntropyLoss(label_smoothing=ls, reduction="none")(
            z, yt[:, contract.SCE_LABEL_B].long())
        return (lam * per_a + (1 - lam) * per_b).mean()
    return ce(z, yt[:, 0].long())


def _rel(a, b):
    """|a - b| / max(|b|, 1) at its largest."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1.0)))


@pytest.mark.parametrize("loss,param,case_id", CASES, ids=IDS)
def test_reference_equals_torch_value_and_gradient(loss, param, case_id):
    """The loss and its gradient against torch.nn's loss and autograd: float64 (the formula;
    seen: about 1e-16) and float32 (rounding; seen: about 1e-7)."""
    torch = pytest.importorskip("torch")
    rng = fresh_rng()
    for dtype, tol in ((np.float64, 1e-12), (np.float32, 2e-6)):
        z, y = _logits(rng, dtype), _targets(rng, loss, case_id, dtype=dtype)
        zt = torch.from_numpy(z.copy()).requires_grad_(True)
        want = _torch_loss(loss, param, case_id, zt, y)
        want.backward()
        g = np.zeros_like(z)
        value = reference.loss_forward_backward(z, y, g, loss, param)
        assert _rel(value, want.item()) <= tol, (dtype.__name__, value, want.item())
        assert _rel(g, zt.grad.numpy()) <= tol / 10 + 1e-7, dtype.__name__


# ---------------------------------------------------------------- every backend, the reference
@pytest.mark.parametrize("loss,param,case_id", CASES, ids=IDS)
def test_every_backend_equals_the_reference(loss, param, case_id):
    rng = fresh_rng()
    backends = available_backends(COMPILED)
    assert backends, "no compiled backend can run here"
    for name, K_ in backends:
        for dtype in (np.float32, np.float64):
            z = _logits(rng, dtype) * 1.5
            y = _targets(rng, loss, case_id, dtype=dtype)
            gr, gk = np.zeros_like(z), np.zeros_like(z)
            vr = reference.loss_forward_backward(z, y, gr, loss, param)
            vk = K_.loss_forward_backward(z, y, gk, loss, param)
            assert vk == pytest.approx(vr, rel=1e-6), name
            assert K_.loss_value(z, y, loss, param) == pytest.approx(vr, rel=1e-6), name
            tol = dict(rtol=2e-5, atol=2e-7) if dtype == np.float32 else dict(rtol=1e-12,
                                                                              atol=1e-15)
            np.testing.assert_allclose(gk, gr, err_msg=f"{name} {dtype.__name__}", **tol)
            np.testing.assert_allclose(K_.output_transform(z, loss),
                                       reference.output_transform(z, loss), **tol)


# ---------------------------------------------------------------- the front end
def _fit(loss, y, units, backend="numpy", last=None, epochs=2, seed=3, X=None):
    X = randn(np.random.default_rng(7), (96, 4)) if X is None else X
    model = fr.Sequential([fr.Dense(8, "tanh"), fr.Dense(units, last)], input_dim=4,
                          seed=seed)
    model.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    model.fit(X, y, epochs=epochs, batch_size=32, verbose=0)
    return model, X


def _model_cases():
    rng = np.random.default_rng(11)
    labels = rng.integers(0, 3, 96)
    soft = rng.random((96, 3)) ** 2
    return {
        "mae": ("mae", randn(rng, (96, 2)), 2),
        "huber": (fr.losses.Huber(delta=0.5), randn(rng, (96, 2)) * 2, 2),
        "log_cosh": ("log_cosh", randn(rng, (96, 2)), 2),
        "cce-onehot": ("categorical_crossentropy", np.eye(3, dtype=np.float32)[labels], 3),
        "cce-soft-ls": (fr.losses.CategoricalCrossentropy(label_smoothing=0.1),
                        (soft / soft.sum(axis=1, keepdims=True)).astype(np.float32), 3),
        "sce-ls": (fr.losses.SparseCategoricalCrossentropy(label_smoothing=0.1), labels, 3),
        "bce-multilabel": ("binary_crossentropy",
                           (rng.random((96, 3)) < 0.5).astype(np.float32), 3),
        "poisson": ("poisson", rng.poisson(2.0, (96, 2)).astype(np.float32), 2),
    }


@pytest.mark.parametrize("case", sorted(_model_cases()))
def test_same_seed_same_model_on_every_cpu_backend(case):
    loss, y, units = _model_cases()[case]
    ref, X = _fit(loss, y, units)
    for name, _ in available_backends(["numba", "cython"]):
        model, _ = _fit(loss, y, units, backend=name)
        for a, b in zip(model.get_weights(), ref.get_weights()):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(model.evaluate(X, y), ref.evaluate(X, y), rtol=1e-5)


def _torch_criterion(loss):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    name = fr.losses.get(loss).name
    param = fr.losses.get(loss).param
    if name == "mae":
        return nn.L1Loss(), torch.float32
    if name == "huber":
        return nn.HuberLoss(delta=param), torch.float32
    if name == "log_cosh":
        return (lambda z, y: torch.log(torch.cosh(z - y)).mean()), torch.float32
    if name == "categorical_crossentropy":
        return nn.CrossEntropyLoss(label_smoothing=param), torch.float32
    if name == "sparse_categorical_crossentropy":
        return nn.CrossEntropyLoss(label_smoothing=param), torch.long
    if name == "binary_crossentropy":
        return nn.BCEWithLogitsLoss(), torch.float32
    return nn.PoissonNLLLoss(log_input=True, full=False), torch.float32


@pytest.mark.parametrize("case", sorted(_model_cases()))
def test_training_follows_pytorch(case):
    """The same net and weights, Adam for 6 steps on torch's loss: the same weights (float32
    rounding), the evaluated loss torch's, predict torch's output transform."""
    torch = pytest.importorskip("torch")
    loss, y, units = _model_cases()[case]
    rng = np.random.default_rng(5)
    X = randn(rng, (48, 4))
    y = y[:48]
    model = fr.Sequential([fr.Dense(8, "tanh"), fr.Dense(units)], input_dim=4, seed=2)
    model.compile(loss=loss, optimizer=fr.Adam(1e-2))
    W0, b0, W1, b1 = model.get_weights()
    peer = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, units))
    with torch.no_grad():
        for lin, W, b in ((peer[0], W0, b0), (peer[2], W1, b1)):
            lin.weight.copy_(torch.from_numpy(W.T.copy()))
            lin.bias.copy_(torch.from_numpy(b))
    criterion, ydtype = _torch_criterion(loss)
    yt = torch.from_numpy(np.asarray(y)).to(ydtype)
    opt = torch.optim.Adam(peer.parameters(), lr=1e-2)
    for s in range(6):
        sl = slice(8 * s, 8 * s + 8)
        opt.zero_grad()
        criterion(peer(torch.from_numpy(X[sl])), yt[sl]).backward()
        opt.step()
    model.fit(X, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    want = [peer[0].weight.T, peer[0].bias, peer[2].weight.T, peer[2].bias]
    for got, w in zip(model.get_weights(), want):
        np.testing.assert_allclose(got, w.detach().numpy(), rtol=1e-4, atol=2e-5)
    with torch.no_grad():
        out = peer(torch.from_numpy(X))
        assert model.evaluate(X, y) == pytest.approx(criterion(out, yt).item(),
                                                     rel=1e-5)
    with torch.no_grad():
        np.testing.assert_allclose(model.to_torch()(torch.from_numpy(X)).numpy(),
                                   model.predict(X), rtol=2e-5, atol=2e-6)


def test_predict_returns_the_rate_and_the_probabilities():
    cases = _model_cases()
    model, X = _fit(*cases["poisson"])
    logits = fr.Sequential([fr.Dense(8, "tanh"), fr.Dense(2)], input_dim=4)
    logits.set_weights(model.get_weights())
    np.testing.assert_allclose(model.predict(X), np.exp(logits.predict(X)), rtol=1e-6)
    model, X = _fit(*cases["bce-multilabel"])
    p = model.predict(X)
    assert p.shape == (96, 3) and ((p > 0) & (p < 1)).all()
    assert not np.allclose(p.sum(axis=1), 1)       # independent sigmoids, not a softmax
    model, X = _fit(*cases["cce-soft-ls"])
    np.testing.assert_allclose(model.predict(X).sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("case", sorted(_model_cases()))
def test_loss_and_its_parameter_save_and_load(case, tmp_path):
    loss, y, units = _model_cases()[case]
    model, X = _fit(loss, y, units)
    model.save(tmp_path / "m")
    loaded = fr.load_model(tmp_path / "m")
    want = fr.losses.get(loss)
    assert loaded.loss == want.name
    assert loaded._network.parts[0].loss_param == want.param
    assert loaded.evaluate(X, y) == model.evaluate(X, y)
    loaded.fit(X, y, epochs=1, batch_size=32, verbose=0)      # and it trains on
    model.fit(X, y, epochs=1, batch_size=32, verbose=0)
    for a, b in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_multitask_heads_take_loss_objects_and_save_them(tmp_path):
    rng = np.random.default_rng(1)
    X = randn(rng, (64, 4))
    Y = {"r": randn(rng, (64, 1)), "c": rng.integers(0, 3, 64),
         "n": rng.poisson(1.0, (64, 1)).astype(np.float32)}
    model = fr.MultiTask(trunk=[fr.Dense(8, "selu")],
                         heads={"r": ([fr.Dense(1)], fr.losses.Huber(0.7)),
                                "c": ([fr.Dense(3, "softmax")],
                                      fr.losses.SparseCategoricalCrossentropy(0.05)),
                                "n": ([fr.Dense(1)], "poisson")},
                         input_dim=4, seed=0)
    model.compile()
    model.fit(X, Y, epochs=2, batch_size=16, verbose=0)
    model.save(tmp_path / "mt")
    loaded = fr.load_model(tmp_path / "mt")
    assert loaded.evaluate(X, Y) == model.evaluate(X, Y)
    assert [p.loss_param for p in loaded._network.parts[1:]] == [0.7, 0.05, 0.0]


def test_loss_objects_and_names():
    assert fr.losses.get("mean_absolute_error") == fr.losses.MeanAbsoluteError()
    assert fr.losses.get("huber") == fr.losses.Huber(1.0) != fr.losses.Huber(2.0)
    assert fr.losses.Huber(2.0).get_config() == {"name": "huber", "delta": 2.0}
    assert fr.losses.Huber().get_config() == "huber"
    assert fr.losses.get({"name": "categorical_crossentropy", "label_smoothing": 0.2}) \
        == fr.losses.CategoricalCrossentropy(label_smoothing=0.2)
    assert repr(fr.losses.SparseCategoricalCrossentropy(0.1)) \
        == "SparseCategoricalCrossentropy(label_smoothing=0.1)"
    model = fr.Sequential([fr.Dense(2)], input_dim=3)
    model.compile(loss=fr.losses.Huber(0.25))
    assert model.loss == "huber" and model._network.parts[0].loss_param == 0.25


def test_bad_losses_and_targets_are_clear_errors_and_the_model_is_untouched():
    with pytest.raises(ValueError, match="Huber delta must be a finite number > 0"):
        fr.losses.Huber(0)
    with pytest.raises(ValueError, match=r"label_smoothing must be a number in \[0, 1\]"):
        fr.losses.CategoricalCrossentropy(label_smoothing=1.5)
    with pytest.raises(ValueError, match="bad parameters"):
        fr.losses.get({"name": "mae", "delta": 1.0})
    model = fr.Sequential([fr.Dense(4, "relu"), fr.Dense(3)], input_dim=2, seed=0)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        model.compile(loss="hinge")
    with pytest.raises(TypeError, match="loss must be the name of a loss"):
        model.compile(loss=3)
    assert model.loss is None
    with pytest.raises(ValueError, match="poisson takes the log-rate: make the last Dense "
                                         "linear"):
        fr.Sequential([fr.Dense(2, "relu")], input_dim=2).compile(loss="poisson")
    with pytest.raises(ValueError, match="needs a last Dense with one unit per class"):
        fr.Sequential([fr.Dense(1)], input_dim=2).compile(loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    X = randn(rng, (10, 2))
    cases = [("categorical_crossentropy", rng.integers(0, 3, 10), "one-hot .* rows of 3"),
             ("categorical_crossentropy", np.full((10, 3), 0.5), "summing to 1"),
             ("categorical_crossentropy", np.full((10, 3), -1.0), r"must lie in \[0, 1\]"),
             ("poisson", -np.ones((10, 3)), "counts or rates >= 0"),
             ("binary_crossentropy", np.full((10, 3), 2.0), r"must lie in \[0, 1\]")]
    for loss, y, message in cases:
        model = fr.Sequential([fr.Dense(3)], input_dim=2, seed=0)
        model.compile(loss=loss)
        before = model.get_weights()
        with pytest.raises(ValueError, match=message):
            model.fit(X, y, epochs=1, verbose=0)
        for a, b in zip(model.get_weights(), before):
            np.testing.assert_array_equal(a, b)


def test_onnx_of_the_new_output_transforms_equals_predict():
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from fastreg import export
    for case in ("poisson", "cce-soft-ls", "bce-multilabel", "huber"):
        model, X = _fit(*_model_cases()[case])
        session = ort.InferenceSession(export.to_onnx(model).SerializeToString())
        np.testing.assert_allclose(session.run(None, {"input": X})[0], model.predict(X),
                                   rtol=2e-5, atol=2e-6)
