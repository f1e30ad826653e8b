"""``ch8fast tour``: the chapter's claims, and those of the papers of Lion, ADOPT and
AdEMAMix, measured, within stated tolerances."""
import contextlib
import importlib.util
import io
import json

import numpy as np
import pytest

from ch8fast.apps.cli import main
from ch8fast.apps.tour import (adopt_counterexample, canyon, drag, fit_slope, init_scales,
                                terminal_speed)

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FIGURES = ["canyon", "rates", "momentum", "adagrad", "init", "lr", "lion", "adopt",
           "ademamix", "schedule_free", "trust_ratio"]


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


def test_lion_moves_every_coordinate_by_its_rate_and_needs_a_smaller_one(tour):
    _, stdout, numbers, md, _ = tour
    li = numbers["lion"]
    # the sign update: every coordinate moves by exactly lr (to rounding), at every step
    assert li["max_rel_deviation"] < 1e-9
    assert li["min_share_moved"] == 1.0
    for r in li["runs"].values():
        if r["factor"] is not None:
            assert r["rms_update_over_lr"] == pytest.approx(1.0 / r["factor"], rel=1e-9)
    # Adam moves a coordinate by less: Lion takes Adam's steps at a rate 3-10x smaller,
    # and the Lion run nearest Adam's loss curve is one of those, not the one at Adam's lr
    adam, lion1 = li["runs"]["Adam"], li["runs"]["Lion, lr/1"]
    assert adam["rms_update_over_lr"] < 1.0 / 3
    assert 3 <= li["rms_matching_factor"] <= 10
    assert li["nearest_factor"] in (3, 10)
    assert lion1["final_excess"] > 2 * adam["final_excess"]
    assert f"nearest Adam's is at lr/{li['nearest_factor']:g}" in md
    assert f"Lion at lr/{li['nearest_factor']:g}" in stdout


def test_adam_with_a_small_beta2_ends_at_the_wrong_end_adopt_at_the_optimum(tour):
    _, stdout, numbers, md, _ = tour
    runs = numbers["adopt"]["runs"]
    assert set(runs) == {"0", "0.9"} and set(runs["0"]) == {"0.1", "0.5", "0.9", "0.999"}
    for row in runs.values():
        for cell in row.values():
            assert cell["ADOPT"]["final"] < -0.9            # any beta2
    for b2 in ("0.1", "0.5", "0.9"):
        assert runs["0"][b2]["Adam"]["final"] > 0.9         # Reddi et al.'s case, beta1 = 0
    assert runs["0.9"]["0.5"]["Adam"]["final"] > 0.9
    assert runs["0.9"]["0.1"]["Adam"]["final"] > 0.0
    for row in runs.values():
        assert row["0.999"]["Adam"]["final"] < -0.9         # a large beta2 suits Adam here
    # the default clipping holds ADOPT back while (t - 1)^(1/4) < C
    small = runs["0"]["0.1"]
    clipped = small["ADOPT, clipped"]["steps_to_minus_0.9"]
    assert clipped is None or clipped > 5 * small["ADOPT"]["steps_to_minus_0.9"]
    assert small["ADOPT, clipped"]["final"] > small["ADOPT"]["final"] + 0.1
    assert f"| 0 | 0.1 | {small['Adam']['final']:+.3f} (—) |" in md
    assert f"β2=0.1 {small['Adam']['final']:+.2f}/{small['ADOPT']['final']:+.2f}" in stdout


def test_ademamix_remembers_a_batch_longer_then_overshoots(tour):
    """Measured on seeds 0-3: AdEMAMix's memory of one batch is higher and takes 1.3-1.4x
    as long to halve as Adam's, then turns negative; at the same rate its final loss is
    higher than Adam's."""
    _, stdout, numbers, md, _ = tour
    am = numbers["ademamix"]
    a, m = am["runs"]["Adam"], am["runs"]["AdEMAMix"]
    assert m["peak"] > a["peak"] > 0
    assert m["half_at"] > 1.15 * a["half_at"]
    assert am["half_ratio"] == pytest.approx(m["half_at"] / a["half_at"])
    assert m["lowest"] < -0.05 and m["at_500"] < 0 and m["below_zero_at"] is not None
    assert a["lowest"] > -0.01 and a["at_500"] > 0
    assert m["final_excess"] > 1.3 * a["final_excess"]
    assert f"| AdEMAMix | {m['peak']:.3g} | {m['peak_at']} | {m['half_at']} |" in md
    assert "does not reach a lower loss" in md
    assert f"Adam {a['half_at']}, AdEMAMix {m['half_at']}" in stdout


def test_schedule_free_beats_the_tuned_decay_with_the_right_beta(tour):
    """Measured on seeds 0-3 (--quick) and 0-1 (full): at the longest run, schedule-free
    SGD with beta 0.5, its rate tuned as the decay's is, ends below the linear decay tuned
    for that length (0.44-0.73x), and with the paper's default beta 0.9 above it
    (1.4-2.8x)."""
    _, stdout, numbers, md, _ = tour
    sf = numbers["schedule_free"]
    T = str(sf["horizons"][-1])
    tuned = sf["ratio_tuned"]
    assert tuned["0.5"][T] < 0.9 and tuned["0.9"][T] > 1.1
    for beta, d in sf["schedule_free"].items():
        for t in sf["horizons"]:
            # the one rate read at every length is never better than the best per length
            assert d["tuned"][str(t)]["loss"] <= d["loss"][str(t)]
        assert d["tuned"][T]["lr"] == d["lr"]
    assert "## 10. Schedule-free SGD against a tuned linear decay" in md
    assert "schedule-free SGD (one run) / linear decay" in stdout


def test_lars_and_lamb_train_the_full_batch_further(tour):
    """Measured on seeds 0-3: the weight matrices' norm(W) / norm(grad W) differ by 2.5x or
    more over the layers, and at their best rates LARS ends below momentum SGD's loss
    (0.00003-0.002x) and LAMB below Adam's (0.00004-0.0001x) after 150 full-batch
    steps."""
    _, stdout, numbers, md, _ = tour
    tr = numbers["trust_ratio"]
    assert max(tr["ratios"]) > 2 * min(tr["ratios"])
    assert tr["lars_over_momentum"] < 0.1 and tr["lamb_over_adam"] < 0.1
    r = tr["runs"]
    assert tr["lars_over_momentum"] == pytest.approx(r["LARS"]["loss"]
                                                     / r["momentum SGD"]["loss"])
    for name in ("momentum SGD", "LARS", "Adam", "LAMB"):
        # its best rate is inside the grid, not at an end of it
        rates = sorted(float(k) for k in r[name]["by_lr"])
        assert rates[0] < r[name]["lr"] < rates[-1], name
    assert "## 11. LARS and LAMB" in md and "(both lower" in md
    assert 1 < r["LARS"]["ahead_from"] <= tr["steps"]
    assert "LARS/momentum SGD" in stdout


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
    a = adopt_counterexample(quick=True, k=3, C=3.0, beta1s=(0.0,), beta2s=(0.1,))
    cell = a["runs"]["0"]["0.1"]          # Reddi et al.'s own: k = 3, C = 3, beta2 = 1/(1 + C²)
    assert cell["Adam"]["final"] > 0.9 and cell["ADOPT"]["final"] < -0.9


def test_tour_no_plot(tmp_path):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["tour", "--quick", "--no-plot", "--out", str(tmp_path)]) == 0
    assert "figures skipped (--no-plot)" in buf.getvalue()
    assert not list(tmp_path.glob("*.png"))
    md = (tmp_path / "tour.md").read_text(encoding="utf-8")
    assert "![" not in md and "O(1/k²)" in md
