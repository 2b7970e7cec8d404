#!/usr/bin/env bash
# Spread a flowmatch sweep over a Slurm job array: task I runs shard I/N of the sweep.
#
#   scripts/slurm_sweep.sh configs/sweep_lesson.toml 8 [extra sbatch args…]
#
# submits an array of N tasks (0..N-1), each running `flowmatch sweep SWEEP --shard I/N`
# into the same results folder, then a dependent job that merges the shards' results into
# summary.csv / summary.md (`flowmatch merge`). Finished runs are skipped on resubmission.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SWEEP.toml N_SHARDS [sbatch args...]" >&2
  exit 2
fi
sweep=$1; shards=$2; shift 2
bin=${FM_BIN:-target/release/flowmatch}
out=${FM_OUT:-results/runs}
jobs=${FM_JOBS:-${SLURM_CPUS_PER_TASK:-1}}
[ -x "$bin" ] || { echo "error: $bin not found: run cargo build --release first" >&2; exit 1; }
[ -f "$sweep" ] || { echo "error: sweep file $sweep not found" >&2; exit 1; }
case $shards in ''|*[!0-9]*|0) echo "error: N_SHARDS must be a positive integer" >&2; exit 2;; esac
name=$(basename "$sweep" .toml)
mkdir -p "$out/slurm-logs"

array_id=$(sbatch --parsable --job-name="fm-$name" --array=0-$((shards - 1)) \
  --output="$out/slurm-logs/$name-%A_%a.out" "$@" \
  --wrap="$bin sweep $sweep --shard \${SLURM_ARRAY_TASK_ID}/$shards --jobs $jobs --out $out --quiet")
merge_id=$(sbatch --parsable --job-name="fm-$name-merge" --dependency=afterany:"$array_id" \
  --output="$out/slurm-logs/$name-merge-%j.out" \
  --wrap="$bin merge $out/$name")
echo "submitted array $array_id ($shards shards) and merge job $merge_id; results in $out/$name/"
