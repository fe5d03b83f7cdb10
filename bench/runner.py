"""`fastreg bench`: every fastreg backend and every installed peer on the same work.

Method (DESIGN.md, "Performance method"):
- every engine starts from the same initial weights and trains with the same hyperparameters;
- the first epoch of each engine is timed apart (it includes compilation / tracing);
- the timed epochs run interleaved, one epoch per engine in turn (A B C A B C ...), because the
  machine is noisy; the median is reported;
- the GEMM ceiling is measured in the same rounds, as one more engine (bench/ceiling.py): the
  exact GEMMs of every training step of the epoch (forward x@W, weight-gradient x.T@dz,
  input-gradient dz@W.T) through NumPy's float32 matmul on all the cores (the faster of one
  multi-threaded call per GEMM and one single-threaded block of rows per core). No training
  step can beat it by much; the ratio says how much of an epoch is overhead;
- thread pools are set once for all engines;
- the NumPy reference is a correctness oracle, not an engine to benchmark: it runs only when
  named (--backend numpy);
- progress and status go to stderr (a live bar on a terminal, plain lines otherwise), the
  tables and ``--json -`` to stdout.
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
from . import prewarm
from .ceiling import GemmCeiling
from .workloads import initial_weights, make_workload

WORKLOADS = ("curve", "wide", "digits")
FASTREG_BACKENDS = ("numpy", "numba", "cython", "cuda")
SETTLE_S = 0.1
DEFAULT_BACKENDS = ("numba", "cython", "cuda")    # the numpy reference only when asked
CEILING_NOTE_PCT = 105.0    # an engine above this share of the ceiling gets a note
INSTALL_PEERS = 'pip install "fastreg[bench]"'


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


# ---------------------------------------------------------------- GEMM ceiling (GPU)
def _gemm_sequence(shapes, rng):
    """Preallocated operands for a list of (m, k, n) GEMMs."""
    return [(rng.standard_normal((m, k)).astype(np.float32),
             rng.standard_normal((k, n)).astype(np.float32),
             np.empty((m, n), np.float32)) for m, k, n in shapes]


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


class Status:
    """Where a run says what it is doing: stderr, never the tables' stdout. On a terminal a
    live bar (one task per workload); otherwise plain lines, at least one every `gap_s`
    seconds of work (a line per engine epoch when rounds are slow, per round when fast), so
    a log shows progress as it happens."""

    def __init__(self, console=None, enabled=True, gap_s=2.0):
        from rich.console import Console
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.gap_s = gap_s
        self.live = enabled and self.console.is_terminal
        self._progress = None
        self._task = None
        self._last = time.perf_counter()

    def __enter__(self):
        if self.live:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn)
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._progress.start()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def say(self, text):
        """A line that always shows (above the bar on a terminal)."""
        if self.enabled:
            self.console.print(text, highlight=False, markup=False)
            self._last = time.perf_counter()

    def begin(self, workload, total):
        if self._progress is not None:
            self._task = self._progress.add_task(workload, total=total)

    def step(self, text, done=False):
        """One engine epoch ended (`done`: the round ended too): the bar moves; a plain line
        when the last one is `gap_s` old or the round ended."""
        if self._progress is not None:
            if self._task is not None:
                self._progress.update(self._task, advance=1, description=text)
        elif self.enabled and (done or time.perf_counter() - self._last >= self.gap_s):
            self.say(text)


def set_threads(threads):
    """One thread setting for every pool: Numba's, both OpenBLAS copies, OpenMP."""
    from threadpoolctl import threadpool_limits
    try:
        import numba
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:     # no Numba here: only the BLAS and OpenMP pools to set
        pass
    return threadpool_limits(limits=threads)


def _engines_for(workload, weights, backends, peers, threads):
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


def _timed(engine):
    time.sleep(SETTLE_S)
    t0 = time.perf_counter()
    engine.run_epoch()
    return time.perf_counter() - t0


def bench_workload(name, backends, peers, epochs=None, repeats=1, threads=None, quick=False,
                   seed=0, status=None):
    """Run one workload; returns a dict of every figure."""
    status = status or Status(enabled=False)
    workload = make_workload(name, quick=quick, seed=seed)
    weights = initial_weights(workload, seed=seed)
    epochs = epochs or workload.epochs
    threads = threads or os.cpu_count()
    all_results, ceiling = None, GemmCeiling(workload, threads, seed=seed)
    for rep in range(repeats):
        engines, results = _engines_for(workload, weights, backends, peers, threads)
        status.begin(name, (len(engines) + 1) * (epochs + 1))
        rep_text = f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""
        for eng in engines + [ceiling]:           # warm-up epoch: compile / trace included
            status.say(f"{name}{rep_text}: {eng.name} first epoch (compilation included)")
            t = _timed(eng)
            if eng is not ceiling:
                results[eng.name].first_epoch_s = t
            status.step(f"{name}: {eng.name} first epoch {t:.2f} s")
        if ceiling.times_s:                       # its warm-up round is not a timing
            ceiling.times_s.pop(), ceiling.multi_s.pop(), ceiling.blocks_s.pop()
        for r in range(epochs):                   # interleaved A B C ceiling A B C ...
            for eng in engines + [ceiling]:
                t = _timed(eng)
                if eng is ceiling:
                    t = ceiling.times_s[-1]       # its own figure: the faster way
                else:
                    results[eng.name].epoch_times_s.append(t)
                status.step(f"{name}{rep_text}: round {r + 1}/{epochs}, {eng.name} "
                            f"{t * 1e3:.1f} ms", done=eng is ceiling)
        for eng in engines:
            res = results[eng.name]
            res.train_loss = float(eng.train_loss())
            res.val_loss = float(eng.val_loss())
            acc = eng.val_accuracy()
            res.val_accuracy = None if acc is None else float(acc)
        if all_results is None:
            all_results = results
        else:                                     # pool the timings of every repeat
            for key, res in results.items():
                all_results[key].epoch_times_s += res.epoch_times_s
    gpu = [k for k in GPU_ENGINES if k in all_results and all_results[k].available]
    gpu_ceiling = gpu_gemm_ceiling_seconds(workload) if gpu else None
    out = _summarise(workload, all_results, statistics.median(ceiling.times_s), epochs,
                     repeats, gpu_ceiling)
    out["gemm_ceiling"] = {"epoch_times_s": ceiling.times_s,
                           "multi_threaded_s": ceiling.multi_s,
                           "row_blocks_s": ceiling.blocks_s, "threads": ceiling.threads}
    return out


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
            pct = row["pct_of_gemm_ceiling"]
            if pct > CEILING_NOTE_PCT:     # beating the GEMMs alone needs a word of why
                row["notes"] = "; ".join(filter(None, [row["notes"], (
                    f"{pct:.0f}% of the GEMM ceiling: faster than NumPy's matmul at the same "
                    f"shapes in the same rounds, i.e. its GEMMs took a faster BLAS path than "
                    f"the ceiling's calls (the per-round ceiling times are in --json)")]))
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
    """The backends a default run times: every available one but the NumPy reference (a
    correctness oracle, far slower by design), with the unavailable ones listed."""
    from fastreg.backend import availability
    ok = availability()
    return [b for b in DEFAULT_BACKENDS if b in ok]


def missing_peers():
    """{peer: reason} of the CPU peers that are not installed here (torch-cuda is a GPU
    engine: it is only expected where a GPU is)."""
    return {p: cls.available()[1] for p, cls in peer_engines.PEERS.items()
            if p != "torch-cuda" and not cls.available()[0]}


def run(workloads=WORKLOADS, backends=None, peers=None, epochs=None, repeats=1, threads=None,
        quick=False, seed=0, json_path=None, console=None, status=None, show_progress=True):
    """The whole benchmark: returns {"machine": ..., "workloads": [...]}; prints the tables
    on `console` (stdout) and the progress on `status` (stderr). json_path "-" writes the
    JSON to stdout instead of the tables."""
    from rich.console import Console
    if console is None:
        console = Console()
        if not console.is_terminal:       # a log file or a pipe: room for every column
            console = Console(width=200)
    status = status or Status(enabled=show_progress)
    threads = threads or os.cpu_count()
    backends = list(backends) if backends else default_backends()
    if peers is None:
        peers = [p for p, cls in peer_engines.PEERS.items() if cls.available()[0]]
        missing = missing_peers()
        if missing:
            status.say(f"peers not installed here: {', '.join(sorted(missing))} "
                       f"(`{INSTALL_PEERS}` adds them)")
    peers = list(peers)
    if "numpy" not in backends:
        status.say("the NumPy reference backend is left out (a correctness oracle, not an "
                   "engine to time): --backend numpy runs it")
    if prewarm.wanted(backends, workloads):
        prewarm.prewarm(list(workloads), quick, seed, status)
    out = {"machine": machine_description(threads), "workloads": []}
    limiter = set_threads(threads)
    tables = json_path != "-"
    try:
        with status:
            for name in workloads:
                res = bench_workload(name, backends, peers, epochs, repeats, threads, quick,
                                     seed, status)
                out["workloads"].append(res)
                if tables:
                    console.print(render_table(res))
    finally:
        limiter.restore_original_limits()
    if json_path == "-":
        console.file.write(json.dumps(out, indent=2, default=float) + "\n")
    elif json_path:
        with open(json_path, "w") as f:
            json.dump(out, f, indent=2, default=float)
        status.say(f"every figure written to {json_path}")
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
