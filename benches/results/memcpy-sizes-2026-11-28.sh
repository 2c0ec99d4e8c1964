#!/usr/bin/env bash
# The bytes a churn session copies with memcpy in the gateway, by call site (2026-11-28).
# An LD_PRELOAD shim counts each memcpy's size by its return address; a 3-second churn
# run of 4 clients against the release gateway (CONFIG: benches/gateway/all-layers.toml
# or no-layers.toml); symbols from addr2line. Needs gcc, mosquitto, a release build of
# mqtt-gateway and mqtt-load in $CARGO_TARGET_DIR (default target/). Ports 21883/21888.
#   bash benches/results/memcpy-sizes-2026-11-28.sh [CONFIG]
set -euo pipefail
cd "$(dirname "$0")/../.."
T=${CARGO_TARGET_DIR:-target}/release
CFG=${1:-benches/gateway/all-layers.toml}
D=$(mktemp -d)
cat >"$D/mc.c" <<'C'
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#define N 4096
static struct { uintptr_t ra; unsigned long calls, bytes; } tab[N];
static volatile int lk;
static unsigned long total_calls, total_bytes;
static inline void *cp(void *d, const void *s, size_t n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}
static void rec(uintptr_t ra, size_t n) {
    while (__sync_lock_test_and_set(&lk, 1)) {}
    total_calls++; total_bytes += n;
    unsigned h = (ra >> 2) % N;
    while (tab[h].ra && tab[h].ra != ra) h = (h + 1) % N;
    tab[h].ra = ra; tab[h].calls++; tab[h].bytes += n;
    __sync_lock_release(&lk);
}
void *memcpy(void *d, const void *s, size_t n) { rec((uintptr_t)__builtin_return_address(0), n); return cp(d, s, n); }
__attribute__((destructor)) static void dump(void) {
    char *p = getenv("MC_OUT"); FILE *f = fopen(p, "w"); if (!f) return;
    fprintf(f, "total %lu %lu\n", total_calls, total_bytes);
    for (int i = 0; i < N; i++) if (tab[i].ra) fprintf(f, "%lx %lu %lu\n", tab[i].ra, tab[i].calls, tab[i].bytes);
    fclose(f);
    char q[600]; snprintf(q, sizeof q, "%s.maps", p);
    FILE *m = fopen("/proc/self/maps", "r"), *o = fopen(q, "w"); char b[512];
    while (m && o && fgets(b, sizeof b, m)) fputs(b, o);
    if (m) fclose(m); if (o) fclose(o);
}
C
gcc -O2 -shared -fPIC -o "$D/mc.so" "$D/mc.c"
printf 'listener 21883 127.0.0.1\nallow_anonymous true\n' >"$D/m.conf"
mosquitto -c "$D/m.conf" >"$D/m.log" 2>&1 & M=$!
sleep 0.5
LD_PRELOAD=$D/mc.so MC_OUT=$D/mc.out "$T/examples/mqtt-gateway" --config "$CFG" \
    --listen 127.0.0.1:21888 --upstream 127.0.0.1:21883 >"$D/gw.log" 2>&1 & G=$!
sleep 1
"$T/mqtt-load" churn --target 127.0.0.1:21888 --concurrency 4 --duration 3 >"$D/load.json"
kill -INT $G; wait $G || true
kill $M; wait $M || true
python3 - "$D/mc.out" "$(python3 -c "import json,sys;print(json.load(open(sys.argv[1]))['ok'])" "$D/load.json")" <<'PY'
import re, subprocess, sys
f, sessions = sys.argv[1], float(sys.argv[2])
base = exe = None
for m in (l.split() for l in open(f + ".maps")):
    if len(m) >= 6 and "mqtt-gateway" in m[5] and int(m[2], 16) == 0:
        base, exe = int(m[0].split("-")[0], 16), m[5]
rows = []
for l in open(f):
    p = l.split()
    if p[0] == "total":
        print(f"sessions {sessions:.0f}; memcpy calls per session {int(p[1]) / sessions:.1f}, bytes per session {int(p[2]) / sessions:,.0f}")
    else:
        rows.append((int(p[0], 16), int(p[1]), int(p[2])))
top = sorted((r for r in rows if r[2] / sessions >= 100), key=lambda r: -r[2])[:25]
out = subprocess.run(["addr2line", "-a", "-f", "-C", "-i", "-e", exe] + [hex(r[0] - base) for r in top],
                     capture_output=True, text=True).stdout
for r, b in zip(top, re.split(r"^0x[0-9a-f]+\n", out, flags=re.M)[1:]):
    fr = b.strip().splitlines()
    loc = re.sub(r".*/(src/)", lambda m: m.group(1), fr[1])
    print(f"{r[1] / sessions:5.2f} calls {r[2] / sessions:6.0f} B  {fr[-2][:100]}  @ {loc}")
PY
rm -rf "$D"
