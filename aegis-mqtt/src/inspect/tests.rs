use super::*;

const RULES_MD: &str = include_str!("rules.md");

/// The lines of the fenced block after the heading `heading` in `rules.md`.
pub(crate) fn block(heading: &str) -> Vec<&'static str> {
    let after = RULES_MD
        .split_once(heading)
        .expect("the heading is in rules.md")
        .1;
    let body = after.split_once("```text\n").expect("a text block").1;
    let body = body.split_once("```").expect("the block ends").0;
    body.lines().filter(|l| !l.is_empty()).collect()
}

fn msg(payload: &[u8]) -> Message<'_> {
    Message {
        client_id: "c1",
        username: None,
        topic: "t",
        payload,
    }
}

fn defaults() -> Inspector {
    Inspector::builder().default_rules().build().unwrap()
}

#[test]
fn the_documented_attacks_are_blocked_by_the_named_rule() {
    let inspector = defaults();
    let caught = block("## Caught");
    assert!(caught.len() >= 25, "{}", caught.len());
    for line in caught {
        let (rule, payload) = line.split_once(": ").unwrap();
        let out = inspector.inspect(&msg(payload.as_bytes()));
        assert_eq!(
            out.blocked_by().map(Hit::rule),
            Some(rule),
            "{payload:?}: {out:?}"
        );
    }
}

#[test]
fn the_issue_examples_are_caught() {
    let inspector = defaults();
    for (payload, rule) in [
        ("' OR '1'='1", "sql_injection"),
        ("UNION SELECT", "sql_injection"),
        ("; DROP TABLE", "sql_injection"),
        ("; cat /etc/passwd", "command_injection"),
        ("$(curl http://x)", "command_injection"),
        ("`whoami`", "command_injection"),
        ("| nc host 4444", "command_injection"),
        ("<script>", "xss"),
        ("onerror=", "xss"),
        ("javascript:", "xss"),
        ("../../", "path_traversal"),
    ] {
        let out = inspector.inspect(&msg(payload.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{payload:?}");
        // Case does not matter.
        let upper = payload.to_ascii_uppercase();
        let out = inspector.inspect(&msg(upper.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{upper:?}");
    }
}

#[test]
fn the_false_positive_set_passes() {
    let inspector = Inspector::builder()
        .default_rules()
        .entropy(7.5, 64, Action::Block, Severity::Low)
        .build()
        .unwrap();
    let clean = block("## False-positive set");
    assert!(clean.len() >= 20, "{}", clean.len());
    assert!(clean.contains(&"temperature OR humidity = 5"));
    for payload in clean {
        assert_eq!(
            inspector.inspect(&msg(payload.as_bytes())),
            Outcome::Pass,
            "{payload:?}"
        );
    }
}

#[test]
fn flags_are_collected_once_per_rule_and_a_block_ends_the_check() {
    let inspector = Inspector::builder()
        .pattern("word", "foo", Action::Flag, Severity::Low)
        .pattern("word", "bar", Action::Flag, Severity::Low)
        .pattern("other", "baz", Action::Flag, Severity::High)
        .max_payload(10, Action::Flag, Severity::Medium)
        .pattern("stop", "stop", Action::Block, Severity::Critical)
        .build()
        .unwrap();
    assert_eq!(inspector.pattern_count(), 4);
    let out = inspector.inspect(&msg(b"foo bar baz"));
    let names: Vec<_> = out.flags().iter().map(Hit::rule).collect();
    assert_eq!(names, ["max_payload", "word", "other"]);
    assert_eq!(out.flags()[0].kind(), RuleKind::MaxPayload);
    assert_eq!(out.flags()[2].severity(), Severity::High);
    let out = inspector.inspect(&msg(b"foo stop"));
    let hit = out.blocked_by().unwrap();
    assert_eq!(
        (hit.rule(), hit.kind(), hit.action(), hit.severity()),
        ("stop", RuleKind::Pattern, Action::Block, Severity::Critical)
    );
    assert!(out.flags().is_empty());
    assert_eq!(inspector.inspect(&msg(b"ok")), Outcome::Pass);
}

#[test]
fn size_and_topics_come_before_patterns() {
    let inspector = Inspector::builder()
        .default_rules()
        .max_payload(8, Action::Block, Severity::Low)
        .topics(TopicRule::new(ClientMatch::Any).deny("secret/#"))
        .build()
        .unwrap();
    let out = inspector.inspect(&msg(b"<script>alert(1)</script>"));
    assert_eq!(out.blocked_by().map(Hit::rule), Some("max_payload"));
    let m = Message {
        topic: "secret/x",
        ..msg(b"<script>")
    };
    let out = inspector.inspect(&m);
    let hit = out.blocked_by().unwrap();
    assert_eq!((hit.rule(), hit.kind()), ("topic_acl", RuleKind::Topic));
    assert!(!hit.kind().is_payload());
    assert!(inspector.has_topic_rules());
}

#[test]
fn entropy_needs_raw_bytes_and_min_len() {
    let inspector = Inspector::builder()
        .entropy(7.5, 1024, Action::Block, Severity::Medium)
        .build()
        .unwrap();
    // A fixed pseudo-random KiB (xorshift): about 7.8 bits per byte.
    let mut x: u32 = 0x9E37_79B9;
    let random: Vec<u8> = (0..1024)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x.to_be_bytes()[0]
        })
        .collect();
    assert!(entropy::shannon(&random) > 7.5);
    let out = inspector.inspect(&msg(&random));
    assert_eq!(out.blocked_by().map(Hit::rule), Some("entropy"));
    // Under min_len: not computed.
    assert_eq!(inspector.inspect(&msg(&random[..1023])), Outcome::Pass);
    // The same bytes as base64 and hex text are far under the threshold.
    let b64 = base64(&random);
    assert!(b64.len() >= 1024 && entropy::shannon(b64.as_bytes()) <= 6.0);
    assert_eq!(inspector.inspect(&msg(b64.as_bytes())), Outcome::Pass);
    let hex: String = random
        .iter()
        .flat_map(|b| [b >> 4, b & 15])
        .map(|n| char::from_digit(u32::from(n), 16).unwrap())
        .collect();
    assert!(entropy::shannon(hex.as_bytes()) <= 4.0);
    assert_eq!(inspector.inspect(&msg(hex.as_bytes())), Outcome::Pass);
}

/// Standard base64, with padding.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn bad_rules_are_typed_errors_naming_the_rule() {
    let err = Inspector::builder()
        .default_rules()
        .pattern("broken", "(unclosed", Action::Block, Severity::Low)
        .build()
        .unwrap_err();
    assert_eq!((err.label(), err.rule()), ("pattern", "broken"));
    assert!(err.to_string().contains("\"broken\""), "{err}");
    // Over the size limit: refused at build, never slow at run time.
    let err = Inspector::builder()
        .pattern("huge", r"\w{1000}", Action::Block, Severity::Low)
        .size_limit(10_000)
        .build()
        .unwrap_err();
    assert_eq!((err.label(), err.rule()), ("pattern", "huge"));
    let err = Inspector::builder()
        .topics(TopicRule::new(ClientMatch::Any).allow("a/#/b"))
        .build()
        .unwrap_err();
    assert_eq!((err.label(), err.rule()), ("topic_filter", "topic_acl"));
    for t in [0.0, 8.5, f64::NAN] {
        let err = Inspector::builder()
            .entropy(t, 10, Action::Flag, Severity::Low)
            .build()
            .unwrap_err();
        assert_eq!(err.label(), "entropy");
    }
    let err = Inspector::builder()
        .pattern("", "x", Action::Flag, Severity::Low)
        .build()
        .unwrap_err();
    assert_eq!(err.label(), "empty_name");
}

#[test]
fn an_empty_inspector_passes_everything() {
    let inspector = Inspector::builder().build().unwrap();
    assert_eq!(inspector.inspect(&msg(b"' OR '1'='1")), Outcome::Pass);
    assert!(!inspector.has_topic_rules());
    assert_eq!(inspector.pattern_count(), 0);
}

#[test]
fn actions_deserialize_lowercase() {
    use serde::Deserialize;
    use serde::de::IntoDeserializer;
    use serde::de::value::{Error, StrDeserializer};
    // No serde format crate here: serde's own string deserializer.
    let a = |s: &'static str| {
        let d: StrDeserializer<'_, Error> = s.into_deserializer();
        Action::deserialize(d)
    };
    assert_eq!(a("block").unwrap(), Action::Block);
    assert_eq!(a("flag").unwrap(), Action::Flag);
    assert!(a("Block").is_err());
    assert_eq!(Action::Block.label(), "block");
    assert_eq!(Action::Flag.label(), "flag");
}

#[test]
fn fuzz_entry_survives_odd_input() {
    for data in [
        &b""[..],
        b"\xff\xfe\x00",
        "é/ü".as_bytes(),
        b"a/b/x<script>",
        &[0u8; 5000],
    ] {
        fuzz(data);
    }
}
