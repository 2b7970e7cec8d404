#!/usr/bin/env bash
# The owed GPU checks, on a GPU machine that has no Rust toolchain: the binary built here by
# scripts/build-cuda.sh travels compressed (target-cuda/release/flowmatch.xz) with the MNIST
# digits (data/mnist), and finds CUDA 13's cuBLAS / cuRAND / NVRTC on the machine (the system
# CUDA or PyTorch's nvidia wheels).
#
#   scripts/gpu-checks.sh [OUT_DIR]   # bench, lesson_moons, mnist (MNIST_STEPS, default 20000,
#                                      # stopped after MNIST_LIMIT s, default 330)
#   SKIP_BENCH=1 scripts/gpu-checks.sh # the runs only
#   SKIP_COMPARE=1 …                   # without the side-by-side with PyTorch (gpu-compare.sh)
#
# Writes the console output, summaries and timings to OUT_DIR (default $OUT or /tmp/gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-/tmp/gpu-out}}
MNIST_LIMIT=${MNIST_LIMIT:-330}
MNIST_STEPS=${MNIST_STEPS:-20000}
mkdir -p "$OUT"
BIN=/tmp/flowmatch-cuda
xz -d -c target-cuda/release/flowmatch.xz > "$BIN" && chmod +x "$BIN" || exit 1
libdirs=""
for lib in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libcudart.so.13 libcudnn.so.9; do
  f=$(find / -xdev \( -name "$lib" -o -name "$lib.*" \) -not -path '/proc/*' 2>/dev/null | head -1)
  [ -n "$f" ] && libdirs="$libdirs:$(dirname "$f")"
done
export LD_LIBRARY_PATH="${libdirs#:}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  ldd "$BIN" | grep -E 'cuda|cublas|curand|nvrtc|cudnn|not found'
} 2>&1 | tee "$OUT/env.txt"
RUNS=/tmp/gpu-runs
rm -rf "$RUNS"

# Side by side with PyTorch first (issue 32: measure first), then the owed runs.
if [ -z "${SKIP_COMPARE:-}" ]; then
  scripts/gpu-compare.sh "$BIN" "$OUT" 2>&1 | tee "$OUT/compare.txt"
fi

if [ -z "${SKIP_BENCH:-}" ]; then
echo "== flowmatch bench --device cuda" | tee "$OUT/bench.txt"
( time "$BIN" bench --device cuda ) 2>&1 | tee -a "$OUT/bench.txt"
fi

echo "== flowmatch run configs/lesson_moons.toml --device cuda" | tee "$OUT/lesson_moons.txt"
( time "$BIN" run configs/lesson_moons.toml --device cuda --out "$RUNS" ) 2>&1 | tee -a "$OUT/lesson_moons.txt"
cp "$RUNS/lesson_moons/summary.json" "$OUT/lesson_moons_summary.json" 2>/dev/null
cp "$RUNS/lesson_moons/timing.json" "$OUT/lesson_moons_timing.json" 2>/dev/null

echo "== flowmatch run configs/mnist.toml --device cuda --set train.steps=${MNIST_STEPS} (limit ${MNIST_LIMIT} s)" | tee "$OUT/mnist.txt"
( time timeout "$MNIST_LIMIT" "$BIN" run configs/mnist.toml --device cuda --set train.steps="$MNIST_STEPS" --out "$RUNS" ) 2>&1 | tail -40 | tee -a "$OUT/mnist.txt"
grep -h '"progress"' "$RUNS"/mnist/metrics.jsonl 2>/dev/null | tail -3 >> "$OUT/mnist.txt"
cp "$RUNS/mnist/summary.json" "$OUT/mnist_summary.json" 2>/dev/null
cp "$RUNS/mnist/samples_grid.png" "$OUT/" 2>/dev/null
exit 0
