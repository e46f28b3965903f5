#!/usr/bin/env bash
# Stop the daemons that slurm/testcluster/start.sh started (and only those),
# in reverse start order.  Safe to run when nothing is running.
#
#   stop.sh          stop daemons, keep state (job ids, accounting DB)
#   stop.sh --purge  also wipe Slurm spool dirs, the private accounting DB and
#                    logs, so the next start.sh begins from a clean slate
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=slurm/testcluster/common.sh
source "$HERE/common.sh"  # RUN_DIR, LOG_DIR, STATE_DIR, ours_running
STOP_TIMEOUT=${LINGOGAP_TC_STOP_TIMEOUT:-60}

purge=0
for arg in "$@"; do
    case $arg in
        --purge) purge=1 ;;
        -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
        *) echo "unknown argument: $arg" >&2; exit 2 ;;
    esac
done
[[ $(id -u) -eq 0 ]] || { echo "stop.sh must run as root" >&2; exit 1; }

log() { echo "[testcluster] $*"; }

stop_one() {
    local name=$1 pid i
    if ! pid=$(ours_running "$name"); then
        [[ -f $RUN_DIR/$name.pid ]] && log "$name: not running (stale PID file removed)"
        rm -f "$RUN_DIR/$name.pid"
        return 0
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < STOP_TIMEOUT * 10; i++)); do
        ours_running "$name" >/dev/null || break
        sleep 0.1
    done
    if ours_running "$name" >/dev/null; then
        log "$name (pid $pid) ignored SIGTERM for ${STOP_TIMEOUT}s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do ours_running "$name" >/dev/null || break; sleep 0.1; done
    fi
    rm -f "$RUN_DIR/$name.pid"
    stopped+=("$pid")
    log "stopped $name (pid $pid)"
}
stopped=()

# Cancel jobs first, so no slurmstepd / job processes outlive slurmd.
if ours_running slurmctld >/dev/null && ours_running slurmd >/dev/null \
    && scontrol ping 2>/dev/null | grep -q 'is UP'; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 300; i++)); do
            [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
            sleep 0.1
        done
    fi
fi

for d in slurmd slurmctld slurmdbd mariadbd munged; do
    stop_one "$d"
done
rm -f "$RUN_DIR"/daemon/*.pid 2>/dev/null || true

# The sandbox's PID 1 reaps orphans lazily: give the exited daemons' zombies a
# moment to disappear so that `ps` is clean when this script returns.
for ((i = 0; i < 50; i++)); do
    left=0
    for pid in "${stopped[@]}"; do [[ -d /proc/$pid ]] && left=1; done
    ((left)) || break
    sleep 0.1
done

if ((purge)); then
    left=""
    for d in slurmd slurmctld slurmdbd mariadbd; do
        [[ -f $RUN_DIR/$d.pid ]] && left+=" $d"
    done
    [[ -z $left ]] || { echo "not purging: still running:$left" >&2; exit 1; }
    rm -rf /var/spool/slurmctld/* /var/spool/slurmd/* "${STATE_DIR:?}/mysql" "${LOG_DIR:?}"/*
    log "purged Slurm state, accounting DB and logs (job ids restart at 1)"
fi
log "test cluster stopped"
