//! What counts as a failure.

use std::error::Error;

use aegis_core::error::{Rejected, find};
use aegis_core::proxy::ProxyError;

/// What one completed call tells the breaker about the inner service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The service worked.
    Success,
    /// The service failed: counts towards tripping the breaker.
    Failure,
    /// Says nothing about the service's health (for example, a request the client
    /// got wrong, or a rejection by a layer below): not counted at all.
    Ignore,
}

/// Decides whether a completed call was a success or a failure of the inner service.
///
/// A call whose response future is dropped before it completes (the client went away)
/// is never classified: cancellation is never a failure.
///
/// Implementations should be cheap to clone (a unit struct, or an `Arc` inside): the
/// service clones its classifier into every response future.
pub trait Classify<Res>: Clone + Send + Sync + 'static {
    /// Classifies the result of one call. Errors are passed as the boxed error the
    /// breaker returns, so [`aegis_core::error::find`] can look through them.
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Outcome;
}

/// The default classifier: every `Ok` is a success, errors are failures except the
/// ones that say nothing about the inner service (see [`classify_error`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct DefaultClassifier;

impl<Res> Classify<Res> for DefaultClassifier {
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Ok(_) => Outcome::Success,
            Err(e) => classify_error(e),
        }
    }
}

/// Counts failed calls as [`DefaultClassifier`] does, and ignores successful ones: for a
/// call whose success proves little, its real outcome being reported later with
/// [`CircuitHandle::record_success`](super::CircuitHandle::record_success) and
/// [`record_failure`](super::CircuitHandle::record_failure).
///
/// The case it is made for: a breaker around the connector of an MQTT gateway. A stalled
/// broker (SIGSTOP, a hung process) still has its TCP handshakes completed by the
/// kernel, so every connect succeeds; with the default classifier those successes keep
/// resetting the consecutive-failure count between the CONNACK timeouts, and the circuit
/// never opens. With this one, only the CONNACK (a success) or its timeout (a failure)
/// count. A half-open probe whose connect succeeds returns its permit at once; the
/// circuit closes once enough CONNACKs are reported.
#[derive(Debug, Clone, Copy, Default)]
pub struct FailuresOnly;

impl<Res> Classify<Res> for FailuresOnly {
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Ok(_) => Outcome::Ignore,
            Err(e) => classify_error(e),
        }
    }
}

/// Counts `5xx` responses as failures, on top of the errors [`DefaultClassifier`]
/// counts. Any other status (including `4xx`, the client's fault) is a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl<B> Classify<http::Response<B>> for HttpClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Ok(res) if res.status().is_server_error() => Outcome::Failure,
            Ok(_) => Outcome::Success,
            Err(e) => classify_error(e),
        }
    }
}

/// How the built-in classifiers treat an error, looking through its `source()` chain
/// with [`aegis_core::error::find`] (which also sees the error an [`std::io::Error`]
/// wraps, as IO wrappers do to report a rejection from `poll_read`, and which
/// `io::Error::source()` would skip):
///
/// - an [`aegis_core::error::Rejected`] anywhere in the chain (a rate limit, another
///   breaker, an IO wrapper's refusal of a client) is ignored: it is a local policy
///   decision or the client's doing, not the backend's health. It wins over a
///   [`ProxyError`] that carries it, as in [`aegis_core::error::label_of`];
/// - otherwise an [`aegis_core::proxy::ProxyError`] is a failure when the upstream is at
///   fault (connect timeout, refusal, connect error, upstream IO) and ignored when the
///   client side failed ([`ProxyError::ClientIo`]);
/// - anything else, tokio's `Elapsed` timeout and IO errors included, is a failure.
pub fn classify_error(err: &(dyn Error + 'static)) -> Outcome {
    if find::<Rejected>(err).is_some() {
        return Outcome::Ignore;
    }
    match find::<ProxyError>(err) {
        Some(ProxyError::ClientIo(_)) => Outcome::Ignore,
        _ => Outcome::Failure,
    }
}
