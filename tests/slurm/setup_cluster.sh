#!/usr/bin/env bash
# Start a single-node Slurm cluster on this machine (as root), idempotently.
#
#   tests/slurm/setup_cluster.sh [STATE_DIR]     # default: /tmp/chg-lens-slurm
#   tests/slurm/teardown_cluster.sh [STATE_DIR]  # stops the daemons started here, by pid file
#
# Installs slurm-wlm and munge from Debian (apt-get update once) when they are missing, writes a
# slurm.conf with state/spool/log/pid paths under STATE_DIR, starts munged (as the munge user),
# slurmctld and slurmd, and waits until `sinfo` shows the node idle. Running it again while the
# cluster is up does nothing. Prints `SLURM_CONF=...` on its last line; export it before sbatch.
set -euo pipefail
STATE=${1:-/tmp/chg-lens-slurm}
HOST=$(hostname -s)
CPUS=$(nproc)
CONF=$STATE/slurm.conf

if [ "$(id -u)" != 0 ]; then echo "setup_cluster.sh: needs root" >&2; exit 3; fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  command -v apt-get >/dev/null || { echo "setup_cluster.sh: apt-get not available" >&2; exit 4; }
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -q >/dev/null
  apt-get -o DPkg::Lock::Timeout=600 install -y -q slurm-wlm munge >/dev/null
fi

mkdir -p "$STATE"/{state,spool,log,pid}
cat > "$CONF.new" <<CONF
ClusterName=chglens
SlurmctldHost=$HOST
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
SlurmctldPidFile=$STATE/pid/slurmctld.pid
SlurmdPidFile=$STATE/pid/slurmd.pid
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
KillWait=2
MinJobAge=300
NodeName=$HOST CPUs=$CPUS RealMemory=8000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
mv "$CONF.new" "$CONF"
export SLURM_CONF=$CONF

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: run as the munge user, its pid file in our state folder.
if ! alive "$STATE/pid/munged.pid"; then
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  [ -f /etc/munge/munge.key ] || { /usr/sbin/mungekey --create 2>/dev/null || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key; chmod 400 /etc/munge/munge.key
  if pgrep -u munge -x munged >/dev/null; then
    pgrep -u munge -x munged | head -1 > "$STATE/pid/munged.pid"   # already running (started elsewhere)
    touch "$STATE/pid/munged.external"
  else
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    sleep 0.5
    cp /run/munge/munged.pid "$STATE/pid/munged.pid"
  fi
fi
if ! alive "$STATE/pid/slurmctld.pid"; then
  /usr/sbin/slurmctld -f "$CONF"
fi
if ! alive "$STATE/pid/slurmd.pid"; then
  /usr/sbin/slurmd -f "$CONF"
fi

for _ in $(seq 60); do
  state=$(sinfo -h -N -o "%T" 2>/dev/null | head -1 || true)
  case "$state" in idle*|mixed*|allocated*) echo "SLURM_CONF=$CONF"; exit 0;; esac
  [ "$state" = "down" ] || [ "$state" = "drained" ] && scontrol update nodename="$HOST" state=resume 2>/dev/null || true
  sleep 1
done
echo "setup_cluster.sh: the node did not come up; see $STATE/log" >&2
exit 5
