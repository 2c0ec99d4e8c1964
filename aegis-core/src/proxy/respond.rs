//! What the proxy does with a client whose upstream could not be reached.

use std::error::Error;
use std::future::{Future, Ready, ready};

/// Answers a client when [`Proxy`](super::Proxy) cannot reach the upstream.
///
/// When the connector fails (refused, timed out, a circuit breaker failing fast, ...)
/// the proxy hands the client's IO to [`respond`](Self::respond) together with the
/// connector's error, drives the returned future to its end, and then returns that same
/// error, so [`label_of`](crate::error::label_of) still names the cause
/// (`connect_refused`, `connect_timeout`, the breaker's `open`, ...).
///
/// A protocol layer knows what its clients expect: an MQTT gateway writes a "server
/// unavailable" CONNACK (`aegis_mqtt::layer::Unavailable`), an HTTP one a `503`. The
/// default, `()`, drops the IO: the client sees the connection close.
///
/// The future should be bounded in time (the client may not read), and should not need
/// the error after `respond` returns: take what it needs from `error` at once. It is
/// `Send` whenever its fields are, so a `Send` IO keeps the proxy's future `Send`.
///
/// Set it with [`Proxy::on_connect_error`](super::Proxy::on_connect_error); the proxy
/// clones the responder into each connection's future, so keep it cheap to clone.
pub trait OnConnectError<I> {
    /// Drives the answer to the client.
    type Future: Future<Output = ()>;

    /// Starts answering the client `io` after the connector failed with `error`.
    fn respond(&self, io: I, error: &(dyn Error + 'static)) -> Self::Future;
}

/// Drops the client's IO: the connection just closes.
impl<I> OnConnectError<I> for () {
    type Future = Ready<()>;

    fn respond(&self, io: I, _: &(dyn Error + 'static)) -> Self::Future {
        drop(io);
        ready(())
    }
}
