//! An authenticator that POSTs the credentials as JSON to an HTTP service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use hyper::{HeaderMap, Method, Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower_service::Service;

use super::{AuthError, Credentials, Decision};
use crate::Version;

/// The most of an answer's body read (and ignored), so that its connection can be reused.
const MAX_BODY: usize = 4096;

/// How long an answer's body may take after its head to be read (and ignored) for the
/// connection's reuse. A short body comes with the head, or within a round trip of it.
const DRAIN_TIMEOUT: Duration = Duration::from_millis(100);

/// The default of [`HttpAuth::max_concurrent`]: 32 callouts at once. At 10 ms a callout,
/// 3,200 new credentials a second, enough for the reconnect storm after a restart of a
/// gateway of tens of thousands of clients to fit in a few seconds; and few enough
/// connections that a flood of new passwords does not take the auth service's.
const DEFAULT_MAX_CONCURRENT: usize = 32;

/// Asks an HTTP service: `POST` of the credentials as JSON to a URL; 2xx allows, 401 and
/// 403 deny, anything else is an error. See the [module docs](super#the-http-authenticator)
/// for the request.
///
/// Cheap to clone: clones share one pool of keep-alive connections (a hyper-util
/// `Client` with an `HttpConnector`) and the limit of
/// [`max_concurrent`](Self::max_concurrent) callouts at once. Only `http://` URLs work;
/// `https` is not supported.
///
/// Its `Debug` prints no secret: the values of the [headers](Self::header) are marked
/// sensitive (`Sensitive`), and the URL's user info and query, if any, are left out.
#[derive(Clone)]
pub struct HttpAuth {
    client: Client<HttpConnector, Full<Bytes>>,
    uri: Uri,
    headers: Arc<HeaderMap>,
    /// One permit per callout allowed at once, taken in the call's future (so that the
    /// wait counts toward the layer's timeout).
    permits: Arc<Semaphore>,
}

impl std::fmt::Debug for HttpAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpAuth")
            .field("uri", &Redacted(&self.uri))
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

/// A URL without what may hold a secret: its user info (`user:password@`) and its query
/// (`?token=...`) are printed as `***`.
struct Redacted<'a>(&'a Uri);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = self.0;
        if let Some(scheme) = uri.scheme_str() {
            write!(f, "{scheme}://")?;
        }
        if let Some(authority) = uri.authority() {
            if authority.as_str().contains('@') {
                f.write_str("***@")?;
            }
            f.write_str(authority.host())?;
            if let Some(port) = authority.port() {
                write!(f, ":{port}")?;
            }
        }
        f.write_str(uri.path())?;
        if uri.query().is_some() {
            f.write_str("?***")?;
        }
        Ok(())
    }
}

/// A client whose pool keeps at most `max_idle` idle connections to the service.
fn client(max_idle: usize) -> Client<HttpConnector, Full<Bytes>> {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_max_idle_per_host(max_idle)
        .build(connector)
}

impl HttpAuth {
    /// Posts to `uri` (an `http://` URL), at most 32 callouts at once (see
    /// [`max_concurrent`](Self::max_concurrent)).
    pub fn new(uri: Uri) -> Self {
        Self {
            client: client(DEFAULT_MAX_CONCURRENT),
            uri,
            headers: Arc::new(HeaderMap::new()),
            permits: Arc::new(Semaphore::new(DEFAULT_MAX_CONCURRENT)),
        }
    }

    /// At most `n` callouts at once (at least 1; 32 by default), each on a connection of
    /// its own (a turn lasts until the answer's body is read, at most 100 ms after the
    /// decision), and at most `n` idle connections kept for reuse (hyper-util's pool
    /// otherwise keeps any number, for 90 s). Further checks wait for a turn; behind an
    /// [`AuthLayer`](super::AuthLayer), the wait counts toward its
    /// [`timeout`](super::AuthLayer::timeout). See the
    /// [module docs](super#the-http-authenticator).
    ///
    /// It bounds the gateway's open callouts, not the service's work: a callout the
    /// layer's timeout gives up on closes its connection and frees its turn at once,
    /// while the service may go on with the request it was sent. A service slower than
    /// the timeout can thus have up to `n` new requests each timeout on top of those it
    /// still works on.
    ///
    /// Set it before cloning (and before the first callout): clones share the limit and
    /// the pool they were made with.
    #[must_use]
    pub fn max_concurrent(mut self, n: usize) -> Self {
        let n = n.clamp(1, Semaphore::MAX_PERMITS);
        self.client = client(n);
        self.permits = Arc::new(Semaphore::new(n));
        self
    }

    /// Adds a header to every request, such as `Authorization: Bearer ...` for the
    /// service to know the gateway. Its value is marked sensitive
    /// ([`HeaderValue::set_sensitive`]): `Debug` prints `Sensitive` in its place, here
    /// and in the requests (sent as is).
    #[must_use]
    pub fn header(mut self, name: HeaderName, mut value: HeaderValue) -> Self {
        value.set_sensitive(true);
        Arc::make_mut(&mut self.headers).append(name, value);
        self
    }

    /// The URL posted to.
    pub const fn uri(&self) -> &Uri {
        &self.uri
    }

    fn request(&self, creds: &Credentials) -> Result<Request<Full<Bytes>>, AuthError> {
        let json = serde_json::to_vec(&body(creds)).map_err(|_| AuthError::Invalid("json body"))?;
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(self.uri.clone())
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(json)))
            .map_err(|_| AuthError::Invalid("http request"))?;
        for (name, value) in self.headers.iter() {
            req.headers_mut().append(name, value.clone());
        }
        Ok(req)
    }
}

/// The JSON body of a callout (see the [module docs](super#the-http-authenticator)).
fn body(creds: &Credentials) -> serde_json::Map<String, serde_json::Value> {
    let mut body = serde_json::Map::new();
    body.insert("client_id".into(), creds.client_id.as_ref().into());
    body.insert(
        "username".into(),
        creds
            .username
            .as_deref()
            .map_or(serde_json::Value::Null, Into::into),
    );
    match creds.password.as_deref().map(std::str::from_utf8) {
        None => {
            body.insert("password".into(), serde_json::Value::Null);
        }
        Some(Ok(p)) => {
            body.insert("password".into(), p.into());
        }
        Some(Err(_)) => {
            let hex = creds.password.as_deref().map(hex).unwrap_or_default();
            body.insert("password_hex".into(), hex.into());
        }
    }
    body.insert("client_addr".into(), creds.client_addr.to_string().into());
    let protocol = match creds.version {
        Version::V3_1 => "3.1",
        Version::V3_1_1 => "3.1.1",
        Version::V5 => "5.0",
    };
    body.insert("protocol".into(), protocol.into());
    body
}

/// Lower-case hex of `b`.
fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 0x0F)]));
    }
    s
}

/// The decision a status stands for.
fn decide(status: hyper::StatusCode) -> Result<Decision, AuthError> {
    match status.as_u16() {
        200..=299 => Ok(Decision::Allow),
        401 | 403 => Ok(Decision::Deny),
        s => Err(AuthError::Status(s)),
    }
}

impl Service<Credentials> for HttpAuth {
    type Response = Decision;
    type Error = AuthError;
    type Future = Pin<Box<dyn Future<Output = Result<Decision, AuthError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), AuthError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, creds: Credentials) -> Self::Future {
        let req = self.request(&creds);
        let client = self.client.clone();
        let permits = Arc::clone(&self.permits);
        Box::pin(async move {
            let req = req?;
            // A turn first: a check waiting for one holds no connection, and one dropped
            // meanwhile (the layer's timeout) never sends its request.
            let permit = permits
                .acquire_owned()
                .await
                .map_err(|e| AuthError::Failed(Arc::new(e)))?;
            let res = client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    AuthError::Unavailable(Arc::new(e))
                } else {
                    AuthError::Failed(Arc::new(e))
                }
            })?;
            // The status decides: the body is read off the decision's path, so that a
            // slow one cannot turn the decision into a timeout.
            let decision = decide(res.status());
            let body = res.into_body();
            if !body.is_end_stream() {
                tokio::spawn(drain(body, permit));
            }
            decision
        })
    }
}

/// Reads (and ignores) an answer's body, at most [`MAX_BODY`] bytes within
/// [`DRAIN_TIMEOUT`], so that its connection can be reused; a longer, slower or failed
/// one is dropped, which closes its connection. The callout's turn goes with it: the
/// connection is still the callout's until then.
async fn drain(body: Incoming, permit: OwnedSemaphorePermit) {
    let _permit = permit;
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bearer token given to `header`, or a secret in the URL, never shows in `Debug`
    /// (a log line of the authenticator, or of the stack holding it); the requests
    /// still carry the header.
    #[test]
    fn debug_prints_no_secret() {
        use hyper::header::AUTHORIZATION;
        let auth = HttpAuth::new(Uri::from_static("http://127.0.0.1:1/auth"))
            .header(AUTHORIZATION, HeaderValue::from_static("Bearer s3cret"));
        let debug = format!("{auth:?}");
        assert!(!debug.contains("s3cret"), "{debug}");
        assert!(debug.contains("authorization"), "{debug}");
        assert!(debug.contains("http://127.0.0.1:1/auth"), "{debug}");
        let addr = "192.0.2.1:4000".parse().unwrap();
        let creds = Credentials::new("c1", None, None, addr);
        let req = auth.request(&creds).unwrap();
        assert_eq!(req.headers()[AUTHORIZATION], "Bearer s3cret");
        assert!(!format!("{req:?}").contains("s3cret"));

        let auth = HttpAuth::new(Uri::from_static(
            "http://gw:pa55word@[::1]:8080/auth?token=t0ken",
        ));
        let debug = format!("{auth:?}");
        assert!(!debug.contains("pa55word"), "{debug}");
        assert!(!debug.contains("t0ken"), "{debug}");
        assert!(debug.contains("http://***@[::1]:8080/auth?***"), "{debug}");
    }

    #[test]
    fn statuses() {
        assert_eq!(decide(hyper::StatusCode::OK).unwrap(), Decision::Allow);
        assert_eq!(
            decide(hyper::StatusCode::NO_CONTENT).unwrap(),
            Decision::Allow
        );
        assert_eq!(
            decide(hyper::StatusCode::UNAUTHORIZED).unwrap(),
            Decision::Deny
        );
        assert_eq!(
            decide(hyper::StatusCode::FORBIDDEN).unwrap(),
            Decision::Deny
        );
        let e = decide(hyper::StatusCode::INTERNAL_SERVER_ERROR).unwrap_err();
        assert_eq!(e.label(), "status");
        assert_eq!(
            decide(hyper::StatusCode::FOUND).unwrap_err().label(),
            "status"
        );
    }

    #[test]
    fn body_schema() {
        let addr = "192.0.2.1:4000".parse().unwrap();
        let auth = HttpAuth::new(Uri::from_static("http://127.0.0.1:1/auth"));
        let creds = Credentials::new("c1", Some("alice"), Some(&[0xff, 0x00]), addr)
            .with_version(Version::V5);
        let auth = auth.header(
            hyper::header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t"),
        );
        let req = auth.request(&creds).unwrap();
        assert_eq!(req.method(), Method::POST);
        assert_eq!(req.headers()[CONTENT_TYPE], "application/json");
        assert_eq!(req.headers()[hyper::header::AUTHORIZATION], "Bearer t");
        assert_eq!(
            serde_json::Value::Object(body(&creds)),
            serde_json::json!({"client_id": "c1", "username": "alice", "password_hex": "ff00",
                "client_addr": "192.0.2.1:4000", "protocol": "5.0"})
        );
        let creds = Credentials::new("c2", None, None, addr);
        assert_eq!(
            serde_json::Value::Object(body(&creds)),
            serde_json::json!({"client_id": "c2", "username": null, "password": null,
                "client_addr": "192.0.2.1:4000", "protocol": "3.1.1"})
        );
    }
}
