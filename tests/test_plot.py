"""`loopgolf plot` from run directories written by hand: the PNG's size and content, and the CSV beside it."""

import csv

import numpy as np
import pytest

from tests.helpers import C0, C1, colour_share, pixels, png_size, write_run
from tools.cli import main
from tools.plot import DPI, HEIGHT_IN, WIDTH_IN

@pytest.mark.slow  # matplotlib's import and one figure: about 3 s on 2 cores
def test_png_and_csv_from_runs_with_and_without_validation_records(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        write_run(runs, f"base-s{seed}", seed, final=3.9 + seed / 100, val=((0, 6.9), (1, 6.0), (2, 5.0)))
    # The other variant: a run that logged train records only (val_every = 0, killed before its end)
    # and one that logged validation only (log_every = 0).
    write_run(runs, "wide-s1", 1, val=(), train=((1, 6.7), (2, 6.1), (3, 5.2)), config={"model": {"layer_plan": "2x4"}})
    write_run(runs, "wide-s2", 2, train=(), val=((0, 6.9), (2, 5.5)), final=3.95,
              config={"model": {"layer_plan": "2x4"}})
    out = tmp_path / "fig" / "curves.png"
    assert main(["plot", str(runs), "--out", str(out)]) == 0
    assert "4 run(s) in 2 variant(s)" in capsys.readouterr().out
    assert png_size(out) == (int(WIDTH_IN * DPI), int(HEIGHT_IN * DPI)) == (1500, 450)
    img = pixels(out)
    assert img.shape == (450, 1500, 3)
    white = (img > 245).all(axis=2).mean()
    assert 0.5 < white < 0.97  # mostly background, but axes, text and lines drawn on it
    # Each variant's colour is on the canvas in each of the three panels (curves and the bytes scatter).
    for third in np.array_split(img, 3, axis=1):
        assert colour_share(third, C0) > 1e-4 and colour_share(third, C1) > 1e-4

    rows = list(csv.DictReader((tmp_path / "fig" / "curves.csv").open()))
    assert [r["event"] for r in rows if r["run"] == "wide-s1"] == ["train"] * 3
    assert [r["event"] for r in rows if r["run"] == "wide-s2"] == ["val", "val", "final"]
    final = next(r for r in rows if r["run"] == "base-s1" and r["event"] == "final")
    assert float(final["loss"]) == pytest.approx(3.91) and final["total_bytes"] == "9001"
    assert float(final["bpb"]) == pytest.approx(3.91 / np.log(2) / 3)
    assert len(rows) == 2 * (2 + 3 + 1) + 3 + 3


def test_plot_errors_are_one_line(tmp_path, capsys):
    write_run(tmp_path / "runs", "a-s1", 1, train=(), val=())
    for argv, message in (
        (["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "x.svg")], "expected a .png file name"),
        (["plot", str(tmp_path / "runs"), "--out", str(tmp_path / "x.png")], "nothing to plot"),
        (["plot", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")], "not a directory"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    assert not (tmp_path / "x.png").exists()
