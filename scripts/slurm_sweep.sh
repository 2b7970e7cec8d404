#!/usr/bin/env bash
# Spread a flowmatch sweep over a Slurm job array: task I runs shard I/N of the sweep.
#
#   scripts/slurm_sweep.sh configs/sweep_lesson.toml 8 [extra sbatch args…]
#   scripts/slurm_sweep.sh configs/sweep_lesson.toml 4 --cpus-per-task=2 --time=01:00:00
#   scripts/slurm_sweep.sh configs/mnist_sweep.toml 2 --gres=gpu:1
#
# submits an array of N tasks (0..N-1), each running `flowmatch sweep SWEEP --shard I/N`
# into the same results folder, then a dependent job that merges the shards' results into
# summary.csv / summary.md (`flowmatch merge`; it fails, naming them, while runs are missing).
#
# Resources: each task runs --cpus-per-task runs at a time (`--jobs`); with a GPU allocated
# (--gres=gpu:1) the runs use it (`--set device=cuda`).
# Preemption and time limits: tasks are submitted with --requeue and --signal=B:TERM@SECS
# (FM_SIGNAL_SECS, default 120): on SIGTERM (preemption, `scontrol requeue`, or SECS before
# the time limit) every run writes a checkpoint and flowmatch exits with 75; the task then
# requeues itself and, when it runs again, continues from the checkpoints. Finished runs are
# skipped on resubmission.
#
# Environment: FM_BIN (default target/release/flowmatch), FM_OUT (default results/runs).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 SWEEP.toml N_SHARDS [sbatch args...]" >&2
  exit 2
fi
sweep=$1; shards=$2; shift 2
bin=${FM_BIN:-target/release/flowmatch}
out=${FM_OUT:-results/runs}
signal_secs=${FM_SIGNAL_SECS:-120}
[ -x "$bin" ] || { echo "error: $bin not found: run cargo build --release first" >&2; exit 1; }
[ -f "$sweep" ] || { echo "error: sweep file $sweep not found" >&2; exit 1; }
case $shards in ''|*[!0-9]*|0) echo "error: N_SHARDS must be a positive integer" >&2; exit 2;; esac
command -v sbatch >/dev/null || { echo "error: sbatch not found (is Slurm installed? scripts/slurm-local.sh up starts a local one)" >&2; exit 1; }
# The one-node cluster of scripts/slurm-local.sh, when it is the one running and no other is
# named: its slurm.conf is found without an export.
if [ -z "${SLURM_CONF:-}" ]; then
  local_conf=${FM_SLURM_DIR:-/tmp/flowmatch-slurm}/slurm.conf
  if [ -f "$local_conf" ] && [ ! -e /etc/slurm/slurm.conf ]; then
    export SLURM_CONF=$local_conf
    echo "using the local cluster of scripts/slurm-local.sh: SLURM_CONF=$SLURM_CONF"
  fi
fi
# Absolute paths: the jobs may start in another folder.
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
sweep=$(cd "$(dirname "$sweep")" && pwd)/$(basename "$sweep")
mkdir -p "$out/slurm-logs"
out=$(cd "$out" && pwd)
# The sweep's folder name, as flowmatch plans it (its `name`, else the file's stem).
name=$(sed -n 's/^name *= *"\([^"]*\)".*/\1/p' "$sweep" | head -n 1)
[ -n "$name" ] || name=$(basename "$sweep" .toml)

q() { printf '%q' "$1"; }
array_id=$(sbatch --parsable --job-name="fm-$name" --array=0-$((shards - 1)) \
  --requeue --signal=B:TERM@"$signal_secs" \
  --output="$out/slurm-logs/$name-%A_%a.out" --open-mode=append "$@" <<EOF
#!/bin/bash
# One shard of the sweep, as a job step (srun), so that \`scancel --signal=TERM\` (which signals
# the steps) reaches flowmatch; SIGTERM to the batch shell (--signal=B:TERM) is passed on too.
jobs=\${SLURM_CPUS_PER_TASK:-1}
device=()
if [ -n "\${SLURM_JOB_GPUS:-}\${SLURM_GPUS_ON_NODE:-}" ] && [ "\${SLURM_GPUS_ON_NODE:-1}" != 0 ]; then
  device=(--set device=cuda)
fi
echo "== \$(date -Is) task \$SLURM_ARRAY_TASK_ID/$shards on \$(hostname), \$jobs run(s) at a time \${device[*]} (restart \${SLURM_RESTART_COUNT:-0})"
srun --ntasks=1 --cpus-per-task="\$jobs" --kill-on-bad-exit=0 $(q "$bin") sweep $(q "$sweep") --shard "\$SLURM_ARRAY_TASK_ID/$shards" --jobs "\$jobs" --out $(q "$out") --quiet "\${device[@]}" &
pid=\$!
trap 'kill -TERM \$pid 2>/dev/null' TERM
wait \$pid; rc=\$?
# A trapped signal interrupts wait: wait until flowmatch has written its checkpoints.
while kill -0 \$pid 2>/dev/null; do wait \$pid; rc=\$?; done
if [ \$rc -eq 75 ]; then
  echo "== \$(date -Is) stopped with checkpoints; requeueing to continue"
  scontrol requeue "\${SLURM_ARRAY_JOB_ID}_\${SLURM_ARRAY_TASK_ID}" 2>/dev/null || true
fi
exit \$rc
EOF
)
merge_id=$(sbatch --parsable --job-name="fm-$name-merge" --dependency=afterany:"$array_id" \
  --output="$out/slurm-logs/$name-merge-%j.out" \
  --wrap="$(q "$bin") merge $(q "$out/$name")")
echo "submitted array $array_id ($shards shards) and merge job $merge_id; results in $out/$name/"
