//! Errors of the circuit breaker.

use aegis_core::error::Reject;

/// The circuit is open (or half-open with every probe permit taken): the call failed
/// fast without reaching the inner service.
///
/// Returned through [`aegis_core::error::reject`], so it is counted in
/// `aegis_rejections_total{layer="circuit_breaker", reason="open"}` and reached with
/// `aegis_core::error::find::<CircuitOpen>(&*err)`.
#[derive(Debug, thiserror::Error)]
#[error("circuit breaker `{name}` is open")]
pub struct CircuitOpen {
    name: &'static str,
}

impl CircuitOpen {
    pub(crate) const fn new(name: &'static str) -> Self {
        Self { name }
    }

    /// The name of the breaker, as given to
    /// [`CircuitBreakerLayer::builder`](super::CircuitBreakerLayer::builder).
    pub const fn name(&self) -> &'static str {
        self.name
    }
}

impl Reject for CircuitOpen {
    fn layer(&self) -> &'static str {
        "circuit_breaker"
    }

    fn label(&self) -> &'static str {
        "open"
    }
}
