"""``ch8fast tour``: the chapter's claims, measured, within stated tolerances."""
import contextlib
import importlib.util
import io
import json

import numpy as np
import pytest

from ch8fast.apps.cli import main
from ch8fast.apps.tour import canyon, drag, fit_slope, init_scales, terminal_speed

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["canyon", "rates", "momentum", "adagrad", "init", "lr"]


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    out = tmp_path_factory.mktemp("tour")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["tour", "--quick", "--seed", "1", "--out", str(out)])
    with open(out / "tour.json") as fh:
        numbers = json.load(fh)
    md = (out / "tour.md").read_text(encoding="utf-8")
    return rc, buf.getvalue(), numbers, md, out


def test_tour_runs_and_writes_files(tour):
    rc, stdout, numbers, md, out = tour
    assert rc == 0
    assert numbers["seed"] == 1 and numbers["quick"] is True
    assert str(out) in stdout
    for key in FIGURES:
        png = out / f"tour_{key}.png"
        if HAVE_MPL:
            assert png.read_bytes()[:8] == PNG_MAGIC
            assert f"](tour_{key}.png)" in md
        else:
            assert not png.exists()
    if not HAVE_MPL:
        assert "matplotlib is not installed" in stdout


# Tolerances on the fitted log-log slopes: the book states asymptotic rates; over the
# quick run's finite horizon the measured slopes lie within these bands of them.
SLOPE_TOLERANCE = {"sgd_convex": 0.08, "sgd_strongly_convex": 0.08,
                   "gd_smooth_convex": 0.05, "nesterov_smooth_convex": 0.2}


@pytest.mark.parametrize("case, book", [("sgd_convex", -0.5), ("sgd_strongly_convex", -1.0),
                                        ("gd_smooth_convex", -1.0),
                                        ("nesterov_smooth_convex", -2.0)])
def test_fitted_slopes_near_the_books_rates(tour, case, book):
    _, stdout, numbers, md, _ = tour
    slope = numbers["rates"][case]["slope"]
    assert numbers["rates"][case]["book"] == book
    assert abs(slope - book) <= SLOPE_TOLERANCE[case], slope
    assert f"**{slope:.3f}**" in md                       # the report shows the number
    assert f"{slope:6.3f}" in stdout


def test_nesterov_beats_gradient_descent_rate(tour):
    r = tour[2]["rates"]
    assert r["nesterov_smooth_convex"]["slope"] < r["gd_smooth_convex"]["slope"] - 0.7


def test_canyon_momentum_fewer_steps_and_gd_zigzags(tour):
    c = tour[2]["canyon"]
    gd, mom = c["gradient descent"], c["momentum"]
    assert mom["steps_to_tol"] * 2 < gd["steps_to_tol"]
    assert gd["sign_changes_50"] >= 45                    # crosses the canyon every step
    assert c["Nesterov"]["steps_to_tol"] <= mom["steps_to_tol"]
    assert f"| gradient descent | {gd['lr']:.3g} | 0 | {gd['steps_to_tol']} |" in tour[3]


def test_terminal_speed_ratio(tour):
    ts = tour[2]["terminal_speed"]
    assert set(ts) == {"0.5", "0.9", "0.99"}
    for d in ts.values():
        assert d["predicted"] == pytest.approx(0.01 / (1 - d["alpha"]))
        assert d["ratio"] == pytest.approx(1.0, abs=1e-6)
    assert ts["0.9"]["measured"] == pytest.approx(0.1, rel=1e-6)     # 10x the plain step
    assert f"{ts['0.9']['ratio']:.4f}" in tour[3]


def test_drag_viscous_stops_at_minimum_dry_friction_short_of_it(tour):
    d = tour[2]["drag"]
    assert abs(d["viscous"]["final_x"]) < 1e-4 and abs(d["viscous"]["final_v"]) < 1e-4
    assert abs(d["dry"]["final_x"]) > 0.05 and d["dry"]["final_v"] == 0.0
    assert d["turbulent"]["amplitude_last"] > 0.02        # still oscillating
    assert d["viscous_max_diff_vs_sgd"] < 1e-10           # momentum SGD is that particle


def test_adagrad_decays_too_early(tour):
    a = tour[2]["adagrad_vs_rmsprop"]
    assert a["AdaGrad"]["final_loss"] > 10 * a["RMSProp"]["final_loss"]
    assert a["AdaGrad"]["eff_lr_final"] < a["RMSProp"]["eff_lr_final"]
    assert a["AdaGrad"]["eff_lr_final"] <= a["AdaGrad"]["eff_lr_at_100"]


def test_calibration_hits_target_std(tour):
    ini = tour[2]["init"]
    assert ini["calibration_converged"]
    np.testing.assert_allclose(ini["stds"]["calibrated"], 1.0, atol=0.02)   # calibrate's tol
    np.testing.assert_allclose(ini["calibrated_fresh"], 1.0, atol=0.2)      # another batch
    assert ini["stds"]["fan_in_uniform"][-1] < 1e-2       # vanishes with depth
    assert ini["stds"]["sparse (k=15)"][-1] > 1e2         # explodes
    assert 0.3 < ini["stds"]["he_normal"][-1] < 3


def test_lr_chooser_picks_at_or_above_the_best_short_trial(tour):
    lr, md = tour[2]["lr"], tour[3]
    assert lr["recommended"] >= lr["best_short_trial"]
    if lr["recommended"] == lr["best_short_trial"]:       # only when nothing higher was safe
        assert "diverged, so no higher rate" in md or "largest candidate" in md
    else:
        assert "Recommended: the next candidate above it" in md
    assert f"recommended **{lr['recommended']:.3g}**" in md
    assert set(lr["longer"]) == {"recommended", "best short trial"}


def test_fit_slope_exact_power_law():
    k = np.arange(1, 1001)
    assert fit_slope(k, 3.0 * k ** -1.5, 10, 1000) == pytest.approx(-1.5)
    with pytest.raises(ValueError):
        fit_slope(k, k ** -1.0, 2000, 3000)


def test_experiments_directly():
    c = canyon(kappa=50.0)
    assert c["runs"]["momentum"]["steps_to_tol"] < c["runs"]["gradient descent"]["steps_to_tol"]
    ts = terminal_speed(alphas=(0.8,), lr=0.1, steps=200)
    assert ts["0.8"]["measured"] == pytest.approx(0.5, rel=1e-6)
    d = drag(dry=0.05)
    assert abs(d["dry"]["final_x"]) <= 0.05 and d["dry"]["final_v"] == 0.0
    s = init_scales(depth=4, width=32, batch=64)
    assert s["calibration"].converged and len(s["stds"]["he_normal"]) == 4


def test_tour_no_plot(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["tour", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    assert "figures skipped (--no-plot)" in buf.getvalue()
    assert not list(tmp_path.glob("*.png"))
    md = (tmp_path / "tour.md").read_text(encoding="utf-8")
    assert "![" not in md and "O(1/k²)" in md
