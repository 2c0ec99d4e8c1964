//! The observability endpoint: `/metrics`, `/healthz` and `/readyz` over HTTP/1.1.
//!
//! A small hyper 1 server, bounded like everything else the gateway exposes (see
//! [`crate::metrics_endpoint`], shared with the `http-gateway`): at most
//! [`MAX_CONNECTIONS`] connections at once, [`MAX_PER_ADDRESS`] of them from one client
//! network (an address keyed by `limits.ipv4_prefix` and `limits.ipv6_prefix` as the
//! rate limits key it: an IPv6 client by its /64 by default, since it can send from any
//! address in it; more are reset at accept, so that one client holding idle
//! connections cannot starve the scraper and the probes), [`HEADER_TIMEOUT`] to send
//! the request headers, [`CONNECTION_TIMEOUT`] in all, no keep-alive. It binds to
//! loopback by default. The connections it resets are counted in
//! `aegis_rejections_total{layer="metrics_endpoint"}`, `reason="concurrency"` over a
//! client network's share and `reason="over_capacity"` over the endpoint's cap.
//!
//! The caps bound what the endpoint costs, not who may use it: four client networks
//! ([`MAX_CONNECTIONS`] / [`MAX_PER_ADDRESS`]) that each hold their share, opening a new
//! connection as each is cut, take every connection, and the scraper's and the health
//! probes' are then reset at accept for as long as they keep at it. The per-network cap
//! protects against one client, not several: beyond loopback, `metrics.listen` must be
//! an address on a network the MQTT clients cannot reach (or behind a firewall that
//! admits only the scraper and the probes), not a wildcard on a host they reach.
//!
//! - `/metrics`: the Prometheus text format, rendered from the global recorder
//!   (`metrics-exporter-prometheus`, installed with no HTTP listener of its own).
//! - `/healthz`: `200 ok` while the process runs.
//! - `/readyz`: `200 ready` when the circuit breaker (if on) is not open and a TCP
//!   connect to the upstream succeeds within `metrics.readiness_timeout`; else `503`
//!   with the reason. With the embedded broker, `503` for good once rumqttd has
//!   panicked ([`crate::panics`]). Also `503` once a shutdown has begun; but the MQTT listener is
//!   closed in the same instant (new connections are refused at once), so the `503`
//!   cannot warn a balancer before the gateway stops accepting. To have a balancer stop
//!   routing first, delay the signal (Kubernetes: a `preStop` hook such as
//!   `sleep 5`, with `terminationGracePeriodSeconds` raised by as much, since the grace
//!   period counts from the hook's start).
//!   It connects to the upstream at most once in [`PROBE_EVERY`]: requests in between
//!   get the last connect's result, so that requests to `/readyz` cannot be turned into
//!   a stream of connects to the broker past the gateway's rate limits.
//! - `/events?limit=N`: the latest `N` security events (default 50, at most 1000), a JSON
//!   array, oldest first, in the schema of `aegis_mqtt::security::Event`.
//! - `/bans?limit=N`: the `N` bans in force that end last (default 1000, at most
//!   10,000), a JSON array, the soonest-ending first, and in an `X-Total-Count` header
//!   how many are in force (more than the array holds when the list was cut: the bans
//!   file holds them all). Listed and encoded off the runtime, on a blocking thread:
//!   the main runtime accepts every MQTT connection (in `server.runtime = "per-core"`
//!   its only acceptor), and a full table (`security.max_bans`) takes a while to list.
//!   With `security.admin = true`,
//!   `POST /bans?key=addr&value=192.0.2.7&for=10m` adds one and
//!   `DELETE /bans?key=client_id&value=c1` lifts one (`key` is `addr`, `username` or
//!   `client_id`); otherwise those answer `403`. `POST` refuses (`400`) a network wider
//!   than an IPv4 /8 or an IPv6 /32 (or whose 6to4, Teredo or NAT64 clients span more
//!   than an IPv4 /8), and an empty or blank username or client id.
//! - `/events` and `/bans` answer no browser: a request with an `Origin` header gets
//!   `403` (a page open on this host could otherwise post a ban), and so does one
//!   addressed to a name other than `localhost` without `security.admin_token` (a page
//!   that rebinds its own name to this address could otherwise read them). With the
//!   token set, both need `Authorization: Bearer <token>` (else `401`). Without one,
//!   they are served only when `metrics.listen` is a loopback address (else `403`: they
//!   name client addresses, client ids and usernames), and the gateway refuses to start
//!   with `admin = true` on a metrics address beyond loopback. An address stands for its
//!   client's network by `limits.ipv4_prefix` and `limits.ipv6_prefix` (an IPv6 one for
//!   its /64 by default, a 6to4, Teredo or NAT64 one for the IPv4 address it carries), and
//!   `/bans` lists it so (`2001:db8:1:2::/64`); a network in CIDR notation
//!   (`198.51.100.0/24`) bans or lifts that network.
//!
//! [`MAX_CONNECTIONS`]: crate::metrics_endpoint::MAX_CONNECTIONS
//! [`MAX_PER_ADDRESS`]: crate::metrics_endpoint::MAX_PER_ADDRESS
//! [`HEADER_TIMEOUT`]: crate::metrics_endpoint::HEADER_TIMEOUT
//! [`CONNECTION_TIMEOUT`]: crate::metrics_endpoint::CONNECTION_TIMEOUT

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use aegis_core::metrics as m;
use aegis_layers::circuit_breaker::{CircuitHandle, CircuitState};
use aegis_layers::rate_limit::KeyBy;
use aegis_mqtt::security::{BanKey, Security};
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio::time::Instant;

use crate::logging::Key;
use crate::metrics_endpoint::text;

/// The longest `metrics.readiness_timeout`. A `/readyz` request takes at most
/// [`HEADER_TIMEOUT`] for its headers, then at most this long for the connect already
/// running (whose result it takes) or for its own: 15 s, so that its answer comes well
/// before [`CONNECTION_TIMEOUT`] cuts the connection.
///
/// [`HEADER_TIMEOUT`]: crate::metrics_endpoint::HEADER_TIMEOUT
/// [`CONNECTION_TIMEOUT`]: crate::metrics_endpoint::CONNECTION_TIMEOUT
pub(crate) const MAX_READINESS_TIMEOUT: Duration = Duration::from_secs(10);

/// Bucket bounds (seconds) of `aegis_connection_duration_seconds`, so that it renders as
/// a Prometheus histogram (P95 with `histogram_quantile`) rather than a summary: MQTT
/// sessions last from milliseconds (refused) to days.
const DURATION_BUCKETS: &[f64] = &[
    0.005, 0.05, 0.5, 1.0, 5.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, 21_600.0, 86_400.0,
];

/// Bucket bounds (seconds) of `aegis_mqtt_auth_callout_seconds`: a local auth service
/// answers in well under a millisecond, the callout's deadline is seconds.
const AUTH_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the Prometheus recorder as the global `metrics` recorder, and starts its
/// upkeep task.
pub(crate) fn install_recorder() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(m::CONNECTION_DURATION_SECONDS.to_string()),
            DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(aegis_mqtt::auth::metrics::CALLOUT_SECONDS.to_string()),
                AUTH_BUCKETS,
            )
        })
        .map_err(|e| format!("cannot install the metrics recorder: {e}"))?;
    crate::metrics_endpoint::install_recorder(builder)
}

/// What `/events` and `/bans` serve.
#[derive(Clone)]
pub(crate) struct Admin {
    pub(crate) security: Option<Security>,
    /// Whether `POST /bans` and `DELETE /bans` may change the bans.
    pub(crate) writable: bool,
    /// The bearer token they need (`security.admin_token`), if any.
    pub(crate) token: Option<Arc<str>>,
    /// Whether the endpoint's configured address (`metrics.listen`) is a loopback one:
    /// without a token, `/events` and `/bans` are served only then.
    pub(crate) loopback: bool,
    /// `log.mask_client_addresses`: the log lines of `/bans` show an address ban's
    /// network masked ([`crate::logging::Key`]).
    pub(crate) masked: bool,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("security", &self.security.is_some())
            .field("writable", &self.writable)
            .field("token", &self.token.as_ref().map(|_| ".."))
            .field("loopback", &self.loopback)
            .field("masked", &self.masked)
            .finish()
    }
}

/// Whether `req` carries `Authorization: Bearer <token>` for `admin`'s token (always,
/// when there is none). Compared in constant time: a wrong guess tells nothing of how
/// close it came but whether its length was right.
fn authorized(req: &Request<Incoming>, admin: &Admin) -> bool {
    use subtle::ConstantTimeEq as _;
    let Some(token) = &admin.token else {
        return true;
    };
    req.headers()
        .get(hyper::header::AUTHORIZATION)
        // The scheme is case-insensitive, and one or more spaces follow it (RFC 9110,
        // 11.1 and 11.4).
        .and_then(|v| {
            let v = v.as_bytes();
            let (scheme, rest) = v.split_at_checked(6)?;
            let token = rest.trim_ascii_start();
            (scheme.eq_ignore_ascii_case(b"bearer") && token.len() < rest.len()).then_some(token)
        })
        .is_some_and(|given| bool::from(given.ct_eq(token.as_bytes())))
}

/// Whether `req`'s `Host` is an IP address or `localhost` (with or without a port), or
/// absent: not a name a page could have rebound to this address.
fn addressed_by_ip(req: &Request<Incoming>) -> bool {
    let Some(host) = req.headers().get(hyper::header::HOST) else {
        return true;
    };
    // `http` parses the authority (`[::1]:9090`, `localhost`), as hyper does a URI's.
    let Ok(host) = hyper::http::uri::Authority::try_from(host.as_bytes()) else {
        return false;
    };
    let name = host.host();
    let ip = name.strip_prefix('[').and_then(|v6| v6.strip_suffix(']'));
    name.eq_ignore_ascii_case("localhost") || ip.unwrap_or(name).parse::<std::net::IpAddr>().is_ok()
}

/// The most events one `/events` answer holds.
const MAX_EVENTS: usize = 1000;

/// The bans one `/bans` answer holds without `?limit=`.
const DEFAULT_BANS: usize = 1000;

/// The most bans one `/bans` answer holds, whatever `?limit=` asks: a full table
/// (`security.max_bans`, 100,000 by default, which an attacker with many addresses can
/// fill) is some 12 MB of JSON. The bans file holds them all.
const MAX_BANS: usize = 10_000;

/// The header of a `/bans` answer that gives how many bans are in force: more than the
/// answer lists when `?limit=` (or its default) cut the list.
const TOTAL_COUNT: &str = "x-total-count";

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut res = text(status, body);
    res.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    res
}

/// The value of `name` in the request's query string, decoded as a form's
/// (`application/x-www-form-urlencoded`): percent-decoded, and a `+` is a space (a `+`
/// is written `%2B`; `/bans` answers with the key as read).
fn query<'a>(req: &'a Request<Incoming>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    form_urlencoded::parse(req.uri().query()?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// The ban key of `?key=addr|username|client_id&value=...`: an address as the network
/// `security` keys it by, a network in CIDR notation as itself.
fn ban_key(req: &Request<Incoming>, security: &Security) -> Result<BanKey, &'static str> {
    let value = query(req, "value").ok_or("missing ?value=")?;
    let not_addr = "value is not an IP address or a network such as 198.51.100.0/24";
    match query(req, "key").as_deref() {
        Some("addr") if value.contains('/') => {
            value.parse().map(BanKey::Addr).map_err(|_| not_addr)
        }
        Some("addr") => value
            .parse()
            .map(|ip| security.addr_key(ip))
            .map_err(|_| not_addr),
        Some("username") => Ok(BanKey::username(&value)),
        Some("client_id") => Ok(BanKey::client_id(&value)),
        _ => Err("key must be addr, username or client_id"),
    }
}

/// The widest networks `POST /bans` bans: an IPv4 /8 and an IPv6 /32 (a large
/// provider's allocation). A wider one (`0.0.0.0/0`, `::/0`) would refuse a whole
/// address family, or most of it, with one request, saved to the bans file. The
/// detector's address bans are held to the same bound: `limits.ipv4_prefix` and
/// `limits.ipv6_prefix` are at least these while it bans addresses (`config.rs`).
pub(crate) const WIDEST_V4_BAN: u8 = 8;
pub(crate) const WIDEST_V6_BAN: u8 = 32;

/// Why a manual ban of `key` is refused: a network wider than [`WIDEST_V4_BAN`] or
/// [`WIDEST_V6_BAN`] (also when a bare address is keyed so by `limits.ipv4_prefix` or
/// `limits.ipv6_prefix`), or an IPv6 network whose 6to4, Teredo or NAT64 clients may
/// span more than an IPv4 [`WIDEST_V4_BAN`]: one inside such a range that carries too
/// few IPv4 bits (one Teredo server's /64, `64:ff9b::/100`), or one that holds a whole
/// range ([`ClientKey::holds_v4_carrying_range`](aegis_core::ClientKey::holds_v4_carrying_range):
/// `2001::/32`, every Teredo client; `64:ff9b::/96` and any network around it up to
/// `64:ff9b::/32`, every client behind a translator).
fn too_wide(key: &BanKey) -> Option<String> {
    let BanKey::Addr(net) = key else {
        return None;
    };
    let widest = match net.network() {
        std::net::IpAddr::V4(_) => WIDEST_V4_BAN,
        std::net::IpAddr::V6(_) => WIDEST_V6_BAN,
    };
    let clients_too_wide = net
        .v4_clients()
        .is_some_and(|v4| v4.prefix_len() < WIDEST_V4_BAN)
        || net.holds_v4_carrying_range();
    (net.prefix_len() < widest || clients_too_wide).then(|| {
        format!(
            "refusing to ban {net}: a ban through /bans covers at most an IPv4 /{WIDEST_V4_BAN} \
             or an IPv6 /{WIDEST_V6_BAN}, and the 6to4, Teredo or NAT64 clients of an IPv6 \
             network at most an IPv4 /{WIDEST_V4_BAN}"
        )
    })
}

/// Why a manual ban of `key` is refused for its name: an empty or blank client id or
/// username. An empty one is every client that sends none (an MQTT 3.1.1 clean session
/// may, and an MQTT 5 client whose id the server assigns does): the ban would refuse them
/// all and close their sessions. Blank ones are refused with it, as a value mistyped.
fn blank_name(key: &BanKey) -> Option<String> {
    let (BanKey::Username(name) | BanKey::ClientId(name)) = key else {
        return None;
    };
    name.trim().is_empty().then(|| {
        format!(
            "refusing to ban an empty or blank {}: it would refuse every client that sends none",
            key.kind()
        )
    })
}

/// `GET /bans?limit=N`: the `N` bans that end last, the soonest-ending first, and how
/// many are in force in [`TOTAL_COUNT`]. Listed (only those bans copied under the ban
/// table's lock: [`Security::bans_ending_last`], then sorted) and encoded on a blocking thread: on the runtime, it would hold up the connections
/// the runtime accepts and serves (in `server.runtime = "per-core"`, the main runtime
/// accepts them all) for as long as a full table takes.
async fn list_bans(security: &Security, limit: usize) -> Response<Full<Bytes>> {
    let security = security.clone();
    let listed = tokio::task::spawn_blocking(move || {
        let (shown, total) = security.bans_ending_last(limit);
        serde_json::to_string(&shown).map(|json| (json, total))
    })
    .await;
    match listed {
        Ok(Ok((body, total))) => {
            let mut res = json(StatusCode::OK, body);
            res.headers_mut()
                .insert(TOTAL_COUNT, HeaderValue::from(total));
            res
        }
        Ok(Err(e)) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("listing the bans failed: {e}\n"),
        ),
    }
}

/// `/events` and `/bans`; `None` for any other path.
async fn admin(req: &Request<Incoming>, admin: &Admin) -> Option<Response<Full<Bytes>>> {
    let path = req.uri().path();
    if path != "/events" && path != "/bans" {
        return None;
    }
    let Some(security) = &admin.security else {
        return Some(text(StatusCode::NOT_FOUND, "security is off\n"));
    };
    if req.headers().contains_key(hyper::header::ORIGIN) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "not from a browser: the request has an Origin header\n",
        ));
    }
    if admin.token.is_none() && !admin.loopback {
        return Some(text(
            StatusCode::FORBIDDEN,
            "metrics.listen is beyond loopback: /events and /bans need security.admin_token\n",
        ));
    }
    if admin.token.is_none() && !addressed_by_ip(req) {
        return Some(text(
            StatusCode::FORBIDDEN,
            "address this endpoint by IP or localhost (or set security.admin_token)\n",
        ));
    }
    if !authorized(req, admin) {
        let mut res = text(
            StatusCode::UNAUTHORIZED,
            "/events and /bans need Authorization: Bearer <security.admin_token>\n",
        );
        res.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return Some(res);
    }
    let bad = |why: &str| text(StatusCode::BAD_REQUEST, format!("{why}\n"));
    let to_json = |v: Result<String, serde_json::Error>| match v {
        Ok(body) => json(StatusCode::OK, body),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
    };
    let method = req.method();
    Some(match (path, method) {
        ("/events", &Method::GET | &Method::HEAD) => {
            let limit = match query(req, "limit").map(|l| l.parse::<usize>()) {
                None => 50,
                Some(Ok(n)) => n.min(MAX_EVENTS),
                Some(Err(_)) => return Some(bad("limit must be a number")),
            };
            to_json(serde_json::to_string(&security.events(limit)))
        }
        ("/bans", &Method::GET | &Method::HEAD) => {
            let limit = match query(req, "limit").map(|l| l.parse::<usize>()) {
                None => DEFAULT_BANS,
                Some(Ok(n)) => n.min(MAX_BANS),
                Some(Err(_)) => return Some(bad("limit must be a number")),
            };
            list_bans(security, limit).await
        }
        ("/bans", &Method::POST | &Method::DELETE) if !admin.writable => text(
            StatusCode::FORBIDDEN,
            "bans are read-only here (security.admin = false)\n",
        ),
        ("/bans", &Method::POST) => {
            let key = match ban_key(req, security) {
                Ok(key) => key,
                Err(why) => return Some(bad(why)),
            };
            if let Some(why) = too_wide(&key).or_else(|| blank_name(&key)) {
                return Some(bad(&why));
            }
            // A ban lasts at most a century (`MAX_BAN`): the answer and the log say so.
            let duration = match query(req, "for").map(|d| crate::config::parse_duration(&d)) {
                Some(Ok(d)) if !d.is_zero() => d.min(aegis_mqtt::security::MAX_BAN),
                _ => return Some(bad("for must be a duration such as 10m")),
            };
            let logged = Key {
                key: &key,
                masked: admin.masked,
            };
            tracing::info!(key = %logged, ?duration, "ban added through /bans");
            // The key as read back from the query (a `+` is a space there): a value
            // mistyped shows in the answer.
            let answer = format!("banned {key} for {duration:?}\n");
            security.ban(key, duration);
            text(StatusCode::OK, answer)
        }
        ("/bans", &Method::DELETE) => match ban_key(req, security) {
            Ok(key) if security.unban(&key) => {
                let logged = Key {
                    key: &key,
                    masked: admin.masked,
                };
                tracing::info!(key = %logged, "ban lifted through /bans");
                text(StatusCode::OK, format!("lifted {key}\n"))
            }
            Ok(key) => text(StatusCode::NOT_FOUND, format!("no such ban: {key}\n")),
            Err(why) => bad(why),
        },
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "GET, POST or DELETE\n"),
    })
}

/// How long the result of `/readyz`'s connect to the upstream stands for later requests.
pub(crate) const PROBE_EVERY: Duration = Duration::from_secs(1);

/// The last connect to the upstream: when it ended, and how.
type Probe = Option<(Instant, Result<(), &'static str>)>;

/// What `/readyz` checks.
#[derive(Clone, Debug)]
pub(crate) struct Readiness {
    pub(crate) upstream: SocketAddr,
    /// Whether the upstream is the embedded broker, not ready once it has panicked
    /// ([`crate::panics`]).
    pub(crate) embedded: bool,
    pub(crate) timeout: Duration,
    pub(crate) breaker: Option<CircuitHandle>,
    pub(crate) stopping: Arc<AtomicBool>,
    /// Shared by every request: one connect at a time, its result kept for
    /// [`PROBE_EVERY`].
    pub(crate) last_probe: Arc<tokio::sync::Mutex<Probe>>,
}

impl Readiness {
    /// `Ok` when ready, else why not.
    async fn check(&self) -> Result<(), &'static str> {
        if self.stopping.load(Ordering::Acquire) {
            return Err("shutting down");
        }
        if self.embedded && crate::panics::broker_panics() > 0 {
            return Err(
                "the embedded broker failed (rumqttd panicked: see the log and \
                 aegis_embedded_broker_panics_total); restart the gateway",
            );
        }
        if self
            .breaker
            .as_ref()
            .is_some_and(|b| b.state() == CircuitState::Open)
        {
            return Err("upstream circuit open");
        }
        // Requests that come while a connect runs wait for it and take its result.
        let mut last = Arc::clone(&self.last_probe).lock_owned().await;
        if let Some((at, result)) = *last
            && Instant::now().saturating_duration_since(at) < PROBE_EVERY
        {
            return result;
        }
        // The connect runs in a task of its own, which holds the lock until it has kept
        // the result: a request that goes away meanwhile (its client closed) does not cut
        // the connect short, so the requests queued behind it get its result rather than
        // each connecting again, one after the other.
        let (upstream, timeout) = (self.upstream, self.timeout);
        let probe = tokio::spawn(async move {
            let result =
                match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(upstream)).await
                {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(e)) => Err(probe_failure(upstream, e)),
                    Err(_) => Err("upstream connect timed out"),
                };
            *last = Some((Instant::now(), result));
            result
        });
        probe.await.unwrap_or(Err("the upstream probe failed"))
    }
}

/// Why a readiness probe's connect failed, as `/readyz` says it: a refusal, this host's
/// own lack of descriptors, memory or local ports (classified as the proxy's connector
/// does, `ProxyError::from_connect`: not the upstream's fault), or another failure.
fn probe_failure(upstream: SocketAddr, e: std::io::Error) -> &'static str {
    match aegis_core::proxy::ProxyError::from_connect(upstream, e) {
        aegis_core::proxy::ProxyError::ConnectRefused { .. } => "upstream refused the connection",
        aegis_core::proxy::ProxyError::LocalResources { .. } => {
            "this host is out of descriptors, memory or local ports"
        }
        _ => "upstream connect failed",
    }
}

async fn route(
    req: Request<Incoming>,
    prometheus: PrometheusHandle,
    ready: Readiness,
    admin: Admin,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(res) = self::admin(&req, &admin).await {
        return Ok(res);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => crate::metrics_endpoint::metrics(&prometheus),
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/readyz" => match ready.check().await {
            Ok(()) => text(StatusCode::OK, "ready\n"),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// Serves the endpoint on `listener` until the process ends; `key_by` keys client
/// addresses for [`MAX_PER_ADDRESS`].
///
/// [`MAX_PER_ADDRESS`]: crate::metrics_endpoint::MAX_PER_ADDRESS
pub(crate) async fn serve(
    listener: TcpListener,
    prometheus: PrometheusHandle,
    ready: Readiness,
    admin: Admin,
    key_by: KeyBy,
) {
    crate::metrics_endpoint::serve(listener, key_by, move |req| {
        route(req, prometheus.clone(), ready.clone(), admin.clone())
    })
    .await;
}
