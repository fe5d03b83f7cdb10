"""What data-parallel MPI training buys on this machine: epochs of `wide` (784 -> 1024 ->
1024 -> 10, batch 256, bench/workloads.py) timed three ways, interleaved, medians:

    one      1 process, 1 thread, the backend's compiled epoch (fit without distributed=)
    mpi-1    `mpirun -n 1`, distributed="mpi": the sharded epoch's cost with nobody to share
    mpi-2    `mpirun -n 2`, 1 thread per rank: each rank half of every batch
    pair     two `one` processes at once, no MPI: what two processes of this GEMM work get
             from this machine now; mpi-2's ceiling is half a pair epoch (each rank does
             half the rows), so 2 * one / pair is the best speed-up the cores allow

    python bench/mpi_speedup.py [--backend cython] [--repeats 3] [--epochs 3] [--full]

Prints each run's median epoch time, the medians over the runs, the ratio one / mpi-2 (the
speed-up) and `uptime` before and after (the machine may be shared). One thread per process
everywhere (OMP / OpenBLAS / Numba), so 2 ranks use 2 cores against 1 core for `one`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ONE_THREAD = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1",
              "MKL_NUM_THREADS": "1"}


def worker(backend, epochs, full, distributed, save):
    """Run in each process: a warm-up epoch, then `epochs` timed ones; rank 0 prints JSON
    (and saves the final weights to `save` when given)."""
    sys.path.insert(0, os.path.dirname(HERE))
    import numpy as np

    import fastreg as fr
    from bench.workloads import make_workload

    wl = make_workload("wide", quick=not full)
    layers = [fr.Dense(units, activation, dropout=dropout, regularizer=fr.L2(wl.l2))
              for units, activation, dropout in wl.layers]
    model = fr.Sequential(layers, input_dim=wl.input_dim, seed=wl.seed)
    model.compile(loss=wl.loss, optimizer=fr.Adam(wl.lr), backend=backend)
    rank = 0
    phases = {}
    if distributed:
        from mpi4py import MPI
        rank = MPI.COMM_WORLD.Get_rank()
        phases = time_the_phases()
    times = []
    for epoch in range(epochs + 1):
        if distributed:
            MPI.COMM_WORLD.Barrier()      # every rank starts the epoch together
        start = time.perf_counter()
        model.fit(wl.X_train, wl.y_train, epochs=1, batch_size=wl.batch_size, verbose=0,
                  distributed="mpi" if distributed else None)
        if epoch:                          # the first one warms caches and pools
            times.append(time.perf_counter() - start)
        else:
            phases.update((k, 0.0) for k in phases)
    if rank == 0 and save:
        np.savez(save, *model.get_weights())
    if rank == 0:
        print(json.dumps({"epoch_s": float(np.median(times)), "rows": int(wl.n_train),
                          "phases_s": {k: v / epochs for k, v in phases.items()}}))


def time_the_phases():
    """Wrap the sharded step's three phases (its rows' forward and backward, the sums over
    the ranks, the replicated update) with timers; returns the dict they add seconds to."""
    from fastreg import distributed
    from fastreg.kernels.reference import sharded
    spent = {"forward_backward": 0.0, "allreduce": 0.0, "update": 0.0}

    def timed(name, f):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return f(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start
        return run
    sharded.forward_backward = timed("forward_backward", sharded.forward_backward)
    sharded.update = timed("update", sharded.update)
    distributed.MPIRun.sum_in_place = timed("allreduce", distributed.MPIRun.sum_in_place)
    return spent


def launch(kind, args, save=None):
    """One run of `kind` (one, mpi-1, mpi-2, pair); returns its result (median epoch time
    in s; a pair's: the mean of its two)."""
    me = [sys.executable, os.path.abspath(__file__), "--worker", "--backend", args.backend,
          "--epochs", str(args.epochs)] + (["--full"] if args.full else [])
    if save and kind != "pair":
        me += ["--save", save]
    env = dict(os.environ, **ONE_THREAD)
    if kind == "pair":
        procs = [subprocess.Popen(me, stdout=subprocess.PIPE, text=True, env=env)
                 for _ in range(2)]
        results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
        return {"epoch_s": sum(r["epoch_s"] for r in results) / 2, "rows": results[0]["rows"]}
    if kind == "one":
        cmd = me
    else:
        mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
        cmd = [mpirun, "-n", kind[-1]] + me + ["--distributed"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def uptime():
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cython")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs per run")
    ap.add_argument("--full", action="store_true", help="16,384 rows (default: quick, 4,096)")
    ap.add_argument("--kinds", default="one,mpi-1,mpi-2,pair",
                    help="comma-separated subset of one, mpi-1, mpi-2, pair")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--save", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.backend, args.epochs, args.full, args.distributed, args.save)
        return
    import numpy as np
    print("before:", uptime())
    kinds = tuple(args.kinds.split(","))
    runs = {k: [] for k in kinds}
    import tempfile
    scratch = tempfile.mkdtemp()
    for r in range(args.repeats):           # interleaved: a load change hits all kinds
        for kind in kinds:
            res = launch(kind, args, os.path.join(scratch, f"{kind}.npz") if r == 0 else None)
            runs[kind].append(res["epoch_s"])
            phases = "  ".join(f"{k} {v:.3f}" for k, v in res.get("phases_s", {}).items())
            print(f"repeat {r + 1} {kind:5s} {res['epoch_s']:.3f} s/epoch ({res['rows']} rows)"
                  f"{'  rank 0: ' + phases if phases else ''}", flush=True)
    print("after: ", uptime())
    saved = {k: np.load(os.path.join(scratch, f"{k}.npz")) for k in kinds if k != "pair"}
    for k in saved:
        if k != "one" and "one" in saved:     # the same seed and epochs: the same model
            diff = max(float(np.abs(saved[k][a] - saved["one"][a]).max())
                       for a in saved["one"].files)
            print(f"max |W_{k} - W_one| after {args.epochs + 1} epochs: {diff:.2e}")
    med = {k: float(np.median(v)) for k, v in runs.items()}
    for k in kinds:
        print(f"median {k:5s} {med[k]:.3f} s/epoch")
    if set(kinds) != {"one", "mpi-1", "mpi-2", "pair"}:
        return
    print(f"speed-up one / mpi-2: {med['one'] / med['mpi-2']:.2f}x;  "
          f"mpi-1 / mpi-2: {med['mpi-1'] / med['mpi-2']:.2f}x;  "
          f"one / mpi-1 (the sharded epoch's own cost): {med['one'] / med['mpi-1']:.2f}x;  "
          f"ceiling 2 * one / pair: {2 * med['one'] / med['pair']:.2f}x")


if __name__ == "__main__":
    main()
