//! Payload inspection: 1,000 messages of 100-byte payloads (JSON telemetry, one in 20 an
//! attack from the default set's categories) through `Inspector::inspect`, against the
//! same loop without inspection.
//!
//! ```text
//! cargo bench -p benches --bench inspect
//! ```
//!
//! - `baseline`: the loop alone (it reads each payload's length, so that the messages
//!   are touched);
//! - `default_rules`: `Inspector::inspect` with the default rule set (one `RegexSet`);
//! - `all_rules`: the default set plus a topic rule with `%c`, a size limit and an
//!   entropy rule at 6 bits per byte over 64 bytes (a threshold low enough that the
//!   histogram runs on every payload here; at 7.5, 100 bytes, which cannot score above
//!   log2(100) = 6.6, would skip it).
//!
//! Goal: at least 1 million messages per second per core with the default rules. The
//! figures are printed in messages per second after criterion's own report.
//!
//! Then large payloads, one at a time through `Inspector::inspect` with the default
//! rules, 16 KiB and 256 KiB each (`inspect_large_payloads`):
//!
//! - `text`: JSON telemetry records, one after the other;
//! - `gap_flood`: what costs a lazy DFA with bounded gaps the most: `x` bytes, with
//!   "`id ", "' or '", " union /*" and "' and \"" every 263, 61, 59 and 53 bytes, so
//!   that the default rules' gaps (in backticks, quotes and comments) are reopened at
//!   co-prime intervals and their positions combine into a new state almost every byte.
//!
//! Goal: a gap flood costs no more than a few times text of its size. The figures are
//! printed in microseconds per payload.

use std::hint::black_box;
use std::time::Duration;

use aegis_mqtt::inspect::{Action, ClientMatch, Inspector, Message, Outcome, Severity, TopicRule};
use criterion::{Criterion, Throughput};

const MESSAGES: usize = 1_000;
const PAYLOAD: usize = 100;

/// `s` padded with spaces before its closing brace (or cut) to exactly 100 bytes.
fn sized(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    let close = v.pop();
    v.resize(PAYLOAD - 1, b' ');
    v.extend(close);
    v.truncate(PAYLOAD);
    v
}

fn payloads() -> Vec<Vec<u8>> {
    const ATTACKS: [&str; 5] = [
        r#"{"device":"sensor-0042","note":"x' OR '1'='1"}"#,
        r#"{"device":"sensor-0042","cmd":"ping 8.8.8.8; cat /etc/passwd"}"#,
        r#"{"device":"sensor-0042","label":"<script>alert(1)</script>"}"#,
        r#"{"device":"sensor-0042","file":"../../../etc/shadow"}"#,
        r#"{"device":"sensor-0042","q":"1 UNION SELECT pass FROM users"}"#,
    ];
    (0..MESSAGES)
        .map(|i| {
            if i % 20 == 19 {
                sized(ATTACKS[(i / 20) % ATTACKS.len()])
            } else {
                let t = 15.0 + f64::from(u32::try_from(i % 100).unwrap()) / 10.0;
                sized(&format!(
                    r#"{{"device":"sensor-{:04}","t":{t:.2},"h":{},"p":1013.{},"bat":{},"ts":{}}}"#,
                    i % 64,
                    30 + i % 40,
                    i % 10,
                    50 + i % 50,
                    1_700_000_000 + i
                ))
            }
        })
        .collect()
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();

    let payloads = payloads();
    assert!(payloads.iter().all(|p| p.len() == PAYLOAD));
    let msgs: Vec<Message<'_>> = payloads
        .iter()
        .map(|p| Message {
            client_id: "sensor-0042",
            username: Some("devices"),
            topic: "devices/sensor-0042/telemetry",
            payload: p,
        })
        .collect();
    let default_rules = Inspector::builder().default_rules().build().unwrap();
    let all_rules = Inspector::builder()
        .default_rules()
        .max_payload(64 * 1024, Action::Block, Severity::Medium)
        .entropy(6.0, 64, Action::Flag, Severity::Low)
        .topics(TopicRule::new(ClientMatch::Any).allow("devices/%c/#"))
        .build()
        .unwrap();
    // The stream is what it says: 50 blocks, the rest passes.
    let blocked = |i: &Inspector| {
        msgs.iter()
            .filter(|m| matches!(i.inspect(m), Outcome::Blocked(_)))
            .count()
    };
    assert_eq!(blocked(&default_rules), MESSAGES / 20);
    assert_eq!(blocked(&all_rules), MESSAGES / 20);

    let mut g = c.benchmark_group("inspect_100_byte_payloads");
    g.throughput(Throughput::Elements(MESSAGES as u64));
    g.bench_function("baseline", |b| b.iter(|| baseline(black_box(&msgs))));
    g.bench_function("default_rules", |b| {
        b.iter(|| inspect_all(&default_rules, black_box(&msgs)));
    });
    g.bench_function("all_rules", |b| {
        b.iter(|| inspect_all(&all_rules, black_box(&msgs)));
    });
    g.finish();
    c.final_summary();

    // Messages per second on this core, from a plain timed loop.
    for (name, run) in [
        ("baseline", &(|| baseline(&msgs)) as &dyn Fn() -> usize),
        ("default_rules", &|| inspect_all(&default_rules, &msgs)),
        ("all_rules", &|| inspect_all(&all_rules, &msgs)),
    ] {
        let rounds = 2_000;
        let start = tokio::time::Instant::now();
        for _ in 0..rounds {
            black_box(run());
        }
        let secs = tokio::time::Instant::now()
            .saturating_duration_since(start)
            .as_secs_f64();
        #[allow(clippy::cast_precision_loss)]
        let rate = (rounds * MESSAGES) as f64 / secs;
        println!("inspect {name}: {:.2} M msgs/s", rate / 1e6);
    }

    let large: Vec<(String, Vec<u8>)> = [16 * 1024, 256 * 1024]
        .into_iter()
        .flat_map(|len| {
            let kib = len / 1024;
            [
                (format!("text_{kib}k"), text(len)),
                (format!("gap_flood_{kib}k"), gap_flood(len)),
            ]
        })
        .collect();
    for (name, payload) in &large {
        assert!(!inspect_one(&default_rules, payload), "{name} passes");
    }
    let mut g = c.benchmark_group("inspect_large_payloads");
    for (name, payload) in &large {
        g.throughput(Throughput::Bytes(payload.len() as u64));
        g.bench_function(name.as_str(), |b| {
            b.iter(|| inspect_one(&default_rules, black_box(payload)));
        });
    }
    g.finish();
    c.final_summary();
    for (name, payload) in &large {
        let rounds = 20;
        let start = tokio::time::Instant::now();
        for _ in 0..rounds {
            black_box(inspect_one(&default_rules, payload));
        }
        let secs = tokio::time::Instant::now()
            .saturating_duration_since(start)
            .as_secs_f64();
        println!(
            "inspect {name}: {:.0} us per payload",
            secs / f64::from(rounds) * 1e6
        );
    }
}

/// `len` bytes of JSON telemetry records.
fn text(len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(len + 128);
    for i in 0.. {
        if p.len() >= len {
            break;
        }
        p.extend(
            format!(
                r#"{{"device":"sensor-{:04}","t":{}.{},"note":"it's fine","h":{}}} "#,
                i % 64,
                15 + i % 10,
                i % 10,
                30 + i % 40
            )
            .as_bytes(),
        );
    }
    p.truncate(len);
    p
}

/// `len` bytes of `x`, with the openers of the default rules' gaps every 263, 61, 59 and
/// 53 bytes.
fn gap_flood(len: usize) -> Vec<u8> {
    let mut p = vec![b'x'; len];
    for (t, period) in [
        (&b"`id "[..], 263),
        (b"' or '", 61),
        (b" union /*", 59),
        (b"' and \"", 53),
    ] {
        for at in (period / 2..len.saturating_sub(t.len())).step_by(period) {
            p[at..at + t.len()].copy_from_slice(t);
        }
    }
    p
}

/// One large payload through `inspector`: whether it was blocked.
fn inspect_one(inspector: &Inspector, payload: &[u8]) -> bool {
    let msg = Message {
        client_id: "sensor-0042",
        username: Some("devices"),
        topic: "devices/sensor-0042/telemetry",
        payload,
    };
    matches!(inspector.inspect(&msg), Outcome::Blocked(_))
}

/// The loop without inspection.
fn baseline(msgs: &[Message<'_>]) -> usize {
    msgs.iter().map(|m| black_box(m.payload).len() & 1).sum()
}

/// The number of messages blocked.
fn inspect_all(inspector: &Inspector, msgs: &[Message<'_>]) -> usize {
    msgs.iter()
        .filter(|m| matches!(inspector.inspect(m), Outcome::Blocked(_)))
        .count()
}
