"""Lazy Adam on row-sparse gradients against torch.optim.SparseAdam, on the gradients of a
real ``torch.nn.Embedding(sparse=True)`` (skipped without torch). SparseAdam adds eps to
sqrt(r) before the bias correction, so it is ch8fast's Adam with ``convention="sklearn"``;
the default convention (eps after the bias correction, as torch.optim.Adam) differs."""

import numpy as np
import pytest

import ch8fast
from conftest import assert_close

torch = pytest.importorskip("torch", reason="the cross-check against SparseAdam needs torch")

N_ROWS, DIM, BATCH, N_STEPS, LR = 60, 8, 24, 20, 1e-2


def _train_both(dtype, convention):
    """20 steps of SparseAdam on an embedding table and of ch8fast's lazy Adam on a copy,
    both from torch's gradients: the coalesced indices and values as ``SparseRows``
    (duplicate lookups summed by torch, so both sides see the same rows)."""
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    torch.manual_seed(0)
    emb = torch.nn.Embedding(N_ROWS, DIM, sparse=True).to(tdtype)
    table = emb.weight.detach().numpy().copy()            # ours: not shared with torch
    theirs = torch.optim.SparseAdam(emb.parameters(), lr=LR)
    ours = ch8fast.Adam([table], lr=LR, convention=convention)
    assert ours.sparse == "lazy"
    gen = torch.Generator().manual_seed(1)
    for _ in range(N_STEPS):
        idx = torch.randint(0, N_ROWS, (BATCH,), generator=gen)   # repeats: duplicates
        target = torch.randn(BATCH, DIM, generator=gen, dtype=tdtype)
        theirs.zero_grad()
        ((emb(idx) - target) ** 2).mean().backward()
        grad = emb.weight.grad.coalesce()
        rows, values = grad.indices()[0].numpy().copy(), grad.values().numpy().copy()
        assert values.dtype == dtype and len(rows) < N_ROWS
        theirs.step()
        ours.step([ch8fast.SparseRows(rows, values)])
    st = theirs.state[emb.weight]
    return ((table, ours.state[0]["exp_avg"], ours.state[0]["exp_avg_sq"]),
            (emb.weight.detach().numpy(), st["exp_avg"].to_dense().numpy(),
             st["exp_avg_sq"].to_dense().numpy()))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lazy_adam_sklearn_convention_equals_sparse_adam(dtype):
    ours, theirs = _train_both(dtype, "sklearn")
    # Same formulas, different order of operations (SparseAdam updates the moments as
    # s + (1 - beta1)(g - s) and forms its step size in its own way), so equal to
    # rounding, not bit for bit: a few ulps per step over 20 steps stay far below 1e-12
    # relative in float64 and 1e-6 in float32 (about 8 ulps). Measured, relative to the
    # largest entry: 3e-16 in float64; in float32 6e-8 (parameters), 2e-7 (moments).
    for what, a, b in zip(("param", "exp_avg", "exp_avg_sq"), ours, theirs):
        assert_close(a, b, dtype, what)


def test_the_default_convention_is_not_sparse_adams():
    """eps added after the bias correction (the default, as torch.optim.Adam) moves the
    parameters differently from SparseAdam by far more than rounding."""
    (table, _, _), (ref, _, _) = _train_both(np.float64, "book")
    assert np.max(np.abs(table - ref)) > 1e-6 * np.max(np.abs(ref))
