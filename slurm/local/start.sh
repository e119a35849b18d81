#!/usr/bin/env bash
# Start a single-node SLURM on 127.0.0.1 for tests and for trying `dinotrain submit`: munged, slurmctld
# and slurmd as root, without systemd or cgroups, then wait until the node is idle (~15 s).
#
# Writes /etc/slurm/slurm.conf (refuses to overwrite one it did not write) and keeps all state under
# $DINOTRAIN_SLURM_STATE (default /var/tmp/dinotrain-slurm). No accounting database: `sacct` does not
# work, so `dinotrain submit` reads job states from `squeue` (see dinotrain/launch/slurm.py).
# Fast requeue (~20 s instead of minutes): short credential lifetime and a scheduler pass every second.
set -euo pipefail
STATE=${DINOTRAIN_SLURM_STATE:-/var/tmp/dinotrain-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# written by dinotrain slurm/local/start.sh"
HOST=$(hostname -s)
# nproc honours OMP_NUM_THREADS (tests run with 1): the node's cores without it, or the node gets 1 CPU and a
# 2-task job pends forever (PartitionConfig)
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))

if [ "$(id -u)" != 0 ]; then echo "start.sh: run as root" >&2; exit 1; fi
for cmd in munged slurmctld slurmd sinfo; do
    command -v "$cmd" >/dev/null || { echo "start.sh: $cmd not found; run slurm/local/install.sh first" >&2; exit 1; }
done
if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
    echo "start.sh: $CONF exists and was not written by this script; not touching a real cluster's config" >&2
    exit 1
fi
if pgrep -x slurmctld >/dev/null || pgrep -x slurmd >/dev/null; then
    echo "start.sh: slurmctld/slurmd already running; stop them first (slurm/local/stop.sh)" >&2
    exit 1
fi

# jobs find their master process by the node's name (submitit exports MASTER_ADDR=<first node>): make it resolve
if ! getent hosts "$HOST" >/dev/null; then
    echo "127.0.0.1 $HOST" >> /etc/hosts
    echo "start.sh: $HOST did not resolve; added it to /etc/hosts as 127.0.0.1"
fi

mkdir -p "$STATE"/ctld "$STATE"/d /etc/slurm /run/munge /var/log/munge /var/lib/munge
cat > "$CONF" <<CONF
$MARK
ClusterName=dinotrain-local
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=5
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
JobRequeue=1
MinJobAge=3600
KillWait=10
ReturnToService=2
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF

# munge: a key readable by root only is enough when every daemon runs as root
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
fi
chown -R root:root /etc/munge /run/munge /var/log/munge /var/lib/munge
chmod 700 /etc/munge /var/lib/munge /var/log/munge
chmod 600 /etc/munge/munge.key
chmod 755 /run/munge
pgrep -x munged >/dev/null || munged --force
slurmctld -i          # -i: ignore state left by an earlier run's config
slurmd
for _ in $(seq 1 120); do
    state=$(sinfo -h -n "$HOST" -o %T 2>/dev/null || true)
    if [ "$state" = idle ]; then
        echo "local SLURM up: node $HOST ($CPUS CPUs, ${MEM_MB} MB), partition debug, state in $STATE"
        exit 0
    fi
    sleep 0.5
done
echo "start.sh: node did not become idle in 60 s (state: ${state:-unknown}); see $STATE/slurmctld.log and $STATE/slurmd.log" >&2
exit 1
