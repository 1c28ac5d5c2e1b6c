"""Where the time of one ``register()`` call goes: phases, operations and kernel launches.

Issue 6's end-to-end target (one 512 x 512 pair in 20 ms on a GPU) is likely
bound by launches rather than bytes: a 512^2 float32 pair is 2 MiB, read in
well under a millisecond, while each PyTorch operation costs microseconds of
Python and launch time.  This script splits one registration into its phases
(the input checks and normalisation, the initialiser, building the pyramid
levels, the metric evaluations, and the optimiser's own bookkeeping, which is
the rest) and prints, for each, the wall time and the number of operations
that do work (aten operations other than views and metadata on the CPU; kernel
launches, counted where the CUDA runtime is called, on a GPU).

It wraps three private functions of :mod:`tireg.register` in
``torch.profiler.record_function`` labels: a profiling aid, not an API.

Run:
    python benchmarks/profile_register.py                    # CPU, 512^2, one thread
    python benchmarks/profile_register.py --device cuda --size 512 256
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import iteration  # benchmarks/iteration.py: the device synchroniser of the step timings
import tireg

register_module = importlib.import_module("tireg.register")

#: Phases: the private function of ``tireg.register`` each one wraps.
PHASES = {"initialise": "_initial_matrix", "pyramid levels": "_make_level"}
EVALUATE = "evaluate"  # _Problem.evaluate

#: aten operations that launch nothing themselves (views, metadata, allocation, a scalar read, and
#: wrappers such as ``to`` or ``contiguous`` whose copy, where there is one, is an operation of its own).
TRANSPARENT = {
    "aten::view", "aten::unsqueeze", "aten::squeeze", "aten::select", "aten::reshape", "aten::slice",
    "aten::expand", "aten::narrow", "aten::transpose", "aten::permute", "aten::flatten", "aten::unflatten",
    "aten::detach", "aten::detach_", "aten::lift_fresh", "aten::diagonal", "aten::t", "aten::alias",
    "aten::as_strided", "aten::movedim", "aten::resolve_conj", "aten::resolve_neg", "aten::is_nonzero",
    "aten::item", "aten::_local_scalar_dense", "aten::unbind", "aten::split", "aten::split_with_sizes",
    "aten::chunk", "aten::view_as", "aten::expand_as", "aten::_reshape_alias", "aten::_unsafe_view", "aten::contiguous",
    "aten::to", "aten::empty", "aten::empty_like", "aten::new_empty", "aten::empty_strided",
    "aten::result_type", "aten::real", "aten::view_as_real", "aten::view_as_complex",
}


def _pair(size: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``size^2`` crop-free pair of the bundled camera image: moving = fixed under a known similarity."""
    from tireg.data import camera

    image = torch.nn.functional.interpolate(camera()[None, None], size=(size, size), mode="bilinear",
                                            align_corners=False)
    center = tireg.image_center(size, size)
    truth = tireg.transforms.similarity_matrix(torch.tensor([0.3, 1.05, 0.03 * size, -0.02 * size]), center)
    moving = tireg.warp(image, torch.linalg.inv(truth), padding_mode="border")
    return image.to(device), moving.to(device)


def _labelled(function, label: str):
    def wrapper(*args, **kwargs):
        with record_function(label):
            return function(*args, **kwargs)
    return wrapper


def _is_launch(event) -> bool:
    name = event.name
    return name.startswith(("cudaLaunch", "cuLaunch", "cudaMemcpy", "cudaMemset", "cudaGraphLaunch"))


def _ancestors(event):
    """The profiler events that enclose ``event``, innermost first."""
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def _work(events, cuda: bool) -> list:
    """The events that do work: kernel launches (CUDA); on the CPU the outermost aten operations
    that are not :data:`TRANSPARENT` (an operation inside a counted one is part of it)."""
    if cuda:
        return [event for event in events if _is_launch(event)]

    def counts(event) -> bool:
        return event.name.startswith("aten::") and event.name not in TRANSPARENT

    return [event for event in events if counts(event) and not any(map(counts, _ancestors(event)))]


def _phase_of(event, labels: set[str]) -> str:
    return next((parent.name for parent in _ancestors(event) if parent.name in labels), "other")


def profile_once(fixed, moving, options: dict, device: str) -> tuple[dict, dict, int, int]:
    """``{phase: work count}``, ``{phase: seconds}``, the evaluations and the iterations of one profiled call."""
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        result = tireg.register(fixed, moving, **options)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    labels = set(PHASES) | {EVALUATE}
    counts = {label: 0 for label in [*PHASES, EVALUATE, "other"]}
    for event in _work(events, cuda):
        counts[_phase_of(event, labels)] += 1
    seconds = {label: sum(event.cpu_time_total for event in events if event.name == label) / 1e6
               for label in labels}
    evaluations = sum(event.name == EVALUATE for event in events)
    return counts, seconds, evaluations, int(result.iterations.sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, nargs="+", default=[512])
    parser.add_argument("--transform", default="affine")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default="auto")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls after two warm-ups (the median counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    compile = {"auto": "auto", "true": True, "false": False}[args.compile]
    options = dict(transform=args.transform, compile=compile)
    for label, name in PHASES.items():
        setattr(register_module, name, _labelled(getattr(register_module, name), label))
    register_module._Problem.evaluate = _labelled(register_module._Problem.evaluate, EVALUATE)
    synchronize = iteration.synchronizer(args.device)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} thread(s)"
    unit = "kernel launches" if args.device.startswith("cuda") else "aten ops that do work"
    print(f"tireg {tireg.__version__}, torch {torch.__version__}, {name}; register(transform={args.transform!r}, "
          f"compile={compile!r})\n")
    print(f"| size | wall ms (median) | iterations | {unit}: total | initialise | pyramid levels "
          "| evaluations | per evaluation | other | evaluate ms | initialise ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.size:
        fixed, moving = _pair(size, args.device)
        for _ in range(2):
            tireg.register(fixed, moving, **options)
        synchronize()
        times = []
        for _ in range(args.repeats):
            synchronize()
            started = time.perf_counter()
            tireg.register(fixed, moving, **options)
            synchronize()
            times.append(time.perf_counter() - started)
        counts, seconds, evaluations, iterations = profile_once(fixed, moving, options, args.device)
        print(f"| {size}² | {statistics.median(times) * 1e3:.1f} | {iterations} | {sum(counts.values())} "
              f"| {counts['initialise']} | {counts['pyramid levels']} | {counts[EVALUATE]} ({evaluations}) "
              f"| {counts[EVALUATE] / max(evaluations, 1):.0f} | {counts['other']} "
              f"| {seconds[EVALUATE] * 1e3:.1f} | {seconds['initialise'] * 1e3:.1f} |", flush=True)


if __name__ == "__main__":
    main()
