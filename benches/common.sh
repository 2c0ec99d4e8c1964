# Shared by benches/compare.sh, callgrind.sh and churn_pairs.sh (sourced, not run): the
# tools they take from Debian and the mosquitto every target sits in front of. Each
# script defines `log` before it sources this file.

# have CMD: CMD is on the PATH or in /usr/sbin (where Debian puts mosquitto and haproxy).
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }

# path_of CMD: the PATH's CMD, else /usr/sbin's.
path_of() { command -v "$1" || echo "/usr/sbin/$1"; }

# need_debian CMD...: installs the Debian packages of those names whose command is
# missing (needs root then).
need_debian() {
    local missing=() cmd
    for cmd in "$@"; do
        have "$cmd" || missing+=("$cmd")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing ${missing[*]} from Debian"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
}

# wait_port PORT: waits up to 10 s for something to listen on 127.0.0.1:PORT; exits the
# script if nothing does.
wait_port() {
    local port=$1 i
    for i in $(seq 1 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    log "nothing listens on $port"
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
