"""Checkpoints: format readable with plain NumPy, verification before any write, atomic
saves that survive SIGKILL, and bit-exact resume in a new process."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

import ch8fast
import _checkpoint_worker as W
from ch8fast import schedules as S
from ch8fast.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, load_checkpoint,
                                read_checkpoint, save_checkpoint)
from conftest import CONFIGS

WORKER = os.path.abspath(W.__file__)


def snapshot(opt, params):
    """Everything a load could change, as comparable plain data and bytes."""
    sd = opt.state_dict()
    arrays = [a.tobytes() for st in sd.pop("state") for a in st.values()]
    return json.dumps(sd, sort_keys=True, default=repr), arrays, [p.tobytes() for p in params]


def make(cls=ch8fast.Adam, dtype=np.float64, seed=0, shapes=((5, 4), (3,), (0,)), **hyper):
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in shapes]
    return cls(params, **hyper), params


def train(opt, params, n, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        opt.step([rng.standard_normal(p.shape).astype(p.dtype) for p in params])


# ---------------------------------------------------------------------------------------
# Round trip and format
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_round_trip_restores_everything(tmp_path, name, cls, ref_name, hyper):
    opt, params = make(cls, **hyper)
    train(opt, params, 3)
    path = tmp_path / "ckpt.npz"
    extra = {"epoch": 2, "note": "héllo", "nested": [1, 2.5, None, True]}
    save_checkpoint(path, opt, params, extra=extra)
    before = snapshot(opt, params)

    opt2, params2 = make(cls, seed=9, **hyper)
    assert snapshot(opt2, params2) != before
    assert load_checkpoint(path, opt2, params2) == extra
    assert snapshot(opt2, params2) == before
    # Both continue identically.
    train(opt, params, 2, seed=5)
    train(opt2, params2, 2, seed=5)
    assert snapshot(opt2, params2) == snapshot(opt, params)


def test_schedules_and_groups_round_trip(tmp_path):
    lr = S.warmup(S.cosine_decay(0.1, 50), warmup_steps=5)
    opt, params = make(ch8fast.SGD, lr=lr, momentum=S.momentum_ramp(0.5, 0.9, 10),
                       nesterov=True)
    train(opt, params, 4)
    save_checkpoint(tmp_path / "c", opt)             # no suffix is added
    assert os.listdir(tmp_path) == ["c"]
    opt2, params2 = make(ch8fast.SGD, lr=0.5, momentum=0.1, nesterov=True)
    assert load_checkpoint(tmp_path / "c", opt2) is None
    assert opt2.param_groups[0]["lr"] == lr
    assert opt2.param_groups[0]["momentum"] == S.momentum_ramp(0.5, 0.9, 10)
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    # params=None: the parameters are neither saved nor touched.
    assert [p.tobytes() for p in params2] != [p.tobytes() for p in params]
    header, arrays = read_checkpoint(tmp_path / "c")
    assert header["has_params"] is False and not any(k.startswith("param.") for k in arrays)


def test_readable_with_plain_numpy_and_documented_checksum(tmp_path):
    """The format as documented: np.load without pickle, a JSON header in a uint8 array,
    and a SHA-256 over the canonical header without 'checksum' then every array's bytes
    in the header's order."""
    opt, params = make(ch8fast.Adam, dtype=np.float32, amsgrad=True)
    train(opt, params, 2)
    sampler = ch8fast.minibatches(100, S.batch_size_schedule(4, every=3), rng=0)
    next(sampler)
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, opt, params, extra={"sampler": sampler.state_dict()})

    with np.load(path, allow_pickle=False) as npz:
        raw = npz["__header__"]
        assert raw.dtype == np.uint8 and raw.ndim == 1
        header = json.loads(raw.tobytes().decode("utf-8"))
        arrays = {k: npz[k] for k in npz.files if k != "__header__"}
    assert header["format"] == CHECKPOINT_FORMAT == "ch8fast-checkpoint"
    assert header["format_version"] == CHECKPOINT_VERSION == 2
    assert header["optimizer"] == "Adam" and header["n_params"] == 3
    assert header["state_dict"]["param_groups"][0]["step"] == 2
    assert header["extra"]["sampler"] == sampler.state_dict()
    names = [e["name"] for e in header["arrays"]]
    assert names == ["state.0.exp_avg", "state.0.exp_avg_sq", "state.0.max_exp_avg_sq",
                     "state.1.exp_avg", "state.1.exp_avg_sq", "state.1.max_exp_avg_sq",
                     "state.2.exp_avg", "state.2.exp_avg_sq", "state.2.max_exp_avg_sq",
                     "param.0", "param.1", "param.2"]
    assert sorted(arrays) == sorted(names)
    for e in header["arrays"]:
        assert arrays[e["name"]].dtype.str == e["dtype"] == "<f4"
        assert list(arrays[e["name"]].shape) == e["shape"]
    np.testing.assert_array_equal(arrays["state.0.exp_avg_sq"], opt.state[0]["exp_avg_sq"])
    np.testing.assert_array_equal(arrays["param.1"], params[1])

    rest = {k: v for k, v in header.items() if k != "checksum"}
    h = hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":"),
                                  ensure_ascii=True, allow_nan=False).encode("utf-8"))
    for name in names:
        h.update(arrays[name].tobytes())
    assert header["checksum"] == {"algorithm": "sha256", "hexdigest": h.hexdigest()}
    # The zip members are stored, not compressed.
    import zipfile
    with zipfile.ZipFile(path) as z:
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}


def test_extra_must_be_plain_json(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, extra={"n": np.int64(3), "x": np.float32(0.5), "b": np.bool_(1)})
    assert read_checkpoint(path)[0]["extra"] == {"n": 3, "x": 0.5, "b": True}
    old = path.read_bytes()
    with pytest.raises(ValueError, match="not plain JSON"):
        save_checkpoint(path, opt, extra={"loss": float("nan")})
    with pytest.raises(TypeError, match="not plain JSON"):
        save_checkpoint(path, opt, extra={"f": object()})
    with pytest.raises(TypeError, match="not plain JSON"):
        save_checkpoint(path, opt, extra={"a": np.zeros(2)})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["c.npz"]


def test_bad_arguments(tmp_path):
    opt, params = make()
    with pytest.raises(TypeError, match="optimizer"):
        save_checkpoint(tmp_path / "c", object())
    with pytest.raises(TypeError, match="params"):
        save_checkpoint(tmp_path / "c", opt, params[0])
    with pytest.raises(TypeError, match=r"params\[1\]"):
        save_checkpoint(tmp_path / "c", opt, [params[0], [1.0]])
    with pytest.raises(ValueError, match="got 2 params"):
        save_checkpoint(tmp_path / "c", opt, params[:2])
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.npz", opt)


# ---------------------------------------------------------------------------------------
# Verification: refuse, name the entry, change nothing
# ---------------------------------------------------------------------------------------

def _rewrite(path, edit, fix_checksum=True):
    """Rewrite a checkpoint after ``edit(header, arrays)`` (checksum recomputed or not)."""
    from ch8fast.checkpoint import _canonical, _checksum
    with np.load(path, allow_pickle=False) as npz:
        header = json.loads(npz["__header__"].tobytes())
        arrays = {k: npz[k] for k in npz.files if k != "__header__"}
    edit(header, arrays)
    if fix_checksum and all(isinstance(e, dict) and e["name"] in arrays
                            for e in header["arrays"]):
        rest = {k: v for k, v in header.items() if k != "checksum"}
        header["checksum"] = {"algorithm": "sha256", "hexdigest": _checksum(rest, arrays)}
    arrays["__header__"] = np.frombuffer(_canonical(header), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _setitem(d, keys, value):
    for k in keys[:-1]:
        d = d[k]
    d[keys[-1]] = value


MISMATCHES = [
    # (id, how the optimizer differs or how the file is edited, expected message)
    ("class", dict(cls=ch8fast.AdamW), None, "holds the state of the optimizer Adam, not of AdamW"),
    ("n_params", dict(shapes=((5, 4), (3,))), None, "holds 3 parameters, the optimizer has 2"),
    ("shape", dict(shapes=((4, 5), (3,), (0,))), None, r"'state.0.exp_avg' has shape \(5, 4\)"),
    ("dtype", dict(dtype=np.float32), None, "'state.0.exp_avg' has shape .* dtype float64"),
    ("amsgrad", dict(amsgrad=True), None, "parameter 0 has state entries"),
    ("version", {}, lambda h, a: _setitem(h, ["format_version"], 3),
     r"format_version'\] is 3; this ch8fast reads versions \[1, 2\]"),
    ("format", {}, lambda h, a: _setitem(h, ["format"], "other"), "header\\['format'\\]"),
    ("bad_hyper", {}, lambda h, a: _setitem(h, ["state_dict", "param_groups", 0, "lr"], -1.0),
     r"\['lr'\] must be a finite number >= 0"),
    ("bad_step", {}, lambda h, a: _setitem(h, ["state_dict", "param_groups", 0, "step"], -3),
     r"\['step'\] must be an integer in \[0, 2\*\*62\]"),
    ("unlisted_array", {}, lambda h, a: _setitem(a, ["evil"], np.zeros(3)),
     r"\['evil'\] are not listed"),
    ("missing_array", {}, lambda h, a: a.pop("state.1.exp_avg"),
     "'state.1.exp_avg' is listed in the header but missing"),
    ("header_dtype", {}, lambda h, a: _setitem(h, ["arrays", 0, "dtype"], "<f4"),
     "'state.0.exp_avg' has dtype <f8, the header says <f4"),
    ("header_shape", {}, lambda h, a: _setitem(h, ["arrays", 3, "shape"], [2, 2]),
     r"'state.1.exp_avg_sq' has shape \(3,\), the header says \(2, 2\)"),
    ("malformed_arrays", {}, lambda h, a: _setitem(h, ["arrays", 0], "x"),
     r"header\['arrays'\]\[0\] is malformed"),
    ("no_state_dict", {}, lambda h, a: h.pop("state_dict"), "header has no 'state_dict'"),
]


@pytest.mark.parametrize("mid,diff,edit,message", MISMATCHES, ids=[m[0] for m in MISMATCHES])
def test_mismatch_refused_and_nothing_changes(tmp_path, mid, diff, edit, message):
    opt, params = make(ch8fast.Adam)
    train(opt, params, 2)
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params, extra={"k": 1})
    if edit is not None:
        _rewrite(path, edit)
    kw = dict(cls=ch8fast.Adam, seed=4)
    kw.update(diff)
    opt2, params2 = make(**kw)
    train(opt2, params2, 1, seed=8)
    before = snapshot(opt2, params2)
    with pytest.raises(ValueError, match=message):
        load_checkpoint(path, opt2, params2)
    assert snapshot(opt2, params2) == before


def test_edited_header_without_new_checksum_is_refused(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params)
    _rewrite(path, lambda h, a: _setitem(h, ["state_dict", "param_groups", 0, "lr"], 0.5),
             fix_checksum=False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        read_checkpoint(path)
    _rewrite(path, lambda h, a: a["param.0"].__setitem__((0, 0), 7.0), fix_checksum=False)
    with pytest.raises(ValueError, match="checksum mismatch"):
        load_checkpoint(path, opt, params)


def test_params_checks(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt)                        # no params saved
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match="holds no parameters"):
        load_checkpoint(path, opt, params)
    save_checkpoint(path, opt, params)
    with pytest.raises(ValueError, match="2 params were given"):
        load_checkpoint(path, opt, params[:2])
    with pytest.raises(ValueError, match=r"'param.1' has shape \(3,\) and dtype float64, "
                                         r"params\[1\] is \(3,\) float32"):
        load_checkpoint(path, opt, [params[0], params[1].astype(np.float32), params[2]])
    ro = params[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"params\[0\] is read-only"):
        load_checkpoint(path, opt, [ro, params[1], params[2]])
    with pytest.raises(TypeError, match=r"params\[2\]"):
        load_checkpoint(path, opt, [params[0], params[1], "x"])
    assert snapshot(opt, params) == before


def test_corrupt_and_truncated_files_never_load_wrong_data(tmp_path):
    """Every truncation, and bit flips all over the file: either a ValueError (nothing
    changed), or - for a flip in bytes that carry no data (zip timestamps, attributes) - a
    load that gives exactly the saved content."""
    opt, params = make(ch8fast.RMSProp, shapes=((6, 5), (4,)), momentum=0.9)
    train(opt, params, 2)
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params, extra={"epoch": 1})
    good = path.read_bytes()
    saved = snapshot(opt, params)
    opt2, params2 = make(ch8fast.RMSProp, seed=3, shapes=((6, 5), (4,)), momentum=0.9)
    fresh = snapshot(opt2, params2)
    bad = str(tmp_path / "bad.npz")
    rng = random.Random(0)
    cuts = sorted(set(range(0, len(good), 7)) | {len(good) - 1, len(good) - 22})
    flips = [(rng.randrange(len(good)), 1 << rng.randrange(8)) for _ in range(400)]
    refused = harmless = 0
    cases = [good[:n] for n in cuts]
    for pos, bit in flips:
        b = bytearray(good)
        b[pos] ^= bit
        cases.append(bytes(b))
    for data in cases:
        with open(bad, "wb") as f:
            f.write(data)
        try:
            extra = load_checkpoint(bad, opt2, params2)
        except ValueError as e:
            assert str(e).startswith(f"checkpoint {bad!r}: ")
            assert snapshot(opt2, params2) == fresh
            refused += 1
        else:
            assert extra == {"epoch": 1}
            assert snapshot(opt2, params2) == saved
            opt2, params2 = make(ch8fast.RMSProp, seed=3, shapes=((6, 5), (4,)), momentum=0.9)
            harmless += 1
    assert refused >= len(cuts) + 300, (refused, harmless)


def test_never_unpickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params)
    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    arrays["state.0.exp_avg"] = np.array([Evil()], dtype=object)
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    with pytest.raises(ValueError, match="allow_pickle=False"):
        load_checkpoint(path, opt, params)
    np.save(tmp_path / "x.npy", np.array([Evil()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "x.npy", opt, params)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------
# Atomic saves
# ---------------------------------------------------------------------------------------

def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params, extra={"v": 1})
    old = path.read_bytes()
    train(opt, params, 1)

    def broken_savez(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, opt, params, extra={"v": 2})
    assert path.read_bytes() == old
    assert os.listdir(tmp_path) == ["c.npz"]


def test_stale_temp_files_are_ignored_and_cleaned(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt, params, extra={"v": 1})
    # Temp files name their machine and process. One of a process of this machine that
    # is gone, one of a live process (ours), one of another checkpoint name, one of
    # another machine sharing the folder: only the first is removed by the next save.
    from ch8fast.checkpoint import _temp_prefix
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = tmp_path / f"{_temp_prefix('c.npz')}{dead}-abc"
    live = tmp_path / f"{_temp_prefix('c.npz')}{os.getpid()}-def"
    other = tmp_path / f"{_temp_prefix('d.npz')}{dead}-ghi"
    elsewhere = tmp_path / f".c.npz.tmp-another_host-{dead}-jkl"
    for f in (stale, live, other, elsewhere):
        f.write_bytes(b"PK\x03\x04 torn")
    assert load_checkpoint(path, opt, params) == {"v": 1}
    save_checkpoint(path, opt, params, extra={"v": 2})
    assert sorted(os.listdir(tmp_path)) == sorted(["c.npz", live.name, other.name,
                                                   elsewhere.name])


def test_sigkill_during_saves_never_leaves_a_torn_file(tmp_path):
    """A process that saves a 30 MB checkpoint in a loop is killed with SIGKILL at random
    moments, 24 times; after every kill the checkpoint loads, verifies, is self-consistent
    and is at least as new as the last save the process reported complete."""
    path = str(tmp_path / "big.npz")
    opt, params = W.saveloop_optimizer()
    rng = random.Random(1234)
    last_done, kills, mid_save = 0, 0, 0
    iterations = set()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    while kills < 24:
        proc = subprocess.Popen([sys.executable, WORKER, "saveloop", path],
                                stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout.readline().strip() == "ready"
        t0 = time.monotonic()
        time.sleep(rng.uniform(0.0, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        kills += 1
        done = [int(line.split()[1]) for line in out.split("\n") if line.startswith("saved")]
        temps = [f for f in os.listdir(tmp_path) if f.startswith(".big.npz.tmp-")]
        mid_save += bool(temps)
        assert len(temps) <= 1                  # older leftovers were cleaned
        if not os.path.exists(path):
            assert not done and last_done == 0  # killed before its first save completed
            continue
        extra = load_checkpoint(path, opt, params)
        k = extra["iteration"]
        # A new run restarts at 1: the file holds a save from this run or the previous
        # file, never less than what this run reported complete.
        if done:
            assert k >= done[-1]
        iterations.add(k)
        assert all(np.all(p == k) for p in params)
        assert all(np.all(st["velocity"] == -k) for st in opt.state)
        last_done = max(last_done, k)
        assert time.monotonic() - t0 < 30
    assert kills >= 20
    assert mid_save >= 3, f"only {mid_save} of {kills} kills landed during a save"
    print(f"\n{kills} kills, {mid_save} during a save (temp file left), "
          f"iterations seen {sorted(iterations)}")


# ---------------------------------------------------------------------------------------
# Bit-exact resume in a new process
# ---------------------------------------------------------------------------------------

def test_resume_in_new_process_is_bit_exact(tmp_path):
    """N steps, save, N more steps here; a new process loads the checkpoint into fresh
    arrays and a fresh sampler and trains N steps: same bytes, for every optimizer, with
    lr and momentum schedules, the batch-size schedule's sampler, float32 and float64, 1
    and 2 threads."""
    expected = {}
    for sid, name, dt, nt in W.scenarios():
        ch8fast.set_num_threads(nt)
        params, data = W.problem(dt)
        opt = W.OPTIMIZERS[name](params)
        smp = W.sampler(seed=7)
        W.train(opt, params, data, smp, W.N_STEPS)
        save_checkpoint(tmp_path / f"{sid}.npz", opt, params,
                        extra={"sampler": smp.state_dict()})
        W.train(opt, params, data, smp, W.N_STEPS)
        expected[sid] = W.digest(opt, params)
    ch8fast.set_num_threads(0)
    out = subprocess.run([sys.executable, WORKER, "resume", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = {d["id"]: d["digest"] for d in map(json.loads, out.stdout.split("\n")[:-1])}
    assert got.keys() == expected.keys()
    wrong = [sid for sid in expected if got[sid] != expected[sid]]
    assert not wrong, f"resumed runs differ: {wrong}"
    assert len(expected) == 36


def test_crafted_headers_are_refused(tmp_path):
    """Headers that are not JSON objects, deeply nested JSON, or JSON with huge numbers:
    a ValueError, never another exception."""
    opt, params = make()
    path = tmp_path / "c.npz"
    for text in ["[" * 100_000 + "]" * 100_000, "\xff\xfe", "[]", '{"format": 1e999}',
                 "null", ""]:
        raw = np.frombuffer(text.encode("utf-8", "surrogateescape"), np.uint8)
        with open(path, "wb") as f:
            np.savez(f, __header__=raw)
        with pytest.raises(ValueError, match="checkpoint"):
            load_checkpoint(path, opt, params)
    with open(path, "wb") as f:
        np.savez(f, __header__=np.zeros((2, 2), np.uint8))
    with pytest.raises(ValueError, match="1-D uint8"):
        read_checkpoint(path)
    with open(path, "wb") as f:
        np.savez(f, x=np.zeros(2))
    with pytest.raises(ValueError, match="no '__header__' entry"):
        read_checkpoint(path)


@pytest.mark.skipif(not hasattr(os, "fchmod"), reason="POSIX file modes")
def test_file_mode_is_kept(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    old = os.umask(0o077)                   # a new file gets what the umask allows
    try:
        save_checkpoint(path, opt)
        assert os.stat(path).st_mode & 0o777 == 0o600
        os.remove(path)
        os.umask(0o022)
        save_checkpoint(path, opt)
        assert os.stat(path).st_mode & 0o777 == 0o644
    finally:
        os.umask(old)
    os.chmod(path, 0o640)                   # a replaced file keeps its mode
    save_checkpoint(path, opt)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_a_header_that_promises_missing_params_is_refused(tmp_path):
    opt, params = make()
    path = tmp_path / "c.npz"
    save_checkpoint(path, opt)                       # no params saved
    _rewrite(path, lambda h, a: h.update(has_params=True))
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=r"has_params.*param\.0"):
        load_checkpoint(path, opt, params)
    assert snapshot(opt, params) == before


def test_a_zip_member_that_is_not_an_array_is_refused(tmp_path):
    path = tmp_path / "c.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("__header__", b"{}")                # raw bytes, not .npy
    with pytest.raises(ValueError, match="not a NumPy array"):
        read_checkpoint(path)
