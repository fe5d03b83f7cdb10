"""The regularization toolkit, measured: one script for the README's tables.

    python bench/toolkit_evidence.py [--epochs 150] [--seeds 3] [--json PATH]

1. Validation loss with and without each technique on scikit-learn's 8x8 digits (if
   installed; otherwise a generated 64-feature classification set): a 64-256-256-10 ReLU
   network trained with Adam(1e-3), batch 64, on 360 training images (a small training set,
   where regularization matters), for `epochs` epochs; best and final validation loss and
   final accuracy, mean over `seeds` seeds.
2. Group lasso on the `curve` workload with a 3x256 LeakyReLU network: units alive per layer
   after training at each strength, the validation loss, and the median epoch time of the
   model before and after `model.prune()` (numba backend). The two are timed interleaved with
   the unregularized net (A B C A B C ..., `repeats` rounds) and reported as ratios to it too:
   on a shared VM the same epoch can take 2x longer a minute later (measured here: the plain
   3x256 net's epoch at 97-254 ms across runs), so only figures from one window compare.

`--part group` reruns only the second table and updates the JSON file in place.
"""
import argparse
import copy
import json
import os
import statistics
import time

import numpy as np

import fastreg as fr
from fastreg.bench.workloads import load_digits, make_workload


def digits_data(seed=0, n_train=360):
    X, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(X))
    tr, va = order[:n_train], order[n_train:]
    return X[tr], y[tr], X[va], y[va], "digits"


TECHNIQUES = {
    "none": dict(),
    "L2 1e-3": dict(reg=lambda: fr.L2(1e-3)),
    "L1 1e-4": dict(reg=lambda: fr.L1(1e-4)),
    "ElasticNet 1e-4/1e-3": dict(reg=lambda: fr.ElasticNet(1e-4, 1e-3)),
    "GroupLasso 1e-3": dict(reg=lambda: fr.GroupLasso(1e-3)),
    "dropout 0.3": dict(dropout=0.3),
    "dropout 0.3 + MaxNorm 1": dict(dropout=0.3, reg=lambda: fr.MaxNorm(1.0)),
    "input dropout 0.2": dict(input_dropout=0.2),
    "GaussianJitter 0.1": dict(augment=lambda: [fr.GaussianJitter(0.1)]),
    "RandomShift 1 px": dict(augment=lambda: [fr.RandomShift(1, image_shape=(8, 8))]),
    "Mixup 0.2": dict(augment=lambda: [fr.Mixup(0.2)]),
    "early stopping (patience 10)": dict(early=True),
    "BatchNorm": dict(batchnorm=True),
    "GaussianNoise 0.1 (hidden)": dict(noise=lambda: fr.GaussianNoise(0.1)),
    "GaussianDropout 0.3 (hidden)": dict(noise=lambda: fr.GaussianDropout(0.3)),
    "BatchNorm + GaussianNoise 0.1": dict(batchnorm=True, noise=lambda: fr.GaussianNoise(0.1)),
    "multi-task: + parity head (weight 0.5)": dict(multitask=True),
}


def hidden_layers(spec):
    layers = [fr.Dropout(spec["input_dropout"])] if spec.get("input_dropout") else []
    reg = spec.get("reg")
    for _ in range(2):
        layers.append(fr.Dense(256, "relu", dropout=spec.get("dropout", 0.0),
                               regularizer=reg() if reg else None))
        if spec.get("batchnorm"):
            layers.append(fr.BatchNorm())
        if spec.get("noise"):
            layers.append(spec["noise"]())
    return layers


def build_multitask(seed):
    """The same trunk, the digit head and an auxiliary head: is the digit odd?"""
    model = fr.MultiTask(trunk=hidden_layers({}),
                         heads={"digit": ([fr.Dense(10)], "sparse_categorical_crossentropy",
                                          1.0),
                                "parity": ([fr.Dense(1)], "binary_crossentropy", 0.5)},
                         input_dim=64, seed=seed)
    model.compile(optimizer=fr.Adam(1e-3), backend="numba")
    return model


def build_digits(spec, seed):
    layers = hidden_layers(spec)
    layers.append(fr.Dense(10))
    model = fr.Sequential(layers, input_dim=64, seed=seed)
    model.compile(loss="sparse_categorical_crossentropy", optimizer=fr.Adam(1e-3),
                  backend="numba")
    return model


def techniques_table(epochs, seeds):
    rows = []
    for name, spec in TECHNIQUES.items():
        best, final, acc = [], [], []
        for seed in range(seeds):
            X, y, Xv, yv, source = digits_data(seed)
            if spec.get("multitask"):
                model = build_multitask(seed)
                parity = lambda labels: (labels % 2).astype(np.float32).reshape(-1, 1)  # noqa
                hist = model.fit(X, {"digit": y, "parity": parity(y)}, epochs=epochs,
                                 batch_size=64, verbose=0,
                                 validation_data=(Xv, {"digit": yv, "parity": parity(yv)}))
                best.append(min(hist.history["val_loss_digit"]))
                final.append(model.evaluate(Xv, {"digit": yv, "parity": parity(yv)})
                             ["loss_digit"])
                acc.append(float(np.mean(model.predict(Xv)["digit"].argmax(axis=1) == yv)))
                continue
            model = build_digits(spec, seed)
            cbs = [fr.EarlyStopping(patience=10, restore_best_weights=True)] \
                if spec.get("early") else None
            hist = model.fit(X, y, epochs=epochs, batch_size=64, validation_data=(Xv, yv),
                             verbose=0, callbacks=cbs,
                             augment=spec["augment"]() if spec.get("augment") else None)
            best.append(min(hist.history["val_loss"]))
            final.append(model.evaluate(Xv, yv))
            acc.append(float(np.mean(model.predict(Xv).argmax(axis=1) == yv)))
        rows.append({"technique": name, "best_val_loss": statistics.mean(best),
                     "final_val_loss": statistics.mean(final),
                     "final_accuracy": statistics.mean(acc), "source": source})
        print(f"{name:30s} best val {rows[-1]['best_val_loss']:.4f}  final val "
              f"{rows[-1]['final_val_loss']:.4f}  acc {rows[-1]['final_accuracy']:.4f}")
    return rows


def interleaved_epoch_ms(models, X, y, repeats=7):
    """Median epoch ms of each model, timed one epoch each in turn (A B C A B C ...)."""
    times = [[] for _ in models]
    for _ in range(repeats):
        for model, ts in zip(models, times):
            t0 = time.perf_counter()
            model.fit(X, y, epochs=1, batch_size=128, verbose=0)
            ts.append(time.perf_counter() - t0)
    return [1000 * statistics.median(ts) for ts in times]


def group_lasso_table(epochs):
    wl = make_workload("curve", seed=0)
    X, y, Xv, yv = wl.X_train, wl.y_train, wl.X_val, wl.y_val

    def trained(lam):
        model = fr.Sequential(
            [fr.Dense(256, "leaky_relu", regularizer=fr.GroupLasso(lam) if lam else None)
             for _ in range(3)] + [fr.Dense(1)], input_dim=1, seed=0)
        model.compile(loss="mse", optimizer=fr.Adam(1e-3), backend="numba")
        model.fit(X, y, epochs=epochs, batch_size=128, verbose=0)
        return model

    plain = trained(0.0)
    rows = []
    for lam in (0.0, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2):
        model = copy.deepcopy(plain) if lam == 0.0 else trained(lam)
        val = model.evaluate(Xv, yv)
        pred = model.predict(Xv)
        unpruned = copy.deepcopy(model)
        report = model.prune()
        after_pred = model.predict(Xv)
        ref, before, after = interleaved_epoch_ms([copy.deepcopy(plain), unpruned, model], X, y)
        rows.append({"lambda": lam, "units_after": report.units_after[:-1],
                     "removed": report.total_removed, "val_loss": val,
                     "params_before": report.params_before, "params_after": report.params_after,
                     "epoch_ms_plain": ref, "epoch_ms_before": before, "epoch_ms_after": after,
                     "before_vs_plain": before / ref, "plain_vs_after": ref / after,
                     "max_pred_change": float(np.max(np.abs(after_pred - pred)))})
        r = rows[-1]
        print(f"lambda {lam:g}: units {r['units_after']} (removed {r['removed']}), val "
              f"{val:.5f}, epoch {before:.1f} -> {after:.1f} ms (plain net {ref:.1f} ms in the "
              f"same window: unpruned {before / ref:.2f}x it, pruned {ref / after:.1f}x "
              f"faster), max |pred change| {r['max_pred_change']:.2e}")
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=150)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--group-epochs", type=int, default=40)
    ap.add_argument("--json", default=None)
    ap.add_argument("--part", choices=("all", "techniques", "group"), default="all")
    args = ap.parse_args()
    out = {}
    if args.json and args.part != "all" and os.path.exists(args.json):
        with open(args.json) as f:
            out = json.load(f)
    if args.part in ("all", "techniques"):
        out["techniques"] = techniques_table(args.epochs, args.seeds)
    if args.part in ("all", "group"):
        out["group_lasso"] = group_lasso_table(args.group_epochs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
