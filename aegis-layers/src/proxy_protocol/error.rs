//! Errors of the PROXY protocol layer.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use aegis_core::error::Reject;

/// Why the PROXY protocol layer refused a connection of a trusted peer (it refuses no
/// other: an untrusted peer is passed on unread).
///
/// Returned wrapped in [`aegis_core::error::Rejected`] (counted in
/// `aegis_rejections_total{layer="proxy_protocol", reason}`); reach it with
/// [`aegis_core::error::find`]. See the [module docs](super#rejections-and-metrics) for
/// the labels.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyProtocolError {
    /// A trusted peer sent no PROXY header, and the header is required.
    #[error("trusted peer {0} sent no PROXY header")]
    Missing(IpAddr),
    /// A trusted peer did not complete its header within the deadline.
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    /// The header is longer than the cap.
    #[error("PROXY header longer than {0} bytes")]
    TooLong(usize),
    /// The header is malformed.
    #[error("invalid PROXY header: {0}")]
    Invalid(&'static str),
    /// The connection closed before a complete header.
    #[error("connection closed after {0} bytes, before a complete PROXY header")]
    Eof(usize),
    /// Reading the header failed.
    #[error("read failed while reading the PROXY header")]
    Io(#[source] io::Error),
}

impl ProxyProtocolError {
    /// A stable, low-cardinality label: `missing`, `timeout`, `too_long`, `invalid`,
    /// `eof` or `io`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing",
            Self::Timeout(_) => "timeout",
            Self::TooLong(_) => "too_long",
            Self::Invalid(_) => "invalid",
            Self::Eof(_) => "eof",
            Self::Io(_) => "io",
        }
    }
}

impl Reject for ProxyProtocolError {
    fn layer(&self) -> &'static str {
        super::LAYER
    }

    fn label(&self) -> &'static str {
        ProxyProtocolError::label(self)
    }
}
