//! Which calls are latency samples.

use std::error::Error;

use aegis_core::error::{Rejected, find};

/// Whether a completed call is a latency sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Record its latency.
    Record,
    /// Leave it out (a rejection answers fast and would hide the backend's latency).
    Ignore,
}

/// Decides which completed calls are latency samples. Cancelled calls (a response
/// future dropped before it completes) are never samples.
///
/// Implementations should be cheap to clone: the service clones its classifier into
/// every response future.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// Classifies the result of one call.
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Sample;
}

/// Records every success and every error except rejections: an error whose `source()`
/// chain holds an [`aegis_core::error::Rejected`] (a rate limit, an open circuit
/// breaker, any Aegis layer below) is ignored.
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<Res> Classify<Res> for DefaultClassifier {
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Sample {
        match result {
            Err(e) if find::<Rejected>(e).is_some() => Sample::Ignore,
            _ => Sample::Record,
        }
    }
}
