"""Data augmentation (fastreg.augment): the draws' statistics, exact image transforms, seeding,
the per-epoch = per-batch equivalence, training on every CPU backend, and every bad input."""
import numpy as np
import pytest
from scipy import stats

import fastreg as fr
from fastreg import augment
from fastreg.kernels import contract
from fastreg.kernels import philox, reference

from netutil import available_backends, central_difference, fresh_rng, randn, small_cuda_tiles


def _model(backend="numba", loss="mse", sizes=(6, 8, 1), dropout=0.1, seed=5):
    model = fr.Sequential([fr.Dense(sizes[1], "tanh", dropout=dropout),
                           fr.Dense(sizes[2])], input_dim=sizes[0], seed=seed)
    model.compile(loss=loss, optimizer=fr.Adam(1e-2), backend=backend)
    return model


def _image(H=3, W=4, channels=2):
    """One hand-made (H, W, channels) image with distinct values, and its flattened row."""
    img = (np.arange(H * W * channels, dtype=np.float32) + 1).reshape(H, W, channels)
    return img, img.reshape(1, -1)


# ---------------------------------------------------------------- streams
def test_augmentation_streams_are_distinct_from_every_other_stream():
    streams = {name: getattr(philox, name) for name in dir(philox) if name.startswith("STREAM_")}
    aug = {v for k, v in streams.items() if k.startswith("STREAM_AUGMENT")}
    others = {v for k, v in streams.items() if not k.startswith("STREAM_AUGMENT")}
    assert len(aug) == 5 and not aug & others
    assert philox.STREAM_DROPOUT not in aug and philox.STREAM_INPUT_DROPOUT not in aug
    # by name, every constant but the documented jitter alias has its own value
    values = [v for k, v in streams.items() if k != "STREAM_AUGMENT_JITTER"]
    assert len(values) == len(set(values))


# ---------------------------------------------------------------- GaussianJitter
def test_jitter_noise_has_mean_zero_and_std_stddev():
    rng = fresh_rng()
    X = randn(rng, (2000, 50))
    sigma = 0.3
    noise = (augment.apply([fr.GaussianJitter(sigma)], X, batch_size=64, seed=11, step=7)
             - X).astype(np.float64).ravel()
    n = noise.size
    assert abs(noise.mean()) < 5 * sigma / np.sqrt(n)
    assert noise.std() == pytest.approx(sigma, rel=0.02)
    assert np.mean(np.abs(noise) < sigma) == pytest.approx(0.6827, abs=0.01)  # Gaussian, not flat
    assert stats.kstest(noise / sigma, "norm").pvalue > 1e-4
    # independent across columns: the sample correlation of two columns is ~ 0
    cols = noise.reshape(2000, 50)
    assert abs(np.corrcoef(cols[:, 0], cols[:, 1])[0, 1]) < 0.1


def test_jitter_of_zero_changes_nothing_and_float64_stays_float64():
    rng = fresh_rng()
    X = randn(rng, (40, 3), np.float64)
    x = augment.apply([fr.GaussianJitter(0.0)], X, batch_size=8)
    assert x.dtype == np.float64 and np.array_equal(x, X)


# ---------------------------------------------------------------- Mixup
@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_mixup_lambda_follows_beta_alpha_alpha(alpha):
    draws = augment._Draws(seed=3, step0=0, batch_size=128, n_rows=20000, position=0)
    lam = fr.Mixup(alpha).lambdas(draws)
    assert ((lam >= 0) & (lam <= 1)).all()
    assert lam.mean() == pytest.approx(0.5, abs=0.01)
    assert lam.var() == pytest.approx(1.0 / (4.0 * (2.0 * alpha + 1.0)), rel=0.05)
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > 1e-4


def test_mixup_outputs_are_convex_combinations_of_batch_partners():
    n, bs = 50, 8                      # 6 full batches and a last batch of 2
    X = np.eye(n, dtype=np.float64) * 1.0   # row i is e_i: the mix shows its sources exactly
    y = np.arange(n, dtype=np.float64) * 3.0 + 1.0
    x, ym = augment.apply([fr.Mixup(0.4)], X, y, batch_size=bs, seed=9, step=4)
    lam = fr.Mixup(0.4).lambdas(augment._Draws(9, 4, bs, n, 0))
    seen_partner_elsewhere = False
    for r in range(n):
        w = x[r]
        assert (w >= 0).all() and w.sum() == pytest.approx(1.0)
        support = np.flatnonzero(w > 1e-12)
        assert 1 <= support.size <= 2
        assert (support // bs == r // bs).all()            # partners from the same batch
        if support.size == 2:
            seen_partner_elsewhere = True
            assert w[r] == pytest.approx(lam[r])
        assert ym[r] == pytest.approx(w @ y)                # y mixed with the same lambda, partner
    assert seen_partner_elsewhere
    # the partners of a batch are a permutation of it
    perm = augment._Draws(9, 4, bs, n, 0).batch_permutation(philox.STREAM_AUGMENT_PARTNER)
    for b0 in range(0, n, bs):
        assert sorted(perm[b0:b0 + bs]) == list(range(b0, min(n, b0 + bs)))


def test_mixup_keeps_binary_targets_in_range_and_trains():
    rng = fresh_rng()
    X = randn(rng, (64, 6))
    y = (rng.random((64, 1)) > 0.5).astype(np.float32)
    _, ym = augment.apply([fr.Mixup(0.2)], X, y, batch_size=16, loss="binary_crossentropy")
    assert ((ym >= 0) & (ym <= 1)).all() and ((ym > 0) & (ym < 1)).any()
    model = _model(loss="binary_crossentropy")
    h = model.fit(X, y, epochs=2, batch_size=16, augment=[fr.Mixup(0.2)], verbose=0)
    assert np.isfinite(h.history["loss"]).all()


# ---------------------------------------------------------------- images
def test_flip_is_exact_and_happens_half_the_time():
    img, row = _image()
    X = np.repeat(row, 400, axis=0)
    out = augment.apply([fr.RandomFlip(image_shape=(3, 4, 2))], X, batch_size=32, seed=1).reshape(
        -1, 3, 4, 2)
    flipped = img[:, ::-1, :]
    # hand-made: pixel (r, c) of the flip is pixel (r, W-1-c), channels kept in order
    assert flipped[1, 0, 1] == img[1, 3, 1] and flipped[2, 3, 0] == img[2, 0, 0]
    is_flip = np.array([np.array_equal(o, flipped) for o in out])
    is_same = np.array([np.array_equal(o, img) for o in out])
    assert (is_flip | is_same).all()
    assert is_flip.mean() == pytest.approx(0.5, abs=0.1)


def test_flip_takes_image_shape_from_fit_style_argument_hw():
    img = np.arange(6, dtype=np.float32).reshape(2, 3)
    X = np.repeat(img.reshape(1, -1), 64, axis=0)
    out = augment.apply([fr.RandomFlip()], X, image_shape=(2, 3)).reshape(-1, 2, 3)
    assert any(np.array_equal(o, [[2, 1, 0], [5, 4, 3]]) for o in out)


def test_shift_is_exact_with_zero_fill_and_covers_every_offset():
    k = 1
    img, row = _image(3, 4, 2)
    X = np.repeat(row, 300, axis=0)
    aug = fr.RandomShift(k, image_shape=(3, 4, 2))
    out = augment.apply([aug], X, batch_size=50, seed=2, step=10).reshape(-1, 3, 4, 2)
    dy, dx = aug.offsets(augment._Draws(2, 10, 50, 300, 0))
    assert set(zip(dy.tolist(), dx.tolist())) == {(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)}
    for o, a, b in zip(out, dy, dx):
        expected = np.zeros_like(img)       # by hand: out[r, c] = img[r - a, c - b] or 0
        for r in range(3):
            for c in range(4):
                if 0 <= r - a < 3 and 0 <= c - b < 4:
                    expected[r, c] = img[r - a, c - b]
        assert np.array_equal(o, expected)
    # one case written out: dy=1, dx=-1 moves the image down one and left one
    i = int(np.flatnonzero((dy == 1) & (dx == -1))[0])
    ch0 = out[i, :, :, 0]
    assert np.array_equal(ch0, [[0, 0, 0, 0], [3, 5, 7, 0], [11, 13, 15, 0]])


def test_shift_of_zero_is_the_identity():
    _, row = _image()
    assert np.array_equal(augment.apply([fr.RandomShift(0, image_shape=(3, 4, 2))], row), row)


# ---------------------------------------------------------------- seeding
def test_augmentation_is_a_function_of_seed_step_and_batch_row():
    rng = fresh_rng()
    X = randn(rng, (70, 12))
    y = randn(rng, (70, 1))
    augs = [fr.RandomShift(1, image_shape=(3, 4)), fr.RandomFlip(image_shape=(3, 4)),
            fr.GaussianJitter(0.1), fr.Mixup(0.3)]
    a = augment.apply(augs, X, y, batch_size=16, seed=4, step=2)
    b = augment.apply(augs, X, y, batch_size=16, seed=4, step=2)
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], augment.apply(augs, X, y, batch_size=16, seed=5, step=2)[0])
    assert not np.array_equal(a[0], augment.apply(augs, X, y, batch_size=16, seed=4, step=3)[0])
    # the epoch at once equals batch by batch, batch b at step 2 + b
    for b, start in enumerate(range(0, 70, 16)):
        xb, yb = augment.apply(augs, X[start:start + 16], y[start:start + 16], seed=4, step=2 + b)
        assert np.array_equal(a[0][start:start + 16], xb)
        assert np.array_equal(a[1][start:start + 16], yb)


def test_two_jitters_in_a_list_draw_different_noise():
    X = np.zeros((10, 4), np.float32)
    once = augment.apply([fr.GaussianJitter(1.0)], X)
    twice = augment.apply([fr.GaussianJitter(1.0), fr.GaussianJitter(1.0)], X)
    assert not np.allclose(twice - once, once)


def test_fit_trains_on_the_augmented_shuffled_batches_at_the_model_step(monkeypatch):
    rng = fresh_rng()
    X = randn(rng, (37, 6))
    y = randn(rng, (37, 1))
    augs = [fr.GaussianJitter(0.2), fr.Mixup(0.5)]
    seen = []
    real = reference.train_epoch

    def spy(net, Xe, Ye, perm, batch_size, step0, t0, *rest):
        seen.append((Xe[perm].copy(), Ye[perm].copy(), step0))
        return real(net, Xe, Ye, perm, batch_size, step0, t0, *rest)

    monkeypatch.setattr(reference, "train_epoch", spy)
    model = _model("numpy")
    model.fit(X, y, epochs=1, batch_size=10, verbose=0)           # 4 steps without augmenting
    model.fit(X, y, epochs=2, batch_size=10, augment=augs, verbose=0)
    assert len(seen) == 3
    for epoch, (xe, ye, step0) in enumerate(seen[1:]):
        assert step0 == 4 * (epoch + 1)
        perm = np.random.default_rng([model.seed, epoch + 1]).permutation(37)
        xa, ya = augment.apply(augs, X[perm], y[perm], batch_size=10, seed=model.seed, step=step0)
        assert np.array_equal(xe, xa) and np.array_equal(ye, ya)


def test_same_seed_same_training_and_zero_augmentation_is_no_augmentation():
    rng = fresh_rng()
    X = randn(rng, (90, 6))
    y = randn(rng, (90, 1))
    augs = [fr.GaussianJitter(0.1), fr.Mixup(0.2)]
    w = []
    for _ in range(2):
        m = _model()
        m.fit(X, y, epochs=2, batch_size=16, augment=augs, verbose=0)
        w.append(m.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(*w))
    plain, noop = _model(), _model()
    plain.fit(X, y, epochs=2, batch_size=16, verbose=0)
    noop.fit(X, y, epochs=2, batch_size=16, augment=[fr.GaussianJitter(0.0)], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(plain.get_weights(), noop.get_weights()))
    assert not np.allclose(plain.get_weights()[0], w[0][0])


# ---------------------------------------------------------------- backends, user data, validation
def test_numpy_and_numba_train_the_same_with_augmentation():
    rng = fresh_rng()
    X = randn(rng, (60, 12))
    y = (rng.random((60, 1)) > 0.5).astype(np.float32)
    augs = [fr.RandomShift(1), fr.RandomFlip(), fr.GaussianJitter(0.05), fr.Mixup(0.3)]
    weights = []
    for backend in ("numpy", "numba"):
        m = _model(backend, loss="binary_crossentropy", sizes=(12, 8, 1))
        m.fit(X, y, epochs=3, batch_size=16, augment=augs, image_shape=(2, 3, 2), verbose=0)
        weights.append(m.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_user_arrays_are_never_modified_and_validation_is_not_augmented():
    rng = fresh_rng()
    X = randn(rng, (50, 6))
    y = randn(rng, (50, 1))
    Xv, yv = randn(rng, (20, 6)), randn(rng, (20, 1))
    copies = [a.copy() for a in (X, y, Xv, yv)]
    model = _model(dropout=0.0)
    h = model.fit(X, y, epochs=2, batch_size=8, validation_data=(Xv, yv),
                  augment=[fr.GaussianJitter(0.5), fr.Mixup(0.2)], verbose=0)
    for a, c in zip((X, y, Xv, yv), copies):
        assert np.array_equal(a, c)
    assert h.history["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv), rel=1e-6)
    assert np.array_equal(model.predict(Xv), model.predict(Xv))
    x = augment.apply([fr.GaussianJitter(0.5), fr.Mixup(0.2)], X, y)
    for a, c in zip((X, y), copies):
        assert np.array_equal(a, c)
    assert not np.array_equal(x[0], X)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("make,match", [
    (lambda: fr.GaussianJitter(-0.1), "stddev must be >= 0"),
    (lambda: fr.GaussianJitter(float("nan")), "stddev must be a finite number"),
    (lambda: fr.GaussianJitter(True), "stddev must be a finite number"),
    (lambda: fr.Mixup(0.0), "alpha must be > 0"),
    (lambda: fr.Mixup(-1), "alpha must be > 0"),
    (lambda: fr.RandomShift(-1), "k must be an integer >= 0"),
    (lambda: fr.RandomShift(1.5), "k must be an integer >= 0"),
    (lambda: fr.RandomFlip(image_shape=(3, 0)), "image_shape must be"),
    (lambda: fr.RandomFlip(image_shape=12), "image_shape must be"),
    (lambda: fr.RandomShift(1, image_shape=(2, 2, 2, 2)), "image_shape must be"),
])
def test_bad_parameters_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_fit_arguments_are_clear_errors_and_leave_the_model_unchanged():
    rng = fresh_rng()
    X = randn(rng, (20, 6))
    y = randn(rng, (20, 1))
    model = _model()
    before = model.get_weights()
    cases = [
        (TypeError, "fastreg augmenters", dict(augment=["jitter"])),
        (TypeError, "fastreg augmenters", dict(augment=[object()])),
        (TypeError, "list of fastreg augmenters", dict(augment="jitter")),
        (ValueError, "H\\*W\\*C = 8 values but X has 6", dict(augment=[fr.RandomFlip((2, 4))])),
        (ValueError, "H\\*W\\*C = 9 values but X has 6",
         dict(augment=[fr.RandomShift(1)], image_shape=(3, 3))),
        (ValueError, "H\\*W\\*C = 12", dict(image_shape=(2, 3, 2))),
        (ValueError, "give image_shape", dict(augment=[fr.RandomShift(1)])),
    ]
    for exc, match, kw in cases:
        with pytest.raises(exc, match=match):
            model.fit(X, y, epochs=1, verbose=0, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model._network.counters.step == 0
    # the augmenter's own image_shape wins over fit's
    model.fit(X, y, epochs=1, verbose=0, augment=[fr.RandomFlip((3, 2))], image_shape=(3, 2))


# ---------------------------------------------------------------- Mixup with sparse labels
def _sparse_backends():
    """(name, kernel module) of every backend here; cuda on the simulator."""
    return available_backends(["numpy", "numba", "cython", "cuda"])


SPARSE_BACKENDS = _sparse_backends()
SCE = contract.LOSS_SCE


def _mixed_targets(rng, B, K, dtype, lam=None):
    """(B, 3) mixed targets (label a, label b, lam): some rows with a == b, some lam in {0, 1}."""
    a = rng.integers(0, K, B)
    b = rng.integers(0, K, B)
    b[:3] = a[:3]
    if lam is None:
        lam = rng.random(B)
        lam[3], lam[4] = 0.0, 1.0
    else:
        lam = np.full(B, float(lam))
    return np.stack([a, b, lam], axis=1).astype(dtype)


def test_mixed_sparse_loss_reference_by_hand_and_central_differences():
    """float64: the value is lam * CE(a) + (1 - lam) * CE(b) (log-softmax by hand) and the
    gradient, (softmax - lam e_a - (1 - lam) e_b) / B, matches central differences."""
    rng = fresh_rng()
    B, K = 9, 5
    z = randn(rng, (B, K), np.float64, 2.0)
    y = _mixed_targets(rng, B, K, np.float64)
    a, b, lam = y[:, 0].astype(int), y[:, 1].astype(int), y[:, 2]
    logp = z - z.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    rows = np.arange(B)
    want = float(np.mean(-lam * logp[rows, a] - (1 - lam) * logp[rows, b]))
    grad = np.zeros_like(z)
    value = reference.loss_forward_backward(z, y, grad, SCE)
    assert value == pytest.approx(want, rel=1e-13)
    assert reference.loss_value(z, y, SCE) == value
    onehot = np.eye(K)
    np.testing.assert_allclose(grad, (np.exp(logp) - lam[:, None] * onehot[a]
                                      - (1 - lam[:, None]) * onehot[b]) / B, rtol=1e-12,
                               atol=1e-15)
    zz = z.copy()
    num = central_difference(lambda: reference.loss_value(zz, y, SCE), zz)
    np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-9)
    # each row's gradient sums to 0 (the mixed target is a distribution), and is not trivial
    np.testing.assert_allclose(grad.sum(axis=1), 0, atol=1e-15)
    assert np.abs(grad).max() > 1e-3


@pytest.mark.parametrize("name,K", SPARSE_BACKENDS, ids=[b[0] for b in SPARSE_BACKENDS])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mixed_sparse_loss_with_lam_one_or_zero_is_the_plain_loss(name, K, dtype):
    """lam = 1: bit for bit the one-column loss of label a (whatever label b is); lam = 0: that
    of label b."""
    rng = fresh_rng()
    B, classes = 23, 6
    z = randn(rng, (B, classes), dtype, 3.0)
    for lam, col in ((1.0, 0), (0.0, 1)):
        y3 = _mixed_targets(rng, B, classes, dtype, lam=lam)
        g1, g3 = np.zeros_like(z), np.zeros_like(z)
        v1 = K.loss_forward_backward(z, np.ascontiguousarray(y3[:, col:col + 1]), g1, SCE)
        v3 = K.loss_forward_backward(z, y3, g3, SCE)
        assert v3 == v1
        np.testing.assert_array_equal(g3, g1)
        assert K.loss_value(z, y3, SCE) == K.loss_value(z, y3[:, col:col + 1].copy(), SCE)


@pytest.mark.parametrize("name,K", SPARSE_BACKENDS[1:], ids=[b[0] for b in SPARSE_BACKENDS[1:]])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mixed_sparse_loss_backends_equal_reference(name, K, dtype):
    rng = fresh_rng()
    B, classes = 41, 7
    z = randn(rng, (B, classes), dtype, 3.0)
    y = _mixed_targets(rng, B, classes, dtype)
    gr, gk = np.zeros_like(z), np.zeros_like(z)
    vr = reference.loss_forward_backward(z, y, gr, SCE)
    vk = K.loss_forward_backward(z, y, gk, SCE)
    assert vk == pytest.approx(vr, rel=1e-12)       # float64 sums on every backend
    assert K.loss_value(z, y, SCE) == pytest.approx(vr, rel=1e-12)
    tol = dict(rtol=2e-5, atol=2e-7) if dtype == np.float32 else dict(rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(gk, gr, **tol)
    # the backend reads both labels and lam: its gradient is not the plain one of either label
    # (they differ by (1 - lam) / B, resp. lam / B, at rows whose labels differ)
    for col in (0, 1):
        plain = np.zeros_like(z)
        K.loss_forward_backward(z, np.ascontiguousarray(y[:, col:col + 1]), plain, SCE)
        assert np.abs(gk - plain).max() > 1e-3


def test_mixup_sparse_targets_are_label_pairs_with_the_inputs_lambda_and_partner():
    """x mixes exactly as for the other losses; y becomes (y, y[partner], lam) with the
    partner and lam of the input mix (lam rounded to the dtype)."""
    n, bs = 50, 8
    X = np.eye(n, dtype=np.float64)         # row i is e_i: the mix shows its sources
    y = np.arange(n) % 4
    x, ym = augment.apply([fr.Mixup(0.4)], X, y, batch_size=bs, seed=9, step=4,
                          loss="sparse_categorical_crossentropy")
    x_mse, _ = augment.apply([fr.Mixup(0.4)], X, y.astype(np.float64), batch_size=bs, seed=9,
                             step=4)
    assert np.array_equal(x, x_mse)         # the inputs are mixed exactly as before
    assert ym.shape == (n, contract.SCE_MIXED_WIDTH) and ym.dtype == np.float64
    lam = fr.Mixup(0.4).lambdas(augment._Draws(9, 4, bs, n, 0))
    partner = augment._Draws(9, 4, bs, n, 0).batch_permutation(philox.STREAM_AUGMENT_PARTNER)
    np.testing.assert_array_equal(ym[:, contract.SCE_LABEL], y)
    np.testing.assert_array_equal(ym[:, contract.SCE_LABEL_B], y[partner])
    np.testing.assert_array_equal(ym[:, contract.SCE_LAM], lam)
    for r in range(n):
        expect = lam[r] * X[r] + (1 - lam[r]) * X[partner[r]]
        np.testing.assert_allclose(x[r], expect, rtol=1e-15, atol=1e-15)
    x32, y32 = augment.apply([fr.Mixup(0.4)], X.astype(np.float32), y, batch_size=bs, seed=9,
                             step=4, loss="sparse_categorical_crossentropy")
    assert y32.dtype == np.float32
    np.testing.assert_array_equal(y32[:, contract.SCE_LAM], lam.astype(np.float32))


def _blobs(rng, n=90, classes=3, dim=4):
    """A small classification set: Gaussian blobs around well-separated centres."""
    centres = 3.0 * np.eye(classes, dim)
    y = np.arange(n) % classes
    X = (centres[y] + 0.5 * rng.standard_normal((n, dim))).astype(np.float32)
    return X, y


def _sparse_model(backend, seed=5, classes=3, dim=4, hidden=8):
    model = fr.Sequential([fr.Dense(hidden, "tanh", dropout=0.1), fr.Dense(classes)],
                          input_dim=dim, seed=seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(2e-2),
                  backend=backend)
    return model


@pytest.mark.parametrize("backend", ["numpy", "numba", "cython"])
def test_mixup_with_sparse_labels_learns_a_classification_set(backend):
    if backend == "cython":
        pytest.importorskip("fastreg.kernels.cython")
    rng = fresh_rng()
    X, y = _blobs(rng)
    Xv, yv = _blobs(rng, 30)
    model = _sparse_model(backend)
    before = model.evaluate(Xv, yv)
    h = model.fit(X, y, epochs=25, batch_size=16, augment=[fr.Mixup(0.4)],
                  validation_data=(Xv, yv), verbose=0)
    loss = h.history["loss"]
    assert np.isfinite(loss).all() and loss[-1] < 0.8 * loss[0]
    # validation runs on the plain labels: val_loss is evaluate's plain cross-entropy
    assert h.history["val_loss"][-1] == pytest.approx(model.evaluate(Xv, yv), rel=1e-6)
    assert model.evaluate(Xv, yv) < 0.5 * before
    assert (model.predict(Xv).argmax(axis=1) == yv).mean() >= 0.9


@pytest.mark.parametrize("backend,fused", [(b[0], None) for b in SPARSE_BACKENDS[1:]]
                         + ([("cuda", 0)] if "cuda" in dict(SPARSE_BACKENDS) else []),
                         ids=[b[0] for b in SPARSE_BACKENDS[1:]]
                         + (["cuda-tiled"] if "cuda" in dict(SPARSE_BACKENDS) else []))
def test_mixup_with_sparse_labels_trains_the_same_on_every_backend(backend, fused, monkeypatch):
    """Two epochs (a partial last batch) with Mixup and jitter: the weights and losses of each
    backend agree with the reference's (cuda: small tiles on the simulator; its default path
    and, with FUSED_MAX_WIDTH = 0, the tiled one)."""
    from fastreg.kernels import cuda
    rng = fresh_rng()
    X, y = _blobs(rng, 30 if backend == "cuda" else 70)
    augs = [fr.GaussianJitter(0.05), fr.Mixup(0.3)]
    if fused is not None:
        monkeypatch.setattr(cuda, "FUSED_MAX_WIDTH", fused, raising=False)
    runs = []
    with small_cuda_tiles(monkeypatch, cuda if cuda.cuda is not None else None):
        for name in ("numpy", backend):
            m = _sparse_model(name)
            h = m.fit(X, y, epochs=2, batch_size=12, augment=augs, verbose=0)
            runs.append((m.get_weights(), h.history["loss"]))
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5)


def test_mixup_with_sparse_labels_is_deterministic_by_seed():
    rng = fresh_rng()
    X, y = _blobs(rng, 40)
    ws = []
    for seed in (3, 3, 4):
        m = _sparse_model("numba", seed=seed)
        m.set_weights(_sparse_model("numba", seed=3).get_weights())   # same start, seed differs
        m.fit(X, y, epochs=2, batch_size=8, augment=[fr.Mixup(0.5)], verbose=0)
        ws.append(m.get_weights())
    assert all(np.array_equal(a, b) for a, b in zip(ws[0], ws[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(ws[0], ws[2]))
    # and Mixup acted: without it the same start and seed train differently
    plain = _sparse_model("numba", seed=3)
    plain.fit(X, y, epochs=2, batch_size=8, verbose=0)
    assert not all(np.array_equal(a, b) for a, b in zip(ws[0], plain.get_weights()))


def test_one_mixup_per_fit_with_sparse_labels():
    rng = fresh_rng()
    X, y = _blobs(rng, 20)
    model = _sparse_model("numpy")
    before = model.get_weights()
    with pytest.raises(ValueError, match="at most one Mixup with sparse_categorical"):
        model.fit(X, y, epochs=1, augment=[fr.Mixup(0.2), fr.Mixup(0.3)], verbose=0)
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))
    assert model._network.counters.step == 0
    # two Mixups still mix soft targets (mse), and the other augmenters work with labels
    augment.apply([fr.Mixup(0.2), fr.Mixup(0.3)], X, y.astype(np.float32), loss="mse")
    model.fit(X, y, epochs=1, augment=[fr.GaussianJitter(0.1)], verbose=0)
