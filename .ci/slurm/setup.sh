#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost for CI (Debian 12, run as root, no systemd, no cgroups needed).
#   .ci/slurm/setup.sh    install munge + slurmctld + slurmd + slurm-client, write /etc/slurm/slurm.conf,
#                         start munged, slurmctld, slurmd as plain daemons, wait until the node is idle.
#   .ci/slurm/stop.sh     stop them again (always safe to call).
# Idempotent: a second call with the cluster already up and idle does nothing.
#
# Design notes
# - The config lives at the default path /etc/slurm/slurm.conf: the slurm-jobstep executor drops
#   SLURM_CONF before its nested `srun`, so a config elsewhere would be invisible inside jobs.
# - No accounting daemon (accounting_storage/none): snakemake must query job status with `squeue`
#   (profiles/slurm-ci sets slurm-status-command: squeue). squeue only sees a finished job for MinJobAge
#   seconds, so MinJobAge stays at 300 s (the slurm plugin also falls back to sacct when MinJobAge is
#   below 3 x its init interval).
# - No cgroups: proctrack/linuxproc + task/none + jobacct_gather/none. Memory is not a consumable
#   resource (CR_CPU), so --mem only has to fit RealMemory; every CPU is schedulable on its own, so two
#   one-CPU jobs run at once on a 2-core machine.
# - Both partitions of profiles/slurm ("cpu", default, and "gpu") exist on the one node, so either
#   partition name submits; there are no GPUs (no GRES), so jobs must not request gpu.
set -euo pipefail

CONF=/etc/slurm/slurm.conf
LOGDIR=/var/log/slurm
RUNDIR=/run/slurm
TIMEOUT=${SLURM_SETUP_TIMEOUT:-120}   # seconds to wait for the node to become idle

log() { echo "[slurm-setup] $*" >&2; }

node_state() { sinfo -h -N -o '%t' 2>/dev/null | head -n1 || true; }

# 0. Already up? (munge works, slurmctld answers, the node is idle or busy)
if command -v sinfo >/dev/null && [ -f "$CONF" ] && pgrep -x munged >/dev/null && pgrep -x slurmctld >/dev/null \
    && pgrep -x slurmd >/dev/null; then
    case "$(node_state)" in
        idle | mix | alloc) log "cluster already up: $(sinfo -h -N -o '%N %P %t %c CPUs %m MB' | tr '\n' ' ')"; exit 0 ;;
    esac
fi

# 1. Packages (Debian 12: slurm-wlm 22.05, munge 0.5.15). Services are not started by the postinst
#    (no systemd / policy-rc.d), we start the binaries ourselves below.
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v sbatch >/dev/null \
    || ! command -v munged >/dev/null; then
    log "installing slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
fi

# 2. Stop leftovers from an earlier, half-started cluster.
"$(dirname "$0")/stop.sh" >/dev/null 2>&1 || true

# 3. munge: a key (the postinst usually creates one), its directories, the daemon as user munge.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "generating a munge key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key
runuser -u munge -- /usr/sbin/munged --force
for _ in $(seq 20); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n | unmunge >/dev/null || { log "munge does not work"; tail -n 20 /var/log/munge/munged.log >&2; exit 1; }

# 4. slurm.conf for this host. The node line comes from `slurmd -C` (the hardware slurmd will report);
#    RealMemory is lowered by 10% so that a slightly smaller reading never drains the node.
NODE=$(hostname -s)
# slurmd, srun and slurmstepd look their own host name up; make sure it resolves (to loopback if unknown)
getent hosts "$NODE" >/dev/null || echo "127.0.0.1 $NODE" >>/etc/hosts
HW=$(slurmd -C | head -n1)                       # NodeName=vm CPUs=2 Boards=1 ... RealMemory=24105
MEM=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$HW")
MEM=$((MEM * 9 / 10))
TOPO=$(sed -e 's/^NodeName=[^ ]* //' -e 's/ *RealMemory=[0-9]*//' <<<"$HW")   # CPUs=2 Boards=1 ... ThreadsPerCore=1
install -d -m 0755 /etc/slurm "$LOGDIR" "$RUNDIR" /var/spool/slurmctld /var/spool/slurmd
cat >"$CONF" <<EOF
# Written by .ci/slurm/setup.sh: a single-node CI cluster on localhost. Do not use in production.
ClusterName=ci
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=${RUNDIR}/slurmctld.pid
SlurmdPidFile=${RUNDIR}/slurmd.pid
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# no cgroups in the CI sandbox
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
# no accounting daemon: status through squeue (profiles/slurm-ci)
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# scheduling: every CPU on its own, memory not consumable
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# timers: a node that comes back is usable at once; finished jobs stay visible to squeue for 5 min
ReturnToService=2
SlurmctldTimeout=10
SlurmdTimeout=120
MinJobAge=300
KillWait=5
InactiveLimit=0
Waittime=0
NodeName=${NODE} NodeAddr=127.0.0.1 NodeHostname=${NODE} ${TOPO} RealMemory=${MEM} State=UNKNOWN
PartitionName=cpu Nodes=${NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
PartitionName=gpu Nodes=${NODE} Default=NO MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
log "wrote $CONF for node ${NODE}: ${TOPO} RealMemory=${MEM}"

# 5. Daemons: plain binaries (they daemonize themselves). -c: start from a clean state (no old jobs).
slurmctld -c -i
for _ in $(seq 30); do scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 1; done
slurmd
# 6. Wait for the node to register and become idle; resume it if it came up down/drained.
deadline=$((SECONDS + TIMEOUT))
while :; do
    state=$(node_state)
    case "$state" in
        idle | mix | alloc) break ;;
        down* | drain* | drng*) scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    if ((SECONDS > deadline)); then
        log "node ${NODE} is not idle after ${TIMEOUT}s (state: ${state:-none})"
        sinfo -N -l >&2 || true
        scontrol show node "$NODE" >&2 || true
        tail -n 30 "$LOGDIR/slurmctld.log" "$LOGDIR/slurmd.log" >&2 || true
        exit 1
    fi
    sleep 1
done
log "cluster up: $(sinfo -h -N -o '%N %P %t %c CPUs %m MB' | tr '\n' ' ')"
