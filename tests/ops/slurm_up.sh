#!/usr/bin/env bash
# Bring up a single-node SLURM on this host (controller + compute node) for tests/ops/test_slurm.py.
# Idempotent: installs Debian's slurm-wlm + munge only when missing, rewrites the config only
# when it changed, and (re)starts munged/slurmctld/slurmd only when they are not up.
# Needs root and apt-get (Debian/Ubuntu). Exit codes: 0 up, 2 cannot run here (not root / no apt).
#
#   sudo tests/ops/slurm_up.sh            # then: sinfo; sbatch --wrap hostname
#   SLURM_UP_PARTITION=debug  (default)   partition name
#   SLURM_UP_GPUS=1           (default)   one fake GPU (gres on /dev/null) so `--gpus=1` schedules; 0: none
#   SLURM_UP_FORCE=1                      overwrite an /etc/slurm/slurm.conf this script did not write
set -euo pipefail
start=$(date +%s)
PARTITION=${SLURM_UP_PARTITION:-debug}
NGPUS=${SLURM_UP_GPUS:-1}

log() { echo "[slurm_up] $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then log "needs root"; exit 2; fi
case "$NGPUS" in 0|1) ;; *) log "SLURM_UP_GPUS must be 0 or 1"; exit 1 ;; esac
MARKER="# written by tests/ops/slurm_up.sh"
# never clobber a real cluster's configuration
if [ -s /etc/slurm/slurm.conf ] && ! head -1 /etc/slurm/slurm.conf | grep -qF "$MARKER" \
   && [ "${SLURM_UP_FORCE:-0}" != 1 ]; then
  log "/etc/slurm/slurm.conf exists and was not written by this script (SLURM_UP_FORCE=1 overrides)"
  exit 2
fi

# --- packages --------------------------------------------------------------------------
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
   || ! command -v sinfo >/dev/null; then
  if ! command -v apt-get >/dev/null; then log "needs apt-get (Debian/Ubuntu) to install SLURM"; exit 2; fi
  export DEBIAN_FRONTEND=noninteractive
  log "installing slurm-wlm + munge"
  apt-get update -qq || { log "apt-get update failed (no network?)"; exit 2; }
  # policy-rc.d keeps the package scripts from starting daemons (no init system in containers);
  # we start them below with our own config.
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  if [ $had_policy -eq 0 ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; fi
  rc=0; apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null || rc=$?
  if [ $had_policy -eq 0 ]; then rm -f /usr/sbin/policy-rc.d; fi
  if [ $rc -ne 0 ]; then log "apt-get install slurm-wlm munge failed ($rc)"; exit 2; fi
fi

# --- munge -----------------------------------------------------------------------------
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  log "creating munge key"
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  log "starting munged"
  rm -f /run/munge/munged.pid
  su -s /bin/sh munge -c "/usr/sbin/munged --force" || /usr/sbin/munged --force
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.2; done
fi

# --- slurm.conf ------------------------------------------------------------------------
HOST=$(hostname -s)
# nproc honours OMP_NUM_THREADS (set by test runs): ask for the online CPUs without it
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
# leave ~10% of RAM (at least 512 MB) to the OS: slurmd refuses a RealMemory above what it sees
MEM_MB=$(awk '/MemTotal/ {printf "%d", $2/1024}' /proc/meminfo)
REAL_MB=$(( MEM_MB - (MEM_MB / 10 > 512 ? MEM_MB / 10 : 512) ))
CONF_DIR=/etc/slurm
install -d "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm
GRES_NODE=""; GRES_TYPES=""
if [ "$NGPUS" -gt 0 ]; then GRES_NODE=" Gres=gpu:$NGPUS"; GRES_TYPES="GresTypes=gpu"; fi

new_conf=$(cat <<CONF
$MARKER: single node, no accounting, no cgroup enforcement
ClusterName=avepipe-test
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
# containers have no (delegated) cgroups: track processes by parent id, no task binding
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
ReturnToService=2
# cons_tres is what schedules --gpus/--gres; memory is a consumable so --mem is checked
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
$GRES_TYPES
# accounting off: sacct has no database, so Snakemake's plugin polls squeue, which only
# sees finished jobs for MinJobAge seconds
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
InactiveLimit=0
KillWait=10
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
NodeName=$HOST CPUs=$CPUS RealMemory=$REAL_MB$GRES_NODE State=UNKNOWN
PartitionName=$PARTITION Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
)
new_gres=""
# a fake GPU: 22.05's slurmd reports 0 for a gpu gres with only Count= (node goes INVAL),
# so point it at /dev/null; jobs asking --gpus=1 get scheduled (CUDA_VISIBLE_DEVICES=0)
[ "$NGPUS" -gt 0 ] && new_gres="NodeName=$HOST Name=gpu File=/dev/null"

changed=0
if [ "$(cat $CONF_DIR/slurm.conf 2>/dev/null)" != "$new_conf" ]; then
  printf '%s\n' "$new_conf" > $CONF_DIR/slurm.conf; changed=1
fi
if [ "$(cat $CONF_DIR/gres.conf 2>/dev/null)" != "$new_gres" ]; then
  printf '%s\n' "$new_gres" > $CONF_DIR/gres.conf; changed=1
fi
# slurmd always loads a cgroup plugin (22.05 has no `disabled`); with proctrack/linuxproc and
# task/none it only reads the hierarchy. Pick the one this host mounts.
if [ -e /sys/fs/cgroup/cgroup.controllers ]; then
  new_cgroup=$'CgroupPlugin=cgroup/v2\nIgnoreSystemd=yes'
else
  new_cgroup="CgroupPlugin=cgroup/v1"
fi
if [ "$(cat $CONF_DIR/cgroup.conf 2>/dev/null)" != "$new_cgroup" ]; then
  printf '%s\n' "$new_cgroup" > $CONF_DIR/cgroup.conf; changed=1
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() {  # stop a daemon we started earlier, by its pid file
  if running "$1"; then
    local pid; pid=$(cat "$1"); kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
}
if [ $changed -eq 1 ]; then
  log "config changed: (re)starting slurm daemons"
  stop /run/slurm/slurmd.pid; stop /run/slurm/slurmctld.pid
fi

# --- daemons ---------------------------------------------------------------------------
if ! running /run/slurm/slurmctld.pid; then
  log "starting slurmctld"
  # -c: clean start (the test cluster keeps no state between runs worth restoring)
  /usr/sbin/slurmctld -c
fi
for _ in $(seq 100); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
if ! running /run/slurm/slurmd.pid; then
  log "starting slurmd"
  /usr/sbin/slurmd
fi

# --- wait until the node is idle ----------------------------------------------------------
state=""
for _ in $(seq 150); do
  state=$(sinfo -h -n "$HOST" -o '%T' 2>/dev/null | head -1 || true)
  case "$state" in
    idle|mixed|allocated) break ;;
    inval*) break ;;
    down*|drain*|*fail*) scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
  esac
  sleep 0.2
done
sinfo -N -l >&2 || true
case "$state" in
  idle|mixed|allocated) ;;
  *) log "node $HOST is '$state', not idle: see /var/log/slurm/slurmd.log and slurmctld.log"
     tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
     exit 1 ;;
esac
log "SLURM up in $(( $(date +%s) - start )) s: partition=$PARTITION node=$HOST cpus=$CPUS mem=${REAL_MB}M gpus=$NGPUS"
# machine-readable last line for the test
echo "partition=$PARTITION node=$HOST cpus=$CPUS mem_mb=$REAL_MB gpus=$NGPUS"
