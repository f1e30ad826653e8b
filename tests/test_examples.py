"""The examples/ scripts run and print what they claim."""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torch_inplace_example():
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "torch_inplace.py")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "parameters moved in memory: False" in proc.stdout
    m = re.search(r"max \|ch8fast - torch.optim.Adam\| over all parameters after 300 steps: "
                  r"(\S+)", proc.stdout)
    assert m and float(m.group(1)) < 1e-4
    m = re.search(r"loss: first step (\S+), last step (\S+)", proc.stdout)
    assert float(m.group(2)) < 0.5 * float(m.group(1))
    assert "ok: ch8fast trained the torch model in place" in proc.stdout


def test_torch_digits_example_reaches_torch_accuracy():
    """A short run of the CNN example: ch8fast.torch.Adam trains it to the accuracy of
    torch.optim.Adam (fused=True: the same parameters, bit for bit)."""
    pytest.importorskip("torch")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "torch_digits.py"),
                           "--epochs", "3", "--fused"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    m = re.search(r"ch8fast.torch.Adam (\S+), torch.optim.Adam (\S+); max \|parameter "
                  r"difference\| (\S+)", proc.stdout)
    assert m, proc.stdout
    ours, theirs, diff = float(m.group(1)), float(m.group(2).rstrip(";")), float(m.group(3))
    assert ours == theirs and diff == 0.0
    assert ours > 0.9
