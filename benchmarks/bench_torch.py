"""Optimizer step time on real torch models: ch8fast.torch against torch.optim's fused and
foreach CPU paths, 1 and 2 threads, in one run.

    python benchmarks/bench_torch.py [--repeat 20] [--rules adam,sgd]

Models: a ResNet-18-like network (the ImageNet layout: 62 tensors, 11.7 M parameters) and
a small transformer encoder (24 layers: 294 tensors, 4.8 M parameters). Gradients are set
once; each contender steps the same parameters ``--repeat`` times after two warm-up steps;
the median is reported, with the ratio torch / ch8fast (above 1: ch8fast is faster) and
the load average (the machine is shared: rerun when it is high).
"""
import argparse
import os
import statistics
import time

import torch
from torch import nn

import ch8fast
import ch8fast.torch as ct


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


def contenders(rule):
    if rule == "adam":
        kw = dict(lr=1e-3)
        return [("torch fused", lambda p: torch.optim.Adam(p, fused=True, **kw)),
                ("torch foreach", lambda p: torch.optim.Adam(p, foreach=True, **kw)),
                ("ch8fast.torch", lambda p: ct.Adam(p, **kw)),
                ("ch8fast.torch fused=True", lambda p: ct.Adam(p, fused=True, **kw))]
    kw = dict(lr=1e-2, momentum=0.9)
    return [("torch fused", lambda p: torch.optim.SGD(p, fused=True, **kw)),
            ("torch foreach", lambda p: torch.optim.SGD(p, foreach=True, **kw)),
            ("ch8fast.torch", lambda p: ct.SGD(p, **kw)),
            ("ch8fast.torch fused=True", lambda p: ct.SGD(p, fused=True, **kw))]


def time_steps(make, params, repeat):
    opt = make(params)
    for _ in range(2):
        opt.step()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rules", default="adam,sgd")
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    torch.manual_seed(0)
    print(f"load average before: {os.getloadavg()}  ch8fast ISA: {ch8fast.isa()}  "
          f"torch {torch.__version__}")
    for model_name, make_model in (("ResNet-18-like", resnet18),
                                   ("transformer", transformer)):
        model = make_model()
        params = [p for p in model.parameters()]
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        n = sum(p.numel() for p in params)
        print(f"\n{model_name}: {len(params)} tensors, {n / 1e6:.1f} M parameters")
        for rule in args.rules.split(","):
            for threads in (int(t) for t in args.threads.split(",")):
                torch.set_num_threads(threads)
                ch8fast.set_num_threads(threads)
                res = {name: time_steps(mk, params, args.repeat)
                       for name, mk in contenders(rule)}
                base = res["ch8fast.torch"]
                row = "  ".join(f"{k} {v * 1e3:7.2f} ms ({v / base:4.2f}x)"
                                for k, v in res.items())
                print(f"  {rule:4s} {threads} thread{'s' if threads > 1 else ' '}: {row}")
    ch8fast.set_num_threads(0)
    print(f"\n(x: time / ch8fast.torch's time; above 1 means ch8fast is faster)\n"
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
