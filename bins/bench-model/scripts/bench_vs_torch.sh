#!/bin/bash
# The CPU comparison of docs/performance.md: this project and PyTorch alternately, ROUNDS rounds
# (default 2), on the same machine and thread count. Needs a release build of bench-model and a
# PyTorch venv (../shared/tools/torch-venv.sh, default /tmp/torchenv).
#   bins/bench-model/scripts/bench_vs_torch.sh [PYTHON] [ROUNDS]
# PREC=bf16 compares bf16 products (CPUs with AVX512-BF16) with torch.autocast("cpu", bfloat16).
# Both sides time the steady state: WARM untimed training steps first (default 10 for the small
# model, 3 for ResNet-50; this project's heap still grows, page by page, over its first ~12 small
# steps), 2 untimed inferences.
set -euo pipefail
cd "$(dirname "$0")/../../.."
PY=${1:-/tmp/torchenv/bin/python}
ROUNDS=${2:-2}
PREC=${PREC:-f32}
[ -x target/release/bench-model ] || cargo build --release -p bench-model
B="target/release/bench-model --precision $PREC"
CAST=""
[ "$PREC" = bf16 ] && CAST="--autocast bf16"
SEED=$(cd ../shared/reference/python 2>/dev/null && pwd || echo /work/shared/reference/python)
P="$PY bins/bench-model/scripts/bench_torch.py --seed-dir $SEED $CAST"
WARM=${WARM:-10}
W50=$(( WARM < 3 ? WARM : 3 ))
T="$PY bins/train-detector/scripts/torch_baseline.py --bench $CAST --bench-warmup $WARM --bench-iters 10"
echo "precision $PREC (torch: ${CAST:-f32})"
S="--depth 18 --base-width 32 --fpn 64 --head 64 --size 129 --batch 16 --classes 4"
lscpu | grep -E "Model name|CPU family|Model:" || true
$B --mode infer $S --iters 1 | sed -n 2p   # the kernels' instruction set and caches
$PY -c "import torch; print('torch', torch.__version__, torch.backends.cpu.get_cpu_capability())"
for r in $(seq 1 "$ROUNDS"); do
  echo "== round $r $(date -u +%H:%M:%S)"
  echo "ours  r50 train 257x2: $($B --mode train --size 257 --batch 2 --iters 5 --warmup $W50 | grep 'train step')"
  echo "torch r50 train 257x2: $($P --mode train --size 257 --batch 2 --iters 5 --warmup $W50 | grep -i 'train')"
  echo "ours  r50 infer 641x1: $($B --mode infer --size 641 --batch 1 --iters 5 --warmup 2 | grep 'inference')"
  echo "torch r50 infer 641x1: $($P --mode infer --size 641 --batch 1 --iters 5 --warmup 2 | grep -i 'infer')"
  echo "ours  r50 infer 257x2: $($B --mode infer --size 257 --batch 2 --iters 7 --warmup 2 | grep 'inference')"
  echo "torch r50 infer 257x2: $($P --mode infer --size 257 --batch 2 --iters 7 --warmup 2 | grep -i 'infer')"
  echo "ours  small train: $($B --mode train $S --iters 10 --warmup $WARM | grep 'train step')"
  echo "ours  small infer: $($B --mode infer $S --iters 10 --warmup 2 | grep 'inference')"
  echo "torch small: $($T | tail -2 | tr '\n' ' ')"
done
