//! The rejection of the security layer.

/// Why the [`SecurityLayer`](super::SecurityLayer) refused a connection.
///
/// Returned through [`aegis_core::error::reject`], so it is counted in
/// `aegis_rejections_total{layer="security", reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SecurityError {
    /// The client address is banned (by the handle, or by the detector, this connection
    /// included when it crossed a threshold). Nothing was read from the connection.
    #[error("client address is banned")]
    Banned,
    /// A ban of the connection's client address, client id or username closed it while
    /// it was open (see [`close_on_ban`](super::SecurityBuilder::close_on_ban)).
    #[error("closed by a ban of its client address, client id or username")]
    ClosedByBan,
    /// The client address is in a network of the deny list
    /// ([`deny`](super::SecurityBuilder::deny)). Nothing was read from the connection.
    #[error("client address is denied")]
    Denied,
}

impl aegis_core::error::Reject for SecurityError {
    fn layer(&self) -> &'static str {
        "security"
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Banned => "banned",
            Self::ClosedByBan => "closed_by_ban",
            Self::Denied => "denied",
        }
    }
}
