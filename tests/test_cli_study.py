"""`fastreg sweep` and `fastreg study` end to end on tiny problems (click's CliRunner)."""
import json

import click
import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from fastreg import cli_study  # noqa: E402
from fastreg.cli_common import UserError  # noqa: E402
from fastreg.cli_study import curve_data, load_data, register  # noqa: E402


@pytest.fixture(scope="module")
def cli():
    @click.group()
    def main():
        pass
    register(main)
    return main


def _ok(result):
    assert result.exit_code == 0, (result.output, result.exception)


def test_curve_data_is_the_studys_function():
    X, y, Xv, yv = curve_data(1000, seed=0)
    assert X.shape == (800, 1) and Xv.shape == (200, 1) and X.dtype == np.float32
    assert X.min() >= 0 and X.max() <= 4 * np.pi + 1e-5
    both = np.concatenate([y, yv])
    assert both.min() == pytest.approx(0) and both.max() == pytest.approx(1)
    np.testing.assert_array_equal(curve_data(1000, seed=0)[1], y)


def test_load_data_from_files(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((50, 2)), rng.standard_normal(50)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    Xt, yt, Xv, yv = load_data(str(tmp_path / "d.npz"), val_fraction=0.2)
    assert Xt.shape == (40, 2) and yv.shape == (10, 1)
    with open(tmp_path / "d.csv", "w") as f:
        f.write("a,target,b\n")
        for row, t in zip(X, y):
            f.write(f"{row[0]},{t},{row[1]}\n")
    Xt, yt, Xv, yv = load_data(str(tmp_path / "d.csv"), target="target")
    assert Xt.shape[1] == 2
    assert sorted(np.concatenate([yt, yv])[:, 0]) == pytest.approx(sorted(y), rel=1e-6)
    with pytest.raises(UserError, match="neither a data file"):
        load_data("no-such-workload")


def test_sweep_command(cli, tmp_path):
    out = tmp_path / "sweep.json"
    plots = tmp_path / "plots"
    r = CliRunner().invoke(cli, ["sweep", "curve", "--l2", "0,1e-2", "--dropout", "0,0.1",
                                 "--hidden", "8,8", "--quick", "--n-jobs", "1",
                                 "--json", str(out), "--plot", str(plots)])
    _ok(r)
    assert "best_val_loss" in r.output
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 4 and {row["l2"] for row in data["rows"]} == {0.0, 0.01}
    names = {p.name for p in plots.iterdir()}
    assert {"sweep_heatmap.png", "loss_curves.png", "param_kde.png",
            "predictions.png"} <= names


def test_sweep_command_needs_a_grid(cli):
    r = CliRunner().invoke(cli, ["sweep", "curve", "--quick"])
    assert r.exit_code != 0 and "--l2" in r.output


def test_study_command(cli, tmp_path, monkeypatch):
    # a shorter grid keeps the smoke test fast; the real grids are module constants
    monkeypatch.setattr(cli_study, "STUDY_L2", (0.0, 1e-2, 1.0))
    monkeypatch.setattr(cli_study, "STUDY_DROPOUT", (0.0, 0.5, 0.9))
    r = CliRunner().invoke(cli, ["study", "--quick", "--n-jobs", "1", "--out",
                                 str(tmp_path), "--dpi", "40"])
    _ok(r)
    names = {p.name for p in tmp_path.iterdir()}
    for kind in ("loss_curves", "predictions", "param_kde"):
        assert f"l2_{kind}.png" in names and f"dropout_{kind}.png" in names
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [r["l2"] for r in summary["l2"]] == [0.0, 1e-2, 1.0]
    assert set(summary["checks"]) == {"l2_train_loss_grows", "l2_largest_collapses_to_mean",
                                      "l2_params_narrow", "dropout_params_stay_wide",
                                      "dropout_train_loss_grows"}
    md = (tmp_path / "summary.md").read_text()
    assert "## L2 sweep" in md and "## Dropout sweep" in md
