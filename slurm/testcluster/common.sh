# Shared by start.sh and stop.sh (sourced, not run): the cluster's folders and how a daemon that
# start.sh launched is recognised.
RUN_DIR=/run/lingogap-testcluster          # PID files of daemons WE started
LOG_DIR=/var/log/lingogap-testcluster
STATE_DIR=/var/lib/lingogap-testcluster    # private MariaDB datadir, DB password
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH

proc_starttime() {  # field 22 of /proc/PID/stat (comm may contain spaces)
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    awk '{print $20}' <<<"$s"
}
proc_state() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    echo "${s%% *}"
}

# A PID file written by start.sh holds "PID STARTTIME COMM".  It counts as
# running only if that very process (same start time, same comm) is alive
# (guards against PID reuse after a crash or reboot).
ours_running() {  # ours_running NAME -> prints pid, rc 0 if alive
    local f=$RUN_DIR/$1.pid pid st comm
    [[ -f $f ]] || return 1
    read -r pid st comm <"$f" || return 1
    [[ -n ${pid:-} && -d /proc/$pid ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    [[ $(proc_starttime "$pid") == "$st" ]] || return 1
    [[ $(proc_state "$pid") != Z ]] || return 1  # exited, not yet reaped by PID 1
    echo "$pid"
}
