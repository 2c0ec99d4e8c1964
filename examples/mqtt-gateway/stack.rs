//! The layer stack, built from the validated configuration.
//!
//! Outermost first, as in the README and `examples/tests/stack.rs`:
//!
//! ```text
//! serve (cap, nodelay)
//!  -> PROXY protocol        [proxy_protocol]
//!  -> security              [security]          address bans, detector, event log
//!  -> rate limit            [limits]            <- adaptive controller sets its rate
//!  -> slowloris deadlines   [slowloris]
//!  -> sniff: MQTT only      [sniff]
//!  -> MQTT validation       [mqtt]              per-packet policy, [inspect] rules
//!  -> authentication        [auth]
//!  -> Proxy(CircuitBreaker(TcpConnect(upstream)))   [circuit_breaker]; [adaptive] watches the
//!     MQTT layer's CONNECT to CONNACK round trip (the upstream connect without it); the
//!     MQTT layer's `connack_timeout` reports a stalled broker to the breaker, and to the
//!     controller as a sample of the timeout's length
//! ```
//!
//! # Why the stream type is erased between layers
//!
//! Every layer has an `enabled` toggle, so each is a `tower::util::Either` of "the layer
//! around the rest" and "the rest". A layer that wraps the stream (PROXY protocol,
//! slowloris, sniff) hands the rest a different stream type than the one it would get
//! without the layer, so the rest would be compiled once per combination: 2^n copies of
//! the proxy for n toggles. Instead the stream becomes a [`BoxIo`] where the two arms of
//! a toggle meet: after the PROXY protocol layer (when it is on), and before the sniff
//! router, whichever of slowloris's arms the connection took. Every stage below those
//! points is compiled once or twice, not 2^n times: the layers above them (security, rate
//! limit) are compiled for both the plain and the boxed stream, and so is the MQTT
//! stack, for the sniffed and the unsniffed stream. Each box is an allocation per
//! connection and a virtual call per read; a connection with every layer on but the
//! PROXY protocol has one (slowloris's stream, 112 bytes).
//! The connector is erased too ([`Connector`]), without an allocation per clone.
//!
//! A `tower::util::Either`'s future is as large as its larger arm, so an arm whose future
//! is large and rarely taken is boxed ([`BoxFuture`]): the PROXY protocol arm, and the
//! sniff-off arm (the sniff router boxes its routes' futures itself).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use aegis_core::proxy::{Proxy, TcpConnect, Transferred};
use aegis_core::{BoxError, ClientAddr, Conn, ConnParams, Handshake, LocalAddr, Param, PeerAddr};
use aegis_layers::adaptive::{
    AdaptiveHandle, GlobalRate, PerClientRate, RateConfig, SuccessOrTimeout,
};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitHandle, FirstRead};
use aegis_layers::proxy_protocol::{self, ProxyProtocolLayer};
use aegis_layers::rate_limit::{KeyBy, RateLimitLayer};
use aegis_layers::slowloris::{MinRate, SlowlorisLayer};
use aegis_layers::sniff::{Http1, Protocols, SniffRouter};
use aegis_mqtt::auth::{AuthLayer, Credentials, Decision, HttpAuth, StaticAuth};
use aegis_mqtt::layer::{ConnackLatency, MqttLayer, PacketRate, Policy, Unavailable};
use aegis_mqtt::security::Security;
use std::net::SocketAddr;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tower::util::{BoxCloneSyncService, Either};
use tower::{Layer, Service, ServiceBuilder, ServiceExt};

use crate::config::{self, Settings};
use crate::logging::Client;

/// What every stream in the stack is: bytes both ways, the four connection params.
pub(crate) trait Io: AsyncRead + AsyncWrite + ConnParams + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + ConnParams + Send + Unpin + 'static> Io for T {}

/// A stream with its type erased; forwards all of `AsyncWrite` and every param.
pub(crate) struct BoxIo(Box<dyn Io>);

impl AsyncRead for BoxIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoxIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

macro_rules! forward_param {
    ($($t:ty),+) => {$(
        impl Param<$t> for BoxIo {
            fn param(&self) -> $t {
                <dyn Io as Param<$t>>::param(&*self.0)
            }
        }
    )+};
}
forward_param!(PeerAddr, LocalAddr, ClientAddr, Handshake);

/// Erases the stream type before calling the inner service.
#[derive(Clone, Debug)]
pub(crate) struct Erase<S>(S);

impl<S: Service<BoxIo>, I: Io> Service<I> for Erase<S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, io: I) -> S::Future {
        self.0.call(BoxIo(Box::new(io)))
    }
}

/// Boxes the inner service's future. Used where a branch of an `Either` would otherwise
/// hold a large future inline: an `Either`'s future is as large as its larger branch, for
/// every connection, whichever branch it takes.
#[derive(Clone, Debug)]
pub(crate) struct BoxFuture<S>(S);

impl<S, I> Service<I> for BoxFuture<S>
where
    S: Service<I, Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = ConnFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, io: I) -> ConnFuture {
        Box::pin(self.0.call(io))
    }
}

/// The proxy's response is not needed: its bytes are in `aegis_proxy_bytes_total`.
fn done(_: Transferred) {}

/// The boxed future of one connection.
pub(crate) type ConnFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// One upstream connection: judged by the broker's first byte when the breaker is
/// (see [`build`]), a plain stream otherwise.
pub(crate) type Upstream = tokio_util::either::Either<FirstRead<TcpStream>, TcpStream>;

/// The future of one upstream connect.
type ConnectFuture = Pin<Box<dyn Future<Output = Result<Upstream, BoxError>> + Send>>;

/// The upstream connector (connect, circuit breaker, latency probe) with its type
/// erased.
///
/// The service stack is cloned for every connection, twice with the sniff router; a
/// `tower::util::BoxCloneSyncService` allocates a box on each clone. This is one shared
/// function that clones the connector (reference counts and a socket address) into each
/// connect's future, which is boxed anyway. The connector is called when the proxy
/// connects, readiness included: the circuit breaker admits a connection (and takes a
/// half-open probe) then, not when the client connected to the gateway. aegis-core's
/// `Proxy` now polls its connector ready when it connects too, so that part is
/// redundant here; the type erasure is what this type is for.
#[derive(Clone)]
pub(crate) struct Connector(std::sync::Arc<dyn Fn() -> ConnectFuture + Send + Sync>);

impl Connector {
    fn new<S>(connect: S) -> Self
    where
        S: Service<(), Response = Upstream, Error = BoxError> + Clone + Send + Sync + 'static,
        S::Future: Send + 'static,
    {
        Self(std::sync::Arc::new(move || {
            Box::pin(connect.clone().oneshot(()))
        }))
    }
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector").finish_non_exhaustive()
    }
}

impl Service<()> for Connector {
    type Response = Upstream;
    type Error = BoxError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        // Readiness is the connect future's (see the type's docs).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, (): ()) -> ConnectFuture {
        (self.0)()
    }
}

/// The outermost service: logs how each connection ended, with the TCP peer's address
/// (`peer`; with `proxy_protocol` on, the proxy's: this service runs before the PROXY
/// header is read, and the security layer's events name the client) masked when
/// `log.mask_client_addresses` is on. Rejections are logged at `debug` (they are
/// counted in `aegis_rejections_total` anyway; a flood must not flood the log).
#[derive(Clone, Debug)]
pub(crate) struct Observe<S> {
    inner: S,
    masked: bool,
}

impl<S> Service<Conn<TcpStream>> for Observe<S>
where
    S: Service<Conn<TcpStream>, Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = BoxError;
    type Future = ConnFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, conn: Conn<TcpStream>) -> ConnFuture {
        // The outcome is logged at debug level: keep the client's address for that line
        // only when the level is on (the future lives as long as the connection).
        let client = tracing::enabled!(tracing::Level::DEBUG).then(|| {
            Box::new(Client {
                addr: Param::<PeerAddr>::param(&conn).0,
                masked: self.masked,
            })
        });
        Box::pin(Observed {
            fut: self.inner.call(conn),
            client,
        })
    }
}

pin_project_lite::pin_project! {
    /// The future of [`Observe`]: a named future, not an `async` block, because an
    /// `async` block keeps the future it awaits twice (once as the captured variable, once
    /// as the awaited value), and this one holds every layer's state for the whole life
    /// of the connection.
    struct Observed<F> {
        #[pin]
        fut: F,
        client: Option<Box<Client>>,
    }
}

impl<F: Future<Output = Result<(), BoxError>>> Future for Observed<F> {
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let res = std::task::ready!(this.fut.poll(cx));
        if let Some(client) = this.client.as_deref() {
            match &res {
                Ok(()) => tracing::debug!(peer = %client, "connection closed"),
                Err(e) => {
                    let (layer, reason) = aegis_core::error::label_of(&**e);
                    tracing::debug!(peer = %client, layer, reason, "connection refused or failed");
                }
            }
        }
        Poll::Ready(res)
    }
}

/// The characters rumqttd 0.20's router refuses in a client id (`validate_clientid` in
/// its `router/routing.rs`).
///
/// Its refusal is not a clean one: the connection's entry in rumqttd's table of will
/// handlers stays behind with its receiver gone, and the next CONNECT with the same id
/// panics on it while holding that table's lock, which poisons it; from then on every
/// CONNECT of every client panics (the gateway answers each "server unavailable"). So
/// with the embedded broker the MQTT layer refuses these itself (CONNACK 0x02 / 0x85,
/// `client_id`), whatever `mqtt.client_id_chars` allows (see [`client_id_chars`]).
pub(crate) const EMBEDDED_REFUSED_CHARS: [char; 4] = ['+', '$', '#', '/'];

/// Whether the embedded broker takes `c` in a client id: not one of
/// [`EMBEDDED_REFUSED_CHARS`].
fn embedded_takes(c: char) -> bool {
    !EMBEDDED_REFUSED_CHARS.contains(&c)
}

/// The MQTT layer's class of client id characters for `mqtt.client_id_chars`; with the
/// embedded broker, that class without [`EMBEDDED_REFUSED_CHARS`].
fn client_id_chars(class: config::ClientIdChars, embedded: bool) -> aegis_mqtt::ClientIdChars {
    use aegis_mqtt::ClientIdChars as C;
    match (class, embedded) {
        // None of the four is alphanumeric.
        (config::ClientIdChars::Alphanumeric, _) => C::Alphanumeric,
        (config::ClientIdChars::AsciiGraphic, false) => C::AsciiGraphic,
        (config::ClientIdChars::Any, false) => C::Any,
        (config::ClientIdChars::AsciiGraphic, true) => {
            C::Custom(|c| c.is_ascii_graphic() && embedded_takes(c))
        }
        (config::ClientIdChars::Any, true) => C::Custom(embedded_takes),
    }
}

/// The built stack and the handles the rest of the gateway needs.
pub(crate) struct Built<S> {
    pub(crate) service: S,
    pub(crate) breaker: Option<CircuitHandle>,
    /// The adaptive controller (its task also lives while the connector does).
    pub(crate) adaptive: Option<AdaptiveHandle>,
    /// The security event log, detector and bans, for `/events` and `/bans`.
    pub(crate) security: Option<Security>,
    /// The layers that are on, outermost first, for the start-up line.
    pub(crate) layers: Vec<&'static str>,
}

/// Any authenticator: the HTTP or the file one.
pub(crate) type Authenticator = BoxCloneSyncService<Credentials, Decision, BoxError>;

/// The `AuthLayer` of `[auth]`, `None` when off, keying clients by `key_by` (that of
/// `[limits]`). Reads the password file.
pub(crate) fn auth(
    c: &config::Auth,
    key_by: KeyBy,
) -> Result<Option<AuthLayer<Authenticator>>, config::ConfigError> {
    use config::ConfigError;
    let authn = match c.kind {
        config::AuthKind::None => return Ok(None),
        config::AuthKind::Http => {
            let uri: hyper::Uri = c
                .url
                .parse()
                .map_err(|e| ConfigError::new("auth.url", format!("not a URL: {e}")))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(ConfigError::new(
                    "auth.url",
                    "must be an http:// URL with a host (https is not supported)",
                ));
            }
            BoxCloneSyncService::new(HttpAuth::new(uri).map_err(BoxError::from))
        }
        config::AuthKind::File => {
            let file = StaticAuth::from_file(&c.file).map_err(|e| {
                // The reason a read failed (no such file, permission denied) is the
                // error's source, which its `Display` leaves out.
                let reason = match std::error::Error::source(&e) {
                    Some(io) => format!("{}: {e}: {io}", c.file),
                    None => format!("{}: {e}", c.file),
                };
                ConfigError::new("auth.file", reason)
            })?;
            if file.is_empty() {
                return Err(ConfigError::new(
                    "auth.file",
                    format!("{}: no users", c.file),
                ));
            }
            BoxCloneSyncService::new(file.map_err(BoxError::from))
        }
    };
    Ok(Some(
        AuthLayer::new(authn)
            .ttl(c.ttl)
            .deny_ttl(c.deny_ttl)
            .timeout(c.timeout)
            .max_entries(c.max_entries)
            .max_checks_per_addr(c.max_checks_per_addr)
            .key_by(key_by),
    ))
}

/// The `Security` of `[security]`, keying client addresses as `[limits]` does. With
/// the adaptive controller driving `limits.per_ip`, its refusals are the broker's
/// latency at work, not the client's doing: they are not counted toward bans.
fn security(settings: &Settings) -> Security {
    let (c, l) = (&settings.raw.security, &settings.raw.limits);
    let a = &settings.raw.adaptive;
    let adaptive_per_ip = a.enabled && a.drives == config::Drives::PerIp;
    let mut b = Security::builder()
        .count_per_client_rate(!adaptive_per_ip)
        .key_by(KeyBy::new(l.ipv4_prefix, l.ipv6_prefix))
        .exempt(settings.exempt.iter().copied())
        .deny(settings.deny.iter().copied())
        .events_capacity(c.events)
        .window(c.window)
        .ban_for(c.ban_for)
        .max_tracked(c.max_tracked)
        .max_bans(c.max_bans)
        .close_on_ban(c.close_on_ban)
        .ban_by_addr(c.ban_by.contains(&config::BanBy::Addr))
        .ban_by_username(c.ban_by.contains(&config::BanBy::Username))
        .ban_by_client_id(c.ban_by.contains(&config::BanBy::ClientId));
    if c.max_connects > 0 {
        b = b.max_connects(c.max_connects);
    }
    if c.max_auth_failures > 0 {
        b = b.max_auth_failures(c.max_auth_failures);
    }
    if c.max_rejections > 0 {
        b = b.max_rejections(c.max_rejections);
    }
    b.build()
}

/// Builds the stack in front of `upstream`. Must run inside the tokio runtime (the
/// adaptive controller spawns its task).
#[allow(clippy::too_many_lines)] // one straight pass, outermost layer last
pub(crate) fn build(
    settings: &Settings,
    upstream: SocketAddr,
) -> Built<
    impl Service<Conn<TcpStream>, Response = (), Error = BoxError, Future = ConnFuture>
    + Clone
    + Send
    + 'static,
> {
    let c = &settings.raw;
    let embedded = settings.upstream == config::Upstream::Embedded;
    let mut layers = Vec::new();

    // The rate limiter is built first: the adaptive controller needs its handle.
    let rate_limit = c.limits.enabled.then(|| {
        let l = &c.limits;
        let mut b = RateLimitLayer::builder()
            .key_by(KeyBy::new(l.ipv4_prefix, l.ipv6_prefix))
            .max_keys(l.max_keys)
            .evict_every(l.evict_every);
        if let Some(q) = settings.global {
            b = b.global(q);
        }
        if let Some(q) = settings.per_ip {
            b = b.per_client(q);
        }
        if l.concurrent_per_ip.enabled {
            b = b.max_concurrent_per_client(l.concurrent_per_ip.max);
        }
        b.build()
    });
    let rate_handle = rate_limit.as_ref().map(RateLimitLayer::handle);

    // The upstream connector: TcpConnect, then the breaker, then the latency probe.
    // With the MQTT layer's CONNACK timeout on, the broker's answer (its first byte, the
    // CONNACK: a success) and the CONNACK timeout (a failure) are the breaker's outcomes,
    // not the connect: a stalled broker still completes TCP handshakes, and those
    // successes would keep the circuit closed, and would give a half-open probe's permit
    // back at once, letting every client through to the stall. Judged by the first read,
    // `half_open_permits` bounds the sessions waiting on the broker while half-open.
    let connack_decides = c.mqtt.enabled && !c.mqtt.connack_timeout.is_zero();
    let breaker = c.circuit_breaker.enabled.then(|| {
        let cb = &c.circuit_breaker;
        let mut b = CircuitBreakerLayer::builder("upstream")
            .consecutive_failures((cb.consecutive_failures > 0).then_some(cb.consecutive_failures))
            .open_for(cb.open_for)
            .half_open_permits(cb.half_open_permits)
            .success_threshold(cb.success_threshold);
        if cb.failure_rate.enabled {
            let fr = &cb.failure_rate;
            b = b.failure_rate(fr.ratio, fr.window, fr.min_calls);
        }
        if connack_decides {
            // A probe's outcome is then the broker's first byte or the CONNACK timeout, so
            // its own time limit (by default `open_for`) must not be shorter: with
            // `open_for` under the CONNACK timeout, a broker answering slowly but in time
            // failed every probe and kept the circuit open for good, and a probe timed out
            // early while its client still waited on a stalled broker let the next probe
            // through to it as well. The CONNACK clock starts before the breaker admits
            // the call, so the CONNACK timeout always comes first.
            b = b.probe_timeout(cb.open_for.max(c.mqtt.connack_timeout));
        }
        b.build()
    });
    let breaker_handle = breaker.as_ref().map(CircuitBreakerLayer::handle);
    let adaptive = match (&rate_handle, c.adaptive.enabled) {
        (Some(rate), true) => {
            let a = &c.adaptive;
            let control =
                RateConfig::new(a.threshold, f64::from(a.min_rate), f64::from(a.max_rate))
                    .name("upstream")
                    .interval(a.interval)
                    .min_samples(a.min_samples)
                    .reduction(a.reduction)
                    .recovery(a.recovery);
            Some(match a.drives {
                config::Drives::Global => control.spawn(GlobalRate(rate.clone())),
                config::Drives::PerIp => control.spawn(PerClientRate(rate.clone())),
            })
        }
        _ => None,
    };
    let connect = TcpConnect::new(upstream).timeout(c.server.upstream_connect_timeout);
    let connector = match breaker {
        Some(breaker) if connack_decides => Connector::new(
            ServiceBuilder::new()
                .map_response(tokio_util::either::Either::Left)
                .layer(breaker.judge_by_first_read())
                .map_err(BoxError::from)
                .service(connect),
        ),
        breaker => Connector::new(
            ServiceBuilder::new()
                .map_response(tokio_util::either::Either::Right)
                // Without the MQTT layer the controller watches the upstream connect;
                // with it, the CONNECT to CONNACK round trip (set on the MQTT layer
                // below).
                .option_layer(
                    adaptive
                        .as_ref()
                        .filter(|_| !c.mqtt.enabled)
                        .map(|a| a.layer_with(SuccessOrTimeout)),
                )
                .option_layer(breaker)
                .map_err(BoxError::from)
                .service(connect),
        ),
    };
    // The proxy; behind the MQTT layer, a client whose broker cannot be reached (refused,
    // timed out, the breaker open) gets CONNACK 0x03 (3.x) / 0x88 (5.0) from the gateway.
    let proxy = Proxy::with_connector(connector).max_buffer(c.server.proxy_buffer);
    let unavailable = c
        .mqtt
        .unavailable_answer
        .then(|| Unavailable::new().timeout(c.mqtt.unavailable_timeout));

    // Authentication of each validated CONNECT, inside the MQTT layer (the CONNECT is
    // parsed; a refusal gets CONNACK 0x05 / 0x87 from the gateway).
    let auth = settings.auth.clone();

    // MQTT validation, with the per-packet policy (its tiers are all off unless set). The
    // `mqtt_connect` fuzz target validates with these settings too
    // (`aegis_mqtt::__fuzz::CONNECT_CONFIGS`): change them together.
    let mqtt = c.mqtt.enabled.then(|| {
        let m = &c.mqtt;
        let mut config = aegis_mqtt::Config::new()
            .max_connect_size(m.max_connect_size)
            .max_packet_size(m.max_packet_size)
            .client_id_max_len(m.client_id_max_len)
            // With the embedded broker, without the characters its router fails on.
            .client_id_chars(client_id_chars(m.client_id_chars, embedded))
            .allow_empty_client_id(m.allow_empty_client_id);
        if embedded {
            // rumqttd 0.20 speaks MQTT 3.1.1 only and closes any other version without a
            // word: the layer answers MQTT 5 with CONNACK 0x84 and MQTT 3.1 with 0x01
            // instead, counted as aegis_rejections_total{layer="mqtt",
            // reason="unsupported_version"}, with or without the sniffer.
            config = config.versions(&[aegis_mqtt::Version::V3_1_1]);
        }
        if let Some(secs) = settings.max_keep_alive {
            config = config.max_keep_alive(secs);
        }
        let mut layer = MqttLayer::new(config)
            .connect_timeout(m.connect_timeout)
            .packet_timeout(m.packet_timeout);
        if m.packet_rate.enabled {
            let r = PacketRate::new(m.packet_rate.per_second, m.packet_rate.burst);
            layer = layer.packet_rate(match m.packet_rate.over {
                config::OverRate::Throttle => r,
                config::OverRate::Disconnect => r.disconnect(),
            });
        }
        if m.enforce_keep_alive {
            layer = layer.enforce_keep_alive();
        }
        if !m.connack_timeout.is_zero() {
            // A stalled broker (its kernel still completes the handshake) gets the client
            // "server unavailable" from the gateway, and counts as a breaker failure: the
            // connect alone looked like a success. It is the adaptive controller's
            // sample too, of the timeout's length (the broker's true latency is longer):
            // without it a broker that never answers gives no sample at all, and the
            // controller holds its rate for as long as the stall lasts.
            layer = layer.connack_timeout(m.connack_timeout);
            let breaker = breaker_handle.clone();
            let control = adaptive.clone();
            let waited = m.connack_timeout;
            if breaker.is_some() || control.is_some() {
                layer = layer.on_connack_timeout(move || {
                    if let Some(breaker) = &breaker {
                        breaker.record_failure();
                    }
                    if let Some(control) = &control {
                        control.record(waited);
                    }
                });
            }
        }
        // The broker's CONNECT to CONNACK round trip is the latency that matters to a
        // connecting client (the gateway's own refusals are not samples). The breaker's
        // success is the broker's first byte, read through the connector's stream.
        if let Some(control) = adaptive.clone() {
            layer = layer.connack_latency(ConnackLatency::new(move |rtt| control.record(rtt)));
        }
        let l = &c.limits;
        let q = &settings.policy;
        let mut policy = Policy::builder()
            .key_by(KeyBy::new(l.ipv4_prefix, l.ipv6_prefix))
            .max_keys(l.max_keys)
            .v5_publish_answer(l.v5_publish_answer);
        // Checked positive only with the limits on; off, the policy has no tiers.
        if l.enabled {
            policy = policy.evict_every(l.evict_every);
        }
        if let Some(q) = q.connect_per_ip {
            policy = policy.connect_per_addr(q);
        }
        if let Some(q) = q.publish_per_client {
            policy = policy.publish_per_client(q);
        }
        if let Some(q) = q.subscribe_per_client {
            policy = policy.subscribe_per_client(q);
        }
        if let Some(q) = q.packets_per_client {
            policy = policy.packets_per_client(q);
        }
        if let Some(q) = q.bytes_per_client {
            policy = policy.bytes_per_client(q);
        }
        if let Some(inspector) = settings.inspector.clone() {
            policy = policy.inspect(inspector);
        }
        layer.policy(policy.build())
    });
    let done = done as fn(Transferred);
    let after_sniff = match mqtt {
        Some(layer) => {
            let to_proxy = match unavailable {
                Some(answer) => Either::Left(
                    ServiceBuilder::new()
                        .map_response(done)
                        .service(proxy.on_connect_error(answer)),
                ),
                None => Either::Right(ServiceBuilder::new().map_response(done).service(proxy)),
            };
            Either::Left(layer.layer(ServiceBuilder::new().option_layer(auth).service(to_proxy)))
        }
        None => Either::Right(ServiceBuilder::new().map_response(done).service(proxy)),
    };

    // Protocol sniffing: MQTT goes on; HTTP/1 gets a 400 if asked; the rest is refused
    // and counted as aegis_rejections_total{layer="sniff",reason=<protocol>}.
    let after_slowloris = if c.sniff.enabled {
        let mut router = SniffRouter::new()
            .timeout(c.sniff.timeout)
            .max_prefix(c.sniff.max_prefix)
            .route(Protocols::MQTT, after_sniff);
        if c.sniff.http == config::HttpPolicy::BadRequest {
            router = router.route(Protocols::HTTP1, Http1::bad_request());
        }
        Either::Left(router)
    } else {
        // Boxed: inline, the MQTT and proxy future would make every sniffed connection's
        // future as large as well (the router boxes its routes' futures itself).
        Either::Right(BoxFuture(after_sniff))
    };

    let slowloris = c.slowloris.enabled.then(|| {
        let s = &c.slowloris;
        let mut l = SlowlorisLayer::new();
        if !s.first_byte.is_zero() {
            l = l.first_byte_timeout(s.first_byte);
        }
        if !s.idle.is_zero() {
            l = l.idle_timeout(s.idle);
        }
        if !s.handshake.is_zero() {
            l = l.handshake_timeout(s.handshake);
        }
        if s.min_rate_bytes_per_sec > 0 {
            l = l.min_rate(MinRate::new(s.min_rate_bytes_per_sec, s.min_rate_grace));
        }
        if !s.idle_after_handshake.is_zero() {
            l = l.idle_timeout_after_handshake(s.idle_after_handshake);
        }
        l.jitter(s.jitter)
    });
    let after_rate = match slowloris {
        Some(l) => Either::Left(
            ServiceBuilder::new()
                .layer(l)
                .service(Erase(after_slowloris)),
        ),
        None => Either::Right(Erase(after_slowloris)),
    };

    // Security: address bans before anything is read, the detector, and the event log
    // (inside the PROXY protocol layer, so that the address is the real client's).
    let security = c.security.enabled.then(|| security(settings));
    let after_proxy_protocol = ServiceBuilder::new()
        .option_layer(security.as_ref().map(Security::layer))
        .option_layer(rate_limit)
        .service(after_rate);

    let top = if c.proxy_protocol.enabled {
        let p = &c.proxy_protocol;
        let layer = ProxyProtocolLayer::new(settings.trusted.iter().copied())
            .mode(match p.mode {
                config::HeaderMode::Required => proxy_protocol::HeaderMode::Required,
                config::HeaderMode::Optional => proxy_protocol::HeaderMode::Optional,
            })
            .timeout(p.timeout)
            .max_header_len(p.max_header_len);
        // Boxed: while it reads the header, the PROXY protocol future holds a copy of the
        // whole stack below; inline, every connection's future would be that large.
        Either::Left(BoxFuture(
            ServiceBuilder::new()
                .layer(layer)
                .service(Erase(after_proxy_protocol)),
        ))
    } else {
        Either::Right(after_proxy_protocol)
    };

    for (on, name) in [
        (c.proxy_protocol.enabled, "proxy_protocol"),
        (c.security.enabled, "security"),
        (c.limits.enabled, "rate_limit"),
        (c.slowloris.enabled, "slowloris"),
        (c.sniff.enabled, "sniff"),
        (c.mqtt.enabled && !settings.policy.any(), "mqtt"),
        (c.mqtt.enabled && settings.policy.any(), "mqtt+policy"),
        (settings.inspector.is_some(), "inspect"),
        (
            c.mqtt.enabled && c.auth.kind != config::AuthKind::None,
            "auth",
        ),
        (c.circuit_breaker.enabled, "circuit_breaker"),
        (adaptive.is_some(), "adaptive"),
    ] {
        if on {
            layers.push(name);
        }
    }

    Built {
        service: Observe {
            inner: top,
            masked: c.log.mask_client_addresses,
        },
        breaker: breaker_handle,
        adaptive,
        security,
        layers,
    }
}
