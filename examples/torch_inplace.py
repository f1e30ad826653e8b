"""ch8fast updating a PyTorch model's parameters in place, through shared memory.

A CPU tensor and the NumPy array from ``tensor.detach().numpy()`` share one buffer, so a
ch8fast optimizer built on those arrays writes its updates straight into the model: no
copies, and torch sees every step. PyTorch computes the gradients; ch8fast applies the
update rule. The script trains a small network on a toy regression this way, checks that
the parameters never moved in memory, and compares the result with torch.optim.Adam run
from the same initialization on the same minibatches.

    python examples/torch_inplace.py
"""
import copy

import numpy as np
import torch

import ch8fast


def make_data(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] * x[:, 2:3]
    return x, y


def train(model, x, y, step_fn, steps=300, batch=64):
    loss_fn = torch.nn.MSELoss()
    losses = []
    for k in range(steps):
        idx = torch.arange(k * batch, (k + 1) * batch) % len(x)
        model.zero_grad(set_to_none=False)
        loss = loss_fn(model(x[idx]), y[idx])
        loss.backward()
        step_fn()
        losses.append(loss.item())
    return losses


def main():
    torch.set_num_threads(1)          # a tiny model: threads cost more than they give
    torch.manual_seed(0)
    x, y = make_data()
    model = torch.nn.Sequential(torch.nn.Linear(8, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 1))
    reference = copy.deepcopy(model)          # same initial parameters, for torch.optim

    # The model's parameters as NumPy arrays that share memory with the tensors.
    params = [p.detach().numpy() for p in model.parameters()]
    assert all(np.shares_memory(a, p.detach().numpy()) for a, p in
               zip(params, model.parameters()))
    addresses = [p.data_ptr() for p in model.parameters()]
    opt = ch8fast.Adam(params, lr=1e-2)

    def ch8fast_step():
        # p.grad is a tensor that torch keeps (zero_grad(set_to_none=False)); its NumPy
        # view is a separate array from the parameter, as ch8fast requires.
        opt.step([p.grad.numpy() for p in model.parameters()])

    losses = train(model, x, y, ch8fast_step)

    ref_opt = torch.optim.Adam(reference.parameters(), lr=1e-2)
    ref_losses = train(reference, x, y, ref_opt.step)

    moved = [p.data_ptr() for p in model.parameters()] != addresses
    diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in
               zip(model.parameters(), reference.parameters()))
    print(f"loss: first step {losses[0]:.4f}, last step {losses[-1]:.4f} "
          f"(torch.optim.Adam: {ref_losses[-1]:.4f})")
    print(f"parameters moved in memory: {moved}")
    print(f"max |ch8fast - torch.optim.Adam| over all parameters after "
          f"{len(losses)} steps: {diff:.2e}")
    if moved or diff > 1e-4 or not losses[-1] < 0.5 * losses[0]:
        raise SystemExit("unexpected result")
    print("ok: ch8fast trained the torch model in place")


if __name__ == "__main__":
    main()
