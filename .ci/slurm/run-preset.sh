#!/usr/bin/env bash
# Run the offline preset through the CI SLURM cluster (profiles/slurm-ci), kill one job mid-way, and check
# that snakemake retries it and the workflow still completes.
#
#   .ci/slurm/setup.sh && trap .ci/slurm/stop.sh EXIT     # the caller owns the daemons
#   .ci/slurm/run-preset.sh [CONFIGFILE] [extra snakemake args...]
#
# - The workflow runs in a scratch copy of this tree (sources only: no results/, resources/, logs/,
#   .snakemake/, .venv*), so results of a local run in the checkout neither make this run a no-op nor get
#   overwritten. `python -m trimkv` in the jobs imports the copy (the job's working directory).
# - snakemake / python come from .venv/bin when it exists (make setup), else from PATH; sbatch --export=ALL
#   hands that PATH to the jobs.
# - Once the rule's own command (a process of the job, `scontrol listpids`, whose command line matches
#   $KILL_MATCH) of a job of a rule matching $KILL_RULES has run for $KILL_AFTER seconds, that job is
#   scancel'ed (state CANCELLED = a failed job for snakemake; profiles/slurm-ci has retries: 2).
# - PASS needs: snakemake exit 0, one job killed, and in the log the killed SLURM job reported as failed,
#   "Trying to restart job N", a new submission of job N and "Finished jobid: N".
# Prints "SLURM-PRESET: PASS ..." or "SLURM-PRESET: FAIL ..." as its last line; exit 0 on PASS only.
#
# Environment: KILL_RULES (regex on the rule name, default "train|evaluate"), KILL_MATCH (regex on the
# command line, default "-m trimkv "), KILL_AFTER (s, default 3), RUN_TIMEOUT (s, default 3000),
# SLURM_CI_WORKDIR (scratch dir, default mktemp), SLURM_CI_SRC (tree to copy, default this repo),
# SLURM_CI_LOG (log file, default $SLURM_CI_WORKDIR/slurm-preset.log).
set -uo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
SRC=${SLURM_CI_SRC:-$REPO}
PROFILE="$REPO/profiles/slurm-ci"
KILL_RULES=${KILL_RULES:-train|evaluate}
KILL_AFTER=${KILL_AFTER:-3}
KILL_MATCH=${KILL_MATCH:--m trimkv }
RUN_TIMEOUT=${RUN_TIMEOUT:-3000}

say() { echo "[slurm-preset] $*" >&2; }
result() {
    echo "SLURM-PRESET: $1"
    [ "${1%% *}" = PASS ] && exit 0 || exit 1
}

CONFIG_ARGS=()
if [ $# -gt 0 ] && [ -n "$1" ] && [ "${1#-}" = "$1" ]; then
    [ -f "$1" ] || result "FAIL config file $1 not found"
    CONFIG_ARGS=(--configfile "$(cd "$(dirname "$1")" && pwd)/$(basename "$1")")
    shift
fi

[ -x "$REPO/.venv/bin/snakemake" ] && export PATH="$REPO/.venv/bin:$PATH"
command -v snakemake >/dev/null || result "FAIL snakemake not found (run make setup)"
sinfo -h -o '%t' 2>/dev/null | grep -qE 'idle|mix|alloc' || result "FAIL no SLURM node up (run .ci/slurm/setup.sh)"

WORK=${SLURM_CI_WORKDIR:-$(mktemp -d /tmp/trimkv-slurm-ci.XXXXXX)}
mkdir -p "$WORK"
tar -C "$SRC" -cf - --exclude=./.git --exclude='./.venv*' --exclude=./results --exclude=./resources \
    --exclude=./logs --exclude=./.snakemake --exclude=./benchmarks --exclude='./*.egg-info' \
    --exclude=__pycache__ . | tar -C "$WORK" -xf -
# git of the source tree for the copy (MLflow's git_sha tag); no optional locks: the real index is not written
if [ -d "$SRC/.git" ]; then export GIT_DIR="$SRC/.git" GIT_WORK_TREE="$WORK" GIT_OPTIONAL_LOCKS=0; fi
LOG=${SLURM_CI_LOG:-$WORK/slurm-preset.log}
say "workflow copy: $WORK; log: $LOG; snakemake: $(command -v snakemake)"

cd "$WORK" || result "FAIL cannot cd to $WORK"
start=$SECONDS
snakemake --profile "$PROFILE" "${CONFIG_ARGS[@]}" "$@" >"$LOG" 2>&1 &
SMK=$!
# If we are interrupted, stop snakemake (it scancels its jobs on SIGTERM).
trap 'kill -TERM $SMK 2>/dev/null; sleep 5; kill -KILL $SMK 2>/dev/null; exit 130' INT TERM
trap 'kill -0 $SMK 2>/dev/null && { kill -TERM $SMK; sleep 5; kill -KILL $SMK 2>/dev/null; }' EXIT

# Watch the queue: comment is rule_<name>[_wildcards_...], name is snakemake's run uuid.
killed="" killed_rule=""
declare -A first_seen
while kill -0 $SMK 2>/dev/null; do
    if ((SECONDS - start > RUN_TIMEOUT)); then
        say "timeout after ${RUN_TIMEOUT}s"
        tail -n 40 "$LOG" >&2
        result "FAIL workflow did not finish within ${RUN_TIMEOUT}s"
    fi
    if [ -z "$killed" ]; then
        while IFS='|' read -r id state comment; do
            [ "$state" = RUNNING ] || continue
            rule=${comment#rule_}
            rule=${rule%%_wildcards_*}
            [[ "$rule" =~ ^($KILL_RULES)$ ]] || continue
            # mid-way = the rule's own command (not just the job's snakemake) is running in the job
            busy=""
            for pid in $(scontrol listpids "$id" 2>/dev/null | awk 'NR > 1 {print $1}'); do
                tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qE -- "$KILL_MATCH" && busy=1 && break
            done
            if [ -z "$busy" ]; then
                unset "first_seen[$id]"
                continue
            fi
            : "${first_seen[$id]:=$SECONDS}"
            if ((SECONDS - first_seen[$id] >= KILL_AFTER)); then
                say "killing SLURM job $id ($comment): its command has run $((SECONDS - first_seen[$id]))s"
                scancel "$id" && { killed=$id; killed_rule=$comment; }
                break
            fi
        done < <(squeue -h -t RUNNING -o '%i|%T|%k' 2>/dev/null)
    fi
    sleep 2
done
wait $SMK
rc=$?
trap - EXIT INT TERM
elapsed=$((SECONDS - start))
say "snakemake exited $rc after ${elapsed}s"

fail() {
    tail -n 60 "$LOG" >&2
    result "FAIL $* (log: $LOG)"
}
[ -n "$killed" ] || fail "no job of rules '$KILL_RULES' ran '$KILL_MATCH' for ${KILL_AFTER}s, nothing was killed (nothing to do? exit $rc)"
[ "$rc" -eq 0 ] || fail "snakemake exited $rc after killing SLURM job $killed"
# "Job 7 has been submitted with SLURM jobid 12 (log: ...)."
jobid=$(sed -n "s/^Job \([0-9]*\) has been submitted with SLURM jobid $killed .*/\1/p" "$LOG" | head -n1)
[ -n "$jobid" ] || fail "SLURM job $killed not found in the log"
grep -q "SLURM-job '$killed' failed" "$LOG" || fail "the kill of SLURM job $killed was not reported as a failure"
grep -q "^Trying to restart job $jobid\.\$" "$LOG" || fail "job $jobid (SLURM $killed) was not restarted"
resub=$(sed -n "s/^Job $jobid has been submitted with SLURM jobid \([0-9]*\) .*/\1/p" "$LOG" | grep -vx "$killed" | head -n1)
[ -n "$resub" ] || fail "job $jobid was not resubmitted"
grep -q "^Finished jobid: $jobid " "$LOG" || fail "job $jobid did not finish after its retry"
# training resumes from its checkpoint (SIGTERM from scancel writes one) when it was far enough
resumed=$(grep -aho 'resuming from [^ ]* at step [0-9]*' logs/train/*.log 2>/dev/null | head -n1)
[ -n "$resumed" ] && resumed=" (retry: $resumed)"
result "PASS ${killed_rule} (SLURM job $killed) killed, resubmitted as SLURM job $resub, workflow complete in ${elapsed}s${resumed}"
