#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, from Debian's packages, to try the cluster path.
#
#   scripts/slurm-local.sh up      # install slurm-wlm + munge if missing, start munged,
#                                  # slurmctld and slurmd; prints the SLURM_CONF to export
#   scripts/slurm-local.sh down    # stop what `up` started and remove its state
#   scripts/slurm-local.sh status  # sinfo
#
# Everything lives in $FM_SLURM_DIR (default /tmp/flowmatch-slurm): slurm.conf (with this
# machine's real CPUs and memory), state, spool, logs and pid files. No system file is
# touched except munge's own (its key is created by the munge package if missing, and its
# socket folder /run/munge) and, where the machine has no Slurm config of its own, a link
# /etc/slurm/slurm.conf -> $FM_SLURM_DIR/slurm.conf, so that sbatch, squeue, scancel and
# scontrol find this cluster without `export SLURM_CONF=…` (`down` removes the link).
# Run as root (apt-get, and slurmd runs jobs as their user).
set -euo pipefail
DIR=${FM_SLURM_DIR:-/tmp/flowmatch-slurm}
CONF=$DIR/slurm.conf
export SLURM_CONF=$CONF

say() { echo "slurm-local: $*"; }

install() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  [ "$(id -u)" = 0 ] || { say "error: slurm-wlm and munge are missing and installing them needs root" >&2; exit 1; }
  say "installing slurm-wlm and munge (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null || true
  apt-get install -y -qq slurm-wlm munge >/dev/null
}

start_munge() {
  if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    return # a munged already answers
  fi
  # A munged that died leaves its pid file and socket behind.
  rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
  [ -f /etc/munge/munge.key ] || { command -v mungekey >/dev/null && mungekey --create; chown munge:munge /etc/munge/munge.key; }
  mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  touch "$DIR/started-munged"
  for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  say "error: munged does not answer" >&2
  exit 1
}

write_conf() {
  local host cpus mem
  host=$(hostname -s)
  cpus=$(nproc)
  # Leave 1 GiB to the system; RealMemory is in MB.
  mem=$(awk '/MemTotal/ { m = int($2 / 1024) - 1024; print (m > 256 ? m : 256) }' /proc/meminfo)
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/logs"
  cat > "$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $host.
ClusterName=flowmatch
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd.log
# No cgroups: processes are tracked by parentage, which works inside containers too.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
KillWait=30
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

up() {
  install
  mkdir -p "$DIR"
  if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
    say "already up ($CONF)"
    echo "export SLURM_CONF=$CONF"
    return
  fi
  # Daemons of an earlier session are gone: start from clean state (no old jobs recovered).
  rm -rf "$DIR/state" "$DIR/spool" "$DIR"/*.pid
  start_munge
  write_conf
  slurmctld
  slurmd
  # The default config path, where the machine has none of its own.
  # (A link left by an earlier cluster of this script, even a dangling one, is replaced; a
  # real config of the machine is never touched.)
  etc=/etc/slurm/slurm.conf
  if [ -w /etc ] && { [ ! -e "$etc" ] || { [ -L "$etc" ] && grep -q "Written by scripts/slurm-local.sh" "$etc" 2>/dev/null; }; }; then
    { mkdir -p /etc/slurm && ln -sfn "$CONF" "$etc" && touch "$DIR/linked-etc"; } || true
  fi
  for _ in $(seq 100); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      say "up: $(sinfo -h -o '%D node(s), %c CPUs, %m MB, %T')"
      echo "export SLURM_CONF=$CONF"
      return
    fi
    sleep 0.2
  done
  say "error: the node did not come up; see $DIR/logs/" >&2
  tail -n 5 "$DIR/logs/slurmd.log" "$DIR/logs/slurmctld.log" >&2 || true
  exit 1
}

down() {
  if [ -f "$CONF" ]; then
    scancel --user="$(id -un)" 2>/dev/null || true
  fi
  for d in slurmd slurmctld; do
    if [ -f "$DIR/$d.pid" ]; then
      kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true
    fi
  done
  sleep 1
  if [ -f "$DIR/started-munged" ] && [ -f /run/munge/munged.pid ]; then
    kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
  fi
  if [ -f "$DIR/linked-etc" ] && [ "$(readlink /etc/slurm/slurm.conf 2>/dev/null)" = "$CONF" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  rm -rf "$DIR"
  say "down"
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
