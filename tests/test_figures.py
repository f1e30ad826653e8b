"""The figures say what they show: axis labels, diverged trials visible, no labels drawn
over each other."""
import pytest

pytest.importorskip("matplotlib")
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

import ch8fast  # noqa: E402
from ch8fast.apps import bench, tour  # noqa: E402
from conftest import scripted_lr_trials  # noqa: E402


@pytest.fixture
def saved_figures(monkeypatch):
    """The Figure objects saved, instead of PNG files."""
    figs = []
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: figs.append(self))
    return figs


def test_the_canyon_figure_has_axis_labels(saved_figures, tmp_path):
    assert tour._plot_canyon(tour.canyon(), tmp_path / "c.png")
    (ax,) = saved_figures[0].axes
    assert ax.get_xlabel() == "θ₁" and ax.get_ylabel() == "θ₂"


def test_the_lr_figure_shows_every_diverged_trial_red(saved_figures, tmp_path):
    res = scripted_lr_trials()
    res.plot(tmp_path / "lr.png")
    left, right = saved_figures[0].axes
    red = {line.get_label() for line in left.get_lines() if line.get_color() == "red"}
    assert red == {"1 (diverged)", "3 (diverged)"}
    crosses = [line for line in right.get_lines() if line.get_marker() == "x"]
    assert len(crosses) == 1 and len(crosses[0].get_xdata()) == 2
    assert crosses[0].get_color() == "red" and crosses[0].get_markersize() >= 8


def test_the_benchmark_figure_names_layouts_in_the_legend(saved_figures, monkeypatch,
                                                           tmp_path):
    """Layout labels written beside the points overlapped; they are in the legend now."""
    import matplotlib.pyplot as plt
    monkeypatch.setattr(plt.Figure, "savefig", lambda self, *a, **k: saved_figures.append(self))
    annotations = []
    monkeypatch.setattr(Axes, "annotate", lambda self, *a, **k: annotations.append(a))
    try:                                  # run_case sets the thread count: restore it
        rows = [bench.run_case("sgd", "float32", t, n, 1, ("ch8fast", "roofline", "numpy"),
                               repeats=1, min_time=1e-5, max_seconds=0.1)
                for t, n in ((1, 100), (1, 1000), (4, 250), (2, 500))]
    finally:
        ch8fast.set_num_threads(0)
    info = bench.machine_info([1])
    assert bench.plot(rows, tmp_path / "b.png", info)
    assert annotations == []
    fig = saved_figures[-1]
    (legend,) = fig.legends
    labels = [t.get_text() for t in legend.get_texts()]
    assert "ch8fast, 4 arrays of 250" in labels and "ch8fast, 2 arrays of 500" in labels
    assert len(labels) == len(set(labels))
