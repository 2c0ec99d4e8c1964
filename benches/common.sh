# Shared by benches/compare.sh, callgrind.sh, churn_pairs.sh and pgo.sh (sourced, not
# run): the tools they take from Debian, the mosquitto every target sits in front of,
# and the stopping of what they start. Each script defines `log` before it sources this
# file.

# have CMD: CMD is a program on the PATH or in /usr/sbin (where Debian puts mosquitto
# and haproxy). A program: bash's own `kill` does not count for procps' /bin/kill, which
# mqtt-load runs.
have() { type -P "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# path_of CMD: the PATH's CMD, else /usr/sbin's.
path_of() { command -v "$1" || echo "/usr/sbin/$1"; }

# need_debian CMD[=PACKAGE]...: installs, for each command missing, the Debian package
# of that name, or PACKAGE when it differs (needs root then).
need_debian() {
    local missing=() spec
    for spec in "$@"; do
        have "${spec%%=*}" || missing+=("${spec#*=}")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# raise_nofile NEED WHAT: raises this shell's soft open-files limit to its hard one, for
# every process the script starts (mosquitto, naive-proxy and mqtt-load keep the limit
# they inherit; only the gateway and HAProxy raise their own), and exits the script with a
# message when even the hard limit is under NEED, the descriptors WHAT takes in one
# process. Most shells and systemd units start with a soft limit of 1,024: mosquitto would
# stop accepting at about 1,020 connections and naive-proxy at about 510 sessions, the
# sessions over that each waiting out their timeout.
raise_nofile() {
    local need=$1 what=$2 hard soft
    hard=$(ulimit -Hn)
    ulimit -Sn "$hard" 2>/dev/null || true
    soft=$(ulimit -Sn)
    if [ "$soft" != unlimited ] && [ "$soft" -lt "$need" ]; then
        log "the open-files limit is $soft (hard $hard); $what needs $need in one process." \
            "Raise the hard limit (ulimit -Hn $need as root, or LimitNOFILE= in systemd) or ask for less."
        exit 1
    fi
}

# wait_port PORT [SECONDS]: waits up to SECONDS (10) for something to listen on
# 127.0.0.1:PORT; exits the script if nothing does.
wait_port() {
    local port=$1 seconds=${2:-10} i
    for i in $(seq 1 $((seconds * 10))); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    log "nothing listens on $port after $seconds s"
    exit 1
}

# mosquitto_conf FILE [PORT]: mosquitto on 127.0.0.1:PORT (21883 by default), anonymous,
# no connection limit (the hold scenario opens thousands), no persistence, no log.
mosquitto_conf() {
    cat >"$1" <<CONF
listener ${2:-21883} 127.0.0.1
allow_anonymous true
max_connections -1
persistence false
log_dest none
CONF
}

# start_mosquitto DIR [PORT]: starts mosquitto on 127.0.0.1:PORT (21883 by default)
# with DIR/mosquitto.conf, its output in DIR/mosquitto.log, and waits until it listens.
# Its PID goes into MOSQ and STARTED.
start_mosquitto() {
    local port=${2:-21883}
    mosquitto_conf "$1/mosquitto.conf" "$port"
    "$(path_of mosquitto)" -c "$1/mosquitto.conf" >"$1/mosquitto.log" 2>&1 &
    MOSQ=$!
    STARTED+=("$MOSQ")
    wait_port "$port"
}

# reversed ARG...: the arguments, one a line, in reverse order.
reversed() { local i; for ((i = $#; i > 0; i--)); do echo "${!i}"; done; }

# Every process a script starts goes into STARTED; `trap stop_started EXIT` stops them
# all by PID: resumed first (compare.sh stops the broker with SIGSTOP), then terminated,
# then waited for. A process stopped and waited for before the exit leaves STARTED
# through `reap` (or `forget`): once waited for, its PID is free, and the kernel may give
# it to an unrelated process, which the trap would then signal.
STARTED=()

# forget PID: takes PID out of STARTED (it has been waited for).
forget() {
    local keep=() pid
    for pid in "${STARTED[@]}"; do
        [ "$pid" = "$1" ] || keep+=("$pid")
    done
    STARTED=("${keep[@]}")
}

# reap PID: waits for PID, one of STARTED, and forgets it. Returns its exit status.
reap() {
    local status=0
    wait "$1" 2>/dev/null || status=$?
    forget "$1"
    return "$status"
}

# child PID: whether PID is still a child of this shell (the trap's last guard: a
# process that ended on its own was reaped by bash, and its PID may have been reused).
child() {
    local stat ppid
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    # Field 4 (the parent), counted after the command name's closing parenthesis.
    stat=${stat##*) }
    read -r _ ppid _ <<<"$stat"
    [ "$ppid" = "$$" ]
}

stop_started() {
    local pid
    for pid in "${STARTED[@]}"; do
        child "$pid" || continue
        kill -CONT "$pid" 2>/dev/null || true
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    STARTED=()
}
