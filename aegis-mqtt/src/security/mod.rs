//! Security events, anomaly detection and bans. (SKELETON: the crate-internal API below
//! is fixed; the implementation is being written.)

use std::sync::Arc;

use crate::{Connect, MqttError};

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventKind {
    /// A connection refused by a layer.
    Rejection,
    /// A message blocked by an inspection rule.
    Block,
    /// A message flagged (and forwarded) by an inspection rule.
    Flag,
    /// A ban was put in place.
    Ban,
    /// An authenticator denied a CONNECT, or could not decide.
    AuthFailure,
}

/// How bad it is.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Default,
    serde::Serialize,
    serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Worth a look.
    Low,
    /// Likely abuse.
    #[default]
    Medium,
    /// Abuse.
    High,
    /// An attack.
    Critical,
}

/// A security event reported from inside a connection; the connection's client address
/// and ids are added by [`report`].
#[derive(Debug)]
pub(crate) struct Report<'a> {
    pub(crate) layer: &'static str,
    pub(crate) kind: EventKind,
    pub(crate) severity: Severity,
    /// The rule that decided (an inspection rule's name, a rejection's reason).
    pub(crate) rule: Option<&'a str>,
    pub(crate) details: String,
}

/// Emits `report` for the current connection through the `Security` of the
/// `SecurityLayer` it runs under (a no-op outside one): a `tracing` event, the bounded
/// log, and, for auth failures, blocks and rejections, the anomaly detector.
pub(crate) fn report(report: Report<'_>) {
    let _ = report;
}

/// Marks the current connection's end as reported (the `SecurityLayer` does not report
/// its rejection again).
pub(crate) fn mark_reported() {}

/// Called by the MQTT layer with each accepted CONNECT: records the client id and
/// username for the connection's later events, counts the CONNECT toward the detector,
/// and refuses a banned client address, client id or username ([`MqttError::Banned`]).
pub(crate) fn on_connect(connect: &Connect<'_>) -> Result<(), MqttError> {
    let _ = connect;
    Ok(())
}

#[allow(dead_code)]
fn _unused(_: Arc<str>) {}
