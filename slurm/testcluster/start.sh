#!/usr/bin/env bash
# Start a single-node Slurm test cluster (munge + MariaDB + slurmdbd +
# slurmctld + slurmd) on localhost.  Debian 12, run as root, no systemd needed.
#
# Idempotent: daemons that this script already started (and that are still
# alive) are left alone, so a second run only re-checks health.
#
# Environment overrides:
#   LINGOGAP_TC_TIMEOUT   seconds to wait for each readiness check (default 120)
#   LINGOGAP_TC_DB_PORT   TCP port of the private MariaDB on 127.0.0.1 (default 3307)
#   LINGOGAP_TC_SKIP_INSTALL=1  never call apt-get (fail if packages are missing)
set -euo pipefail

T0=$(date +%s.%N)
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# shellcheck source=slurm/testcluster/common.sh
source "$HERE/common.sh"                   # RUN_DIR, LOG_DIR, STATE_DIR, ours_running
DB_DATADIR=$STATE_DIR/mysql
DB_RUNDIR=$RUN_DIR/mysqld                  # mysql-owned: socket + pid
DB_SOCKET=$DB_RUNDIR/mysqld.sock
DB_PORT=${LINGOGAP_TC_DB_PORT:-3307}
TIMEOUT=${LINGOGAP_TC_TIMEOUT:-120}
CLUSTER=lingogap-test
HOST=$(hostname -s)
PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

export DEBIAN_FRONTEND=noninteractive

log() { printf '[testcluster %6ss] %s\n' "$(elapsed)" "$*"; }
elapsed() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN{printf "%.1f", a-b}'; }

tail_log() {  # tail_log NAME FILE...
    local f
    for f in "${@:2}"; do
        if [[ -s $f ]]; then
            echo "----- last lines of $f ($1) -----" >&2
            tail -n 30 "$f" >&2
        fi
    done
}

die() {  # die MESSAGE [daemon-name ...]
    echo "[testcluster] ERROR: $1" >&2
    shift
    local d
    for d in "$@"; do
        case $d in
            munged)    tail_log munged "$LOG_DIR/munged.out" /var/log/munge/munged.log ;;
            mariadbd)  tail_log mariadbd "$LOG_DIR/mariadbd.out" "$LOG_DIR/mariadb.err" ;;
            slurmdbd)  tail_log slurmdbd "$LOG_DIR/slurmdbd.out" "$LOG_DIR/slurmdbd.log" ;;
            slurmctld) tail_log slurmctld "$LOG_DIR/slurmctld.out" "$LOG_DIR/slurmctld.log" ;;
            slurmd)    tail_log slurmd "$LOG_DIR/slurmd.out" "$LOG_DIR/slurmd.log" ;;
        esac
    done
    exit 1
}

on_err() {
    echo "[testcluster] ERROR: command failed at line $1: $2" >&2
    die "start.sh aborted" munged mariadbd slurmdbd slurmctld slurmd
}
trap 'on_err $LINENO "$BASH_COMMAND"' ERR

[[ $(id -u) -eq 0 ]] || { echo "start.sh must run as root" >&2; exit 1; }

# ---------------------------------------------------------------- helpers ---

launch() {  # launch NAME COMM CMD... : start CMD in background, record its PID
    local name=$1 comm=$2 pid st
    shift 2
    : >"$LOG_DIR/$name.out"
    # setsid (no fork: a background job is not a process-group leader) detaches
    # from the terminal; every wrapper used here execs, so $! is the daemon.
    setsid "$@" </dev/null >>"$LOG_DIR/$name.out" 2>&1 &
    pid=$!
    for _ in $(seq 50); do  # wait until the exec chain reached the daemon
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] && break
        [[ -d /proc/$pid ]] || break
        sleep 0.05
    done
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || die "$name did not start" "$name"
    st=$(proc_starttime "$pid")
    echo "$pid $st $comm" >"$RUN_DIR/$name.pid"
    log "started $name (pid $pid)"
}

wait_for() {  # wait_for DESCRIPTION DAEMON CMD... : poll CMD until it succeeds
    local desc=$1 daemon=$2 deadline
    shift 2
    deadline=$(($(date +%s) + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if [[ -n $daemon && $daemon != - ]] && ! ours_running "$daemon" >/dev/null \
            && [[ -f $RUN_DIR/$daemon.pid ]]; then
            die "$daemon exited while waiting for: $desc" "$daemon"
        fi
        (($(date +%s) < deadline)) || die "timed out after ${TIMEOUT}s waiting for: $desc" "$daemon"
        sleep 0.2
    done
}

render() {  # render TEMPLATE DEST MODE : fill @VARS@, write only if changed
    local tmp changed=1
    tmp=$(mktemp)
    sed -e "s|@HOSTNAME@|$HOST|g" -e "s|@CPUS@|$CPUS|g" \
        -e "s|@REAL_MEMORY@|$REAL_MEMORY|g" -e "s|@DEF_MEM_PER_CPU@|$DEF_MEM_PER_CPU|g" \
        -e "s|@RUN_DIR@|$RUN_DIR|g" -e "s|@LOG_DIR@|$LOG_DIR|g" \
        -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@DB_PASS@|$DB_PASS|g" "$1" >"$tmp"
    if [[ -f $2 ]] && cmp -s "$tmp" "$2"; then changed=0; fi
    if ((changed)); then
        install -o root -g root -m "$3" "$tmp" "$2"
        log "wrote $2"
    else
        chown root:root "$2"; chmod "$3" "$2"
    fi
    rm -f "$tmp"
    return $((1 - changed))  # 0 = changed
}

# ---------------------------------------------------------------- install ---
missing=()
for p in "${PACKAGES[@]}"; do
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true) == installed ]] || missing+=("$p")
done
if ((${#missing[@]})); then
    [[ ${LINGOGAP_TC_SKIP_INSTALL:-0} == 1 ]] && die "missing packages: ${missing[*]}"
    log "installing: ${missing[*]}"
    # Keep apt from auto-starting the daemons (we start our own instances).
    tmp_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        tmp_policy=1
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >"/tmp/lingogap-testcluster-apt.log" 2>&1 \
        || { tail -n 40 /tmp/lingogap-testcluster-apt.log >&2; die "apt-get install failed"; }
    if ((tmp_policy)); then
        rm -f /usr/sbin/policy-rc.d
        trap - EXIT
    fi
    log "packages installed"
fi

# ------------------------------------------------------------ directories ---
install -d -m 755 "$RUN_DIR" "$RUN_DIR/daemon" "$LOG_DIR" /etc/slurm
# 755: the mysql user must be able to traverse into $STATE_DIR/mysql.
install -d -m 755 "$STATE_DIR"
install -d -m 755 /var/spool/slurmctld /var/spool/slurmd
install -d -o munge -g munge -m 755 /run/munge
install -d -o munge -g munge -m 700 /var/log/munge /var/lib/munge /etc/munge
install -d -o mysql -g mysql -m 755 "$DB_RUNDIR"
install -d -o mysql -g mysql -m 750 "$DB_DATADIR"
touch "$LOG_DIR/mariadb.err" && chown mysql:mysql "$LOG_DIR/mariadb.err"

# ---------------------------------------------------------------- configs ---
CPUS=$(getconf _NPROCESSORS_ONLN)  # not nproc: it obeys OMP_NUM_THREADS, which CI sets to 1
mem_mb=$(($(awk '/^MemTotal:/{print $2}' /proc/meminfo) / 1024))
headroom=$((mem_mb / 10 > 512 ? mem_mb / 10 : 512))
REAL_MEMORY=$((mem_mb - headroom))
DEF_MEM_PER_CPU=$((REAL_MEMORY / CPUS))
if [[ ! -s $STATE_DIR/dbpass ]]; then
    (umask 077; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE_DIR/dbpass")
fi
DB_PASS=$(cat "$STATE_DIR/dbpass")

slurm_conf_changed=0
render "$HERE/slurm.conf.in" /etc/slurm/slurm.conf 644 && slurm_conf_changed=1
dbd_conf_changed=0
render "$HERE/slurmdbd.conf.in" /etc/slurm/slurmdbd.conf 600 && dbd_conf_changed=1

# ------------------------------------------------------------------ munge ---
if [[ ! -s /etc/munge/munge.key ]]; then
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    log "created /etc/munge/munge.key"
fi
chown munge:munge /etc/munge/munge.key
chmod 400 /etc/munge/munge.key

munge_ok() { munge -n | unmunge >/dev/null; }
if pid=$(ours_running munged); then
    log "munged already running (pid $pid)"
elif munge_ok 2>/dev/null; then
    log "a munged not started by this script is answering; using it"
else
    rm -f "$RUN_DIR/munged.pid"
    # setpriv execs (unlike runuser/su), so the recorded PID is munged itself.
    launch munged munged setpriv --reuid=munge --regid=munge --init-groups munged --foreground
fi
wait_for "munge -n | unmunge" munged munge_ok

# ---------------------------------------------------------------- MariaDB ---
# A private instance (own datadir, socket and 127.0.0.1 port) so the system's
# /var/lib/mysql is never touched and --purge can simply delete the datadir.
if [[ ! -d $DB_DATADIR/mysql ]]; then
    log "initialising MariaDB datadir $DB_DATADIR"
    find "$DB_DATADIR" -mindepth 1 -delete  # leftovers of a failed attempt
    mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DATADIR" \
        --auth-root-authentication-method=socket --skip-test-db \
        >"$LOG_DIR/mariadb-install-db.out" 2>&1 \
        || { tail -n 30 "$LOG_DIR/mariadb-install-db.out" >&2; die "mariadb-install-db failed"; }
fi
mysql_ok() { mariadb-admin --no-defaults --socket="$DB_SOCKET" -u root ping; }
if pid=$(ours_running mariadbd); then
    log "mariadbd already running (pid $pid)"
else
    rm -f "$RUN_DIR/mariadbd.pid"
    launch mariadbd mariadbd mariadbd --no-defaults --user=mysql --basedir=/usr \
        --datadir="$DB_DATADIR" --socket="$DB_SOCKET" --pid-file="$DB_RUNDIR/mariadbd.pid" \
        --log-error="$LOG_DIR/mariadb.err" --bind-address=127.0.0.1 --port="$DB_PORT" \
        --skip-name-resolve --innodb-buffer-pool-size=1024M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --max-connections=100
fi
wait_for "MariaDB socket $DB_SOCKET" mariadbd mysql_ok
mariadb --no-defaults --socket="$DB_SOCKET" -u root <<SQL
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
SQL

# --------------------------------------------------------------- slurmdbd ---
dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
if pid=$(ours_running slurmdbd); then
    log "slurmdbd already running (pid $pid)"
    if ((dbd_conf_changed)); then
        log "slurmdbd.conf changed: restarting slurmdbd"
        kill -TERM "$pid"
        for _ in $(seq 100); do [[ -d /proc/$pid ]] || break; sleep 0.1; done
        rm -f "$RUN_DIR/slurmdbd.pid"
        launch slurmdbd slurmdbd slurmdbd -D
    fi
else
    rm -f "$RUN_DIR/slurmdbd.pid"
    launch slurmdbd slurmdbd slurmdbd -D
fi
wait_for "slurmdbd answering sacctmgr" slurmdbd dbd_ok

if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null
    log "registered cluster $CLUSTER in accounting"
fi
# Adding a cluster creates the root account + root user association; make sure.
if ! sacctmgr -n -P list assoc cluster="$CLUSTER" user=root format=user | grep -qx root; then
    sacctmgr -i add user root account=root cluster="$CLUSTER" >/dev/null
    log "added association root/root"
fi

# -------------------------------------------------------------- slurmctld ---
ctld_ok() { scontrol ping | grep -q 'is UP'; }
if pid=$(ours_running slurmctld); then
    log "slurmctld already running (pid $pid)"
    if ((slurm_conf_changed)); then
        log "slurm.conf changed: scontrol reconfigure"
        scontrol reconfigure
    fi
else
    rm -f "$RUN_DIR/slurmctld.pid"
    launch slurmctld slurmctld slurmctld -D -i
fi
wait_for "slurmctld answering scontrol ping" slurmctld ctld_ok

# ----------------------------------------------------------------- slurmd ---
if pid=$(ours_running slurmd); then
    log "slurmd already running (pid $pid)"
else
    rm -f "$RUN_DIR/slurmd.pid"
    launch slurmd slurmd slurmd -D
fi

node_state() { sinfo -h -N -n "$HOST" -o %T 2>/dev/null | head -n1; }
node_ready() {
    local s
    s=$(node_state)
    case $s in
        idle | mixed | allocated | completing) return 0 ;;
        *down* | *drain* | *fail*)
            # ReturnToService=2 normally handles this; nudge it anyway.
            scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 || true
            return 1 ;;
        *) return 1 ;;
    esac
}
deadline=$(($(date +%s) + TIMEOUT))
until node_ready; do
    ours_running slurmd >/dev/null || die "slurmd exited" slurmd slurmctld
    (($(date +%s) < deadline)) || die "node $HOST not idle after ${TIMEOUT}s (state: $(node_state))" slurmd slurmctld
    sleep 0.2
done

trap - ERR
log "cluster $CLUSTER ready: node $HOST $(node_state), CPUs=$CPUS RealMemory=${REAL_MEMORY}M"
echo "testcluster started in $(elapsed) s"
