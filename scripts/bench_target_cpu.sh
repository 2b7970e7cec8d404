#!/usr/bin/env bash
# Does `-C target-cpu=native` pay? Builds the criterion benches twice, portable (the shipped
# build) and native (its own target dir), runs them alternately and prints the medians.
#
#   scripts/bench_target_cpu.sh          # ROUNDS=2 by default; about 12 min of build + 8 of runs
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-2}
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-1} BENCH_THREADS=${BENCH_THREADS:-1}
PORTABLE="${CARGO_TARGET_DIR:-$HOME/.cache/flowmatch-target}"
NATIVE="${NATIVE_TARGET_DIR:-$HOME/.cache/flowmatch-target-native}"
OUT=$(mktemp)
trap 'rm -f "$OUT"' EXIT

bench() { # bench TARGET_DIR RUSTFLAGS [cargo args...]
  local td=$1 flags=$2
  shift 2
  CARGO_TARGET_DIR=$td RUSTFLAGS=$flags cargo bench -q -p flowmatch-losses --bench train_step "$@"
  CARGO_TARGET_DIR=$td RUSTFLAGS=$flags cargo bench -q -p flowmatch-solvers --bench sampling "$@"
}

for build in "portable|$PORTABLE|" "native|$NATIVE|-C target-cpu=native"; do
  IFS='|' read -r _ td flags <<<"$build"
  bench "$td" "$flags" --no-run 2>/dev/null
done

for r in $(seq "$ROUNDS"); do
  for build in "portable|$PORTABLE|" "native|$NATIVE|-C target-cpu=native"; do
    IFS='|' read -r label td flags <<<"$build"
    echo "== round $r/$ROUNDS: $label" >&2
    bench "$td" "$flags" >/dev/null 2>&1
    for f in "$td"/criterion/{train_step,hungarian,sample}/*/new/estimates.json; do
      name=${f#"$td"/criterion/}
      python3 -c 'import json,sys; e=json.load(open(sys.argv[1])); print(sys.argv[2], sys.argv[3], e["median"]["point_estimate"]/1e6)' \
        "$f" "${name%/new/estimates.json}" "$label" >>"$OUT"
    done
  done
done

python3 - "$OUT" <<'EOF'
import sys, collections
best = collections.defaultdict(dict)
for line in open(sys.argv[1]):
    name, label, ms = line.split()
    best[name][label] = min(float(ms), best[name].get(label, float("inf")))
print("| bench | portable (ms) | native (ms) | native / portable |")
print("|---|---:|---:|---:|")
for name in sorted(best):
    p, n = best[name].get("portable"), best[name].get("native")
    if p and n:
        print(f"| {name} | {p:.3f} | {n:.3f} | {n / p:.2f} |")
EOF
