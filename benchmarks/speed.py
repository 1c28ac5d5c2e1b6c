"""Speed: tireg's analytic step (reference and compiled) against autograd and kornia, and register() end to end.

Three tables, measured in one run on one device, every figure a median of
interleaved rounds (so that load on a shared machine hits all alike):

1. **step**: one optimisation step (forward, gradient, Adam step) for the
   same model, loss (L2) and data: tireg's analytic model (reference
   kernels; and ``compile=True``, the fused kernel of :mod:`tireg.fused`),
   tireg's autograd model (``backward()``), and the same step written with
   kornia (``kornia.geometry.transform.warp_affine``, autograd, learning
   kornia's own source -> destination matrix), and tireg's autograd step
   under ``torch.compile`` (what compiling alone buys).  Pair-iterations per
   second and the ratios to the autograd step.  A compiled cell whose
   compile failed or ran out of memory (tireg then falls back to the
   reference path) shows ``nan``, not the reference path's time.
2. **register**: ``tireg.register`` on 256 x 256 affine pairs of
   ``benchmarks/accuracy.py`` (scenes, noise, contrast change), eager and
   compiled (compiled after one warm-up call; the compile time is printed
   apart), and with ``metric="ncc"`` (ECC's own criterion), against OpenCV's ``findTransformECCMultiScale``, SimpleITK and
   kornia's ``ImageRegistrator`` as ``accuracy.py`` runs them; plus tireg on
   512 x 512 pairs (the same cases at twice the resolution).  Seconds per pair
   (CPU time on the CPU, wall time on a GPU; after one untimed call of each
   method, the median of ``--repeats`` runs, pair by pair and method by method
   in turn; a method slower than 0.25 s a pair runs each pair once), success
   (< 0.5 px, ``accuracy.grid_error``) and the ratio to ECC.
3. **memory**: peak memory of two analytic steps of a new model, and of a
   ``register`` call (eager and compiled; and eager with ``metric="ncc"``,
   or the metrics of ``--memory-metrics``, each also in a model's steps),
   from just before the model or
   call is made, over the size of the input images: so what a model keeps
   between steps (the padded moving image, coordinate grids) counts, and
   the compile does not (it runs first on other tensors of the same shape).
   On a GPU the allocator's peak; on the CPU (Linux) the peak resident
   size, each cell in a fresh process (256² x 128 and 1024² x 8 pairs, 64
   MiB of input each, one 1024² pair, and one 4096² pair, 128 MiB: one
   large image, which chunks of pairs cannot split; ``--memory-cases``).

A method that runs out of GPU memory on a large batch shows ``nan`` (or a
row "out of memory") instead of ending the run.

Run:
    python benchmarks/speed.py                       # CPU, one thread (about 20 minutes)
    python benchmarks/speed.py --device cuda --batches 1 1024
    python benchmarks/speed.py --tables step         # one table
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
if __name__ == "__main__":  # before numpy and the peers start their thread pools (see accuracy.py)
    _threads = sys.argv[sys.argv.index("--threads") + 1] if "--threads" in sys.argv[:-1] else "1"
    for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        if _threads != "0":
            os.environ[_variable] = _threads

import numpy as np  # noqa: E402
import torch  # noqa: E402

import accuracy  # noqa: E402  (cases and peers, shared with the accuracy benchmark)
import iteration  # noqa: E402  (the analytic and autograd steps)
import tireg  # noqa: E402
from tireg.register import OPTIMIZERS  # noqa: E402


def kornia_step(moving: torch.Tensor, fixed: torch.Tensor, transform: str):
    """The same step as a kornia user writes it: kornia's own source (moving) -> destination (fixed)
    ``(B, 2, 3)`` pixel matrix learnt directly (for ``"affine"``; another kind the same matrix, as
    kornia has no parametrised kinds here), ``warp_affine``, L2, ``backward()``, Adam."""
    from kornia.geometry.transform import warp_affine

    size = moving.shape[-2:]
    matrix = torch.eye(3, dtype=moving.dtype, device=moving.device)[:2].repeat(moving.shape[0], 1, 1)
    matrix.requires_grad_(True)
    optimizer = torch.optim.Adam([matrix], lr=1e-3)

    def step():
        warped = warp_affine(moving, matrix, dsize=(int(size[0]), int(size[1])), align_corners=False)
        ((warped - fixed) ** 2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def compiled_autograd_step(moving: torch.Tensor, fixed: torch.Tensor, transform: str, loss):
    """tireg's autograd step with its forward and loss under ``torch.compile`` (backward through
    the compiled graph): what compiling the autograd path alone gives."""
    model = tireg.create_model(transform, moving, gradients="autograd", loss=loss)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total = torch.compile(lambda: loss(model(moving), fixed).sum())

    def step():
        total().backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def random_images(batch: int, size: int, device: str, count: int = 2) -> tuple[torch.Tensor, ...]:
    """``count`` images (``(fixed, moving)`` by default), uniform random, made on ``device`` by its own
    generator (on a GPU a CPU generator and a copy took seconds for a 1024 x 1024² batch)."""
    generator = torch.Generator(device).manual_seed(0)
    return tuple(torch.rand(batch, 1, size, size, generator=generator, device=device) for _ in range(count))


def fell_back(device: str) -> bool:
    """Whether tireg's compiled path failed on ``device`` in this process (compile error or out of
    memory): tireg then runs the reference path, which a "compiled" cell must not report."""
    return torch.device(device).type in tireg.fused._failed


# ----------------------------------------------------------------------------
# 1. the step


#: What a GPU raises when a batch does not fit (older torch: only the CUDA name).
OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _release(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _runnable(steps: dict, device: str) -> dict:
    """The steps that run once without running out of memory: on a GPU a large batch may fit one
    method and not another, and a row should report the others rather than end the run."""
    kept = {}
    for name, step in steps.items():
        try:
            step()
            iteration.synchronizer(device)()
            kept[name] = step
        except OUT_OF_MEMORY:
            _release(device)
    return kept


def step_table(args) -> None:
    device = args.device
    print(f"\n### Step: one Adam step, L2 loss, float32, {args.transform}\n")
    try:  # a peer not installed is left out with one line, as accuracy.py leaves one out
        import kornia  # noqa: F401
    except ImportError:
        print(f"kornia: kornia is not installed ({accuracy.INSTALL_HINT}); its columns are nan\n")
    print("| size | B | analytic [ms] | analytic compiled [ms] | autograd [ms] | autograd compiled [ms] | kornia [ms] "
          "| compiled pair-it/s | analytic / autograd | compiled / autograd | compiled / autograd compiled "
          "| compiled / kornia | compile [s] |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    loss = tireg.L2Loss()
    for size in args.sizes:
        for batch in args.batches:
            try:
                row = _step_row(args, loss, size, batch)
            except OUT_OF_MEMORY:  # the images themselves, or every method
                _release(device)
                row = " ".join(["out of memory |"] * 11)
            print(f"| {size}² | {batch} | {row}", flush=True)


def _step_row(args, loss, size: int, batch: int) -> str:
    """One row of the step table (a cell is nan where its method ran out of memory)."""
    device = args.device
    fixed, moving = random_images(batch, size, device)
    steps = {}
    compile_seconds = math.nan
    compiled_model = tireg.create_model(args.transform, moving, loss=loss, compile=True)
    try:
        started = time.perf_counter()
        compiled_model(moving, fixed)  # the first call compiles
        iteration.synchronizer(device)()
        compile_seconds = time.perf_counter() - started
        steps["compiled"] = iteration.make_step(compiled_model, moving, fixed, loss, "analytic")
    except OUT_OF_MEMORY:
        _release(device)
    for name in ("analytic", "autograd"):
        model = tireg.create_model(args.transform, moving, gradients=name, loss=loss, compile=False)
        steps[name] = iteration.make_step(model, moving, fixed, loss, name)
    if args.compiled_autograd:
        steps["autograd compiled"] = compiled_autograd_step(moving, fixed, args.transform, loss)
    try:
        steps["kornia"] = kornia_step(moving, fixed, args.transform)
    except ImportError:  # step_table said so above the table
        pass
    steps = _runnable(steps, device)  # the first call compiles the compiled autograd step
    t = iteration.median_rounds(steps, args.budget, iteration.synchronizer(device)) if steps else {}
    if fell_back(device):  # its time is the reference path's
        t.pop("compiled", None)
        print(f"  - {size}² × {batch}: tireg's compiled path failed and fell back (see the warning): compiled nan")
    analytic, compiled, autograd, autograd_compiled, kornia = (
        t.get(name, math.nan) for name in ("analytic", "compiled", "autograd", "autograd compiled", "kornia"))
    return (f"{analytic * 1e3:.3f} | {compiled * 1e3:.3f} | {autograd * 1e3:.3f} | {autograd_compiled * 1e3:.3f} "
            f"| {kornia * 1e3:.3f} | {batch / compiled:,.0f} | {analytic / autograd:.2f} | {compiled / autograd:.2f} "
            f"| {compiled / autograd_compiled:.2f} | {compiled / kornia:.2f} | {compile_seconds:.1f} |")


def graph_table(args) -> None:
    """The analytic step (eager kernels; and compiled) replayed as one CUDA graph, against the
    same step launched op by op: issue 6's 0.03 ms for one 256² pair is below what launching a
    step's kernels one by one costs.  A library path would follow what this measures."""
    device = args.device
    print(f"\n### Step replayed as a CUDA graph: one Adam step (capturable), L2 loss, float32, {args.transform}\n")
    if not device.startswith("cuda"):
        print("(CUDA graphs need a CUDA device: no rows here)")
        return
    print("| size | B | analytic [ms] | analytic graph [ms] | compiled graph [ms] | graph pair-it/s (best) "
          "| graph / analytic | max |Δp| graph vs eager |")
    print("|---|---|---|---|---|---|---|---|")
    loss = tireg.L2Loss()
    for size in args.sizes:
        for batch in args.batches:
            fixed, moving = random_images(batch, size, device)
            steps, notes, differences = {}, [], []
            eager = tireg.create_model(args.transform, moving, loss=loss, compile=False)
            steps["analytic"] = iteration.make_step(eager, moving, fixed, loss, "analytic")
            for name, compile in (("analytic graph", False), ("compiled graph", True)):
                try:
                    model = tireg.create_model(args.transform, moving, loss=loss, compile=compile)
                    replay, check = iteration.captured_step(model, moving, fixed)
                    differences.append(check())
                    steps[name] = replay
                except Exception as error:  # noqa: BLE001 - a capture that fails is a finding, not the end of the run
                    _release(device)
                    notes.append(f"{name}: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            steps = _runnable(steps, device)
            t = iteration.median_rounds(steps, args.budget, iteration.synchronizer(device)) if steps else {}
            if fell_back(device):  # captured the reference path
                t.pop("compiled graph", None)
                notes.append("compiled graph: tireg's compiled path failed and fell back (see the warning)")
            analytic, plain, compiled = (t.get(name, math.nan) for name in ("analytic", "analytic graph", "compiled graph"))
            best = min((value for value in (plain, compiled) if not math.isnan(value)), default=math.nan)
            difference = max(differences) if differences else math.nan
            print(f"| {size}² | {batch} | {analytic * 1e3:.4f} | {plain * 1e3:.4f} | {compiled * 1e3:.4f} "
                  f"| {batch / best:,.0f} | {best / analytic:.2f} | {difference:.1e} |", flush=True)
            for note in notes:
                print(f"  - {size}² × {batch}: {note}")


# ----------------------------------------------------------------------------
# 2. register end to end


def _pairs(count: int, size: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``accuracy.py``'s affine cases, ``size`` pixels square: ``(fixed, moving, truth)``, made as
    that benchmark makes them (cubic resampling of real scenes, noise, a gain and offset), so that
    no pair is made by the interpolation tireg registers with."""
    cases = accuracy.make_cases(["affine"], count, accuracy.DEFAULT_SEED, size=size)
    return [(case.fixed, case.moving, case.truth) for case in cases]


def _clock(device: str):
    """The clock of the register tables: CPU time on the CPU (as accuracy.py: every method runs
    single-threaded, and the CPU time of a pair is robust to other load on a shared machine;
    wall times moved tireg's ratio to ECC by 0.3 between runs), wall time on a GPU."""
    return time.process_time if device == "cpu" else time.perf_counter


def _run(register, pairs, device: str, strict: bool = False) -> tuple[list[float], list[float]]:
    """Seconds and error of ``register`` on each pair; an exception is a failure (OpenCV's ECC throws
    when it does not converge), except with ``strict`` (tireg: an exception is a bug, e.g. on a GPU,
    which a row of failures would hide)."""
    synchronize, clock = iteration.synchronizer(device), _clock(device)
    seconds, errors = [], []
    for fixed, moving, truth in pairs:
        synchronize()
        started = clock()
        try:
            matrix = register(fixed, moving)
            synchronize()
            seconds.append(clock() - started)
            errors.append(accuracy.grid_error(matrix, truth, fixed.shape[-1]))
        except Exception:  # noqa: BLE001 - OpenCV's ECC throws when it does not converge: a failure
            if strict:
                raise
            seconds.append(clock() - started)
            errors.append(math.inf)
    return seconds, errors


#: A method slower than this a pair (SimpleITK, kornia) runs each pair once, not --repeats times.
SLOW_SECONDS = 0.25


def _interleaved(methods: dict, pairs, repeats: int, device: str) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds (the median of ``repeats`` runs) and error of every method on every pair.

    Pair by pair, every method in turn, ``repeats`` rounds: load on a shared machine hits
    all alike.  The error is the first run's (the methods are deterministic).  Each method
    first runs once on the first pair untimed (imports, a GPU's kernel modules, caches).
    """
    for name, method in methods.items():
        _run(method, pairs[:1], device, strict=name.startswith("tireg"))
    results = {name: ([], []) for name in methods}
    for pair in pairs:
        times = {name: [] for name in methods}
        for round_ in range(repeats):
            for name, method in methods.items():
                if round_ and times[name][0] > SLOW_SECONDS:
                    continue  # far slower than the rest: noise can not change its ratio, and it would take minutes
                seconds, errors = _run(method, [pair], device, strict=name.startswith("tireg"))
                times[name].extend(seconds)
                if not round_:
                    results[name][1].extend(errors)
        for name in methods:
            results[name][0].append(statistics.median(times[name]))
    return results


def register_table(args) -> None:
    device = args.device
    pairs = _pairs(args.cases, accuracy.SIZE)

    def tireg_method(compile, metric="l2"):
        def run(fixed, moving):
            return tireg.register(torch.from_numpy(fixed).to(device), torch.from_numpy(moving).to(device),
                                  transform="affine", compile=compile, metric=metric).matrix.numpy()
        return run

    started = time.perf_counter()
    tireg_method(True)(*pairs[0][:2])  # compiles every pyramid level's kernel
    compile_seconds = time.perf_counter() - started
    # "tireg ncc": ECC's own criterion, by Levenberg-Marquardt with ECC's step
    methods = {"tireg": tireg_method("auto"), "tireg compiled": tireg_method(True), "tireg ncc": tireg_method("auto", "ncc")}
    if device == "cpu":  # a peer not installed is left out with one line, as accuracy.py does
        peers, left_out = accuracy.select_methods(["ecc", "simpleitk", "kornia"])
        for line in left_out:
            print(f"  - {line}")
        for name, method in peers.items():
            methods[name] = lambda fixed, moving, method=method: method.register(fixed, moving, "affine")[0]
    results = _interleaved(methods, pairs, args.repeats, device)
    ecc_solved = [e < accuracy.SUCCESS_PX for e in results["ecc"][1]] if "ecc" in results else None
    print(f"\n### register(): {len(pairs)} affine pairs of 256² (accuracy.py's cases), median of {args.repeats} "
          f"runs a pair; tireg's compile on first use {compile_seconds:.1f} s\n")
    unit = "CPU s" if device == "cpu" else "s"
    # the mean as well: a pair whose quick start scores low runs the initialiser's search, and takes
    # two to four times the median (a quarter of the affine pairs)
    print(f"| method | success (< 0.5 px) | median error [px] | median {unit} / pair | mean {unit} / pair "
          f"| median {unit} / pair, ECC-solved pairs | time / ECC's (ECC-solved pairs) |")
    print("|---|---|---|---|---|---|---|")
    ecc_median = statistics.median([s for s, ok in zip(results["ecc"][0], ecc_solved) if ok]) \
        if ecc_solved and any(ecc_solved) else math.nan
    for name, (seconds, errors) in results.items():
        solved = sum(e < accuracy.SUCCESS_PX for e in errors)
        on_ecc = [s for s, ok in zip(seconds, ecc_solved) if ok] if ecc_solved and any(ecc_solved) else []
        on_ecc_median = statistics.median(on_ecc) if on_ecc else math.nan
        print(f"| {name} | {solved}/{len(errors)} | {statistics.median(errors):.3f} | {statistics.median(seconds):.4f} "
              f"| {statistics.mean(seconds):.4f} | {on_ecc_median:.4f} | {on_ecc_median / ecc_median:.2f} |", flush=True)

    pairs_512 = _pairs(max(2, args.cases // 2), 512)
    print(f"\n### register(): {len(pairs_512)} affine pairs of 512² (accuracy.py's first cases at twice the "
          f"resolution), median of {args.repeats} runs a pair\n")
    print(f"| method | success (< 0.5 px) | median error [px] | median {unit} / pair | mean {unit} / pair |")
    print("|---|---|---|---|---|")
    tireg_method(True)(*pairs_512[0][:2])  # the 512² levels compile here
    tireg_methods = {name: methods[name] for name in ("tireg", "tireg compiled", "tireg ncc")}
    results_512 = _interleaved(tireg_methods, pairs_512, args.repeats, device)
    if fell_back(device):
        print("  - tireg's compiled path failed and fell back (see the warning): its rows are the reference path")
    for name, (seconds, errors) in results_512.items():
        solved = sum(e < accuracy.SUCCESS_PX for e in errors)
        print(f"| {name} | {solved}/{len(errors)} | {statistics.median(errors):.3f} "
              f"| {statistics.median(seconds):.4f} | {statistics.mean(seconds):.4f} |", flush=True)


# ----------------------------------------------------------------------------
# 3. memory


#: Memory rows: (size, batch) large enough that the images, not the interpreter, set the peak.
MEMORY_CASES = ((256, 128), (1024, 8), (1024, 1), (4096, 1))


def _memory_inputs(size: int, batch: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A solvable pair (no fallback search): random ``fixed``, ``moving`` its roll."""
    (fixed,) = random_images(batch, size, device, count=1)  # the moving image is its roll, not a second draw
    return fixed, torch.roll(fixed, shifts=(3, -2), dims=(-2, -1))


#: The memory table's columns: (what, compile); ``--memory-metrics`` adds a "register METRIC" and a
#: "step METRIC" column each, ``register(metric=METRIC)`` and a model's steps with it, eager (default:
#: ncc); "METRIC:OPTIMIZER" a register column with that optimizer.
MEMORY_COLUMNS = (("step", False), ("step", True), ("register", False), ("register", True))


def _memory_call(what: str, compile: bool, fixed: torch.Tensor, moving: torch.Tensor) -> None:
    """Two steps of a new analytic model (what it keeps between steps counts), or one ``register``;
    ``"step METRIC"``, ``"register METRIC"``, ``"register METRIC:OPTIMIZER"`` with that metric,
    or ``"register METRIC:OPTIMIZER:autograd"`` with ``gradients="autograd"`` too."""
    kind, _, spec = what.partition(" ")
    metric, optimizer, gradients = _spec_parts(spec)
    options = {"metric": metric} if metric else {}
    if kind == "step":
        model = tireg.create_model("affine", moving, compile=compile, **options)
        model(moving, fixed)
        model(moving, fixed)
    else:
        tireg.register(fixed, moving, compile=compile, **options, **({"optimizer": optimizer} if optimizer else {}),
                       **({"gradients": gradients} if gradients else {}))


def _spec_parts(spec: str) -> tuple[str, str, str]:
    """``METRIC[:OPTIMIZER[:GRADIENTS]]`` as its three parts, ``""`` for each one left out."""
    metric, _, rest = spec.partition(":")
    optimizer, _, gradients = rest.partition(":")
    return metric, optimizer, gradients


def _metric_spec(text: str) -> str:
    """``METRIC``, ``METRIC:OPTIMIZER`` or ``METRIC:OPTIMIZER:autograd`` for ``--memory-metrics``, checked."""
    metric, optimizer, gradients = _spec_parts(text)
    if (metric not in tireg.metrics.METRIC_NAMES or optimizer not in ("", *OPTIMIZERS)
            or gradients not in ("", "autograd") or gradients and optimizer in ("", "gauss-newton")):
        raise argparse.ArgumentTypeError(f"{text!r}: a metric of {', '.join(tireg.metrics.METRIC_NAMES)}, "
                                         f"optionally ':' and an optimizer, then ':autograd' (not with gauss-newton)")
    return text


def _warm_up(what: str, compile: bool, size: int, batch: int, device: str) -> None:
    """The call on other tensors of the same shape, then freed: the compile and one-off state stay
    out of the measured peak, and nothing the measured call keeps was made before its baseline."""
    _memory_call(what, compile, *_memory_inputs(size, batch, device))
    gc.collect()


def _resident(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process in bytes (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def memory_probe(what: str, compile: bool, size: int, batch: int) -> float:
    """Peak resident memory of one call over its input, ``(peak - before + input) / input``, on the CPU.

    Run in a fresh process started with ``MALLOC_MMAP_THRESHOLD_`` low, so that every
    image-sized block is mapped and returned on free and the resident size follows the live
    tensors; the high-water mark is reset (``/proc/self/clear_refs``) after a warm-up on other
    tensors (:func:`_warm_up`), with the inputs made and before the model or call.
    """
    _warm_up(what, compile, size, batch, "cpu")
    fixed, moving = _memory_inputs(size, batch, "cpu")
    input_bytes = fixed.nbytes + moving.nbytes
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    before = _resident("VmRSS")
    _memory_call(what, compile, fixed, moving)
    return (_resident("VmHWM") - before + input_bytes) / input_bytes


def _cpu_peak(what: str, compile: bool, size: int, batch: int, threads: int) -> float:
    command = [sys.executable, os.path.abspath(__file__), "--threads", str(threads),
               "--memory-probe", what, str(int(compile)), str(size), str(batch)]
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(command, env=environment, capture_output=True, text=True, check=True)
    return float(done.stdout.strip().splitlines()[-1])


def _cuda_peak(what: str, compile: bool, size: int, batch: int, device: str) -> float:
    """As :func:`memory_probe`, with the allocator's counters (allocated tensors, not its cache)."""
    _warm_up(what, compile, size, batch, device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    fixed, moving = _memory_inputs(size, batch, device)
    input_bytes = fixed.nbytes + moving.nbytes
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    _memory_call(what, compile, fixed, moving)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - baseline + input_bytes) / input_bytes


def memory_table(args) -> None:
    cuda = args.device.startswith("cuda")
    kind = "GPU memory (allocated tensors)" if cuda else "resident memory (a fresh process per cell)"
    print(f"\n### Peak {kind} / size of the input images, affine, float32\n")
    if not cuda and not os.path.exists("/proc/self/clear_refs"):
        print("(on the CPU this table needs Linux's /proc/self/clear_refs)")
        return
    columns = MEMORY_COLUMNS + tuple((f"{what} {metric}", False) for metric in args.memory_metrics
                                     for what in ("register", "step") if what == "register" or ":" not in metric)
    print("| size | B | input [MiB] | " + " | ".join(what + " compiled" * compile for what, compile in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    cases = args.memory_cases or MEMORY_CASES
    for size, batch in cases:
        cells = []
        for what, compile in columns:
            if cuda:
                try:
                    cells.append(_cuda_peak(what, compile, size, batch, args.device))
                except OUT_OF_MEMORY:
                    _release(args.device)
                    cells.append(math.nan)
                if compile and fell_back(args.device):
                    cells[-1] = math.nan
            else:
                cells.append(_cpu_peak(what, compile, size, batch, args.threads))
        input_mib = 2 * batch * size * size * 4 / 2**20
        print(f"| {size}² | {batch} | {input_mib:.0f} | " + " | ".join(f"{cell:.2f}" for cell in cells) + " |",
              flush=True)


def _size_by_batch(text: str) -> tuple[int, int]:
    size, _, batch = text.partition("x")
    try:
        return int(size), int(batch)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZExBATCH such as 256x128; got {text!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--transform", default="affine")
    parser.add_argument("--cases", type=int, default=32,
                        help="256² register pairs, accuracy.py's affine cases (and half as many 512² pairs)")
    parser.add_argument("--budget", type=float, default=2.0, help="seconds of timing per step case")
    parser.add_argument("--repeats", type=int, default=3,
                        help="register table: runs of each method on each pair (the median counts)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--memory-cases", nargs="+", type=_size_by_batch, metavar="SIZExBATCH",
                        help="memory table rows, e.g. 256x128 4096x1 (default: "
                             + " ".join(f"{s}x{b}" for s, b in MEMORY_CASES) + ")")
    parser.add_argument("--memory-metrics", nargs="*", default=["ncc"], type=_metric_spec,
                        metavar="METRIC[:OPTIMIZER[:autograd]]",
                        help="memory table: a 'register METRIC' and a 'step METRIC' column each (an optimizer "
                             "given: register only, ':autograd' with gradients='autograd'; default: ncc)")
    parser.add_argument("--compiled-autograd", action=argparse.BooleanOptionalAction, default=True,
                        help="step table: also time tireg's autograd step under torch.compile")
    parser.add_argument("--tables", nargs="+", default=["step", "graph", "register", "memory"],
                        choices=["step", "graph", "register", "memory"])
    parser.add_argument("--memory-probe", nargs=4, metavar=("WHAT", "COMPILE", "SIZE", "BATCH"),
                        help=argparse.SUPPRESS)  # one cell of the CPU memory table, in its own process
    args = parser.parse_args()
    accuracy.set_threads(args.threads)
    if args.memory_probe:
        what, compile, size, batch = args.memory_probe
        print(memory_probe(what, compile == "1", int(size), int(batch)))
        return
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU ({os.cpu_count()} cores), {torch.get_num_threads()} torch thread(s)")
    print(f"tireg {tireg.__version__}, torch {torch.__version__}, {name}")
    for table in args.tables:
        {"step": step_table, "graph": graph_table, "register": register_table, "memory": memory_table}[table](args)


if __name__ == "__main__":
    main()
