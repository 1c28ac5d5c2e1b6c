#!/usr/bin/env bash
# Issue 6's GPU checks and tables in one call of the device machine.
#
# A session lent a GPU has 15 minutes of device time in all, the machine's start
# (a minute or two) included, no machine starts with under 4 minutes left, and one
# command may run 10 minutes. So this runs every check in one call of at most
# about 7 minutes (the parts' limits add up to 400 s), leaving time to rerun a
# part on the warm machine; the parts that answer the issue's targets first, each
# under its own time limit (a part that overruns is cut and the next one runs);
# each part's output goes under $OUT (which the device tool brings back) as well
# as to the terminal.
#
#   step     one analytic step (reference, compiled) against autograd (eager and
#            torch.compile) and kornia: 256^2 at 1 and 1024 pairs (pair-iterations/s,
#            the 0.03 ms target), 1024^2 at 1 and 16 pairs
#   graph    the same step captured as one CUDA graph and replayed (eager and compiled
#            kernels), 256^2, 1 and 1024 pairs, with its difference from the eager step
#   register register() end to end, 256^2 (accuracy.py's cases) and 512^2 (the 20 ms target)
#   tests    the CUDA cases of the test suite's main files: CUDA equals the CPU, the fused
#            kernel equals the reference, no host synchronisation in the loops
#   profile  one register() of 512^2 and 256^2: wall time, kernel launches by phase
#   memory   peak GPU memory over the input images (the 3x target): 256^2 x 1 and x 1024,
#            1024^2 x 8, 4096^2 x 1
#
# Usage: bash benchmarks/gpu_check.sh [PART ...]      (default: every part, in the order above)
#
# Before the call, here (kornia is not on the device image; without the wheels the
# step table's kornia column is nan):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl kornia==0.9.0 kornia_rs==0.2.0
# then call the device tool's run with command "bash benchmarks/gpu_check.sh",
# carry [".whl"] and timeout_s 480. (.whl/ is in .gitignore.)
#
# GPU_CHECK_DEVICE=cpu runs every part on the CPU at small sizes (about 3 minutes),
# to try the script here; its numbers mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-/tmp/tireg-gpu-check}"
mkdir -p "$OUT"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/tireg-site \
        .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/tireg-site"
fi

# part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to the terminal and $OUT/NAME.txt
part() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds} s): $*"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | grep -v '^USDT' | tee "$OUT/$name.txt"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started)) s"
    echo "$name $status $((SECONDS - started))" >>"$OUT/parts.txt"
}

"$PYTHON" - "$DEVICE" <<'EOF' 2>&1 | tee "$OUT/device.txt" || exit 1
import sys, torch, tireg
device = sys.argv[1]
print(f"tireg {tireg.__version__}, torch {torch.__version__}, Python {sys.version.split()[0]}")
if device.startswith("cuda"):
    if not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here")
    properties = torch.cuda.get_device_properties(0)
    print(f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs")
EOF

PARTS=("$@")
[ ${#PARTS[@]} -eq 0 ] && PARTS=(step graph register tests profile memory)
for name in "${PARTS[@]}"; do
    case $name in
    tests | profile | step | graph | register | memory) ;;
    *) echo "gpu_check: unknown part '$name' (step, graph, register, tests, profile, memory)" >&2; exit 2 ;;
    esac
done

SPEED=("$PYTHON" benchmarks/speed.py --device "$DEVICE")
if [ "$DEVICE" = cpu ]; then  # a dry run: every code path, small and short
    STEP_SMALL=(--sizes 64 --batches 1 2)
    STEP_LARGE=(--sizes 96 --batches 1 2)
    GRAPH_ROWS=(--sizes 64 --batches 1 2)
    REGISTER=(--cases 2 --repeats 1)
    PROFILE_SIZES=(64)
    MEMORY_CASES=(64x2)
    TESTS=(tests/test_chunks.py)
    BUDGET=0.2
else
    STEP_SMALL=(--sizes 256 --batches 1 1024)
    STEP_LARGE=(--sizes 1024 --batches 1 16)
    GRAPH_ROWS=(--sizes 256 --batches 1 1024)
    REGISTER=(--cases 8 --repeats 3)
    PROFILE_SIZES=(512 256)
    MEMORY_CASES=(256x1 256x1024 1024x8 4096x1)
    TESTS=(-k cuda tests/test_device.py tests/test_fused.py tests/test_models.py tests/test_register.py)
    BUDGET=0.5
fi

: >"$OUT/parts.txt"
for name in "${PARTS[@]}"; do
    case $name in
    step)  # the large rows without the compiled autograd step (its compile would take their time)
        part step 70 "${SPEED[@]}" --tables step "${STEP_SMALL[@]}" --budget "$BUDGET"
        part step-large 50 "${SPEED[@]}" --tables step "${STEP_LARGE[@]}" --budget "$BUDGET" --no-compiled-autograd ;;
    graph) part graph 40 "${SPEED[@]}" --tables graph "${GRAPH_ROWS[@]}" --budget "$BUDGET" ;;
    register) part register 70 "${SPEED[@]}" --tables register "${REGISTER[@]}" ;;
    tests) part tests 80 "$PYTHON" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}" ;;
    profile) part profile 30 "$PYTHON" benchmarks/profile_register.py --device "$DEVICE" --size "${PROFILE_SIZES[@]}" \
        --repeats 10 ;;
    memory) part memory 60 "${SPEED[@]}" --tables memory --memory-cases "${MEMORY_CASES[@]}" ;;
    esac
done
echo "=== parts (name, exit status, seconds):"
cat "$OUT/parts.txt"
