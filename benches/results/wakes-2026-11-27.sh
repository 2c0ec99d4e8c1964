#!/bin/bash
# Counts one gateway's `write` calls (on loopback churn, its eventfd wake-ups), `epoll_wait`
# calls and context switches, thread by thread, over 3 s of churn with 32 clients.
#   bash benches/results/wakes-2026-11-27.sh target/release/examples/mqtt-gateway
# (or a script that execs it with a scratch build's environment variable). Needs perf,
# mosquitto and the release build of mqtt-load in CARGO_TARGET_DIR (default target).
set -euo pipefail
T=${CARGO_TARGET_DIR:-target}/release
mosquitto -p 21883 >/dev/null 2>&1 & M=$!
sleep 0.3
"$@" --config benches/gateway/all-layers.toml --listen 127.0.0.1:21888 \
    --upstream 127.0.0.1:21883 >/dev/null 2>&1 & G=$!
sleep 0.5
"$T/mqtt-load" churn --target 127.0.0.1:21888 --duration 1 --concurrency 32 >/dev/null
perf stat --per-thread -e 'syscalls:sys_enter_write,syscalls:sys_enter_epoll_wait,context-switches' \
    -p $G -o /tmp/wakes-perf.txt -- sleep 3.2 &
P=$!
sleep 0.1
"$T/mqtt-load" churn --target 127.0.0.1:21888 --duration 3 --concurrency 32 | grep -o '"ok":[0-9]*'
wait $P
grep -E "write|epoll|context" /tmp/wakes-perf.txt
kill $G $M
wait 2>/dev/null || true
