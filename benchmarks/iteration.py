"""Time one optimisation step of the analytic and the autograd model on the same data.

A step is: forward, gradient, ``optimizer.step()``, ``zero_grad()``.  The
autograd step is the seed's loop (``model(moving)``, sum of the per-pixel
loss, ``backward()``); the analytic step is ``model(moving, fixed)``, which
writes the gradients itself.  Both models are tireg's ready-made models for
the same transform, loss and padding, at the same parameters.

For reference a third step, "plain autograd", is the textbook loop the seed
and most PyTorch registration code write: ``F.affine_grid`` on the
normalised matrix, ``F.grid_sample``, the loss, ``backward()`` (tireg's own
autograd model builds its grid from a separable pixel grid instead).

The steps alternate in rounds (so that load on a shared machine hits them
alike) and the median per step is reported with the ratios, measured in the
same run.

Run:  python benchmarks/iteration.py [--device cpu|cuda] [--sizes 256 1024] [--batches 1 16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import tireg


def make_step(model, moving, fixed, loss, kind: str):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    size = moving.shape[-2:]
    normalize = tireg.transforms.normalization_matrix(size, dtype=moving.dtype, device=moving.device)
    denormalize = torch.linalg.inv(normalize)

    def analytic_step():
        model(moving, fixed)
        optimizer.step()
        optimizer.zero_grad()

    def autograd_step():
        total = loss(model(moving), fixed).sum()
        total.backward()
        optimizer.step()
        optimizer.zero_grad()

    def plain_autograd_step():
        theta = (normalize @ model.matrix(moving.shape[0]) @ denormalize)[:, :2]
        grid = torch.nn.functional.affine_grid(theta, list(moving.shape), align_corners=False)
        warped = torch.nn.functional.grid_sample(moving, grid, align_corners=False)
        total = loss(warped, fixed).sum()
        total.backward()
        optimizer.step()
        optimizer.zero_grad()

    return {"analytic": analytic_step, "autograd": autograd_step, "plain autograd": plain_autograd_step}[kind]


def captured_step(model, moving, fixed):
    """The analytic step (forward writing the gradients, Adam step) captured as one CUDA graph.

    PyTorch's whole-network capture: Adam with ``capturable=True`` (its step count on the
    device), three warm-up steps on a side stream, the gradients set to ``None`` so that the
    captured forward assigns them, then one capture; each call replays it, one launch.  Capture
    fails if anything in the step waits for the device (tests/test_models.py checks there is
    nothing).  Returns ``(replay, check)``; ``check()`` replays once and takes the same step
    eagerly from the same state, and returns the largest difference of the parameters (the
    state is put back after each).
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)

    def step():
        model(moving, fixed)
        optimizer.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    # the graph reads tireg's cached constants by address: keep every one alive with it (the cache
    # drops its oldest entries, and freed memory reused under a replay gives silently wrong steps)
    kept = list(tireg._device._cache.values())
    params = list(model.parameters())

    def state() -> list[torch.Tensor]:
        tensors = [param.detach() for param in params]
        for param in params:
            tensors += [value for value in optimizer.state[param].values() if isinstance(value, torch.Tensor)]
        return tensors

    def check() -> float:
        saved = [tensor.clone() for tensor in state()]
        graph.replay()
        replayed = [param.detach().clone() for param in params]
        for tensor, value in zip(state(), saved):
            tensor.copy_(value)
        for param in params:  # the graph's gradients, zeroed in place: the eager step adds to them
            param.grad.zero_()
        step()
        difference = max(float((param.detach() - value).abs().max()) for param, value in zip(params, replayed))
        for tensor, value in zip(state(), saved):
            tensor.copy_(value)
        return difference

    def replay() -> None:
        graph.replay()

    replay.kept = kept  # held as long as the replay function is
    return replay, check


def timed(step, repeats: int, synchronize) -> float:
    synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    synchronize()
    return (time.perf_counter() - start) / repeats


def measure(size: int, batch: int, transform: str, device: str, budget: float) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand(batch, 1, size, size, generator=generator).to(device)
    moving = torch.rand(batch, 1, size, size, generator=generator).to(device)
    loss = tireg.L2Loss()
    steps = {}
    for name in ("analytic", "autograd", "plain autograd"):
        gradients = "analytic" if name == "analytic" else "autograd"
        model = tireg.create_model(transform, moving, gradients=gradients, loss=loss, compile=False)
        steps[name] = make_step(model, moving, fixed, loss, name)
    return median_rounds(steps, budget, synchronizer(device))


def synchronizer(device: str):
    """``torch.cuda.synchronize`` on a GPU (timings must wait for the device), else nothing."""
    return torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)


def median_rounds(steps: dict, budget: float, synchronize) -> dict[str, float]:
    """Seconds per call of each step: medians over rounds that alternate the steps (after a warm-up)."""
    for step in steps.values():  # warm-up (a compiled step compiles here)
        for _ in range(3):
            step()
    single = max(timed(step, 1, synchronize) for step in steps.values())
    repeats = max(1, min(50, int(0.05 / max(single, 1e-6))))
    samples = {name: [] for name in steps}
    deadline = time.perf_counter() + budget
    rounds = 0
    while rounds < 5 or (time.perf_counter() < deadline and rounds < 200):
        for name, step in steps.items():
            samples[name].append(timed(step, repeats, synchronize))
        rounds += 1
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--transforms", nargs="+", default=["similarity", "affine"])
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"tireg {tireg.__version__}, torch {torch.__version__}, {name}; one Adam step, L2 loss, float32")
    print("| size | B | transform | analytic [ms] | autograd [ms] | plain autograd [ms] "
          "| analytic / autograd | analytic / plain autograd |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        for batch in args.batches:
            for transform in args.transforms:
                t = measure(size, batch, transform, args.device, args.budget)
                analytic, autograd, plain = t["analytic"], t["autograd"], t["plain autograd"]
                print(
                    f"| {size}² | {batch} | {transform} | {analytic * 1e3:.3f} | {autograd * 1e3:.3f} "
                    f"| {plain * 1e3:.3f} | {analytic / autograd:.2f} | {analytic / plain:.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
