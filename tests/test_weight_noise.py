"""Noise on the weights (Graves 2011): Dense(weight_noise=sigma) / fr.WeightNoise(sigma).

The reference by central differences (the gradient at W + sigma N equals the derivative of
the loss at W + sigma N with the same normals), a hand-built torch peer, every backend against
the reference (the op itself bit for bit, whole trainings to float rounding), sigma = 0 is
no noise, a new draw per step and per layer, never at inference, the normals' statistics,
bad values, the two spellings, save / load, summary, MultiTask, export."""
import numpy as np
import pytest

import fastreg as fr
from fastreg.kernels import contract, reference
from fastreg.kernels.philox import standard_normals
from fastreg.kernels.reference import epoch as ref_epoch

from netutil import available_backends, central_difference, fresh_rng, randn, small_cuda_tiles
from planutil import clone_plan, random_plan, random_targets, run_epochs

BACKENDS = available_backends(["numba", "cython", "cuda"])
STREAM = contract.STREAM_WEIGHT_NOISE


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """As tests/test_cuda.py: small GEMM tiles on the simulator (ragged edges, fast)."""
    with small_cuda_tiles(monkeypatch, dict(BACKENDS).get("cuda")):
        yield


def _noisy_plan(rng, dtype, sigmas, **kw):
    """A random plan (tests/planutil.py) with weight noise sigma_l on layer l."""
    plan = random_plan(rng, dtype, **kw)
    plan.lf[:, contract.LF_WEIGHT_NOISE_STD] = sigmas
    return plan


def _model(sigma=0.0, dtype="float32", seed=3, backend="numpy", dropout=0.0, spelling="arg",
           optimizer=None):
    if spelling == "arg":
        first = fr.Dense(9, "tanh", weight_noise=sigma, dropout=dropout)
        second = fr.Dense(7, "relu", weight_noise=sigma / 2, regularizer=fr.L2(1e-3))
    else:
        first = fr.Dense(9, "tanh", regularizer=fr.WeightNoise(sigma), dropout=dropout)
        second = fr.Dense(7, "relu", regularizer=[fr.L2(1e-3), fr.WeightNoise(sigma / 2)])
    model = fr.Sequential([first, second, fr.Dense(2)], input_dim=4, seed=seed, dtype=dtype)
    model.compile(loss="mse", optimizer=optimizer or fr.Adam(1e-2), backend=backend)
    return model


def _data(rng, n=40, dtype="float32"):
    return randn(rng, (n, 4), dtype), randn(rng, (n, 2), dtype)


# ---------------------------------------------------------------- the op and its normals
def test_reference_op_is_its_definition():
    rng = fresh_rng()
    for dtype in (np.float32, np.float64):
        W = randn(rng, (5, 7), dtype)
        out = np.zeros_like(W)
        reference.weight_noise(W, out, 0.3, 99, 4, 2)
        n = standard_normals(W.size, 99, 4, 2, STREAM).astype(dtype).reshape(W.shape)
        np.testing.assert_array_equal(out, W + dtype(0.3) * n)


@pytest.mark.parametrize("name", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_backend_draws_the_reference_noise(name, dtype):
    """The same words, the same Box-Muller pairing, the same roundings (odd sizes leave a
    lone element at the end; the big one takes the parallel chunks): bit for bit in float32;
    in float64 to the last bit of NumPy's vectorised log / cos against libm's (the CPU twins
    agree with each other bit for bit)."""
    K = dict(BACKENDS)[name]
    rng = fresh_rng()
    shapes = ((1, 1), (3, 5), (8, 9)) + (((300, 250),) if name != "cuda" else ())
    for shape in shapes:
        W = randn(rng, shape, dtype)
        seed, step, layer = int(rng.integers(2**63)), int(rng.integers(2**31)), 3
        want, got = np.zeros_like(W), np.zeros_like(W)
        reference.weight_noise(W, want, 0.7, seed, step, layer)
        K.weight_noise(W, got, 0.7, seed, step, layer)
        if dtype == np.float32:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.finfo(dtype).eps * 8)
        if name == "cython" and "numba" in dict(BACKENDS):
            twin = np.zeros_like(W)
            dict(BACKENDS)["numba"].weight_noise(W, twin, 0.7, seed, step, layer)
            np.testing.assert_array_equal(got, twin)


def test_normals_statistics_and_keys():
    """mean ~0 and std ~sigma through the op; a new draw per step and per layer, and a stream
    of its own (uncorrelated with the output-noise stream at the same counters)."""
    W = np.zeros((500, 400))
    out = np.zeros_like(W)
    reference.weight_noise(W, out, 0.3, 12345, 7, 1)
    assert abs(out.mean()) < 0.3 * 0.01 and abs(out.std() - 0.3) < 0.3 * 0.01
    n = out.reshape(-1) / 0.3
    for step, layer, stream in ((8, 1, STREAM), (7, 2, STREAM), (7, 1, contract.STREAM_NOISE)):
        other = standard_normals(n.size, 12345, step, layer, stream)
        assert abs(np.corrcoef(n, other)[0, 1]) < 0.01


# ---------------------------------------------------------------- the reference's gradient
@pytest.mark.parametrize("features", ["plain", "dropout+noise", "batchnorm", "heads"])
def test_reference_gradient_by_central_differences(features):
    """float64: the gradient one step computes equals the central differences of the step's
    loss as a function of the CLEAN W, every evaluation redrawing Wn = W + sigma N with the
    same normals (same seed and step): d L(W + sigma N) / dW = L'(Wn). dW of the first layer
    also checks the deeper layers' dx GEMMs used Wn."""
    rng = fresh_rng()
    kw = dict(sizes=(3, 5, 4, 2))
    if features == "dropout+noise":
        kw.update(drop=[0.3, 0.0, 0.0], noise=[(contract.NOISE_ADD, 0.2),
                                                 (contract.NOISE_MUL, 0.3),
                                                 (contract.NOISE_NONE, 0.0)])
    elif features == "batchnorm":
        kw.update(bn=[True, False, False])
    elif features == "heads":
        kw.update(sizes=(3, 5, 4), heads=[((3,), contract.LOSS_MSE, 0.7, 0.0),
                                          ((2,), contract.LOSS_BCE, 1.3, 0.0)])
    plan = _noisy_plan(rng, np.float64, 0.4, **kw)
    n = 6
    X = randn(rng, (n, 3), np.float64)
    Y = random_targets(rng, plan, n)
    plan.allocate(n, plan.y_widths)
    idx = np.arange(n)
    step = int(rng.integers(1000))

    def loss():
        losses, finite, _ = ref_epoch.forward_backward(reference, plan, X, Y, idx, step)
        assert finite
        return float((losses * plan.partf[:, contract.PF_WEIGHT]).sum())

    loss()
    grads = [dW.copy() for dW in plan.dWs]
    for l, W in enumerate(plan.Ws):
        num = central_difference(loss, W)
        np.testing.assert_allclose(grads[l], num, rtol=1e-6, atol=1e-7)
    loss()
    for l, W in enumerate(plan.Ws):
        # the stored W is clean: Wn - W is sigma * the step's normals of layer l
        N = standard_normals(W.size, plan.seed, step, l, STREAM).reshape(W.shape)
        np.testing.assert_allclose(plan.wnoises[l] - W, 0.4 * N, rtol=1e-12, atol=1e-14)


def test_reference_gradient_is_the_clean_networks_at_wn():
    """A step with weight noise computes the gradient the noise-free network computes with
    W replaced by Wn, and leaves W untouched until the update."""
    rng = fresh_rng()
    plan = _noisy_plan(rng, np.float64, [0.3, 0.0, 0.5])
    n = 5
    X, Y = randn(rng, (n, 3), np.float64), random_targets(rng, plan, n)
    plan.allocate(n, plan.y_widths)
    W0 = [W.copy() for W in plan.Ws]
    ref_epoch.forward_backward(reference, plan, X, Y, np.arange(n), 11)
    for W, w0 in zip(plan.Ws, W0):
        np.testing.assert_array_equal(W, w0)
    assert plan.wnoises[1].size == 0                     # sigma 0: no buffer, the clean W
    clean = clone_plan(plan)
    clean.lf[:, contract.LF_WEIGHT_NOISE_STD] = 0
    for l in (0, 2):
        clean.Ws[l][...] = plan.wnoises[l]
    clean.allocate(n, plan.y_widths)
    ref_epoch.forward_backward(reference, clean, X, Y, np.arange(n), 11)
    for a, b in zip(plan.grad, clean.grad):
        np.testing.assert_array_equal(a, b)


def test_torch_peer_by_hand():
    """Two SGD steps of a model with weight noise against torch: the weights copied, each
    step's W perturbed by sigma times that step's and layer's normals, torch's gradient at
    the perturbed weights applied to the clean ones."""
    torch = pytest.importorskip("torch")
    rng = fresh_rng()
    X, y = _data(rng, 16, "float64")
    model = _model(0.2, dtype="float64", optimizer=fr.SGD(0.05))
    Ws = model.get_weights()
    params = [torch.tensor(w, requires_grad=False) for w in Ws]
    sigmas = [0.2, 0.1, 0.0]
    acts = [torch.tanh, torch.relu, lambda z: z]
    xt, yt = torch.tensor(X), torch.tensor(y)
    for step in range(2):
        rows = slice(8 * step, 8 * step + 8)
        leaves = [p.clone().requires_grad_(True) for p in params]
        h = xt[rows]
        for l in range(3):
            W, b = leaves[2 * l], leaves[2 * l + 1]
            N = standard_normals(W.numel(), model._network.seed, step, l, STREAM)
            Wn = W + sigmas[l] * torch.tensor(N).reshape(W.shape)
            h = acts[l](h @ Wn + b)
        loss = ((h - yt[rows]) ** 2).mean() + 0.5 * 1e-3 * (leaves[2] ** 2).sum()
        loss.backward()
        params = [(p - 0.05 * leaf.grad).detach() for p, leaf in zip(params, leaves)]
    model.fit(X, y, epochs=1, batch_size=8, shuffle=False, verbose=0)
    for got, want in zip(model.get_weights(), params):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- every backend
@pytest.mark.parametrize("name", [b[0] for b in BACKENDS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("features", ["plain", "batchnorm+dropout", "heads"])
def test_compiled_epochs_equal_reference(name, dtype, features):
    """Two epochs of each backend's compiled epoch against the reference's, from the same
    plan: same normals, same steps, float rounding apart."""
    K = dict(BACKENDS)[name]
    rng = fresh_rng()
    kw = {}
    if features == "batchnorm+dropout":
        kw.update(bn=[False, True, False], drop=[0.2, 0.0, 0.0])
    elif features == "heads":
        kw.update(sizes=(3, 6, 5), heads=[((4,), contract.LOSS_MSE, 0.7, 0.2),
                                          ((2,), contract.LOSS_BCE, 1.3, 0.0)])
    plan = _noisy_plan(rng, dtype, 0.25, **kw)
    plan.lf[1, contract.LF_WEIGHT_NOISE_STD] = 0       # one clean layer among noisy ones
    n = 20 if name == "cuda" else 37
    X = randn(rng, (n, 3), dtype)
    Y = random_targets(rng, plan, n)
    ref, twin = plan, clone_plan(plan)
    r0 = run_epochs(reference, ref, X, Y, 8)
    r1 = run_epochs(K, twin, X, Y, 8)
    tol = dict(rtol=2e-4, atol=2e-5) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(twin.store.params, ref.store.params, **tol)
    for a, b in zip(r0, r1):
        np.testing.assert_allclose(b[0], a[0], rtol=tol["rtol"] * 10)
        assert a[2] == b[2] and b[3]


@pytest.mark.parametrize("name", [b[0] for b in BACKENDS])
def test_same_seed_same_training_on_every_backend(name):
    """The API: a float32 model trained on a backend ends where the reference's does."""
    rng = fresh_rng()
    X, y = _data(rng, 24 if name == "cuda" else 40)
    runs = []
    for backend in ("numpy", name):
        model = _model(0.1, backend=backend, dropout=0.1)
        hist = model.fit(X, y, epochs=2, batch_size=12, verbose=0)
        runs.append((model.get_weights(), hist.history["loss"]))
    for a, b in zip(*(r[0] for r in runs)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-4)


def test_cuda_fused_path_steps_aside():
    G = dict(BACKENDS).get("cuda")
    if G is None:
        pytest.skip("the cuda backend (or its simulator) is not available")
    rng = fresh_rng()
    fused = []
    for sigma in (0.0, 0.2):
        plan = _noisy_plan(rng, np.float32, sigma)
        plan.allocate(4, plan.y_widths)
        fused.append(G._state(plan).fused)
    assert fused == [True, False]


# ---------------------------------------------------------------- sigma = 0, keys, inference
@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_zero_sigma_is_no_noise(backend):
    rng = fresh_rng()
    X, y = _data(rng)
    ws = []
    for model in (_model(0.0, backend=backend), _model(0.0, backend=backend, spelling="reg"),
                  fr.Sequential([fr.Dense(9, "tanh"), fr.Dense(7, "relu", regularizer=fr.L2(1e-3)),
                                 fr.Dense(2)], input_dim=4, seed=3)):
        model.compile(loss="mse", optimizer=fr.Adam(1e-2), backend=backend)
        model.fit(X, y, epochs=2, batch_size=8, verbose=0)
        ws.append(model.get_weights())
        plan = model._network.training_plan(model.optimizer, 8, [2])
        assert not plan.has_weight_noise() and all(w.size == 0 for w in plan.wnoises)
    for other in ws[1:]:
        for a, b in zip(ws[0], other):
            np.testing.assert_array_equal(a, b)


def test_a_new_perturbation_per_step_and_per_layer():
    """Over an epoch, each step's Wn of each layer is W + sigma N(step, layer): the draws of
    two steps (and of two layers of one shape) differ, the same step redraws the same."""
    rng = fresh_rng()
    plan = _noisy_plan(rng, np.float64, 0.5, sizes=(4, 4, 4, 4))
    plan.allocate(4, plan.y_widths)
    draws = {}
    for step in (0, 1):
        ref_epoch.draw_weight_noise(reference, plan, step)
        for l in range(3):
            draws[step, l] = plan.wnoises[l] - plan.Ws[l]
    ref_epoch.draw_weight_noise(reference, plan, 0)
    np.testing.assert_array_equal(plan.wnoises[0] - plan.Ws[0], draws[0, 0])
    keys = list(draws)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert not np.allclose(draws[a], draws[b])
    # and a model that trains on it moves differently from its noise-free twin
    X, y = _data(rng)
    noisy, plain = _model(0.2), _model(0.0)
    h1 = noisy.fit(X, y, epochs=1, batch_size=40, shuffle=False, verbose=0)
    h2 = plain.fit(X, y, epochs=1, batch_size=40, shuffle=False, verbose=0)
    assert h1.history["loss"][0] != h2.history["loss"][0]


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython", "cuda"])
def test_never_at_inference(backend):
    """predict, evaluate and MC-dropout predict use the clean W: the same numbers as a model
    without weight noise holding the same weights."""
    if backend == "cuda" and "cuda" not in dict(BACKENDS):
        pytest.skip("the cuda backend (or its simulator) is not available")
    rng = fresh_rng()
    X, y = _data(rng, 12)
    noisy = _model(0.5, backend=backend, dropout=0.3)
    plain = _model(0.0, backend=backend, dropout=0.3)
    noisy.fit(X, y, epochs=1, batch_size=6, verbose=0)
    plain.set_weights(noisy.get_weights())
    np.testing.assert_array_equal(noisy.predict(X), plain.predict(X))
    assert noisy.evaluate(X, y) == plain.evaluate(X, y)
    mc = [m.predict(X, mc_samples=4, seed=7) for m in (noisy, plain)]
    for a, b in zip(*mc):
        np.testing.assert_array_equal(a, b)
    plan = noisy._network.inference_plan()
    assert not plan.lf[:, contract.LF_WEIGHT_NOISE_STD].any()


# ---------------------------------------------------------------- the front end
def test_the_two_spellings_are_one_layer():
    a = fr.Dense(5, weight_noise=0.1, regularizer=fr.L1(0.01))
    b = fr.Dense(5, regularizer=[fr.L1(0.01), fr.WeightNoise(0.1)])
    c = fr.Dense(5, weight_noise=0.1, regularizer=[fr.L1(0.01), fr.WeightNoise(0.1)])  # agree
    assert a.get_config() == b.get_config() == c.get_config()
    assert a.weight_noise == b.weight_noise == 0.1 and b.regularizer == [fr.L1(0.01)]
    assert fr.Dense(5).get_config() == fr.Dense(5, weight_noise=0).get_config()
    assert "weight_noise" not in fr.Dense(5).get_config()       # files stay as they were
    rng = fresh_rng()
    X, y = _data(rng)
    ws = []
    for spelling in ("arg", "reg"):
        model = _model(0.2, backend="numba", spelling=spelling)
        model.fit(X, y, epochs=1, batch_size=8, verbose=0)
        ws.append(model.get_weights())
    for a, b in zip(*ws):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", True, None])
def test_bad_sigma(bad):
    with pytest.raises((ValueError, TypeError), match="weight_noise"):
        fr.Dense(3, weight_noise=bad)
    with pytest.raises((ValueError, TypeError), match="WeightNoise sigma"):
        fr.WeightNoise(bad)


def test_bad_combinations_leave_the_model_untouched():
    with pytest.raises(ValueError, match="different sigmas"):
        fr.Dense(3, weight_noise=0.1, regularizer=fr.WeightNoise(0.2))
    with pytest.raises(ValueError, match="bias vector"):
        fr.Dense(3, bias_regularizer=fr.WeightNoise(0.1))
    model = fr.Sequential([fr.Dense(4)])
    with pytest.raises(ValueError, match="weight_noise .*overflows to inf in float32"):
        model.add(fr.Dense(2, weight_noise=1e39))
    assert len(model.layers) == 1
    with pytest.raises(ValueError, match="weight_noise .*rounds to 0 in float32"):
        model.add(fr.Dense(2, weight_noise=1e-50))
    assert len(model.layers) == 1
    fr.Sequential([fr.Dense(2, weight_noise=1e39)], input_dim=2, dtype="float64")


def test_save_load_summary_export(tmp_path):
    rng = fresh_rng()
    X, y = _data(rng)
    model = _model(0.2, backend="numba", spelling="reg")
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)
    path = tmp_path / "wn.npz"
    model.save(path)
    loaded = fr.load_model(path)
    assert [l.get_config() for l in loaded.layers] == [l.get_config() for l in model.layers]
    assert [l.weight_noise for l in loaded.layers] == [0.2, 0.1, 0.0]
    np.testing.assert_array_equal(loaded.predict(X), model.predict(X))
    model.fit(X, y, epochs=1, batch_size=8, verbose=0)       # the same noise continues
    loaded.fit(X, y, epochs=1, batch_size=8, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    text = model.summary()
    assert "weight noise 0.2" in text and "weight noise 0.1" in text
    torch = pytest.importorskip("torch")
    net = model.to_torch()                   # inference only: weight noise plays no part
    with torch.no_grad():
        out = net(torch.tensor(X)).numpy()
    np.testing.assert_allclose(out, model.predict(X), rtol=1e-5, atol=1e-6)


def test_multitask_trunk_and_heads():
    rng = fresh_rng()
    X = randn(rng, (30, 4))
    ys = [randn(rng, (30, 2)), randn(rng, (30, 1))]
    runs = []
    for backend in ("numpy", "numba"):
        mt = fr.MultiTask([fr.Dense(6, "tanh", weight_noise=0.2)],
                          {"a": ([fr.Dense(2, regularizer=fr.WeightNoise(0.1))], "mse"),
                           "b": ([fr.Dense(1)], "mse")}, input_dim=4, seed=2)
        mt.compile(optimizer=fr.Adam(1e-2), backend=backend)
        mt.fit(X, {"a": ys[0], "b": ys[1]}, epochs=2, batch_size=10, verbose=0)
        runs.append(mt.get_weights())
    plan = mt._network.training_plan(mt.optimizer, 10, [0, 2, 1])
    assert list(plan.lf[:, contract.LF_WEIGHT_NOISE_STD]) == [np.float32(0.2),
                                                              np.float32(0.1), 0.0]
    for a, b in zip(*runs):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
