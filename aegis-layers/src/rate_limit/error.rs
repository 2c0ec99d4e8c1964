//! The rate limiter's rejection.

use aegis_core::error::Reject;

/// Why the rate limiter refused a connection.
///
/// Each variant is one tier; [`label`](Self::label) is its metric label in
/// `aegis_rejections_total{layer="rate_limit", reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RateLimited {
    /// Over the global connection rate. The per-client tier, checked first, has
    /// counted the connection already (see the [module docs](super#tiers)).
    #[error("global connection rate exceeded")]
    Global,
    /// Over the client's connection rate.
    #[error("client connection rate exceeded")]
    PerClient,
    /// A client not tracked, refused by the per-client tier's shared **overflow
    /// bucket**: all `max_keys` slots were taken, so every new client shares one
    /// client's budget until idle clients are evicted (see the
    /// [module docs](super#bounded-state)). Others' connections may have drained it:
    /// this says nothing about the client's own rate.
    #[error(
        "client connection rate exceeded in the shared overflow bucket (too many clients tracked)"
    )]
    Overflow,
    /// The client already has its maximum of concurrent connections open.
    #[error("too many concurrent connections from this client")]
    Concurrency,
}

impl RateLimited {
    /// The layer name in metrics: `rate_limit`.
    pub const LAYER: &'static str = "rate_limit";

    /// The stable reason label: `global`, `per_client`, `overflow` or `concurrency`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Global => "global",
            Self::PerClient => "per_client",
            Self::Overflow => "overflow",
            Self::Concurrency => "concurrency",
        }
    }
}

impl Reject for RateLimited {
    fn layer(&self) -> &'static str {
        Self::LAYER
    }

    fn label(&self) -> &'static str {
        RateLimited::label(self)
    }
}
