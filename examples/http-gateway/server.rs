//! [`HttpServer`]: the byte-stream service at the bottom of the connection stack. It
//! runs hyper's HTTP/1 server over each connection, with the tower HTTP stack of
//! [`Stack::build`] per request.
//!
//! Per request, outermost first:
//!
//! 1. security response headers (tower-http `SetResponseHeader`, overriding the
//!    backend's): `X-Content-Type-Options: nosniff`, `X-Frame-Options: DENY`,
//!    `Referrer-Policy: no-referrer`, and `Strict-Transport-Security` when configured;
//! 2. the body limit (tower-http `RequestBodyLimit`: `413` on a `Content-Length` over
//!    the limit, counted just outside it; a streamed body is cut there and the proxy
//!    answers `413`);
//! 3. [`Sanitize`](crate::sanitize::Sanitize): `501` on a `Transfer-Encoding` other
//!    than one `chunked`, `431` on too many or too large headers,
//!    `400` on a missing (HTTP/1.0 too), repeated or invalid `Host`, hop-by-hop stripping,
//!    headers with an underscore in their name removed, the client's forwarding headers
//!    replaced (`X-Forwarded-For` from the connection's client address,
//!    `X-Forwarded-Proto`, `X-Forwarded-Host`);
//! 4. the [`Proxy`]. The adaptive controller's latency samples are taken further down,
//!    around each backend's HTTP client
//!    ([`Upstream::record_latency`](crate::proxy::Upstream::record_latency)), where the
//!    time spent waiting on the client's body can be left out, each as its client's
//!    ([`SampleKey`](crate::proxy::SampleKey), put on the request here).
//!
//! hyper itself bounds the connection: `header_read_timeout` (with a timer set, without
//! which hyper ignores it; hyper starts it whenever it waits for a request head, so it
//! also closes a keep-alive connection idle between requests), `max_buf_size`, and a
//! `max_headers` backstop above the stack's own count limit; a request head it refuses
//! (`400`, `431`) ends the connection with a [`HeadRefused`], counted, and so does a
//! first request head its timeout cuts (`header_timeout`; the slowloris deadline cuts it
//! first with the gateway's defaults). Its timeout after a request was served is the
//! keep-alive idle close: the connection ends well (`outcome="ok"`). When hyper has read
//! the first request's headers, the connection's [`Handshake`] is marked complete, which
//! ends the slowloris layer's handshake clocks.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{Reject, reject};
use aegis_core::time::FAR_FUTURE;
use aegis_core::{BoxError, ClientAddr, Handshake, Param};
use aegis_layers::sniff::CompleteOnRequest;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pin_project_lite::pin_project;
use tokio::io::{AsyncRead, AsyncWrite};
use tower::util::BoxCloneService;
use tower::{Service, ServiceBuilder};
use tower_http::limit::{RequestBodyLimitLayer, ResponseBody};
use tower_http::set_header::SetResponseHeaderLayer;

use crate::proxy::{GatewayBody, Proxy, SampleKey};
use crate::refusal::{Refusal, count};
use crate::sanitize::{Limits, SanitizeLayer};

/// The per-request stack, boxed once per connection.
pub type RequestStack =
    BoxCloneService<Request<Incoming>, Response<ResponseBody<GatewayBody>>, BoxError>;

/// What every connection's request stack is built from.
#[derive(Clone, Debug)]
pub struct Stack {
    /// The most bytes of request body.
    pub max_body: usize,
    /// Header count and size limits.
    pub limits: Limits,
    /// `Strict-Transport-Security: max-age=...`, when set (only behind TLS).
    pub hsts: Option<Duration>,
    /// The proxy.
    pub proxy: Proxy,
}

impl Stack {
    /// The request stack of one connection from `client`.
    pub fn build(&self, client: IpAddr) -> RequestStack {
        let hsts = self.hsts.map(|age| {
            let value = HeaderValue::from_str(&format!("max-age={}", age.as_secs()))
                .expect("digits are a valid header value");
            SetResponseHeaderLayer::overriding(header::STRICT_TRANSPORT_SECURITY, value)
        });
        let svc = ServiceBuilder::new()
            .layer(SetResponseHeaderLayer::overriding(
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::X_FRAME_OPTIONS,
                HeaderValue::from_static("DENY"),
            ))
            .layer(SetResponseHeaderLayer::overriding(
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ))
            .option_layer(hsts)
            .map_request(count_declared_too_large(self.max_body))
            .layer(RequestBodyLimitLayer::new(self.max_body))
            .layer(SanitizeLayer::new(client, self.limits))
            .map_request(SampleKey::of(client))
            .service(self.proxy.clone());
        BoxCloneService::new(svc)
    }
}

/// Counts a request whose `Content-Length` is over `max_body`: tower-http's
/// `RequestBodyLimit` answers it `413` itself (by this rule), without calling inside.
fn count_declared_too_large<B>(max_body: usize) -> impl Fn(Request<B>) -> Request<B> + Clone {
    move |req| {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        if declared.is_some_and(|len| len > max_body) {
            count(Refusal::BodyTooLarge);
        }
        req
    }
}

/// Serves each connection as HTTP/1 with hyper over the [`Stack`]. See the
/// [module docs](self).
#[derive(Clone, Debug)]
pub struct HttpServer {
    http: http1::Builder,
    stack: Stack,
}

impl HttpServer {
    /// hyper's bounds: `header_read_timeout` (at most [`FAR_FUTURE`], some thirty years:
    /// hyper adds it to the time each request's read starts, and `Duration::MAX`
    /// overflowed there and panicked the task of every connection), `max_buf_size` (at
    /// least 8 KiB), and a `max_headers` backstop of twice the stack's limit (at least
    /// 100, hyper's default), so that the stack's `431` is the one clients see.
    pub fn new(stack: Stack, header_read_timeout: Duration, max_buf_size: usize) -> Self {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(header_read_timeout.min(FAR_FUTURE))
            .max_buf_size(max_buf_size.max(8 * 1024))
            .max_headers((stack.limits.max_headers * 2).max(100));
        Self { http, stack }
    }
}

impl<I> Service<I> for HttpServer
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static + Param<ClientAddr> + Param<Handshake>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, io: I) -> Self::Future {
        let ClientAddr(client) = io.param();
        // The connection's own record that hyper has read a request head (the stream's
        // `Handshake` is untracked without a slowloris layer).
        let served = Handshake::tracked();
        // Marks the handshake complete when hyper has read a request's headers.
        let service = CompleteOnRequest::new(
            CompleteOnRequest::new(
                TowerToHyperService::new(self.stack.build(client.ip())),
                served.clone(),
            ),
            Param::<Handshake>::param(&io),
        );
        let conn = self.http.serve_connection(TokioIo::new(io), service);
        // A named future, not an `async` block: rustc cannot prove an `async` block
        // over hyper's connection `Send` for every lifetime of the boxed error.
        Box::pin(ConnFuture { conn, served })
    }
}

pin_project! {
    /// One connection served by hyper, its error boxed; a request head hyper refused (or
    /// a first one it timed out) is a [`HeadRefused`], and a header timeout after a
    /// request was served is the keep-alive idle close, the connection's good end.
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    struct ConnFuture<F> {
        #[pin]
        conn: F,
        // Complete once hyper has read a request head on this connection.
        served: Handshake,
    }
}

impl<F> Future for ConnFuture<F>
where
    F: Future<Output = hyper::Result<()>>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let served = &*this.served;
        this.conn.poll(cx).map(|res| {
            let e = match res {
                Ok(()) => return Ok(()),
                // hyper waits for each next head under its header timeout: after a
                // request, that is the keep-alive idle limit, and the close ends a
                // connection that was served (as an error, it was counted so for every
                // browser connection left idle). A next head begun and not finished in
                // time ends so too: it cannot be told apart here.
                Err(e) if e.is_timeout() && served.is_complete() => return Ok(()),
                Err(e) => e,
            };
            let refusal = if e.is_timeout() {
                // The first request's head, not in within hyper's timeout: the slowloris
                // deadline cuts it first with the gateway's defaults (see `Config`),
                // hyper's timeout only when set shorter.
                Refusal::HeaderTimeout
            } else if e.is_parse_too_large() {
                Refusal::HeadersTooLarge
            } else if e.is_parse() {
                Refusal::Parse
            } else {
                return Err(e.into());
            };
            Err(reject(HeadRefused { refusal, source: e }).into())
        })
    }
}

/// A request head hyper refused, answering `400` (it does not parse) or `431` (past
/// `max_buf_size`) before closing, or a first request head not in within its header
/// timeout, closed without an answer: the connection's error, counted in
/// `aegis_rejections_total{layer="http"}` ([`reject`]) as `aegis-layers`' `sniff::Http1`
/// counts the same.
#[derive(Debug)]
pub struct HeadRefused {
    refusal: Refusal,
    source: hyper::Error,
}

impl std::fmt::Display for HeadRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.refusal, self.source)
    }
}

impl std::error::Error for HeadRefused {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl Reject for HeadRefused {
    fn layer(&self) -> &'static str {
        self.refusal.layer()
    }

    fn label(&self) -> &'static str {
        self.refusal.label()
    }
}
