"""How often ch8fast.torch's fused Adagrad and torch's differ at float64 when ``lr_decay``
is not 0: the share of elements not bit-equal after some steps, for several ``lr_decay``.

    python benchmarks/torch_adagrad_lr_decay.py [--steps 50] [--n 1013]

torch's fused CPU Adagrad computes the step size ``lr / (1 + (t - 1) lr_decay)`` in a way
that rounds differently at float64 for some ``t``; at float32 the two are bit for bit (and
at float64 with ``lr_decay=0``). A step size that rounds differently changes some elements'
update by one ulp, so the share depends on ``lr_decay`` and on the number of steps.
"""
import argparse

import torch

import ch8fast.torch as ct


def share(lr_decay, steps, n, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=g, dtype=dtype)
    p, q = torch.nn.Parameter(x.clone()), torch.nn.Parameter(x.clone())
    kw = dict(lr=0.1, lr_decay=lr_decay, weight_decay=0.1, fused=True)
    o1, o2 = ct.Adagrad([p], **kw), torch.optim.Adagrad([q], **kw)
    for _ in range(steps):
        grad = torch.randn(n, generator=g, dtype=dtype)
        p.grad, q.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    return float((p != q).double().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--n", type=int, default=1013)
    a = ap.parse_args(argv)
    print(f"| lr_decay | float64: elements that differ after {a.steps} steps | float32 |")
    print("|---:|---:|---:|")
    for d in (0.0, 1e-4, 1e-3, 0.01, 0.1, 0.5):
        print(f"| {d:g} | {100 * share(d, a.steps, a.n, torch.float64):.1f} % | "
              f"{100 * share(d, a.steps, a.n, torch.float32):.1f} % |")


if __name__ == "__main__":
    main()
