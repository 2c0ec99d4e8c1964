//! Which calls are latency samples.

use std::error::Error;
use std::io;

use aegis_core::error::{Rejected, chain, find};
use aegis_core::proxy::ProxyError;

/// Whether a completed call is a latency sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sample {
    /// Record its latency.
    Record,
    /// Leave it out (a rejection answers fast and would hide the backend's latency).
    Ignore,
}

/// Decides which completed calls are latency samples. A cancelled call (a response
/// future dropped before it completes) has no result and is not classified: it is a
/// sample only when dropped late (see [Cancelled calls](super#cancelled-calls)).
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

/// Records successes and timeouts only: the classifier for a layer around an upstream
/// connector or a backend call.
///
/// A refused or reset connect ends in well under a millisecond: recorded, such samples
/// would pull the P95 down, and the rate up, while the upstream fails (the circuit
/// breaker counts those). A timeout is recorded, its length standing for a stalled
/// upstream's longer true latency. Timeouts are an error whose chain (as
/// [`aegis_core::error::find`] walks it, into an [`io::Error`]'s wrapped error) holds a
/// [`ProxyError::ConnectTimeout`], a `tokio::time::error::Elapsed`, a
/// `tower::timeout::error::Elapsed` (what `tower::ServiceBuilder::timeout` and
/// `tower::timeout::Timeout` fail with) or an [`io::Error`] of kind
/// [`TimedOut`](io::ErrorKind::TimedOut); rejections ([`Rejected`]) are never samples.
/// Put the timeout **below** this layer (between it and the backend), so that a timed
/// out call completes through it with its error; a timeout above the layer drops the
/// call's future before it completes, which counts only when late (see
/// [Cancelled calls](super#cancelled-calls)).
///
/// ```
/// use aegis_core::proxy::TcpConnect;
/// use aegis_layers::adaptive::{RateConfig, SuccessOrTimeout};
/// use tower::Layer;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let control = RateConfig::new(std::time::Duration::from_millis(250), 10.0, 1_000.0)
///     .spawn(|_rate: f64| {});
/// let upstream = TcpConnect::new("127.0.0.1:1883".parse().unwrap());
/// let measured = control.layer_with(SuccessOrTimeout).layer(upstream);
/// # drop(measured);
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct SuccessOrTimeout;

impl SuccessOrTimeout {
    /// Whether `e` is a timeout by the rules above (and no rejection).
    fn is_timeout(e: &(dyn Error + 'static)) -> bool {
        if find::<Rejected>(e).is_some() {
            return false;
        }
        chain(e).any(|err| {
            err.is::<tokio::time::error::Elapsed>()
                || err.is::<tower::timeout::error::Elapsed>()
                || err
                    .downcast_ref::<ProxyError>()
                    .is_some_and(ProxyError::is_timeout)
                || err
                    .downcast_ref::<io::Error>()
                    .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        })
    }
}

impl<Res> Classify<Res> for SuccessOrTimeout {
    fn classify(&self, result: Result<&Res, &(dyn Error + 'static)>) -> Sample {
        match result {
            Ok(_) => Sample::Record,
            Err(e) if Self::is_timeout(e) => Sample::Record,
            Err(_) => Sample::Ignore,
        }
    }
}
