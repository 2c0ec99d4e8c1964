//! Topic allow and deny filters per client, with `%c` / `%u` substitution.

use super::{Action, InspectError};
use crate::security::Severity;
use crate::topic::check_topic_filter;

/// Which clients a [`TopicRule`] applies to.
///
/// A value ending in `*` matches every value with that prefix (`"sensor-*"`); any other
/// value matches exactly.
///
/// **The client id is not verified**: a client chooses it, and no authenticator of this
/// crate but one you write ties it to a user. A [`ClientId`](Self::ClientId) rule gives
/// its allow list to any client that names itself accordingly. With authentication, key
/// rules on the [`Username`](Self::Username), which the authenticator verified (see the
/// [module docs](super#client-ids-are-not-identities)).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientMatch {
    /// Every client.
    Any,
    /// Clients whose client id matches (a trailing `*` for a prefix). An empty client id
    /// (which the broker names) matches only `"*"`. The client chooses its id: any
    /// client may claim to match.
    ClientId(String),
    /// Clients whose CONNECT carried a matching username (a trailing `*` for a prefix);
    /// a client without a username never matches. Verified only when an authenticator
    /// checks the CONNECT.
    Username(String),
}

impl ClientMatch {
    /// Clients whose client id matches `pattern` (a trailing `*` for a prefix).
    pub fn client_id(pattern: impl Into<String>) -> Self {
        Self::ClientId(pattern.into())
    }

    /// Clients whose username matches `pattern` (a trailing `*` for a prefix).
    pub fn username(pattern: impl Into<String>) -> Self {
        Self::Username(pattern.into())
    }

    fn matches(&self, client_id: &str, username: Option<&str>) -> bool {
        match self {
            Self::Any => true,
            Self::ClientId(p) => glob(p, client_id),
            Self::Username(p) => username.is_some_and(|u| glob(p, u)),
        }
    }
}

fn glob(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

/// Topic allow and deny filters for the clients a [`ClientMatch`] selects, checked
/// against each PUBLISH topic and the will topic (rule name `topic_acl`).
///
/// Filters are MQTT topic filters (`+` for one level, `#` for the rest); a level that is
/// exactly `%c` stands for the client id and `%u` for the username, as in mosquitto's
/// ACL patterns (an empty client id, or no username, matches nothing there). As in MQTT,
/// a filter starting with a wildcard does not match a topic starting with `$`: name
/// `$SYS/#` to deny it. Nor does a filter starting with `%c` or `%u`, so that a client
/// named `$SYS` gains nothing from `allow("%c/#")`.
///
/// `%c` is the client id the client chose: `allow("devices/%c/#")` keeps honest devices
/// apart, but a client that connects with another device's id publishes to that device's
/// topics. With authentication, use `%u`, the username the authenticator verified (see
/// the [module docs](super#client-ids-are-not-identities)).
///
/// Of all rules that apply to a client, a matching deny filter wins; otherwise, if any
/// of them has allow filters, one of those must match. The action and severity default
/// to [`Action::Block`] and [`Severity::Medium`]; where several rules are broken, the
/// strictest decides.
#[derive(Debug, Clone)]
#[must_use]
pub struct TopicRule {
    pub(super) client: ClientMatch,
    pub(super) allow: Vec<Box<str>>,
    pub(super) deny: Vec<Box<str>>,
    pub(super) action: Action,
    pub(super) severity: Severity,
}

impl TopicRule {
    /// A rule for the clients `client` selects, with no filters yet.
    pub fn new(client: ClientMatch) -> Self {
        Self {
            client,
            allow: Vec::new(),
            deny: Vec::new(),
            action: Action::Block,
            severity: Severity::Medium,
        }
    }

    /// Allows topics matching `filter`; once a rule has one allow filter, topics that
    /// match none are refused.
    pub fn allow(mut self, filter: impl Into<String>) -> Self {
        self.allow.push(filter.into().into_boxed_str());
        self
    }

    /// Refuses topics matching `filter`, whatever the allow filters say.
    pub fn deny(mut self, filter: impl Into<String>) -> Self {
        self.deny.push(filter.into().into_boxed_str());
        self
    }

    /// What happens to a message the rule refuses (default [`Action::Block`]).
    pub fn action(mut self, action: Action) -> Self {
        self.action = action;
        self
    }

    /// The severity of its events (default [`Severity::Medium`]).
    pub fn severity(mut self, severity: Severity) -> Self {
        self.severity = severity;
        self
    }

    pub(super) fn validate(&self) -> Result<(), InspectError> {
        for f in self.allow.iter().chain(&self.deny) {
            check_topic_filter(f, false).map_err(|e| InspectError::TopicFilter {
                filter: f.to_string(),
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// The strictest violation of the topic rules that apply to this client, if any.
pub(super) fn check(
    rules: &[TopicRule],
    client_id: &str,
    username: Option<&str>,
    topic: &str,
) -> Option<(Action, Severity)> {
    let is = |f: &str| filter_matches(f, topic, client_id, username);
    let mut worst: Option<(Action, Severity)> = None;
    let mut must_allow: Option<(Action, Severity)> = None;
    let mut allowed = false;
    for r in rules
        .iter()
        .filter(|r| r.client.matches(client_id, username))
    {
        if r.deny.iter().any(|f| is(f)) {
            worst = Some(stricter(worst, (r.action, r.severity)));
        }
        if !r.allow.is_empty() {
            must_allow = Some(stricter(must_allow, (r.action, r.severity)));
            allowed = allowed || r.allow.iter().any(|f| is(f));
        }
    }
    if !allowed && let Some(m) = must_allow {
        worst = Some(stricter(worst, m));
    }
    worst
}

fn stricter(a: Option<(Action, Severity)>, b: (Action, Severity)) -> (Action, Severity) {
    let rank = |(action, severity): (Action, Severity)| (action == Action::Block, severity);
    match a {
        Some(a) if rank(a) >= rank(b) => a,
        _ => b,
    }
}

/// Whether the topic filter `filter` matches the topic name `topic`, with `%c` and `%u`
/// levels standing for the client id and the username. No allocation.
pub(super) fn filter_matches(
    filter: &str,
    topic: &str,
    client_id: &str,
    username: Option<&str>,
) -> bool {
    // MQTT 4.7.2: wildcards at the first level do not match `$` topics. Nor does a
    // client id or username there: a client may name itself `$SYS`.
    if topic.starts_with('$')
        && (filter.starts_with(['+', '#']) || matches!(filter.split('/').next(), Some("%c" | "%u")))
    {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) | (None, None) => return true,
            (Some("+"), Some(_)) => {}
            (Some("%c"), Some(level)) => {
                if client_id.is_empty() || level != client_id {
                    return false;
                }
            }
            (Some("%u"), Some(level)) => {
                if username.is_none_or(|u| u.is_empty() || level != u) {
                    return false;
                }
            }
            (Some(a), Some(b)) => {
                if a != b {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_in_mqtt() {
        let m = |f, t| filter_matches(f, t, "dev1", Some("alice"));
        assert!(m("a/b", "a/b"));
        assert!(!m("a/b", "a/b/c"));
        assert!(!m("a/b/c", "a/b"));
        assert!(m("a/+", "a/b"));
        assert!(m("a/+", "a/"));
        assert!(!m("a/+", "a/b/c"));
        assert!(m("a/#", "a"));
        assert!(m("a/#", "a/b/c"));
        assert!(m("#", "x/y"));
        assert!(!m("#", "$SYS/x"));
        assert!(!m("+/x", "$SYS/x"));
        assert!(m("$SYS/#", "$SYS/x"));
        assert!(m("dev/%c/up", "dev/dev1/up"));
        assert!(!m("dev/%c/up", "dev/dev2/up"));
        assert!(m("u/%u/#", "u/alice/x"));
        assert!(!m("u/%u/#", "u/bob/x"));
        // No username: `%u` matches nothing; an empty client id neither.
        assert!(!filter_matches("u/%u", "u/", "dev1", None));
        assert!(!filter_matches("d/%c", "d/", "", None));
        // A client id with a '/' never fills one level.
        assert!(!filter_matches("d/%c", "d/a/b", "a/b", None));
    }

    #[test]
    fn a_client_named_like_a_dollar_topic_does_not_reach_it() {
        // A substituted first level never matches a `$` topic...
        assert!(!filter_matches("%c/#", "$SYS/x", "$SYS", None));
        assert!(!filter_matches("%c", "$SYS", "$SYS", None));
        assert!(!filter_matches("%u/+", "$SYS/x", "c", Some("$SYS")));
        // ...but does match the client's own ordinary topics, and a `$` level further in
        // is an ordinary level.
        assert!(filter_matches("%c/#", "dev1/x", "dev1", None));
        assert!(filter_matches("%u/+", "alice/x", "c", Some("alice")));
        assert!(filter_matches("d/%c", "d/$x", "$x", None));
        let rules = [TopicRule::new(ClientMatch::Any).allow("%c/#").allow("%u/#")];
        assert_eq!(
            check(&rules, "$SYS", Some("$SYS"), "$SYS/broker/load"),
            Some((Action::Block, Severity::Medium))
        );
        assert_eq!(check(&rules, "dev1", None, "dev1/up"), None);
    }

    #[test]
    fn deny_wins_and_allow_lists_combine() {
        let rules = [
            TopicRule::new(ClientMatch::Any)
                .allow("sensors/%c/#")
                .deny("sensors/%c/secret"),
            TopicRule::new(ClientMatch::client_id("admin*"))
                .allow("#")
                .action(Action::Flag),
        ];
        let c = |id, t| check(&rules, id, None, t);
        assert_eq!(c("d1", "sensors/d1/temp"), None);
        assert_eq!(
            c("d1", "sensors/d1/secret"),
            Some((Action::Block, Severity::Medium))
        );
        assert_eq!(
            c("d1", "sensors/d2/temp"),
            Some((Action::Block, Severity::Medium))
        );
        // Admins' own allow list lets them through; the deny still applies to them.
        assert_eq!(c("admin-1", "cmd/reboot"), None);
        assert_eq!(
            c("admin-1", "sensors/admin-1/secret"),
            Some((Action::Block, Severity::Medium))
        );
        let user = [TopicRule::new(ClientMatch::username("ops")).deny("#")];
        assert!(check(&user, "x", Some("ops"), "a").is_some());
        assert!(check(&user, "x", Some("ops2"), "a").is_none());
        assert!(check(&user, "x", None, "a").is_none());
    }

    #[test]
    fn bad_filters_are_refused() {
        let bad = TopicRule::new(ClientMatch::Any).allow("a/#/b");
        assert!(matches!(
            bad.validate(),
            Err(InspectError::TopicFilter { .. })
        ));
        assert!(
            TopicRule::new(ClientMatch::Any)
                .deny("")
                .validate()
                .is_err()
        );
        assert!(
            TopicRule::new(ClientMatch::Any)
                .allow("a/%c/+/#")
                .validate()
                .is_ok()
        );
    }
}
