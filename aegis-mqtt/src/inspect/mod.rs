//! Payload inspection in the per-packet policy: rules over each PUBLISH and the will
//! message.
//!
//! The rules are heuristics over raw bytes, not a web application firewall, and the
//! topic rules see PUBLISH and will topics only, not SUBSCRIBE: see
//! [What inspection is not](#what-inspection-is-not).
//!
//! An [`Inspector`] holds the rules, built with [`Inspector::builder`]:
//!
//! | rule kind | builder | rule name | checks |
//! |---|---|---|---|
//! | patterns | [`pattern`](InspectorBuilder::pattern) | yours | regular expressions over the payload's bytes, compiled into a `regex::bytes::RegexSet` |
//! | text patterns | [`text_pattern`](InspectorBuilder::text_pattern), [`default_rules`](InspectorBuilder::default_rules) | yours; `sql_injection`, `command_injection`, `xss`, `path_traversal` | the same, on payloads that are valid UTF-8 only (see [Text and binary payloads](self#text-and-binary-payloads)) |
//! | size | [`max_payload`](InspectorBuilder::max_payload) | `max_payload` | payloads over a number of bytes |
//! | entropy | [`entropy`](InspectorBuilder::entropy) | `entropy` | Shannon entropy over a threshold, on payloads of at least `min_len` bytes |
//! | topics | [`topics`](InspectorBuilder::topics) | `topic_acl` | allow and deny topic filters per client ([`TopicRule`]), with `%c` / `%u` |
//!
//! Each rule has an [`Action`] (block, or flag and forward) and a
//! [`Severity`]. [`Inspector::inspect`] is the pure check, usable anywhere: it runs the
//! cheapest checks first (size, topics, then one pass of the pattern set, then entropy),
//! stops at the first blocking rule, and allocates nothing when no rule matches. The
//! patterns cost one pass of a lazy DFA over the payload however many there are (after
//! a UTF-8 check when there are text patterns); only when one matches does a second pass
//! name them (and check a default rule with bounded gaps on its own, see
//! [Limits](#limits)).
//!
//! Attach it to the layer's [`Policy`](crate::layer::Policy) with
//! [`PolicyBuilder::inspect`](crate::layer::PolicyBuilder::inspect): each PUBLISH that
//! passes the rate tiers (a flood is dropped before any payload is read), and the will
//! of each CONNECT, is then inspected.
//!
//! - A **blocked** PUBLISH never reaches the broker and gets the same answers as a
//!   rate-limited one: `QoS` 0 is dropped; `QoS` 1 and 2 are dropped without
//!   acknowledgement, or, for MQTT 5 with
//!   [`v5_publish_answer`](crate::layer::PolicyBuilder::v5_publish_answer), answered by
//!   the gateway with PUBACK (`QoS` 1) or PUBREC (`QoS` 2) carrying reason 0x87 "not
//!   authorized" for a topic rule, or 0x99 "payload format invalid" for a payload rule
//!   (patterns, size, entropy).
//! - A CONNECT whose **will** is blocked is refused as
//!   [`MqttError::PayloadBlocked`](crate::MqttError::PayloadBlocked): CONNACK
//!   `20 02 00 05` (3.x) or `20 03 00 87 00` (5.0), counted as
//!   `aegis_rejections_total{layer="mqtt", reason="payload_blocked"}`.
//! - A **flagged** message is forwarded.
//!
//! Each block and flag is counted by rule, reported as a security event (layer
//! `inspect`, with the rule's name and severity, the topic, the size and the `QoS`;
//! never the payload) and logged at debug level.
//!
//! With topic rules, MQTT 5 Topic Aliases are followed: the gateway records the alias
//! of each PUBLISH it forwards (at most 64 KiB per connection, each alias counted as its
//! topic plus 48 bytes), as the broker does. A PUBLISH whose alias the gateway has not recorded is blocked by `topic_acl`
//! (severity high): the gateway cannot tell where it goes.
//!
//! # What inspection is not
//!
//! The pattern rules are heuristics over the payload's raw bytes, not a web application
//! firewall. They decode nothing: a JSON escape (`{"v":"\u003cscript\u003e"}`),
//! percent-encoding (`%3Cscript%3E`, but for the path traversal forms the default set
//! names) or an HTML entity (`&lt;script&gt;`) hides an attack from them. They also miss
//! common injection forms that they do not know, such as `admin' OR 1-- -` or
//! `1 UNION(SELECT password FROM users)` (the default set's
//! [Not caught](#not-caught) list has more). A pass means "nothing obvious", not "safe":
//! the consumer must still validate and escape what it reads.
//!
//! The topic rules check the topic of each PUBLISH and of the will, and nothing else:
//!
//! - **Not SUBSCRIBE**: `deny("secret/#")` stops a client publishing to `secret/x`, not
//!   subscribing to `secret/#`, `$share/group/secret/#` or `#`. It does not stop
//!   reading: keep read access control in the broker.
//! - **Not the properties** of an MQTT 5 PUBLISH or will: a Response Topic or a user
//!   property that names `secret/x` passes.
//!
//! # Client ids are not identities
//!
//! A client chooses its client id, and nothing checks it: the static authenticator
//! (`auth::StaticAuth`) verifies usernames and passwords, not client ids, and an HTTP
//! authenticator ties them only if your service does. A topic rule keyed on the client id
//! ([`ClientMatch::ClientId`], or `%c` in a filter) is therefore beaten by a client that
//! names itself accordingly:
//!
//! - with `TopicRule::new(ClientMatch::client_id("ops-*")).allow("#")`, any client that
//!   connects as `ops-x` gets the ops allow list;
//! - with `allow("devices/%c/#")`, a client that connects with another device's id
//!   publishes to that device's topics.
//!
//! With authentication, key the rules on the username ([`ClientMatch::Username`], or
//! `%u`), which the authenticator verified. Without it, the username is as unverified as
//! the client id, and topic rules keep honest clients apart but stop no one. A `%c` or `%u`
//! at a filter's first level never matches a topic starting with `$`, so that a client
//! named `$SYS` gains nothing from `allow("%c/#")`.
//!
//! # Text and binary payloads
//!
//! The default rules, and patterns added with
//! [`text_pattern`](InspectorBuilder::text_pattern), are *text rules*: they look for SQL,
//! shell, HTML and path syntax, which matters to a consumer that reads the payload as
//! text (JSON, HTML, a shell command line, a file name). They run only on payloads that
//! are valid UTF-8. A payload that is not (firmware, images, compressed or encrypted data,
//! most protobuf and CBOR) gets only the rules that do not read text: size, entropy and
//! the patterns added with [`pattern`](InspectorBuilder::pattern). Run over arbitrary
//! bytes, the text rules would find a backtick-quoted "command" or a quote before `#`
//! in most binary payloads of a few KiB, and block them.
//!
//! What this leaves: a consumer that decodes invalid UTF-8 leniently as text (replacing
//! or dropping the bad bytes, as JavaScript's `TextDecoder` and Python's
//! `errors="replace"` do by default or on request) is **not protected**: `<script>`
//! followed by one `0xFF` byte passes the text rules. Make such consumers decode strictly,
//! or add a [`pattern`](InspectorBuilder::pattern) of your own for what must never pass
//! whatever the encoding. A binary payload that happens to be valid UTF-8 (a short
//! protobuf message of small numbers and ASCII strings, say) does get the text rules; the
//! default rules' gaps are bounded and do not span control bytes, so that such data
//! seldom looks like an attack.
//!
//! The inspector decides by the payload's bytes, not by an MQTT 5 Payload Format
//! Indicator: the indicator is not part of the [`Message`] it is given.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use aegis_core::Conn;
//! use aegis_mqtt::Config;
//! use aegis_mqtt::inspect::{Action, ClientMatch, Inspector, Message, Outcome, TopicRule};
//! use aegis_mqtt::layer::{MqttIo, MqttLayer, Policy};
//! use aegis_mqtt::security::Severity;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! let inspector = Inspector::builder()
//!     .default_rules()
//!     // Patterns are compiled without Unicode: this `\b` is an ASCII word boundary.
//!     .pattern("debug_dump", r"(?i)\bcore dump\b", Action::Flag, Severity::Low)
//!     .max_payload(64 * 1024, Action::Block, Severity::Medium)
//!     .entropy(7.5, 512, Action::Flag, Severity::Low)
//!     // `%c` is the client id the client chose: see "Client ids are not identities".
//!     .topics(TopicRule::new(ClientMatch::Any).allow("devices/%c/#"))
//!     .build()?;
//!
//! // The pure check.
//! let msg = |payload: &'static [u8]| Message {
//!     client_id: "d1",
//!     username: None,
//!     topic: "devices/d1/up",
//!     payload,
//! };
//! assert_eq!(inspector.inspect(&msg(br#"{"t":21.5}"#)), Outcome::Pass);
//! let out = inspector.inspect(&msg(b"x' OR '1'='1"));
//! assert_eq!(out.blocked_by().map(|h| h.rule()), Some("sql_injection"));
//! let out = inspector.inspect(&msg("Core dump written, λ=3".as_bytes()));
//! assert_eq!(out.flags().iter().map(|h| h.rule()).collect::<Vec<_>>(), ["debug_dump"]);
//!
//! // In front of a broker.
//! let layer = MqttLayer::new(Config::new()).policy(Policy::builder().inspect(inspector).build());
//! // The broker accepts the CONNECT (its CONNACK: the layer reads nothing the client
//! // sent after the CONNECT before it), then reads what the client sent.
//! let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
//!     io.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
//!     let mut seen = Vec::new();
//!     io.read_to_end(&mut seen).await?;
//!     Ok::<_, std::io::Error>(seen)
//! });
//! let (mut client, server) = tokio::io::duplex(1024);
//! let connect = [0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'd', b'1'];
//! // QoS 0 PUBLISH to "devices/d1/up": "<script>", then "ok".
//! let bad = [&[0x30, 0x17, 0, 13][..], b"devices/d1/up", b"<script>"].concat();
//! let good = [&[0x30, 0x11, 0, 13][..], b"devices/d1/up", b"ok"].concat();
//! client.write_all(&[&connect[..], &bad, &good].concat()).await?;
//! client.shutdown().await?;
//! let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! let seen = layer.layer(broker).oneshot(io).await?;
//! assert_eq!(seen, [&connect[..], &good].concat()); // the script never reached it
//! # Ok(())
//! # }
//! ```
//!
//! # Metrics
//!
//! | name | kind | labels | meaning |
//! |---|---|---|---|
//! | `aegis_mqtt_inspection_total` | counter | `rule`: the rule's name; `action`: `block`, `flag` | messages blocked or flagged, by the rule that decided (a flagged message counts once per rule) |
//! | `aegis_mqtt_dropped_total` | counter | `packet="publish"`, `reason="inspection"` | PUBLISH packets blocked |
//! | `aegis_mqtt_synthesized_total` | counter | `packet`: `puback`, `pubrec` | the gateway's answers to blocked MQTT 5 `QoS` 1 and 2 |
//! | `aegis_rejections_total` | counter | `layer="mqtt"`, `reason="payload_blocked"` | CONNECTs refused for their will |
//!
//! The `rule` label is a name from your configuration, never client input: the set of
//! rule names you configure bounds the label set, so keep it small (the default set adds
//! four; `max_payload`, `entropy` and `topic_acl` are one each).
//!
//! # Limits
//!
//! Compiled patterns are capped at [`DEFAULT_SIZE_LIMIT`] bytes (see
//! [`size_limit`](InspectorBuilder::size_limit)); a pattern over it is a build error, never
//! a slow check. Matching is linear in the payload (no backtracking), and the payload is
//! bounded by the layer's packet size ([`Config::max_packet_size`](crate::Config)).
//!
//! `benches/inspect.rs` measures 100-byte payloads (JSON telemetry, one in 20 an attack)
//! with the default rule set at 2.9 to 5.5 million messages per second on one core of
//! the shared development machine, and 1.3 to 2.0 million with a topic rule and an
//! entropy rule that runs on every payload as well.
//!
//! Linear is not enough: the lazy DFA is fast while it reuses its states. It builds one
//! for each set of pattern positions the payload leads it to, in a cache of 2 MiB, and
//! once that cache has been cleared 3 times at fewer than 10 bytes searched per state,
//! `regex` gives up on it and runs the search on its `PikeVM`, some 200 times slower; the
//! cache stays full, so the searches after it, of any payload, give up as well. A
//! bounded repetition of a broad class (`[^']{0,64}`) costs a state per position, and
//! several open at once multiply. The default rules' gaps are bounded (see
//! [Binary payloads](#binary-payloads)). With the bounded gaps in the set, a plain
//! ASCII payload that reopens them at co-prime intervals (`x` bytes with `` `id ``,
//! `' or '`, ` union /*` and `' and "` every 263, 61, 59 and 53 bytes) took 100 to
//! 140 ms for 256 KiB (6 to 10 ms for 16 KiB), against 0.47 ms (29 us) for text; and
//! on that cache, text then took 90 ms for 256 KiB (5.5 ms for 16 KiB), and 100-byte
//! messages 20 times as long, for as long as we measured (100,000 messages).
//!
//! So the set holds the default rules with their gaps unbounded (one state per gap),
//! and a rule with bounded gaps is checked on its own over a payload where it matched
//! with them unbounded: the decisions are those of the bounded rules, and the same
//! payload takes 1.5 ms for 256 KiB (99 us for 16 KiB) and fills 145 KiB of the cache,
//! never all of it (`cargo bench -p benches --bench inspect`, group
//! `inspect_large_payloads`). Keep the repetitions of your own patterns unbounded
//! (`[^']*`) or short (`\d{1,5}`), for the same reason.
#![doc = include_str!("rules.md")]

mod entropy;
mod rules;
mod topics;

use std::sync::Arc;

use regex::bytes::{Regex, RegexBuilder, RegexSet, RegexSetBuilder};

pub use self::topics::{ClientMatch, TopicRule};
pub use crate::security::Severity;

/// The default cap on the compiled size of the patterns, in bytes (of each pattern and
/// of the set): 4 MiB, several times what the default rule set needs.
pub const DEFAULT_SIZE_LIMIT: usize = 4 * 1024 * 1024;

/// What a rule does to a message it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Keep the message from the broker (`block` in configuration files).
    Block,
    /// Forward it, and count and report it (`flag`).
    Flag,
}

impl Action {
    /// The `action` label: `block` or `flag`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Flag => "flag",
        }
    }
}

/// Which kind of rule matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RuleKind {
    /// A pattern over the payload.
    Pattern,
    /// The payload size.
    MaxPayload,
    /// The payload's entropy.
    Entropy,
    /// The topic allow and deny filters.
    Topic,
}

impl RuleKind {
    /// Whether the rule judged the payload (every kind but [`Topic`](Self::Topic)).
    pub const fn is_payload(self) -> bool {
        !matches!(self, Self::Topic)
    }
}

/// One message to inspect: a PUBLISH or a will, and who sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    /// The sender's client id (empty when the broker names the client).
    pub client_id: &'a str,
    /// The username of the sender's CONNECT.
    pub username: Option<&'a str>,
    /// The topic (a PUBLISH's, with any Topic Alias resolved, or the will topic).
    pub topic: &'a str,
    /// The application payload.
    pub payload: &'a [u8],
}

/// A rule that matched a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit<'a> {
    name: &'a Arc<str>,
    kind: RuleKind,
    action: Action,
    severity: Severity,
}

impl<'a> Hit<'a> {
    /// The rule's name.
    pub fn rule(&self) -> &'a str {
        self.name
    }

    /// The rule's kind.
    pub const fn kind(&self) -> RuleKind {
        self.kind
    }

    /// The rule's action.
    pub const fn action(&self) -> Action {
        self.action
    }

    /// The rule's severity.
    pub const fn severity(&self) -> Severity {
        self.severity
    }

    /// The name as a shared string, for a metric label without a copy.
    pub(crate) fn shared_name(&self) -> Arc<str> {
        Arc::clone(self.name)
    }
}

/// What [`Inspector::inspect`] decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Outcome<'a> {
    /// No rule matched.
    #[default]
    Pass,
    /// Only flagging rules matched, each rule name once: forward the message.
    Flagged(Vec<Hit<'a>>),
    /// A blocking rule matched (the first one checked): keep the message from the broker.
    Blocked(Hit<'a>),
}

impl<'a> Outcome<'a> {
    /// The blocking rule, if any.
    pub fn blocked_by(&self) -> Option<&Hit<'a>> {
        match self {
            Self::Blocked(hit) => Some(hit),
            _ => None,
        }
    }

    /// The flagging rules that matched (none when blocked: the check stops there).
    pub fn flags(&self) -> &[Hit<'a>] {
        match self {
            Self::Flagged(hits) => hits,
            _ => &[],
        }
    }
}

/// A bad rule, refused by [`InspectorBuilder::build`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum InspectError {
    /// A pattern that does not compile (or is over the size limit).
    #[error("inspection rule {rule:?}: invalid pattern: {reason}")]
    Pattern {
        /// The rule's name.
        rule: String,
        /// What the regex compiler said.
        reason: String,
    },
    /// The patterns together are over the size limit.
    #[error("inspection patterns together: {reason}")]
    PatternSet {
        /// What the regex compiler said.
        reason: String,
    },
    /// A topic filter that is not a valid MQTT topic filter.
    #[error("inspection rule \"topic_acl\": invalid topic filter {filter:?}: {reason}")]
    TopicFilter {
        /// The filter.
        filter: String,
        /// The broken rule.
        reason: String,
    },
    /// An entropy threshold that is not a number of bits per byte above 0 and at most 8.
    #[error("inspection rule \"entropy\": threshold {0} is not in (0, 8] bits per byte")]
    Entropy(f64),
    /// A rule with an empty name.
    #[error("an inspection rule has an empty name")]
    EmptyName,
}

impl InspectError {
    /// A stable label: `pattern`, `pattern_set`, `topic_filter`, `entropy` or
    /// `empty_name`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Pattern { .. } => "pattern",
            Self::PatternSet { .. } => "pattern_set",
            Self::TopicFilter { .. } => "topic_filter",
            Self::Entropy(_) => "entropy",
            Self::EmptyName => "empty_name",
        }
    }

    /// The name of the rule at fault.
    pub fn rule(&self) -> &str {
        match self {
            Self::Pattern { rule, .. } => rule,
            Self::PatternSet { .. } | Self::EmptyName => "",
            Self::TopicFilter { .. } => TOPIC_ACL,
            Self::Entropy(_) => ENTROPY,
        }
    }
}

/// Whether patterns are compiled in Unicode mode: no (see [`InspectorBuilder::pattern`]).
/// A Unicode word boundary (`\b` in Unicode mode) anywhere in the set makes the lazy DFA
/// give up at the first non-ASCII byte of a payload, and the whole set then runs on a
/// much slower engine, inside the connection's poll.
const UNICODE: bool = false;

/// A pattern that never matches and has no literal prefix (see [`InspectorBuilder::build`]).
const NO_PREFILTER: &str = r"(?s-u:.)\A";

const MAX_PAYLOAD: &str = "max_payload";
const ENTROPY: &str = "entropy";
const TOPIC_ACL: &str = "topic_acl";

/// The rules, compiled. Cheap to clone: clones share them. See the
/// [module docs](self).
#[derive(Debug, Clone)]
pub struct Inspector {
    inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
struct Meta {
    name: Arc<str>,
    kind: RuleKind,
    action: Action,
    severity: Severity,
    /// For a default rule with bounded gaps: the rule, checked on its own where its
    /// pattern in the set (the same with the gaps unbounded) matched.
    bounded: Option<Regex>,
}

impl Meta {
    fn hit(&self) -> Hit<'_> {
        Hit {
            name: &self.name,
            kind: self.kind,
            action: self.action,
            severity: self.severity,
        }
    }
}

/// Compiled patterns, and the rule of each.
#[derive(Debug)]
struct Patterns {
    set: RegexSet,
    /// One per pattern of `set`, in its order.
    meta: Vec<Meta>,
}

#[derive(Debug)]
struct Inner {
    /// Every pattern: what a payload that is valid UTF-8 is checked against (every
    /// payload, when there is no text pattern).
    text: Option<Patterns>,
    /// The patterns that are not text patterns: what a payload that is not valid UTF-8
    /// is checked against, when there are text patterns.
    binary: Option<Patterns>,
    /// Whether there are text patterns, and so a payload needs a UTF-8 check.
    utf8_check: bool,
    max_payload: Option<(usize, Meta)>,
    entropy: Option<(f64, usize, Meta)>,
    topics: Vec<TopicRule>,
    topic_acl: Arc<str>,
    /// The hit of a PUBLISH whose topic alias the gateway could not resolve.
    unknown_alias: Meta,
}

/// A pattern as added to the builder.
#[derive(Debug, Clone)]
struct PatternSpec {
    name: String,
    regex: String,
    action: Action,
    severity: Severity,
    /// A text pattern: checked against payloads that are valid UTF-8 only.
    text: bool,
    /// The rule with its bounded gaps, when `regex` is it with them unbounded.
    bounded: Option<&'static str>,
}

/// Builds an [`Inspector`]; no rule until added. See the [module docs](self).
#[derive(Debug, Clone)]
#[must_use]
pub struct InspectorBuilder {
    patterns: Vec<PatternSpec>,
    max_payload: Option<(usize, Action, Severity)>,
    entropy: Option<(f64, usize, Action, Severity)>,
    topics: Vec<TopicRule>,
    size_limit: usize,
}

impl Inspector {
    /// A builder with no rules.
    pub fn builder() -> InspectorBuilder {
        InspectorBuilder {
            patterns: Vec::new(),
            max_payload: None,
            entropy: None,
            topics: Vec::new(),
            size_limit: DEFAULT_SIZE_LIMIT,
        }
    }

    /// Checks `msg` against the rules: size, topics, patterns, then entropy; the first
    /// blocking rule ends the check. Allocates nothing unless a rule matches.
    pub fn inspect<'s>(&'s self, msg: &Message<'_>) -> Outcome<'s> {
        let inner = &*self.inner;
        let mut flags = Vec::new();
        let mut hit = |h: Hit<'s>| -> Result<(), Hit<'s>> {
            match h.action {
                Action::Block => Err(h),
                Action::Flag => {
                    if !flags.iter().any(|f: &Hit<'_>| f.name == h.name) {
                        flags.push(h);
                    }
                    Ok(())
                }
            }
        };
        let checked = (|| {
            let payload = msg.payload;
            if let Some((max, meta)) = &inner.max_payload
                && payload.len() > *max
            {
                hit(meta.hit())?;
            }
            if !inner.topics.is_empty()
                && let Some((action, severity)) =
                    topics::check(&inner.topics, msg.client_id, msg.username, msg.topic)
            {
                hit(Hit {
                    name: &inner.topic_acl,
                    kind: RuleKind::Topic,
                    action,
                    severity,
                })?;
            }
            let patterns = if !inner.utf8_check || std::str::from_utf8(payload).is_ok() {
                &inner.text
            } else {
                &inner.binary
            };
            if let Some(Patterns { set, meta }) = patterns
                && set.is_match(payload)
            {
                // Name them: a second pass, only now; and a pass of each rule with
                // bounded gaps that matched with them unbounded.
                for i in &set.matches(payload) {
                    if let Some(meta) = meta.get(i)
                        && meta.bounded.as_ref().is_none_or(|r| r.is_match(payload))
                    {
                        hit(meta.hit())?;
                    }
                }
            }
            if let Some((threshold, min_len, meta)) = &inner.entropy {
                // `n` bytes score at most log2(n): short payloads need no histogram.
                if payload.len() >= *min_len
                    && entropy::ceiling(payload.len()) > *threshold
                    && entropy::shannon(payload) > *threshold
                {
                    hit(meta.hit())?;
                }
            }
            Ok(())
        })();
        match checked {
            Err(blocked) => Outcome::Blocked(blocked),
            Ok(()) if flags.is_empty() => Outcome::Pass,
            Ok(()) => Outcome::Flagged(flags),
        }
    }

    /// Whether the inspector has topic rules (which need a PUBLISH's real topic).
    pub fn has_topic_rules(&self) -> bool {
        !self.inner.topics.is_empty()
    }

    /// The number of patterns compiled into the set (the default set's included).
    pub fn pattern_count(&self) -> usize {
        self.inner.text.as_ref().map_or(0, |p| p.meta.len())
    }

    /// The `topic_acl` block of a PUBLISH whose topic alias is unknown.
    pub(crate) fn unknown_alias(&self) -> Hit<'_> {
        self.inner.unknown_alias.hit()
    }
}

impl InspectorBuilder {
    /// Adds a pattern named `name` over the bytes of every payload, text or binary.
    /// Several patterns may share a name.
    ///
    /// The syntax is the `regex` crate's, compiled with Unicode mode off, as if each
    /// pattern began with `(?-u)`: `\b`, `\w`, `\d` and `\s` are ASCII (a non-ASCII
    /// letter is not a word character, so `\bdump\b` matches in `édump`), `(?i)` folds
    /// ASCII case only, `.` matches any byte but `\n`, and a non-ASCII character in the
    /// pattern matches its UTF-8 bytes. Add `(?i)` for case-insensitive. `(?u)` turns
    /// Unicode mode back on for a group (`(?u:\p{Greek})`), but never write a Unicode
    /// word boundary (`(?u:\b)`): with one in any pattern, every payload with a
    /// non-ASCII byte runs through a much slower engine. Nor a bounded repetition of a
    /// broad class (`[^']{0,64}`): a payload can make several of them cost a state of
    /// the lazy DFA almost every byte, and the set then runs on that slower engine too
    /// (see [Limits](self#limits)).
    pub fn pattern(
        self,
        name: impl Into<String>,
        regex: impl Into<String>,
        action: Action,
        severity: Severity,
    ) -> Self {
        self.add(name.into(), regex.into(), action, severity, false, None)
    }

    /// Adds a text pattern, as the default rules are: like
    /// [`pattern`](Self::pattern), but checked only against payloads that are valid
    /// UTF-8 (see [Text and binary payloads](self#text-and-binary-payloads)).
    pub fn text_pattern(
        self,
        name: impl Into<String>,
        regex: impl Into<String>,
        action: Action,
        severity: Severity,
    ) -> Self {
        self.add(name.into(), regex.into(), action, severity, true, None)
    }

    fn add(
        mut self,
        name: String,
        regex: String,
        action: Action,
        severity: Severity,
        text: bool,
        bounded: Option<&'static str>,
    ) -> Self {
        self.patterns.push(PatternSpec {
            name,
            regex,
            action,
            severity,
            text,
            bounded,
        });
        self
    }

    /// Adds the default rule set, blocking (see the [rule table](self#the-default-rule-set)).
    pub fn default_rules(self) -> Self {
        self.default_rules_as(Action::Block)
    }

    /// Adds the default rule set with `action`: [`Action::Flag`] to watch what it would
    /// catch before blocking.
    pub fn default_rules_as(mut self, action: Action) -> Self {
        for r in rules::DEFAULT_RULES {
            let (name, regex) = (r.name.to_owned(), r.pattern.to_owned());
            self = self.add(name, regex, action, r.severity, true, r.bounded);
        }
        self
    }

    /// Matches payloads over `bytes` bytes (rule `max_payload`).
    pub fn max_payload(mut self, bytes: usize, action: Action, severity: Severity) -> Self {
        self.max_payload = Some((bytes, action, severity));
        self
    }

    /// Matches payloads of at least `min_len` bytes whose Shannon entropy is over
    /// `threshold_bits_per_byte` (rule `entropy`). Base64 text scores at most about 6
    /// and hex 4: a threshold near 8 catches random-looking raw bytes only (see
    /// [Entropy](self#entropy) for choosing `min_len`).
    pub fn entropy(
        mut self,
        threshold_bits_per_byte: f64,
        min_len: usize,
        action: Action,
        severity: Severity,
    ) -> Self {
        self.entropy = Some((threshold_bits_per_byte, min_len, action, severity));
        self
    }

    /// Adds topic allow and deny filters for some clients (rule `topic_acl`).
    pub fn topics(mut self, rule: TopicRule) -> Self {
        self.topics.push(rule);
        self
    }

    /// The cap on the compiled size of each pattern and of the set, in bytes (default
    /// [`DEFAULT_SIZE_LIMIT`]).
    pub fn size_limit(mut self, bytes: usize) -> Self {
        self.size_limit = bytes;
        self
    }

    /// Compiles the rules.
    ///
    /// # Errors
    ///
    /// [`InspectError`] naming the first bad rule: a pattern that does not compile or
    /// is over the size limit, a bad topic filter, an entropy threshold outside
    /// (0, 8], an empty rule name.
    pub fn build(self) -> Result<Inspector, InspectError> {
        let meta = |name: &str, kind, action, severity| Meta {
            name: Arc::from(name),
            kind,
            action,
            severity,
            bounded: None,
        };
        let mut patterns: Vec<(&PatternSpec, Meta)> = Vec::with_capacity(self.patterns.len());
        for p in &self.patterns {
            if p.name.is_empty() {
                return Err(InspectError::EmptyName);
            }
            // Compiled alone first, so that an error names its rule.
            let compile = |regex: &str| {
                RegexBuilder::new(regex)
                    .unicode(UNICODE)
                    .size_limit(self.size_limit)
                    .build()
                    .map_err(|e| InspectError::Pattern {
                        rule: p.name.clone(),
                        reason: e.to_string(),
                    })
            };
            compile(&p.regex)?;
            let bounded = p.bounded.map(compile).transpose()?;
            // Patterns sharing a name share one `Arc`.
            let shared = patterns
                .iter()
                .find(|(_, m)| *m.name == *p.name)
                .map(|(_, m)| Arc::clone(&m.name));
            let meta = Meta {
                name: shared.unwrap_or_else(|| Arc::from(p.name.as_str())),
                kind: RuleKind::Pattern,
                action: p.action,
                severity: p.severity,
                bounded,
            };
            patterns.push((p, meta));
        }
        let utf8_check = patterns.iter().any(|(p, _)| p.text);
        let text = Patterns::build(&patterns, self.size_limit)?;
        let binary = if utf8_check {
            let binary: Vec<_> = patterns.iter().filter(|(p, _)| !p.text).cloned().collect();
            Patterns::build(&binary, self.size_limit)?
        } else {
            None
        };
        if let Some((threshold, ..)) = self.entropy
            && !(threshold > 0.0 && threshold <= 8.0)
        {
            return Err(InspectError::Entropy(threshold));
        }
        for t in &self.topics {
            t.validate()?;
        }
        Ok(Inspector {
            inner: Arc::new(Inner {
                text,
                binary,
                utf8_check,
                max_payload: self
                    .max_payload
                    .map(|(n, a, s)| (n, meta(MAX_PAYLOAD, RuleKind::MaxPayload, a, s))),
                entropy: self
                    .entropy
                    .map(|(t, n, a, s)| (t, n, meta(ENTROPY, RuleKind::Entropy, a, s))),
                topics: self.topics,
                topic_acl: Arc::from(TOPIC_ACL),
                unknown_alias: meta(TOPIC_ACL, RuleKind::Topic, Action::Block, Severity::High),
            }),
        })
    }
}

impl Patterns {
    /// The set of `patterns`, if any.
    fn build(
        patterns: &[(&PatternSpec, Meta)],
        size_limit: usize,
    ) -> Result<Option<Self>, InspectError> {
        if patterns.is_empty() {
            return Ok(None);
        }
        // One more pattern, which never matches (a byte before the start), and whose
        // first byte can be any: the set then has no literal prefilter. On short payloads
        // the lazy DFA alone is about twice as fast as a prefilter that keeps stopping at
        // bytes as common as `"` and restarting the DFA.
        let regexes = patterns.iter().map(|(p, _)| p.regex.as_str());
        let set = RegexSetBuilder::new(regexes.chain([NO_PREFILTER]))
            .unicode(UNICODE)
            .size_limit(size_limit)
            .build()
            .map_err(|e| InspectError::PatternSet {
                reason: e.to_string(),
            })?;
        let meta = patterns.iter().map(|(_, m)| m.clone()).collect();
        Ok(Some(Self { set, meta }))
    }
}

/// The metric names of inspection (see the [module docs](self#metrics)).
pub mod metrics {
    use super::Hit;

    /// `aegis_mqtt_inspection_total{rule, action}`: messages blocked or flagged.
    pub const INSPECTION_TOTAL: &str = "aegis_mqtt_inspection_total";

    pub(crate) fn count(hit: &Hit<'_>) {
        metrics::counter!(
            INSPECTION_TOTAL,
            "rule" => hit.shared_name(),
            "action" => hit.action().label()
        )
        .increment(1);
    }
}

/// The fuzz entry point: builds the default inspector once and inspects `data` as a
/// payload, a topic and a client id.
#[doc(hidden)]
pub fn fuzz(data: &[u8]) {
    use std::sync::OnceLock;
    static INSPECTOR: OnceLock<Inspector> = OnceLock::new();
    let inspector = INSPECTOR.get_or_init(|| {
        Inspector::builder()
            .default_rules()
            .pattern("flag", "(?i)x{3,}", Action::Flag, Severity::Low)
            .max_payload(4096, Action::Flag, Severity::Low)
            .entropy(7.0, 64, Action::Flag, Severity::Low)
            .topics(
                TopicRule::new(ClientMatch::Any)
                    .allow("a/%c/#")
                    .allow("+/%u")
                    .deny("a/+/x"),
            )
            .build()
            .expect("the fuzz rules compile")
    });
    let text = String::from_utf8_lossy(data);
    let mut mid = text.len() / 2;
    while !text.is_char_boundary(mid) {
        mid -= 1;
    }
    let (topic, client_id) = text.split_at(mid);
    let msg = Message {
        client_id,
        username: Some(topic),
        topic,
        payload: data,
    };
    let out = inspector.inspect(&msg);
    if let Outcome::Blocked(hit) = &out {
        assert_eq!(hit.action(), Action::Block);
    }
    for hit in out.flags() {
        assert_eq!(hit.action(), Action::Flag);
    }
}

#[cfg(test)]
mod tests;
