"""Every kernel build (baseline, AVX2, AVX-512) gives the same bits; the hot loops are
vectorized."""

import re
import shutil
import subprocess

import numpy as np
import pytest

import ch8fast
from ch8fast import _isa
from conftest import CONFIGS, random_problem


def test_the_widest_available_isa_is_used():
    avail = _isa.available()
    assert "baseline" in avail
    assert ch8fast.isa() == avail[0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,ref_name,hyper", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_same_bits_on_every_isa(name, cls, ref_name, hyper, dtype):
    results = {}
    for isa in _isa.available():
        _isa.use(isa)
        params, grads = random_problem([(1003,), (5, 7)], dtype, seed=7, n_steps=4)
        opt = cls(params, clip_value=1.5, **hyper)
        for g in grads:
            opt.step(g)
        results[isa] = [p.tobytes() for p in params]
    assert len({tuple(v) for v in results.values()}) == 1, list(results)


@pytest.fixture(autouse=True)
def _restore_isa():
    """Each test leaves the loops of the widest instruction set in use."""
    before = ch8fast.isa()
    yield
    _isa.use(before)


def _disassembly(isa):
    path = _isa.load(isa).__file__
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                          capture_output=True, text=True, check=True).stdout


PROFILE_CONFIGS = [
    ("sgd_torch_fused", ch8fast.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1,
                                          weight_decay=0.01, convention="torch_fused")),
    ("nesterov_torch", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                         convention="torch")),
    ("sgd_keras", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                    weight_decay=0.01, convention="keras")),
    ("sgd_optax", ch8fast.SGD, dict(lr=0.05, momentum=0.9, nesterov=True,
                                    convention="optax")),
    ("adam_torch_fused", ch8fast.Adam, dict(lr=0.01, betas=(0.3, 0.9), amsgrad=True,
                                            weight_decay=0.1, maximize=True,
                                            convention="torch_fused")),
    ("adamw_keras", ch8fast.AdamW, dict(lr=0.01, convention="keras")),
    ("rmsprop_torch", ch8fast.RMSProp, dict(lr=0.01, momentum=0.5, centered=True,
                                            convention="torch")),
    ("rmsprop_optax", ch8fast.RMSProp, dict(lr=0.01, momentum=0.5, nesterov=True,
                                            centered=True, convention="optax")),
    ("adagrad_torch", ch8fast.AdaGrad, dict(lr=0.1, lr_decay=0.1, convention="torch")),
    ("adagrad_keras", ch8fast.AdaGrad, dict(lr=0.1, convention="keras")),
    ("adadelta_torch", ch8fast.AdaDelta, dict(lr=1.0, weight_decay=0.1,
                                              convention="torch")),
]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,cls,hyper", PROFILE_CONFIGS, ids=[c[0] for c in PROFILE_CONFIGS])
def test_profiles_same_bits_on_every_isa(name, cls, hyper, dtype):
    """The formula profiles too, fused multiply-adds included (C99 fma is rounded once on
    every build: an instruction with -mfma and AVX-512, the libm function on the
    baseline)."""
    results = {}
    for isa in _isa.available():
        _isa.use(isa)
        params, grads = random_problem([(1003,), (5, 7), (13,)], dtype, seed=7, n_steps=4)
        opt = cls(params, **hyper)
        for g in grads:
            opt.step(g)
        results[isa] = [p.tobytes() for p in params]
    assert len({tuple(v) for v in results.values()}) == 1, list(results)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_wide_modules_inline_fused_multiply_adds():
    """The AVX2 module is built with -mfma and the AVX-512 one has FMA: torch's profile
    runs packed vfmadd instructions there, with no call to the libm fma function (which
    would also keep its loops scalar)."""
    for isa in _isa.available():
        if isa == "baseline":
            continue
        asm = _disassembly(isa)
        packed = re.findall(r"\svfn?m(?:add|sub)\d+p[sd]\s", asm)
        assert len(packed) > 50, isa
        assert not [line for line in asm.splitlines()
                    if "call" in line and "<fma" in line], isa


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_adam_loop_uses_packed_square_roots():
    """The build vectorizes sqrt (it needs -fno-math-errno): packed sqrtps/sqrtpd, and no
    calls to the scalar sqrt function, in every kernel module."""
    for isa in _isa.available():
        asm = _disassembly(isa)
        assert "sqrtps" in asm and "sqrtpd" in asm, isa
        assert "call" not in "".join(ln for ln in asm.splitlines() if "<sqrt" in ln), isa
        if isa == "avx512":
            assert "zmm" in asm


_NO_WIDE_CPU = r"""
import importlib.machinery, importlib.util, sys, pathlib
pkg = pathlib.Path(sys.argv[1])
path = next(pkg.glob("_core.*.so"), None) or next(pkg.glob("_core.*.pyd"))
loader = importlib.machinery.ExtensionFileLoader("ch8fast._core", str(path))
spec = importlib.util.spec_from_file_location("ch8fast._core", path, loader=loader)
core = importlib.util.module_from_spec(spec)
loader.exec_module(core)
core.cpu_supports = lambda isa: isa == "baseline"     # a CPU without AVX2 or AVX-512
sys.modules["ch8fast._core"] = core

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.startswith("ch8fast._kernels_"):
            raise SystemExit(f"imported {name} on a CPU that cannot run it")
sys.meta_path.insert(0, Refuse())
import ch8fast
ch8fast.set_num_threads(1)
print(ch8fast.isa(), ch8fast._isa.available())
"""


def test_wider_modules_are_not_imported_on_a_cpu_without_them():
    """A module built for AVX-512 may execute AVX-512 instructions as soon as it is loaded,
    so the CPU is asked (by ch8fast._core, built for the baseline) before a wider module is
    imported."""
    import os
    import sys
    pkg = os.path.dirname(ch8fast.__file__)
    r = subprocess.run([sys.executable, "-c", _NO_WIDE_CPU, pkg], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "CH8FAST_ISA": ""})
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.split() == ["baseline", "['baseline']"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicate_sums_same_bits_on_every_isa(dtype):
    """The sums of a row-sparse gradient's duplicates (the one-pass sum where it is exact,
    the sort elsewhere: both run in the loops of each instruction set)."""
    rng = np.random.default_rng(3)
    k, d, n_rows = 2000, 37, 40
    idx = rng.zipf(1.3, k).astype(np.int64) % n_rows
    idx[:300] = 0                                      # one row many times
    vals = rng.standard_normal((k, d)) * 10.0 ** rng.integers(-12, 12, (k, d))
    vals[7, 3], vals[11, 5] = np.inf, np.nan
    vals = vals.astype(dtype)
    results = {}
    for isa in _isa.available():
        _isa.use(isa)
        rows, summed = ch8fast.sparse.sum_duplicates(idx, vals, n_rows)
        results[isa] = (rows.tobytes(), summed.tobytes())
    assert len(set(results.values())) == 1, list(results)
