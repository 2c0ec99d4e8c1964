#!/usr/bin/env bash
# Side by side: mosquitto direct, a naive copy_bidirectional proxy, HAProxy plain and
# hardened, and the mqtt-gateway with no layers and with all layers, under the same
# MQTT loads (benches/src/bin/mqtt-load.rs). A manual benchmark: not part of
# `cargo test` or .ci/run.
#
#   bash benches/compare.sh
#
# Environment: DUR (seconds per timed run, default 3), REPS (default 3), HOLD (idle
# sessions for the memory run, default 4000), SCENARIOS (the scenarios to run, default
# all: "hold latency churn pub_qos0 pub_qos1 bytes flood slowloris stall"; say
# SCENARIOS=slowloris REPS=12 to repeat one scenario more often than a whole run can),
# OUT (results directory, default a new one under target/), CARGO_TARGET_DIR, NO_BUILD=1
# (use the binaries already built), GATEWAY (path of a prebuilt mqtt-gateway), GW_ALL_CONFIG
# (the gw_all target's configuration, default benches/gateway/all-layers.toml; a copy with
# `runtime = "per-core"` under [server] measures that option). Needs root for apt-get
# only when mosquitto, haproxy, python3 (the summary) or procps (`kill`, for the stall)
# is missing. It raises its soft open-files limit to the hard one, which every process
# it starts inherits, and stops at once when that is under what HOLD idle sessions take
# in one process (2 x HOLD + 128: a proxy holds two descriptors a session).
#
# Every process it starts listens on 127.0.0.1 ports 21883..21889 and is stopped by PID
# on exit. All traffic stays on loopback; clients come from 127.0.1.1..250 and
# 127.0.2.1..8 (the flood's legitimate clients), the flood's attackers of repetition R
# from 127.0.(R+2).1..10: addresses of their own in each repetition, because the gateway
# bans them for 5 minutes, and a later repetition flooding from banned addresses would
# measure a ban already in place (HAProxy's stick table keeps no such state).
#
# CPU per operation is the target process's on-CPU time over the run, in nanoseconds
# (/proc/PID/task/*/schedstat, all its threads; `mqtt-load --cpu-pid`), for `direct`
# mosquitto's own.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
DUR=${DUR:-3}
REPS=${REPS:-3}
SCENARIOS=${SCENARIOS:-hold latency churn pub_qos0 pub_qos1 bytes flood slowloris stall}
HOLD=${HOLD:-4000}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/compare-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

MOSQ_PORT=21883
declare -A ADDR=(
    [direct]=127.0.0.1:21883
    [haproxy_plain]=127.0.0.1:21884
    [haproxy_hard]=127.0.0.1:21885
    [naive]=127.0.0.1:21886
    [gw_off]=127.0.0.1:21887
    [gw_all]=127.0.0.1:21888
)
declare -A PID=()
TARGETS=(direct naive haproxy_plain haproxy_hard gw_off gw_all)

log() { printf '[compare %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# wanted SCENARIO: whether SCENARIOS names it.
wanted() { [[ " $SCENARIOS " == *" $1 "* ]]; }

# --- tools -----------------------------------------------------------------------------
. benches/common.sh
trap stop_started EXIT
# Open files in one process: a proxy holds two a session (the gateway keeps its
# connection cap within (limit - 128) / 2), mosquitto and mqtt-load one.
SLOWLORIS=500
NOFILE=256
if wanted hold; then NOFILE=$((2 * HOLD + 128)); fi
if wanted slowloris && [ "$NOFILE" -lt $((2 * SLOWLORIS + 128)) ]; then NOFILE=$((2 * SLOWLORIS + 128)); fi
raise_nofile "$NOFILE" "this run (HOLD=$HOLD idle sessions, $SLOWLORIS slowloris slots)"
need_debian mosquitto haproxy python3 kill=procps
HAPROXY=$(path_of haproxy)

for port in 21883 21884 21885 21886 21887 21888 21889; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        log "port $port is in use; stop what listens there first"
        exit 1
    fi
done

log "building release binaries into $TARGET_DIR"
export CARGO_TARGET_DIR=$TARGET_DIR
if [ "${NO_BUILD:-0}" != 1 ]; then
    cargo build --release -q -p benches --bins
    cargo build --release -q -p examples --example mqtt-gateway
fi
LOAD=$TARGET_DIR/release/mqtt-load
NAIVE=$TARGET_DIR/release/naive-proxy
GATEWAY=${GATEWAY:-$TARGET_DIR/release/examples/mqtt-gateway}

# --- start everything --------------------------------------------------------------------
start_mosquitto "$OUT" "$MOSQ_PORT"
PID[direct]=$MOSQ

"$HAPROXY" -db -f benches/haproxy/plain.cfg >"$OUT/haproxy-plain.log" 2>&1 &
PID[haproxy_plain]=$!
STARTED+=("$!")
"$HAPROXY" -db -f benches/haproxy/hardened.cfg >"$OUT/haproxy-hardened.log" 2>&1 &
PID[haproxy_hard]=$!
STARTED+=("$!")
"$NAIVE" "${ADDR[naive]}" 127.0.0.1:$MOSQ_PORT >"$OUT/naive.log" 2>&1 &
PID[naive]=$!
STARTED+=("$!")
"$GATEWAY" --config benches/gateway/no-layers.toml --listen "${ADDR[gw_off]}" \
    --upstream 127.0.0.1:$MOSQ_PORT >"$OUT/gw-off.log" 2>&1 &
PID[gw_off]=$!
STARTED+=("$!")
"$GATEWAY" --config "${GW_ALL_CONFIG:-benches/gateway/all-layers.toml}" --listen "${ADDR[gw_all]}" \
    --upstream 127.0.0.1:$MOSQ_PORT >"$OUT/gw-all.log" 2>&1 &
PID[gw_all]=$!
STARTED+=("$!")
for port in 21884 21885 21886 21887 21888; do wait_port "$port"; done
sleep 1 # let the probes of wait_port leave the per-IP windows

# --- scenarios ---------------------------------------------------------------------------
# run SCENARIO TARGET REP ARGS...: one mqtt-load run, its JSON line tagged and stored.
run() {
    local scenario=$1 target=$2 rep=$3
    shift 3
    wanted "$scenario" || return 0
    local line
    if ! line=$("$LOAD" "$@" --target "${ADDR[$target]}" --label "$target" \
        --cpu-pid "${PID[$target]}" 2>>"$OUT/mqtt-load.err"); then
        log "$scenario $target rep $rep failed"
        return 0
    fi
    line="{\"scenario\":\"$scenario\",\"rep\":$rep,${line#\{}"
    echo "$line" >>"$RESULTS"
    log "$line"
}

# in_order REP NAME...: the NAMEs in the order repetition REP of REPS runs them, one a
# line. A run's position matters: the second of two back-to-back churn runs tends to do
# worse, by up to a few percent (BENCHMARKS.md, "The churn and latency goals, as pairs of
# runs"); in a fixed order gw_all always ran last. So every target's mean position over
# the repetitions is the middle one:
# - an even REPS runs pairs of repetitions, the list rotated one place further for each
#   pair, forwards and then backwards: each target's positions in a pair add up to N - 1
#   (of N targets), exactly the middle on average;
# - an odd REPS of 3 or more (3, the default) runs first three repetitions whose
#   positions add up, for every target, to 3(N - 1)/2 rounded down or up (the list as it
#   is; rotated by N/2; its even places backwards and then its odd ones), then pairs
#   as above: every mean position within 1 / (2 REPS) of the middle, exactly on it when
#   N is odd. Forwards and backwards alone (as before) left 3 repetitions of 6 targets
#   with means from 1.67 to 3.33 (gw_all the latest);
# - REPS=1 cannot balance anything.
# With three repetitions of three targets (the flood and slowloris), each target runs
# once in each position, which a cyclic order only allows: gw_all right after
# haproxy_hard in two of them.
in_order() {
    local rep=$1 n i pos k
    shift
    n=$#
    local names=("$@") order=()
    if [ $((REPS % 2)) = 1 ] && [ "$REPS" -ge 3 ] && [ "$rep" -le 3 ]; then
        local m=$((2 * ((n - 1) / 2)))
        for ((i = 0; i < n; i++)); do
            case $rep in
                1) pos=$i ;;
                2) pos=$(((i + n / 2) % n)) ;;
                3) if [ $((2 * i)) -le "$m" ]; then pos=$((m - 2 * i)); else pos=$((2 * n - 1 - 2 * i)); fi ;;
            esac
            order[pos]=${names[i]}
        done
    else
        # Pairs, counted after the first three repetitions of an odd REPS, whose first
        # pair starts one place further.
        local r=$rep shift_by=0
        if [ $((REPS % 2)) = 1 ] && [ "$REPS" -ge 3 ]; then r=$((rep - 3)) shift_by=1; fi
        k=$(((r - 1) / 2 + shift_by))
        for ((i = 0; i < n; i++)); do order+=("${names[(i + k) % n]}"); done
        if [ $((r % 2)) = 0 ]; then mapfile -t order < <(reversed "${order[@]}"); fi
    fi
    printf '%s\n' "${order[@]}"
}

HARDENED=(direct haproxy_hard gw_all)
for rep in $(seq 1 "$REPS"); do
    log "repetition $rep of $REPS"
    mapfile -t ALL < <(in_order "$rep" "${TARGETS[@]}")
    mapfile -t HARD < <(in_order "$rep" "${HARDENED[@]}")
    log "order: ${ALL[*]}; hardened: ${HARD[*]}"
    # Idle sessions first: in repetition 1 each process is fresh, so its RSS growth is
    # the sessions' own, not memory its allocator kept from the bulk and churn runs.
    for t in "${ALL[@]}"; do run hold "$t" "$rep" hold "$HOLD" --rss-pid "${PID[$t]}" --duration 2 --keep-alive 60; done
    for t in "${ALL[@]}"; do run latency "$t" "$rep" churn --concurrency 1 --duration 2; done
    for t in "${ALL[@]}"; do run churn "$t" "$rep" churn --concurrency 32 --duration "$DUR"; done
    for t in "${ALL[@]}"; do run pub_qos0 "$t" "$rep" publish --qos 0 --payload 64 --concurrency 4 --duration "$DUR"; done
    for t in "${ALL[@]}"; do run pub_qos1 "$t" "$rep" publish --qos 1 --payload 64 --concurrency 4 --duration "$DUR"; done
    for t in "${ALL[@]}"; do run bytes "$t" "$rep" publish --qos 0 --payload 65536 --concurrency 4 --duration "$DUR"; done
    # The flood's legitimate side: 8 clients, each from its own address at 50 sessions a
    # second (under the per-IP limits of both hardened targets: 100 a second, 64 at once),
    # 1,200 attempts a repetition at DUR=3: three repetitions give 3,600, enough to show
    # a failure rate under 0.1 % when none fails (compare_summary.py's bound). The
    # attackers come from addresses of the repetition's own (the head of this script).
    attackers_from=127.0.$((3 + (rep - 1) % 253)).1
    for t in "${HARD[@]}"; do
        run flood "$t" "$rep" flood --attackers 10 --attackers-from "$attackers_from" \
            --concurrency 64 --legit-clients 8 --duration "$DUR"
    done
    # 500 attacker slots for the whole 4.5 s: a slot whose connection the target cuts (at
    # its 3 s deadline) reconnects at once, so the legitimate client is measured under
    # the attack for the whole window, against every target alike.
    for t in "${HARD[@]}"; do
        run slowloris "$t" "$rep" slowloris "$SLOWLORIS" --deadline-ms 3000 --interval-ms 400 --duration 4.5
    done
done
# The broker stalls last (once per target): it leaves mosquitto with a backlog to drain.
for t in haproxy_hard gw_all; do
    wanted stall || break
    run stall "$t" 1 stall --stop-pid "$MOSQ" --stop-after-ms 1000 --stop-for-ms 3000 --duration 2
    sleep 1
done

log "results: $RESULTS"
python3 benches/compare_summary.py "$RESULTS" | tee "$OUT/summary.md"
