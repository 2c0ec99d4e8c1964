#!/usr/bin/env bash
# User-space instructions and heap allocations per short MQTT session (CONNECT, CONNACK,
# DISCONNECT), counted exactly with valgrind's callgrind, for the gateway and HAProxy.
#
#   bash benches/callgrind.sh [TARGET...]     # default: gw_all gw_off haproxy_hard haproxy_plain
#
# CPU time on a shared two-core machine moves by 10 % or more between runs; instruction
# counts do not. Each target runs under callgrind in front of mosquitto, pinned to CPU 0
# and serving from one thread (below); `mqtt-load churn --concurrency 4` warms it up for
# 3 s, the counters are zeroed, then 8 s of sessions are counted and divided by the
# sessions completed. Valgrind slows the target about 50x, so these runs measure work,
# not speed. Kernel work (the sockets) is not counted.
#
# It also counts the code a session runs: the 64-byte lines of machine code holding an
# instruction executed at least once every two sessions on average (sessions / 2 times
# or more: a line run once a session passes, with room for the few sessions the
# counting window cuts). Between two sessions the other processes and the kernel run
# on the same cores and evict the gateway's code from the caches, so a session fetches
# most of these lines again. Both counts matter for the time a session
# takes: the layers cost about 1 ns per instruction, well over one cycle, and a
# profile-guided build (19 % fewer instructions in 21 % fewer lines, counted as here on
# 2026-11-28) takes 5 % off the CPU (BENCHMARKS.md). The last column is the bytes of those hot instructions in the
# target's executable (`objdump` gives their lengths; shared libraries' not counted) and
# their density, bytes over 64 per code line: how much of each line a session fetches
# is code it runs (cold blocks inlined between hot ones lower it).
#
# Installs valgrind, mosquitto and haproxy from Debian when missing. Uses the release
# binaries in CARGO_TARGET_DIR (default target/), built unless NO_BUILD=1; GATEWAY=PATH
# measures another build of the gateway. OUT=DIR SUMMARY_ONLY=1 prints the table again
# from the outputs an earlier run left in DIR, running nothing. Ports 21883 (mosquitto)
# and 21884..21889, as benches/compare.sh (do not run both at once).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
if [ "${SUMMARY_ONLY:-0}" = 1 ] && [ ! -d "${OUT:-}" ]; then
    echo "callgrind.sh: SUMMARY_ONLY=1 reads the outputs of an earlier run: set OUT to its directory" >&2
    exit 2
fi
OUT=${OUT:-$TARGET_DIR/callgrind-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
TARGETS=("$@")
[ ${#TARGETS[@]} -eq 0 ] && TARGETS=(gw_all gw_off haproxy_hard haproxy_plain)

log() { echo "[callgrind $(date -u +%H:%M:%S)] $*" >&2; }
. benches/common.sh
if [ "${SUMMARY_ONLY:-0}" != 1 ]; then
    need_debian valgrind mosquitto haproxy
    HAPROXY=$(path_of haproxy)
fi
# The CPU every target is pinned to (below): the first this shell may run on, which is
# not CPU 0 in every container.
CPU=$(sed -n 's/^Cpus_allowed_list:[[:space:]]*\([0-9]*\).*/\1/p' /proc/self/status)

# summary: the table, from the outputs in OUT of the targets named.
summary() {
    python3 - "$OUT" "${TARGETS[@]}" <<'EOF'
import bisect, glob, json, os, re, subprocess, sys

out, targets = sys.argv[1], sys.argv[2:]
# The allocators' entry points: glibc's (HAProxy's, and the gateway's off Linux/glibc),
# with or without glibc's debug symbols, and jemalloc's (the gateway's; tikv-jemalloc-sys
# prefixes its symbols with _rjem_).
ALLOC = re.compile(r"\*  \S*:((malloc|calloc|realloc|posix_memalign) \[\S*libc\.so"
                   r"|_rjem_(malloc|mallocx|calloc|realloc|rallocx|posix_memalign) \[)")
def code_lines(path, sessions):
    """64-byte lines of code holding an instruction run at least sessions / 2 times: once
    every two sessions on average. A line run once a session passes, with room for the
    few sessions the counting window cuts at its ends; a line run in one session of
    two passes too, but not one whose instructions add up to sessions / 2 while each
    runs less often (a 16-instruction line run in one session of 32)."""
    ir, addr, after_call = {}, 0, False
    for line in open(path, errors="replace"):
        if line.startswith("calls="):
            # The next cost line is the call's inclusive cost, not an instruction's own.
            after_call = True
            continue
        if line[0] not in "0123456789+-*":
            after_call = False
            continue
        # "instr line Ir", positions compressed: absolute (0x..), relative (+n, -n), same (*).
        parts = line.split()
        pos = parts[0]
        if pos.startswith("0x"):
            addr = int(pos, 16)
        elif pos[0] in "+-":
            addr += int(pos)
        if after_call:
            after_call = False
            continue
        if len(parts) == 3:
            # An instruction's executions, summed over the cost lines that name it.
            ir[addr] = ir.get(addr, 0) + int(parts[2])
    # Each line's most-run instruction.
    hottest = {}
    for a, n in ir.items():
        hottest[a >> 6] = max(hottest.get(a >> 6, 0), n)
    lines = sum(1 for n in hottest.values() if n >= sessions / 2)
    return lines, hot_bytes(path, [a for a, n in ir.items() if n >= sessions / 2])

def hot_bytes(path, hot):
    """The bytes of the hot instructions (run at least sessions / 2 times) that lie in
    the profiled executable, from `objdump`'s instruction addresses (an instruction's
    length is the distance to the next one); None without objdump. Against the code
    lines it gives the density of the session's code: how much of each 64-byte line
    fetched is code the session runs. Instructions of shared libraries (glibc's memcpy)
    are not counted."""
    exe = None
    for line in open(path, errors="replace"):
        if line.startswith("cmd:"):
            exe = line.split()[1]
            break
    try:
        dump = subprocess.run(["objdump", "-d", "--no-show-raw-insn", exe],
                              capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError, TypeError):
        return None
    addrs = sorted(int(m.group(1), 16) for m in re.finditer(r"^ *([0-9a-f]+):", dump, re.M))
    total = 0
    for a in hot:
        i = bisect.bisect_left(addrs, a)
        if i + 1 < len(addrs) and addrs[i] == a:
            total += min(addrs[i + 1] - a, 15)
    return total

print("| target | sessions | instructions per session | heap allocations per session "
      "| 64-byte code lines per session | hot code bytes (density) |")
print("|---|---|---|---|---|---|")
for t in targets:
    # The dump taken after the counted run (part 1; part 2 is the exit).
    dumps = sorted(glob.glob(f"{out}/{t}.*.out.1"), key=os.path.getmtime)
    if not dumps:
        print(f"| {t} | - | - | - | - | - |")
        continue
    sessions = json.load(open(f"{out}/{t}.json"))["ok"]
    if not sessions:
        sys.exit(f"{t}: no session completed under callgrind; see {out}/{t}.log")
    tree = subprocess.run(["callgrind_annotate", "--tree=caller", "--threshold=100", dumps[-1]],
                          capture_output=True, text=True).stdout
    m = re.search(r"([\d,]+) \s*\(100\.0%\)\s+PROGRAM TOTALS", tree)
    if not m:
        sys.exit(f"{t}: no PROGRAM TOTALS in callgrind_annotate's output of {dumps[-1]}")
    total = int(m.group(1).replace(",", ""))
    # Calls into the allocator from outside it (realloc calling malloc is one).
    allocs = 0
    for block in tree.split("\n\n"):
        if ALLOC.search(block):
            for line in block.splitlines():
                m = re.search(r"<\s+(\S+).*\(([\d,]+)x\)", line)
                if m and not any(a in line for a in ("libc.so", "./malloc/", "tikv-jemalloc-sys")):
                    allocs += int(m.group(2).replace(",", ""))
    lines, hot = code_lines(dumps[-1], sessions)
    dense = "-" if hot is None else f"{hot:,} ({hot / (64 * lines):.2f})"
    print(f"| {t} | {sessions} | {total / sessions:,.0f} | {allocs / sessions:.1f} | {lines:,} "
          f"| {dense} |")
EOF
}

if [ "${SUMMARY_ONLY:-0}" = 1 ]; then
    summary
    exit 0
fi

if [ "${NO_BUILD:-0}" != 1 ]; then
    log "building release binaries into $TARGET_DIR"
    cargo build --release -q -p benches --bins
    cargo build --release -q -p examples --example mqtt-gateway
fi
LOAD=$TARGET_DIR/release/mqtt-load
GATEWAY=${GATEWAY:-$TARGET_DIR/release/examples/mqtt-gateway}

trap stop_started EXIT

start_mosquitto "$OUT"

for t in "${TARGETS[@]}"; do
    case $t in
        # Each product serves from one thread: HAProxy with `nbthread 1`, the gateway from
        # one runtime. Valgrind runs one thread at a time anyway, and HAProxy's watchdog
        # then takes a thread waiting for a stick-table lock for a stuck one and aborts.
        # The gateway's default `server.runtime = "per-core"` starts one runtime per CPU
        # it may run on (available_parallelism, which honours the affinity mask), so
        # every target runs under `taskset -c $CPU` below: one CPU, one runtime (a second
        # runtime would be handed connections: the work of the hand-out and of two
        # runtimes, not of one). TOKIO_WORKER_THREADS=1 covers `runtime =
        # "work-stealing"`. The pin is the same for every target, HAProxy too.
        gw_all) port=21888; cmd=("$GATEWAY" --config benches/gateway/all-layers.toml --listen 127.0.0.1:$port --upstream 127.0.0.1:21883) ;;
        gw_off) port=21887; cmd=("$GATEWAY" --config benches/gateway/no-layers.toml --listen 127.0.0.1:$port --upstream 127.0.0.1:21883) ;;
        haproxy_hard | haproxy_plain)
            port=21885; cfg=hardened
            [ "$t" = haproxy_plain ] && port=21884 && cfg=plain
            sed 's/^\( *nbthread\) .*/\1 1/' "benches/haproxy/$cfg.cfg" >"$OUT/$cfg.cfg"
            cmd=("$HAPROXY" -db -f "$OUT/$cfg.cfg") ;;
        *) log "unknown target $t"; exit 2 ;;
    esac
    log "$t under callgrind (its output: $OUT/$t.log)"
    # taskset execs valgrind, which runs the target in its own process: $! is its PID.
    TOKIO_WORKER_THREADS=1 taskset -c "$CPU" valgrind --tool=callgrind --dump-instr=yes \
        --callgrind-out-file="$OUT/$t.%p.out" "${cmd[@]}" >"$OUT/$t.log" 2>&1 &
    pid=$!
    STARTED+=($pid)
    # Valgrind starts the target slowly.
    wait_port "$port" 20
    "$LOAD" churn --target 127.0.0.1:$port --concurrency 4 --duration 3 >/dev/null
    # Warmed up, every runtime has started: the gateway's others are `aegis-runtime-N`.
    threads=$( (cat /proc/"$pid"/task/*/comm 2>/dev/null || true) | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
    log "$t: threads $threads"
    if grep -qs '^aegis-runtime-' /proc/"$pid"/task/*/comm; then
        log "$t: the gateway serves from more than one runtime; its counts would not be one runtime's"
        exit 1
    fi
    callgrind_control -z "$pid" >/dev/null
    "$LOAD" churn --target 127.0.0.1:$port --concurrency 4 --duration 8 >"$OUT/$t.json"
    callgrind_control -d "$pid" >/dev/null
    kill -INT "$pid" 2>/dev/null || true
    sleep 2
    kill "$pid" 2>/dev/null || true
    reap "$pid" || true
done

summary
log "raw: $OUT"
