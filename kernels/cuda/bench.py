"""Epoch timings of the CUDA backend on two MLPs (run on a GPU machine; not a test).

    python -m fastreg.kernels.cuda.bench [--epochs 5] [--cpu] [--only curve|wide]

curve  1 -> 64 -> 64 -> 64 -> 1, leaky_relu, dropout 0.1, batch 128, 10,000 rows, mse
wide   784 -> 1024 -> 1024 -> 10, relu, dropout 0.2, batch 256, 16,384 rows, sparse CE
Both: Adam(1e-3) + L2(1e-4) on the weights, float32. The first epoch (compilation) is
reported apart; then the median of --epochs epochs. --cpu times the Numba backend on the
same plan for a ratio. `curve` runs on the fused small-MLP path (fused.py: as chosen, i.e.
the one-block epoch, then with 3 launches per step) and on the tiled one; with CuPy
installed the tiled path sends big GEMMs to cuBLAS (the run then also reports our own GEMM
alone; FASTREG_CUDA_CUBLAS=0 turns cuBLAS off everywhere).
"""
import argparse
import statistics
import time

import numpy as np

from .. import contract
from ..plan import LayerShape, ParamStore, make_plan, single_part
from ..philox import dropout_scale, dropout_threshold

WORKLOADS = {
    "curve": dict(sizes=(1, 64, 64, 64, 1), act=contract.ACT_LEAKY_RELU, drop=0.1, batch=128,
                  rows=10_000, loss=contract.LOSS_MSE),
    "wide": dict(sizes=(784, 1024, 1024, 10), act=contract.ACT_RELU, drop=0.2, batch=256,
                 rows=16_384, loss=contract.LOSS_SCE),
}


def workload_plan(sizes, act, drop, batch, loss, seed=0, **_):
    """A Sequential's training plan (one part), He-initialised, Adam's moments at zero."""
    rng = np.random.default_rng(seed)
    L = len(sizes) - 1
    f32 = np.float32
    store = ParamStore([LayerShape(sizes[l], sizes[l + 1]) for l in range(L)], f32)
    for l in range(L):
        store.tensor("W", l)[...] = (rng.standard_normal((sizes[l], sizes[l + 1]))
                                     * np.sqrt(2.0 / sizes[l])).astype(f32)
    store.reset_moments(("m", "v"))
    li = np.zeros((L, contract.LI_SIZE), np.int64)
    lf = np.zeros((L, contract.LF_SIZE), f32)
    hp = {k: np.zeros((L, contract.HP_SIZE)) for k in ("W", "b", "gb")}
    for l in range(L):
        last = l == L - 1
        li[l, contract.LI_ACT] = contract.ACT_LINEAR if last else act
        li[l, contract.LI_DROP_THR] = 0 if last else dropout_threshold(drop)
        li[l, contract.LI_HAS_BIAS] = 1
        lf[l, [contract.LF_SLOPE, contract.LF_DROP_SCALE, contract.LF_IN_DROP_SCALE]] = (
            0.01, dropout_scale(0.0 if last else drop), 1.0)
        for kind, l2 in (("W", 1e-4), ("b", 0.0), ("gb", 0.0)):
            hp[kind][l, [contract.HP_LR, contract.HP_BETA1, contract.HP_BETA2, contract.HP_EPS,
                         contract.HP_L2, contract.HP_PROXIMAL]] = (1e-3, 0.9, 0.999, 1e-8, l2, 1.0)
    y_width = 1 if loss == contract.LOSS_SCE else sizes[-1]
    parts, partf = single_part(L, loss, y_width)
    plan = make_plan(store, li, lf, hp["W"], hp["b"], hp["gb"], parts, partf, contract.OPT_ADAM,
                     seed=1234)
    return plan.allocate(batch, [y_width])


def make_data(sizes, rows, loss, seed=1, **_):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((rows, sizes[0])).astype(np.float32)
    if loss == contract.LOSS_SCE:
        Y = rng.integers(0, sizes[-1], (rows, 1)).astype(np.float32)
    else:
        Y = np.sin(3 * X[:, :1]).astype(np.float32)
    return X, Y


def time_epochs(ops, plan, X, Y, batch, epochs):
    n = X.shape[0]
    step = 0
    times, losses = [], []
    context = getattr(ops, "epoch_context", None)
    for e in range(epochs + 1):
        perm = np.random.default_rng([7, e]).permutation(n).astype(np.int64)
        t = time.perf_counter()
        if context is None:
            ls, _, steps, _ = ops.train_epoch(plan, X, Y, perm, batch, step, step + 1)
        else:
            with context(plan):
                ls, _, steps, _ = ops.train_epoch(plan, X, Y, perm, batch, step, step + 1)
        times.append(time.perf_counter() - t)
        losses.append(float(ls[0]) / n)
        step += steps
    return times[0], statistics.median(times[1:]), losses


def report(name, label, steps, first, med, losses):
    print(f"{name:5s} {label:14s} first epoch {first * 1e3:9.1f} ms   median epoch "
          f"{med * 1e3:8.2f} ms  ({steps / med:8.0f} steps/s)   loss {losses[1]:.4f} "
          f"-> {losses[-1]:.4f}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--only", choices=sorted(WORKLOADS))
    args = ap.parse_args(argv)
    from .. import cuda
    from .jit import cupy
    ok, why = cuda.available()
    if not ok:
        raise SystemExit(why)
    # (label, module settings): the fused small-MLP path where the plan fits it, then the
    # tiled path (with cuBLAS for the big GEMMs when CuPy is there, and without)
    variants = [("cuda-fused", {}), ("cuda-fused-step", {"FUSED_EPOCH_MAX_MACS": 0}),
                ("cuda-tiled", {"FUSED_MAX_WIDTH": 0})]
    if cupy() is not None:
        variants += [("cuda-own-gemm", {"FUSED_MAX_WIDTH": 0, "CUBLAS_MIN_MACS": 1 << 62})]
    for name, w in WORKLOADS.items():
        if args.only and name != args.only:
            continue
        X, Y = make_data(**w)
        steps = -(-w["rows"] // w["batch"])
        fits = max(w["sizes"]) <= cuda.FUSED_MAX_WIDTH
        for label, settings in variants:
            if label.startswith("cuda-fused") and not fits:
                continue
            saved = {k: getattr(cuda, k) for k in settings}
            for k, v in settings.items():
                setattr(cuda, k, v)
            plan = workload_plan(**w)
            first, med, losses = time_epochs(cuda, plan, X, Y, w["batch"], args.epochs)
            for k, v in saved.items():
                setattr(cuda, k, v)
            report(name, label, steps, first, med, losses)
        if args.cpu:
            from .. import numba
            plan = workload_plan(**w)
            first, med, losses = time_epochs(
                numba, plan, X, Y, w["batch"], max(1, args.epochs // 2))
            report(name, "numba-cpu", steps, first, med, losses)


if __name__ == "__main__":
    main()
