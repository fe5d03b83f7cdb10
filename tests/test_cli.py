"""The `fastreg` command line, end to end on small runs."""
import json

import numpy as np
from click.testing import CliRunner

from fastreg.cli import main


def test_help_documents_every_bench_option():
    runner = CliRunner()
    top = runner.invoke(main, ["--help"])
    assert top.exit_code == 0
    for command in ("bench", "sweep", "study"):
        assert command in top.output
    out = runner.invoke(main, ["bench", "--help"])
    assert out.exit_code == 0
    for option in ("--workload", "--backend", "--peers", "--epochs", "--repeats", "--threads",
                   "--json", "--quick"):
        assert option in out.output


def test_bench_runs_and_writes_every_figure(tmp_path):
    path = tmp_path / "bench.json"
    out = CliRunner().invoke(main, ["bench", "--quick", "--workload", "curve", "--epochs", "1",
                                    "--peers", "", "--backend", "numpy,numba,cuda",
                                    "--json", str(path)])
    assert out.exit_code == 0, out.output
    assert "curve" in out.output and "GEMM ceiling" in out.output
    data = json.loads(path.read_text())
    assert data["machine"]["cores"] >= 1 and "numba" in data["machine"]["versions"]
    (res,) = data["workloads"]
    rows = {r["engine"]: r for r in res["rows"]}
    assert rows["fastreg-numba"]["available"] and rows["fastreg-numpy"]["available"]
    # the same weights, data and masks: both backends end at the same loss
    assert abs(rows["fastreg-numba"]["val_loss"] - rows["fastreg-numpy"]["val_loss"]) < 1e-4
    assert rows["fastreg-numba"]["gflops"] > 0 and rows["fastreg-numba"]["kept_bytes_per_element"] == 4
    assert res["gemm_ceiling_epoch_s"] > 0 and res["flops_per_epoch"] > 0
    if not rows["fastreg-cuda"]["available"]:       # no GPU here: listed with the reason
        reason = rows["fastreg-cuda"]["reason"]
        assert "not available" in reason or "not timed under the numba-cuda simulator" in reason


def test_bench_rejects_unknown_backend_and_peer():
    runner = CliRunner()
    out = runner.invoke(main, ["bench", "--backend", "tpu"])
    assert out.exit_code != 0 and "unknown backend" in out.output
    out = runner.invoke(main, ["bench", "--peers", "caffe"])
    assert out.exit_code != 0 and "unknown peer" in out.output


def test_gpu_rows_sit_beside_the_cpu_rows():
    """The summary of a run with GPU engines (timings made up: no GPU here): GPU rows against
    the cuBLAS ceiling, the fastreg-cuda row with its ratio to the fastest CPU backend."""
    from fastreg.bench.runner import EngineResult, _summarise, render_table
    from fastreg.bench.workloads import make_workload
    from rich.console import Console
    wl = make_workload("curve", quick=True)
    times = {"fastreg-numpy": 0.9, "fastreg-numba": 0.020, "fastreg-cython": 0.025,
             "fastreg-cuda": 0.004, "torch": 0.08, "torch-cuda": 0.030}
    results = {k: EngineResult(k, True, epoch_times_s=[t, t], val_loss=0.01, train_loss=0.01,
                               kept_bytes_per_element=4.0) for k, t in times.items()}
    res = _summarise(wl, results, ceiling_s=0.010, epochs=2, repeats=1, gpu_ceiling_s=0.002)
    rows = {r["engine"]: r for r in res["rows"]}
    assert rows["fastreg-cuda"]["device"] == "gpu" and rows["fastreg-numba"]["device"] == "cpu"
    assert rows["fastreg-cuda"]["speedup_vs_best_cpu"] == 0.020 / 0.004   # numba, not numpy
    assert "speedup_vs_best_cpu" not in rows["fastreg-numba"]
    assert rows["fastreg-cuda"]["pct_of_gemm_ceiling"] == 100.0 * 0.002 / 0.004
    assert rows["torch-cuda"]["pct_of_gemm_ceiling"] == 100.0 * 0.002 / 0.030
    assert rows["fastreg-numba"]["pct_of_gemm_ceiling"] == 100.0 * 0.010 / 0.020
    assert rows["fastreg-cuda"]["speedup_vs"]["torch-cuda"] == 0.030 / 0.004
    console = Console(width=200, record=True)
    console.print(render_table(res))
    text = console.export_text()
    assert "5.0xcpu" in text and "7.5xtc" in text and "GPU 2.00 ms/epoch (cuBLAS)" in text


def test_gpu_ceiling_runs_each_shape_as_one_batched_gemm(monkeypatch):
    """The cuBLAS ceiling's arithmetic, with NumPy standing in for the device (no GPU here):
    one batched call per GEMM shape of a step, scaled to the epoch."""
    from fastreg.bench import runner
    from fastreg.bench.workloads import make_workload
    calls = []

    def matmul(a, b, out):
        calls.append(a.shape)
        np.matmul(a, b, out=out)

    monkeypatch.setenv("NUMBA_ENABLE_CUDASIM", "0")
    monkeypatch.setattr(runner, "_gpu_matmul", lambda: (matmul, np.asarray, lambda: None))
    wl = make_workload("curve", quick=True)
    t = runner.gpu_gemm_ceiling_seconds(wl, repeats=2, stack=4)
    assert t > 0
    per_step = len(wl.gemm_shapes(wl.batch_size))
    assert calls[0][0] == 4 and len(calls) >= 3 * per_step    # warm-up + 2 repeats, batched
    monkeypatch.setattr(runner, "_gpu_matmul", lambda: None)
    assert runner.gpu_gemm_ceiling_seconds(wl) is None
