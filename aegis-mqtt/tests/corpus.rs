//! Replays the committed fuzz seed corpora through the fuzz entry points.
//!
//! Seeds named `bad_*` must be refused and all others accepted, so the corpora stay
//! meaningful as the validators change.

use std::path::PathBuf;

use aegis_mqtt::{Config, Next, Session, validate_connect};

fn corpus(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(files.len() >= 20, "{name}: {} seeds", files.len());
    files
}

#[test]
fn connect_corpus() {
    for (name, data) in corpus("mqtt_connect") {
        aegis_mqtt::__fuzz::connect(&data);
        let ok = validate_connect(&data, &Config::new()).is_ok();
        assert_eq!(ok, !name.starts_with("bad_"), "{name}");
    }
}

/// Whether the whole stream (after the chunk-size prefix and the CONNACK body, if any)
/// validates.
fn stream_ok(data: &[u8]) -> bool {
    let (&n, rest) = data.split_first().unwrap();
    let mut buf = &rest[usize::from(n % 8)..];
    let mut connack = None;
    if n & 8 != 0 {
        let body;
        (body, buf) = buf.split_at(32);
        connack = Some([&[0x20, 32][..], body].concat());
    }
    let mut s = Session::new(Config::new().max_connect_size(512).max_packet_size(4096));
    loop {
        match s.next(buf) {
            Ok(Next::Packet { len, .. }) => {
                buf = &buf[len..];
                if let Some(c) = connack.take() {
                    s.on_connack(&c);
                }
            }
            Ok(Next::NeedMore(_)) => return buf.is_empty(),
            Err(_) => return false,
        }
    }
}

#[test]
fn stream_corpus() {
    for (name, data) in corpus("mqtt_stream") {
        aegis_mqtt::__fuzz::stream(&data);
        assert_eq!(stream_ok(&data), !name.starts_with("bad_"), "{name}");
    }
}

/// Each stream seed again, in chunks of every size from 1 to 64 bytes: the fuzz entry
/// point asserts that each split gives what the whole stream gives.
#[test]
fn stream_corpus_every_chunk_size() {
    for (_, data) in corpus("mqtt_stream") {
        let (&n, rest) = data.split_first().unwrap();
        let rest = &rest[usize::from(n % 8)..];
        for size in 0..64 {
            // One chunk size, `size + 1`; the CONNACK bit and the rest as they were.
            let seed = [&[(n & 8) | 1, size][..], rest].concat();
            aegis_mqtt::__fuzz::stream(&seed);
        }
    }
}

/// The inspection seeds: `bad_NN_<rule>` are blocked by the default rule set, naming
/// that rule; `ok_NN` (ordinary telemetry) pass; none panics the fuzz entry point.
#[cfg(feature = "inspect")]
#[test]
fn inspect_corpus() {
    use aegis_mqtt::inspect::{Inspector, Message};
    let inspector = Inspector::builder().default_rules().build().unwrap();
    for (name, data) in corpus("inspect") {
        aegis_mqtt::inspect::fuzz(&data);
        let msg = Message {
            client_id: "c",
            username: None,
            topic: "t",
            payload: &data,
        };
        let outcome = inspector.inspect(&msg);
        if let Some(rule) = name.strip_prefix("bad_").map(|n| &n[3..]) {
            let blocked = outcome.blocked_by().map(|h| h.rule().to_owned());
            assert_eq!(blocked.as_deref(), Some(rule), "{name}");
        } else {
            assert!(outcome.blocked_by().is_none(), "{name}: {outcome:?}");
        }
    }
}
