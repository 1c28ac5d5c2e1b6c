"""Time one optimisation step of the analytic and the autograd model on the same data.

A step is: forward, gradient, ``optimizer.step()``, ``zero_grad()``.  The
autograd step is the seed's loop (``model(moving)``, sum of the per-pixel
loss, ``backward()``); the analytic step is ``model(moving, fixed)``, which
writes the gradients itself.  Both models are tireg's ready-made models for
the same transform, loss and padding, at the same parameters.

The two steps alternate in rounds (so that load on a shared machine hits
both alike) and the median per step is reported with the ratio
analytic / autograd, measured in the same run.

Run:  python benchmarks/iteration.py [--device cpu|cuda] [--sizes 256 1024] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tireg


def make_step(model, moving, fixed, loss, analytic: bool):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def analytic_step():
        model(moving, fixed)
        optimizer.step()
        optimizer.zero_grad()

    def autograd_step():
        total = loss(model(moving), fixed).sum()
        total.backward()
        optimizer.step()
        optimizer.zero_grad()

    return analytic_step if analytic else autograd_step


def timed(step, repeats: int, synchronize) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    return (time.perf_counter() - start) / repeats


def measure(size: int, batch: int, transform: str, device: str, budget: float) -> tuple[float, float]:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(batch, 1, size, size, generator=generator).to(device)
    moving = torch.rand(batch, 1, size, size, generator=generator).to(device)
    loss = tireg.L2Loss()
    steps = {}
    for name in ("analytic", "autograd"):
        model = tireg.create_model(transform, moving, gradients=name, loss=loss)
        steps[name] = make_step(model, moving, fixed, loss, analytic=name == "analytic")
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for step in steps.values():  # warm-up
        for _ in range(3):
            step()
    single = timed(steps["autograd"], 1, synchronize)
    repeats = max(1, min(50, int(0.05 / max(single, 1e-6))))
    samples = {name: [] for name in steps}
    deadline = time.perf_counter() + budget
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for name, step in steps.items():
            samples[name].append(timed(step, repeats, synchronize))
        rounds += 1
    return statistics.median(samples["analytic"]), statistics.median(samples["autograd"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--transforms", nargs="+", default=["similarity", "affine"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"tireg {tireg.__version__}, torch {torch.__version__}, {name}; one Adam step, L2 loss, float32")
    print("| size | B | transform | analytic [ms] | autograd [ms] | analytic / autograd |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        for batch in args.batches:
            for transform in args.transforms:
                analytic, autograd = measure(size, batch, transform, args.device, args.budget)
                print(
                    f"| {size}² | {batch} | {transform} | {analytic * 1e3:.3f} | {autograd * 1e3:.3f} "
                    f"| {analytic / autograd:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
