"""A fixed set of seeded trainings, recorded once and compared after a change that must not
change any number (a refactoring): every backend, Sequential and MultiTask, BatchNorm, noise
layers, input dropout, L1 / GroupLasso / MaxNorm, SGD with Nesterov, Adam, AdamW, data
augmentation, MC dropout, pruning, float64.

    python bench/seeded_trainings.py record golden.npz
    python bench/seeded_trainings.py check golden.npz     # exit 1 on any difference

`check` prints, per case, the largest absolute difference of every recorded array and
whether it is bitwise equal. CUDA runs on numba-cuda's simulator with small tiles (set
NUMBA_ENABLE_CUDASIM=1 before starting; a few minutes) and only when --cuda is given.
"""
import argparse
import os
import sys

import numpy as np


def _data(seed, n, d, k, kind):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    if kind == "sce":
        y = (X[:, 0] + X[:, 1] > 0).astype(np.int64) + (X[:, 2 % d] > 1).astype(np.int64)
        return X, np.minimum(y, k - 1)
    if kind == "bce":
        return X, (X[:, :k] > 0).astype(np.float32)
    return X, (np.sin(X[:, :1]) + 0.1 * X[:, 1:2]).astype(np.float32)


def cases():
    """{name: callable(backend) -> {array name: array}}."""
    import fastreg as fr

    def seq_plain(backend):
        X, y = _data(0, 300, 3, 1, "mse")
        m = fr.Sequential([fr.Dense(16, "leaky_relu", dropout=0.1, regularizer=fr.L2(1e-3)),
                           fr.Dense(16, "tanh", dropout=0.2), fr.Dense(1)], input_dim=3,
                          seed=11)
        m.compile(loss="mse", optimizer=fr.Adam(1e-2), backend=backend)
        h = m.fit(X, y, epochs=4, batch_size=32, validation_data=(X[:50], y[:50]), verbose=0)
        mean, std = m.predict(X[:20], mc_samples=7, seed=3)
        return _out(m, h, X, mc_mean=mean, mc_std=std, mc2=m.predict(X[:9], mc_samples=5)[0])

    def seq_bn_noise(backend):
        X, y = _data(1, 256, 5, 2, "bce")
        m = fr.Sequential([fr.GaussianNoise(0.1), fr.Dense(12, "relu", dropout=0.1),
                           fr.BatchNorm(momentum=0.9), fr.GaussianNoise(0.2),
                           fr.Dense(8, "sigmoid"), fr.GaussianDropout(0.2),
                           fr.Dense(2)], input_dim=5, seed=5)
        m.compile(loss="binary_crossentropy",
                  optimizer=fr.SGD(5e-2, momentum=0.9, nesterov=True), backend=backend)
        h = m.fit(X, y, epochs=3, batch_size=48, verbose=0)
        return _out(m, h, X, mc_mean=m.predict(X[:10], mc_samples=4, seed=1)[0])

    def seq_sparse(backend):
        X, y = _data(2, 320, 6, 3, "sce")
        m = fr.Sequential([fr.Dropout(0.1), fr.Dense(20, "relu", regularizer=[
            fr.L1(1e-3), fr.GroupLasso(1e-2), fr.MaxNorm(1.5)]),
            fr.Dense(10, "leaky_relu", dropout=0.2, regularizer=fr.ElasticNet(1e-4, 1e-3),
                     bias_regularizer=fr.L2(1e-3)),
            fr.Dense(3, regularizer=fr.L1(1e-4, proximal=False))], input_dim=6, seed=8)
        m.compile(loss="sparse_categorical_crossentropy",
                  optimizer=fr.AdamW(1e-2, weight_decay=1e-2), backend=backend)
        h = m.fit(X, y, epochs=4, batch_size=40, validation_data=(X[:64], y[:64]), verbose=0)
        out = _out(m, h, X)
        report = m.prune()
        out["pruned_units"] = np.array(report.units_after)
        out["pruned_predict"] = m.predict(X[:30])
        return out

    def seq_augment(backend):
        X, y = _data(3, 200, 16, 3, "sce")
        m = fr.Sequential([fr.Dense(12, "tanh", dropout=0.1), fr.Dense(3)], input_dim=16,
                          seed=2)
        m.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(5e-3),
                  backend=backend)
        h = m.fit(X, y, epochs=3, batch_size=32, verbose=0,
                  augment=[fr.GaussianJitter(0.05), fr.RandomShift(1), fr.Mixup(0.3)],
                  image_shape=(4, 4))
        return _out(m, h, X)

    def seq_float64(backend):
        X, y = _data(4, 128, 3, 1, "mse")
        m = fr.Sequential([fr.Dense(8, "sigmoid", dropout=0.3), fr.BatchNorm(),
                           fr.Dense(1)], input_dim=3, seed=9, dtype="float64")
        m.compile(loss="mse", optimizer=fr.SGD(1e-1), backend=backend)
        h = m.fit(X.astype(np.float64), y.astype(np.float64), epochs=3, batch_size=20,
                  verbose=0)
        return _out(m, h, X.astype(np.float64))

    def multitask(backend):
        X, y = _data(5, 240, 4, 3, "sce")
        price = (X @ np.array([1.0, -0.5, 0.2, 0.0], np.float32))
        m = fr.MultiTask(
            trunk=[fr.Dense(16, "relu", dropout=0.1, regularizer=fr.GroupLasso(1e-3)),
                   fr.BatchNorm(), fr.Dense(10, "tanh"), fr.GaussianDropout(0.1)],
            heads={"price": ([fr.Dense(1)], "mse", 1.0),
                   "kind": ([fr.Dropout(0.2), fr.Dense(6, "relu"), fr.Dense(3)],
                            "sparse_categorical_crossentropy", 0.5)},
            input_dim=4, seed=4)
        m.compile(optimizer=fr.Adam(1e-2), backend=backend)
        h = m.fit(X, {"price": price, "kind": y}, epochs=3, batch_size=30, verbose=0,
                  validation_data=(X[:40], {"price": price[:40], "kind": y[:40]}),
                  augment=[fr.Mixup(0.2)])
        out = {f"w{i}": w for i, w in enumerate(m.get_weights())}
        out.update({f"h_{k}": np.array(v) for k, v in h.history.items()})
        for head, p in m.predict(X[:25]).items():
            out[f"predict_{head}"] = p
        for head, (mean, std) in m.predict(X[:12], mc_samples=6, seed=2).items():
            out[f"mc_{head}"] = mean
            out[f"mcstd_{head}"] = std
        ev = m.evaluate(X, {"price": price, "kind": y})
        out.update({f"eval_{k}": np.array(v) for k, v in ev.items()})
        return out

    return {"seq_plain": seq_plain, "seq_bn_noise": seq_bn_noise, "seq_sparse": seq_sparse,
            "seq_augment": seq_augment, "seq_float64": seq_float64, "multitask": multitask}


def _out(model, history, X, **extra):
    out = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    out.update({f"h_{k}": np.array(v) for k, v in history.history.items()})
    out["predict"] = model.predict(X[:40])
    out["penalty"] = np.array(model.penalty())
    out.update(extra)
    return out


def run(backends):
    results = {}
    for backend in backends:
        for name, case in cases().items():
            if backend == "cuda" and name in ("seq_float64", "seq_augment"):
                continue   # the simulator is slow: the other cases cover the CUDA paths
            for key, value in case(backend).items():
                results[f"{backend}/{name}/{key}"] = np.asarray(value)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("record", "check"))
    parser.add_argument("path")
    parser.add_argument("--cuda", action="store_true", help="also the CUDA backend (simulator)")
    parser.add_argument("--backends", default="numpy,numba,cython",
                        help="comma-separated CPU backends (check: only these are compared)")
    args = parser.parse_args(argv)
    backends = args.backends.split(",") + (["cuda"] if args.cuda else [])
    if args.cuda:       # the test suite's small tiles: fast on the simulator, ragged edges
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                        "tests"))
        from netutil import SMALL_CUDA_TILES

        from fastreg.kernels import cuda
        for name, value in SMALL_CUDA_TILES:
            setattr(cuda, name, value)
        sys.setswitchinterval(5e-4)
    results = run(backends)
    if args.mode == "record":
        np.savez(args.path, **results)
        print(f"{len(results)} arrays recorded in {args.path}")
        return 0
    with np.load(args.path) as golden:
        expected = {k: golden[k] for k in golden.files if k.split("/")[0] in backends}
    bad = 0
    for key in sorted(set(expected) | set(results)):
        if key not in results or key not in expected:
            print(f"MISSING {key}")
            bad += 1
            continue
        a, b = expected[key], results[key]
        if a.shape != b.shape:
            print(f"SHAPE {key}: {a.shape} vs {b.shape}")
            bad += 1
        elif not np.array_equal(a, b, equal_nan=True):
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
            print(f"DIFF {key}: max |diff| {diff:.3g}")
            bad += 1
    print(f"{len(expected)} arrays compared, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
