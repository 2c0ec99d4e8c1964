#!/usr/bin/env bash
# How long one ban check can wait while another thread lists the whole ban table
# (Security::bans, what the mqtt-gateway's bans-file writer calls): a scratch crate
# against this checkout's aegis-mqtt, release build, 100,000 bans (half addresses, half
# usernames); one thread lists every 200 ms (`full`), or lists the last 1,000
# (`last`, /bans's default), or nothing (`none`), while the main thread checks bans for
# 3 s and reports the slowest check. Measured on 2026-11-28 for the CHANGELOG's figures
# (a quiet machine): before the listing in runs (c1c6a35) the slowest check took 64 ms
# with `full` (0.24 ms with `none`), after it 3.9 ms (0.18 ms with `none`).
#
#   bash benches/results/banlock-2026-11-28.sh [AEGIS_MQTT_DIR]
#
# AEGIS_MQTT_DIR defaults to this checkout's aegis-mqtt (a worktree of another commit's
# to compare). Builds in a temporary directory and deletes it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CRATE=${1:-$ROOT/aegis-mqtt}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"' EXIT
mkdir -p "$DIR/src"
cat >"$DIR/Cargo.toml" <<TOML
[package]
name = "banlock"
version = "0.0.0"
edition = "2021"
[dependencies]
aegis-mqtt = { path = "$CRATE" }
[workspace]
TOML
cat >"$DIR/src/main.rs" <<'RS'
use aegis_mqtt::security::{BanKey, Security};
use std::time::{Duration, Instant};
fn main() {
    let s = Security::default();
    for i in 0..100_000u32 {
        let key = if i % 2 == 0 {
            BanKey::addr(std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i)))
        } else {
            BanKey::username(&format!("u{i:06}"))
        };
        s.ban(key, Duration::from_secs(3600 + u64::from(i)));
    }
    let s2 = s.clone();
    let mode = std::env::args().nth(1).unwrap_or_default();
    std::thread::spawn(move || loop {
        if mode == "full" { let _ = s2.bans(); } else if mode == "last" { let _ = s2.bans_ending_last(1000); }
        std::thread::sleep(Duration::from_millis(200));
    });
    let mut worst = Duration::ZERO;
    let mut waits = vec![];
    let end = Instant::now() + Duration::from_secs(3);
    let mut k = 0u32;
    while Instant::now() < end {
        let t = Instant::now();
        let _ = s.is_banned(&BanKey::addr(std::net::IpAddr::from(std::net::Ipv4Addr::from(0x0b00_0000 + k))));
        let d = t.elapsed();
        k += 1;
        if d > Duration::from_micros(500) { waits.push(d); }
        worst = worst.max(d);
    }
    println!("checks {k}, worst {worst:?}, over 0.5ms: {}", waits.len());
}
RS
cp "$ROOT/Cargo.lock" "$DIR/" 2>/dev/null || true
CARGO_TARGET_DIR="$DIR/target" cargo build --release --manifest-path "$DIR/Cargo.toml" -q
for mode in none full last; do
    echo "$mode: $("$DIR/target/release/banlock" "$mode")"
done
