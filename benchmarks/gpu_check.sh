#!/usr/bin/env bash
# Issue 6's GPU checks and tables in one call of the device machine.
#
# A session lent a GPU has 15 minutes of device time in all, the machine's start
# (a minute or two) included, and one command may run 10 minutes. So this runs
# every check in one call of about 9 minutes, the cheapest and most telling
# first, each part under its own time limit (a part that overruns is cut and the
# next one runs), and writes each part's output under $OUT (which the device
# tool brings back) as well as to the terminal.
#
#   tests    the CUDA cases of the test suite: CUDA equals the CPU, the fused
#            kernel equals the reference, no host synchronisation in the loops
#   profile  one register() of 512^2 and 256^2: wall time, kernel launches by phase
#   step     one analytic step (reference, compiled) against autograd and kornia:
#            256^2 and 1024^2, 1 and 1024 pairs (pair-iterations/s, the 0.03 ms target)
#   graph    the same step captured as one CUDA graph and replayed (eager and compiled
#            kernels), 256^2, 1 and 1024 pairs, with its difference from the eager step
#   register register() end to end, 256^2 (accuracy.py's cases) and 512^2 (the 20 ms target)
#   memory   peak GPU memory over the input images (the 3x target)
#
# Usage: bash benchmarks/gpu_check.sh [PART ...]      (default: every part, in the order above)
#
# Before the call, here (kornia is not on the device image; without the wheels the
# step table's kornia column is nan):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl kornia==0.9.0 kornia_rs==0.2.0
# then call the device tool's run with command "bash benchmarks/gpu_check.sh",
# carry [".whl"] and timeout_s 600 (the parts' limits add up to 575 s). (.whl/ is in .gitignore.)
#
# GPU_CHECK_DEVICE=cpu runs the same parts on the CPU, to try the script here.
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
[ ${#PARTS[@]} -eq 0 ] && PARTS=(tests profile step graph register memory)
for name in "${PARTS[@]}"; do
    case $name in
    tests | profile | step | graph | register | memory) ;;
    *) echo "gpu_check: unknown part '$name' (tests, profile, step, graph, register, memory)" >&2; exit 2 ;;
    esac
done
: >"$OUT/parts.txt"
for name in "${PARTS[@]}"; do
    case $name in
    tests)
        if [ "$DEVICE" = cpu ]; then
            part tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_chunks.py
        else
            # the CUDA cases, the most telling files first (a part cut by its limit keeps what ran)
            part tests 140 "$PYTHON" -m pytest -q -p no:cacheprovider -rs -k cuda tests/test_device.py tests/test_register.py \
                tests/test_fused.py tests/test_models.py tests/test_sampling.py tests/test_metrics.py \
                tests/test_losses.py tests/test_transforms.py tests/test_mappings.py tests/test_initialize.py \
                tests/test_compat.py
        fi ;;
    profile) part profile 50 "$PYTHON" benchmarks/profile_register.py --device "$DEVICE" --size 512 256 --repeats 10 ;;
    step) part step 160 "$PYTHON" benchmarks/speed.py --device "$DEVICE" --tables step --sizes 256 1024 \
        --batches 1 1024 --budget 1 ;;
    graph) part graph 45 "$PYTHON" benchmarks/speed.py --device "$DEVICE" --tables graph --sizes 256 \
        --batches 1 1024 --budget 1 ;;
    register) part register 100 "$PYTHON" benchmarks/speed.py --device "$DEVICE" --tables register --cases 16 \
        --repeats 3 ;;
    memory) part memory 80 "$PYTHON" benchmarks/speed.py --device "$DEVICE" --tables memory --sizes 256 1024 \
        --batches 8 1024 ;;
    esac
done
echo "=== parts (name, exit status, seconds):"
cat "$OUT/parts.txt"
