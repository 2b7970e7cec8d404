#!/usr/bin/env bash
# flowmatch against PyTorch on the seeds' workloads, on this machine, side by side.
#
#   scripts/bench.sh            # ROUNDS=2 by default -> results/BENCHMARKS.md
#
# Each round runs flowmatch's criterion benches (train_step, hungarian, sampling, unet) and then
# scripts/bench_reference.py (PyTorch + SciPy, installed from PyPI into .venv-bench), so that
# both sides see the same machine state; the table keeps the best round of each. A last pass
# times one whole lesson run on each side (training, then the same evaluation: exact W2 and
# MMD at 6 Euler step counts, straightness; SciPy's Hungarian on the PyTorch side) and
# measures its peak memory (max RSS).
# Both sides use one thread (RAYON_NUM_THREADS=1, BENCH_THREADS=1) unless told otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} BENCH_THREADS=${BENCH_THREADS:-1}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flowmatch-target}"
VENV=.venv-bench
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import torch, scipy' 2>/dev/null; then
  echo "== installing torch, numpy, scipy into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch numpy scipy
fi

cargo build --release -q -p flowmatch-experiments
cargo bench -q --no-run -p flowmatch-losses --bench train_step 2>/dev/null
cargo bench -q --no-run -p flowmatch-solvers --bench sampling 2>/dev/null
cargo bench -q --no-run -p flowmatch-models --bench unet 2>/dev/null

for r in $(seq "$ROUNDS"); do
  echo "== round $r/$ROUNDS: flowmatch"
  cargo bench -q -p flowmatch-losses --bench train_step >/dev/null 2>&1
  cargo bench -q -p flowmatch-solvers --bench sampling >/dev/null 2>&1
  cargo bench -q -p flowmatch-models --bench unet -- 'unet_fwd_bwd|gemm_ceiling' >/dev/null 2>&1
  for f in "$CARGO_TARGET_DIR"/criterion/*/*/new/estimates.json; do
    name=$(basename "$(dirname "$(dirname "$(dirname "$f")")")")/$(basename "$(dirname "$(dirname "$f")")")
    "$VENV/bin/python" -c 'import json,sys; e=json.load(open(sys.argv[1])); print(json.dumps({"side":"flowmatch","name":sys.argv[2],"ms":e["median"]["point_estimate"]/1e6}))' "$f" "$name" >> "$OUT/rows.jsonl"
  done
  echo "== round $r/$ROUNDS: PyTorch"
  "$VENV/bin/python" scripts/bench_reference.py | sed 's/^{/{"side": "pytorch", /' >> "$OUT/rows.jsonl"
done

# The PyTorch script computes the eval table, straightness and S, not the likelihood: the
# flowmatch run leaves its NLL out to time the same work.
echo "== one lesson run end to end (configs/lesson_moons.toml): wall time and peak memory"
/usr/bin/time -f '%M %e' -o "$OUT/fm.mem" "$CARGO_TARGET_DIR/release/flowmatch" run configs/lesson_moons.toml \
  --out "$OUT/runs" --set logging.plots=false --set eval.nll_samples=0 >/dev/null 2>&1
/usr/bin/time -f '%M %e' -o "$OUT/py.mem" "$VENV/bin/python" scripts/bench_reference.py --lesson-run --metrics >/dev/null

{
  echo "cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
  echo "cores=$(nproc)"
  echo "rustc=$(rustc --version)"
  echo "torch=$("$VENV/bin/python" -c 'import torch, scipy; print(torch.__version__, "/ scipy", scipy.__version__)')"
  echo "fm_mem=$(cat "$OUT/fm.mem")"
  echo "py_mem=$(cat "$OUT/py.mem")"
  echo "rounds=$ROUNDS"
  echo "threads=$RAYON_NUM_THREADS"
} > "$OUT/machine.env"

"$VENV/bin/python" - "$OUT" > results/BENCHMARKS.md <<'EOF'
import json, sys
out = sys.argv[1]
env = dict(l.rstrip("\n").split("=", 1) for l in open(f"{out}/machine.env"))
best = {}
for l in open(f"{out}/rows.jsonl"):
    r = json.loads(l)
    k = (r["side"], r["name"])
    best[k] = min(best.get(k, float("inf")), r["ms"])
pairs = [  # (flowmatch criterion id, PyTorch workload, what, goal as a max ratio fm/py)
    ("train_step/blog_velocitynet_h64_b2048", "train_step/blog", "blog training step (VelocityNet h=64, batch 2048)", 1 / 1.5),
    ("train_step/lesson_velocitymlp_h128_b256", "train_step/lesson", "lesson training step (VelocityMLP h=128, batch 256)", 1 / 1.5),
    ("train_step/lesson_otcfm_h128_b256", "train_step/otcfm", "OT-CFM training step (lesson, batch 256; next batch paired on a 2nd thread)", None),
    ("train_step/lesson_otcfm_h128_b256_serial", "train_step/otcfm", "OT-CFM training step (lesson, batch 256; all on one thread)", None),
    ("hungarian/n256", "hungarian/n256", "Hungarian n=256 (vs SciPy)", None),
    ("hungarian/n512", "hungarian/n512", "Hungarian n=512 (vs SciPy)", None),
    ("hungarian/n1024", "hungarian/n1024", "Hungarian n=1024 (vs SciPy)", 0.5),
    ("hungarian/pathfinding_n256", "hungarian/n256", "Hungarian n=256, `loss.ot_solver = \"pathfinding\"` (vs SciPy)", None),
    ("hungarian/pathfinding_n512", "hungarian/n512", "Hungarian n=512, `loss.ot_solver = \"pathfinding\"` (vs SciPy)", None),
    ("hungarian/pathfinding_n1024", "hungarian/n1024", "Hungarian n=1024, `loss.ot_solver = \"pathfinding\"` (vs SciPy)", None),
    ("sample/euler100", "sample/euler100", "sampling 10k points, Euler 100 steps", 0.5),
    ("sample/rk4_20", "sample/rk4_20", "sampling 10k points, RK4 20 steps", 0.5),
    ("unet_fwd_bwd_b64/unet_lesson_h32", "unet/lesson_h32", "lesson VelocityUNet (h=32), batch 64 × 1 × 28 × 28, forward + backward", 0.8),
    ("unet_fwd_bwd_b64/unet_h16", "unet/flowmatch_h16", "flowmatch `unet` (h=16) and its PyTorch twin, batch 64, forward + backward", 0.8),
]
print("# Benchmarks: flowmatch vs PyTorch on the seeds' workloads\n")
print("Generated by `scripts/bench.sh` (regenerate: `scripts/bench.sh`; `ROUNDS=3` for more).")
print(f"Machine: {env['cpu']}, {env['cores']} cores; {env['rustc']}; PyTorch {env['torch']}.")
print(f"Both sides on {env['threads']} thread(s) (the prefetched OT-CFM row adds flowmatch's one "
      f"pairing thread); best of {env['rounds']} alternating rounds; times are medians per iteration.\n")
print("| workload | flowmatch (ms) | PyTorch (ms) | ratio fm/PyTorch | goal | met |")
print("|---|---:|---:|---:|---|---|")
for fm, py, what, goal in pairs:
    a, b = best.get(("flowmatch", fm)), best.get(("pytorch", py))
    if a is None or b is None:
        print(f"| {what} | {a} | {b} | - | - | - |")
        continue
    g = "-" if goal is None else f"<= {goal:.2f}"
    met = "-" if goal is None else ("yes" if a / b <= goal else "**no**")
    print(f"| {what} | {a:.3f} | {b:.3f} | {a / b:.3f} | {g} | {met} |")
ot, ind = best.get(("flowmatch", pairs[2][0])), best.get(("flowmatch", pairs[1][0]))
pot, pind = best.get(("pytorch", "train_step/otcfm")), best.get(("pytorch", "train_step/lesson"))
fm_kb, fm_s = env["fm_mem"].split()
py_kb, py_s = env["py_mem"].split()
print("\n| ratio | flowmatch | PyTorch/SciPy (TorchCFM-style) | goal | met |")
print("|---|---:|---:|---|---|")
serial = best.get(("flowmatch", pairs[3][0]))
if ot and ind and pot and pind:
    print(f"| OT-CFM step / I-CFM step (batch 256; as `flowmatch run` trains: `train.prefetch`) | {ot / ind:.2f} | {pot / pind:.2f} | <= 1.5 | "
          f"{'yes' if ot / ind <= 1.5 else '**no**'} |")
if serial and ind and pot and pind:
    print(f"| OT-CFM step / I-CFM step (batch 256; one thread, `train.prefetch = false`) | {serial / ind:.2f} | {pot / pind:.2f} | <= 1.5 | "
          f"{'yes' if serial / ind <= 1.5 else '**no**'} |")
print(f"| peak memory of a lesson run, MiB | {int(fm_kb) / 1024:.0f} | {int(py_kb) / 1024:.0f} | "
      f"<= PyTorch | {'yes' if int(fm_kb) <= int(py_kb) else '**no**'} |")
e2e = float(fm_s) / float(py_s)
print(f"| lesson run end to end, wall-clock s (ratio fm/PyTorch: {e2e:.2f}) | {float(fm_s):.1f} | {float(py_s):.1f} | "
      f"<= 0.5 | {'yes' if e2e <= 0.5 else '**no**'} |")
# The U-Nets' arithmetic: multiply-adds of every conv at batch 64 (forward; the backward's
# data and weight gradients are two more of each), against this core's 512³ sgemm.
unet_gflop = {"unet_fwd_bwd_b64/unet_lesson_h32": ("unet/lesson_h32", 6 * 64 * 22.15e6 / 1e9),
              "unet_fwd_bwd_b64/unet_h16": ("unet/flowmatch_h16", 6 * 64 * 26.77e6 / 1e9)}
ceiling = best.get(("flowmatch", "gemm_ceiling/sgemm_512"))
torch_mm = best.get(("pytorch", "gemm/sgemm_512"))
if ceiling and torch_mm:
    rate = lambda ms: 2 * 512 ** 3 / (ms / 1e3) / 1e9
    peak, top = rate(ceiling), rate(torch_mm)
    print(f"\n**The U-Nets' arithmetic.** A matrix product of 512³ runs at {peak:.0f} GFLOP/s on one core "
          f"here with the `gemm` crate (candle's matmuls; on x86 it runs AVX2 unless its `x86-v4` feature, "
          f"which would change candle's bits on AVX-512 machines, is on) and at {top:.0f} GFLOP/s in PyTorch "
          f"(`torch.mm`, with AVX-512 where the CPU has it): the core's sgemm rate. flowmatch's convolutions "
          f"run on its own direct, Winograd and sub-pixel kernels (AVX-512 where there). In GFLOP/s of each "
          f"step (3× the forward's multiply-adds ×2, counted as PyTorch runs the model; flowmatch's `unet` "
          f"computes its up path at the low resolution and Winograd needs fewer products, so its figures are "
          f"effective rates):\n")
    print("| U-Net step | flops | flowmatch | PyTorch | the goal (0.8× PyTorch's time) needs |")
    print("|---|---:|---:|---:|---:|")
    for fm, (py, g) in unet_gflop.items():
        a, b = best.get(("flowmatch", fm)), best.get(("pytorch", py))
        if a and b:
            print(f"| {fm.split('/')[1]} | {g:.2f} G | {g / a * 1e3:.0f} | {g / b * 1e3:.0f} | "
                  f"{g / (b * 0.8) * 1e3:.0f} ({100 * g / (b * 0.8) * 1e3 / top:.0f}% of PyTorch's 512³ product) |")
print(f"\nLesson run: flowmatch `run configs/lesson_moons.toml` (5000 steps, then the full evaluation: "
      f"exact W2 and MMD at 6 Euler step counts on 2000 samples, straightness, Liu's S; no figures, and no NLL, which the PyTorch script does not compute); "
      f"the PyTorch + SciPy script (`bench_reference.py --lesson-run --metrics`: the same training, "
      f"then the same metrics, W2 by SciPy's linear_sum_assignment).")
EOF
scripts/bench_sinkhorn.sh
echo "== wrote results/BENCHMARKS.md"
cat results/BENCHMARKS.md
