"""Every kernel build (baseline, AVX2, AVX-512) gives the same bits; the hot loops are
vectorized."""

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
def test_same_bits_on_every_isa(name, cls, ref_name, hyper, dtype, monkeypatch):
    from ch8fast import optim
    results = {}
    for isa in _isa.available():
        monkeypatch.setattr(optim, "K", _isa.load(isa))
        params, grads = random_problem([(1003,), (5, 7)], dtype, seed=7, n_steps=4)
        opt = cls(params, clip_value=1.5, **hyper)
        for g in grads:
            opt.step(g)
        results[isa] = [p.tobytes() for p in params]
    assert len({tuple(v) for v in results.values()}) == 1, list(results)


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_adam_loop_uses_packed_square_roots():
    """The build vectorizes sqrt (it needs -fno-math-errno): packed sqrtps/sqrtpd, and no
    calls to the scalar sqrt function, in every kernel module."""
    for isa in _isa.available():
        path = _isa.load(isa).__file__
        asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path],
                             capture_output=True, text=True, check=True).stdout
        assert "sqrtps" in asm and "sqrtpd" in asm, isa
        assert "call" not in "".join(ln for ln in asm.splitlines() if "<sqrt" in ln), isa
        if isa == "avx512":
            assert "zmm" in asm


_NO_WIDE_CPU = r"""
import importlib.machinery, importlib.util, sys, pathlib
pkg = pathlib.Path(sys.argv[1])
path = next(pkg.glob("_kernels.*.so"), None) or next(pkg.glob("_kernels.*.pyd"))
loader = importlib.machinery.ExtensionFileLoader("ch8fast._kernels", str(path))
spec = importlib.util.spec_from_file_location("ch8fast._kernels", path, loader=loader)
base = importlib.util.module_from_spec(spec)
loader.exec_module(base)
base.cpu_supports = lambda isa: isa == "baseline"     # a CPU without AVX2 or AVX-512
sys.modules["ch8fast._kernels"] = base

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
    so the CPU is asked (by the baseline module) before a wider module is imported."""
    import os
    import sys
    pkg = os.path.dirname(ch8fast.__file__)
    r = subprocess.run([sys.executable, "-c", _NO_WIDE_CPU, pkg], capture_output=True,
                       text=True, timeout=120, env={**os.environ, "CH8FAST_ISA": ""})
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.split() == ["baseline", "['baseline']"]
