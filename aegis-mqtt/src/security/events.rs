//! Security events: their JSON form, the bounded log and the `tracing` event.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use serde::ser::{Serialize, SerializeStruct, Serializer};
use tokio::time::Instant;

use super::{EventKind, Severity, metrics};

/// The longest `details`, in bytes; longer ones are cut at a character boundary.
pub(super) const MAX_DETAILS: usize = 256;

/// The longest client id, username or rule name kept in an event or a ban key, in bytes;
/// longer ones are cut at a character boundary (MQTT allows 65,535 bytes).
pub(super) const MAX_NAME: usize = 256;

/// One security event. See the [module docs](super#events) for its JSON schema.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Event {
    /// Its number: 1 for the first event of a [`Security`](super::Security), then one
    /// more for each (never reused, even once the event left the log).
    pub seq: u64,
    /// When it happened (wall clock).
    pub time: SystemTime,
    /// The layer that reported it (`"security"`, `"mqtt"`, `"auth"`, `"inspect"`, ...).
    pub layer: &'static str,
    /// What happened.
    pub kind: EventKind,
    /// How bad it is.
    pub severity: Severity,
    /// The connection's effective client address, when the event belongs to one.
    pub client_addr: Option<SocketAddr>,
    /// The client id of the connection's CONNECT, once it was read.
    pub client_id: Option<Arc<str>>,
    /// The username of the connection's CONNECT, if it had one.
    pub username: Option<Arc<str>>,
    /// The rule that decided: a rejection's reason label, an inspection rule's name, the
    /// cause of a ban (`connects`, `auth_failures`, `rejections`, `manual`).
    pub rule: Option<Arc<str>>,
    /// A human-readable description, at most 256 bytes, without control characters.
    pub details: String,
}

impl Event {
    /// A new event (`seq` and `time` are set when it is emitted).
    pub(super) fn new(
        layer: &'static str,
        kind: EventKind,
        severity: Severity,
        rule: Option<&str>,
        details: String,
    ) -> Self {
        Self {
            seq: 0,
            time: SystemTime::UNIX_EPOCH,
            layer,
            kind,
            severity,
            client_addr: None,
            client_id: None,
            username: None,
            rule: rule.map(|r| Arc::from(bounded(r, MAX_NAME))),
            details: clean_details(details),
        }
    }
}

/// The last instant RFC 3339 writes: 9999-12-31T23:59:59.999Z.
const LAST_WRITABLE: Duration = Duration::from_millis(253_402_300_799_999);

/// `t` in RFC 3339 with milliseconds, clamped to what it can write (1970 to 9999): a
/// clock set far off must not make a listing panic.
pub(super) fn rfc3339(t: SystemTime) -> String {
    let since_epoch = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .min(LAST_WRITABLE);
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + since_epoch).to_string()
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Event", 10)?;
        st.serialize_field("seq", &self.seq)?;
        st.serialize_field("time", &rfc3339(self.time))?;
        st.serialize_field("layer", self.layer)?;
        st.serialize_field("kind", &self.kind)?;
        st.serialize_field("severity", &self.severity)?;
        st.serialize_field("client_addr", &self.client_addr.map(|a| a.to_string()))?;
        st.serialize_field("client_id", &self.client_id)?;
        st.serialize_field("username", &self.username)?;
        st.serialize_field("rule", &self.rule)?;
        st.serialize_field("details", &self.details)?;
        st.end()
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
pub(super) fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `details` without control characters (escaped as `\n`, `\u{1b}`, ...), cut to
/// [`MAX_DETAILS`] bytes.
fn clean_details(details: String) -> String {
    let mut out = if details.chars().any(char::is_control) {
        let mut out = String::with_capacity(details.len().min(MAX_DETAILS) + 8);
        for c in details.chars() {
            if out.len() >= MAX_DETAILS {
                break;
            }
            if c.is_control() {
                let _ = write!(out, "{}", c.escape_default());
            } else {
                out.push(c);
            }
        }
        out
    } else {
        details
    };
    let len = bounded(&out, MAX_DETAILS).len();
    out.truncate(len);
    out
}

/// The bounded ring of the latest events.
#[derive(Debug)]
pub(super) struct EventLog {
    capacity: usize,
    inner: Mutex<Ring>,
}

#[derive(Debug)]
struct Ring {
    events: VecDeque<Event>,
    total: u64,
    /// The events of each kind in the current second, see [`EVENTS_PER_SECOND`].
    rates: HashMap<RateKey, Rate>,
}

/// The most events of one kind (the same layer, kind and rule) recorded and logged in a
/// second: the rest are counted (`aegis_security_events_total` and
/// `aegis_security_events_suppressed_total`) and summed up in the next one recorded. A
/// flood (an attacker's, or every device reconnecting at once while the broker is down)
/// would otherwise write a log line per connection and push every other event out of
/// the log.
pub const EVENTS_PER_SECOND: u32 = 20;

/// The most kinds of events rated apart; beyond, the others share one rate. Kinds come
/// from a fixed set of layers, kinds, reasons and configured rule names.
const MAX_RATED_KINDS: usize = 1024;

/// What makes two events of one kind for [`EVENTS_PER_SECOND`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum RateKey {
    Kind(&'static str, EventKind, Option<Arc<str>>),
    /// Every kind beyond [`MAX_RATED_KINDS`].
    Other,
}

#[derive(Debug)]
struct Rate {
    /// The start of the current second.
    since: Instant,
    /// Events recorded since.
    recorded: u32,
    /// Events not recorded since the last one that was.
    suppressed: u64,
}

impl EventLog {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Ring {
                // Grows as events come, up to `capacity`.
                events: VecDeque::new(),
                total: 0,
                rates: HashMap::new(),
            }),
        }
    }

    /// Counts `event`; unless [`EVENTS_PER_SECOND`] of its kind were recorded this second,
    /// numbers, timestamps, keeps (dropping the oldest) and traces it.
    pub(super) fn emit(&self, mut event: Event) {
        metrics::event(&event);
        event.time = SystemTime::now();
        {
            let mut ring = self.inner.lock();
            let Some(suppressed) = ring.rate(&event, Instant::now()) else {
                metrics::suppressed();
                return;
            };
            if suppressed > 0 {
                let note = format!(" ({suppressed} more like it not recorded since the last)");
                event.details = clean_details(event.details + &note);
            }
            ring.total += 1;
            event.seq = ring.total;
            if self.capacity > 0 {
                if ring.events.len() >= self.capacity {
                    ring.events.pop_front();
                }
                ring.events.push_back(event.clone());
            }
        }
        trace(&event);
    }

    /// The latest `limit` events, oldest first.
    pub(super) fn latest(&self, limit: usize) -> Vec<Event> {
        let ring = self.inner.lock();
        let skip = ring.events.len().saturating_sub(limit);
        ring.events.iter().skip(skip).cloned().collect()
    }

    /// How many events were ever recorded.
    pub(super) fn total(&self) -> u64 {
        self.inner.lock().total
    }
}

impl Ring {
    /// Whether `event` is recorded at `now`: `Some` with the number of its kind not
    /// recorded since the last one that was, `None` if it is over its kind's rate.
    fn rate(&mut self, event: &Event, now: Instant) -> Option<u64> {
        let mut key = RateKey::Kind(event.layer, event.kind, event.rule.clone());
        if !self.rates.contains_key(&key) && self.rates.len() >= MAX_RATED_KINDS {
            // Kinds quiet for a second start over anyway: let them go first.
            self.rates
                .retain(|_, r| now.saturating_duration_since(r.since) < Duration::from_secs(1));
            if self.rates.len() >= MAX_RATED_KINDS {
                key = RateKey::Other;
            }
        }
        let rate = self.rates.entry(key).or_insert(Rate {
            since: now,
            recorded: 0,
            suppressed: 0,
        });
        if now.saturating_duration_since(rate.since) >= Duration::from_secs(1) {
            rate.since = now;
            rate.recorded = 0;
        }
        if rate.recorded >= EVENTS_PER_SECOND {
            rate.suppressed += 1;
            return None;
        }
        rate.recorded += 1;
        Some(std::mem::take(&mut rate.suppressed))
    }
}

/// The `tracing` event of a security event: target `aegis::security`.
macro_rules! trace_at {
    ($level:expr, $e:expr) => {
        tracing::event!(
            target: "aegis::security",
            $level,
            seq = $e.seq,
            kind = $e.kind.as_str(),
            layer = $e.layer,
            severity = $e.severity.as_str(),
            client_addr = $e.client_addr.map(tracing::field::display),
            client_id = $e.client_id.as_deref().map(tracing::field::debug),
            username = $e.username.as_deref().map(tracing::field::debug),
            rule = $e.rule.as_deref(),
            details = $e.details.as_str(),
            "security event"
        )
    };
}

fn trace(e: &Event) {
    match e.severity {
        Severity::Low | Severity::Medium => trace_at!(tracing::Level::INFO, e),
        Severity::High | Severity::Critical => trace_at!(tracing::Level::WARN, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_out_of_rfc3339s_range_are_written_clamped_not_a_panic() {
        let epoch = SystemTime::UNIX_EPOCH;
        assert_eq!(
            rfc3339(epoch - Duration::from_secs(1)),
            "1970-01-01T00:00:00.000Z"
        );
        let far = epoch + Duration::from_secs(400_000 * 365 * 86_400);
        assert_eq!(rfc3339(far), "9999-12-31T23:59:59.999Z");
        assert_eq!(
            rfc3339(epoch + Duration::from_millis(1_500)),
            "1970-01-01T00:00:01.500Z"
        );
    }

    #[test]
    fn details_are_bounded_at_a_char_boundary_and_escaped() {
        let long = "é".repeat(200); // 400 bytes
        let d = clean_details(long);
        assert!(d.len() <= MAX_DETAILS);
        assert_eq!(d.len(), 256);
        let d = clean_details("a\nb\u{1b}[31m".into());
        assert_eq!(d, "a\\nb\\u{1b}[31m");
        let d = clean_details("\n".repeat(1000));
        assert!(d.len() <= MAX_DETAILS, "{}", d.len());
        assert_eq!(bounded("ab€", 3), "ab");
    }

    fn event(kind: EventKind, rule: &str, details: &str) -> Event {
        Event::new("mqtt", kind, Severity::Medium, Some(rule), details.into())
    }

    /// A flood of one kind of event keeps [`EVENTS_PER_SECOND`] a second of it in the
    /// log, counts all, and leaves other kinds alone.
    #[test]
    fn a_flood_of_one_kind_is_recorded_at_its_rate_and_summed_up() {
        let ((), snap) = aegis_core::metrics::testing::run(true, || async {
            let log = EventLog::new(1024);
            let mut seen = vec![(EventKind::Ban, "manual", "a ban before")];
            log.emit(event(EventKind::Ban, "manual", "a ban before"));
            for _ in 0..1000 {
                log.emit(event(EventKind::Rejection, "malformed", "flood"));
            }
            log.emit(event(EventKind::Rejection, "slowloris", "another kind"));
            seen.extend(
                (0..EVENTS_PER_SECOND).map(|_| (EventKind::Rejection, "malformed", "flood")),
            );
            seen.push((EventKind::Rejection, "slowloris", "another kind"));
            let got: Vec<_> = log.latest(2000);
            let kinds: Vec<_> = got
                .iter()
                .map(|e| (e.kind, e.rule.as_deref().unwrap(), e.details.as_str()))
                .collect();
            assert_eq!(kinds, seen);
            assert_eq!(log.total(), u64::from(EVENTS_PER_SECOND) + 2);
            // A second later the kind is recorded again, with what was left out.
            tokio::time::advance(Duration::from_secs(1)).await;
            log.emit(event(EventKind::Rejection, "malformed", "flood"));
            let last = log.latest(1).pop().unwrap();
            assert_eq!(
                last.details,
                "flood (980 more like it not recorded since the last)"
            );
        });
        let c = aegis_core::metrics::testing::capture(&snap);
        assert_eq!(c.counter(super::metrics::EVENTS_TOTAL, &[]), 1003);
        assert_eq!(c.counter(super::metrics::EVENTS_SUPPRESSED_TOTAL, &[]), 980);
    }

    /// Kinds beyond [`MAX_RATED_KINDS`] share one rate: the table stays bounded.
    #[tokio::test(start_paused = true)]
    async fn the_rates_are_bounded() {
        let log = EventLog::new(16);
        for i in 0..(MAX_RATED_KINDS + 100) {
            log.emit(event(EventKind::Flag, &format!("rule{i}"), ""));
        }
        assert_eq!(log.inner.lock().rates.len(), MAX_RATED_KINDS + 1);
        assert_eq!(
            log.total(),
            MAX_RATED_KINDS as u64 + u64::from(EVENTS_PER_SECOND)
        );
    }

    #[test]
    fn the_log_keeps_the_latest_capacity_events_oldest_first() {
        let log = EventLog::new(2);
        for i in 0..3 {
            log.emit(Event::new(
                "security",
                EventKind::Flag,
                Severity::Low,
                None,
                format!("{i}"),
            ));
        }
        let seqs: Vec<u64> = log.latest(10).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert_eq!(log.latest(1)[0].details, "2");
        assert_eq!(log.total(), 3);
        let none = EventLog::new(0);
        none.emit(Event::new(
            "security",
            EventKind::Flag,
            Severity::Low,
            None,
            String::new(),
        ));
        assert!(none.latest(10).is_empty());
        assert_eq!(none.total(), 1);
    }
}
