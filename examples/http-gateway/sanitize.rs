//! [`Sanitize`]: the request side of the proxy's header rules, as a tower service.
//!
//! Before the request goes on: a `Transfer-Encoding` other than one `chunked` is
//! answered `501` (RFC 9112 §6.1; see
//! [`check_transfer_coding`](crate::headers::check_transfer_coding)), headers over the
//! limits `431` and a missing (in any version), repeated or invalid `Host` `400`, without
//! calling the inner service;
//! hop-by-hop headers are removed, and so is every header whose name has an underscore
//! (as nginx does by default: see
//! [`remove_underscored`](crate::headers::remove_underscored)); the client's forwarding
//! headers (`X-Forwarded-*`, `Forwarded`, `X-Real-IP` and the other client-IP, host and
//! path headers of [`CLIENT_ADDRESS_HEADERS`](crate::headers::CLIENT_ADDRESS_HEADERS),
//! such as `Remote-Addr` or `X-Original-URL`) are removed and
//! replaced with the gateway's `X-Forwarded-For` (the connection's effective client
//! address), `X-Forwarded-Proto` and `X-Forwarded-Host` (see
//! [`set_forwarded`](crate::headers::set_forwarded)). The rules and their order are
//! [`sanitize_request`]'s, after the transfer coding's check. The layer is built per
//! connection, since it carries that connection's client address.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::{Request, Response};
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use crate::headers::{Refused, sanitize_request};
use crate::proxy::GatewayBody;
use crate::refusal::{Refusal, refuse};

/// Header limits of a request.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most header fields.
    pub max_headers: usize,
    /// The most bytes of header names and values.
    pub max_header_bytes: usize,
}

/// Applies [`Sanitize`] for one connection's client.
#[derive(Debug, Clone, Copy)]
pub struct SanitizeLayer {
    client: IpAddr,
    limits: Limits,
}

impl SanitizeLayer {
    /// Sanitizes the requests of `client` with `limits`.
    pub const fn new(client: IpAddr, limits: Limits) -> Self {
        Self { client, limits }
    }
}

impl<S> Layer<S> for SanitizeLayer {
    type Service = Sanitize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Sanitize {
            inner,
            client: self.client,
            limits: self.limits,
        }
    }
}

/// Refuses an unknown transfer coding with `501`, oversized headers with `431` and a bad
/// `Host` with `400`, strips hop-by-hop
/// headers and sets the forwarding headers. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Sanitize<S> {
    inner: S,
    client: IpAddr,
    limits: Limits,
}

impl<S, B> Service<Request<B>> for Sanitize<S>
where
    S: Service<Request<B>, Response = Response<GatewayBody>>,
{
    type Response = Response<GatewayBody>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let limits = self.limits;
        let refused = match sanitize_request(
            req.headers_mut(),
            self.client,
            limits.max_headers,
            limits.max_header_bytes,
        ) {
            Ok(()) => {
                return ResponseFuture {
                    state: State::Inner {
                        fut: self.inner.call(req),
                    },
                };
            }
            Err(Refused::UnknownCoding(e)) => {
                tracing::debug!(?e, "request refused");
                refuse(Refusal::TransferCoding, "transfer coding not implemented\n")
            }
            Err(Refused::TooLarge(too_large)) => {
                tracing::debug!(?too_large, "request headers refused");
                refuse(Refusal::HeadersTooLarge, "request headers too large\n")
            }
            Err(Refused::BadHost(bad_host)) => {
                tracing::debug!(?bad_host, "request refused");
                refuse(Refusal::BadHost, "missing, repeated or bad Host\n")
            }
        };
        ResponseFuture {
            state: State::Refused { res: Some(refused) },
        }
    }
}

pin_project! {
    /// The response future of [`Sanitize`].
    #[must_use = "futures do nothing unless you `.await` or poll them"]
    pub struct ResponseFuture<F> {
        #[pin]
        state: State<F>,
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Inner { #[pin] fut: F },
        Refused { res: Option<Response<GatewayBody>> },
    }
}

impl<F, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<GatewayBody>, E>>,
{
    type Output = Result<Response<GatewayBody>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().state.project() {
            StateProj::Inner { fut } => fut.poll(cx),
            StateProj::Refused { res } => Poll::Ready(Ok(res.take().expect("polled after ready"))),
        }
    }
}
