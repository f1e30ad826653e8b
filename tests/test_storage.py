"""16-bit parameters and compressed optimizer state (ch8fast.storage).

The storage codecs are checked bit for bit against their NumPy restatement in
reference.py. A whole step in a storage mode is checked against a float32 twin: the twin
starts from the decoded parameters and state, takes the same step with the float32 kernel
(the same span function), and its result, encoded by the reference, must be exactly what
the storage-mode optimizer stored. The float32 kernels themselves are checked against the
book's formulas in test_optim.py.
"""

import copy
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest

import ch8fast
from ch8fast import storage
from ch8fast._isa import K
import reference as R
from conftest import CONFIGS

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)

# the dense suite's configurations (conftest.CONFIGS): every rule and option, centered
# RMSProp included, in every storage it has
RULES = [(name, cls, hyper) for name, cls, _, hyper in CONFIGS]

MODES = ([("float32", None, fmt) for fmt in ("bfloat16", "q8")]
         + [(dt, keep, fmt) for dt in ("bfloat16", "float16")
            for keep in ("master", "stochastic", "kahan")
            for fmt in ("float32", "bfloat16", "q8")])

SHAPES = [(300,), (7, 40), (256,)]      # partial blocks, a 2-D array, a whole block


def _dtype(name):
    return {"float32": np.float32, "bfloat16": BF16, "float16": F16}[name]


def _arrays(shapes, dtype, rng, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32).astype(dtype) for s in shapes]


def _encode_state(how, values, key, index):
    """The reference's stored form of one state entry."""
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    w = R.words(key, index, flat.size)
    if how == "bfloat16":
        return R.bf16_rne(flat), None
    if how == "bfloat16_sr":
        return R.bf16_sr(flat, w >> np.uint32(16)), None
    if how.startswith("q8"):
        return R.q8_encode(flat, how == "q8_signed", w)
    return flat, None


def _round_param(dtype, keep, theta, key, index):
    """The reference's 16-bit parameter bits (and compensation) for float32 values."""
    flat = np.ascontiguousarray(theta, np.float32).reshape(-1)
    rne = R.bf16_rne if dtype == BF16 else R.f16_rne
    to32 = R.bf16_to_f32 if dtype == BF16 else R.f16_to_f32
    if keep == "stochastic":
        sr = R.bf16_sr if dtype == BF16 else R.f16_sr
        return sr(flat, R.words(key, index, flat.size) & np.uint32(0xFFFF)), None
    hi = rne(flat)
    if keep == "kahan":              # saturating at the largest finite value
        top = np.uint16(0x7BFF if dtype == F16 else 0x7F7F)
        over = ((hi & np.uint16(0x7FFF)) == top + np.uint16(1)) & np.isfinite(flat)
        hi = np.where(over, (hi & np.uint16(0x8000)) | top, hi).astype(np.uint16)
        return hi, R.bf16_rne(flat - to32(hi))
    return hi, None


# every rule in every mode it has (AdaDelta has no 8-bit state, schedule-free methods
# keep z as precisely as the parameters: test_bad_options)
# (LAMB and LARS: float32/float64 parameters and state only, tests/test_trust_ratio.py)
CASES = [(r, m) for r in RULES for m in MODES if m[2] in r[1].rule.state_formats
         and not (r[1].rule.trust_ratio and m[0] != "float32")]


@pytest.mark.parametrize("rule,mode", CASES,
                         ids=[f"{r[0]}-{m[0]}-{m[1]}-{m[2]}" for r, m in CASES])
def test_a_step_equals_the_float32_step_encoded_by_the_reference(rule, mode):
    name, cls, hyper = rule
    dtype_name, keep, fmt = mode
    rng = np.random.default_rng(1)
    dtype = _dtype(dtype_name)
    params = _arrays(SHAPES, dtype, rng)
    seed = 12345
    opt = cls(params, **hyper, state_format=fmt, param_mode=keep, seed=seed)
    twin_params = [storage.to_float32(p) for p in params]
    twin = cls(twin_params, **hyper)
    bases = np.cumsum([0] + [p.size for p in params])[:-1]
    for t in range(1, 7):
        grads = _arrays(SHAPES, dtype, rng, scale=0.1 * t)
        if t == 3:                       # a zero gradient: decaying state, code 0 paths
            grads[0][...] = 0
        # the twin starts where the optimizer is, decoded
        for i, p in enumerate(params):
            dec = opt.decoded_state(i)
            np.copyto(twin_params[i], dec.get("theta", storage.to_float32(p)))
            for k in twin.state[i]:
                twin.state[i][k][...] = dec[k]
        opt.step(grads)
        twin.step([storage.to_float32(g) for g in grads])
        key = R.step_key(seed, 0, t)
        for i, p in enumerate(params):
            st = opt.state[i]
            for k in twin.state[i]:
                how = storage.state_storage(fmt, cls.rule.kinds[k])
                data, scales = _encode_state(how, twin.state[i][k], key, bases[i])
                got = st[k].reshape(-1)
                assert got.view(np.uint8).tobytes() == data.view(np.uint8).tobytes(), \
                    (t, i, k, how)
                if scales is not None:
                    assert st[k + ".absmax"].tobytes() == scales.tobytes(), (t, i, k)
            theta = twin_params[i]
            if keep is None:
                assert p.tobytes() == theta.astype(np.float32).tobytes(), (t, i)
                continue
            bits, comp = _round_param(dtype, keep, theta, key, bases[i])
            assert p.view(np.uint16).reshape(-1).tobytes() == bits.tobytes(), (t, i, keep)
            if keep == "master":
                assert st["master"].tobytes() == theta.tobytes()
            if keep == "kahan":
                assert st["compensation"].reshape(-1).tobytes() == comp.tobytes()


@pytest.mark.parametrize("fmt,keep", [("q8", "stochastic"), ("bfloat16", "kahan"),
                                      ("float32", "stochastic"), ("q8", None)])
def test_same_bits_for_any_thread_count(fmt, keep, threads):
    """Blocks never straddle threads and random words hash the element's index."""
    rng = np.random.default_rng(2)
    n = 400_003
    dtype = BF16 if keep else np.float32

    def run(nt):
        ch8fast.set_num_threads(nt)
        w = (np.linspace(-1, 1, n)).astype(dtype)
        opt = ch8fast.Adam([w, np.ones(1000, dtype)], lr=1e-3, state_format=fmt,
                           param_mode=keep, seed=3)
        for _ in range(3):
            opt.step([(rng.standard_normal(n) * 0.01).astype(dtype), np.ones(1000, dtype)])
        return w.tobytes(), [a.tobytes() for st in opt.state for a in st.values()]
    state = rng.bit_generator.state
    one = run(1)
    rng.bit_generator.state = state
    many = run(threads)
    ch8fast.set_num_threads(0)
    assert one == many


def test_stochastic_rounding_does_not_depend_on_how_the_arrays_are_split():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000).astype(BF16)
    g = (rng.standard_normal(3000) * 0.1).astype(BF16)
    whole = x.copy()
    a, b = x[:1234].copy(), x[1234:].copy()
    o1 = ch8fast.SGD([whole], lr=0.01, momentum=0.9, param_mode="stochastic",
                     state_format="bfloat16", seed=9)
    o2 = ch8fast.SGD([a, b], lr=0.01, momentum=0.9, param_mode="stochastic",
                     state_format="bfloat16", seed=9)
    for _ in range(4):
        o1.step(g)
        o2.step([g[:1234], g[1234:]])
    assert whole.tobytes() == np.concatenate([a, b]).tobytes()


def test_seed_changes_the_rounding_and_is_restored_by_load_state_dict():
    x = np.linspace(-1, 1, 5000).astype(BF16)
    g = np.full(5000, 1e-4, BF16)
    outs = []
    for seed in (0, 1):
        w = x.copy()
        opt = ch8fast.SGD([w], lr=0.3, param_mode="stochastic", seed=seed)
        opt.step(g)
        outs.append(w.tobytes())
    assert outs[0] != outs[1]
    w = x.copy()
    opt = ch8fast.SGD([w], lr=0.3, param_mode="stochastic", seed=1)
    w2 = x.copy()
    opt2 = ch8fast.SGD([w2], lr=0.3, param_mode="stochastic", seed=0)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.seed == 1
    opt2.step(g)
    assert w2.tobytes() == outs[1]


# ---- the codecs against the reference ----------------------------------------------------

def _floats(n, rng):
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-45, 38, n)).astype(np.float32)
    x[:12] = [0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 65504, 65520, 3.4e38, -1e-40,
              6.1e-5, 5.96e-8]
    return x


@pytest.mark.parametrize("st", ["bfloat16", "float16"])
def test_16bit_rounding_is_the_reference(st):
    rng = np.random.default_rng(4)
    x = _floats(200_000, rng)
    rne = R.bf16_rne if st == "bfloat16" else R.f16_rne
    sr = R.bf16_sr if st == "bfloat16" else R.f16_sr
    assert np.array_equal(K.round16(st, x, "nearest"), rne(x))
    key = R.step_key(7, 2, 5)
    assert K.step_key(7, 2, 5) == key
    w = R.words(key, 11, x.size)
    assert np.array_equal(K.random_words(key, 11, x.size), w)
    assert np.array_equal(K.round16(st, x, "stochastic", key, 11), sr(x, w & np.uint32(0xFFFF)))
    finite = ~np.isnan(x)
    # nearest rounding is NumPy's (float16) and ml_dtypes' (bfloat16) for every non-NaN
    with np.errstate(over="ignore"):
        other = x[finite].astype(F16 if st == "float16" else BF16).view(np.uint16)
    assert np.array_equal(rne(x[finite]), other)
    # a NaN stays a NaN (quiet), with its sign
    nan = rne(np.array([np.nan, -np.nan], np.float32))
    back = (R.bf16_to_f32 if st == "bfloat16" else R.f16_to_f32)(nan)
    assert np.isnan(back).all() and np.signbit(back[1])


def test_16bit_decoding_is_exact():
    h = np.arange(65536, dtype=np.uint16)
    assert np.array_equal(K.decode_block_state("bfloat16", h).view(np.uint32),
                          R.bf16_to_f32(h).view(np.uint32))
    got = K.decode_block_state("float16", h)
    assert np.array_equal(got.view(np.uint32), R.f16_to_f32(h).view(np.uint32))
    ok = ~np.isnan(h.view(np.float16))
    assert np.array_equal(got[ok], h.view(np.float16)[ok].astype(np.float32))


@pytest.mark.parametrize("st,signed", [("q8_signed", True), ("q8_unsigned", False)])
def test_8bit_codes_are_the_reference(st, signed):
    rng = np.random.default_rng(5)
    x = np.clip(_floats(20_000, rng)[12:], -1e30, 1e30)
    x = x if signed else np.abs(x)
    x[:256] *= 1e-30                         # a block far below float32's normal range
    x[256:512] = 0                           # a zero block
    x[600] = np.nan                          # a block holding a NaN decodes to NaN
    key = 99
    codes, scales = K.encode_block_state(st, x, key, 0)
    rc, rs = R.q8_encode(x, signed, R.words(key, 0, x.size))
    assert np.array_equal(codes, rc)
    assert scales.tobytes() == rs.tobytes()
    dec = K.decode_block_state(st, codes, scales)
    assert dec.tobytes() == R.q8_decode(codes, scales, signed).tobytes()
    assert np.isnan(dec[512:768]).all() and not np.isnan(dec[768:]).any()
    assert (dec[256:512] == 0).all()
    if not signed:                           # a positive accumulator never becomes code 0
        finite_block = ~np.isnan(np.repeat(scales, 256)[:x.size])
        assert (codes[(x > 0) & finite_block] > 0).all()


def test_an_8bit_step_is_within_half_a_code_of_the_float32_step():
    """From the same decoded state, the stored result of one quantized Adam step and the
    float32 step differ by at most the rounding of one code: for E4M3 (nearest) half of
    the spacing, 2^-4 of the value plus half the subnormal step, for E5M3 (stochastic) one
    spacing, 2^-3 of the value plus the subnormal step, in units of the block's scale."""
    rng = np.random.default_rng(6)
    n = 4096
    w = rng.standard_normal(n).astype(np.float32)
    q = ch8fast.Adam([w], lr=1e-3, state_format="q8", seed=1)
    wf = w.copy()
    f = ch8fast.Adam([wf], lr=1e-3)
    for t in range(20):
        g = (rng.standard_normal(n) * 10.0 ** rng.uniform(-4, 1, n)).astype(np.float32)
        dec = q.decoded_state(0)
        np.copyto(wf, w)
        for k in ("exp_avg", "exp_avg_sq"):
            f.state[0][k][...] = dec[k]
        q.step(g)
        f.step(g)
        dec = q.decoded_state(0)
        for k, rel, sub in (("exp_avg", 2.0 ** -4, 2.0 ** -19), ("exp_avg_sq", 2.0 ** -3,
                                                                  2.0 ** -34)):
            exact = f.state[0][k]
            scale = np.repeat(q.state[0][k + ".absmax"], 256)[:n] / 0.9375
            err = np.abs(dec[k] - exact)
            bound = rel * np.abs(exact) + sub * scale
            assert (err <= bound * (1 + 1e-6)).all(), (t, k, float(np.max(err / bound)))


# ---- stochastic rounding is unbiased --------------------------------------------------------

def _binomial_p(k, n, p):
    """Two-sided exact binomial p-value of k successes in n trials (normal-approximated
    tails with continuity correction; n = 65536 makes it accurate to far below alpha)."""
    if p in (0.0, 1.0):
        return 1.0 if k == round(p * n) else 0.0
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    z = (abs(k - mean) - 0.5) / sd
    return math.erfc(max(z, 0) / math.sqrt(2))


def _neighbours(x, st):
    """The 16-bit values just below and above |x| in magnitude (as float64), |x| between."""
    a = abs(np.float32(x))
    if st == "bfloat16":
        down = int(np.array([a], np.float32).view(np.uint32)[0] >> 16)
        lo = float(R.bf16_to_f32(np.array([down], np.uint16))[0])
        hi = float(R.bf16_to_f32(np.array([down + 1], np.uint16))[0])
    else:
        h = np.float16(a)
        lo, hi = (float(np.nextafter(h, np.float16(0))), float(h)) if float(h) > a else \
            (float(h), float(np.nextafter(h, np.float16(np.inf))))
    return lo, hi


@pytest.mark.parametrize("st", ["bfloat16", "float16"])
def test_stochastic_rounding_is_unbiased(st):
    """Each input x between the 16-bit neighbours lo < hi (in magnitude) must round to hi
    with probability (|x| - lo) / (hi - lo). 2^16 roundings of each of 64 inputs
    (fractions of a unit in the last place, subnormals, negatives); reject when any
    two-sided p-value is below 1e-6 / 64, a family-wise false alarm rate of at most 1e-6.
    Nearest rounding, or rounding with too few random bits, is rejected."""
    to32 = R.bf16_to_f32 if st == "bfloat16" else R.f16_to_f32
    base = [1.0, -3.5, 1e-3, 1000.0, 0.1, -7.0, 2.0 ** -20, 1e-7]
    if st == "bfloat16":
        base[6:] = [1e-38, -3e-40]
    T = 1 << 16
    pvalues = []
    for j, b in enumerate(base):
        lo, hi = _neighbours(b, st)
        for m, frac in enumerate((2.0 ** -16, 0.25, 0.5, 0.75, 0.3, 0.9, 1 - 2.0 ** -16,
                                  0.0)):
            x = np.float32(np.copysign(lo + (hi - lo) * frac, b))
            lo_x, hi_x = _neighbours(x, st)
            p = (abs(float(x)) - lo_x) / (hi_x - lo_x)
            key = K.step_key(11, j, m)
            vals = np.abs(to32(K.round16(st, np.full(T, x, np.float32), "stochastic", key,
                                         0)).astype(np.float64))
            assert set(np.unique(vals)) <= {lo_x, hi_x}, (x, np.unique(vals))
            pvalues.append(_binomial_p(int(np.sum(vals == hi_x)), T, p))
    assert min(pvalues) > 1e-6 / len(pvalues), min(pvalues)
    # and the test can fail: nearest rounding of the same inputs is rejected
    x = np.float32(1.0 + 2.0 ** -9)            # a quarter of a bfloat16 unit above 1
    if st == "bfloat16":
        near = np.abs(to32(K.round16(st, np.full(T, x, np.float32), "nearest"))
                      .astype(np.float64))
        lo_x, hi_x = _neighbours(x, st)
        assert _binomial_p(int(np.sum(near == hi_x)), T, 0.25) < 1e-6 / len(pvalues)


# ---- options, storage and the rest of the library ---------------------------------------------

@pytest.mark.parametrize("make,exc,pattern", [
    (lambda w: ch8fast.AdaDelta([w], state_format="q8"), ValueError,
     "state_format='q8' is not available for AdaDelta.*state_format='bfloat16'"),
    (lambda w: ch8fast.ScheduleFreeAdamW([w], state_format="bfloat16"), ValueError,
     "state_format='bfloat16' is not available for ScheduleFreeAdamW: its state z is the "
     "sequence the parameters are averaged from; use state_format='float32'$"),
    (lambda w: ch8fast.Adam([w], state_format="int8"), ValueError,
     r"state_format must be one of \['float32', 'bfloat16', 'q8'\]"),
    (lambda w: ch8fast.Adam([w], param_mode="master"), ValueError,
     "param_mode='master' is for float16/bfloat16 parameters"),
    (lambda w: ch8fast.Adam([w.astype(np.float64)], state_format="q8"), ValueError,
     "float64, whose state stays float64"),
    (lambda w: ch8fast.Adam([w.astype(BF16)], param_mode="exact"), ValueError,
     "param_mode must be one of"),
    (lambda w: ch8fast.Adam([w], seed=-1), ValueError, "seed must be an integer"),
], ids=["adadelta_q8", "schedule_free_bfloat16", "unknown_format", "mode_without_16bit",
        "float64_q8", "bad_mode",
        "bad_seed"])
def test_bad_options(make, exc, pattern):
    w = np.ones(10, np.float32)
    with pytest.raises(exc, match=pattern):
        make(w)
    assert (w == 1).all()


def test_bfloat16_without_ml_dtypes_names_what_works():
    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import ch8fast\n"
            "try:\n    ch8fast.FlatParams({'w': 3}, dtype='bfloat16')\n"
            "except ImportError as e:\n    print('ERR', e)\n"
            "import numpy as np\n"
            "w = np.ones(3, np.float16); ch8fast.Adam([w]).step(np.ones(3, np.float16))\n"
            "print('float16 ok', w)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert "ERR" in out.stdout and "ml_dtypes" in out.stdout and "float16" in out.stdout, \
        out.stdout + out.stderr
    assert "float16 ok" in out.stdout


def test_the_literal_nesterov_form_refuses_16bit_parameters():
    w = np.ones(4, BF16)
    opt = ch8fast.SGD([w], lr=0.1, momentum=0.9, nesterov=True)
    with pytest.raises(ValueError, match="shifted form"):
        opt.step(closure=lambda: np.ones(4, BF16))
    assert (storage.to_float32(w) == 1).all()


def test_an_edit_of_a_16bit_parameter_takes_effect_in_master_mode():
    w = np.ones(600, BF16)
    opt = ch8fast.SGD([w], lr=0.1)
    opt.step(np.ones(600, BF16))
    w[:10] = 5.0                        # the user edits the array the model uses
    opt.step(np.zeros(600, BF16))
    assert (storage.to_float32(w[:10]) == 5).all()
    assert (opt.state[0]["master"][:10] == 5).all()
    assert (opt.state[0]["master"][10:] == np.float32(0.9)).all()


@pytest.mark.parametrize("fmt,keep,dtype", [("q8", "stochastic", "bfloat16"),
                                            ("bfloat16", "kahan", "float16"),
                                            ("q8", None, "float32")])
def test_checkpoints_state_dicts_and_pickles_resume_exactly(tmp_path, fmt, keep, dtype):
    dtype = _dtype(dtype)
    rng = np.random.default_rng(8)
    grads = [[(rng.standard_normal(s) * 0.1).astype(dtype) for s in SHAPES]
             for _ in range(8)]
    params = _arrays(SHAPES, dtype, np.random.default_rng(9))
    opt = ch8fast.Adam(params, lr=1e-2, state_format=fmt, param_mode=keep, seed=4)
    for g in grads[:4]:
        opt.step(g)
    ch8fast.save_checkpoint(tmp_path / "c.npz", opt, params=params)
    header, arrays = ch8fast.read_checkpoint(tmp_path / "c.npz")
    assert header["format_version"] == 2
    sd = opt.state_dict()
    clones = [pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)]
    fresh = _arrays(SHAPES, dtype, np.random.default_rng(10))
    loaded = ch8fast.Adam(fresh, lr=1e-2, state_format=fmt, param_mode=keep, seed=4)
    ch8fast.load_checkpoint(tmp_path / "c.npz", loaded, params=fresh)
    fresh2 = [p.copy() for p in params]
    from_sd = ch8fast.Adam(fresh2, lr=1e-2, state_format=fmt, param_mode=keep, seed=4)
    from_sd.load_state_dict(sd)
    for g in grads[4:]:
        for o in [opt, loaded, from_sd] + clones:
            o.step(g)
    for o in [loaded, from_sd] + clones:
        assert [p.tobytes() for p in o.params] == [p.tobytes() for p in params]
        assert [a.tobytes() for st in o.state for a in st.values()] == \
            [a.tobytes() for st in opt.state for a in st.values()]
    other = ch8fast.Adam(_arrays(SHAPES, dtype, rng), lr=1e-2, seed=4,
                         param_mode=keep)
    with pytest.raises(ValueError, match="state_format"):
        ch8fast.load_checkpoint(tmp_path / "c.npz", other)


def test_a_version_1_checkpoint_still_loads(tmp_path):
    from ch8fast.checkpoint import _canonical, _checksum
    w = np.linspace(-1, 1, 10)
    opt = ch8fast.Adam([w], lr=0.1)
    opt.step(np.ones(10))
    ch8fast.save_checkpoint(tmp_path / "c.npz", opt, params=[w])
    header, arrays = ch8fast.read_checkpoint(tmp_path / "c.npz")
    # what version 1 wrote: no storage entry, state dict version 1
    header["format_version"] = 1
    sd = header["state_dict"]
    sd["version"] = 1
    del sd["storage"]
    del header["checksum"]
    header["checksum"] = {"algorithm": "sha256", "hexdigest": _checksum(header, arrays)}
    arrays["__header__"] = np.frombuffer(_canonical(header), np.uint8)
    with open(tmp_path / "v1.npz", "wb") as f:
        np.savez(f, **arrays)
    w2 = np.zeros(10)
    opt2 = ch8fast.Adam([w2], lr=0.1)
    ch8fast.load_checkpoint(tmp_path / "v1.npz", opt2, params=[w2])
    opt.step(np.ones(10))
    opt2.step(np.ones(10))
    assert w.tobytes() == w2.tobytes()


def test_clipping_and_skipping_work_on_16bit_gradients():
    g = np.full(1000, 3.0, np.float32).astype(BF16)
    w1, w2 = np.zeros(1000, BF16), np.zeros(1000, np.float32)
    o1 = ch8fast.SGD([w1], lr=0.1, clip_norm=1.0, skip_nonfinite=True)
    o2 = ch8fast.SGD([w2], lr=0.1, clip_norm=1.0, skip_nonfinite=True)
    o1.step(g)
    o2.step(storage.to_float32(g))
    assert o1.last_grad_norm == o2.last_grad_norm
    assert o1.state[0]["master"].tobytes() == w2.tobytes()
    g[5] = np.inf
    o1.step(g)
    assert o1.skipped_steps == 1
    assert ch8fast.global_norm([storage.to_float32(g)]) == ch8fast.global_norm([g])
    h = np.full(1000, 3.0, np.float32).astype(F16)
    ch8fast.clip_by_value([h], 1.0)
    assert (h == 1).all()


def test_float32_gradients_for_16bit_parameters():
    """A 16-bit parameter takes a float32 gradient too (e.g. reduced across processes in
    float32); all gradients of a group's 16-bit arrays must agree."""
    w1, w2 = np.ones(300, BF16), np.ones(300, BF16)
    o1, o2 = ch8fast.Adam([w1]), ch8fast.Adam([w2])
    g = np.linspace(-1, 1, 300).astype(np.float32).astype(BF16)
    o1.step(g)
    o2.step(storage.to_float32(g))
    assert w1.tobytes() == w2.tobytes()
    a, b = np.ones(3, BF16), np.ones(4, BF16)
    o = ch8fast.Adam([a, b])
    with pytest.raises(TypeError, match="differs from the other gradients"):
        o.step([np.ones(3, BF16), np.ones(4, np.float32)])


def test_flat_params_in_16_bits_and_theta_of_a_nesterov_16bit_group():
    arena = ch8fast.FlatParams({"a": (10, 3), "b": 7}, dtype=BF16)
    arena["a"][...] = 1
    opt = ch8fast.SGD([arena.flat], lr=0.1, momentum=0.9, nesterov=True,
                      param_mode="kahan", state_format="q8")
    for _ in range(3):
        arena.flat_grad[...] = 0.5
        opt.step(arena.flat_grad)
    theta = opt.theta()[0]
    assert theta.dtype == BF16
    dec = opt.decoded_state(0)
    expected = dec["theta"] - np.float32(0.9) * dec["velocity"]
    assert np.array_equal(storage.to_float32(theta), R.bf16_to_f32(R.bf16_rne(expected)))
    phi = arena.flat.copy()
    with opt.at_theta():
        assert arena.flat.tobytes() == theta.tobytes()
    assert arena.flat.tobytes() == phi.tobytes()


def test_state_memory_per_parameter():
    """Measured resident bytes of state per parameter: 8 (float32), 4 (bfloat16), about
    2 (q8)."""
    n = 1 << 20
    for fmt, expected in (("float32", 8.0), ("bfloat16", 4.0), ("q8", 2 + 8 / 256)):
        opt = ch8fast.Adam([np.zeros(n, np.float32)], state_format=fmt)
        nbytes = sum(a.nbytes for a in opt.state[0].values())
        assert nbytes / n == pytest.approx(expected, rel=1e-6)


def test_shards_with_their_element_offset_round_as_one_process_does():
    """Data-parallel shards: optimizers over the slices [0, 1024) and [1024, n) of a
    parameter, each told where its slice starts, give the bits of one optimizer over the
    whole (the slice boundary a multiple of the 256-element block)."""
    rng = np.random.default_rng(12)
    n = 3000
    x = rng.standard_normal(n).astype(BF16)
    whole, part = x.copy(), x.copy()
    kw = dict(lr=1e-3, param_mode="stochastic", state_format="q8", seed=5)
    o = ch8fast.Adam([whole], **kw)
    shards = [ch8fast.Adam([part[:1024]], **kw),
              ch8fast.Adam([part[1024:]], element_offset=1024, **kw)]
    for _ in range(3):
        g = (rng.standard_normal(n) * 0.1).astype(BF16)
        o.step(g)
        shards[0].step(g[:1024])
        shards[1].step(g[1024:])
    assert whole.tobytes() == part.tobytes()
    assert o.state[0]["exp_avg_sq"].tobytes() == (shards[0].state[0]["exp_avg_sq"].tobytes()
                                                  + shards[1].state[0]["exp_avg_sq"].tobytes())
