//! What the proxy does with a client whose upstream could not be reached.

use std::error::Error;
use std::future::{Future, Ready, ready};

/// Answers a client when [`Proxy`](super::Proxy) cannot reach the upstream.
///
/// When the connector fails, in its readiness or its call (refused, timed out, a
/// circuit breaker failing fast, ...), the proxy hands the client's IO to
/// [`respond`](Self::respond) together with the connector's error, drives the returned
/// future to its end, and then returns that same error, so
/// [`label_of`](crate::error::label_of) still names the cause (`connect_refused`,
/// `connect_timeout`, the breaker's `open`, ...).
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
///
/// # Example
///
/// An HTTP/1 responder: the client gets a `503` instead of a reset.
///
/// ```
/// use std::error::Error;
/// use std::future::Future;
/// use std::pin::Pin;
/// use std::time::Duration;
///
/// use aegis_core::proxy::{OnConnectError, Proxy};
/// use aegis_core::{Conn, error::label_of};
/// use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
/// use tower::ServiceExt;
///
/// #[derive(Clone)]
/// struct Http503;
///
/// impl<I: AsyncWrite + Unpin + Send + 'static> OnConnectError<I> for Http503 {
///     // Boxed: it runs only when the upstream is down.
///     type Future = Pin<Box<dyn Future<Output = ()> + Send>>;
///
///     fn respond(&self, mut io: I, _: &(dyn Error + 'static)) -> Self::Future {
///         Box::pin(async move {
///             let answer = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n";
///             // Bounded: a client that does not read is closed all the same.
///             let _ = tokio::time::timeout(Duration::from_secs(5), async {
///                 io.write_all(answer).await?;
///                 io.shutdown().await
///             })
///             .await;
///         })
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), aegis_core::BoxError> {
/// // An upstream address nobody listens on.
/// let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let upstream = gone.local_addr()?;
/// drop(gone);
///
/// let (mut client, io) = tokio::io::duplex(256);
/// let conn = Conn::new(io, "192.0.2.1:4000".parse()?, "127.0.0.1:8080".parse()?);
/// let err = Proxy::new(upstream)
///     .on_connect_error(Http503)
///     .oneshot(conn)
///     .await
///     .unwrap_err();
/// assert_eq!(label_of(&*err), ("proxy", "connect_refused"));
/// let mut reply = String::new();
/// client.read_to_string(&mut reply).await?;
/// assert!(reply.starts_with("HTTP/1.1 503"));
/// # Ok(())
/// # }
/// ```
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
