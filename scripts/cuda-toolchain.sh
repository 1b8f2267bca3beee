#!/usr/bin/env bash
# What `cargo build --features cuda` needs, on a machine without a CUDA toolkit or GPU: nvcc and
# the CUDA libraries from NVIDIA's PyPI wheels, laid out as a toolkit root, plus a libcuda stub
# for the final link (the real libcuda.so.1 comes with the NVIDIA driver where the binary runs).
#
#   eval "$(scripts/cuda-toolchain.sh)"          # once per shell; then
#   cargo build --release --features cuda -p train-detector
#
# Arguments: [DIR] (default ~/.cache/retinanet-cuda). Environment: CUDA_WHEELS (default 13.0:
# must not be newer than the driver's CUDA version), CUDA_COMPUTE_CAP (default 90: H100/H200;
# 80 for A100, 89 for L4/RTX 40xx), CUDA_NCCL=1 to add NCCL (for `--features nccl`, the
# multi-GPU build; the binary then needs libnccl.so.2 where it runs: the same wheel's, or the
# machine's). Messages go to stderr, the exports to stdout.
set -euo pipefail
DIR=${1:-$HOME/.cache/retinanet-cuda}
VER=${CUDA_WHEELS:-13.0}
CAP=${CUDA_COMPUTE_CAP:-90}
log() { echo "cuda-toolchain: $*" >&2; }

if [ ! -x "$DIR/venv/bin/python" ]; then
    log "creating $DIR/venv"
    python3 -m venv "$DIR/venv" >&2
fi
log "installing the CUDA $VER wheels (nvcc, runtime, cuBLAS, cuRAND, NVRTC)"
"$DIR/venv/bin/pip" install -q "nvidia-cuda-nvcc==$VER.*" "nvidia-cuda-runtime==$VER.*" \
    "nvidia-cuda-crt==$VER.*" "nvidia-nvvm==$VER.*" "nvidia-cuda-cccl==$VER.*" \
    "nvidia-cublas==$VER.*" "nvidia-cuda-nvrtc==$VER.*" nvidia-curand >&2
if [ "${CUDA_NCCL:-0}" = 1 ]; then
    log "installing NCCL for CUDA ${VER%%.*}"
    "$DIR/venv/bin/pip" install -q "nvidia-nccl-cu${VER%%.*}" >&2
fi

# The wheels of CUDA 13 share one folder, nvidia/cu13, with bin/, include/, lib/ and nvvm/.
MAJOR=${VER%%.*}
W=$("$DIR/venv/bin/python" -c "import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], 'cu$MAJOR'))")
[ -x "$W/bin/nvcc" ] || { log "no nvcc under $W: the wheels' layout is not the one expected"; exit 1; }

R="$DIR/root"
rm -rf "$R"
mkdir -p "$R/lib/stubs"
for d in bin include nvvm; do ln -s "$W/$d" "$R/$d"; done
for l in cublas cublasLt curand nvrtc cudart; do
    f=$(ls "$W"/lib/lib$l.so.* | grep -v '\.alt\.' | head -1)
    ln -s "$f" "$R/lib/lib$l.so"
done
if [ "${CUDA_NCCL:-0}" = 1 ]; then
    f=$(ls "$W"/lib/libnccl.so.* 2>/dev/null | head -1 || true)
    [ -n "$f" ] || f=$(find "$("$DIR/venv/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')" -name 'libnccl.so*' | head -1)
    [ -n "$f" ] || { log "the NCCL wheel holds no libnccl.so"; exit 1; }
    ln -s "$f" "$R/lib/libnccl.so"
fi

# cudarc (candle's CUDA bindings) links libcuda: a stub defining every driver function cudarc
# declares is enough to link; its soname makes the binary load the driver's libcuda.so.1.
cargo fetch >&2
SYS=$(cargo metadata --format-version 1 --all-features | "$DIR/venv/bin/python" -c '
import json, os, sys
pk = [p for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"]
print(os.path.join(os.path.dirname(pk[0]["manifest_path"]), "src", "driver", "sys", "mod.rs") if pk else "")')
[ -f "$SYS" ] || { log "cudarc's sources were not found (is this the workspace root?)"; exit 1; }
grep -ohE 'load::<_F>\("cu[A-Za-z0-9_]+' "$SYS" | sed 's/.*"//' | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$R/lib/stubs/libcuda.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$R/lib/stubs/libcuda.so" "$R/lib/stubs/libcuda.c"
log "toolkit root $R ($(wc -l <"$R/lib/stubs/libcuda.c") driver functions stubbed), compute capability $CAP"

cat <<EOF
export CUDA_ROOT="$R"
export PATH="$R/bin:\$PATH"
export LIBRARY_PATH="$R/lib:$R/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=$CAP
EOF
