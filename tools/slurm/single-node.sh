#!/usr/bin/env bash
# A throw-away single-node Slurm cluster on this machine, for testing `snakemake --executor slurm`.
#
#   tools/slurm/single-node.sh up     install (Debian packages) and start munge, slurmctld, slurmd
#   tools/slurm/single-node.sh down   stop the daemons this script started (by their pid files)
#
# Root only (it writes /etc/slurm and starts daemons). One node named localhost with all CPUs,
# 90 % of the memory (more than slurmd detects would drain the node) and, with FAKE_GPU=1 (the
# default), one GPU backed by a dummy character device (/dev/nvidia0, major 195): enough for Slurm
# to schedule `--gpus=1` and set CUDA_VISIBLE_DEVICES, not a real GPU. No accounting daemon: the
# plugin must poll with `--slurm-status-command squeue` (sacct would fail and snakemake hang).
# Recipe and traps: shared/research/slurm.md.
set -euo pipefail

FAKE_GPU=${FAKE_GPU:-1}
PIDFILES=(/run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid)

die() { echo "single-node.sh: $*" >&2; exit 1; }

down() {
  for pidfile in "${PIDFILES[@]}"; do
    if [ -s "$pidfile" ]; then
      pid=$(cat "$pidfile")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      rm -f "$pidfile"
    fi
  done
}

up() {
  [ "$(id -u)" = 0 ] || die "must run as root (it installs packages, writes /etc/slurm and starts daemons)"
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null; then
    echo "installing munge and Slurm from Debian..."
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client >/dev/null
  fi
  down  # daemons left over by an earlier run

  local cpus mem gres_types="" gres_node=""
  cpus=$(nproc)
  mem=$(( $(free -m | awk '/^Mem:/{print $2}') * 9 / 10 ))

  [ -s /etc/munge/munge.key ] || mungekey --create --keyfile=/etc/munge/munge.key
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged
  munge -n | unmunge >/dev/null || die "munge does not work"

  mkdir -p /etc/slurm
  if [ "$FAKE_GPU" = 1 ]; then
    # Slurm insists on a character device; a plain file leaves CUDA_VISIBLE_DEVICES empty
    [ -c /dev/nvidia0 ] || { rm -f /dev/nvidia0; mknod /dev/nvidia0 c 195 0; }
    gres_types="GresTypes=gpu"; gres_node="Gres=gpu:1"
    printf 'AutoDetect=off\nName=gpu File=/dev/nvidia0\n' > /etc/slurm/gres.conf
  fi
  install -d /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  cat > /etc/slurm/slurm.conf <<CONF
ClusterName=cribo-ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
MinJobAge=300
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
$gres_types
NodeName=localhost NodeHostname=$(hostname) CPUs=$cpus RealMemory=$mem $gres_node State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld
  slurmd
  for _ in $(seq 100); do
    sinfo -h -o %T 2>/dev/null | grep -qx idle && break
    sleep 0.2
  done
  sinfo -h -o %T | grep -qx idle || { tail -20 /var/log/slurm/slurmd.log >&2; die "the node did not become idle"; }
  sinfo -o '%P %N %T cpus=%c mem=%m gres=%G'
  srun -n1 hostname >/dev/null || die "srun does not work"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
