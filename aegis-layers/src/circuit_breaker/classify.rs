//! What counts as a failure.

use std::error::Error;

use aegis_core::error::{Rejected, chain, find};
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
/// count. A half-open probe whose connect succeeds returns its permit at once, so every
/// caller while half-open is let through to the stall until the first failure is
/// reported; the circuit closes once enough CONNACKs are reported. Where the call
/// returns a stream, [`CircuitBreakerLayer::judge_by_first_read`](super::CircuitBreakerLayer::judge_by_first_read)
/// holds the probe's permit until the server's first byte instead (the mqtt-gateway's
/// choice).
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
/// counts, except `501 Not Implemented` and `505 HTTP Version Not Supported`, which are
/// ignored: they answer the request's method or HTTP version (RFC 9110 §15.6.2 and
/// §15.6.6), which any client chooses, and say nothing of the service's health (a stock
/// server answers `501` to a method it does not know: counted, five such requests
/// opened the circuit for every client). Any other status (including `4xx`, the
/// client's fault) is a success.
#[derive(Debug, Clone, Copy, Default)]
pub struct HttpClassifier;

impl<B> Classify<http::Response<B>> for HttpClassifier {
    fn classify(&self, result: Result<&http::Response<B>, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Ok(res)
                if matches!(
                    res.status(),
                    http::StatusCode::NOT_IMPLEMENTED
                        | http::StatusCode::HTTP_VERSION_NOT_SUPPORTED
                ) =>
            {
                Outcome::Ignore
            }
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
///   client side failed ([`ProxyError::ClientIo`]) or this host was out of descriptors
///   or memory ([`ProxyError::LocalResources`]: counted, it would open the circuit for
///   every client while the upstream is fine, and keep it open after the flood that
///   used the descriptors up has gone);
/// - otherwise a [`hyper::Error`] anywhere in the chain for which
///   [`is_user`](hyper::Error::is_user) holds is ignored: the caller's own input failed,
///   not the backend. The case it is made for: hyper-util's client, behind a proxy,
///   sending a request whose body is the client's upload; a client that hangs up half
///   way fails the call with `User(Body)` (the body's error), and counted, five such
///   clients opened the circuit against a healthy backend for everyone;
/// - anything else, tokio's `Elapsed` timeout and IO errors included, is a failure.
pub fn classify_error(err: &(dyn Error + 'static)) -> Outcome {
    if find::<Rejected>(err).is_some() {
        return Outcome::Ignore;
    }
    if chain(err).any(|e| {
        e.downcast_ref::<hyper::Error>()
            .is_some_and(hyper::Error::is_user)
    }) {
        return Outcome::Ignore;
    }
    match find::<ProxyError>(err) {
        Some(ProxyError::ClientIo(_) | ProxyError::LocalResources { .. }) => Outcome::Ignore,
        _ => Outcome::Failure,
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use aegis_core::BoxError;

    use super::*;

    /// A connect that failed because the gateway had no descriptor (or memory) left.
    fn local_resources() -> ProxyError {
        ProxyError::LocalResources {
            addr: "127.0.0.1:1883".parse().unwrap(),
            source: io::Error::from_raw_os_error(24), // EMFILE
        }
    }

    #[test]
    fn running_out_of_local_resources_is_ignored_by_every_classifier() {
        let err = local_resources();
        assert_eq!(classify_error(&err), Outcome::Ignore);
        // As the breaker sees it: boxed, and inside an io::Error.
        let boxed: BoxError = Box::new(local_resources());
        assert_eq!(classify_error(&*boxed), Outcome::Ignore);
        assert_eq!(
            classify_error(&io::Error::other(local_resources())),
            Outcome::Ignore
        );
        assert_eq!(
            Classify::<()>::classify(&DefaultClassifier, Err(&err)),
            Outcome::Ignore
        );
        assert_eq!(
            Classify::<()>::classify(&FailuresOnly, Err(&err)),
            Outcome::Ignore
        );
        assert_eq!(
            Classify::<http::Response<()>>::classify(&HttpClassifier, Err(&err)),
            Outcome::Ignore
        );
        // Any other connect error is still the upstream's failure.
        let other = ProxyError::Connect {
            addr: "127.0.0.1:1883".parse().unwrap(),
            source: io::ErrorKind::HostUnreachable.into(),
        };
        assert_eq!(classify_error(&other), Outcome::Failure);
    }
}
