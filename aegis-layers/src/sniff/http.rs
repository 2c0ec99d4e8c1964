//! Serving the HTTP side of a sniffed port with hyper, bounded.

use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::Reject;
use aegis_core::{BoxError, Handshake, Param};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body, Incoming};
use hyper::server::conn::http1;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tower_service::Service;

/// Most request headers accepted (hyper's default is 100): 64 headers.
const DEFAULT_MAX_HEADERS: usize = 64;
/// Most bytes of request line plus headers: 8 KiB, as in most servers' defaults.
const DEFAULT_MAX_HEADER_SIZE: usize = 8 * 1024;
/// hyper's read buffer cap: 16 KiB (hyper's floor is 8 KiB, its default ~400 KiB).
const DEFAULT_MAX_BUF_SIZE: usize = 16 * 1024;
/// hyper refuses a `max_buf_size` below 8 KiB.
const MIN_MAX_BUF_SIZE: usize = 8 * 1024;
/// How long a client may take to send its request headers: 10 s (hyper's default 30 s).
const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A byte-stream service that serves each connection as HTTP/1 with hyper, with bounded
/// headers: at most [`max_headers`](Self::max_headers) headers of at most
/// [`max_header_size`](Self::max_header_size) bytes in total, read within
/// [`header_read_timeout`](Self::header_read_timeout) (hyper's timer is set, without
/// which hyper would ignore that timeout).
///
/// `S` is a hyper service (`hyper::service::service_fn`, or [`Refuse`]), cloned for
/// each connection. When a request's headers are read, the connection's [`Handshake`]
/// is marked complete, so a deadline layer outside switches to its idle timeout.
///
/// That idle timeout (the slowloris layer's `idle_timeout_after_handshake`, off by
/// default) is then all that limits a request *body* sent a byte at a time: nothing here
/// times a body, and hyper only discards bodies the service does not read. A service
/// that reads bodies should set that idle timeout, or time its own reads of the body.
///
/// Parse errors, oversized headers and header timeouts end the connection with an
/// [`HttpError`] (counted in `aegis_rejections_total{layer="http"}`; hyper has already
/// answered `431` or `400` where it could).
#[derive(Clone)]
pub struct Http1<S> {
    service: S,
    builder: http1::Builder,
}

impl<S> fmt::Debug for Http1<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Http1").finish_non_exhaustive()
    }
}

impl<S> Http1<S> {
    /// Serves connections with `service`, with the bounded defaults: 64 headers, 8 KiB of
    /// headers, a 16 KiB read buffer and a 10 s header read timeout.
    pub fn new(service: S) -> Self {
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_headers(DEFAULT_MAX_HEADERS)
            .max_header_size(DEFAULT_MAX_HEADER_SIZE)
            .max_buf_size(DEFAULT_MAX_BUF_SIZE)
            .header_read_timeout(DEFAULT_HEADER_READ_TIMEOUT);
        Self { service, builder }
    }

    /// The most request headers accepted; more is answered `431` and closed.
    #[must_use]
    pub fn max_headers(mut self, n: usize) -> Self {
        self.builder.max_headers(n);
        self
    }

    /// The most bytes of request line and headers; more is answered `431` and closed.
    #[must_use]
    pub fn max_header_size(mut self, bytes: usize) -> Self {
        self.builder.max_header_size(bytes);
        self
    }

    /// hyper's read buffer cap (at least 8 KiB; smaller values are raised to it).
    #[must_use]
    pub fn max_buf_size(mut self, bytes: usize) -> Self {
        self.builder.max_buf_size(bytes.max(MIN_MAX_BUF_SIZE));
        self
    }

    /// How long a client may take to send a request's headers; then the connection
    /// closes. A timeout past what an `Instant` holds (`Duration::MAX` for "never") is
    /// some thirty years, as elsewhere in this crate: hyper adds it to `Instant::now()`,
    /// which would panic.
    #[must_use]
    pub fn header_read_timeout(mut self, timeout: Duration) -> Self {
        self.builder
            .header_read_timeout(crate::time::clamp_timeout(timeout));
        self
    }

    /// Whether to keep connections open between requests (default `true`).
    #[must_use]
    pub fn keep_alive(mut self, keep_alive: bool) -> Self {
        self.builder.keep_alive(keep_alive);
        self
    }

    /// The hyper service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// Unwraps the hyper service.
    pub fn into_inner(self) -> S {
        self.service
    }
}

impl Http1<Refuse> {
    /// A ready-made refuser: answers every request with `400 Bad Request` and closes.
    pub fn bad_request() -> Self {
        Self::new(Refuse::bad_request()).keep_alive(false)
    }

    /// A ready-made refuser: answers every request with `426 Upgrade Required`, with
    /// `Upgrade: {upgrade}`, and closes.
    pub fn upgrade_required(upgrade: &'static str) -> Self {
        Self::new(Refuse::upgrade_required(upgrade)).keep_alive(false)
    }
}

impl<I, S, B> Service<I> for Http1<S>
where
    I: AsyncRead + AsyncWrite + Unpin + Param<Handshake>,
    S: hyper::service::Service<Request<Incoming>, Response = Response<B>> + Clone,
    S::Error: Into<BoxError>,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = HttpFuture<http1::Connection<TokioIo<I>, CompleteOnRequest<S>>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, io: I) -> Self::Future {
        let handshake = Param::<Handshake>::param(&io);
        let service = CompleteOnRequest::new(self.service.clone(), handshake);
        HttpFuture {
            conn: self.builder.serve_connection(TokioIo::new(io), service),
        }
    }
}

/// A hyper service wrapper that marks the connection's [`Handshake`] complete when a
/// request's headers have been read (hyper calls the service then).
#[derive(Clone, Debug)]
pub struct CompleteOnRequest<S> {
    inner: S,
    handshake: Handshake,
}

impl<S> CompleteOnRequest<S> {
    /// Wraps `inner`: its first call marks `handshake` complete. For HTTP servers built
    /// per connection (whose service depends on the client, say), where [`Http1`] does
    /// not fit.
    pub const fn new(inner: S, handshake: Handshake) -> Self {
        Self { inner, handshake }
    }
}

impl<S, R> hyper::service::Service<R> for CompleteOnRequest<S>
where
    S: hyper::service::Service<R>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, req: R) -> Self::Future {
        self.handshake.complete();
        self.inner.call(req)
    }
}

pin_project! {
    /// The future of one HTTP/1 connection served by [`Http1`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct HttpFuture<F> {
        #[pin]
        conn: F,
    }
}

impl<F> fmt::Debug for HttpFuture<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpFuture").finish_non_exhaustive()
    }
}

impl<F> Future for HttpFuture<F>
where
    F: Future<Output = hyper::Result<()>>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.project().conn.poll(cx).map_err(|e| {
            let label = if e.is_timeout() {
                "header_timeout"
            } else if e.is_parse_too_large() {
                "too_large"
            } else if e.is_parse() {
                "parse"
            } else {
                // Resets, incomplete bodies, service errors: not a refusal.
                return BoxError::from(e);
            };
            aegis_core::error::reject(HttpError { label, source: e }).into()
        })
    }
}

/// Why [`Http1`] ended a connection it refused: the request was malformed, its headers
/// too large or too slow.
#[derive(Debug, thiserror::Error)]
#[error("http request refused ({label})")]
pub struct HttpError {
    label: &'static str,
    #[source]
    source: hyper::Error,
}

impl HttpError {
    /// A stable label: `header_timeout`, `too_large` or `parse`.
    pub const fn label(&self) -> &'static str {
        self.label
    }
}

impl Reject for HttpError {
    fn layer(&self) -> &'static str {
        "http"
    }

    fn label(&self) -> &'static str {
        self.label
    }
}

/// A hyper service that refuses every request with a fixed status and
/// `Connection: close`. Use it through [`Http1::bad_request`] or
/// [`Http1::upgrade_required`].
#[derive(Clone, Copy, Debug)]
pub struct Refuse {
    status: StatusCode,
    upgrade: Option<&'static str>,
}

impl Refuse {
    /// `400 Bad Request`.
    pub const fn bad_request() -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            upgrade: None,
        }
    }

    /// `426 Upgrade Required`, with `Upgrade: {upgrade}` (RFC 9110 §15.5.22 requires it).
    pub const fn upgrade_required(upgrade: &'static str) -> Self {
        Self {
            status: StatusCode::UPGRADE_REQUIRED,
            upgrade: Some(upgrade),
        }
    }
}

impl<R> hyper::service::Service<R> for Refuse {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Response<Full<Bytes>>, Infallible>>;

    fn call(&self, _req: R) -> Self::Future {
        let reason = self.status.canonical_reason().unwrap_or("refused");
        let mut res = Response::new(Full::new(Bytes::from(format!("{reason}\n"))));
        *res.status_mut() = self.status;
        let headers = res.headers_mut();
        headers.insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        if let Some(upgrade) = self.upgrade
            && let Ok(v) = header::HeaderValue::from_str(upgrade)
        {
            headers.insert(header::UPGRADE, v);
        }
        std::future::ready(Ok(res))
    }
}
