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
fn the_documented_misses_pass() {
    let inspector = defaults();
    let missed = block("## Not caught");
    assert!(missed.contains(&"admin' OR 1-- -"));
    assert!(missed.contains(&"1 UNION(SELECT password FROM users)"));
    for payload in missed {
        assert_eq!(
            inspector.inspect(&msg(payload.as_bytes())),
            Outcome::Pass,
            "{payload:?}"
        );
    }
}

#[test]
fn the_known_false_positives_are_still_blocked() {
    let inspector = defaults();
    for line in block("## Known false positives") {
        let (rule, payload) = line.split_once(": ").unwrap();
        let out = inspector.inspect(&msg(payload.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{payload:?}");
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

/// `n` bytes from a fixed xorshift64 seeded with `seed`.
pub(crate) fn random(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_be_bytes()[0]
        })
        .collect()
}

/// The first 4 KiB of an x86-64 ELF executable, as a firmware update carries it in
/// chunks: the ELF header, program headers, the interpreter path, then a GNU hash
/// table (its Bloom filter and buckets look random).
fn elf_chunk() -> Vec<u8> {
    let u16le = |v: u16| v.to_le_bytes().to_vec();
    let u32le = |v: u32| v.to_le_bytes().to_vec();
    let u64le = |v: u64| v.to_le_bytes().to_vec();
    let mut elf = [&b"\x7fELF\x02\x01\x01\x00"[..], &[0; 8]].concat();
    for v in [3, 0x3e] {
        elf.extend(u16le(v)); // ET_DYN, EM_X86_64
    }
    elf.extend(u32le(1));
    for v in [0x3_2f10, 64, 0x13_8f48] {
        elf.extend(u64le(v)); // entry, program and section header offsets
    }
    elf.extend(u32le(0));
    for v in [64, 56, 11, 64, 30, 29] {
        elf.extend(u16le(v));
    }
    // PHDR, INTERP, LOAD x4, DYNAMIC, NOTE, GNU_EH_FRAME, GNU_STACK, GNU_RELRO.
    for (kind, flags, off, size) in [
        (6, 4, 0x40, 0x268),
        (3, 4, 0x2a8, 0x1c),
        (1, 4, 0, 0x2_d6d8),
        (1, 5, 0x2_e000, 0xc_5e1d),
        (1, 4, 0xf_4000, 0x3_8af0),
        (1, 6, 0x12_d2f0, 0xb_d1c),
        (2, 6, 0x13_1b10, 0x200),
        (4, 4, 0x2c4, 0x44),
        (0x6474_e550, 4, 0x11_1c48, 0x4b1c),
        (0x6474_e551, 6, 0, 0),
        (0x6474_e552, 4, 0x12_d2f0, 0x6d10),
    ] {
        elf.extend(u32le(kind));
        elf.extend(u32le(flags));
        for v in [off, off, off, size, size, 0x1000] {
            elf.extend(u64le(v));
        }
    }
    elf.extend(b"/lib64/ld-linux-x86-64.so.2\0");
    elf.resize(0x308, 0);
    // GNU hash: nbuckets, symoffset, bloom size and shift, then the table.
    for v in [251, 59, 64, 14] {
        elf.extend(u32le(v));
    }
    let rest = 4096 - elf.len();
    elf.extend(random(0x4c46, rest));
    elf
}

/// Binary payloads, none of which the text rules may block: random bytes (encrypted
/// frames), gzip and zlib streams (high-entropy after a short header), an ELF chunk.
fn binary_payloads() -> Vec<(&'static str, Vec<u8>)> {
    let gzip = [
        &b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03"[..],
        &random(0x1f8b, 8192),
    ]
    .concat();
    let zlib = [&b"\x78\x9c"[..], &random(0x789c, 8192)].concat();
    vec![
        ("random 256 B", random(1, 256)),
        ("random 4 KiB", random(2, 4096)),
        ("random 64 KiB", random(3, 64 * 1024)),
        ("gzip", gzip),
        ("zlib", zlib),
        ("ELF chunk", elf_chunk()),
    ]
}

#[test]
fn binary_payloads_pass_the_text_rules() {
    let inspector = defaults();
    for (what, payload) in binary_payloads() {
        assert!(std::str::from_utf8(&payload).is_err(), "{what}");
        assert_eq!(inspector.inspect(&msg(&payload)), Outcome::Pass, "{what}");
    }
}

#[test]
fn text_rules_see_utf8_text_only_and_other_patterns_see_every_payload() {
    let inspector = defaults();
    // Non-ASCII text is still text.
    let out = inspector.inspect(&msg("é' OR '1'='1".as_bytes()));
    assert_eq!(out.blocked_by().map(Hit::rule), Some("sql_injection"));
    let out = inspector.inspect(&msg("<script>\u{fffd}".as_bytes()));
    assert_eq!(out.blocked_by().map(Hit::rule), Some("xss"));
    // The documented gap: one byte that is not UTF-8 takes the payload out of the text
    // rules' reach (a consumer that decodes it leniently is not protected).
    assert_eq!(inspector.inspect(&msg(b"<script>\xff")), Outcome::Pass);
    // A pattern runs on every payload; the same as a text pattern on UTF-8 only.
    let elf = elf_chunk();
    let inspector = Inspector::builder()
        .default_rules()
        .pattern("elf", r"\A\x7fELF", Action::Flag, Severity::Low)
        .text_pattern("elf_text", r"\A\x7fELF", Action::Flag, Severity::Low)
        .build()
        .unwrap();
    assert_eq!(inspector.pattern_count(), rules::DEFAULT_RULES.len() + 2);
    let out = inspector.inspect(&msg(&elf));
    let names: Vec<_> = out.flags().iter().map(Hit::rule).collect();
    assert_eq!(names, ["elf"]);
    let out = inspector.inspect(&msg(b"\x7fELF text"));
    let names: Vec<_> = out.flags().iter().map(Hit::rule).collect();
    assert_eq!(names, ["elf", "elf_text"]);
    // Only patterns that are not text patterns: no UTF-8 check, every payload.
    let inspector = Inspector::builder()
        .pattern("elf", r"\A\x7fELF", Action::Block, Severity::Low)
        .build()
        .unwrap();
    assert!(inspector.inspect(&msg(&elf)).blocked_by().is_some());
    assert!(inspector.inspect(&msg(b"\x7fELF")).blocked_by().is_some());
}

#[test]
fn text_rule_gaps_are_bounded_and_span_no_control_byte() {
    let inspector = defaults();
    // Valid UTF-8, but binary: a backtick "command" and a quoted "string" across
    // control bytes are not caught.
    for payload in [
        &b"\x01`ls\x00\x02\x03`\x04"[..],
        b"\x10' or '\x00\x00'='\x05",
        b"1 union/*\x00\x00*/select",
    ] {
        assert!(std::str::from_utf8(payload).is_ok());
        assert_eq!(
            inspector.inspect(&msg(payload)),
            Outcome::Pass,
            "{payload:?}"
        );
    }
    // Nor one longer than its bound; within it, a tab is fine.
    let long = format!("`ls {}`", "a".repeat(300));
    assert_eq!(inspector.inspect(&msg(long.as_bytes())), Outcome::Pass);
    for (within, over) in [
        // 256 bytes after "ls" in backticks, then 257.
        (
            format!("`ls {}`", "a".repeat(255)),
            format!("`ls {}`", "a".repeat(256)),
        ),
        // 64 bytes in the quotes, then 65; in the comment, the same.
        (
            format!("' or '{}'='", "a".repeat(64)),
            format!("' or '{}'='", "a".repeat(65)),
        ),
        (
            format!("' or \"{}\"='", "a".repeat(64)),
            format!("' or \"{}\"='", "a".repeat(65)),
        ),
        (
            format!("1 union/*{}*/select", "a".repeat(64)),
            format!("1 union/*{}*/select", "a".repeat(65)),
        ),
        (
            format!("1 union all/*{}*/select", "a".repeat(64)),
            format!("1 union all/*{}*/select", "a".repeat(65)),
        ),
    ] {
        let out = inspector.inspect(&msg(within.as_bytes()));
        assert!(out.blocked_by().is_some(), "{within:?}");
        assert_eq!(
            inspector.inspect(&msg(over.as_bytes())),
            Outcome::Pass,
            "{over:?}"
        );
    }
    for (payload, rule) in [
        ("`ls\t-la`", "command_injection"),
        ("' or 'a\tb'='a\tb", "sql_injection"),
        ("1 union/*\t*/select", "sql_injection"),
    ] {
        let out = inspector.inspect(&msg(payload.as_bytes()));
        assert_eq!(out.blocked_by().map(Hit::rule), Some(rule), "{payload:?}");
    }
}

#[test]
fn user_patterns_have_ascii_word_boundaries() {
    let inspector = Inspector::builder()
        .default_rules()
        .pattern("dump", r"(?i)\bcore dump\b", Action::Flag, Severity::Low)
        .pattern("word", r"\w+=\d", Action::Flag, Severity::Low)
        .pattern("accent", "(?i)café", Action::Flag, Severity::Low)
        .pattern("greek", r"(?u:\p{Greek})", Action::Flag, Severity::Low)
        .build()
        .unwrap();
    let flags = |payload: &[u8]| -> Vec<&str> {
        let out = inspector.inspect(&msg(payload));
        out.flags().iter().map(Hit::rule).collect()
    };
    assert_eq!(flags(b"kernel: CORE DUMP written"), ["dump"]);
    assert_eq!(flags("é core dump é".as_bytes()), ["dump"]);
    assert!(flags(b"hardcore dumps").is_empty());
    // ASCII: a non-ASCII letter is not a word character.
    assert_eq!(flags("écore dump".as_bytes()), ["dump"]);
    assert!(flags("é=1".as_bytes()).is_empty());
    assert_eq!(flags(b"x=1"), ["word"]);
    // A non-ASCII literal matches its UTF-8 bytes; `(?i)` folds ASCII only.
    assert_eq!(flags("CAFé".as_bytes()), ["accent"]);
    assert!(flags("CAFÉ".as_bytes()).is_empty());
    // `(?u)` turns Unicode classes back on where asked.
    assert_eq!(flags("λ".as_bytes()), ["greek"]);
}

/// `regex`'s lazy DFA over `patterns`, configured as `regex` configures it for a
/// `RegexSet` or `Regex` (`regex_automata::meta`): a 2 MiB cache, and it gives up (and
/// the search runs on the `PikeVM`) once the cache has been cleared 3 times and fewer than
/// 10 bytes were searched per state.
fn lazy_dfa(patterns: &[&str], unicode: bool) -> regex_automata::hybrid::dfa::DFA {
    use regex_automata::hybrid::dfa::DFA;
    use regex_automata::util::syntax;
    DFA::builder()
        .syntax(syntax::Config::new().unicode(unicode).utf8(false))
        .configure(
            DFA::config()
                .unicode_word_boundary(true)
                .starts_for_each_pattern(true)
                .cache_capacity(2 << 20)
                .minimum_cache_clear_count(Some(3))
                .minimum_bytes_per_state(Some(10)),
        )
        .build_many(patterns)
        .unwrap()
}

/// `len` bytes of `x`, with each trigger written every `period` bytes: gaps reopened at
/// co-prime intervals, each combination of their positions a new state of a lazy DFA
/// with bounded gaps.
fn reopened(len: usize, triggers: &[(&[u8], usize)]) -> Vec<u8> {
    let mut p = vec![b'x'; len];
    for &(t, period) in triggers {
        for at in (period / 2..len.saturating_sub(t.len())).step_by(period) {
            p[at..at + t.len()].copy_from_slice(t);
        }
    }
    p
}

/// Payloads that reopen the default rules' gaps (quoted strings, `/* */` comments,
/// backticks) at co-prime intervals, 256 KiB each, all of which pass.
fn gap_floods() -> Vec<Vec<u8>> {
    const LEN: usize = 256 * 1024;
    let over = |close: &[u8]| [&[b'x'; 300][..], close].concat();
    vec![
        reopened(
            LEN,
            &[
                (b"`id ", 263),
                (b"' or '", 61),
                (b" union /*", 59),
                (b"' and \"", 53),
            ],
        ),
        reopened(
            LEN,
            &[
                (b"`/", 263),
                (b"'or'", 61),
                (b" union/*", 59),
                (b"'or\"", 53),
            ],
        ),
        // Each rule's own gaps, then a gap over its bound that closes: the rule matches
        // with its gaps unbounded, and is checked over the whole payload.
        [
            reopened(LEN, &[(b"'or'", 67), (b"'or\"", 61)]),
            over(b"'=\"="),
        ]
        .concat(),
        [
            reopened(LEN, &[(b" union/*", 61), (b"*/all/*", 53)]),
            over(b"*/select"),
        ]
        .concat(),
        [reopened(LEN, &[(b"`/", 263)]), over(b"`")].concat(),
    ]
}

/// The default rules' gaps are bounded, and a lazy DFA with bounded gaps needs a state
/// per combination of positions in the gaps open at once: over a payload that reopens
/// them at co-prime intervals, one almost every byte, and `regex` falls back to the
/// `PikeVM` (100 to 140 ms over 256 KiB, against 0.47 ms for text). So the set holds
/// the rules with their gaps unbounded, and a rule with bounded gaps is checked on its
/// own: neither may ever fill the lazy DFA's cache.
#[test]
fn gaps_reopened_at_coprime_intervals_never_fill_the_lazy_dfas_cache() {
    use regex_automata::Input;
    let set: Vec<&str> = rules::DEFAULT_RULES
        .iter()
        .map(|r| r.pattern)
        .chain([NO_PREFILTER])
        .collect();
    let bounded: Vec<&str> = rules::DEFAULT_RULES
        .iter()
        .filter_map(|r| r.bounded)
        .collect();
    assert_eq!(bounded.len(), 3);
    let inspector = defaults();
    for payload in gap_floods() {
        let input = Input::new(&payload);
        for patterns in std::iter::once(&set[..]).chain(bounded.chunks(1)) {
            let dfa = lazy_dfa(patterns, UNICODE);
            let mut cache = dfa.create_cache();
            assert!(dfa.try_search_fwd(&mut cache, &input).is_ok());
            assert_eq!(cache.clear_count(), 0, "{patterns:?}");
        }
        assert_eq!(inspector.inspect(&msg(&payload)), Outcome::Pass);
    }
    // What the check guards against: the bounded gaps together in one set.
    let together: Vec<&str> = rules::DEFAULT_RULES
        .iter()
        .map(|r| r.bounded.unwrap_or(r.pattern))
        .collect();
    let dfa = lazy_dfa(&together, UNICODE);
    let flood = &gap_floods()[0];
    assert!(
        dfa.try_search_fwd(&mut dfa.create_cache(), &Input::new(flood))
            .is_err()
    );
}

use proptest::strategy::Strategy as _;

/// The default rules as they were: with their bounded gaps, in one set.
fn bounded_set() -> &'static RegexSet {
    static SET: std::sync::OnceLock<RegexSet> = std::sync::OnceLock::new();
    SET.get_or_init(|| {
        let rules = rules::DEFAULT_RULES.iter();
        RegexSetBuilder::new(rules.map(|r| r.bounded.unwrap_or(r.pattern)))
            .unicode(UNICODE)
            .build()
            .unwrap()
    })
}

fn shared_defaults() -> &'static Inspector {
    static INSPECTOR: std::sync::OnceLock<Inspector> = std::sync::OnceLock::new();
    INSPECTOR.get_or_init(defaults)
}

proptest::proptest! {
    /// The inspector's decision is the bounded rules' decision: the same rule blocks
    /// (the first in the set's order whose bounded form matches), or none.
    #[test]
    fn unbounded_gaps_in_the_set_change_no_decision(
        pieces in proptest::collection::vec(
            proptest::prop_oneof![
                // What opens and closes the gaps, and what else the rules look for.
                proptest::sample::select(&[
                    "' or '", "' and \"", "'||'", "'", "\"", "=", " like ", " union", "/*",
                    "*/", " all", "select", "`", "`ls ", "`/", "id", "|", ";", "\t", "\x01",
                    " ", "\n",
                ][..])
                .prop_map(str::to_owned),
                // Gaps around their bounds (64, 256) and within them.
                proptest::prop_oneof![0..8usize, 56..72usize, 250..262usize]
                    .prop_map(|n| "a".repeat(n)),
            ],
            0..16,
        ),
    ) {
        let payload = pieces.concat();
        let want = bounded_set()
            .matches(payload.as_bytes())
            .iter()
            .next()
            .map(|i| rules::DEFAULT_RULES[i].name);
        let out = shared_defaults().inspect(&msg(payload.as_bytes()));
        proptest::prop_assert_eq!(out.blocked_by().map(Hit::rule), want, "{:?}", payload);
    }
}

/// The patterns compiled as the inspector compiles them, run on `regex`'s lazy DFA: with
/// a Unicode word boundary it would give up at the first non-ASCII byte, and `regex`
/// would run the whole set on a slower engine.
#[test]
fn the_pattern_set_keeps_the_lazy_dfa_on_non_ascii_payloads() {
    use regex_automata::hybrid::dfa::DFA;
    use regex_automata::{Input, util::syntax};
    let patterns: Vec<&str> = rules::DEFAULT_RULES
        .iter()
        .map(|r| r.pattern)
        .chain([r"(?i)\bcore dump\b", r"\w+\s\d", NO_PREFILTER])
        .collect();
    // 256 KiB: 0x80, then "é" and "ü" over and over (UTF-8 from the second byte).
    let mut payload = vec![0x80];
    while payload.len() < 256 * 1024 {
        payload.extend("é ü ".as_bytes());
    }
    let search = |unicode: bool| {
        let dfa = DFA::builder()
            .syntax(syntax::Config::new().unicode(unicode).utf8(false))
            .configure(DFA::config().unicode_word_boundary(true))
            .build_many(&patterns)
            .unwrap();
        let mut cache = dfa.create_cache();
        dfa.try_search_fwd(&mut cache, &Input::new(&payload))
    };
    assert!(search(UNICODE).is_ok());
    // What the check guards against: in Unicode mode, the DFA gives up.
    assert!(search(true).is_err());
    // And the inspector itself matches over it.
    let inspector = Inspector::builder()
        .pattern("dump", r"(?i)\bcore dump\b", Action::Flag, Severity::Low)
        .build()
        .unwrap();
    assert_eq!(inspector.inspect(&msg(&payload)), Outcome::Pass);
    payload.extend(b" core dump");
    assert_eq!(inspector.inspect(&msg(&payload)).flags().len(), 1);
}
