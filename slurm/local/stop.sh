#!/usr/bin/env bash
# Stop the local SLURM of start.sh cleanly: cancel every job, wait for the queue to empty, then stop
# slurmd, slurmctld and munged. Leaves slurm.conf and the state directory for the next start.
set -uo pipefail
if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
    scancel --full --quiet --user root 2>/dev/null || true
    for _ in $(seq 1 120); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.5
    done
fi
for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
done
for _ in $(seq 1 60); do
    pgrep -x slurmd >/dev/null || pgrep -x slurmctld >/dev/null || pgrep -x munged >/dev/null || break
    sleep 0.25
done
pkill -9 -x slurmd 2>/dev/null; pkill -9 -x slurmctld 2>/dev/null; pkill -9 -x munged 2>/dev/null
echo "local SLURM stopped"
