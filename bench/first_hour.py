"""What a new user waits for: the README's main command and a first fit, from an empty Numba
cache, each in a fresh process (the figures of README "The first hour").

    python bench/first_hour.py            # every figure (runs `fastreg bench` twice: minutes)
    python bench/first_hour.py --fit-only # the first-fit figures only

Figures, each the wall time of a fresh Python process (its imports included) with
NUMBA_CACHE_DIR pointing at a new empty directory unless it says warm:
- first epoch of the `curve` workload's model on the default backend, from process start;
- the same on the Numba backend (its cold compile), and again with the warm cache;
- `fastreg bench --quick` cold, then warm (same cache), and `fastreg bench` cold.
The machine's load average is printed with them: these are shared machines.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

FIRST_EPOCH = r"""
import time
t0 = time.perf_counter()
import fastreg as fr
from bench.workloads import make_workload
wl = make_workload("curve", quick=True)
layers = [fr.Dense(u, a, dropout=d, regularizer=fr.L2(wl.l2)) for u, a, d in wl.layers]
model = fr.Sequential(layers, input_dim=wl.X_train.shape[1], seed=wl.seed)
model.compile(loss=wl.loss, optimizer=fr.Adam(learning_rate=wl.lr), backend=BACKEND)
t1 = time.perf_counter()
model.fit(wl.X_train, wl.y_train, epochs=1, batch_size=wl.batch_size, verbose=0)
t2 = time.perf_counter()
print(model.backend, t1 - t0, t2 - t0)
"""

def _run(cmd, cache, env_extra=None, code=None):
    env = dict(os.environ, NUMBA_CACHE_DIR=cache, **(env_extra or {}))
    t0 = time.perf_counter()
    if code is not None:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, cwd=os.path.dirname(os.path.dirname(
                                 os.path.abspath(__file__))))
    else:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise RuntimeError(f"{cmd or 'first epoch'} failed:\n{out.stderr[-2000:]}")
    return wall, out.stdout


def first_epoch(backend, cache):
    code = FIRST_EPOCH.replace("BACKEND", repr(backend))
    wall, out = _run(None, cache, code=code)
    name, setup, end = out.split()[-3:]
    return {"backend": name, "process_to_end_of_epoch_1_s": round(float(end), 2),
            "imports_and_compile_s": round(float(setup), 2), "wall_s": round(wall, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fit-only", action="store_true")
    ap.add_argument("--json", help="write the figures to this file too")
    args = ap.parse_args()
    fastreg = shutil.which("fastreg") or "fastreg"
    figures = {"load_average_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as root:
        cold = lambda: tempfile.mkdtemp(dir=root)      # noqa: E731  (a new empty cache)
        figures["default_first_epoch_cold"] = first_epoch(None, cold())
        cache = cold()
        figures["numba_first_epoch_cold"] = first_epoch("numba", cache)
        figures["numba_first_epoch_warm"] = first_epoch("numba", cache)
        if not args.fit_only:
            cache = cold()
            figures["bench_quick_cold_s"] = round(_run([fastreg, "bench", "--quick"], cache)[0], 1)
            figures["bench_quick_warm_s"] = round(_run([fastreg, "bench", "--quick"], cache)[0], 1)
            figures["bench_cold_s"] = round(_run([fastreg, "bench"], cold())[0], 1)
    figures["load_average_after"] = os.getloadavg()
    text = json.dumps(figures, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
