#!/usr/bin/env bash
# Issue 6's GPU checks and tables in one call of the device machine.
#
# A session lent a GPU has 15 minutes of device time in all, the machine's start
# (a minute or two) included, no machine starts with under 4 minutes left, and one
# command may run 10 minutes. So this runs every check in one call of about 7
# minutes at most (the parts' limits add up to 430 s), leaving time to rerun a
# part on the warm machine: correctness first (the CUDA tests that compile
# nothing), then the parts that answer the issue's targets, each part under its
# own time limit (a part that overruns is cut and the next one runs). Everything
# goes to the terminal and to two files under $OUT (the device tool brings back
# at most 8): log.txt, every part's output, and parts.txt, each part's exit status
# and seconds.
#
#   tests           the CUDA cases that compile nothing: CUDA equals the CPU, no host
#                   synchronisation in the loops, metrics, initialiser, sampling
#   step            one analytic step (reference, compiled) against autograd (eager and
#                   torch.compile) and kornia, one 256^2 pair (the 0.03 ms target)
#   step-batch      the same for 1024 pairs of 256^2 (pair-iterations/s; no compiled autograd)
#   graph           the step captured as one CUDA graph and replayed, 256^2, 1 and 1024 pairs
#   register        register() end to end, 256^2 (accuracy.py's cases) and 512^2 (the 20 ms target)
#   step-large      the step at 1024^2, 1 and 16 pairs (no compiled autograd)
#   tests-compiled  the CUDA cases of the compiled path (each compiles with Triton)
#   profile         one register() of 512^2 and 256^2: wall time, kernel launches by phase
#   memory          peak GPU memory over the input images (the 3x target): 256^2 x 1 and
#                   x 1024, 1024^2 x 8, 4096^2 x 1; ncc and mi (the one-hot product's slices)
#
# Usage: bash benchmarks/gpu_check.sh [PART ...]      (default: every part, in the order above)
#
# Before the call, here (kornia is not on the device image; without the wheels the
# step table's kornia column is nan):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl kornia==0.9.0 kornia_rs==0.2.0
# then call the device tool's run with command "bash benchmarks/gpu_check.sh",
# carry [".whl"] and timeout_s 480, and give the machine back after (or rerun a
# part at once: "bash benchmarks/gpu_check.sh register"). (.whl/ is in .gitignore.)
#
# GPU_CHECK_DEVICE=cpu runs every part on the CPU at small sizes (about 2 minutes),
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

# part NAME SECONDS COMMAND...: run COMMAND under a time limit, its output to the terminal and $OUT/log.txt
part() {
    local name=$1 seconds=$2
    shift 2
    echo "=== $name (at most ${seconds} s): $*" | tee -a "$OUT/log.txt"
    local started=$SECONDS
    timeout --kill-after=10 "$seconds" "$@" 2>&1 | grep -v '^USDT' | tee -a "$OUT/log.txt"
    local status=${PIPESTATUS[0]}
    echo "=== $name: exit $status after $((SECONDS - started)) s" | tee -a "$OUT/log.txt"
    echo "$name $status $((SECONDS - started))" >>"$OUT/parts.txt"
}

: >"$OUT/log.txt"
"$PYTHON" - "$DEVICE" <<'EOF' 2>&1 | tee -a "$OUT/log.txt" || exit 1
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
ALL=(tests step step-batch graph register step-large tests-compiled profile memory)
[ ${#PARTS[@]} -eq 0 ] && PARTS=("${ALL[@]}")
for name in "${PARTS[@]}"; do
    case " ${ALL[*]} " in
    *" $name "*) ;;
    *) echo "gpu_check: unknown part '$name' (${ALL[*]})" >&2; exit 2 ;;
    esac
done

SPEED=("$PYTHON" benchmarks/speed.py --device "$DEVICE")
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rs)
if [ "$DEVICE" = cpu ]; then  # a dry run: every code path, small and short
    STEP_ONE=(--sizes 64 --batches 1)
    STEP_BATCH=(--sizes 64 --batches 4)
    STEP_LARGE=(--sizes 96 --batches 1 2)
    GRAPH_ROWS=(--sizes 64 --batches 1 2)
    REGISTER=(--cases 2 --repeats 1)
    PROFILE_SIZES=(64)
    MEMORY_CASES=(64x2)
    TESTS=(tests/test_chunks.py)
    TESTS_COMPILED=(-k "compiled_register" tests/test_fused.py)
    BUDGET=0.2
else
    STEP_ONE=(--sizes 256 --batches 1)
    STEP_BATCH=(--sizes 256 --batches 1024)
    STEP_LARGE=(--sizes 1024 --batches 1 16)
    GRAPH_ROWS=(--sizes 256 --batches 1 1024)
    REGISTER=(--cases 8 --repeats 3)
    PROFILE_SIZES=(512 256)
    MEMORY_CASES=(256x1 256x1024 1024x8 4096x1)
    SYNC_COMPILED="tests/test_models.py::test_a_training_step_never_synchronises_on_cuda[True]"
    TESTS=(-k cuda --deselect "$SYNC_COMPILED" tests/test_device.py tests/test_register.py tests/test_models.py
        tests/test_sampling.py tests/test_metrics.py tests/test_initialize.py tests/test_analytic.py)
    TESTS_COMPILED=(-k cuda tests/test_fused.py "$SYNC_COMPILED")
    BUDGET=0.5
fi

: >"$OUT/parts.txt"
for name in "${PARTS[@]}"; do
    case $name in
    tests) part tests 75 "${PYTEST[@]}" "${TESTS[@]}" ;;
    step) part step 45 "${SPEED[@]}" --tables step "${STEP_ONE[@]}" --budget "$BUDGET" ;;
    step-batch) part step-batch 45 "${SPEED[@]}" --tables step "${STEP_BATCH[@]}" --budget "$BUDGET" \
        --no-compiled-autograd ;;
    graph) part graph 35 "${SPEED[@]}" --tables graph "${GRAPH_ROWS[@]}" --budget "$BUDGET" ;;
    register) part register 60 "${SPEED[@]}" --tables register "${REGISTER[@]}" ;;
    step-large) part step-large 40 "${SPEED[@]}" --tables step "${STEP_LARGE[@]}" --budget "$BUDGET" \
        --no-compiled-autograd ;;
    tests-compiled) part tests-compiled 60 "${PYTEST[@]}" "${TESTS_COMPILED[@]}" ;;
    profile) part profile 20 "$PYTHON" benchmarks/profile_register.py --device "$DEVICE" --size "${PROFILE_SIZES[@]}" \
        --repeats 10 ;;
    memory) part memory 50 "${SPEED[@]}" --tables memory --memory-cases "${MEMORY_CASES[@]}" --memory-metrics ncc mi ;;
    esac
done
echo "=== parts (name, exit status, seconds):" | tee -a "$OUT/log.txt"
tee -a "$OUT/log.txt" <"$OUT/parts.txt"
