# The README walk-through's test bed, sourced by the script tests/walkthrough.rs writes. It runs
# as root inside private mount, network and PID namespaces (`unshare`), so that the README's
# commands run with their own paths and ports and change nothing on this machine:
#
# - /etc, /usr and /var are overlays whose changes live on a tmpfs only this namespace sees;
#   /root is a fresh tmpfs (the repository and the test binary are bound back if they live
#   below it); Debian's PostgreSQL and pgBouncer directories (/etc/postgresql,
#   /var/lib/postgresql, /var/log/postgresql, /run/postgresql) are empty tmpfs mounts, and
#   /run/systemd is hidden, so nothing reaches this machine's systemd;
# - the loopback interface is the namespace's own: ports 5432 and 6432 are free;
# - when the namespace's first process exits, every process in it is killed and every mount
#   is gone.
#
# Then it makes what Debian's packages leave on a fresh machine: the cluster 15/main made and
# started by postgresql-common's pg_createcluster (ssl on, with the machine's snakeoil
# certificate), and pgBouncer running with the package's /etc/pgbouncer/pgbouncer.ini as the
# postgres user, as the package's service runs it.
#
# systemctl is a shell function here (no systemd runs in the bed): daemon-reload does nothing;
# restart/reload pgbouncer run pgBouncer as Debian's pgbouncer.service does; enable --now,
# start, reload and stop of pemagent.service run the installed unit's ExecStart= with the
# environment its User=, StateDirectory= and LogsDirectory= give.

bed_log() { echo "walk-through bed: $*" >&2; }

bed_fail() {
    bed_log "$*"
    exit 97
}

# Waits up to $2 seconds for the command $1 to succeed.
bed_wait() {
    local what=$1 limit=$2 i
    for ((i = 0; i < limit * 5; i++)); do
        if eval "$what" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    return 1
}

bed_setup() {
    local state=$1 repo=$2 bin=$3
    mount -t tmpfs -o mode=0700 pemworker-walkthrough "$state"
    # The bed's own files (logs of what it ran, the agent's pid): on that tmpfs too.
    BED_RUN=$state/run
    mkdir -p "$state/hostroot"
    mount --bind /root "$state/hostroot"
    for d in etc usr var; do
        mkdir -p "$state/$d/upper" "$state/$d/work"
        mount -t overlay overlay -o "lowerdir=/$d,upperdir=$state/$d/upper,workdir=$state/$d/work" "/$d"
    done
    mount -t tmpfs -o mode=0700 root-home /root
    # No trace of an earlier pemworker on this machine: its layout, state, logs and units.
    for d in /usr/edb /var/lib/pem /var/log/pem; do
        mkdir -p "$d"
        mount -t tmpfs -o mode=0755 pemworker "$d"
    done
    rm -f /etc/systemd/system/pemagent.service /lib/systemd/system/pemagent.service \
          /usr/local/bin/pemworker
    # The repository and the binary under test, where they were.
    for p in "$repo" "$(dirname "$bin")"; do
        case "$p" in
            /root/*)
                mkdir -p "$p"
                mount --bind "$state/hostroot/${p#/root/}" "$p"
                ;;
        esac
    done
    for d in /etc/postgresql /var/lib/postgresql /var/log/postgresql /run/postgresql; do
        mkdir -p "$d"
        mount -t tmpfs -o mode=0755 postgresql "$d"
    done
    # As Debian's packages leave them.
    chown postgres:postgres /etc/postgresql /var/lib/postgresql /run/postgresql
    chmod 2775 /run/postgresql
    chown root:postgres /var/log/postgresql
    chmod 1775 /var/log/postgresql
    if [ -d /run/systemd ]; then
        mount -t tmpfs -o mode=0755 no-systemd /run/systemd
    fi
    mkdir -p "$BED_RUN"
    ip link set lo up

    # postgresql-15's installation: the 15/main cluster, started.
    pg_createcluster 15 main --start >"$BED_RUN"/pg_createcluster.log 2>&1 ||
        bed_fail "pg_createcluster 15 main failed: $(cat "$BED_RUN"/pg_createcluster.log)"
    # pgbouncer's installation: the package's pgbouncer.ini and userlist.txt, the service started.
    [ -f /etc/pgbouncer/pgbouncer.ini ] || bed_fail "/etc/pgbouncer/pgbouncer.ini missing: install pgbouncer (apt-get install pgbouncer)"
    bed_pgbouncer_start
}

bed_pgbouncer_start() {
    runuser -u postgres -- /usr/sbin/pgbouncer -d -q /etc/pgbouncer/pgbouncer.ini ||
        bed_fail "pgbouncer did not start: $(tail -n 20 /var/log/postgresql/pgbouncer.log 2>/dev/null)"
    bed_wait "(exec 3<>/dev/tcp/127.0.0.1/6432)" 30 ||
        bed_fail "pgbouncer does not listen on 6432: $(tail -n 20 /var/log/postgresql/pgbouncer.log 2>/dev/null)"
}

bed_pgbouncer_stop() {
    local pid
    pid=$(cat /run/postgresql/pgbouncer.pid 2>/dev/null) || return 0
    kill -INT "$pid" 2>/dev/null || return 0
    bed_wait "! kill -0 $pid" 30 || bed_fail "pgbouncer (pid $pid) did not stop"
}

# A value of the installed unit file (the last one if repeated).
bed_unit_value() {
    sed -n "s/^$2=//p" "$1" | tail -n 1
}

bed_unit_start() {
    local unit=/etc/systemd/system/pemagent.service
    [ -f "$unit" ] || unit=/lib/systemd/system/pemagent.service
    [ -f "$unit" ] || { echo "Unit pemagent.service not found." >&2; return 5; }
    local condition exec state logs
    condition=$(bed_unit_value "$unit" ConditionPathExists)
    if [ -n "$condition" ] && [ ! -e "$condition" ]; then
        bed_log "pemagent.service: condition ConditionPathExists=$condition not met; not started"
        return 0
    fi
    exec=$(bed_unit_value "$unit" ExecStart)
    state=/var/lib/$(bed_unit_value "$unit" StateDirectory)
    logs=/var/log/$(bed_unit_value "$unit" LogsDirectory)
    install -d -m "$(bed_unit_value "$unit" StateDirectoryMode)" "$state"
    install -d -m "$(bed_unit_value "$unit" LogsDirectoryMode)" "$logs"
    (
        umask "$(bed_unit_value "$unit" UMask)"
        cd /
        # shellcheck disable=SC2086 # ExecStart= is split into words, as systemd does.
        exec env -i HOME=/root USER=root LOGNAME=root SHELL=/bin/bash \
            PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            STATE_DIRECTORY="$state" LOGS_DIRECTORY="$logs" \
            $exec </dev/null >>"$BED_RUN"/pemagent.journal 2>&1
    ) &
    echo $! >"$BED_RUN"/pemagent.pid
}

bed_unit_signal() {
    local pid
    pid=$(cat "$BED_RUN"/pemagent.pid 2>/dev/null) || return 0
    kill "-$1" "$pid" 2>/dev/null || return 0
    if [ "$1" = TERM ]; then
        bed_wait "! kill -0 $pid" 30 || bed_fail "pemagent.service (pid $pid) did not stop"
        rm -f "$BED_RUN"/pemagent.pid
    fi
}

systemctl() {
    local what="$*"
    what=${what%.service}
    case "$what" in
        daemon-reload) ;;
        "restart pgbouncer" | "start pgbouncer") bed_pgbouncer_stop; bed_pgbouncer_start ;;
        "reload pgbouncer") kill -HUP "$(cat /run/postgresql/pgbouncer.pid)" ;;
        "enable --now pemagent" | "start pemagent") bed_unit_start ;;
        "reload pemagent") bed_unit_signal HUP ;;
        "stop pemagent") bed_unit_signal TERM ;;
        "restart pemagent") bed_unit_signal TERM; bed_unit_start ;;
        *)
            echo "walk-through bed: systemctl $* is not emulated here; add it to tests/walkthrough/bed.sh" >&2
            return 1
            ;;
    esac
}

# Whether the PEM server holds samples of the agent's host, the monitored server and
# pgBouncer (asked as the superuser, over the socket).
bed_samples_stored() {
    [ "$(runuser -u postgres -- psql -X -d pem -Atc "SELECT (SELECT count(*) FROM pemhistory.cpu_usage) > 0 AND (SELECT count(*) FROM pemhistory.session_info) > 0 AND (SELECT count(*) FROM pemhistory.pgbouncer_pools) > 0")" = t ]
}

# What a failure leaves for the reader of the test's output.
bed_diagnostics() {
    local f
    for f in "$BED_RUN"/pg_createcluster.log \
             /var/log/postgresql/postgresql-15-main.log /var/log/postgresql/pgbouncer.log \
             "$BED_RUN"/pemagent.journal /var/log/pem/worker.log; do
        if [ -s "$f" ]; then
            echo "----- $f (last 40 lines)"
            tail -n 40 "$f"
        fi
    done
}
