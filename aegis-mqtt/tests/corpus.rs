//! Replays the committed fuzz seed corpora through the fuzz entry points.
//!
//! Seeds named `bad_*` must be refused and all other seeds accepted, so the corpora stay
//! meaningful as the validators change. A seed's name starts with `bad_`, `ok_` or the
//! protocol version it speaks (`v31`, `v311`, `v5`, alone or followed by `_`).
//!
//! A `mqtt_connect` seed's first byte chooses the configuration
//! (`aegis_mqtt::__fuzz::CONNECT_CONFIGS`), the CONNECT follows: 0 is `Config::new()`;
//! a seed for another configuration is judged with that one, and must be one that
//! `Config::new()` accepts (a `bad_` one is refused for the configuration's sake).

use std::path::{Path, PathBuf};

use aegis_mqtt::{Config, Next, Session, validate_connect};

/// Whether `name` follows the seeds' naming scheme (see the module docs).
fn is_seed(name: &str) -> bool {
    matches!(
        name.split('_').next(),
        Some("bad" | "ok" | "v31" | "v311" | "v5")
    )
}

fn corpus_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(name)
}

/// The seeds in `dir`, by name.
fn seeds(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut ignored = 0;
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        // Others are not ours to judge: `cargo fuzz run TARGET corpus/TARGET` adds the
        // inputs it finds there, named by their SHA-1, and those are neither good nor bad.
        if !is_seed(&name) {
            ignored += 1;
            continue;
        }
        files.push((name, std::fs::read(&path).unwrap()));
    }
    if ignored > 0 {
        eprintln!(
            "{}: {ignored} files not named as seeds, ignored",
            dir.display()
        );
    }
    files.sort();
    assert!(
        files.len() >= 20,
        "{}: {} seeds",
        dir.display(),
        files.len()
    );
    files
}

fn replay_connect(dir: &Path) {
    for (name, data) in seeds(dir) {
        aegis_mqtt::__fuzz::connect(&data);
        let (config, frame) = aegis_mqtt::__fuzz::connect_input(&data);
        let ok = validate_connect(frame, &config).is_ok();
        assert_eq!(ok, !name.starts_with("bad_"), "{name}");
        if data.first().is_some_and(|&n| n != 0) {
            let default = validate_connect(frame, &Config::new());
            assert!(
                default.is_ok(),
                "{name}: Config::new() refuses it: {default:?}"
            );
        }
    }
}

#[test]
fn connect_corpus() {
    replay_connect(&corpus_dir("mqtt_connect"));
}

/// A stream seed as `__fuzz::stream` reads it: the first byte (none: an empty seed), and
/// what follows its chunk sizes (`n % 8` bytes, fewer if the seed is shorter).
fn split_stream_seed(data: &[u8]) -> (u8, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (0, data);
    };
    (n, &rest[usize::from(n % 8).min(rest.len())..])
}

/// Whether the whole stream (after the chunk-size prefix and the CONNACK body, if any)
/// validates, the CONNACK cut short as `__fuzz::stream` cuts it.
fn stream_ok(data: &[u8]) -> bool {
    let (n, mut buf) = split_stream_seed(data);
    let mut connack = None;
    if n & 8 != 0 {
        let body;
        (body, buf) = buf.split_at(32.min(buf.len()));
        let len = u8::try_from(body.len()).unwrap();
        connack = Some([&[0x20, len][..], body].concat());
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

fn replay_stream(dir: &Path) {
    for (name, data) in seeds(dir) {
        aegis_mqtt::__fuzz::stream(&data);
        assert_eq!(stream_ok(&data), !name.starts_with("bad_"), "{name}");
    }
}

#[test]
fn stream_corpus() {
    replay_stream(&corpus_dir("mqtt_stream"));
}

/// Each stream seed again, in chunks of every size from 1 to 64 bytes: the fuzz entry
/// point asserts that each split gives what the whole stream gives.
fn replay_stream_every_chunk_size(dir: &Path) {
    for (_, data) in seeds(dir) {
        let (n, rest) = split_stream_seed(&data);
        for size in 0..64 {
            // One chunk size, `size + 1`; the CONNACK bit and the rest as they were.
            let seed = [&[(n & 8) | 1, size][..], rest].concat();
            aegis_mqtt::__fuzz::stream(&seed);
        }
    }
}

#[test]
fn stream_corpus_every_chunk_size() {
    replay_stream_every_chunk_size(&corpus_dir("mqtt_stream"));
}

/// The inspection seeds: `bad_NN_<rule>` are blocked by the default rule set, naming
/// that rule; `ok_NN` (ordinary telemetry) pass; none panics the fuzz entry point.
#[cfg(feature = "inspect")]
fn replay_inspect(dir: &Path) {
    use aegis_mqtt::inspect::{Inspector, Message};
    let inspector = Inspector::builder().default_rules().build().unwrap();
    for (name, data) in seeds(dir) {
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

#[cfg(feature = "inspect")]
#[test]
fn inspect_corpus() {
    replay_inspect(&corpus_dir("inspect"));
}

/// A directory removed when dropped, test failed or not.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `cargo fuzz run TARGET corpus/TARGET` leaves in a seed directory (inputs named
/// by their SHA-1: short ones, an empty one, one the validators and the inspector
/// refuse) does not break the replays: they replay the seeds only.
#[test]
fn fuzzer_inputs_beside_the_seeds_are_ignored() {
    const STRAYS: [(&str, &[u8]); 4] = [
        ("c7255dc48b42d44f6c0676d6009051b7e1aa885b", b"\x0f"),
        ("292bd29351a49c4013e4df5997df4d3fa45b4c75", b"\x08\x10"),
        ("27b0a4af8b9bf3e8defa02b0abb2c7b7f3291afd", b"' OR 1=1 --"),
        ("da39a3ee5e6b4b0d3255bfef95601890afd80709", b""),
    ];
    assert!(STRAYS.iter().all(|(name, _)| !is_seed(name)));
    let tmp = TempDir(std::env::temp_dir().join(format!("aegis-corpus-{}", std::process::id())));
    let copy = |corpus: &str| {
        let dir = tmp.0.join(corpus);
        std::fs::create_dir_all(&dir).unwrap();
        for entry in std::fs::read_dir(corpus_dir(corpus)).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, dir.join(path.file_name().unwrap())).unwrap();
        }
        for (name, data) in STRAYS {
            std::fs::write(dir.join(name), data).unwrap();
        }
        dir
    };
    replay_connect(&copy("mqtt_connect"));
    let stream = copy("mqtt_stream");
    replay_stream(&stream);
    replay_stream_every_chunk_size(&stream);
    #[cfg(feature = "inspect")]
    replay_inspect(&copy("inspect"));
}
