#!/usr/bin/env bash
# Scratch (BENCHMARKS.md, item 1): system calls per churn session, counted by
# `strace -c -f` attached to the proxy for a 3-second churn run of 32 clients (after a
# 1-second warm-up it does not count). strace slows the proxy some 10x, so the rate it
# prints means nothing; the counts per session are exact. Targets: gw_all
# (all-layers.toml), gw_off (no-layers.toml), haproxy_hard (hardened.cfg).
#
#   bash benches/results/syscalls-2026-11-27.sh gw_all haproxy_hard gw_off
#
# Needs strace, mosquitto and haproxy, and the release binaries in CARGO_TARGET_DIR
# (cargo build --release -p benches --bin mqtt-load; ... -p examples --example mqtt-gateway).
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${CARGO_TARGET_DIR:-$PWD/target}/release
. benches/common.sh
trap stop_started EXIT
D=$(mktemp -d)
start_mosquitto "$D" 21883
for t in "$@"; do
    case $t in
        gw_all) PORT=21888; cmd=("$T/examples/mqtt-gateway" --config benches/gateway/all-layers.toml
            --listen 127.0.0.1:$PORT --upstream 127.0.0.1:21883) ;;
        gw_off) PORT=21887; cmd=("$T/examples/mqtt-gateway" --config benches/gateway/no-layers.toml
            --listen 127.0.0.1:$PORT --upstream 127.0.0.1:21883) ;;
        haproxy_hard) PORT=21885; cmd=("$(path_of haproxy)" -db -f benches/haproxy/hardened.cfg) ;;
        *) echo "unknown target $t" >&2; exit 2 ;;
    esac
    "${cmd[@]}" >"$D/$t.log" 2>&1 &
    P=$!
    STARTED+=("$P")
    wait_port "$PORT"
    "$T/mqtt-load" churn --target 127.0.0.1:$PORT --duration 1 --concurrency 32 >/dev/null
    strace -c -f -p "$P" -o "$D/$t.strace" 2>/dev/null &
    S=$!
    sleep 0.5
    ok=$("$T/mqtt-load" churn --target 127.0.0.1:$PORT --duration 3 --concurrency 32 |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["ok"])')
    sleep 0.3
    kill -INT "$S"; wait "$S" || true
    kill "$P"; wait "$P" 2>/dev/null || true
    echo "== $t: $ok sessions; calls (errors) per session"
    # strace -c rows: % time, seconds, usecs/call, calls, [errors], syscall.
    awk -v n="$ok" '$1 ~ /^[0-9.]+$/ && $NF != "total" {
        errs = (NF == 6) ? $5 : 0
        printf "  %-14s %6.2f (%.2f)\n", $NF, $4 / n, errs / n; sum += $4 }
        END { printf "  %-14s %6.2f\n", "total", sum / n }' "$D/$t.strace"
done
