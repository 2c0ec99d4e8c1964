//! What the gateway counts of its own answers (the series are in the table of `main.rs`'s
//! docs).
//!
//! A request the gateway refuses itself is a typed [`Refusal`], counted as the Aegis
//! layers count theirs: `aegis_rejections_total{layer="http", reason}`, the reason its
//! [`Reject::label`], one of a fixed set (never the target, `Host` or any other input).
//! A backend's answer the gateway could not relay, and replaced with its own `502`,
//! `503` or `504`, is a [`BackendError`] in `aegis_http_backend_errors_total{reason}`:
//! the client did nothing wrong there, and the breakers and health checks say which
//! backend failed. So is a backend's answer cut off after its head was relayed
//! ([`BackendError::Truncated`], see [`crate::backend_body`]), or stalled mid-body
//! ([`BackendError::BodyTimeout`]).

use std::fmt;

use aegis_core::error::Reject;
use hyper::{Response, StatusCode};

use crate::proxy::{GatewayBody, local_response};

/// The `layer` label of the gateway's refusals, as `aegis-layers`' `sniff::Http1` labels
/// the refusals of its hyper server.
pub const LAYER: &str = "http";

/// `aegis_http_backend_errors_total{reason}`.
pub const BACKEND_ERRORS_TOTAL: &str = "aegis_http_backend_errors_total";

/// Why the gateway refused a request itself, before or while relaying it: its
/// [`status`](Self::status), and its [`label`](Self::label) in
/// `aegis_rejections_total{layer="http", reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `400`: a request target that is not origin-form (a path), or from which no
    /// backend URI builds.
    BadTarget,
    /// `400`: no `Host` in an HTTP/1.1 request, several, or an invalid one.
    BadHost,
    /// `405`: `CONNECT` (the gateway is no tunnel) or `TRACE` (cross-site tracing).
    Method,
    /// `501`: a method outside the gateway's `Allow` list.
    UnknownMethod,
    /// `400`: an `OPTIONS` request whose `Max-Forwards` is not one number.
    MaxForwards,
    /// `400`: a request body that was malformed or cut off.
    BadBody,
    /// `408`: the request body was still awaited at the backend timeout.
    BodyStall,
    /// `413`: a request body over the limit, declared (`Content-Length`) or streamed.
    BodyTooLarge,
    /// `431`: too many or too large request headers (the gateway's limits, or a request
    /// head past hyper's read buffer).
    HeadersTooLarge,
    /// `501`: a `Transfer-Encoding` other than one `chunked`.
    TransferCoding,
    /// `400`, answered by hyper: a request head that does not parse.
    Parse,
    /// None: the connection's first request head was not in within hyper's header read
    /// timeout, and hyper closed it without an answer (`408` is what the status says).
    HeaderTimeout,
}

impl Refusal {
    /// The stable `reason` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::BadTarget => "bad_target",
            Self::BadHost => "bad_host",
            Self::Method => "method",
            Self::UnknownMethod => "unknown_method",
            Self::MaxForwards => "max_forwards",
            Self::BadBody => "bad_body",
            Self::BodyStall => "body_stall",
            Self::BodyTooLarge => "body_too_large",
            Self::HeadersTooLarge => "headers_too_large",
            Self::TransferCoding => "transfer_coding",
            Self::Parse => "parse",
            Self::HeaderTimeout => "header_timeout",
        }
    }

    /// The status the client gets.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::BadTarget | Self::BadHost | Self::BadBody | Self::Parse | Self::MaxForwards => {
                StatusCode::BAD_REQUEST
            }
            Self::UnknownMethod => StatusCode::NOT_IMPLEMENTED,
            Self::Method => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyStall | Self::HeaderTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::TransferCoding => StatusCode::NOT_IMPLEMENTED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "request refused ({})", self.label())
    }
}

impl std::error::Error for Refusal {}

impl Reject for Refusal {
    fn layer(&self) -> &'static str {
        LAYER
    }

    fn label(&self) -> &'static str {
        Refusal::label(*self)
    }
}

/// Counts `refusal` in `aegis_rejections_total{layer="http", reason}`, the series and
/// labels of [`aegis_core::error::reject`], without its "connection rejected" log: the
/// request is answered, and its connection goes on.
pub fn count(refusal: Refusal) {
    metrics::counter!(
        aegis_core::metrics::REJECTIONS_TOTAL,
        "layer" => refusal.layer(),
        "reason" => refusal.label(),
    )
    .increment(1);
}

/// The gateway's answer to a request it refuses, counted: `refusal`'s status, `text`.
pub fn refuse(refusal: Refusal, text: &'static str) -> Response<GatewayBody> {
    count(refusal);
    local_response(refusal.status(), text)
}

/// Why the gateway answered a request relayed to no backend, or not relayed back, with
/// a `5xx` of its own: its label in `aegis_http_backend_errors_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendError {
    /// `503`: no backend available (all unhealthy, or their breakers open).
    NoBackend,
    /// `503`: the chosen backend's breaker refused the call (it opened, or another
    /// request took its probe permit, between the pick and the call). The breaker
    /// counts it too, in `aegis_rejections_total{layer="circuit_breaker"}`.
    BreakerOpen,
    /// `504`: no answer within the backend timeout.
    Timeout,
    /// `502`: the connection to the backend failed (refused, timed out).
    Connect,
    /// `502`: an answer in a `Transfer-Encoding` other than one `chunked`.
    TransferCoding,
    /// `502`: the connection to the backend failed (closed, reset) while the client's
    /// request body was still being sent; not counted against the backend's breaker (see
    /// `client_body`).
    DuringUpload,
    /// `502`: the backend closed a reused keep-alive connection before any byte of its
    /// answer (the keep-alive race); not counted against the backend's breaker (see
    /// `proxy::is_stale`).
    StaleConnection,
    /// `502`: a `1xx` as the final answer, such as a `101 Switching Protocols` the
    /// gateway never asked for (it strips `Upgrade`).
    Informational,
    /// `502`: a `204` with a `Transfer-Encoding` or a `Content-Length` other than `0`
    /// (a body it must not have, which could reach the next client on the connection:
    /// `proxy::NoContentBody`); the connection is not reused.
    NoContentBody,
    /// `502`: any other failure of the backend (reset, a malformed answer).
    Failed,
    /// `503`: the gateway could not connect for want of its own resources (descriptors,
    /// memory, local ports); not the backend's failure.
    LocalResources,
    /// No answer of the gateway's: the backend's head was relayed, and its body failed
    /// (a close or reset short of its length); the client's connection is closed. Its
    /// breaker counts it ([`crate::backend_body`]). Its [`status`](Self::status), `502`,
    /// is never sent.
    Truncated,
    /// As [`Truncated`](Self::Truncated), after the client held the body back (it stopped
    /// reading for over `backend_body::CLIENT_HOLD_BOUND`): maybe the backend's send
    /// timeout, which the client caused, so its breaker does not count it
    /// ([`crate::backend_body`]).
    TruncatedHeld,
    /// No answer of the gateway's either: the backend's head was relayed, and then it
    /// sent nothing of its body for the backend timeout (a backend that stalls
    /// mid-body); the body is cut there and the client's connection closed, as for
    /// [`Truncated`](Self::Truncated), and its breaker counts a failure
    /// ([`crate::backend_body`]). Its [`status`](Self::status), `504`, is never sent.
    BodyTimeout,
}

impl BackendError {
    /// The stable `reason` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::NoBackend => "no_backend",
            Self::BreakerOpen => "breaker_open",
            Self::Timeout => "timeout",
            Self::Connect => "connect",
            Self::TransferCoding => "transfer_coding",
            Self::DuringUpload => "during_upload",
            Self::StaleConnection => "stale_connection",
            Self::Informational => "informational",
            Self::NoContentBody => "no_content_body",
            Self::Failed => "failed",
            Self::LocalResources => "local_resources",
            Self::Truncated => "truncated",
            Self::TruncatedHeld => "truncated_held",
            Self::BodyTimeout => "body_timeout",
        }
    }

    /// The status the client gets.
    pub const fn status(self) -> StatusCode {
        match self {
            Self::NoBackend | Self::BreakerOpen | Self::LocalResources => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout | Self::BodyTimeout => StatusCode::GATEWAY_TIMEOUT,
            Self::Connect
            | Self::TransferCoding
            | Self::DuringUpload
            | Self::StaleConnection
            | Self::Informational
            | Self::NoContentBody
            | Self::Failed
            | Self::Truncated
            | Self::TruncatedHeld => StatusCode::BAD_GATEWAY,
        }
    }
}

/// The gateway's answer in place of a backend's, counted in
/// `aegis_http_backend_errors_total{reason}`: `error`'s status, `text`.
pub fn backend_error(error: BackendError, text: &'static str) -> Response<GatewayBody> {
    count_backend_error(error);
    local_response(error.status(), text)
}

/// Counts `error` in `aegis_http_backend_errors_total{reason}`.
pub fn count_backend_error(error: BackendError) {
    metrics::counter!(BACKEND_ERRORS_TOTAL, "reason" => error.label()).increment(1);
}
