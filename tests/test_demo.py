"""``ch8fast demo`` end to end, the NumPy MLP it trains, and the command line."""
import contextlib
import csv
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ch8fast.apps.cli import main
from ch8fast.apps.demo import OPTIMIZERS, count_steps, load_dataset
from ch8fast.apps.mlp import MLP, softmax_cross_entropy
from ch8fast.schedules import batch_size_schedule, minibatches

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def parse_table(text):
    """The rows of the first printed Markdown table (the results'), as dicts of
    strings."""
    lines, started = [], False
    for ln in text.splitlines():
        if ln.startswith("|"):
            started = True
            if ln.startswith("| "):
                lines.append(ln)
        elif started:
            break
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[1:]]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    rc, stdout, stderr = run_main(["demo", "--epochs", "3", "--optimizers",
                                   "sgd,nesterov,adagrad,rmsprop_nesterov,adam",
                                   "--target-loss", "0.3", "--out", str(out)])
    return rc, stdout, stderr, out


# ---------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------

def test_mlp_gradients_match_finite_differences():
    model = MLP([5, 7, 6, 3], dtype=np.float64, rng=0)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 5))
    y = np.array([0, 2, 1, 2])
    model.loss_and_grad(x, y)
    analytic = [g.copy() for g in model.grads]
    h = 1e-6
    for p, g in zip(model.params, analytic):
        num = np.empty_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            lp = model.loss(x, y)
            p[i] = old - h
            lm = model.loss(x, y)
            p[i] = old
            num[i] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(g, num, atol=1e-7, rtol=1e-5)


def test_mlp_writes_gradients_into_preallocated_arrays():
    model = MLP([64, 16, 10], rng=0)
    assert all(p.dtype == np.float32 for p in model.params + model.grads)
    ids = [id(g) for g in model.grads]
    addrs = [g.ctypes.data for g in model.grads]
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    loss = model.loss_and_grad(x, np.arange(8) % 10)
    assert np.isfinite(loss) and loss > 0
    assert [id(g) for g in model.grads] == ids
    assert [g.ctypes.data for g in model.grads] == addrs
    assert any(np.abs(g).max() > 0 for g in model.grads)


def test_softmax_cross_entropy_value():
    logits = np.log(np.array([[0.5, 0.25, 0.25]]))
    d = np.empty_like(logits)
    loss = softmax_cross_entropy(logits.copy(), np.array([1]), dlogits=d)
    assert loss == pytest.approx(np.log(4.0))
    np.testing.assert_allclose(d, [[0.5, -0.75, 0.25]])


def test_count_steps_matches_the_sampler():
    sched = batch_size_schedule(7, factor=2, every=5, max_size=40)
    n_batches = sum(1 for _ in minibatches(100, sched, rng=0, epochs=4))
    assert count_steps(100, sched, 4) == n_batches
    assert count_steps(100, 32, 3) == 3 * 4


def test_embedded_digits():
    X, y, classes, desc = load_dataset(None)
    assert X.shape == (1797, 64) and X.dtype == np.float32
    assert y.shape == (1797,) and list(classes) == list(range(10))
    assert X.min() == 0 and X.max() == 16
    assert np.bincount(y).min() >= 170
    assert os.path.isfile(os.path.join(ROOT, "ch8fast", "apps", "data", "DIGITS_LICENSE.txt"))


# ---------------------------------------------------------------------------------------
# The demo end to end
# ---------------------------------------------------------------------------------------

def test_demo_table_csv_json_agree(demo_run):
    rc, stdout, stderr, out = demo_run
    assert rc == 0
    rows = parse_table(stdout)
    names = ["sgd", "nesterov", "adagrad", "rmsprop_nesterov", "adam"]
    assert [r["optimizer"] for r in rows] == names
    with open(out / "demo_results.csv") as fh:
        csv_rows = list(csv.DictReader(fh))
    with open(out / "demo_results.json") as fh:
        js = json.load(fh)
    assert [r["optimizer"] for r in csv_rows] == names
    assert [r["optimizer"] for r in js["results"]] == names
    for row, c, j in zip(rows, csv_rows, js["results"]):
        for key, col, fmt in [("final_train_loss", "train loss", "{:.4f}"),
                              ("final_val_loss", "val loss", "{:.4f}"),
                              ("final_train_acc", "train acc", "{:.3f}"),
                              ("final_val_acc", "val acc", "{:.3f}"),
                              ("train_seconds", "time s", "{:.2f}")]:
            assert float(c[key]) == pytest.approx(j[key], rel=1e-12)
            assert row[col] == fmt.format(j[key])
        assert row["step %"] == f"{100 * j['step_share']:.0f}%"
        assert 0 < j["step_share"] < 1
        assert j["step_seconds"] < j["train_seconds"]
        # the curve ends where the table says, and the run learned something
        assert j["curve"]["train_loss"][-1] == j["final_train_loss"]
        assert j["curve"]["epoch"] == [0, 1, 2, 3]
        assert j["final_train_loss"] < 0.5 * j["curve"]["train_loss"][0]
        assert j["final_val_acc"] > 0.8
        e = j["epochs_to_target"]
        losses = j["curve"]["train_loss"]
        if e is None:
            assert row["epochs to target"] == "-" and min(losses) > 0.3
        else:
            assert row["epochs to target"] == str(e)
            assert losses[e] <= 0.3 and all(v > 0.3 for v in losses[:e])
        assert j["iterations"] == 3 * 45                   # ceil(1438 / 32) per epoch
    assert js["n_train"] == 1438 and js["n_val"] == 359
    assert str(out) in stdout


def test_demo_same_initialization_for_every_optimizer(demo_run):
    _, _, _, out = demo_run
    with open(out / "demo_results.json") as fh:
        js = json.load(fh)
    first = {r["curve"]["train_loss"][0] for r in js["results"]}
    assert len(first) == 1                                 # same theta_0, same loss


def test_demo_writes_png_or_says_where(demo_run):
    _, stdout, _, out = demo_run
    png = out / "demo_curves.png"
    if HAVE_MPL:
        assert png.read_bytes()[:8] == PNG_MAGIC
    else:
        assert "matplotlib is not installed" in stdout and str(png) in stdout


def test_demo_progress_bar(demo_run):
    _, _, stderr, _ = demo_run
    for name in ("sgd", "adam"):
        assert name in stderr


def test_demo_without_matplotlib_and_tqdm(tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "tqdm", "tqdm.auto"):
        monkeypatch.setitem(sys.modules, mod, None)       # import raises ImportError
    rc, stdout, stderr, = run_main(["demo", "--no-why", "--epochs", "1", "--optimizers", "momentum",
                                    "--out", str(tmp_path)])
    assert rc == 0
    assert "matplotlib is not installed" in stdout
    assert str(tmp_path / "demo_curves.png") in stdout
    assert not (tmp_path / "demo_curves.png").exists()
    assert "momentum" in stderr and "[" in stderr and "1/1 epochs" in stderr


def test_demo_subprocess(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ch8fast", "demo", "--no-why", "--epochs", "1", "--optimizers",
         "sgd,rmsprop", "--hidden", "16", "--no-plot", "--quiet", "--out", "res"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert [r["optimizer"] for r in parse_table(proc.stdout)] == ["sgd", "rmsprop"]
    assert "MLP 64-16-10" in proc.stdout
    for name in ("demo_results.csv", "demo_results.json", "demo_curves.csv"):
        assert (tmp_path / "res" / name).is_file()
    assert not (tmp_path / "res" / "demo_curves.png").exists()


def test_demo_lr_auto_uses_the_chooser_and_prints_its_reasoning(tmp_path):
    rc, stdout, _ = run_main(["demo", "--no-why", "--epochs", "2", "--optimizers", "adam", "--lr", "auto",
                              "--quiet", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0
    with open(tmp_path / "demo_results.json") as fh:
        r = json.load(fh)["results"][0]
    auto = r["lr_finder"]
    assert auto["recommended"] > auto["best_short_trial"]
    tried = [e["lr"] for e in auto["selection"]]
    assert tried[0] == auto["recommended"]
    assert all(auto["recommended"] / 30 <= lr <= auto["recommended"] for lr in tried)
    best = min(auto["selection"], key=lambda e: e["selection_loss"])
    assert r["lr"] == auto["chosen"] == best["lr"]
    assert "--lr auto, adam: ch8fast.choose_lr says:" in stdout
    assert "Recommended initial learning rate" in stdout      # the chooser's reasoning
    assert f"adam uses lr={r['lr']:.3g}" in stdout


def test_demo_lr_auto_picks_rates_that_generalize(tmp_path):
    """Rates picked by --lr auto must not overfit: on the embedded digits, the short
    trials' recommendation alone gave Adam and AdaGrad validation losses of 0.47 and 0.56
    against 0.07 with their default rates."""
    vals = {}
    for lr in ("auto", None):
        argv = ["demo", "--no-why", "--optimizers", "adam,adagrad", "--quiet", "--no-plot",
                "--out", str(tmp_path / str(lr))] + (["--lr", lr] if lr else [])
        rc, _, _ = run_main(argv)
        assert rc == 0
        with open(tmp_path / str(lr) / "demo_results.json") as fh:
            vals[lr] = {r["optimizer"]: r["final_val_loss"] for r in json.load(fh)["results"]}
    for name in ("adam", "adagrad"):
        assert vals["auto"][name] < 1.5 * vals[None][name], (name, vals)


def test_demo_calibrated_init_and_batch_growth(tmp_path):
    rc, stdout, _ = run_main(["demo", "--no-why", "--epochs", "2", "--optimizers", "sgd",
                              "--init", "calibrated", "--batch-growth", "2:20:256",
                              "--hidden", "32,32", "--quiet", "--no-plot",
                              "--out", str(tmp_path)])
    assert rc == 0
    assert "calibrated on one minibatch" in stdout
    with open(tmp_path / "demo_results.json") as fh:
        js = json.load(fh)
    sched = batch_size_schedule(32, 2.0, 20, 256)
    assert js["results"][0]["iterations"] == count_steps(js["n_train"], sched, 2)
    assert js["results"][0]["iterations"] < 2 * 45
    assert js["layers"] == [64, 32, 32, 10]


def test_demo_user_csv_with_header(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 3))
    y = (X[:, 0] > 0).astype(int) + 5                      # labels 5 and 6
    path = tmp_path / "mine.csv"
    with open(path, "w") as fh:
        fh.write("a,b,c,label\n")
        for row, label in zip(X, y):
            fh.write(",".join(f"{v:.6f}" for v in row) + f",{label}\n")
    rc, stdout, _ = run_main(["demo", "--no-why", "--data", str(path), "--epochs", "2", "--optimizers",
                              "adam", "--quiet", "--no-plot", "--out", str(tmp_path / "o")])
    assert rc == 0
    assert "mine.csv: 60 samples, 3 features, 2 classes" in stdout


# ---------------------------------------------------------------------------------------
# Malformed --data files: exit status 2 and a message that says what is wrong
# ---------------------------------------------------------------------------------------

def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


BAD_FILES = {
    "missing_y": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3))), "missing array(s) 'y'"),
    "X_3d": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3, 2)), y=np.zeros(20)),
             "X must be 2-D"),
    "y_2d": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3)), y=np.zeros((20, 2))),
             "y must be 1-D"),
    "length_mismatch": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3)), y=np.zeros(19)),
                        "X has 20 samples but y has 19 labels"),
    "too_few": (lambda p: _npz(p / "a.npz", X=np.zeros((5, 3)), y=np.arange(5) % 2),
                "too few samples (5)"),
    "float_labels": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3)),
                                    y=np.linspace(0, 1, 20)), "labels must be integers"),
    "one_class": (lambda p: _npz(p / "a.npz", X=np.zeros((20, 3)), y=np.ones(20)),
                  "need at least 2 classes"),
    "string_arrays": (lambda p: _npz(p / "a.npz", X=np.array([["a"] * 3] * 20),
                                     y=np.zeros(20)), "must be real numeric arrays"),
    "nan_in_X": (lambda p: _npz(p / "a.npz", X=np.full((20, 3), np.nan), y=np.arange(20) % 2),
                 "NaN or infinite"),
    "not_npz": (lambda p: (p / "a.npz").write_text("hello") and p / "a.npz",
                "cannot be read as a .npz archive"),
    "csv_non_numeric": (lambda p: (p / "a.csv").write_text(
        "x,y,label\n" + "1,2,0\n" * 12 + "1,oops,1\n") and p / "a.csv",
        "line 14: non-numeric value 'oops'"),
    "csv_ragged": (lambda p: (p / "a.csv").write_text("1,2,0\n" * 12 + "1,1\n") and p / "a.csv",
                   "line 13: 2 columns, expected 3"),
    "csv_one_column": (lambda p: (p / "a.csv").write_text("1\n" * 12) and p / "a.csv",
                       "need at least 2 columns"),
    "csv_empty": (lambda p: (p / "a.csv").write_text("") or p / "a.csv", "the file is empty"),
    "no_such_file": (lambda p: p / "missing.npz", "no such file"),
    "unknown_extension": (lambda p: (p / "a.json").write_text("{}") and p / "a.json",
                          "unknown format '.json'"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_data_exits_2_with_message(case, tmp_path, capsys):
    make, message = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--no-why", "--data", str(path), "--epochs", "1", "--quiet", "--no-plot",
              "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "--data" in err
    assert not (tmp_path / "o").exists()


def test_malformed_data_subprocess(tmp_path):
    bad = _npz(tmp_path / "bad.npz", X=np.zeros((20, 3)))
    proc = subprocess.run([sys.executable, "-m", "ch8fast", "demo", "--data", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "missing array(s) 'y'" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--optimizers", "sgd,lbfgs"], "unknown optimizer(s) lbfgs"),
    (["--lr", "fast"], "expected a number or 'auto'"),
    (["--lr", "-1"], "must be > 0"),
    (["--init", "zeros"], "unknown initializer 'zeros'"),
    (["--hidden", "64,x"], "comma-separated layer widths"),
    (["--batch-growth", "0.5"], "FACTOR >= 1"),
    (["--epochs", "0"], "positive integer"),
])
def test_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------

def test_help_lists_the_three_commands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("demo", "tour", "bench"):
        assert cmd in text


def test_help_subprocess():
    proc = subprocess.run([sys.executable, "-m", "ch8fast", "--help"], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0
    assert all(cmd in proc.stdout for cmd in ("demo", "tour", "bench"))


def test_demo_help_lists_the_options(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = capsys.readouterr().out
    for opt in ("--optimizers", "--epochs", "--batch-size", "--batch-growth", "--lr",
                "--init", "--hidden", "--seed", "--threads", "--out", "--no-plot", "--data"):
        assert opt in text


def test_every_demo_optimizer_is_a_ch8fast_class():
    import ch8fast
    assert list(OPTIMIZERS) == ["sgd", "momentum", "nesterov", "adagrad", "rmsprop",
                                "rmsprop_nesterov", "adam", "adamw", "adadelta", "lion",
                                "adopt", "ademamix", "schedule_free_sgd",
                                "schedule_free_adamw", "lamb", "lars"]
    for c in OPTIMIZERS.values():
        assert issubclass(getattr(ch8fast, c.cls_name), ch8fast.Optimizer)
    # one colour each (matplotlib's "C10" is "C0" again)
    if not HAVE_MPL:
        return
    from matplotlib.colors import to_rgb
    from ch8fast.apps import demo
    colors = [to_rgb(c) for c in demo.COLORS.values()]
    assert len(set(colors)) == len(colors)
    # every class of the library is in the demo (AdamW and AdaDelta were once refused)
    assert {c.cls_name for c in OPTIMIZERS.values()} == {
        name for name in ch8fast.__all__
        if isinstance(getattr(ch8fast, name), type)
        and issubclass(getattr(ch8fast, name), ch8fast.Optimizer)
        and getattr(ch8fast, name) is not ch8fast.Optimizer}


def test_demo_trains_adamw_and_adadelta(tmp_path):
    rc, stdout, err = run_main(["demo", "--no-why", "--epochs", "3", "--optimizers", "adamw,adadelta",
                                "--quiet", "--no-plot", "--out", str(tmp_path)])
    assert rc == 0, err
    rows = {r["optimizer"]: r for r in parse_table(stdout)}
    assert set(rows) == {"adamw", "adadelta"}
    assert all(float(r["train loss"]) < 0.5 for r in rows.values())


def test_demo_figure_colours_follow_the_optimizer_and_legend_names_the_rate(tmp_path,
                                                                            monkeypatch):
    pytest.importorskip("matplotlib")
    from ch8fast.apps import demo
    drawn = []
    from matplotlib.axes import Axes
    original = Axes.plot

    def spy(self, *args, **kwargs):
        if "label" in kwargs:
            drawn.append((kwargs["label"], kwargs.get("color")))
        return original(self, *args, **kwargs)
    monkeypatch.setattr(Axes, "plot", spy)
    for subset in ("sgd,adam", "adam"):
        drawn.clear()
        rc, _, _ = run_main(["demo", "--no-why", "--epochs", "1", "--optimizers", subset, "--quiet",
                             "--out", str(tmp_path / subset)])
        assert rc == 0
        adam = [c for label, c in drawn if label.startswith("Adam,")]
        assert adam == [demo.COLORS["adam"]]               # the same in both runs
        assert any(label == "Adam, lr 0.001" for label, _ in drawn)
        if subset == "sgd,adam":
            assert ("SGD + linear decay, lr 0.1 \u2192 0.001", demo.COLORS["sgd"]) in drawn


def test_distributed_without_mpi4py_is_a_one_line_error(tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "from ch8fast.apps.cli import main\n"
            f"sys.exit(main(['demo', '--distributed', '--quiet', '--out', {str(tmp_path)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ch8fast demo: error: --distributed:")
    assert "mpi4py" in lines[0] and "Traceback" not in proc.stderr


def test_the_demo_says_why(demo_run):
    """After its table the demo times one Adam update of its model with ch8fast, in-place
    NumPy and torch.optim, measures the state of each storage, and trains an
    update-dominated network with each: the same losses, step for step."""
    rc, stdout, _, out = demo_run
    assert rc == 0
    assert "Why ch8fast: one Adam update of this model" in stdout
    assert "Where the update dominates" in stdout
    with open(out / "demo_results.json") as fh:
        why = json.load(fh)["why"]
    names = [r["contender"] for r in why["update_cost"]]
    assert names[:2] == ["ch8fast", "numpy"]
    assert ("torch fused" in names) == (importlib.util.find_spec("torch") is not None)
    for r in why["update_cost"]:
        assert r["seconds"] > 0 and 0 < r["share_of_iteration"] < 1
    shapes = [(64, 64), (64,), (64, 64), (64,), (64, 10), (10,)]
    n = sum(int(np.prod(s)) for s in shapes)
    q8 = sum(2 * (int(np.prod(s)) + 4 * -(-int(np.prod(s)) // 256)) for s in shapes) / n
    assert why["state_bytes_per_parameter"] == {"float32": 8.0, "bfloat16": 4.0, "q8": q8}
    res = why["update_dominated"]["results"]
    # ch8fast and in-place NumPy run the same operations in the same order: the same losses
    assert res["ch8fast"]["curve"] and [c[2] for c in res["ch8fast"]["curve"]] == [
        c[2] for c in res["numpy"]["curve"]]
    assert res["ch8fast"]["steps_to_target"] == res["numpy"]["steps_to_target"]
    for r in res.values():
        np.testing.assert_allclose([c[2] for c in r["curve"]],
                                   [c[2] for c in res["ch8fast"]["curve"]], rtol=1e-3)
    if HAVE_MPL:
        assert (out / "why.png").is_file()
