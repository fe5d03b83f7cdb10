"""Warm-started regularization path against independent fits, on the study's curve data.

    python bench/regularization_path.py [--epochs 60] [--warm-epochs 20]

An L1 path over 6 strengths on the 3x64 LeakyReLU net: `fr.regularization_path` (strongest
first, each fit warm-started from the previous one, `warm_epochs` epochs) against one
independent `epochs`-epoch fit per strength. Prints both tables and the total times.
"""
import argparse
import time

from fastreg.cli_study import build_mlp, curve_data
from fastreg.sweep import regularization_path, sweep

LAMBDAS = (1e-2, 3e-3, 1e-3, 3e-4, 1e-4, 3e-5)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--warm-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    X, y, Xv, yv = curve_data(10_000, seed=0)

    def build(lam, seed=0):
        return build_mlp(1, l1=lam, seed=seed)

    def build_point(l1, seed):
        return build(l1, seed=seed)

    # compile the kernels once outside both timings
    build(1e-3).fit(X[:256], y[:256], epochs=1, batch_size=args.batch_size, verbose=0)

    t0 = time.perf_counter()
    path = regularization_path(build, LAMBDAS, X, y, validation_data=(Xv, yv),
                               epochs=args.epochs, warm_epochs=args.warm_epochs,
                               batch_size=args.batch_size, as_frame=False)
    t_path = time.perf_counter() - t0
    t0 = time.perf_counter()
    independent = sweep(build_point, {"l1": list(LAMBDAS), "seed": [0]}, X, y,
                        validation_data=(Xv, yv), epochs=args.epochs,
                        batch_size=args.batch_size, as_frame=False)
    t_indep = time.perf_counter() - t0
    print(f"{'lambda':>8} {'path val':>10} {'start':>8} {'sparsity':>9} | {'indep val':>10}")
    for p, q in zip(path, independent):
        print(f"{p['lambda']:8.0e} {p['final_val_loss']:10.5f} {p['start']:>8} "
              f"{p['sparsity']:9.3f} | {q['final_val_loss']:10.5f}")
    print(f"path: {t_path:.1f} s ({args.epochs} + {len(LAMBDAS) - 1} x {args.warm_epochs} "
          f"epochs at most); independent fits: {t_indep:.1f} s "
          f"({len(LAMBDAS)} x {args.epochs} epochs); ratio {t_indep / t_path:.2f}x")


if __name__ == "__main__":
    main()
