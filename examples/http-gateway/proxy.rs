//! The proxying service: pick a backend, send the request through its circuit breaker,
//! relay the answer.
//!
//! Each backend is a hyper-util legacy [`Client`] (pooled keep-alive connections) with
//! a response timeout ([`Upstream`]), wrapped in its own `CircuitBreaker` with
//! [`GatewayClassifier`] (a `5xx` or an upstream error is a failure). The
//! [`Pool`](crate::balance::Pool) picks the backend. Answers the gateway makes itself
//! carry a [`LocalAnswer`] extension so that the latency controller leaves them out:
//!
//! | case | status |
//! |---|---|
//! | no backend available (all unhealthy or open) | `503` |
//! | the chosen backend's breaker refused the call (it opened in between) | `503` |
//! | the request body grew past the limit while streaming | `413` |
//! | the backend did not answer within the response timeout | `504` |
//! | any other upstream failure (refused, reset) | `502` |
//!
//! A request is never retried on another backend: it may not be idempotent, and its
//! body has been consumed. So when a half-open backend's probe permit is already taken,
//! a request the balancer sent there is answered `503` (the balancer gives a half-open
//! backend only its warm-up start weight, which keeps this rare).
//!
//! Not handled: protocol upgrades (`Upgrade` is hop-by-hop and stripped, so WebSocket
//! handshakes reach the backend as plain requests), HTTP/2, TLS to the backends.

use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::BoxError;
use aegis_core::error::find;
use aegis_layers::circuit_breaker::error::CircuitOpen;
use aegis_layers::circuit_breaker::{CircuitBreaker, Classify, HttpClassifier, Outcome};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError};
use hyper::body::{Body, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use tokio::time::Instant;
use tower::{Service, ServiceExt};

use crate::balance::Pool;
use crate::headers::strip_hop_by_hop;

/// The body type on both sides of the gateway.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// Marks a response the gateway made itself (not a backend's answer).
#[derive(Debug, Clone, Copy)]
pub struct LocalAnswer;

/// A response the gateway makes itself: `status`, a short text body, [`LocalAnswer`].
pub fn local_response(status: StatusCode, text: &'static str) -> Response<GatewayBody> {
    let body = Full::new(Bytes::from_static(text.as_bytes()))
        .map_err(|never| match never {})
        .boxed_unsync();
    let mut res = Response::new(body);
    *res.status_mut() = status;
    res.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    res.extensions_mut().insert(LocalAnswer);
    res
}

/// One backend's HTTP client, with a response timeout (a hung backend is a failure,
/// not a cancellation, so its breaker counts it).
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<HttpConnector, GatewayBody>,
    timeout: Duration,
}

impl Upstream {
    /// A pooled client; connects within `connect_timeout`, answers within `timeout`.
    pub fn new(connect_timeout: Duration, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(connector);
        Self { client, timeout }
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl Service<Request<GatewayBody>> for Upstream {
    type Response = Response<Incoming>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<Incoming>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let res = tokio::time::timeout(self.timeout, self.client.request(req));
        Box::pin(async move { Ok(res.await??) })
    }
}

/// The breaker's classifier: [`HttpClassifier`]'s rules (`5xx` and upstream errors are
/// failures), except that a request body cut by the size limit is the client's fault
/// and is not counted.
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayClassifier;

impl<B> Classify<Response<B>> for GatewayClassifier {
    fn classify(&self, result: Result<&Response<B>, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Err(e) if find::<LengthLimitError>(e).is_some() => Outcome::Ignore,
            other => HttpClassifier.classify(other),
        }
    }
}

/// A backend as the proxy calls it.
pub type Backend = CircuitBreaker<Upstream, GatewayClassifier>;

/// Proxies each request to a backend the pool picks. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Proxy {
    pool: Arc<Pool>,
    backends: Arc<[Backend]>,
}

impl Proxy {
    /// Proxies to `backends`, in the pool's order.
    pub fn new(pool: Arc<Pool>, backends: Vec<Backend>) -> Self {
        assert_eq!(
            pool.members().len(),
            backends.len(),
            "one backend per pool member"
        );
        Self {
            pool,
            backends: backends.into(),
        }
    }
}

impl<B> Service<Request<B>> for Proxy
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<GatewayBody>;
    type Error = BoxError; // never returned: failures are answered (see the module docs)
    type Future = BoxFuture<Result<Response<GatewayBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let Some(i) = self.pool.pick(Instant::now()) else {
            let res = local_response(StatusCode::SERVICE_UNAVAILABLE, "no backend available\n");
            return Box::pin(std::future::ready(Ok(res)));
        };
        let backend = self.backends[i].clone();
        let req = to_backend(req, self.pool.members()[i].addr);
        // `map_result`, not an `async` block: rustc cannot prove an `async` block over
        // the breaker's future `Send` for every lifetime of the boxed error.
        Box::pin(
            backend
                .map_result(|res| {
                    Ok::<_, BoxError>(match res {
                        Ok(res) => from_backend(res),
                        Err(e) => error_response(&*e),
                    })
                })
                .oneshot(req),
        )
    }
}

/// The request as sent to `addr`: absolute `http://addr/path?query` URI (the client's
/// `Host` header is kept), HTTP/1.1, the body boxed.
fn to_backend<B>(req: Request<B>, addr: SocketAddr) -> Request<GatewayBody>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri =
        Uri::try_from(format!("http://{addr}{path}")).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    Request::from_parts(parts, body.map_err(Into::into).boxed_unsync())
}

/// The backend's answer as relayed: hop-by-hop headers removed, HTTP/1.1 (the
/// backend's version is its own hop's), the body boxed.
fn from_backend(res: Response<Incoming>) -> Response<GatewayBody> {
    let (mut parts, body) = res.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.version = Version::HTTP_11; // hyper answers a 1.0 client in 1.0 itself
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

fn error_response(err: &(dyn Error + 'static)) -> Response<GatewayBody> {
    if find::<CircuitOpen>(err).is_some() {
        return local_response(StatusCode::SERVICE_UNAVAILABLE, "backend unavailable\n");
    }
    if find::<LengthLimitError>(err).is_some() {
        return local_response(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    if find::<tokio::time::error::Elapsed>(err).is_some() {
        return local_response(StatusCode::GATEWAY_TIMEOUT, "backend timed out\n");
    }
    tracing::debug!(error = %err, "backend failed");
    local_response(StatusCode::BAD_GATEWAY, "backend failed\n")
}
