#!/usr/bin/env bash
# GET /bans against a full ban table (100,000 bans restored from a bans file): the
# connect-to-CONNACK latency of a client through the release mqtt-gateway, idle, while
# four loops fetch /bans (the default limit, then ?limit=10000), and while four loops
# fetch /healthz (the control). Measured on 2026-11-28 for the /bans fix (CHANGELOG).
#
#   cargo build --release -p examples --example mqtt-gateway
#   bash benches/results/bans-2026-11-28.sh
#
# Uses ports 28183 (gateway), 28184 (mosquitto), 28190 (metrics), loopback only; the
# client rotates its source over 127.0.2.1 .. 127.0.201.250 so the per-IP limits do
# not refuse it. Stops what it started by PID.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
GW=${GATEWAY:-${CARGO_TARGET_DIR:-$ROOT/target}/release/examples/mqtt-gateway}
DIR=$(mktemp -d)
python3 - "$DIR" <<'PY'
import datetime, sys
start = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
recs = ['{"key":"username","value":"u%06d","until":"%s","reason":"manual"}'
        % (i, (start + datetime.timedelta(seconds=i)).strftime('%Y-%m-%dT%H:%M:%SZ'))
        for i in range(100000)]
open(sys.argv[1] + '/bans.json', 'w').write('[' + ','.join(recs) + ']')
PY
cat >"$DIR/gw.toml" <<TOML
[metrics]
enabled = true
listen = "127.0.0.1:28190"
[security]
bans_file = "$DIR/bans.json"
TOML
cat >"$DIR/lat.py" <<'PY'
import socket, sys, time
dur, port = float(sys.argv[1]), int(sys.argv[2])
CONNECT = bytes([0x10, 0x10, 0, 4]) + b'MQTT' + bytes([4, 2, 0, 60, 0, 4]) + b'lat1'
ts, end, k = [], time.time() + dur, 0
while time.time() < end:
    time.sleep(0.002)
    t0 = time.perf_counter()
    k += 1
    s = socket.create_connection(('127.0.0.1', port),
                                 source_address=(f'127.0.{2 + k // 250 % 200}.{1 + k % 250}', 0))
    s.sendall(CONNECT)
    b = s.recv(4)
    t1 = time.perf_counter()
    assert b[:2] == b'\x20\x02', b
    s.sendall(b'\xe0\x00')
    s.close()
    ts.append((t1 - t0) * 1000)
ts.sort()
n = len(ts)
print(f"n={n} p50={ts[n // 2]:.2f}ms p99={ts[int(n * 0.99)]:.2f}ms max={ts[-1]:.1f}ms")
PY
mosquitto -p 28184 >"$DIR/mosquitto.log" 2>&1 &
MP=$!
sleep 0.5
"$GW" --config "$DIR/gw.toml" --listen 127.0.0.1:28183 --upstream 127.0.0.1:28184 >"$DIR/gw.log" 2>&1 &
GP=$!
trap 'kill -INT $GP 2>/dev/null; sleep 2; kill $MP 2>/dev/null; rm -rf "$DIR"' EXIT
sleep 3
grep -o "restored=[0-9]*" "$DIR/gw.log"
loops() { # path: four curl loops for 7 s while the client measures 6 s
    for _ in 1 2 3 4; do
        (end=$((SECONDS + 7)); while [ $SECONDS -lt $end ]; do curl -s -o /dev/null "127.0.0.1:28190$1"; done) &
    done
    python3 "$DIR/lat.py" 6 28183
    wait
}
echo "idle:                    $(python3 "$DIR/lat.py" 6 28183)"
echo "4 loops /bans:           $(loops /bans)"
echo "4 loops /bans?limit=10000: $(loops '/bans?limit=10000')"
echo "4 loops /healthz:        $(loops /healthz)"
