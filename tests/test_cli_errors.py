"""The CLI as a user meets it: every ordinary mistake ends in one clear line and exit status
2, never a traceback; results on stdout, status on stderr; output to a pipe is complete."""
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from fastreg import cli_common
from fastreg.cli import main


def _fails(args, *needles):
    """Run the CLI in-process: exit 2, no traceback, each needle in the error text."""
    out = CliRunner().invoke(main, args)
    text = out.output
    assert out.exit_code == 2, (args, out.exit_code, text, out.exception)
    assert "Traceback" not in text
    for needle in needles:
        assert needle in text, (args, text)
    return text


@pytest.fixture
def csvs(tmp_path):
    files = {"ok": "a,b,t\n1,2,3\n4,5,6\n7,8,9\n",
             "text": "a,b,t\n1,2,3\n4,x,6\n",
             "missing": "a,b,t\n1,2,3\n\n4,,6\n",
             "ragged": "1,2,3\n4,5\n"}
    paths = {}
    for name, text in files.items():
        paths[name] = tmp_path / f"{name}.csv"
        paths[name].write_text(text)
    return paths


def test_missing_file_says_file_not_found(tmp_path):
    _fails(["sweep", str(tmp_path / "x.csv"), "--l2", "0"], "file not found", "x.csv")


def test_unknown_source_lists_what_is_known():
    _fails(["sweep", "mnist", "--l2", "0"], "'mnist' is neither a data file",
           "curve, wide, digits")


def test_csv_cells_named_by_file_line_and_column(csvs):
    _fails(["sweep", str(csvs["text"]), "--l2", "0"], "line 3, column 2 ('b')", "'x'")
    # the blank line 3 still counts: the bad cell is on line 4 of the file
    _fails(["sweep", str(csvs["missing"]), "--l2", "0"], "line 4, column 2 ('b')",
           "missing value")
    _fails(["sweep", str(csvs["ragged"]), "--l2", "0"], "line 2")


def test_csv_without_pandas_names_the_same_cell(csvs, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_pandas(name, *args, **kwargs):
        if name == "pandas" or name.startswith("pandas."):
            raise ImportError("no pandas here")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_pandas)
    _fails(["sweep", str(csvs["text"]), "--l2", "0"], "line 3, column 2 ('b')", "'x'")
    _fails(["sweep", str(csvs["missing"]), "--l2", "0"], "line 4, column 2 ('b')",
           "missing value")


def test_target_out_of_range_and_unknown(csvs):
    _fails(["sweep", str(csvs["ok"]), "--l2", "0", "--target", "5"], "--target 5",
           "out of range", "3 columns")
    _fails(["sweep", str(csvs["ok"]), "--l2", "0", "--target", "price"], "no column",
           "a, b, t")


@pytest.mark.parametrize("args,needle", [
    (["sweep", "--dropout", "1.5"], "--dropout"),
    (["sweep", "--l2", "-1"], "--l2"),
    (["sweep", "--lr", "0"], "--lr"),
    (["sweep", "--l2", "0", "--activation", "swishy"], "--activation"),
    (["sweep", "--l2", "0", "--n-jobs", "0"], "--n-jobs"),
    (["sweep", "--l2", "0", "--epochs", "0"], "--epochs"),
    (["sweep", "--l2", "0", "--hidden", "64,x"], "--hidden"),
    (["study", "--n-jobs", "-3"], "--n-jobs"),
    (["bench", "--backend", "tpu"], "unknown backend"),
    (["bench", "--peers", "caffe"], "unknown peer"),
])
def test_bad_options_are_usage_errors(args, needle):
    _fails(args, needle)


def test_missing_optional_dependency_fails_before_training(monkeypatch, tmp_path):
    import importlib
    real = importlib.import_module

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib":
            raise ImportError("no matplotlib here")
        return real(name, *args, **kwargs)
    monkeypatch.setattr(importlib, "import_module", no_matplotlib)
    trained = []
    monkeypatch.setattr("fastreg.cli_study.run_study", lambda *a, **k: trained.append(1))
    _fails(["study", "--out", str(tmp_path / "s")], "needs matplotlib", "fastreg[plot]")
    assert not trained and not (tmp_path / "s").exists()
    _fails(["sweep", "--l2", "0", "--plot", str(tmp_path / "p")], "needs matplotlib")


def _run_cli(args, env_update=None, unset=()):
    env = dict(os.environ)
    env.update(env_update or {})
    for key in unset:
        env.pop(key, None)
    return subprocess.run([sys.executable, "-m", "fastreg.cli", *args], capture_output=True,
                          text=True, env=env, timeout=600)


def test_cuda_backend_without_a_gpu_is_one_line(tmp_path):
    """A real process (no simulator, no GPU here): one line on stderr, exit 2."""
    try:
        from fastreg.kernels import cuda
    except ImportError:
        pytest.skip("the cuda backend module cannot be imported here")
    if cuda.cuda is not None and not cuda.on_simulator() and cuda.available()[0]:
        pytest.skip("a GPU is present")
    for args in (["sweep", "--l2", "0", "--backend", "cuda"], ["bench", "--backend", "cuda"]):
        out = _run_cli(args, unset=("NUMBA_ENABLE_CUDASIM",))
        assert out.returncode == 2, out
        assert "Traceback" not in out.stderr and "backend 'cuda' is not available" in out.stderr
        assert out.stdout == ""


def test_help_and_version_do_not_import_numba():
    code = ("import sys\nfrom fastreg.cli import main\nfor args in (['--help'], ['--version'], "
            "['bench', '--help']):\n    try:\n        main(args)\n    except SystemExit:\n"
            "        pass\nprint('NUMBA' if 'numba' in sys.modules else 'NO-NUMBA', "
            "file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().endswith("NO-NUMBA") and "fastreg" in out.stdout


def test_piped_sweep_table_is_complete_and_status_goes_to_stderr(tmp_path):
    out = _run_cli(["sweep", "curve", "--l2", "0,1e-3", "--quick", "--n-jobs", "1",
                    "--hidden", "8"])
    assert out.returncode == 0, out.stderr
    for column in ("final_val_loss", "best_val_loss", "epochs_run", "time_s"):
        assert column in out.stdout
    assert "…" not in out.stdout
    assert "fastreg sweep curve" in out.stderr and "fastreg sweep curve" not in out.stdout
    assert "sweep 2/2" in out.stderr        # plain progress lines, not a redrawn bar


def test_sweep_json_to_stdout(tmp_path):
    out = CliRunner().invoke(main, ["sweep", "curve", "--l2", "0", "--quick", "--n-jobs", "1",
                                    "--hidden", "8", "--json", "-"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.stdout)
    assert data["rows"][0]["l2"] == 0 and "final_val_loss" in data["rows"][0]


def test_study_quick_says_it_is_too_short_instead_of_failing(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    out = CliRunner().invoke(main, ["study", "--quick", "--n-jobs", "1", "--out",
                                    str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    assert "does not hold" not in out.output and "too short" in out.output
    md = (tmp_path / "s" / "summary.md").read_text()
    assert "does not hold" not in md and "not assessed" in md


def test_bench_names_missing_peers_in_one_line(monkeypatch):
    from fastreg.bench import peers, runner
    for cls in peers.PEERS.values():
        monkeypatch.setattr(cls, "available", staticmethod(lambda: (False, "not installed")))
    status_lines = []

    class Status(runner.Status):
        def say(self, text):
            status_lines.append(text)
    monkeypatch.setattr(runner, "bench_workload", lambda *a, **k: {"workload": "x",
                                                                  "skipped": "", "rows": []})
    monkeypatch.setattr(runner, "render_table", lambda res: "")
    runner.run(["curve"], ["numba"], None, status=Status(enabled=False))
    peer_lines = [t for t in status_lines if "not installed" in t]
    assert len(peer_lines) == 1
    assert 'pip install "fastreg[bench]"' in peer_lines[0]
    for name in ("jax", "sklearn", "torch"):
        assert name in peer_lines[0]


def test_require_backend_names_the_option(monkeypatch):
    import fastreg.backend as backends

    def resolve(name):
        raise backends.BackendUnavailable(f"backend {name!r} is not available: test")
    monkeypatch.setattr(backends, "resolve", resolve)
    with pytest.raises(cli_common.UserError, match="--backend numba: backend 'numba' is not "
                                                   "available: test"):
        cli_common.require_backend("numba")
