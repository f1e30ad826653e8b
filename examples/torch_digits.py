"""Train a small CNN on the embedded UCI digits with ch8fast.torch.Adam and with
torch.optim.Adam, from the same initialization on the same minibatches, and compare.

``ch8fast.torch.Adam`` is a drop-in torch optimizer: the training loop is torch's own
(zero_grad, backward, step, a learning-rate scheduler). With ``fused=True`` both follow
torch's fused CPU kernel, so the two runs stay bit for bit equal; without it they agree to
rounding (torch's non-fused path takes MKL's square root).

    python examples/torch_digits.py [--epochs 15] [--fused]
"""
import argparse
import copy

import numpy as np
import torch
from torch import nn

import ch8fast.torch as ct
from ch8fast.apps.demo import load_dataset



def load_digits():
    """The 1,797 8x8 digits as float32 images in [0, 1], split 1,437 / 360."""
    X, y, _, _ = load_dataset()            # the digits embedded in ch8fast.apps
    x = torch.from_numpy(X.astype(np.float32).reshape(-1, 1, 8, 8) / 16.0)
    y = torch.from_numpy(y.astype(np.int64))
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def make_model():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def train(model, opt, train_set, epochs, batch=64):
    x, y = train_set
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    loss_fn = nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(1)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for k in range(0, len(y), batch):
            idx = order[k:k + batch]
            opt.zero_grad()
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()


@torch.no_grad()
def accuracy(model, test_set):
    x, y = test_set
    return float((model(x).argmax(1) == y).float().mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--fused", action="store_true",
                    help="both optimizers with fused=True (bit for bit equal)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    train_set, test_set = load_digits()
    ours = make_model()
    theirs = copy.deepcopy(ours)
    kw = dict(lr=3e-3, weight_decay=1e-4, fused=True if args.fused else None)
    train(ours, ct.Adam(ours.parameters(), **kw), train_set, args.epochs)
    train(theirs, torch.optim.Adam(theirs.parameters(), **kw), train_set, args.epochs)
    a, b = accuracy(ours, test_set), accuracy(theirs, test_set)
    diff = max(float((p.detach() - q.detach()).abs().max())
               for p, q in zip(ours.parameters(), theirs.parameters()))
    print(f"test accuracy after {args.epochs} epochs: ch8fast.torch.Adam {a:.4f}, "
          f"torch.optim.Adam {b:.4f}; max |parameter difference| {diff:.3g}")
    return a, b, diff


if __name__ == "__main__":
    main()
