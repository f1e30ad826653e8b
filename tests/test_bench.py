"""The benchmark: its outputs are complete and well-formed, and its NumPy peers compute
the same update as ch8fast (so that the comparison is fair)."""

import importlib.util
import json

import numpy as np
import pytest

import ch8fast
from ch8fast.apps import bench

RULES = list(bench.RULES)
HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


# ---- the NumPy peers compute ch8fast's update -----------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("peer", ["inplace", "reference"])
@pytest.mark.parametrize("rule", RULES)
def test_numpy_peers_match_ch8fast(rule, peer, dtype):
    rng = np.random.default_rng(1)
    shapes = [(7,), (3, 5), (1,)]
    p0 = [(0.1 * rng.standard_normal(s)).astype(dtype) for s in shapes]
    ours = bench.peers._ch8fast(rule, [p.copy() for p in p0])
    make = bench.NumpyOptimizer if peer == "inplace" else bench.reference_optimizer
    other = make(rule, [p.copy() for p in p0])
    for _ in range(5):
        grads = [rng.standard_normal(s).astype(dtype) for s in shapes]
        ours.step(grads)
        other.step(grads)
    rtol = 1e-3 if dtype == np.float32 else 1e-9
    for a, b, p in zip(other.params, ours.params, p0):
        assert a.dtype == b.dtype == dtype
        moved = b.astype(np.float64) - p
        assert np.all(np.abs(moved) > 0)
        np.testing.assert_allclose(a.astype(np.float64) - p, moved, rtol=rtol,
                                   atol=1e-7 if dtype == np.float32 else 1e-15)
        if peer == "inplace":
            # the same IEEE operations in the same order as the kernel: the same bits
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("rule", RULES)
def test_cases_read_the_rule_specifications(rule):
    cls, given = bench.CASES[rule]
    h = bench.hyperparameters(rule)
    assert h == dict(cls.rule.defaults(), **given)
    opt = bench.peers._ch8fast(rule, [np.zeros(3)])
    assert all(opt.param_groups[0][k] == v for k, v in h.items() if k in opt.param_groups[0])
    assert tuple(opt.state[0]) == bench.state_names(rule)
    peer = bench.NumpyOptimizer(rule, [np.zeros(3)])
    assert tuple(peer.state[0]) == bench.state_names(rule)


def test_inplace_numpy_allocates_nothing_per_step():
    params = [np.zeros(1000, np.float32), np.zeros((10, 10), np.float32)]
    grads = [np.ones_like(p) for p in params]
    peer = bench.NumpyOptimizer("adam", params)
    state_ids = [[id(a) for a in st.values()] for st in peer.state]
    peer.step(grads)
    assert [[id(a) for a in st.values()] for st in peer.state] == state_ids
    assert peer.params[0] is params[0] and peer.params[1] is params[1]


# ---- the command line -----------------------------------------------------------------

def _run_main(tmp_path, *extra):
    js, md, png = tmp_path / "b.json", tmp_path / "b.md", tmp_path / "b.png"
    argv = ["--rules", "sgd,adam,rmsprop_nesterov", "--sizes", "1e2,2e3",
            "--layouts", "3x1e2", "--dtype", "float32,float64", "--threads", "1",
            "--repeats", "2", "--min-time", "2e-4", "--max-case-time", "0.3", "--json", str(js),
            "--markdown", str(md), "--plot", str(png), *extra]
    threads = ch8fast.get_num_threads()
    assert bench.main(argv) == 0
    assert ch8fast.get_num_threads() == threads          # restored
    return json.loads(js.read_text()), md.read_text(), png


def test_main_writes_every_case_and_contender(tmp_path, capsys):
    data, md, png = _run_main(tmp_path)
    out = capsys.readouterr().out
    assert "kernels " + ch8fast.isa() in out and "NumPy" in out
    assert data["machine"]["isa"] == ch8fast.isa()
    rows = data["results"]
    cases = {(r["rule"], r["dtype"], r["layout"], r["threads"]) for r in rows}
    assert cases == {(rule, dt, lay, 1) for rule in ("sgd", "adam", "rmsprop_nesterov")
                     for dt in ("float32", "float64")
                     for lay in ("1x100", "1x2000", "3x100")}
    assert len(rows) == len(cases)
    for r in rows:
        names = set(r["time"])
        expect = {"ch8fast", "roofline", "numpy", "reference"}
        if r["tensors"] > 1:
            expect.add("flat")
            assert r["vs_flat"] > 0
        else:
            assert r["vs_flat"] is None
        if HAS_TORCH and r["rule"] != "rmsprop_nesterov":
            expect |= {"torch_fused", "torch_foreach"}
        assert names == expect
        assert all(t > 0 and np.isfinite(t) for t in r["time"].values())
        assert set(r["speedup"]) == expect & set(bench.PEERS)
        assert 0 < r["roofline_fraction"] < 100
        assert 2 <= r["rounds"] <= 15          # rounds are added while noisy
        ncols = {"sgd": 2, "adam": 4, "rmsprop_nesterov": 4}[r["rule"]]
        itemsize = 4 if r["dtype"] == "float32" else 8
        assert r["ncols"] == ncols
        assert r["bytes_per_step"] == itemsize * (2 * ncols - 1) * r["elements"]
        assert r["gbps"]["ch8fast"] == pytest.approx(
            r["bytes_per_step"] / r["time"]["ch8fast"] / 1e9)

    lines = md.strip().splitlines()
    table = [ln for ln in lines if ln.startswith("|")]
    assert lines[0].startswith("Machine: ")
    assert len(table) == 2 + len(rows)
    assert all(ln.count("|") == len(bench.COLUMNS) + 1 for ln in table)
    for rule in ("sgd", "adam", "rmsprop_nesterov"):
        assert sum(f"| {rule} |" in ln for ln in table) == 6
    assert png.exists() == HAS_MPL
    if HAS_MPL:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_peers_keeps_ch8fast_roofline_and_flat(tmp_path):
    js = tmp_path / "b.json"
    assert bench.main(["--rules", "momentum", "--sizes", "100", "--layouts", "2x50",
                       "--repeats", "1", "--min-time", "1e-4", "--no-peers",
                       "--json", str(js)]) == 0
    rows = json.loads(js.read_text())["results"]
    assert [set(r["time"]) for r in rows] == [{"ch8fast", "roofline"},
                                              {"ch8fast", "roofline", "flat"}]


def test_command_line_dispatch(capsys):
    from ch8fast.apps.cli import main
    assert main(["bench", "--rules", "sgd", "--sizes", "100", "--layouts", "none",
                 "--repeats", "1", "--min-time", "1e-4", "--no-peers"]) == 0
    assert "sgd" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--sizes", "1e3,abc"], ["--rules", "adam,lionheart"],
                                  ["--layouts", "100by10"], ["--dtype", "float16"],
                                  ["--threads", "0"], ["--sizes", "1.5"]])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(argv)
    assert exc.value.code == 2
    assert "ch8fast bench" in capsys.readouterr().err


def test_size_and_layout_parsing():
    assert bench.command._parse_list("1e2,16e6, 3.2e7", bench.command._count, "size") == [
        100, 16_000_000, 32_000_000]
    assert bench.command._parse_list("100x1e4,1000X1e3", bench.command._layout, "layout") == [
        (100, 10_000), (1000, 1000)]
    assert bench.command._parse_list("none", bench.command._count, "size") == []


@pytest.mark.parametrize("rule", RULES)
def test_no_contender_writes_the_shared_gradient(rule):
    fns, ncols = bench.make_contenders(rule, np.float32, 3, 50, bench.CONTENDERS)
    grads = fns["ch8fast"].args[0]
    before = [g.copy() for g in grads]
    for _ in range(20):
        for f in fns.values():
            f()
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b)
    assert ncols == 2 + len(bench.state_names(rule))


# ---- untrustworthy ratios are measured longer, then withheld --------------------------

def test_ratio_trusts_agreeing_estimates_only():
    quiet = bench.ratio([2.0, 2.1, 1.9, 2.0], [1.0, 1.05, 0.95, 1.0])
    assert quiet == (pytest.approx(2.0), True)
    # one round disturbed on the ch8fast side: the median still agrees with the fastest
    assert bench.ratio([2.0, 2.0, 2.0, 2.0, 2.0], [1.0, 1.0, 50.0, 1.0, 1.0])[1]
    # disturbed in most rounds (the x numpy 0.0 and 8,000 % spread of a loaded machine)
    value, trusted = bench.ratio([2.0, 2.0, 2.0], [1.0, 90.0, 80.0])
    assert value < 0.05 and not trusted
    assert not bench.ratio([2.0, 2.0], [1.0, 1.0])[1]          # fewer than 3 rounds


def test_noisy_cases_get_more_rounds_then_a_question_mark(monkeypatch):
    """A loaded machine: two ch8fast samples in three are 90x slower. The benchmark adds
    rounds (up to 15), then withholds the ratio: printed as "?", kept in the JSON."""
    def ch8(): pass
    def peer(): pass
    seen = {"ch8fast": 0}

    def fake_time(fn, k):
        if fn is peer:
            return 2e-6 * k
        seen["ch8fast"] += 1
        return (90e-6 if seen["ch8fast"] % 3 else 1e-6) * k
    monkeypatch.setattr(bench.timing, "_time", fake_time)
    samples, _ = bench.measure({"ch8fast": ch8, "numpy": peer}, repeats=3, min_time=1e-9)
    assert len(samples["ch8fast"]) == 15                  # measured longer, to the limit
    value, trusted = bench.ratio(samples["numpy"], samples["ch8fast"])
    assert not trusted

    row = {"rule": "sgd", "dtype": "float32", "tensors": 1, "size": 100, "threads": 1,
           "time": {"ch8fast": 1e-6}, "spread": 44.0, "gbps": {"ch8fast": 1.0},
           "roofline_fraction": 0.5, "speedup": {"numpy": value}, "vs_flat": None,
           "withheld": ["numpy"]}
    cells = dict(zip(bench.COLUMNS, bench.report.cells(row)))
    assert cells["x numpy"] == "?" and cells["roofline"] == "0.50"
    md = bench.markdown({"ch8fast": "0", "cpu": "x", "cores": 2, "usable_cores": 2,
                         "isa": "baseline", "threads": [1], "python": "3", "numpy": "2",
                         "torch": None}, [row])
    assert "| ? |" in md and bench.WITHHELD_NOTE in md


def test_quiet_cases_stop_at_the_requested_rounds(monkeypatch):
    def ch8(): pass
    def peer(): pass
    monkeypatch.setattr(bench.timing, "_time", lambda fn, k: (2e-6 if fn is peer else 1e-6) * k)
    samples, _ = bench.measure({"ch8fast": ch8, "numpy": peer}, repeats=4, min_time=1e-9)
    assert len(samples["ch8fast"]) == 4
    assert bench.ratio(samples["numpy"], samples["ch8fast"]) == (pytest.approx(2.0), True)


def test_quiet_samples_are_not_withheld():
    fns = {"ch8fast": lambda: None, "numpy": lambda: None}
    samples, _ = bench.measure(fns, repeats=3, min_time=1e-4)
    assert len(samples["ch8fast"]) >= 3


def test_a_starved_contender_is_withheld():
    """A contender slower on 1e3 elements than on 1e4 (by more than STARVED) was starved:
    its ratio is withheld even when its samples agree; other ratios stand. ch8fast
    starved withholds the row."""
    def row(size, times):
        return {"tensors": 1, "size": size, "time": dict(times), "withheld": [],
                "speedup": {"numpy": 1.0, "torch_foreach": 1.0}}
    rows = [row(1000, {"ch8fast": 1e-6, "numpy": 8e-6, "torch_foreach": 12e-3}),
            row(10000, {"ch8fast": 3e-6, "numpy": 30e-6, "torch_foreach": 60e-6}),
            row(100, {"ch8fast": 9e-6, "numpy": 2e-6, "torch_foreach": 30e-6})]
    bench.timing.withhold_starved(rows)
    by = {r["size"]: r for r in rows}
    assert by[1000]["withheld"] == ["torch_foreach"] and by[1000]["starved"] == [
        "torch_foreach"]
    assert by[10000]["withheld"] == [] and "starved" not in by[10000]
    assert set(by[100]["withheld"]) == {"numpy", "torch_foreach", "roofline", "flat"}
