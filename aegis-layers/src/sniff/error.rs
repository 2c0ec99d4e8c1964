//! Errors of the sniffing layer.

use std::io;

use aegis_core::error::Reject;

use super::Protocol;

/// Why the sniffing layer refused a connection.
///
/// Returned wrapped in [`aegis_core::error::Rejected`] (counted in
/// `aegis_rejections_total{layer="sniff", reason}`); reach it with
/// [`aegis_core::error::find`]. The reason label is the detected protocol's label for
/// [`NotAllowed`](Self::NotAllowed), `eof` or `io` otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SniffError {
    /// The protocol was detected but is not allowed (filter) or has no route (router).
    #[error("protocol {0} is not served here")]
    NotAllowed(Protocol),
    /// The client closed the connection before the protocol was decided.
    #[error("connection closed after {0} bytes, before the protocol was known")]
    Eof(usize),
    /// Reading the first bytes failed.
    #[error("read failed while sniffing the protocol")]
    Io(#[source] io::Error),
}

impl SniffError {
    /// A stable, low-cardinality label: a [`Protocol::label`], `eof` or `io`.
    pub const fn label(&self) -> &'static str {
        match self {
            SniffError::NotAllowed(p) => p.label(),
            SniffError::Eof(_) => "eof",
            SniffError::Io(_) => "io",
        }
    }

    /// The detected protocol, for [`NotAllowed`](Self::NotAllowed).
    pub const fn protocol(&self) -> Option<Protocol> {
        match self {
            SniffError::NotAllowed(p) => Some(*p),
            _ => None,
        }
    }
}

impl Reject for SniffError {
    fn layer(&self) -> &'static str {
        super::LAYER
    }

    fn label(&self) -> &'static str {
        SniffError::label(self)
    }
}
