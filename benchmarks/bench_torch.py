"""Optimizer step time on real torch models: ch8fast.torch against torch.optim's fused and
foreach CPU paths, 1 and 2 threads, in one run.

    python benchmarks/bench_torch.py [--rounds 30] [--rules sgd,adam,...] [--models small]

Models: a 0.1 M-parameter CNN (5 convolutions with batch norm and a linear head: 17
tensors), a small transformer encoder (2 layers, d_model 64: 27 tensors, 0.13 M
parameters), a ResNet-18-like network (the ImageNet layout: 62 tensors, 11.7 M
parameters) and a 24-layer transformer encoder (291 tensors, 6.8 M parameters).
Gradients are set once; after two warm-up steps each the contenders step in turn, one step
per round for ``--rounds`` rounds (the order rotated every round), so that each ratio
compares steps taken moments apart; times are medians. ``x`` is the contender's time over
ch8fast.torch's (above 1: ch8fast is faster). torch has no fused CPU RMSprop or Adadelta:
their baseline is foreach.

``python`` is ch8fast.torch's per-step Python time: its checks of the gradients (the
bindings it keeps from step to step, ``_Plan.addresses``) and torch's step wrapper (hooks,
profiler record), which every torch.optim optimizer pays too; the rest of its step is the
kernels.
The load average is printed before and after (the machine is shared: rerun when high).
"""
import argparse
import os
import statistics
import time

import torch
from torch import nn

import ch8fast
import ch8fast.torch as ct
from ch8fast.apps.bench.report import machine_line


class Block(nn.Module):
    """A ResNet basic block: two 3x3 convolutions with batch norm, and a shortcut."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


def resnet18():
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000)]
    return nn.Sequential(*layers)


def transformer():
    layer = nn.TransformerEncoderLayer(d_model=128, nhead=4, dim_feedforward=512,
                                       batch_first=True)
    return nn.Sequential(nn.Embedding(8000, 128),
                         nn.TransformerEncoder(layer, num_layers=24,
                                               enable_nested_tensor=False),
                         nn.Linear(128, 8000))


def small_cnn():
    layers, cin = [], 3
    for cout in (16, 32, 64, 64, 64):
        layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU()]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)]
    return nn.Sequential(*layers)


def small_transformer():
    layer = nn.TransformerEncoderLayer(d_model=64, nhead=4, dim_feedforward=128,
                                       batch_first=True)
    return nn.Sequential(nn.Embedding(500, 64),
                         nn.TransformerEncoder(layer, num_layers=2,
                                               enable_nested_tensor=False),
                         nn.Linear(64, 500))


MODELS = {"small": (("CNN 0.1M", small_cnn), ("transformer 0.13M", small_transformer)),
          "large": (("ResNet-18-like", resnet18), ("transformer 6.8M", transformer))}

RULES = {  # (torch class, its keywords, whether torch has a fused CPU kernel)
    "sgd": ("SGD", dict(lr=1e-2, momentum=0.9), True),
    "adam": ("Adam", dict(lr=1e-3), True),
    "adamw": ("AdamW", dict(lr=1e-3), True),
    "adagrad": ("Adagrad", dict(lr=1e-2), True),
    "rmsprop": ("RMSprop", dict(lr=1e-3), False),
    "adadelta": ("Adadelta", dict(lr=1.0), False),
}


def contenders(rule):
    name, kw, fused = RULES[rule]
    theirs, ours = getattr(torch.optim, name), getattr(ct, name)
    out = [("torch foreach", lambda p: theirs(p, foreach=True, **kw))]
    if fused:
        out.insert(0, ("torch fused", lambda p: theirs(p, fused=True, **kw)))
    out.append(("ch8fast.torch", lambda p: ours(p, **kw)))
    if fused:
        out.append(("ch8fast.torch fused=True", lambda p: ours(p, fused=True, **kw)))
    return out


def time_round_robin(opts, rounds):
    for opt in opts.values():
        opt.step()
        opt.step()
    names = list(opts)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            opts[k].step()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


class _Empty(torch.optim.Optimizer):
    """An optimizer whose step does nothing: the cost of torch's step wrapper (hooks,
    profiler record) that every torch.optim step pays."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self, closure=None):
        return None


def python_time(opt, rounds):
    """ch8fast.torch's per-step Python time: its checks of the bound gradients (the plan
    it reuses) plus torch's step wrapper; the rest of a step is its kernels."""
    plan, empty = opt._plan, _Empty(opt.param_groups[0]["params"])
    checks, wrapper = [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        plan.addresses(opt)
        t1 = time.perf_counter()
        empty.step()
        wrapper.append(time.perf_counter() - t1)
        checks.append(t1 - t0)
    return statistics.median(checks) + statistics.median(wrapper)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--models", default="small,large", help="small, large or both")
    args = ap.parse_args(argv)
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    torch.manual_seed(0)
    print(f"Machine: {machine_line()} before")
    for which in args.models.split(","):
        for model_name, make_model in MODELS[which]:
            model = make_model()
            params = [p for p in model.parameters()]
            for p in params:
                p.grad = torch.randn_like(p) * 1e-3
            n = sum(p.numel() for p in params)
            print(f"\n{model_name}: {len(params)} tensors, {n / 1e6:.2f} M parameters")
            for rule in args.rules.split(","):
                for threads in (int(t) for t in args.threads.split(",")):
                    torch.set_num_threads(threads)
                    ch8fast.set_num_threads(threads)
                    opts = {name: mk(params) for name, mk in contenders(rule)}
                    res = time_round_robin(opts, args.rounds)
                    base = res["ch8fast.torch"]
                    python = python_time(opts["ch8fast.torch"], args.rounds)
                    row = "  ".join(f"{k} {v * 1e6:8.1f} us ({v / base:4.2f}x)"
                                    for k, v in res.items())
                    plural = "s" if threads > 1 else " "
                    print(f"  {rule:8s} {threads} thread{plural}: {row}"
                          f"  python {python * 1e6:5.1f} us")
    ch8fast.set_num_threads(0)
    print(f"\n(x: time / ch8fast.torch's time; above 1 means ch8fast is faster)\n"
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
