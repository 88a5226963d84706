#!/usr/bin/env bash
# Stop the CI cluster of .ci/slurm/setup.sh: cancel jobs, then slurmd, slurmctld, munged. Always safe to call
# (nothing running, nothing installed: it just returns 0).
set -u

log() { echo "[slurm-stop] $*" >&2; }

# jobs first, so that no job step outlives its slurmd
if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
    timeout 10 scancel --full --user=root >/dev/null 2>&1 || true
fi

# stop_daemon NAME PIDFILE: SIGTERM the pid from its pid file (else the process of that exact name), wait, SIGKILL.
# shellcheck disable=SC2086  # $pids may hold several pids
stop_daemon() {
    local name=$1 pidfile=$2 pids=""
    [ -s "$pidfile" ] && pids=$(cat "$pidfile" 2>/dev/null)
    # only trust the pid file when it names a live process of that name
    if [ -n "$pids" ] && [ "$(ps -o comm= -p "$pids" 2>/dev/null)" != "$name" ]; then pids=""; fi
    [ -z "$pids" ] && pids=$(pgrep -x "$name" || true)
    [ -z "$pids" ] && { rm -f "$pidfile"; return 0; }
    log "stopping $name ($pids)"
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 20); do
        kill -0 $pids 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL $pids 2>/dev/null || true
    rm -f "$pidfile"
}

stop_daemon slurmd /run/slurm/slurmd.pid
# a job's slurmstepd whose slurmd is gone
for pid in $(pgrep -x slurmstepd || true); do kill -KILL "$pid" 2>/dev/null || true; done
stop_daemon slurmctld /run/slurm/slurmctld.pid
stop_daemon munged /run/munge/munged.pid
exit 0
