#!/usr/bin/env bash
# The churn goal of issue 7 (sessions per second and CPU per session, the gateway with
# all layers against HAProxy hardened), measured as pairs: each pair is one churn run
# against each, back to back, so both share the machine's state of the moment, which
# moves whole runs by more than the two products differ. The order alternates: odd pairs
# run HAProxy first, even pairs the gateway, because the second run of a pair tends to
# do worse, by up to a few percent (BENCHMARKS.md). Prints each pair's ratios, their
# medians, and the medians by which target ran first. A manual benchmark: not part
# of `cargo test` or .ci/run.
#
#   bash benches/churn_pairs.sh
#
# With CONCURRENCY=1 it measures the latency goal at low load instead (see the last
# lines it prints).
#
# Environment: PAIRS (default 16), DUR (seconds per run, default 2), CONCURRENCY
# (default 32), CARGO_TARGET_DIR, NO_BUILD=1 (use the binaries already built), GATEWAY
# (path of a prebuilt mqtt-gateway), OUT (results directory). Needs root for apt-get
# only when mosquitto or haproxy is missing, and python3.
#
# CPU is each process's on-CPU time from /proc/PID/task/*/schedstat (nanoseconds, all
# threads), for the proxy and for mosquitto behind it; "idle" is the whole machine's
# idle time (/proc/stat) per session. It listens on 127.0.0.1 ports 21883, 21885 and
# 21888 (21891 for the gateway's metrics), stops everything it started by PID on exit,
# and keeps all traffic on loopback (clients from 127.0.1.1..250).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
PAIRS=${PAIRS:-16}
DUR=${DUR:-2}
CONCURRENCY=${CONCURRENCY:-32}
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
OUT=${OUT:-$TARGET_DIR/churn-pairs-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"

log() { printf '[churn-pairs %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
STARTED=()
cleanup() {
    for pid in "${STARTED[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${STARTED[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

. benches/common.sh
need_debian mosquitto haproxy
MOSQUITTO=$(path_of mosquitto)
HAPROXY=$(path_of haproxy)

if [ "${NO_BUILD:-0}" != 1 ]; then
    log "building release binaries into $TARGET_DIR"
    cargo build --release -q -p benches --bin mqtt-load
    cargo build --release -q -p examples --example mqtt-gateway
fi
LOAD=$TARGET_DIR/release/mqtt-load
GATEWAY=${GATEWAY:-$TARGET_DIR/release/examples/mqtt-gateway}

mosquitto_conf "$OUT/mosquitto.conf"
"$MOSQUITTO" -c "$OUT/mosquitto.conf" &
MOSQ=$!
STARTED+=("$MOSQ")
"$HAPROXY" -db -f benches/haproxy/hardened.cfg >"$OUT/haproxy.log" 2>&1 &
HAP=$!
STARTED+=("$HAP")
"$GATEWAY" --config benches/gateway/all-layers.toml --listen 127.0.0.1:21888 \
    --upstream 127.0.0.1:21883 --metrics 127.0.0.1:21891 >"$OUT/gateway.log" 2>&1 &
GW=$!
STARTED+=("$GW")
for port in 21883 21885 21888; do wait_port "$port"; done

on_cpu_ns() { cat /proc/"$1"/task/*/schedstat | awk '{s += $1} END {printf "%.0f\n", s}'; }
idle_ticks() { awk '/^cpu /{print $5 + $6}' /proc/stat; }

log "$PAIRS pairs of ${DUR} s churn runs ($CONCURRENCY clients), haproxy_hard and gw_all in turn first"
for pair in $(seq "$PAIRS"); do
    order="haproxy_hard:21885:$HAP gw_all:21888:$GW"
    [ $((pair % 2)) = 0 ] && order="gw_all:21888:$GW haproxy_hard:21885:$HAP"
    first=${order%%:*}
    for t in $order; do
        IFS=: read -r name port pid <<<"$t"
        c0=$(on_cpu_ns "$pid"); m0=$(on_cpu_ns "$MOSQ"); i0=$(idle_ticks)
        "$LOAD" churn --target 127.0.0.1:"$port" --concurrency "$CONCURRENCY" \
            --duration "$DUR" --label "$name" >"$OUT/run.json"
        c1=$(on_cpu_ns "$pid"); m1=$(on_cpu_ns "$MOSQ"); i1=$(idle_ticks)
        python3 - "$OUT/run.json" "$first" "$pair" "$((c1 - c0))" "$((m1 - m0))" \
            "$((i1 - i0))" "$(getconf CLK_TCK)" >>"$RESULTS" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
first = sys.argv[2]
pair, cpu_ns, mosq_ns, idle, hz = map(int, sys.argv[3:])
ok = r["ok"]
print(json.dumps({"target": r["label"], "pair": pair, "first": first,
                  "per_s": r["per_s"], "ok": ok,
                  "cpu_us": cpu_ns / 1e3 / ok if ok else None,
                  "mosquitto_cpu_us": mosq_ns / 1e3 / ok if ok else None,
                  "idle_us": idle / hz * 1e6 / ok if ok else None,
                  "p50_us": r["p50_us"], "p99_us": r["p99_us"]}))
EOF
    done
done

python3 - "$RESULTS" <<'EOF'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    r = json.loads(line)
    runs.setdefault(r["pair"], {})[r["target"]] = r
pairs = [p for p in runs.values() if "gw_all" in p and "haproxy_hard" in p
         and p["gw_all"]["cpu_us"] and p["haproxy_hard"]["cpu_us"]]
if not pairs:
    sys.exit("no complete pair")
def med(f):
    return statistics.median(f(p) for p in pairs)
print(f"{len(pairs)} pairs; medians:")
print("| | haproxy_hard | gw_all | gw_all / haproxy_hard, median of the pairs' ratios |")
print("|---|---|---|---|")
for label, key in (("sessions/s", "per_s"), ("proxy CPU per session (us)", "cpu_us"),
                   ("mosquitto CPU per session (us)", "mosquitto_cpu_us"),
                   ("machine idle per session (us)", "idle_us"),
                   ("p50 connect->CONNACK (us)", "p50_us"), ("p99 connect->CONNACK (us)", "p99_us")):
    h = med(lambda p: p["haproxy_hard"][key])
    g = med(lambda p: p["gw_all"][key])
    r = med(lambda p: p["gw_all"][key] / p["haproxy_hard"][key])
    print(f"| {label} | {h:,.1f} | {g:,.1f} | {r:.3f} |")
for label, key in (("sessions/s", "per_s"), ("CPU per session", "cpu_us")):
    ratios = sorted(p["gw_all"][key] / p["haproxy_hard"][key] for p in pairs)
    print(f"- {label} ratios, sorted: " + ", ".join(f"{x:.2f}" for x in ratios))
    by_first = []
    for first in ("haproxy_hard", "gw_all"):
        rs = [p["gw_all"][key] / p["haproxy_hard"][key] for p in pairs
              if p["gw_all"].get("first") == first]
        if rs:
            by_first.append(f"{statistics.median(rs):.3f} when {first} ran first ({len(rs)})")
    print(f"  median by order: " + "; ".join(by_first))
# The latency goal (added latency over a direct connection at most HAProxy's) compares
# gw_all - direct with haproxy_hard - direct: the direct run cancels, and within a pair
# it is gw_all's latency against HAProxy's. CONCURRENCY=1 measures it at low load.
for label, key in (("p50", "p50_us"), ("p99", "p99_us")):
    diffs = [p["gw_all"][key] - p["haproxy_hard"][key] for p in pairs]
    lower = sum(d < 0 for d in diffs)
    print(f"- {label} latency, gw_all - haproxy_hard per pair: median {statistics.median(diffs):+,.0f} us;"
          f" gw_all lower in {lower} of {len(diffs)} pairs")
EOF
log "raw: $RESULTS"
