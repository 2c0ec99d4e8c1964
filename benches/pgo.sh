#!/usr/bin/env bash
# A profile-guided (PGO) release build of the mqtt-gateway:
#
#   bash benches/pgo.sh        # prints the binary's path: $CARGO_TARGET_DIR/pgo/mqtt-gateway
#
# A short MQTT session through the gateway costs both in the instructions it runs and in
# the code it fetches (BENCHMARKS.md, "Where the gateway is behind"). With a profile,
# LLVM lays out the code a connection runs together, moves what never runs out of the
# way and inlines by what runs. Three steps:
#   1. an instrumented release build (`-Cprofile-generate`), in $CARGO_TARGET_DIR/pgo;
#   2. a training run of it in front of mosquitto, with all layers and with none
#      (benches/gateway/*.toml), under the load of benches/compare.sh's scenarios
#      (churn, one client, QoS 0 and 1, bulk bytes, idle sessions; flood and slowloris
#      with all layers), each process stopped with SIGINT so that it writes its profile;
#   3. a release build with the merged profile (`-Cprofile-use`).
# The same workspace release profile (fat LTO, one codegen unit) otherwise. Nothing here
# changes `cargo build --release`: PGO is an extra step a deployment can take.
#
# The profile needs the `llvm-profdata` of rustc's LLVM major version (22 for rustc
# 1.95); Debian 12 has it in `llvm-22` (bookworm-security), installed when missing, with
# mosquitto. Two full release builds: about 13 minutes on two cores. Ports 21883 and
# 21887 to 21889, as benches/compare.sh (do not run both at once); loopback only.
# Environment: CARGO_TARGET_DIR.
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
PGO=$TARGET_DIR/pgo
mkdir -p "$PGO"

log() { printf '[pgo %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
. benches/common.sh
trap stop_started EXIT
# The training holds 1,000 idle sessions: two descriptors each in the gateway.
raise_nofile $((2 * 1000 + 128)) "the training's 1,000 idle sessions through the gateway"
llvm=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\)\..*/\1/p')
PROFDATA=llvm-profdata-$llvm
need_debian mosquitto "$PROFDATA=llvm-$llvm"

log "1/3: instrumented build into $PGO/generate"
CARGO_TARGET_DIR=$PGO/generate RUSTFLAGS="-Cprofile-generate=$PGO/raw" \
    cargo build --release -q -p examples --example mqtt-gateway
cargo build --release -q -p benches --bin mqtt-load
LOAD=$TARGET_DIR/release/mqtt-load

log "2/3: training"
rm -rf "$PGO/raw"
mkdir -p "$PGO/raw"
start_mosquitto "$PGO"
# train CONFIG PORT [attacks]: one gateway process under each scenario's load, then
# stopped with SIGINT: it drains, returns from main and writes its profile.
train() {
    local config=$1 port=$2 pid
    LLVM_PROFILE_FILE="$PGO/raw/%p.profraw" "$PGO/generate/release/examples/mqtt-gateway" \
        --config "benches/gateway/$config" --listen "127.0.0.1:$port" \
        --upstream 127.0.0.1:21883 >"$PGO/train-$config.log" 2>&1 &
    pid=$!
    STARTED+=("$pid")
    wait_port "$port"
    local target=(--target "127.0.0.1:$port")
    "$LOAD" churn "${target[@]}" --concurrency 32 --duration 6 >/dev/null
    "$LOAD" churn "${target[@]}" --concurrency 1 --duration 2 >/dev/null
    "$LOAD" publish "${target[@]}" --qos 0 --payload 64 --concurrency 4 --duration 3 >/dev/null
    "$LOAD" publish "${target[@]}" --qos 1 --payload 64 --concurrency 4 --duration 3 >/dev/null
    "$LOAD" publish "${target[@]}" --qos 0 --payload 65536 --concurrency 4 --duration 2 >/dev/null
    "$LOAD" hold 1000 "${target[@]}" --duration 1 --keep-alive 60 >/dev/null
    if [ "${3:-}" = attacks ]; then
        "$LOAD" flood "${target[@]}" --attackers 10 --concurrency 64 --duration 2 >/dev/null
        "$LOAD" slowloris 100 "${target[@]}" --deadline-ms 3000 --interval-ms 400 --duration 4.5 >/dev/null
    fi
    kill -INT "$pid"
    reap "$pid" || { log "the instrumented gateway ($config) failed: $PGO/train-$config.log"; exit 1; }
}
train all-layers.toml 21888 attacks
train no-layers.toml 21887
"$PROFDATA" merge -o "$PGO/merged.profdata" "$PGO"/raw/*.profraw
# Cargo does not see a flag's file change: name the profile by its content, so that a
# new profile changes RUSTFLAGS and rebuilds everything with it.
profile=$PGO/merged-$(sha256sum "$PGO/merged.profdata" | cut -c1-16).profdata
rm -f "$PGO"/merged-*.profdata
cp "$PGO/merged.profdata" "$profile"

log "3/3: build with the profile into $PGO/use"
CARGO_TARGET_DIR=$PGO/use RUSTFLAGS="-Cprofile-use=$profile" \
    cargo build --release -q -p examples --example mqtt-gateway
cp "$PGO/use/release/examples/mqtt-gateway" "$PGO/mqtt-gateway"
log "done"
echo "$PGO/mqtt-gateway"
