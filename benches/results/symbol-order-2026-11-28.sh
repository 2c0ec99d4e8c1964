#!/usr/bin/env bash
# A scratch experiment of 2026-11-28 (BENCHMARKS.md, item 1, "Tried and not kept"): the
# mqtt-gateway linked with the session's hot functions first (lld's
# --symbol-ordering-file), so that they share fewer pages of code. Not part of the build.
#
#   bash benches/results/symbol-order-2026-11-28.sh     # leaves the build in /tmp/gw-ordered
#
# 1. callgrind.sh with unmangled names off lists the functions a churn session runs
#    (at least one instruction every two sessions, summed per function, in the binary);
# 2. the gateway is linked with them first; the extra linker arguments change the
#    example crate's symbol hashes, so the list is made again from that build and the
#    crate rebuilt with the same arguments (the hashes then stay put).
# Then, against the default build:
#   RESTART=1 PAIRS=24 NO_BUILD=1 GATEWAY_B=/tmp/gw-ordered \
#     TARGETS="haproxy_hard gw_all gw_all_b haproxy_hard_b" bash benches/churn_pairs.sh
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
W=$(mktemp -d)
ORDER_DIR=${ORDER_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/order}
sed 's/--dump-instr=yes/--dump-instr=yes --demangle=no/' benches/callgrind.sh >benches/callgrind-raw.sh
trap 'rm -f benches/callgrind-raw.sh' EXIT

hot() { # hot OUT_DIR > list
    python3 - "$1" <<'PY'
import collections, glob, json, re, sys
out = sys.argv[1]
sessions = json.load(open(f"{out}/gw_all.json"))["ok"]
names, objs, tot, obj_of = {}, {}, collections.Counter(), {}
cur = curobj = None
skip = False
def define(table, line, key):
    m = re.match(key + r"=\((\d+)\)(?: (.*))?", line)
    if m.group(2):
        table[m.group(1)] = m.group(2)
    return table.get(m.group(1))
for line in open(glob.glob(f"{out}/gw_all.*.out.1")[0]):
    line = line.rstrip("\n")
    if line.startswith("ob="): curobj = define(objs, line, "ob"); continue
    if line.startswith("cob="): define(objs, line, "cob"); continue
    if line.startswith("cfn="): define(names, line, "cfn"); continue
    if line.startswith("fn="): cur = define(names, line, "fn"); obj_of[cur] = curobj; continue
    if line.startswith("calls="): skip = True; continue
    if line and (line[0].isdigit() or line[0] in "+-*"):
        if skip: skip = False; continue
        parts = line.split()
        if len(parts) >= 3 and cur: tot[cur] += int(parts[-1])
hot = [f for f, c in sorted(tot.items(), key=lambda x: -x[1])
       if c >= sessions // 2 and "mqtt-gateway" in (obj_of.get(f) or "")]
print("\n".join(hot))
PY
}

NO_BUILD=${NO_BUILD:-0} OUT=$W/cg1 bash benches/callgrind-raw.sh gw_all
hot "$W/cg1" >"$W/order.txt"
link() {
    CARGO_TARGET_DIR=$ORDER_DIR cargo rustc --release -p examples --example mqtt-gateway -- \
        -C link-arg=-Wl,--symbol-ordering-file="$W/order.txt" -C link-arg=-Wl,--no-warn-symbol-ordering
}
link
GATEWAY=$ORDER_DIR/release/examples/mqtt-gateway NO_BUILD=1 OUT=$W/cg2 bash benches/callgrind-raw.sh gw_all
hot "$W/cg2" >"$W/order2.txt"
cat "$W/order.txt" "$W/order2.txt" | awk '!seen[$0]++' >"$W/order.all" && mv "$W/order.all" "$W/order.txt"
touch examples/mqtt-gateway/main.rs
link
cp "$ORDER_DIR/release/examples/mqtt-gateway" /tmp/gw-ordered
echo "ordered build: /tmp/gw-ordered (list: $W/order.txt)"
