"""The `fastreg` command line, end to end on small runs."""
import json

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
