//! A tower layer that puts the strict validator in front of any MQTT broker.
//!
//! [`MqttLayer`] wraps a byte-stream service (typically a proxy to the broker). For each
//! connection it:
//!
//! 1. reads the first packet under the CONNECT size cap and a deadline
//!    ([`MqttLayer::connect_timeout`], 10 s by default: a client that has not sent a
//!    complete CONNECT by then is refused as `connect_timeout` and closed without an
//!    answer), and validates it as a CONNECT;
//! 2. refuses an invalid one with the answer its protocol version expects (a 3.1.1
//!    CONNACK `20 02 00 02` for a refused client id, a 5.0 CONNACK `20 03 00 81 00` for a
//!    malformed CONNECT, nothing at all for a malformed 3.1.1 CONNECT, ...), counts it in
//!    `aegis_rejections_total{layer="mqtt"}` and closes, never calling the inner service;
//! 3. accepts a valid one: marks the connection's [`Handshake`](aegis_core::Handshake)
//!    complete (so a slowloris layer outside switches to its idle clock) and calls the
//!    inner service with an [`MqttIo`], which replays the CONNECT's original bytes and
//!    then, once the broker's CONNACK has accepted the client, returns only whole,
//!    validated packets. The first invalid packet fails the read instead of reaching the
//!    broker; an MQTT 5 client first gets a server DISCONNECT with the reason code,
//!    written between two of the broker's packets.
//!
//! With [`MqttLayer::packet_rate`], each connection also gets a token bucket over its
//! packets after the CONNECT: a client over it is slowed down (its packets are held and
//! the layer stops reading) or, with [`PacketRate::disconnect`], refused as
//! `message_rate` (MQTT 5: DISCONNECT 0x96).
//!
//! With [`MqttLayer::enforce_keep_alive`], a client silent for one and a half times its
//! keep-alive is refused as `keep_alive_timeout` (MQTT 5: DISCONNECT 0x8D).
//!
//! Whatever the keep-alive, a packet the client has begun must be complete within
//! [`MqttLayer::packet_timeout`] (60 s by default) of its first byte, however its bytes
//! trickle in: a client that stops inside a packet (or sends a byte now and then) is
//! refused as `packet_timeout` (MQTT 5: DISCONNECT 0x8D, as for the keep-alive; 3.x:
//! closed), and the bytes held for it go. Those bytes are at most the packet's declared
//! size, which the framer holds to the packet size cap.
//!
//! With [`MqttLayer::connack_timeout`], a broker that takes the connection but sends no
//! CONNACK in time (it is stalled: the kernel still completes TCP handshakes) no longer
//! leaves the client waiting: the gateway answers "server unavailable" itself, as
//! [`Unavailable`] does, refused as `connack_timeout`; see the [section
//! below](#when-the-broker-is-stalled). A broker that takes the connection and closes
//! it before any CONNACK gets the client the same answer, refused as `upstream_closed`
//! (see [below](#when-the-broker-closes-before-its-connack)).
//!
//! [`MqttIo`] also reads the broker's CONNACK as it goes out. Until it has accepted the
//! client, nothing the client sent after its CONNECT is read: a server that refuses a
//! CONNECT must not process what follows it (3.1.1 [MQTT-3.1.4-5], 5.0 [MQTT-3.1.4-6]),
//! so packets pipelined behind the CONNECT wait in the client's socket, neither
//! validated, charged to the policy nor forwarded. A CONNACK that refuses (3.x return
//! code other than 0, MQTT 5 reason code 0x80 or above) ends the client's stream there:
//! the inner service reads EOF, those packets never go anywhere, and the gateway writes
//! nothing after that CONNACK (3.1.1 [MQTT-3.2.2-5], 5.0 [MQTT-3.2.2-7]). Only an MQTT 5
//! client that chose an Authentication Method is read before the CONNACK: it may send
//! AUTH or DISCONNECT (anything else is refused [MQTT-3.1.2-30]), under the small
//! CONNECT size cap ([`Config::max_connect_size`](crate::Config::max_connect_size)).
//! The broker leads that exchange (5.0 §4.12: the client's AUTH answers the server's),
//! so the client's AUTH packets are read one per AUTH the broker has sent, besides one
//! ahead of the broker's first (lenient: the spec's flow has none there, the client's
//! first Authentication Data travels in its CONNECT; a client that sends one gets it
//! forwarded). An AUTH beyond that is not read, nor anything behind it: it waits in the
//! client's socket, as packets pipelined behind a CONNECT do, until the broker's next
//! AUTH or its CONNACK. A client flooding AUTH packets thus puts at most a few packets
//! into the broker's socket (see [below](#when-the-broker-is-stalled)). A DISCONNECT is
//! read at once when no held AUTH is before it; one behind a held AUTH waits with it,
//! and the connection then ends at the CONNACK timeout at the latest. With a CONNACK
//! timeout, the client's EOF before the CONNACK (a half-close, after its DISCONNECT or
//! not) waits too: the read that finds it stays pending until the broker's CONNACK (then
//! EOF) or a refusal, as a read of any other client does before the CONNACK, so the
//! broker gets that FIN only then, and a stalled broker still gets the client the
//! CONNACK timeout's answer. Without one, nothing would end that wait (a broker that
//! sent its AUTH challenge waits for the client's answer): the EOF is read at once, the
//! broker gets the FIN and closes, and the connection ends (with no CONNACK of the
//! gateway's, [below](#when-the-broker-closes-before-its-connack)).
//! Every refusing CONNACK of the broker is counted in
//! `aegis_mqtt_broker_refusals_total{reason}` (see [Metrics](#metrics)); one that
//! refuses the client's login (3.x return code 4 or 5, 5.0 reason code 0x86, 0x87 or
//! 0x8C) is also an authentication failure for the
//! [`SecurityLayer`](crate::security::SecurityLayer) around the stack, if any: an
//! `auth_failure` event (layer `mqtt`, rule `denied`) that counts toward its
//! `max_auth_failures`, as a denial of this crate's authenticator does. So a password
//! brute force against a broker that authenticates by itself is seen, and banned, as
//! one against the gateway's own authenticator is. (The gateway's own CONNACKs, such as
//! [`Unavailable`]'s, are no broker refusals.)
//! After an accepting CONNACK, an MQTT 5 client is held to what the CONNACK announced (Maximum `QoS`, Retain Available,
//! Topic Alias Maximum, Maximum Packet Size, Server Keep Alive, wildcard, subscription
//! identifier and shared subscription availability; see
//! [`Session::on_connack`](crate::Session::on_connack)).
//!
//! Nothing is re-encoded: the broker sees exactly the client's bytes.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use aegis_core::Conn;
//! use aegis_mqtt::Config;
//! use aegis_mqtt::layer::{MqttIo, MqttLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, Service, ServiceExt, service_fn};
//!
//! // The inner service stands for a proxy to the broker: the broker's CONNACK accepts
//! // the client (until then the layer reads nothing the client sent after its CONNECT),
//! // and it reads what the client sent.
//! let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
//!     io.write_all(&[0x20, 0x02, 0x00, 0x00]).await?;
//!     let mut seen = Vec::new();
//!     io.read_to_end(&mut seen).await?;
//!     Ok::<_, std::io::Error>(seen)
//! });
//! let mut svc = MqttLayer::new(Config::new().max_keep_alive(300)).layer(broker);
//!
//! let (mut client, server) = tokio::io::duplex(1024);
//! let connect = [0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a'];
//! client.write_all(&connect).await?;
//! client.write_all(&[0xC0, 0x00]).await?; // PINGREQ
//! client.shutdown().await?;
//!
//! let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! let seen = svc.ready().await?.call(io).await?;
//! assert_eq!(seen, [&connect[..], &[0xC0, 0x00]].concat());
//! # Ok(())
//! # }
//! ```
//!
//! # When the broker is down
//!
//! By default a [`Proxy`](aegis_core::proxy::Proxy) that cannot reach the broker just
//! closes the client's connection, and the client retries blindly. Give the proxy
//! [`Unavailable`] with [`Proxy::on_connect_error`](aegis_core::proxy::Proxy::on_connect_error)
//! and the client gets the CONNACK its version expects, at once: `20 02 00 03` (3.1 /
//! 3.1.1, server unavailable) or `20 03 00 88 00` (5.0, reason 0x88), counted as
//! `aegis_rejections_total{layer="mqtt", reason="server_unavailable"}`. It answers
//! whatever the connector's error: refused, the proxy's connect timeout, or a circuit
//! breaker around the connector failing fast (`aegis_layers::circuit_breaker`, wrapped
//! with [`Proxy::with_connector`](aegis_core::proxy::Proxy::with_connector)), which
//! spares the broker the connects while it recovers. The proxy polls its connector ready
//! when it connects, that is once this layer has accepted the CONNECT, not when the
//! client's connection was accepted (this layer passes `poll_ready` through and calls the
//! proxy later): the breaker admits a client that has sent its CONNECT, and one that
//! connects and says nothing takes no half-open probe. Put the breaker around the
//! connector, not between this layer and the proxy, where it would admit at the accept.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use aegis_core::{Conn, proxy::Proxy};
//! use aegis_mqtt::layer::{MqttLayer, Unavailable};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//! use tower::{Layer, ServiceExt};
//!
//! // A broker address nobody listens on.
//! let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let broker = gone.local_addr()?;
//! drop(gone);
//!
//! let proxy = Proxy::new(broker).on_connect_error(Unavailable::new());
//! let svc = MqttLayer::default().layer(proxy);
//!
//! let (mut client, server) = tokio::io::duplex(1024);
//! let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! let conn = tokio::spawn(svc.oneshot(io));
//! // A 3.1.1 CONNECT, client id "a".
//! let connect = [0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a'];
//! client.write_all(&connect).await?;
//! let mut answer = Vec::new();
//! client.read_to_end(&mut answer).await?;
//! assert_eq!(answer, [0x20, 0x02, 0x00, 0x03]); // CONNACK: server unavailable
//!
//! // The connection's error still names the cause.
//! let err = conn.await?.unwrap_err();
//! assert_eq!(aegis_core::error::label_of(&*err), ("proxy", "connect_refused"));
//! # Ok(())
//! # }
//! ```
//!
//! # When the broker is stalled
//!
//! A stopped broker (SIGSTOP, a full accept queue on a hung process) still gets its TCP
//! handshakes completed by the kernel: the connect succeeds, a circuit breaker around the
//! connector counts a success, and the client waits for a CONNACK that never comes.
//! [`MqttLayer::connack_timeout`] bounds that wait, from the moment the validated CONNECT
//! goes to the inner service (behind this crate's authenticator, from its decision:
//! [`MqttIo::restart_connack_clock`]): if the broker's CONNACK has not started going out by then,
//! the gateway writes `20 02 00 03` (3.1 / 3.1.1) or `20 03 00 88 00` (5.0) itself, fails
//! the read with [`MqttError::ConnackTimeout`](crate::MqttError::ConnackTimeout)
//! (`aegis_rejections_total{layer="mqtt", reason="connack_timeout"}`), and from then on
//! the broker's writes fail with [`io::ErrorKind::BrokenPipe`](std::io::ErrorKind::BrokenPipe):
//! a late CONNACK never reaches the client. The timer is polled from the reads, and is
//! dropped once the broker's CONNACK goes out. It fires when the inner service reads
//! again, which is what a proxy does whenever what it read before has been written to
//! the broker: aegis-core's copy does not read the client while its write to the broker
//! waits. So a broker that reads nothing must be able to take, in its socket buffers,
//! everything let through before its CONNACK; the layer holds that to the CONNECT and, in
//! an enhanced authentication, one AUTH of the client's per AUTH of the broker's, plus
//! one (each under the CONNECT size cap), and holds the rest of the client's bytes in
//! its socket, with the read pending and the timer polled. The client's EOF is held the
//! same way while the timer runs: a read that returned it before the CONNACK would end
//! the copy's reads of the client, and with them the timer (a client of an enhanced
//! authentication that half-closed after its CONNECT, or after a DISCONNECT, got no
//! answer and held its connection for as long as the broker stalled). (Polling the
//! timer from the writes as well would not help: a stalled broker writes nothing, so a
//! proxy calls neither `poll_write` nor `poll_flush` of the [`MqttIo`] while it stalls.)
//! [`MqttLayer::on_connack_timeout`] tells someone else, such as a circuit breaker.
//!
//! An MQTT 5 client that chose an Authentication Method may go through AUTH rounds with
//! the broker before its CONNACK (enhanced authentication). The broker's first AUTH
//! proves it up: from then on the clock starts again at each of its AUTH packets (each
//! round has the whole `connack_timeout`, and a broker stalled mid-exchange is still
//! cut), and an expiry is refused as
//! [`MqttError::AuthTimeout`](crate::MqttError::AuthTimeout) (`auth_timeout`, CONNACK
//! `20 03 00 87 00`, "not authorized"), which is not reported to `on_connack_timeout`:
//! the client may be the one that stalls, and clients must not be able to open the
//! circuit against a healthy broker. Such a connection reports, as its CONNACK latency,
//! the round trip to the broker's first AUTH: its answer to the CONNECT.
//!
//! A stalled broker, with a circuit breaker told of its timeouts:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use std::time::Duration;
//! use aegis_core::Conn;
//! use aegis_layers::circuit_breaker::CircuitBreakerLayer;
//! use aegis_mqtt::layer::{MqttIo, MqttLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! let breaker = CircuitBreakerLayer::builder("upstream").build(); // around the connector
//! let handle = breaker.handle();
//! // A stalled broker: it reads everything and never answers.
//! let broker = service_fn(|mut io: MqttIo<Conn<DuplexStream>>| async move {
//!     io.read_to_end(&mut Vec::new()).await
//! });
//! let svc = MqttLayer::default()
//!     .connack_timeout(Duration::from_millis(50))
//!     .on_connack_timeout(move || handle.record_failure())
//!     .layer(broker);
//!
//! let (mut client, server) = tokio::io::duplex(1024);
//! let io = Conn::new(server, "192.0.2.1:4000".parse()?, "127.0.0.1:1883".parse()?);
//! let conn = tokio::spawn(svc.oneshot(io));
//! let connect = [0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a'];
//! client.write_all(&connect).await?;
//! let mut answer = Vec::new();
//! client.read_to_end(&mut answer).await?;
//! assert_eq!(answer, [0x20, 0x02, 0x00, 0x03]); // CONNACK: server unavailable
//! let err = conn.await?.unwrap_err();
//! let cause = aegis_core::error::find::<aegis_mqtt::MqttError>(&*err);
//! assert_eq!(cause, Some(&aegis_mqtt::MqttError::ConnackTimeout));
//! # Ok(())
//! # }
//! ```
//!
//! # When the broker closes before its CONNACK
//!
//! A TCP load balancer with no healthy backend, a broker restarting or one that drops
//! the connection accepts the TCP connection and then closes it without a CONNACK. The
//! proxy forwards that EOF to the client's side as a write shutdown, and [`MqttIo`]
//! answers the CONNECT there instead of closing in silence: if no byte of a CONNACK has
//! gone out to the client and the broker's stream ended between two packets (after
//! whole MQTT 5 AUTH packets, say), the client gets the gateway's own `20 02 00 03`
//! (3.1 / 3.1.1) or `20 03 00 88 00` (5.0), then EOF, and the connection ends with
//! [`MqttError::UpstreamClosed`](crate::MqttError::UpstreamClosed)
//! (`aegis_rejections_total{layer="mqtt", reason="upstream_closed"}`). A client that
//! does not take the answer within 5 seconds is closed without it. A broker that died
//! inside a packet (or of its CONNACK) gets nothing appended to the half packet, and a
//! refusal already under way (a CONNACK timeout that answered) keeps its own answer.
//! Nor is anything added once the client has ended its side: an MQTT 5 client of an
//! enhanced authentication whose DISCONNECT or EOF was read before the CONNACK gets no
//! CONNACK of the gateway's when the broker then closes (as it should after a
//! DISCONNECT); the connection ends with EOF and nothing is counted, so that no client
//! can raise `upstream_closed`, an outage signal, at will.
//! The security layer counts `upstream_closed` toward no ban (an outage is not the
//! clients' doing), and it is no failure for a circuit breaker judged by the broker's
//! first read (an end before the first byte counts for nothing). A broker that resets
//! the connection instead (it closed with the CONNECT unread) gets the same answer
//! through [`aegis_core::proxy`], which shuts the client's side down when the
//! upstream's read fails before its first byte, as at its EOF.
//!
//! # Metrics
//!
//! | Metric | Type | Labels |
//! |---|---|---|
//! | `aegis_mqtt_broker_refusals_total` | counter | `reason`: `bad_credentials` (3.x return code 4, 5.0 reason code 0x86), `not_authorized` (3.x 5, 5.0 0x87), `bad_auth_method` (5.0 0x8C), `other` (any other refusing code: server unavailable or busy, a client id refused, a client the broker banned, a quota...) |
//!
//! The layer's own refusals are counted in `aegis_rejections_total{layer="mqtt",
//! reason}`; the policy's own metrics are in its module, `policy`.
#![cfg_attr(feature = "policy", doc = include_str!("policy.md"))]

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;

mod future;
mod io;
#[allow(clippy::module_inception)] // the house split: `layer.rs` holds the `Layer`
mod layer;
#[cfg(feature = "policy")]
#[cfg_attr(docsrs, doc(cfg(feature = "policy")))]
pub mod policy;
mod rate;
mod service;
mod unavailable;

/// The client id of an accepted CONNECT as one `Arc<str>`, made at the first use: the
/// security layer (for its events and bans) and the policy (for its per-client state)
/// keep the same allocation for the connection's life.
#[derive(Debug)]
pub(crate) struct SharedId<'a> {
    id: &'a str,
    shared: Option<Arc<str>>,
}

#[cfg_attr(
    not(any(feature = "security", feature = "policy")),
    allow(
        dead_code,
        reason = "only the security layer and the policy share the id"
    )
)]
impl<'a> SharedId<'a> {
    pub(crate) const fn new(id: &'a str) -> Self {
        Self { id, shared: None }
    }

    /// The id, allocated at the first call and shared from then on.
    pub(crate) fn get(&mut self) -> Arc<str> {
        let id = self.id;
        Arc::clone(self.shared.get_or_insert_with(|| Arc::from(id)))
    }
}

/// The metric names of the layer (see the [module docs](self#metrics)).
pub mod metrics {
    /// `aegis_mqtt_broker_refusals_total{reason}`: CONNECTs the broker's CONNACK refused,
    /// by `reason`: `bad_credentials`, `not_authorized`, `bad_auth_method` or `other`.
    pub const BROKER_REFUSALS_TOTAL: &str = "aegis_mqtt_broker_refusals_total";

    pub(super) fn broker_refusal(reason: &'static str) {
        metrics::counter!(BROKER_REFUSALS_TOTAL, "reason" => reason).increment(1);
    }
}

pub use self::future::ResponseFuture;
pub use self::io::MqttIo;
pub use self::layer::{MqttLayer, NoPolicy};
#[cfg(feature = "policy")]
pub use self::policy::{Policy, PolicyBuilder};
pub use self::rate::{OverRate, PacketRate};
pub use self::service::Mqtt;
pub use self::unavailable::{Unavailable, UnavailableFuture};

/// The gateway's own answers (SUBACK, PUBACK, PUBREC) queued for a client, boxed: most
/// connections never have one, and the queue lives as long as the connection.
pub(crate) type Answers = Option<Box<bytes::BytesMut>>;

/// Writes the rest of the gateway's `answer` to the client (`written` bytes of it are
/// out), then flushes. A client that fails or stops taking the answer is closed all the
/// same: the rest is given up. `Pending` only while the client's socket is full.
pub(crate) fn poll_write_answer<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    answer: &[u8],
    written: &mut usize,
) -> Poll<()> {
    while *written < answer.len() {
        match Pin::new(&mut *io).poll_write(cx, &answer[*written..]) {
            Poll::Ready(Ok(n)) if n > 0 => *written += n,
            Poll::Ready(_) => break,
            Poll::Pending => return Poll::Pending,
        }
    }
    Pin::new(io).poll_flush(cx).map(drop)
}

/// What the layer hands to each connection's [`MqttIo`].
#[derive(Debug, Clone)]
pub(crate) struct IoOptions {
    pub(crate) rate: Option<PacketRate>,
    pub(crate) enforce_keep_alive: bool,
    pub(crate) connack_latency: Option<ConnackLatency>,
    /// How long the broker has to send its CONNACK; `None`: no limit.
    pub(crate) connack_timeout: Option<Duration>,
    pub(crate) on_connack_timeout: Option<OnConnackTimeout>,
    /// How long a packet begun after the CONNECT has to be complete.
    pub(crate) packet_timeout: Duration,
}

impl IoOptions {
    /// The layer's defaults.
    pub(crate) const fn new() -> Self {
        Self {
            rate: None,
            enforce_keep_alive: false,
            connack_latency: None,
            connack_timeout: None,
            on_connack_timeout: None,
            packet_timeout: DEFAULT_PACKET_TIMEOUT,
        }
    }
}

impl Default for IoOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// A shared callback, cheap to clone into every connection.
#[derive(Clone)]
pub(crate) struct Hook<A>(Arc<dyn Fn(A) + Send + Sync>);

impl<A> Hook<A> {
    pub(crate) fn new(f: impl Fn(A) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    pub(crate) fn call(&self, a: A) {
        (self.0)(a);
    }
}

impl<A> std::fmt::Debug for Hook<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook(..)")
    }
}

/// What a connection calls once when its CONNACK timeout fires (set with
/// [`MqttLayer::on_connack_timeout`]).
pub(crate) type OnConnackTimeout = Hook<()>;

/// Receives the CONNECT to CONNACK round trip of each accepted connection: from the
/// moment the inner service is called with the validated CONNECT (it connects to the
/// broker and forwards it; behind this crate's authenticator, from its decision) to the
/// moment the broker's CONNACK is written to the client.
///
/// Set with [`MqttLayer::connack_latency`]. This is the latency an adaptive controller
/// should watch in a byte-stream stack, where one call lasts a whole connection: feed it
/// to `aegis_layers::adaptive::AdaptiveHandle::record`. A CONNACK the gateway writes
/// itself (such as [`Unavailable`]'s) is not a round trip and is not reported; neither
/// is the CONNACK of an MQTT 5 enhanced authentication whose broker sent AUTH first (the
/// round trip holds the client's own AUTH answers).
#[derive(Clone, Debug)]
pub struct ConnackLatency(Hook<Duration>);

impl ConnackLatency {
    /// Calls `f` with each round trip.
    pub fn new(f: impl Fn(Duration) + Send + Sync + 'static) -> Self {
        Self(Hook::new(f))
    }

    pub(crate) fn report(&self, latency: Duration) {
        self.0.call(latency);
    }
}

/// What a connection's policy decided about one packet.
#[derive(Debug)]
#[cfg_attr(not(feature = "policy"), allow(dead_code))] // only a policy decides
pub(crate) enum Verdict {
    /// Forward it to the inner service.
    Forward,
    /// Keep it from the inner service (any answer is queued).
    Drop,
    /// Refuse the connection.
    Refuse(crate::MqttError),
}

/// Without the `policy` feature no connection has a policy: an uninhabited stand-in keeps
/// the layer's code free of `cfg`s.
#[cfg(not(feature = "policy"))]
mod policy {
    use crate::{Connect, MqttError, Packet};

    #[derive(Debug)]
    pub(crate) enum ConnPolicy {}

    impl ConnPolicy {
        pub(crate) fn on_connect(
            &mut self,
            _: &Connect<'_>,
            _: &mut super::SharedId<'_>,
        ) -> Result<(), MqttError> {
            match *self {}
        }

        pub(crate) fn check(&mut self, _: &Packet<'_>, _: usize) -> super::Verdict {
            match *self {}
        }

        pub(crate) fn answers(&mut self) -> &mut super::Answers {
            match *self {}
        }

        pub(crate) fn ack_credit(&mut self) -> Option<&mut u16> {
            match *self {}
        }
    }

    pub(crate) fn written(_: &mut super::Answers, _: usize) {}
}

/// The default time a client has to send its CONNECT.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The default time a packet begun after the CONNECT has to be complete
/// ([`MqttLayer::packet_timeout`]).
pub const DEFAULT_PACKET_TIMEOUT: Duration = Duration::from_secs(60);

#[cfg(test)]
mod tests {
    use super::*;

    /// The security layer and the policy get one allocation of the client id between
    /// them, made only when one of them asks.
    #[test]
    fn a_shared_id_is_allocated_once_and_only_on_demand() {
        let mut id = SharedId::new("sensor-7");
        assert!(id.shared.is_none());
        let a = id.get();
        let b = id.get();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(&*a, "sensor-7");
    }
}
