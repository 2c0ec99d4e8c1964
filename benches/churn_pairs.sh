#!/usr/bin/env bash
# The churn goal of issue 7 (sessions per second and CPU per session, the gateway with
# all layers against HAProxy hardened), measured in rounds: each round is one churn run
# against each target, back to back, so all share the machine's state of the moment,
# which moves whole runs by more than the products differ. The order rotates (below: over
# each 2N rounds of N targets, each runs in every position and before each other target
# equally often; with the default two, rounds 1 and 4 of every 4 run HAProxy first),
# because in series of two targets the second run of a pair tended to do worse, by up to
# a few percent (benches/LOG.md). Use a multiple of 2N rounds (PAIRS). Prints each
# target's ratios to HAProxy hardened in the same round, their medians, and each
# target's medians by whether it ran before or after HAProxy. A manual benchmark: not part of
# `cargo test` or .ci/run.
#
#   bash benches/churn_pairs.sh                                   # gw_all against haproxy_hard
#   TARGETS="haproxy_hard gw_all gw_off haproxy_plain haproxy_hard_b" bash benches/churn_pairs.sh
#
# TARGETS (default "haproxy_hard gw_all"; haproxy_hard is always measured, as the
# reference) may name:
#   haproxy_hard    benches/haproxy/hardened.cfg, 127.0.0.1:21885
#   haproxy_plain   benches/haproxy/plain.cfg, 21884
#   haproxy_hard_b  a second HAProxy hardened, 21886: a control, the same product as the
#                   reference, so its ratios show what the method cannot tell apart
#   gw_all          the gateway with CONFIG (default benches/gateway/all-layers.toml),
#                   21888
#   gw_off          the gateway with benches/gateway/no-layers.toml, 21887
#   gw_all_b        as gw_all, but the build GATEWAY_B and the configuration CONFIG_B,
#                   21892: another build (a change's parent, say) or configuration (all
#                   layers but one, say) measured in the same rounds
#   gw_off_b        as gw_off, but the build GATEWAY_B, 21893
#
# With CONCURRENCY=1 it measures the latency goal at low load instead (see the last
# lines it prints). With PUBLISH=N it measures, in the same rounds, N long-lived
# publishers of QoS 0 messages (64 B) at full speed instead of a churn: "sessions/s" then
# reads messages per second and the CPU is per message (no latencies). Three publishers on
# two cores load the gateway's runtimes unequally with `runtime = "per-core"` (two on one,
# one on the other).
#
# Environment: PAIRS (rounds, default 16), DUR (seconds per run, default 2), CONCURRENCY
# (default 32), PUBLISH (publishers instead of a churn; unset by default), TARGETS,
# CARGO_TARGET_DIR, NO_BUILD=1 (use the binaries already built), GATEWAY (path of a
# prebuilt mqtt-gateway), CONFIG (gw_all's configuration file; default
# benches/gateway/all-layers.toml), GATEWAY_B (the build of gw_all_b and gw_off_b;
# default GATEWAY), CONFIG_B (gw_all_b's configuration file; default
# benches/gateway/all-layers.toml), RESTART=1 (every target a fresh process for each
# round, warmed up by a 1-second churn run that is not measured; mosquitto stays), OUT
# (results directory). Needs root for apt-get only when mosquitto, haproxy or python3 is
# missing. Raises its soft open-files limit to the hard one (every process it starts
# inherits it).
#
# CPU is each process's on-CPU time from /proc/PID/task/*/schedstat (nanoseconds, all
# threads), for the proxy and for mosquitto behind it; "idle" is the whole machine's
# idle time (/proc/stat) per session. It listens on 127.0.0.1 ports 21883 to 21888
# (21891 for the gateway's metrics; 21892 to 21894 for GATEWAY_B's), stops everything it
# started by PID on exit, and keeps all traffic on loopback (clients from
# 127.0.1.1..250).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PAIRS=${PAIRS:-16}
DUR=${DUR:-2}
CONCURRENCY=${CONCURRENCY:-32}
read -r -a TARGETS <<<"${TARGETS:-haproxy_hard gw_all}"
# HAProxy hardened is the reference every ratio is taken to: measured even when not named.
[[ " ${TARGETS[*]} " == *" haproxy_hard "* ]] || TARGETS=(haproxy_hard "${TARGETS[@]}")
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/churn-pairs-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

log() { printf '[churn-pairs %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

. benches/common.sh
trap stop_started EXIT
# A proxy holds two descriptors a client.
raise_nofile $((2 * ${PUBLISH:-$CONCURRENCY} + 128)) "${PUBLISH:-$CONCURRENCY} clients through a proxy"
need_debian mosquitto haproxy python3
HAPROXY=$(path_of haproxy)

if [ "${NO_BUILD:-0}" != 1 ]; then
    log "building release binaries into $TARGET_DIR"
    cargo build --release -q -p benches --bin mqtt-load
    cargo build --release -q -p examples --example mqtt-gateway
fi
LOAD=$TARGET_DIR/release/mqtt-load
GATEWAY=${GATEWAY:-$TARGET_DIR/release/examples/mqtt-gateway}
GATEWAY_B=${GATEWAY_B:-$GATEWAY}
CONFIG=${CONFIG:-benches/gateway/all-layers.toml}
CONFIG_B=${CONFIG_B:-benches/gateway/all-layers.toml}

# What each measured run does.
if [ -n "${PUBLISH:-}" ]; then
    WORK=(publish --qos 0 --payload 64 --concurrency "$PUBLISH")
    WHAT="$PUBLISH publishers of QoS 0"
else
    WORK=(churn --concurrency "$CONCURRENCY")
    WHAT="churn runs ($CONCURRENCY clients)"
fi

start_mosquitto "$OUT"
declare -A PORT PID
# launch TARGET: starts it (its PID in PID, its port in PORT).
launch() {
    local t=$1 cmd
    case $t in
        haproxy_hard) PORT[$t]=21885; cmd=("$HAPROXY" -db -f benches/haproxy/hardened.cfg) ;;
        haproxy_plain) PORT[$t]=21884; cmd=("$HAPROXY" -db -f benches/haproxy/plain.cfg) ;;
        haproxy_hard_b)
            PORT[$t]=21886
            sed 's/^\( *bind 127\.0\.0\.1:\)21885/\121886/; s/^frontend mqtt_hardened$/&_b/' \
                benches/haproxy/hardened.cfg >"$OUT/hardened_b.cfg"
            cmd=("$HAPROXY" -db -f "$OUT/hardened_b.cfg") ;;
        gw_all) PORT[$t]=21888; cmd=("$GATEWAY" --config "$CONFIG"
            --listen 127.0.0.1:21888 --upstream 127.0.0.1:21883 --metrics 127.0.0.1:21891) ;;
        gw_off) PORT[$t]=21887; cmd=("$GATEWAY" --config benches/gateway/no-layers.toml
            --listen 127.0.0.1:21887 --upstream 127.0.0.1:21883) ;;
        gw_all_b) PORT[$t]=21892; cmd=("$GATEWAY_B"
            --config "$CONFIG_B" --listen 127.0.0.1:21892
            --upstream 127.0.0.1:21883 --metrics 127.0.0.1:21894) ;;
        gw_off_b) PORT[$t]=21893; cmd=("$GATEWAY_B"
            --config benches/gateway/no-layers.toml --listen 127.0.0.1:21893
            --upstream 127.0.0.1:21883) ;;
        *) log "unknown target $t (see the head of this script)"; exit 2 ;;
    esac
    "${cmd[@]}" >>"$OUT/$t.log" 2>&1 &
    PID[$t]=$!
    STARTED+=("${PID[$t]}")
}
for t in "${TARGETS[@]}"; do launch "$t"; done
wait_port 21883
for t in "${TARGETS[@]}"; do wait_port "${PORT[$t]}"; done

on_cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'; }
idle_ticks() { awk '/^cpu /{print $5 + $6}' /proc/stat; }

N=${#TARGETS[@]}
[ $((PAIRS % (2 * N))) = 0 ] || log "warning: $PAIRS rounds is not a multiple of $((2 * N)); the orders are not balanced"
log "$PAIRS rounds of ${DUR} s $WHAT of ${TARGETS[*]}, the order rotating"
for pair in $(seq "$PAIRS"); do
    # Rounds 1..N rotate the list one place further each, rounds N+1..2N do the same
    # backwards, and so on: over each 2N rounds every target runs in every position, and
    # before each other target, equally often.
    order=()
    for i in $(seq 0 $((N - 1))); do order+=("${TARGETS[$(((pair - 1 + i) % N))]}"); done
    if [ $((((pair - 1) / N) % 2)) = 1 ]; then mapfile -t order < <(reversed "${order[@]}"); fi
    if [ "${RESTART:-0}" = 1 ]; then
        # Fresh processes for every round: a process's own layout (addresses, caches)
        # can favour it by a few percent for as long as it runs, which rounds on the
        # same processes never average out.
        if [ "$pair" -gt 1 ]; then
            for t in "${TARGETS[@]}"; do
                kill "${PID[$t]}" 2>/dev/null || true
                reap "${PID[$t]}" || true
            done
            for t in "${TARGETS[@]}"; do launch "$t"; done
        fi
        for t in "${TARGETS[@]}"; do
            wait_port "${PORT[$t]}"
            # Not measured: a new process's first sessions fault its memory in.
            "$LOAD" churn --target 127.0.0.1:"${PORT[$t]}" --concurrency "$CONCURRENCY" \
                --duration 1 >/dev/null
        done
        [ "$pair" = 2 ] && log "a fresh process of each target for every round (PIDs now ${PID[*]})"
    fi
    first=${order[0]}
    position=0
    for name in "${order[@]}"; do
        pid=${PID[$name]}
        c0=$(on_cpu_ns "$pid"); m0=$(on_cpu_ns "$MOSQ"); i0=$(idle_ticks)
        "$LOAD" "${WORK[@]}" --target 127.0.0.1:"${PORT[$name]}" \
            --duration "$DUR" --label "$name" >"$OUT/run.json"
        c1=$(on_cpu_ns "$pid"); m1=$(on_cpu_ns "$MOSQ"); i1=$(idle_ticks)
        python3 - "$OUT/run.json" "$first" "$pair" "$position" "$((c1 - c0))" "$((m1 - m0))" \
            "$((i1 - i0))" "$(getconf CLK_TCK)" >>"$RESULTS" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
first = sys.argv[2]
pair, position, cpu_ns, mosq_ns, idle, hz = map(int, sys.argv[3:])
# Sessions of a churn, messages of a publish run.
ok = r["ok"] if "ok" in r else r["ops"]
print(json.dumps({"target": r["label"], "mode": r["mode"], "pair": pair, "first": first,
                  "position": position, "per_s": r["per_s"], "ok": ok,
                  "cpu_us": cpu_ns / 1e3 / ok if ok else None,
                  "mosquitto_cpu_us": mosq_ns / 1e3 / ok if ok else None,
                  "idle_us": idle / hz * 1e6 / ok if ok else None,
                  "p50_us": r.get("p50_us"), "p99_us": r.get("p99_us"),
                  "slowest": r.get("slowest")}))
PY
        position=$((position + 1))
    done
done

python3 - "$RESULTS" <<'PY'
import json, statistics, sys
REF = "haproxy_hard"
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["pair"], {})[r["target"]] = r
targets = []
for rnd in runs.values():
    targets += [t for t in rnd if t not in targets and t != REF]
def whole(r):
    return r is not None and r["cpu_us"] is not None
for t in targets:
    pairs = [p for p in runs.values() if whole(p.get(t)) and whole(p.get(REF))]
    if not pairs:
        sys.exit(f"no complete round of {t} and {REF}")
    def med(f):
        return statistics.median(f(p) for p in pairs)
    def missing(key):
        # A publish run has no latencies.
        return any(p[t].get(key) is None or p[REF].get(key) is None for p in pairs)
    print(f"{t} against {REF}, {len(pairs)} rounds; medians:")
    print(f"| | {REF} | {t} | {t} / {REF}, median of the rounds' ratios |")
    print("|---|---|---|---|")
    for label, key in (("sessions/s", "per_s"), ("proxy CPU per session (us)", "cpu_us"),
                       ("mosquitto CPU per session (us)", "mosquitto_cpu_us"),
                       ("machine idle per session (us)", "idle_us"),
                       ("p50 connect->CONNACK (us)", "p50_us"), ("p99 connect->CONNACK (us)", "p99_us")):
        if missing(key):
            continue
        h = med(lambda p: p[REF][key])
        g = med(lambda p: p[t][key])
        r = med(lambda p: p[t][key] / p[REF][key])
        print(f"| {label} | {h:,.1f} | {g:,.1f} | {r:.3f} |")
    for label, key in (("sessions/s", "per_s"), ("CPU per session", "cpu_us")):
        ratios = sorted(p[t][key] / p[REF][key] for p in pairs)
        print(f"- {label} ratios, sorted: " + ", ".join(f"{x:.2f}" for x in ratios))
        # Where a record has no position (files from before rotation: two targets), the
        # one that ran first came first.
        def before(p):
            if "position" in p[t]:
                return p[t]["position"] < p[REF]["position"]
            return p[t].get("first") == t
        by_order = []
        for label2, want in ((f"{REF} ran before {t}", False), (f"{t} ran before {REF}", True)):
            rs = [p[t][key] / p[REF][key] for p in pairs if before(p) == want]
            if rs:
                by_order.append(f"{statistics.median(rs):.3f} when {label2} ({len(rs)})")
        print(f"  median by order: " + "; ".join(by_order))
    # The latency goal (added latency over a direct connection at most HAProxy's) compares
    # gw_all - direct with haproxy_hard - direct: the direct run cancels, and within a
    # round it is the target's latency against HAProxy's. CONCURRENCY=1 measures it at low
    # load.
    for label, key in (("p50", "p50_us"), ("p99", "p99_us")):
        if missing(key):
            continue
        diffs = [p[t][key] - p[REF][key] for p in pairs]
        lower = sum(d < 0 for d in diffs)
        print(f"- {label} latency, {t} - {REF} per round: median {statistics.median(diffs):+,.0f} us;"
              f" {t} lower in {lower} of {len(diffs)} rounds")
    print()
# A build against another (GATEWAY_B), or a configuration against another (CONFIG_B), in
# the same rounds.
for t in ("gw_all", "gw_off"):
    b = t + "_b"
    pairs = [p for p in runs.values() if whole(p.get(t)) and whole(p.get(b))]
    if pairs:
        rate = statistics.median(p[t]["per_s"] / p[b]["per_s"] for p in pairs)
        cpu = statistics.median(p[t]["cpu_us"] / p[b]["cpu_us"] for p in pairs)
        diff = statistics.median(p[t]["cpu_us"] - p[b]["cpu_us"] for p in pairs)
        print(f"{t} / {b} (GATEWAY_B, CONFIG_B for gw_all_b), {len(pairs)} rounds, medians of the rounds'"
              f" ratios: sessions/s {rate:.3f}, proxy CPU per session {cpu:.3f}"
              f" ({diff:+.1f} us)")
PY
log "raw: $RESULTS"
