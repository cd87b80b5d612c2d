#!/usr/bin/env bash
# Stop the daemons tests/slurm/setup_cluster.sh started (by their pid files in STATE_DIR).
#   tests/slurm/teardown_cluster.sh [STATE_DIR]     # default: /tmp/chg-lens-slurm
set -uo pipefail
STATE=${1:-/tmp/chg-lens-slurm}
for name in slurmd slurmctld munged; do
  pidfile=$STATE/pid/$name.pid
  [ -f "$pidfile" ] || continue
  if [ "$name" = munged ] && [ -f "$STATE/pid/munged.external" ]; then rm -f "$pidfile"; continue; fi
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  rm -f "$pidfile"
done
echo "stopped the cluster in $STATE"
