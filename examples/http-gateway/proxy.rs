//! The proxying service: pick a backend, send the request through its circuit breaker,
//! relay the answer.
//!
//! Each backend is a hyper-util legacy [`Client`] (pooled keep-alive connections) with
//! a response timeout ([`Upstream`]) and a write-stall limit of the same length on each
//! connection ([`WriteTimeout`]: a backend that stops reading a request body has its
//! connection closed, even after it answered), wrapped in its own `CircuitBreaker` with
//! [`GatewayClassifier`] (an upstream error, or the backend's own `502`, `503` or `504`,
//! is a failure; its other `5xx`, and a failure of the client's request body, see
//! [`crate::client_body`], are not). The
//! [`Pool`] picks the backend. The adaptive controller's latency
//! samples are taken in [`Upstream`] ([`Upstream::record_latency`],
//! [`is_backend_sample`]): every answer of a backend is one, and of the answers the
//! gateway makes itself, only those that tell of a backend:
//!
//! | case | status | latency sample |
//! |---|---|---|
//! | `OPTIONS *` (a question to the gateway itself) | `200` with [`ALLOW`] | no |
//! | `CONNECT` (the gateway is no tunnel) | `405` with [`ALLOW`] | no |
//! | `TRACE` (it echoes the request, cookies and credentials included, to whoever reads the answer: cross-site tracing) | `405` with [`ALLOW`] | no |
//! | `OPTIONS` with `Max-Forwards: 0` (RFC 9110 §7.6.2: the gateway is the last recipient; a greater value is forwarded one less) | `200` with [`ALLOW`] | no |
//! | `OPTIONS` with a `Max-Forwards` that is not one number | `400` | no |
//! | a method not in [`ALLOW`] (RFC 9110 §15.6.2) | `501` with [`ALLOW`] | no |
//! | any other target that is not origin-form (`/path?query`) | `400` | no |
//! | no backend available (all unhealthy or open) | `503` | no |
//! | the chosen backend's breaker refused the call (it opened, or another request took its probe permit, in between) | `503` | no |
//! | the request body grew past the limit while streaming (or while read before a half-open breaker's probe) | `413` | no |
//! | the body of a request bound to be a half-open breaker's probe did not come in within the backend timeout | `408` | no |
//! | the request body was malformed or cut off | `400` | no |
//! | the response timeout fired while the client's body was still awaited (for the probe of a half-open breaker, shortly before its probe timeout: [`Upstream::watch_probes`]) | `408` | no |
//! | the probe of a half-open breaker, shortly before its probe timeout, whose backend has had less of its own time than the probe window gives it, because the client's body took the rest ([`Upstream::watch_probes`]) | `408` | no |
//! | the backend did not answer within the response timeout of its own time (the call's time less the time spent waiting on the client's body) | `504` | yes: the timeout |
//! | the backend answered before the client's body had gone out whole (an early refusal, say) | the backend's answer, with `Connection: close`; once it is over, the rest of the body is dropped unread and both connections are closed ([`crate::client_body`]) | as answered |
//! | the backend answered, and the client's body was still awaited at the response timeout ([`crate::client_body`]) | the backend's answer, then the connection is closed | as answered |
//! | the backend's body failed after its head was relayed (a close or reset short of its length: [`crate::backend_body`]) | the head and the bytes that came, then the connection is closed (an HTTP/1.0 client of an answer without a length cannot tell it from the end: [`crate::backend_body`]; its breaker counts it, unless the client's body had not gone out whole, the client held the body back for over a second, `truncated_held`, or the circuit changed state since the call) | as answered |
//! | the backend's body stalled after its head was relayed: no next chunk within the backend timeout of the gateway's own waiting on it ([`crate::backend_body`], `body_timeout`) | the head and the bytes that came, then the connection is closed | as answered (its breaker counts it) |
//! | connecting to the backend failed for lack of the gateway's own descriptors, memory or local ports (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `EADDRNOTAVAIL`: `ProxyError::LocalResources`) | `503` | no (nor does its breaker count it: the gateway's state, not the backend's) |
//! | the connection to the backend failed (closed, reset) after hyper began sending the request body and before it had all of it ([`UploadCut`], see [`crate::client_body`]) | `502` | no (nor does its breaker count it: a slow client, or the backend's early refusal of the body) |
//! | a reused keep-alive connection was closed (or reset) by the backend before any byte of its answer: the keep-alive race, the backend's idle timeout crossing the request ([`StaleConnection`], [`is_stale`]) | `502` | no (nor does its breaker count it) |
//! | any other upstream failure (refused, reset) | `502` | no: it ends at once, and says nothing of the backend's latency (its breaker counts it) |
//! | the backend answered with a `Transfer-Encoding` other than one `chunked` ([`Upstream`] fails it) | `502` (its breaker counts it) | yes: it answered |
//! | the backend's final answer was a `1xx`, such as a `101 Switching Protocols` the gateway never asked for ([`InformationalAnswer`]: [`Upstream`] fails it) | `502` (its breaker counts it) | yes: it answered |
//! | the backend answered `204` with a `Transfer-Encoding` or a `Content-Length` other than `0` ([`NoContentBody`]: [`Upstream`] fails it, and the connection is not reused) | `502` (its breaker counts it) | yes: it answered |
//!
//! Only origin-form targets (RFC 9112 §3.2.1) are proxied: the backend URI is the
//! backend's address plus the target's path and query, built with [`Uri::builder`], and
//! a target it cannot build is answered `400`, never replaced. The absolute-form
//! (`GET http://host/path`) is refused with `400` although RFC 9112 §3.2.2 asks servers
//! to accept it: clients send it only to forward proxies, and accepting it would give a
//! request a second host beside its `Host` header. The asterisk-form and the
//! authority-form are the gateway's own business (table above): forwarded, they once
//! made backend URIs without a port (`http://10.0.0.5:9001*`), which the connector
//! completed with port 80 of the backend's host.
//!
//! A request is never retried on another backend: it may not be idempotent, and its
//! body has been consumed. The balancer passes over a half-open backend whose probe
//! permit is taken ([`CircuitHandle::would_admit`]), so a request lands there only when
//! another one took the permit between its pick and its call, and is answered `503`.
//!
//! **A probe's body is read before the call.** A request with a body picked for a
//! backend whose breaker is half-open is read in full first (within the backend
//! timeout, else `408`; over the body limit, which the stack's `RequestBodyLimit`
//! enforces, `413`), and only then calls into the breaker and takes its probe permit
//! (`Proxy::forward_probe`). Streamed into the probe, a body the client withheld held
//! the permit: one client sending heads with `Content-Length: 10` and no body took the
//! permit, its probe ended as a stall (`408`, which the breaker ignores), its next head
//! took the permit again, and meanwhile the balancer passed over the backend and every
//! other client got `503`; the breaker never closed. If the permit was taken (or the
//! circuit re-opened) while the body came in, the request goes to the pool's next pick:
//! nothing has been sent anywhere yet.
//!
//! **`Expect: 100-continue`** is the gateway's own business, and the header is removed
//! from the request it sends on ([`to_backend`]). hyper's server answers the client
//! `100 Continue` itself the first time the body is read, which is when the request has
//! gone on to a backend (its head written on a backend connection, and hyper's client
//! polling the body): before the backend has decided anything, and the body follows at
//! once. Forwarded, the header told the backend that the body would wait for its word
//! while it was already on the way: a backend that answers such a request early (a
//! `401` on its headers) and takes the body as never sent, keeping the connection, read
//! the body as its next request; when the body had all gone out before that answer, the
//! pool kept the connection, and the request the client had written as a body reached
//! the backend past every rule of the gateway, and took in (as a header) the next
//! request sent on that connection, another client's, cookies and all, whose answer it
//! got. The header is not hop-by-hop (RFC 9110 §10.1.1 has a proxy pass it on), but a
//! proxy that does not wait for the backend's `100` has answered the expectation itself;
//! without it the backend reads the body as the body. A `100 Continue` of the backend's
//! own is dropped by hyper's client, which relays no interim answer. A request the
//! gateway answers without reading its body (`413` on its `Content-Length`, any refusal
//! in the table above, `503` with no backend) gets no `100`: hyper closes the connection
//! after the answer, the body unread. A backend's final answer before the body (an early
//! `401` or `413`) is relayed with `Connection: close`, and the body is dropped once the
//! answer is over (table above). Waiting for the backend's `100` would need the body held
//! back until it came, with a timer for backends that never send one (curl waits 1 s):
//! not done.
//!
//! **A body after a bodiless answer, and any bytes past an answer's framing.** An
//! answer to a `HEAD`, and a `204` or `304`, has no body whatever its headers say (RFC
//! 9112 §6.3), and hyper's client hands the connection back to the pool at the end of
//! its head. A backend that writes a body after such a head anyway, in a write of its
//! own that comes after the next request was sent on the connection, has that body read
//! as the next request's answer: another client's, which can be made to get an answer
//! of the backend's choosing (a body in the same write as the head is seen by hyper's
//! client on an idle connection, which it closes). The same holds for any answer a
//! backend writes past its own framing, in a later write: a `Content-Length: 26` answer
//! whose 26 bytes are followed, a moment later, by a whole second answer hands the pool
//! back a connection with that answer still to come. A `204` that says it has a body (a
//! `Transfer-Encoding`, which RFC 9112 §6.1 forbids in it, or a `Content-Length` other
//! than `0`, which RFC 9110 §8.6 forbids) is failed ([`NoContentBody`]): the client gets
//! `502`, and the connection is marked not to be reused (hyper-util's
//! `Connected::poison`, through [`capture_connection`]: the pool may have taken the
//! connection back as the head came, and drops it at the next checkout instead of
//! handing it out; a request taking it in the microseconds between is not covered). An
//! answer with both a `Content-Length` and a `Transfer-Encoding` (RFC 9112 §6.3: "ought
//! to be handled as an error", the textbook sign of response splitting: the length
//! says more bytes than the chunked body has, and they follow it) is relayed as RFC
//! 9112 §6.3 lets an intermediary, framed by the coding with the `Content-Length`
//! removed ([`from_backend`]), and its connection is marked not to be reused in the same
//! way: what the client gets is sound, and the connection was the only harm. The
//! answer to a `HEAD` and a `304` carry such headers rightly (the length the body would
//! have had), and an answer that ends where its framing says carries no sign at all, so
//! a backend that writes more after them is not caught: a risk of every HTTP/1
//! connection pool, which needs a backend broken in that way.
//!
//! Not handled: protocol upgrades (`Upgrade` is hop-by-hop and stripped, so WebSocket
//! handshakes reach the backend as plain requests), HTTP/2, TLS to the backends.

use std::error::Error;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::find;
use aegis_core::proxy::ProxyError;
use aegis_core::time::deadline;
use aegis_core::{BoxError, ClientKey, KeyBy};
use aegis_layers::adaptive::AdaptiveHandle;
use aegis_layers::circuit_breaker::error::CircuitOpen;
use aegis_layers::circuit_breaker::{
    CircuitBreaker, CircuitHandle, CircuitState, Classify, Outcome, classify_error,
};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError};
use hyper::body::{Body, Incoming};
use hyper::header::{
    ALLOW as ALLOW_HEADER, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, EXPECT, HeaderMap,
    HeaderValue, MAX_FORWARDS, TRANSFER_ENCODING,
};
use hyper::http::uri::Scheme;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{HttpConnector, capture_connection};
use tokio::time::Instant;
use tokio::time::error::Elapsed;
use tower::{Service, ServiceExt};

use crate::backend_body::{BackendBody, Verdict};
use crate::balance::Pool;
use crate::client_body::{ClientBody, ClientBodyError, Progress, UploadCut};
use crate::headers::{UnknownCoding, check_transfer_coding, strip_hop_by_hop};
use crate::refusal::{BackendError, Refusal, backend_error, refuse};
use crate::write_timeout::{ConnUse, WriteTimeout, stamp};

/// The body type on both sides of the gateway.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A response the gateway makes itself: `status` and a short text body.
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
    res
}

/// The methods the gateway relays: every method of RFC 9110 and `PATCH`, but `CONNECT`
/// and `TRACE` (`405`: see [`answer_method`]). The backends may still refuse some. Sent
/// as `Allow` with the answers to `OPTIONS *`, `CONNECT`, `TRACE`, an `OPTIONS` the
/// gateway answers itself, and any other method, which the gateway answers `501`
/// ([`answer_method`]). [`ALLOWED`] as a header value.
pub const ALLOW: &str = "GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH";

/// The methods of [`ALLOW`].
const ALLOWED: [Method; 7] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::OPTIONS,
    Method::PATCH,
];

/// Whether `uri` is an origin-form request target: a path from `/`, maybe a query.
fn is_origin_form(uri: &Uri) -> bool {
    uri.scheme().is_none()
        && uri.authority().is_none()
        && uri
            .path_and_query()
            .is_some_and(|p| p.as_str().starts_with('/'))
}

/// The form of a request target `uri` that is not origin-form (RFC 9112 §3.2), for the
/// logs.
fn target_form(uri: &Uri) -> &'static str {
    if uri.scheme().is_some() {
        "absolute"
    } else if uri.authority().is_some() {
        "authority"
    } else if uri == "*" {
        "asterisk"
    } else {
        "other"
    }
}

/// The gateway's own answer to a request whose target is not origin-form (see the
/// [module docs](self)); `None` for a request to proxy.
fn answer_target<B>(req: &Request<B>) -> Option<Response<GatewayBody>> {
    let with_allow = |mut res: Response<GatewayBody>| {
        res.headers_mut()
            .insert(ALLOW_HEADER, HeaderValue::from_static(ALLOW));
        res
    };
    if req.method() == Method::CONNECT {
        let res = refuse(Refusal::Method, "CONNECT is not supported\n");
        return Some(with_allow(res));
    }
    if is_origin_form(req.uri()) {
        return None;
    }
    if req.method() == Method::OPTIONS && req.uri() == "*" {
        return Some(with_allow(local_response(StatusCode::OK, "")));
    }
    // The target's form and path, never the whole target: an absolute-form target can
    // carry credentials in its authority (`http://user:password@host/`), and a query
    // anything.
    tracing::debug!(
        form = target_form(req.uri()),
        path = req.uri().path(),
        method = %req.method(),
        "request target refused"
    );
    Some(refuse(
        Refusal::BadTarget,
        "the request target must be a path\n",
    ))
}

/// The gateway's own answer to a request by its method; `None` for a request to proxy
/// (the [module docs](self) have the table; `CONNECT` is [`answer_target`]'s, `405`):
///
/// - `TRACE`: `405`. A proxy that relays it lets the backend echo the request, cookies
///   and credentials (and the gateway's forwarding headers) included, into a body that
///   a script can read (cross-site tracing); hardened proxies refuse it.
/// - `OPTIONS` with `Max-Forwards` (RFC 9110 §7.6.2): `0` makes the gateway the last
///   recipient, which answers itself (`200` with `Allow`); a greater value is forwarded
///   one less (in `req`); a value that is not one number is `400`. Other methods'
///   `Max-Forwards` is left alone, as the RFC allows.
/// - a method not in [`ALLOW`]: `501` (RFC 9110 §15.6.2: the method is not recognized
///   or not supported). Forwarded, a method the backend does not implement got its
///   `501`, and a client chooses the method of every request it sends.
///
/// The refusals carry `Allow`.
fn answer_method<B>(req: &mut Request<B>) -> Option<Response<GatewayBody>> {
    let with_allow = |mut res: Response<GatewayBody>| {
        res.headers_mut()
            .insert(ALLOW_HEADER, HeaderValue::from_static(ALLOW));
        Some(res)
    };
    if req.method() == Method::TRACE {
        let res = refuse(Refusal::Method, "TRACE is not supported\n");
        return with_allow(res);
    }
    if req.method() == Method::OPTIONS {
        let mut values = req.headers().get_all(MAX_FORWARDS).iter();
        let max_forwards = match (values.next(), values.next()) {
            (None, _) => return None,
            (Some(value), None) => max_forwards(value),
            (Some(_), Some(_)) => None,
        };
        return match max_forwards {
            Some(0) => with_allow(local_response(StatusCode::OK, "")),
            Some(n) => {
                req.headers_mut()
                    .insert(MAX_FORWARDS, HeaderValue::from(n - 1));
                None
            }
            None => {
                tracing::debug!("Max-Forwards refused");
                Some(refuse(Refusal::MaxForwards, "bad Max-Forwards\n"))
            }
        };
    }
    if ALLOWED.contains(req.method()) {
        return None;
    }
    tracing::debug!(method = %req.method(), "method not implemented");
    let res = refuse(Refusal::UnknownMethod, "method not implemented\n");
    with_allow(res)
}

/// A `Max-Forwards` value (`1*DIGIT`, RFC 9110 §7.6.2; one past `u64::MAX` is taken as
/// that), or `None`.
fn max_forwards(value: &HeaderValue) -> Option<u64> {
    let digits = value.to_str().ok()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits.parse().unwrap_or(u64::MAX))
}

/// One backend's HTTP client, with a response timeout (a hung backend is a failure,
/// not a cancellation, so its breaker counts it). The request body goes through a
/// [`ClientBody`]: its errors, and a timeout while the gateway waits on the client's
/// body, are [`ClientBodyError`]s.
///
/// The response timeout bounds the backend's own time: the call's time less the time
/// spent waiting on the client's body ([`Progress::client_time`]). It first fires at
/// `timeout` from the call (the body's own deadline too); if the gateway is not waiting
/// on the client then, it is re-armed for what is left of the backend's `timeout`, until
/// that is spent (`504`, the backend's failure). One deadline for both once made a body
/// finished just before it leave the backend the milliseconds that remained, and the
/// backend's breaker count the client's slowness as the backend's failure. A call lasts
/// at most some twice `timeout`: the client's waits end at the body's deadline.
///
/// With [`watch_probes`](Self::watch_probes), a call made while the backend's breaker is
/// half-open (the breaker's probe) that still waits on the client's body shortly before
/// the breaker's probe timeout, or whose backend the client's body has left too little
/// of the probe's time, ends then as a stalled body (`408`), so that the breaker hears
/// "ignore" before it would count the probe as failed (see [`crate::client_body`]).
///
/// With [`record_latency`](Self::record_latency), it gives the adaptive controller one
/// latency sample per call that did not fail on the client's body
/// ([`is_backend_sample`]): the call's time less the time spent waiting on that body.
#[derive(Clone, Debug)]
pub struct Upstream {
    client: Client<WriteTimeout<HttpConnector>, GatewayBody>,
    timeout: Duration,
    probes: Option<ProbeWatch>,
    latency: Option<AdaptiveHandle>,
}

/// How [`Upstream`] tells its breaker's probes and when it gives up on their bodies.
#[derive(Clone, Debug)]
struct ProbeWatch {
    breaker: CircuitHandle,
    window: ProbeWindow,
}

/// A probe's time as the breaker gives it, from the call.
#[derive(Clone, Copy, Debug)]
struct ProbeWindow {
    /// When a probe still in flight is checked: one waiting on the client's body ends
    /// as a stall, and so does one whose backend has had too little of its own time
    /// ([`shortchanged`](Self::shortchanged)).
    stall_after: Duration,
    /// From `stall_after` to the breaker's probe timeout.
    margin: Duration,
}

impl ProbeWindow {
    /// Whether a probe waiting on the backend at `stall_after`, whose backend has had
    /// `backend` of its own time by then, would be counted failed by the breaker with
    /// less of its own time than a probe of a client that sent its body at once has:
    /// `stall_after` (up to `margin` more), or the response `timeout` if shorter. The
    /// client's waits took the rest of the window, and the probe ends as a stall, which
    /// the breaker ignores, rather than as the backend's failure at the probe timeout.
    fn shortchanged(self, backend: Duration, timeout: Duration) -> bool {
        backend.saturating_add(self.margin) < self.stall_after.min(timeout)
    }
}

/// The most a backend connection's read buffer holds (hyper's client `max_buf_size`):
/// 64 KiB, so also the largest answer head a backend may send (a larger one fails the
/// call: `502`, `failed`). Four times the 16 KiB of a client's request head, so that a
/// backend echoing request headers into its answer stays within it; Envoy's default
/// limit on answer heads is 60 KiB, HAProxy's buffer 16 KiB, nginx's 4 or 8 KiB.
///
/// hyper's default, some 400 KiB, was filled by a client asking for a large answer and
/// reading none of it, and the server side queued a frame as large to it: some 1 MB of
/// the gateway's memory for each such client, 9.4 GB for the 9,936 connections of the
/// cap. Measured with the release binary, 40 such clients (`SO_RCVBUF` 4096, a 200 MB
/// answer each; the reviewer's `t13.py`) took its RSS from 5.6 MB to 45 MB, some
/// 990 KB each; with 64 KiB to 15 MB, some 240 KB each (16 KiB: 9.7 MB, some 100 KB
/// each; a client idle on a keep-alive connection holds some 19 KB). The test
/// `a_client_not_reading_a_large_answer_holds_a_bounded_share_of_the_gateways_memory`
/// keeps it under 500 KB.
pub const BACKEND_MAX_BUF_SIZE: usize = 64 * 1024;

/// The most time left between a probe's stall answer and the breaker's probe timeout:
/// the answer must reach the breaker before its timer counts the probe as failed, and
/// a timer may fire late on a loaded machine.
pub const PROBE_STALL_MARGIN: Duration = Duration::from_secs(1);

impl Upstream {
    /// A pooled client; connects within `connect_timeout`, answers within `timeout`,
    /// closes a connection whose writes wait on the backend for longer than `timeout`
    /// ([`WriteTimeout`]), and one idle in the pool for longer than `idle_timeout`
    /// (zero: none is kept, each call connects anew). The gateway's
    /// `backend_idle_timeout` says why it is short.
    pub fn new(connect_timeout: Duration, timeout: Duration, idle_timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(connect_timeout));
        connector.set_nodelay(true);
        let mut builder = Client::builder(hyper_util::rt::TokioExecutor::new());
        builder
            .pool_idle_timeout(idle_timeout)
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .http1_max_buf_size(BACKEND_MAX_BUF_SIZE);
        if idle_timeout.is_zero() {
            builder.pool_max_idle_per_host(0);
        }
        let client = builder.build(WriteTimeout::new(connector, timeout));
        Self {
            client,
            timeout,
            probes: None,
            latency: None,
        }
    }

    /// Records the backend's latency of each call into `control`'s window: from the
    /// call to the response head, less the time the gateway waited on the client's body
    /// ([`Progress::client_time`](crate::client_body::Progress::client_time)).
    ///
    /// Measured here, below the breaker, rather than by an `Adaptive` layer around the
    /// proxy: that one timed each request from the call, so a client sending its body
    /// slowly made a sample of its own upload time, and a few such clients could push
    /// the P95 over the target and have every client's rate cut.
    ///
    /// A request carrying a [`SampleKey`] (every one the gateway serves) is its
    /// client's sample ([`AdaptiveHandle::record_keyed`]): the controller lowers the
    /// rate only on a tail that stays over the target without the client holding the
    /// most of it. Counted as anyone's, one client asking over and over for a URL the
    /// backend is slow at made the slowest 5 % by itself (a reviewer: 4 keep-alive
    /// connections on a 0.7 s URL took the rate from 20 to 2.15/s in 20 s, and another
    /// client opening 8 connections a second was refused 6 of them a second).
    pub fn record_latency(mut self, control: AdaptiveHandle) -> Self {
        self.latency = Some(control);
        self
    }

    /// Watches the half-open probes of `breaker`, the breaker this client is wrapped in,
    /// whose probe timeout is `probe_timeout`: a probe still waiting on the client's
    /// body a fifth of `probe_timeout` (at most [`PROBE_STALL_MARGIN`]) before it ends
    /// as a stalled body, which the breaker ignores. A probe waiting on the backend then
    /// ends so too if the backend would reach the probe timeout with less of its own
    /// time than that check's (or the response timeout, if shorter): the client's body
    /// took the rest (a body finished just before the check once left the backend the
    /// margin alone, and the breaker re-opened on the client's account). Otherwise it
    /// goes on, and the breaker counts it failed at its probe timeout: the backend had
    /// its time.
    ///
    /// Without this, a client slow to send the body of the request that became the
    /// probe kept the probe in flight past the probe timeout, and the breaker re-opened
    /// the circuit on the client's account, for as long as that client kept doing so.
    /// ([`Proxy`] now reads a probe's body before the call; this stays for a probe
    /// whose body streams all the same.)
    pub fn watch_probes(mut self, breaker: CircuitHandle, probe_timeout: Duration) -> Self {
        let margin = (probe_timeout / 5).min(PROBE_STALL_MARGIN);
        self.probes = Some(ProbeWatch {
            breaker,
            window: ProbeWindow {
                stall_after: probe_timeout.saturating_sub(margin),
                margin,
            },
        });
        self
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The client a request's latency sample is counted for, a request extension:
/// the client address's [`ClientKey`] as the rate limiter keys it ([`KeyBy::default`]:
/// an IPv6 client by its `/64`, so that it cannot spread its samples over its
/// addresses). See [`Upstream::record_latency`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SampleKey(pub ClientKey);

impl SampleKey {
    /// Puts `client`'s key on each request.
    pub fn of<B>(client: IpAddr) -> impl Fn(Request<B>) -> Request<B> + Clone {
        let key = Self(KeyBy::default().key(client));
        move |mut req| {
            req.extensions_mut().insert(key);
            req
        }
    }
}

impl Service<Request<GatewayBody>> for Upstream {
    type Response = Response<BackendBody>;
    type Error = BoxError;
    type Future = BoxFuture<Result<Response<BackendBody>, BoxError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<GatewayBody>) -> Self::Future {
        let start = Instant::now();
        let timeout = self.timeout;
        let until = deadline(start, timeout);
        // The body's own deadline: the response timeout ends at the response head, and
        // hyper goes on sending the body after it (see `crate::client_body`).
        let (parts, body) = req.into_parts();
        let client = parts.extensions.get::<SampleKey>().copied();
        // `to_backend` made the authority of a `SocketAddr`.
        let addr = parts
            .uri
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok());
        let (body, progress) = ClientBody::new(body, until);
        let mut req = Request::from_parts(parts, body.boxed_unsync());
        // The connection the request goes on, to be kept from reuse after a `204` that
        // says it has a body ([`NoContentBody`]) or an answer with both a
        // `Content-Length` and a `Transfer-Encoding`.
        let conn = capture_connection(&mut req);
        // The breaker admitted this call just now (`oneshot`: `poll_ready`, then `call`),
        // and a half-open breaker admits only probes (a forced state reads as itself).
        // A call lasts at most twice the timeout: the client's waits end at `until`, the
        // backend's own time at `timeout`.
        let probe = self
            .probes
            .as_ref()
            .filter(|p| p.window.stall_after < timeout.saturating_mul(2))
            .filter(|p| p.breaker.state() == CircuitState::HalfOpen)
            .map(|p| p.window);
        // Before the pool hands out a connection: one opened before it was reused.
        let sent = stamp();
        let res = self.client.request(req);
        let latency = self.latency.clone();
        // The breaker this client is wrapped in judges the answer's body too, in the
        // state it admitted the call in (just now, see above): a body's outcome after
        // the circuit changed state is one of an earlier state (`crate::backend_body`).
        let breaker = self
            .probes
            .as_ref()
            .map(|p| (p.breaker.clone(), p.breaker.mark()));
        Box::pin(async move {
            let res: Result<Response<Incoming>, BoxError> = async {
                let mut res = std::pin::pin!(res);
                // The probe's check, until it has run: its window and when.
                let mut check = probe.map(|p| (p, deadline(start, p.stall_after)));
                let mut at = until;
                loop {
                    let next = check.map_or(at, |(_, c)| c.min(at));
                    let elapsed = match tokio::time::timeout_at(next, &mut res).await {
                        Ok(res) => {
                            return res.map_err(|e| upstream_error(e, addr, &progress, sent));
                        }
                        Err(_) if progress.waiting_on_client() => {
                            return Err(ClientBodyError::stalled().into());
                        }
                        Err(elapsed) => elapsed,
                    };
                    let now = Instant::now();
                    let backend = backend_time(start, now, &progress);
                    if let Some((p, c)) = check
                        && now >= c
                    {
                        check = None;
                        if p.shortchanged(backend, timeout) {
                            tracing::debug!(
                                ?backend,
                                "the client's body took the probe's time: ended as a stall"
                            );
                            return Err(ClientBodyError::stalled().into());
                        }
                    }
                    if now >= at {
                        // Waiting on the backend: its own time, less the client's, is
                        // what the timeout bounds.
                        match timeout.checked_sub(backend).filter(|left| !left.is_zero()) {
                            Some(left) => at = deadline(now, left),
                            None => return Err(elapsed.into()),
                        }
                    }
                }
            }
            .await;
            if let Some(latency) = latency
                && is_backend_sample(res.as_ref().map_err(|e| &**e as &(dyn Error + 'static)))
            {
                let backend = backend_time(start, Instant::now(), &progress);
                match client {
                    Some(SampleKey(client)) => latency.record_keyed(&client, backend),
                    None => latency.record(backend),
                }
            }
            // An answer in a transfer coding the gateway does not implement is the
            // backend's failure: the breaker counts the error, and the client gets
            // `502` (hyper undoes the chunked framing alone, and the other codings'
            // bytes would reach the client as the body with nothing saying so). So is a
            // `1xx` as the final answer ([`InformationalAnswer`]), and a `204` that says
            // it has a body ([`NoContentBody`]), whose connection is not to be reused:
            // the body may follow on it, and be read as the next request's answer. An
            // answer with both a `Content-Length` and a `Transfer-Encoding` (RFC 9112
            // §6.3: a sign of response splitting) is relayed, framed by the coding and
            // its length removed (`from_backend`), but its connection is not reused
            // either: the bytes its length says past the chunked body may follow on it
            // in the same way.
            let poison = || {
                if let Some(connected) = conn.connection_metadata().as_ref() {
                    connected.poison();
                }
            };
            let res = match res {
                Ok(answer) if answer.status().is_informational() => {
                    Err(InformationalAnswer(answer.status()).into())
                }
                Ok(answer) if NoContentBody::says_so(&answer) => {
                    poison();
                    Err(NoContentBody.into())
                }
                Ok(answer) => {
                    let headers = answer.headers();
                    if headers.contains_key(CONTENT_LENGTH)
                        && headers.contains_key(TRANSFER_ENCODING)
                    {
                        poison();
                    }
                    match check_transfer_coding(headers) {
                        Ok(()) => Ok(answer),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(e) => Err(e),
            };
            // The body's failure is the backend's too (`crate::backend_body`).
            res.map(|answer| {
                let verdict = match status_outcome(answer.status()) {
                    Outcome::Success => Verdict::Pending,
                    Outcome::Ignore => Verdict::FailOnly,
                    Outcome::Failure => Verdict::Done,
                };
                answer.map(|body| BackendBody::new(body, progress, breaker, verdict, timeout))
            })
        })
    }
}

/// `err`, a failed call of a backend's client: an [`UploadCut`] when the connection
/// failed after hyper began sending the request body and before it had all of it
/// ([`Progress::upload_unfinished`]; not a connect, which fails before any of it), which
/// the breaker ignores (the client's slow or refused upload, see
/// [`crate::client_body`]); a [`StaleConnection`] when a reused connection was closed
/// before any byte of the answer ([`is_stale`]; `sent`: the call's [`stamp`]), which
/// the breaker ignores too; otherwise as [`local_resources`] has it.
fn upstream_error(
    err: hyper_util::client::legacy::Error,
    addr: Option<SocketAddr>,
    progress: &Progress,
    sent: u64,
) -> BoxError {
    if !err.is_connect() && progress.upload_unfinished() {
        tracing::debug!(error = %err, "backend connection failed before the request body was all sent");
        return UploadCut::new(err.into()).into();
    }
    if is_stale(&err, sent) {
        tracing::debug!(error = %err, "backend closed a reused connection before answering");
        return StaleConnection(err).into();
    }
    local_resources(err, addr)
}

/// Whether `err`, a failed call of a backend's client made at the [`stamp`] `sent`, is
/// the keep-alive race: the backend closed an idle connection (its own keep-alive
/// timeout) as the pool handed it to the call, and the request crossed the close.
/// hyper-util retries a request it had not begun to send (`Canceled`, on a reused
/// connection), but not one written to the socket: the backend may have read it, so it
/// fails with `SendRequest`. Three things tell the race, and the three together tell it
/// only:
///
/// - the connection was opened before the call (the pool reused it) and has read no byte
///   since ([`ConnUse::unanswered_since`], from the error's `connect_info`): no answer
///   began, so the backend did not start to serve the request (any byte, a partial
///   status line or a `100 Continue`, makes the close the backend's failure);
/// - hyper says the connection ended: the end of the stream before a response
///   (`is_incomplete_message`), a canceled request, or a reset (`ECONNRESET`,
///   `EPIPE`, `ECONNABORTED`, a write to or read from a socket the backend closed with
///   our request unread);
/// - not a connect (which makes a new connection) nor a write stall
///   ([`WriteTimeout`]'s `TimedOut`: the backend stopped reading, its failure).
///
/// A backend that crashes on each request is still counted: the pool drops the
/// connection it broke, and its next calls fail on new ones.
fn is_stale(err: &hyper_util::client::legacy::Error, sent: u64) -> bool {
    if err.is_connect() {
        return false;
    }
    let unanswered = err
        .connect_info()
        .and_then(ConnUse::of)
        .is_some_and(|conn| conn.unanswered_since(sent));
    let closed = find::<hyper::Error>(err)
        .is_some_and(|e| e.is_incomplete_message() || e.is_canceled())
        || find::<std::io::Error>(err).is_some_and(|e| {
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
            )
        });
    unanswered && closed
}

/// A backend closed a reused keep-alive connection before any byte of its answer to the
/// request sent on it ([`is_stale`]): `502` (`stale_connection`), not counted against
/// its breaker.
#[derive(Debug)]
pub struct StaleConnection(hyper_util::client::legacy::Error);

impl std::fmt::Display for StaleConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("backend closed a reused connection before answering")
    }
}

impl Error for StaleConnection {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&self.0)
    }
}

/// A backend's `1xx` as its final answer: hyper's client skips interim `1xx` answers
/// but returns a `101 Switching Protocols`, which the gateway never asks for (`Upgrade`
/// is hop-by-hop and stripped), and relayed it was counted a success by the breaker
/// while the client got a switch to a protocol nobody spoke. [`Upstream`] fails it: the
/// breaker counts it, and the client gets `502` (`informational` in
/// `aegis_http_backend_errors_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InformationalAnswer(pub StatusCode);

impl std::fmt::Display for InformationalAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a final answer with the informational status {}", self.0)
    }
}

impl Error for InformationalAnswer {}

/// A backend's `204 No Content` with a `Transfer-Encoding` (RFC 9112 §6.1: a server
/// must not send one in a `204`) or a `Content-Length` other than `0` (RFC 9110 §8.6:
/// nor that): a body it says it has, which hyper's client does not read (a `204` has
/// none), and which, written after the head, is read as the answer to the next request
/// on the connection. [`Upstream`] fails it and keeps the connection from reuse: the
/// breaker counts it, and the client gets `502` (`no_content_body` in
/// `aegis_http_backend_errors_total`). See the [module docs](self) for `HEAD` and `304`,
/// where no such sign is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NoContentBody;

impl NoContentBody {
    /// Whether `answer` is a `204` that says it has a body.
    fn says_so<B>(answer: &Response<B>) -> bool {
        answer.status() == StatusCode::NO_CONTENT
            && (answer.headers().contains_key(TRANSFER_ENCODING)
                || !matches!(
                    declared_length(answer.headers()),
                    Declared::None | Declared::Length(0)
                ))
    }
}

impl std::fmt::Display for NoContentBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a 204 answer with a Transfer-Encoding or a non-zero Content-Length")
    }
}

impl Error for NoContentBody {}

/// `err`, a failed call of a backend's client, as [`ProxyError::LocalResources`] when
/// connecting to the backend at `addr` failed for lack of this host's descriptors, memory
/// or local ports ([`as_local_resources`]): the breaker's classifier ignores it, and the
/// client gets `503` ([`error_response`]). As hyper-util's error it was the backend's
/// failure: a client that used up the gateway's descriptors (the connection cap now
/// leaves room, see `nofile`) got `502`s counted against every backend, and their
/// circuits stayed open after it left.
fn local_resources(err: hyper_util::client::legacy::Error, addr: Option<SocketAddr>) -> BoxError {
    match addr.and_then(|addr| as_local_resources(&err, addr)) {
        Some(local) => local.into(),
        None => err.into(),
    }
}

/// [`ProxyError::LocalResources`] when `err`, a failed call of a hyper-util client to
/// `addr`, is a connect that failed for lack of this host's descriptors, memory or local
/// ports (`EMFILE`, `ENFILE`, `ENOBUFS`, `ENOMEM`, `EADDRNOTAVAIL`, as
/// [`ProxyError::from_connect`] tells them); `None` for any other failure. The proxy
/// answers it `503` ([`local_resources`]), and the health check leaves the backend's
/// verdict as it was (`crate::health`).
pub fn as_local_resources(
    err: &hyper_util::client::legacy::Error,
    addr: SocketAddr,
) -> Option<ProxyError> {
    if !err.is_connect() {
        return None;
    }
    let io = find::<std::io::Error>(err)?;
    let source = io
        .raw_os_error()
        .map_or_else(|| io.kind().into(), std::io::Error::from_raw_os_error);
    match ProxyError::from_connect(addr, source) {
        local @ ProxyError::LocalResources { .. } => Some(local),
        _ => None,
    }
}

/// The backend's own time of a call made at `start`, up to `now`: the call's time less
/// the time the gateway waited on the client's body.
fn backend_time(start: Instant, now: Instant, progress: &Progress) -> Duration {
    now.saturating_duration_since(start)
        .saturating_sub(progress.client_time(now))
}

/// Whether a finished call to a backend is a latency sample of the backend: its
/// answer, whatever the status, and its response timeout (`504`: the sample is the
/// timeout, a hung backend's true latency being longer); not a failure of the client's
/// body ([`ClientBodyError`]: `400`, `408`, `413`), nor another upstream failure
/// (`502`): a refused or reset connection ends in well under a millisecond, and such
/// samples would pull the P95 down, and the rates up, while a backend fails (the
/// breaker counts those). A call the breaker refused never reaches [`Upstream`].
pub fn is_backend_sample<T>(result: Result<&T, &(dyn Error + 'static)>) -> bool {
    match result {
        Ok(_) => true,
        Err(e) => find::<ClientBodyError>(e).is_none() && find::<Elapsed>(e).is_some(),
    }
}

/// The breaker's classifier: a failure is only what shows the backend, not the request,
/// failing:
///
/// - **failures**: upstream errors as [`classify_error`] counts them (refused, reset,
///   the response timeout's `504`, an answer in a transfer coding the gateway does not
///   implement: [`check_transfer_coding`], and a `1xx` final answer:
///   [`InformationalAnswer`], and a `204` that says it has a body: [`NoContentBody`],
///   errors of [`Upstream`]), and the backend's
///   own `502`, `503` and `504` (it is down, overloaded, or a proxy whose upstream is);
///   not a connect that failed for lack of the gateway's own descriptors or memory
///   ([`ProxyError::LocalResources`], which [`classify_error`] ignores);
/// - **ignored**: any other `5xx`, `500`, `501` and `505` among them: the URL, the method
///   and the version are the client's to choose, and an application answers `500` to a
///   URL whose handler fails, a stock server `501` to a method it does not implement
///   (RFC 9110 §15.6.2), `505` to a version: counted, as `HttpClassifier` counts every
///   `5xx` but `501` and `505`, five such requests from one client opened the backend's
///   circuit for every client. Ignored too, a [`ClientBodyError`] (a request body that
///   was malformed, cut off, over the size limit, or stalled): the client's fault; an
///   [`UploadCut`] (the backend's connection failed while the body was still being
///   sent: the client's slow upload, or the backend's early refusal of it), and a
///   [`StaleConnection`] (a reused keep-alive connection the backend closed before any
///   byte of its answer: the keep-alive race, see [`is_stale`]);
/// - **successes**: every other answer; an answer with a body, once the body ends (its
///   head is ignored, and the body records the success on the breaker, a failure if the
///   backend cuts it off, and nothing if its client drops it or the circuit changed
///   state since the call: [`crate::backend_body`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct GatewayClassifier;

impl Classify<Response<BackendBody>> for GatewayClassifier {
    fn classify(&self, result: Result<&Response<BackendBody>, &(dyn Error + 'static)>) -> Outcome {
        match result {
            Err(e) if find::<ClientBodyError>(e).is_some() => Outcome::Ignore,
            Err(e) if find::<UploadCut>(e).is_some() => Outcome::Ignore,
            Err(e) if find::<StaleConnection>(e).is_some() => Outcome::Ignore,
            Err(e) => classify_error(e),
            Ok(res) if res.body().is_pending() => Outcome::Ignore,
            Ok(res) => status_outcome(res.status()),
        }
    }
}

/// The breaker's outcome of an answer with `status` ([`GatewayClassifier`]).
fn status_outcome(status: StatusCode) -> Outcome {
    match status {
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
            Outcome::Failure
        }
        status if status.is_server_error() => Outcome::Ignore,
        _ => Outcome::Success,
    }
}

/// A backend as the proxy calls it.
pub type Backend = CircuitBreaker<Upstream, GatewayClassifier>;

/// Proxies each request to a backend the pool picks. See the [module docs](self).
#[derive(Clone, Debug)]
pub struct Proxy {
    pool: Arc<Pool>,
    backends: Arc<[Backend]>,
    body_timeout: Duration,
}

impl Proxy {
    /// Proxies to `backends`, in the pool's order. The body of a request that would be
    /// a half-open breaker's probe must be in within `body_timeout` (the gateway's
    /// `backend_timeout`): it is read before the call (see the [module docs](self)).
    pub fn new(pool: Arc<Pool>, backends: Vec<Backend>, body_timeout: Duration) -> Self {
        assert_eq!(
            pool.members().len(),
            backends.len(),
            "one backend per pool member"
        );
        Self {
            pool,
            backends: backends.into(),
            body_timeout,
        }
    }

    /// Sends `req` to backend `i` through its breaker; every failure is answered.
    fn forward<B>(
        &self,
        i: usize,
        req: Request<B>,
    ) -> BoxFuture<Result<Response<GatewayBody>, BoxError>>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let backend = self.backends[i].clone();
        let req = match to_backend(req, self.pool.members()[i].addr) {
            Ok(req) => req,
            Err(e) => {
                tracing::debug!(error = %e, "backend URI refused");
                let res = refuse(Refusal::BadTarget, "bad request target\n");
                return Box::pin(std::future::ready(Ok(res)));
            }
        };
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

    /// [`forward`](Self::forward)s `req`, picked for backend `i` whose breaker is
    /// half-open, once its body is in (within `body_timeout`; over the body limit,
    /// `413`), so that it takes the probe permit only then; to another backend if the
    /// permit was taken (or the circuit re-opened) meanwhile: nothing was sent yet.
    async fn forward_probe<B>(
        self,
        i: usize,
        req: Request<B>,
    ) -> Result<Response<GatewayBody>, BoxError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        let body = match tokio::time::timeout(self.body_timeout, body.collect()).await {
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(e)) => return Ok(error_response(&ClientBodyError::failed(e.into()))),
            Err(_) => return Ok(error_response(&ClientBodyError::stalled())),
        };
        let req = Request::from_parts(parts, Full::new(body));
        let i = if self.pool.members()[i].breaker.would_admit() {
            i
        } else {
            let Some(i) = self.pool.pick(Instant::now()) else {
                let res = backend_error(BackendError::NoBackend, "no backend available\n");
                return Ok(res);
            };
            i
        };
        self.forward(i, req).await
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

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(res) = answer_target(&req).or_else(|| answer_method(&mut req)) {
            return Box::pin(std::future::ready(Ok(res)));
        }
        let Some(i) = self.pool.pick(Instant::now()) else {
            let res = backend_error(BackendError::NoBackend, "no backend available\n");
            return Box::pin(std::future::ready(Ok(res)));
        };
        if self.pool.members()[i].breaker.state() == CircuitState::HalfOpen
            && !req.body().is_end_stream()
        {
            return Box::pin(self.clone().forward_probe(i, req));
        }
        self.forward(i, req)
    }
}

/// The request as sent to `addr`: absolute `http://addr/path?query` URI (the client's
/// `Host` header is kept), HTTP/1.1, without `Expect`, the body boxed. Fails, rather
/// than sending the request anywhere else, if its target is not origin-form or the URI
/// does not build.
///
/// `Expect` is removed: the gateway has answered a `100-continue` itself and sends the
/// body at once, and a backend told to expect it only on its word may answer early and
/// read the body as its next request (request smuggling; see the [module docs](self)).
///
/// A body of unknown length (the client's was chunked; its `Transfer-Encoding` is
/// hop-by-hop and was stripped) is sent with `Transfer-Encoding: chunked` set here:
/// without either framing header, hyper's client sends a `GET`, `HEAD` or `CONNECT`
/// request with no body at all, and the client's body was silently dropped.
fn to_backend<B>(req: Request<B>, addr: SocketAddr) -> Result<Request<GatewayBody>, BoxError>
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let (mut parts, body) = req.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .filter(|_| is_origin_form(&parts.uri))
        .cloned()
        .ok_or("the request target is not origin-form")?;
    parts.uri = Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(addr.to_string())
        .path_and_query(target)
        .build()?;
    parts.version = Version::HTTP_11;
    parts.headers.remove(EXPECT);
    if !body.is_end_stream() && body.size_hint().exact().is_none() {
        parts
            .headers
            .insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
    }
    Ok(Request::from_parts(
        parts,
        body.map_err(Into::into).boxed_unsync(),
    ))
}

/// The backend's answer as relayed: hop-by-hop headers removed, HTTP/1.1 (the
/// backend's version is its own hop's), the body boxed.
///
/// A `Content-Length` beside a `Transfer-Encoding` is removed too (RFC 9112 §6.3: an
/// intermediary must): hyper's client frames such a body by the transfer coding and
/// leaves both headers, and once the stripping took the `Transfer-Encoding`, hyper's
/// server sent the body with the stale length, cutting a longer one short. The
/// connection such an answer came on is not reused ([`Upstream`] marks it): the bytes
/// the length says past the chunked body may follow on it (the module docs, "any bytes
/// past an answer's framing").
/// (An answer with a `Transfer-Encoding` other than one `chunked` never comes here:
/// [`Upstream`] fails it, and the client gets `502`.) The body is a [`BackendBody`]: a
/// failure of it is the backend's ([`crate::backend_body`]).
///
/// Otherwise `Content-Length` is left one line of one value ([`one_content_length`]):
/// hyper's client takes several lines (or a list) of the same length, and relayed as
/// they came, hyper's server could not encode the answer to a `HEAD` ("user sent
/// unexpected header"), and the client got no answer at all, its connection closed.
///
/// An answer that comes before the client's request body has gone out whole (an early
/// `401` or `413`, say) gets `Connection: close`: once it is over, the rest of the
/// client's body is dropped unread and the connection closed ([`crate::client_body`]).
fn from_backend(res: Response<BackendBody>) -> Response<GatewayBody> {
    let (mut parts, body) = res.into_parts();
    if parts.headers.contains_key(TRANSFER_ENCODING) {
        parts.headers.remove(CONTENT_LENGTH);
    } else {
        one_content_length(&mut parts.headers);
    }
    strip_hop_by_hop(&mut parts.headers);
    if !body.request_sent() {
        // An answer before the client's body went out whole: the rest of that body is
        // dropped unread once the answer is over, and the connection closed after it
        // (`crate::client_body`); the client is told so with the answer.
        parts
            .headers
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    parts.version = Version::HTTP_11; // hyper answers a 1.0 client in 1.0 itself
    Response::from_parts(parts, body.map_err(BoxError::from).boxed_unsync())
}

/// What a message's `Content-Length` says ([`declared_length`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Declared {
    /// No `Content-Length`.
    None,
    /// Every line and every comma-separated value of it is this number.
    Length(u64),
    /// A value that is no number, or two that differ.
    Invalid,
}

/// What `headers`' `Content-Length` says: one number however many lines and
/// comma-separated values repeat it (RFC 9110 §8.6 lets a recipient take such a list as
/// the one value; hyper's client does), [`Declared::Invalid`] if they differ or one is
/// not `1*DIGIT`.
fn declared_length(headers: &HeaderMap) -> Declared {
    let mut declared = Declared::None;
    for value in headers
        .get_all(CONTENT_LENGTH)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
    {
        let digits = value.trim_ascii();
        let len = std::str::from_utf8(digits)
            .ok()
            .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|d| d.parse::<u64>().ok());
        declared = match (declared, len) {
            (Declared::None, Some(len)) => Declared::Length(len),
            (Declared::Length(prev), Some(len)) if prev == len => declared,
            _ => return Declared::Invalid,
        };
    }
    declared
}

/// Leaves the `Content-Length` of a backend's answer one line of one value: the length
/// that every line and value of it says ([`declared_length`]; hyper's client checked it
/// for an answer with a body, and framed the body by it), or none when they differ or
/// one is no number (which hyper's client lets through only where the answer has no
/// body: a `HEAD`'s, a `204`'s or a `304`'s, where the length says nothing the client
/// needs). hyper's server relays the lines as they are, and a `HEAD`'s answer with two
/// it failed to encode: the client got no answer.
fn one_content_length(headers: &mut HeaderMap) {
    match declared_length(headers) {
        Declared::None => {}
        Declared::Length(len) => {
            headers.insert(CONTENT_LENGTH, HeaderValue::from(len));
        }
        Declared::Invalid => {
            headers.remove(CONTENT_LENGTH);
        }
    }
}

fn error_response(err: &(dyn Error + 'static)) -> Response<GatewayBody> {
    if find::<CircuitOpen>(err).is_some() {
        return backend_error(BackendError::BreakerOpen, "backend unavailable\n");
    }
    if find::<LengthLimitError>(err).is_some() {
        return refuse(Refusal::BodyTooLarge, "request body too large\n");
    }
    if let Some(e) = find::<ClientBodyError>(err) {
        tracing::debug!(error = %err, "request body failed");
        return if e.is_stall() {
            refuse(Refusal::BodyStall, "request body too slow\n")
        } else {
            refuse(Refusal::BadBody, "bad request body\n")
        };
    }
    if find::<UploadCut>(err).is_some() {
        return backend_error(BackendError::DuringUpload, "backend failed\n");
    }
    if find::<StaleConnection>(err).is_some() {
        return backend_error(BackendError::StaleConnection, "backend failed\n");
    }
    if find::<tokio::time::error::Elapsed>(err).is_some() {
        return backend_error(BackendError::Timeout, "backend timed out\n");
    }
    if let Some(e @ ProxyError::LocalResources { .. }) = find::<ProxyError>(err) {
        tracing::debug!(error = %e, "backend connect failed: the gateway is out of resources");
        return backend_error(BackendError::LocalResources, "gateway out of resources\n");
    }
    tracing::debug!(error = %err, "backend failed");
    let why = if find::<UnknownCoding>(err).is_some() {
        BackendError::TransferCoding
    } else if find::<InformationalAnswer>(err).is_some() {
        BackendError::Informational
    } else if find::<NoContentBody>(err).is_some() {
        BackendError::NoContentBody
    } else if find::<hyper_util::client::legacy::Error>(err).is_some_and(|e| e.is_connect()) {
        BackendError::Connect
    } else {
        BackendError::Failed
    };
    backend_error(why, "backend failed\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refused target was once logged whole, credentials in its authority included.
    ///
    /// The subscriber is this thread's only: the events of the tests running in parallel
    /// do not reach it (`capture_logs` also keeps tracing's interest cache from hiding the
    /// callsite from it).
    #[test]
    fn a_refused_target_is_logged_without_its_userinfo_or_query() {
        let refused = |target: &str| {
            let req = Request::get(target).body(()).unwrap();
            let res = answer_target(&req).expect("answered by the gateway");
            assert_eq!(res.status(), StatusCode::BAD_REQUEST, "{target}");
        };
        let ((), out) = aegis_core::testing::capture_logs(tracing::Level::DEBUG, || {
            refused("http://alice:s3cret@gw.test/private/x?token=t0ps3cret");
            refused("gw.test:443");
        });
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out}");
        assert!(lines[0].contains("request target refused"), "{out}");
        assert!(lines[0].contains("form=\"absolute\""), "{out}");
        assert!(lines[0].contains("path=\"/private/x\""), "{out}");
        assert!(lines[1].contains("form=\"authority\""), "{out}");
        for secret in ["alice", "s3cret", "gw.test", "token"] {
            assert!(!out.contains(secret), "{secret:?} logged: {out}");
        }
    }

    #[test]
    fn a_content_length_repeated_alike_is_one_length_and_any_other_is_invalid() {
        let declared = |lines: &[&str]| {
            let mut headers = HeaderMap::new();
            for line in lines {
                headers.append(CONTENT_LENGTH, HeaderValue::from_str(line).unwrap());
            }
            declared_length(&headers)
        };
        assert_eq!(declared(&[]), Declared::None);
        assert_eq!(declared(&["2"]), Declared::Length(2));
        assert_eq!(declared(&["2", "2"]), Declared::Length(2));
        assert_eq!(declared(&["2, 2", " 2 "]), Declared::Length(2));
        assert_eq!(declared(&["002"]), Declared::Length(2));
        for bad in [&["2", "3"][..], &["2, 3"], &["+2"], &["2,"], &[""], &["x"]] {
            assert_eq!(declared(bad), Declared::Invalid, "{bad:?}");
        }
        assert_eq!(declared(&["18446744073709551616"]), Declared::Invalid);
    }

    #[test]
    fn allow_lists_the_allowed_methods() {
        let names: Vec<&str> = ALLOWED.iter().map(Method::as_str).collect();
        assert_eq!(ALLOW, names.join(", "));
    }

    #[tokio::test]
    async fn the_backends_answers_and_failures_are_latency_samples_the_clients_are_not() {
        let answer = |status| {
            let mut res = Response::new(());
            *res.status_mut() = status;
            res
        };
        for status in [
            StatusCode::OK,
            StatusCode::NOT_FOUND,
            StatusCode::BAD_GATEWAY,
        ] {
            assert!(is_backend_sample(Ok(&answer(status))), "{status}");
        }
        let sample = |e: &(dyn Error + 'static)| is_backend_sample::<()>(Err(e));
        let timeout = tokio::time::timeout(Duration::ZERO, std::future::pending::<()>())
            .await
            .unwrap_err();
        assert!(sample(&timeout), "504");
        assert!(!sample(&std::io::Error::other("refused")), "502");
        assert!(!sample(&ClientBodyError::stalled()), "408");
        let over = http_body_util::Limited::new(Full::new(Bytes::from_static(b"abc")), 1)
            .collect()
            .await
            .unwrap_err();
        assert!(!sample(&ClientBodyError::failed(over)), "413");
        let bad = std::io::Error::other("bad chunk");
        assert!(!sample(&ClientBodyError::failed(bad.into())), "400");
    }
}
