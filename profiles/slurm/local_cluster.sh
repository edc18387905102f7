#!/usr/bin/env bash
# Start a throw-away single-node SLURM cluster on this machine (for tests and CI, as root):
#   profiles/slurm/local_cluster.sh start     # writes /etc/slurm/slurm.conf if absent, starts munged, slurmctld, slurmd
#   profiles/slurm/local_cluster.sh stop      # stops the daemons this script started
# Needs the Debian packages slurm-wlm and munge.  No accounting (sacct does not work): run Snakemake with
# --slurm-status-command squeue.  The config goes to the default path /etc/slurm/slurm.conf because the
# Snakemake job-step plugin strips SLURM_* variables (SLURM_CONF included) before its inner srun.
set -euo pipefail
STATE=${SLURM_LOCAL_STATE:-/var/tmp/phenoprofiler-slurm}
CONF=/etc/slurm/slurm.conf

start() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null \
    || { echo "slurm-wlm/munge not installed" >&2; exit 3; }
  mkdir -p "$STATE"/{state,spool,log,run} /etc/slurm
  if [ ! -f "$CONF" ]; then
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 8 / 10 ))  # 80 % of RAM, MB
    cat > "$CONF" <<CONF
# Written by profiles/slurm/local_cluster.sh: a single-node test cluster, no accounting.
ClusterName=phenoprofiler
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=300
StateSaveLocation=$STATE/state
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  fi
  if ! pgrep -x munged >/dev/null; then
    [ -f /etc/munge/munge.key ] || mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f
    mkdir -p /run/munge && chown munge:munge /run/munge
    su -s /bin/sh munge -c /usr/sbin/munged
  fi
  pgrep -x slurmctld >/dev/null || /usr/sbin/slurmctld
  pgrep -x slurmd >/dev/null || /usr/sbin/slurmd
  for _ in $(seq 30); do
    if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then sinfo; return 0; fi
    sleep 1
  done
  echo "SLURM did not come up; see $STATE/log/" >&2
  exit 1
}

stop() {
  for pidfile in "$STATE"/run/slurmd.pid "$STATE"/run/slurmctld.pid; do
    [ -f "$pidfile" ] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
