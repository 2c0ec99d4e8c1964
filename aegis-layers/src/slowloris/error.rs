//! Error types.

use std::fmt;
use std::time::Duration;

use aegis_core::error::Reject;

/// The clock that cut a connection; its [`label`](Self::label) is the metric reason.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Clock {
    /// No byte arrived within the first-byte timeout (label `first_byte`).
    FirstByte,
    /// No byte arrived for the idle timeout, during the handshake or after it (label
    /// `idle`).
    Idle,
    /// The handshake did not complete within the total deadline (label `total`).
    Total,
    /// The client sent too few bytes for the time it took (label `min_rate`).
    MinRate,
}

impl Clock {
    /// The stable, low-cardinality label of this clock.
    pub const fn label(self) -> &'static str {
        match self {
            Self::FirstByte => "first_byte",
            Self::Idle => "idle",
            Self::Total => "total",
            Self::MinRate => "min_rate",
        }
    }
}

impl fmt::Display for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::FirstByte => "first-byte",
            Self::Idle => "idle",
            Self::Total => "handshake",
            Self::MinRate => "minimum-rate",
        })
    }
}

/// A connection was cut because one of its clocks ran out.
///
/// The layer returns it wrapped by [`aegis_core::error::reject`]; find it with
/// [`aegis_core::error::find`] or read its labels with [`aegis_core::error::label_of`]
/// (`("slowloris", clock.label())`).
#[derive(Debug, thiserror::Error)]
#[error("{clock} timeout after {open_for:?} ({received} bytes received)")]
pub struct Elapsed {
    clock: Clock,
    open_for: Duration,
    received: u64,
    after_handshake: bool,
}

impl Elapsed {
    pub(crate) const fn new(
        clock: Clock,
        open_for: Duration,
        received: u64,
        after_handshake: bool,
    ) -> Self {
        Self {
            clock,
            open_for,
            received,
            after_handshake,
        }
    }

    /// The clock that ran out.
    pub const fn clock(&self) -> Clock {
        self.clock
    }

    /// How long the connection had been open when it was cut.
    pub const fn elapsed(&self) -> Duration {
        self.open_for
    }

    /// How many bytes the client had sent.
    pub const fn received(&self) -> u64 {
        self.received
    }

    /// Whether the handshake had completed (only the idle clock runs after it).
    pub const fn after_handshake(&self) -> bool {
        self.after_handshake
    }
}

impl Reject for Elapsed {
    fn layer(&self) -> &'static str {
        super::LAYER
    }

    fn label(&self) -> &'static str {
        self.clock.label()
    }
}
