"""`fastreg bench`: every fastreg backend and every installed peer on the same work.

Method (DESIGN.md, "Performance method"):
- every engine starts from the same initial weights and trains with the same hyperparameters;
- the first epoch of each engine is timed apart (it includes compilation / tracing);
- the timed epochs run interleaved, one epoch per engine in turn (A B C A B C ...), because the
  machine is noisy; the median is reported;
- the GEMM ceiling is measured in the same run: the exact GEMMs of every training step of the
  epoch (forward x@W, weight-gradient x.T@dz, input-gradient dz@W.T) back to back through NumPy's
  float32 matmul on the same threads. No training step can beat it by much; the ratio says how
  much of an epoch is overhead;
- thread pools are set once for all engines;
- before each timed epoch the process sleeps SETTLE_S, long enough for the previous engine's
  pools (OpenBLAS, OpenMP, XLA) to stop spinning: their busy-waiting workers would otherwise
  take cores from whichever engine runs next (measured: cython's curve epoch went from 17 ms
  alone to 93 ms right after the other engines).
"""
import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from . import peers as peer_engines
from .workloads import initial_weights, make_workload

WORKLOADS = ("curve", "wide", "digits")
FASTREG_BACKENDS = ("numpy", "numba", "cython", "cuda")
SETTLE_S = 0.1


# ---------------------------------------------------------------- fastreg as an engine
class FastregEngine:
    """A fastreg model on one backend, with the interface of the peer engines."""
    kept_bytes_per_element = 4.0   # the layer output only; the dropout mask is regenerated
    notes = ""

    def __init__(self, workload, weights, backend):
        import fastreg as fr
        if backend == "cuda":
            from fastreg.kernels import cuda as cuda_kernels
            if cuda_kernels.on_simulator():
                raise RuntimeError(
                    "backend 'cuda' is not timed under the numba-cuda simulator "
                    "(NUMBA_ENABLE_CUDASIM=1): its times say nothing about a GPU")
        self.name = f"fastreg-{backend}"
        self.backend = backend
        self.workload = workload
        layers = []
        for units, activation, dropout in workload.layers:
            layers.append(fr.Dense(units, activation, dropout=dropout,
                                   regularizer=fr.L2(workload.l2) if workload.l2 else None))
        self.model = fr.Sequential(layers, input_dim=workload.X_train.shape[1],
                                   seed=workload.seed)
        self.model.compile(loss=workload.loss, optimizer=fr.Adam(workload.lr), backend=backend)
        self.model.set_weights(weights)
        self._last_loss = float("nan")

    def run_epoch(self):
        hist = self.model.fit(self.workload.X_train, self.workload.y_train, epochs=1,
                              batch_size=self.workload.batch_size, verbose=0)
        self._last_loss = hist.history["loss"][-1] if hist.history.get("loss") else float("nan")

    def train_loss(self):
        return self._last_loss

    def val_loss(self):
        return self.model.evaluate(self.workload.X_val, self.workload.y_val)

    def val_accuracy(self):
        if self.workload.loss != "sparse_categorical_crossentropy":
            return None
        pred = self.model.predict(self.workload.X_val).argmax(axis=1)
        return float((pred == np.asarray(self.workload.y_val).reshape(-1)).mean())


# ---------------------------------------------------------------- GEMM ceiling
def _gemm_sequence(shapes, rng):
    """Preallocated operands for a list of (m, k, n) GEMMs."""
    return [(rng.standard_normal((m, k)).astype(np.float32),
             rng.standard_normal((k, n)).astype(np.float32),
             np.empty((m, n), np.float32)) for m, k, n in shapes]


def gemm_ceiling_seconds(workload, repeats=5):
    """Seconds per epoch spent in the epoch's GEMMs alone, through NumPy's float32 matmul."""
    n = workload.X_train.shape[0]
    B = workload.batch_size
    full, last = divmod(n, B)
    rng = np.random.default_rng(0)
    seq_full = _gemm_sequence(workload.gemm_shapes(B), rng)
    seq_last = _gemm_sequence(workload.gemm_shapes(last), rng) if last else []

    def one_step(seq):
        for a, b, out in seq:
            np.matmul(a, b, out=out)

    one_step(seq_full)
    steps = max(1, min(full, 50))   # time a sample of steps, scale to the epoch
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            one_step(seq_full)
        t_full = (time.perf_counter() - t0) / steps
        t_last = 0.0
        if seq_last:
            t0 = time.perf_counter()
            one_step(seq_last)
            t_last = time.perf_counter() - t0
        times.append(t_full * full + t_last)
    return statistics.median(times)


GPU_ENGINES = ("fastreg-cuda", "torch-cuda")
PEER_ABBREV = {"torch": "to", "torch-cuda": "tc", "jax": "ja", "sklearn": "sk"}


def gpu_gemm_ceiling_seconds(workload, repeats=5, stack=64):
    """The GPU twin of gemm_ceiling_seconds: the epoch's GEMMs through cuBLAS (CuPy's matmul,
    else torch's on device "cuda"), each shape run as ONE batched GEMM over `stack` steps'
    worth of operands, so that a Python call per small GEMM (~10 us) does not pose as
    arithmetic; None without either library or a GPU (and under the numba-cuda simulator)."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return None
    mm = _gpu_matmul()
    if mm is None:
        return None
    matmul, to_device, sync = mm
    n = workload.X_train.shape[0]
    B = workload.batch_size
    full, last = divmod(n, B)
    rng = np.random.default_rng(0)

    def per_step(m, S):
        """Seconds per step of the step's GEMMs at batch m, from S stacked steps."""
        ops = [tuple(to_device(np.repeat(a[None], S, axis=0)) for a in trio)
               for trio in _gemm_sequence(workload.gemm_shapes(m), rng)]
        for a, b, out in ops:       # warm-up: cuBLAS picks its kernels
            matmul(a, b, out)
        sync()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for a, b, out in ops:
                matmul(a, b, out)
            sync()
            times.append((time.perf_counter() - t0) / S)
        return statistics.median(times)

    total = per_step(B, max(1, min(full, stack))) * full
    if last:
        total += per_step(last, 1)
    return total


def _gpu_matmul():
    """(matmul(a, b, out), to_device, synchronize) on the GPU, or None."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return ((lambda a, b, out: cupy.matmul(a, b, out=out)), cupy.asarray,
                    cupy.cuda.Device().synchronize)
    except Exception:
        pass
    try:
        import torch
        if torch.cuda.is_available():
            return ((lambda a, b, out: torch.matmul(a, b, out=out)),
                    (lambda a: torch.from_numpy(a).cuda()), torch.cuda.synchronize)
    except Exception:
        pass
    return None


# ---------------------------------------------------------------- the run
@dataclass
class EngineResult:
    engine: str
    available: bool
    reason: str = ""
    first_epoch_s: float = float("nan")
    epoch_times_s: list = field(default_factory=list)
    train_loss: float = float("nan")
    val_loss: float = float("nan")
    val_accuracy: float = None
    kept_bytes_per_element: float = float("nan")
    notes: str = ""

    @property
    def median_epoch_s(self):
        return statistics.median(self.epoch_times_s) if self.epoch_times_s else float("nan")


def set_threads(threads):
    """One thread setting for every pool: Numba's, both OpenBLAS copies, OpenMP."""
    from threadpoolctl import threadpool_limits
    import numba
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    return threadpool_limits(limits=threads)


def _engines_for(workload, weights, backends, peers, threads, log):
    engines, results = [], {}
    for backend in backends:
        name = f"fastreg-{backend}"
        try:
            engines.append(FastregEngine(workload, weights, backend))
            results[name] = EngineResult(name, True,
                                         kept_bytes_per_element=FastregEngine.kept_bytes_per_element)
        except Exception as exc:  # an unavailable backend is a row with its reason
            results[name] = EngineResult(name, False, reason=_one_line(exc))
    for peer in peers:
        cls = peer_engines.PEERS[peer]
        ok, reason = cls.available()
        if not ok:
            results[peer] = EngineResult(peer, False, reason=reason)
            continue
        try:
            eng = cls(workload, [w.copy() for w in weights], threads)
            engines.append(eng)
            results[peer] = EngineResult(peer, True, kept_bytes_per_element=float(
                getattr(eng, "kept_bytes_per_element", float("nan"))),
                notes=getattr(eng, "notes", ""))
        except Exception as exc:
            results[peer] = EngineResult(peer, False, reason=_one_line(exc))
    return engines, results


def _one_line(exc):
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def bench_workload(name, backends, peers, epochs=None, repeats=1, threads=None, quick=False,
                   seed=0, progress=None):
    """Run one workload; returns a dict of every figure."""
    workload = make_workload(name, quick=quick, seed=seed)
    weights = initial_weights(workload, seed=seed)
    epochs = epochs or workload.epochs
    threads = threads or os.cpu_count()
    task = progress.add_task(f"{name}", total=repeats * (epochs + 1)) if progress else None
    all_results = None
    for rep in range(repeats):
        engines, results = _engines_for(workload, weights, backends, peers, threads, None)
        for eng in engines:                       # warm-up epoch: compile / trace included
            time.sleep(SETTLE_S)
            t0 = time.perf_counter()
            eng.run_epoch()
            results[eng.name].first_epoch_s = time.perf_counter() - t0
        if progress:
            progress.advance(task)
        for _ in range(epochs):                   # interleaved A B C A B C ...
            for eng in engines:
                time.sleep(SETTLE_S)
                t0 = time.perf_counter()
                eng.run_epoch()
                results[eng.name].epoch_times_s.append(time.perf_counter() - t0)
            if progress:
                progress.advance(task)
        for eng in engines:
            r = results[eng.name]
            r.train_loss = float(eng.train_loss())
            r.val_loss = float(eng.val_loss())
            acc = eng.val_accuracy()
            r.val_accuracy = None if acc is None else float(acc)
        if all_results is None:
            all_results = results
        else:                                     # pool the timings of every repeat
            for key, r in results.items():
                all_results[key].epoch_times_s += r.epoch_times_s
    ceiling = gemm_ceiling_seconds(workload)
    gpu = [k for k in GPU_ENGINES if k in all_results and all_results[k].available]
    gpu_ceiling = gpu_gemm_ceiling_seconds(workload) if gpu else None
    return _summarise(workload, all_results, ceiling, epochs, repeats, gpu_ceiling)


def _summarise(workload, results, ceiling_s, epochs, repeats, gpu_ceiling_s=None):
    n = workload.X_train.shape[0]
    flops = workload.flops_per_epoch()
    act_elems = workload.batch_size * sum(units for units, _, _ in workload.layers)
    rows = []
    vals = [r.val_loss for r in results.values() if r.available and np.isfinite(r.val_loss)]
    best_val = min(vals) if vals else float("nan")
    peer_times = {k: r.median_epoch_s for k, r in results.items()
                  if r.available and not k.startswith("fastreg")}
    cpu_fastreg = [r.median_epoch_s for k, r in results.items()
                   if r.available and k.startswith("fastreg") and k not in GPU_ENGINES
                   and k != "fastreg-numpy"]
    for key, r in results.items():
        row = {"engine": key, "available": r.available, "reason": r.reason, "notes": r.notes,
               "device": "gpu" if key in GPU_ENGINES else "cpu"}
        if r.available:
            med = r.median_epoch_s
            # a GPU engine against the GPU's GEMM ceiling (cuBLAS), a CPU one against NumPy's
            ceil = gpu_ceiling_s if key in GPU_ENGINES else ceiling_s
            if key == "fastreg-cuda" and cpu_fastreg:    # the GPU row beside the best CPU one
                row["speedup_vs_best_cpu"] = min(cpu_fastreg) / med
            row.update({
                "median_epoch_s": med,
                "epoch_times_s": r.epoch_times_s,
                "samples_per_s": n / med,
                "first_epoch_s": r.first_epoch_s,
                "gflops": flops / med / 1e9,
                "pct_of_gemm_ceiling": 100.0 * ceil / med if ceil else float("nan"),
                "train_loss": r.train_loss,
                "val_loss": r.val_loss,
                "val_accuracy": r.val_accuracy,
                "kept_bytes_per_element": r.kept_bytes_per_element,
                "kept_bytes_per_step": r.kept_bytes_per_element * act_elems,
                # a fast wrong answer is not a result: flag a loss far from the best engine's
                "loss_flag": bool(not np.isfinite(r.val_loss) or r.val_loss > 1.5 * best_val
                                  + 1e-3),
                "speedup_vs": {p: t / med for p, t in peer_times.items()}
                if key.startswith("fastreg") else {},
            })
        rows.append(row)
    return {"workload": workload.name, "samples": n, "batch_size": workload.batch_size,
            "layers": [list(layer) for layer in workload.layers], "loss": workload.loss,
            "timed_epochs": epochs, "repeats": repeats, "flops_per_epoch": flops,
            "gemm_ceiling_epoch_s": ceiling_s, "gemm_ceiling_gflops": flops / ceiling_s / 1e9,
            "gpu_gemm_ceiling_epoch_s": gpu_ceiling_s, "rows": rows}


def machine_description(threads):
    import numba
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    versions = {"python": platform.python_version(), "numpy": np.__version__,
                "numba": numba.__version__}
    for mod in ("scipy", "torch", "jax", "sklearn", "fastreg"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads,
            "platform": platform.platform(), "versions": versions,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def default_backends():
    from fastreg.backend import availability
    return [b for b, (ok, _) in availability().items() if ok]


def run(workloads=WORKLOADS, backends=None, peers=None, epochs=None, repeats=1, threads=None,
        quick=False, seed=0, json_path=None, console=None, show_progress=True):
    """The whole benchmark: returns {"machine": ..., "workloads": [...]}; prints tables."""
    from rich.console import Console
    from rich.progress import Progress
    if console is None:
        console = Console()
        if not console.is_terminal:       # a log file or a pipe: room for every column
            console = Console(width=160)
    threads = threads or os.cpu_count()
    if backends:
        backends = list(backends)
    else:   # --quick leaves out the float64-speed NumPy reference: it is a spec, not an engine
        backends = [b for b in FASTREG_BACKENDS if not (quick and b == "numpy")]
    peers = list(peers) if peers is not None else [
        p for p, cls in peer_engines.PEERS.items() if cls.available()[0]]
    out = {"machine": machine_description(threads), "workloads": []}
    limiter = set_threads(threads)
    try:
        with Progress(console=console, transient=True, disable=not show_progress) as progress:
            for name in workloads:
                try:
                    res = bench_workload(name, backends, peers, epochs, repeats, threads, quick,
                                         seed, progress)
                except ImportError as exc:   # digits without scikit-learn
                    res = {"workload": name, "skipped": _one_line(exc), "rows": []}
                out["workloads"].append(res)
                console.print(render_table(res))
    finally:
        limiter.restore_original_limits()
    if json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2, default=float)
        console.print(f"every figure written to {json_path}")
    return out


def render_table(res):
    """A rich Table, notes and unavailable backends as numbered footnotes under it."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text
    if res.get("skipped"):
        return Text(f"{res['workload']}: skipped ({res['skipped']})", style="yellow")
    title = (f"{res['workload']}: {res['samples']:,} samples, batch {res['batch_size']}, "
             f"{res['flops_per_epoch'] / 1e9:.2f} GFLOP/epoch; GEMM ceiling "
             f"{res['gemm_ceiling_epoch_s'] * 1e3:.1f} ms/epoch "
             f"({res['gemm_ceiling_gflops']:.0f} GFLOP/s)")
    if res.get("gpu_gemm_ceiling_epoch_s"):
        title += f", GPU {res['gpu_gemm_ceiling_epoch_s'] * 1e3:.2f} ms/epoch (cuBLAS)"
    t = Table(title=title, title_justify="left")
    for col in ("engine", "epoch ms", "samples/s", "1st s", "GFLOP/s", "ceil%",
                "speed-up", "train", "val", "acc", "B/el"):
        t.add_column(col, justify="left" if col in ("engine", "speed-up") else "right")
    notes = []
    for row in res["rows"]:
        name = row["engine"]
        text = row["reason"] if not row["available"] else row["notes"]
        if text:
            notes.append(f"[{len(notes) + 1}] {row['engine']}: {text}")
            name += f" [{len(notes)}]"
        if not row["available"]:
            t.add_row(name, "n/a", *[""] * 9)
            continue
        flag = "!" if row["loss_flag"] else ""
        speed = " ".join(f"{v:.1f}x{PEER_ABBREV.get(k, k[:2])}"
                         for k, v in row["speedup_vs"].items())
        if "speedup_vs_best_cpu" in row:
            speed = f"{row['speedup_vs_best_cpu']:.1f}xcpu " + speed
        acc = "" if row["val_accuracy"] is None else f"{row['val_accuracy']:.3f}"
        t.add_row(name, f"{row['median_epoch_s'] * 1e3:.1f}", f"{row['samples_per_s']:,.0f}",
                  f"{row['first_epoch_s']:.2f}", f"{row['gflops']:.1f}",
                  f"{row['pct_of_gemm_ceiling']:.0f}", speed, f"{row['train_loss']:.4g}",
                  f"{row['val_loss']:.4g}{flag}", acc, f"{row['kept_bytes_per_element']:g}")
    legend = ("speed-up: peer epoch time / this engine's (to=torch, tc=torch-cuda, ja=jax, "
              "sk=sklearn; cpu=the fastest fastreg CPU backend); ceil%: GEMM-ceiling time / "
              "epoch time (GPU rows: cuBLAS at the same shapes); B/el: bytes kept per "
              "activation element between forward and backward; ! = validation loss far from "
              "the best engine's")
    return Group(t, Text("\n".join(notes + [legend]), style="dim"))
