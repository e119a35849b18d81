#!/usr/bin/env bash
# Install Debian's SLURM (slurm-wlm: slurmctld, slurmd, client commands) and munge, if missing.
# Needs root and the Debian package registry. Idempotent: does nothing when both are installed.
set -euo pipefail
if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
        && command -v munged >/dev/null; then
    echo "slurm and munge already installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm 2>/dev/null)"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (apt-get install slurm-wlm munge)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "installed: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm), $(munged --version 2>&1 | head -1)"
