"""The epoch-time cost of weight noise (Dense(weight_noise=sigma)), off and on, in one process.

    python bench/weight_noise_cost.py [--workload curve] [--backend cython] [--epochs 5]
                                      [--sigma 0.01] [--quick]

Per workload and backend, four models from the same initial weights (bench/workloads.py):
"base" (no weight_noise argument), "off" (weight_noise=0 on every Dense: must cost nothing),
"on" (weight_noise=sigma on every Dense) and "base" again (the same model as the first: the
measurement's noise floor, position in the interleaving included). One warm-up epoch each,
then `epochs` timed epochs interleaved so that machine noise hits all alike; prints the
median epoch time of each relative to base.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fastreg as fr  # noqa: E402
from bench.workloads import initial_weights, make_workload  # noqa: E402


def build(workload, backend, sigma):
    layers = []
    for units, activation, dropout in workload.layers:
        kw = {} if sigma is None else {"weight_noise": sigma}
        layers.append(fr.Dense(units, activation, dropout=dropout,
                               regularizer=fr.L2(workload.l2) if workload.l2 else None, **kw))
    model = fr.Sequential(layers, input_dim=workload.X_train.shape[1], seed=workload.seed)
    model.compile(loss=workload.loss, optimizer=fr.Adam(workload.lr), backend=backend)
    model.set_weights(initial_weights(workload, workload.seed))
    return model


def epoch(model, workload):
    t = time.perf_counter()
    model.fit(workload.X_train, workload.y_train, epochs=1, batch_size=workload.batch_size,
              verbose=0)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", action="append")
    ap.add_argument("--backend", action="append")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--sigma", type=float, default=0.01)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    for name in args.workload or ["curve", "wide"]:
        workload = make_workload(name, quick=args.quick, seed=0)
        for backend in args.backend or ["cython"]:
            models = {"base": build(workload, backend, None), "off": build(workload, backend, 0.0),
                      "on": build(workload, backend, args.sigma),
                      "base2": build(workload, backend, None)}   # base again: the noise floor
            times = {k: [] for k in models}
            for model in models.values():
                epoch(model, workload)                  # warm-up (compiles, first touch)
            for _ in range(args.epochs):
                for k, model in models.items():
                    times[k].append(epoch(model, workload))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{name:6s} {backend:7s} median epoch: base {med['base'] * 1e3:8.1f} ms, "
                  f"off {med['off'] * 1e3:8.1f} ms ({100 * (med['off'] / med['base'] - 1):+5.1f}%), "
                  f"on (sigma {args.sigma:g}) {med['on'] * 1e3:8.1f} ms "
                  f"({100 * (med['on'] / med['base'] - 1):+5.1f}%); base again "
                  f"{med['base2'] * 1e3:8.1f} ms ({100 * (med['base2'] / med['base'] - 1):+5.1f}%)",
                  flush=True)


if __name__ == "__main__":
    main()
