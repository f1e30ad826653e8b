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
        assert "call" not in "".join(l for l in asm.splitlines() if "<sqrt" in l), isa
        if isa == "avx512":
            assert "zmm" in asm
