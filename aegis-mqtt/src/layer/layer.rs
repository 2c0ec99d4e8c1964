use std::time::Duration;

use tower_layer::Layer;

use super::{
    ConnackLatency, DEFAULT_CONNECT_TIMEOUT, IoOptions, Mqtt, OnConnackTimeout, PacketRate,
};
use crate::Config;

/// Applies [`Mqtt`] to a byte-stream service: validates the CONNECT and every later
/// client packet. See the [module docs](super) for an example.
///
/// `P` is the per-packet policy: [`NoPolicy`] until one is attached with
/// `MqttLayer::policy` (feature `policy`). A layer is cheap to clone.
#[derive(Debug, Clone)]
#[must_use]
pub struct MqttLayer<P = NoPolicy> {
    pub(super) config: Config,
    pub(super) connect_timeout: Duration,
    pub(super) io: IoOptions,
    #[cfg_attr(not(feature = "policy"), allow(dead_code))] // `NoPolicy` is never read
    pub(super) policy: P,
}

/// The policy parameter of an [`MqttLayer`] without a per-packet policy.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPolicy;

impl MqttLayer {
    /// Validates with `config`, gives a client 10 s to send its CONNECT and 60 s to
    /// finish each later packet it begins, and does not limit the packet rate.
    pub const fn new(config: Config) -> Self {
        Self {
            config,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            io: IoOptions::new(),
            policy: NoPolicy,
        }
    }
}

impl<P> MqttLayer<P> {
    /// Limits each connection's packets after the CONNECT (none by default).
    pub const fn packet_rate(mut self, rate: PacketRate) -> Self {
        self.io.rate = Some(rate);
        self
    }

    /// Closes a connection that sends no packet for one and a half times its keep-alive
    /// (`keep_alive_timeout`; MQTT 5: DISCONNECT 0x8D), as the broker itself must
    /// ([MQTT-3.1.2-24], v5 [MQTT-3.1.2-22]). The keep-alive is the CONNECT's, or the
    /// Server Keep Alive of an MQTT 5 CONNACK ([MQTT-3.2.2-21]), counted from the
    /// broker's CONNACK (the layer reads nothing after the CONNECT before it). Off by
    /// default, since the broker enforces it too; turn it on to spare the broker idle
    /// connections.
    pub const fn enforce_keep_alive(mut self) -> Self {
        self.io.enforce_keep_alive = true;
        self
    }

    /// Reports each connection's CONNECT to CONNACK round trip through the broker to
    /// `latency` (none by default); see [`ConnackLatency`]. A connection whose broker
    /// answers with AUTH (MQTT 5 enhanced authentication) reports the round trip to that
    /// first AUTH, the broker's answer to the CONNECT: the rounds after it hold the
    /// client's own answers.
    ///
    /// ```
    /// use std::time::Duration;
    /// use aegis_mqtt::Config;
    /// use aegis_mqtt::layer::{ConnackLatency, MqttLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use aegis_layers::adaptive::RateConfig;
    /// let control = RateConfig::new(Duration::from_millis(50), 10.0, 1000.0).spawn(|_rate: f64| {});
    /// let handle = control.clone();
    /// let layer = MqttLayer::new(Config::new())
    ///     .connack_latency(ConnackLatency::new(move |rtt| handle.record(rtt)));
    /// # let _ = layer;
    /// # }
    /// ```
    pub fn connack_latency(mut self, latency: ConnackLatency) -> Self {
        self.io.connack_latency = Some(latency);
        self
    }

    /// Answers the client "server unavailable" itself (`20 02 00 03` for 3.1 / 3.1.1,
    /// `20 03 00 88 00` for 5.0) when the broker's CONNACK has not started going out
    /// within `timeout` of the validated CONNECT going to the inner service, and closes
    /// (`connack_timeout`). Off by default. See the [module
    /// docs](super#when-the-broker-is-stalled).
    ///
    /// MQTT 5 enhanced authentication: once the broker has sent AUTH (a challenge to a
    /// CONNECT with an Authentication Method), it is up, and the exchange goes on at the
    /// client's pace too. The clock then starts again at each of the broker's AUTH
    /// packets, so that each round has `timeout`, and a CONNACK still missing at the end
    /// of one is refused as `auth_timeout` (CONNACK `20 03 00 87 00`, "not authorized"),
    /// which is no broker failure: [`on_connack_timeout`](Self::on_connack_timeout) is
    /// not called.
    pub const fn connack_timeout(mut self, timeout: Duration) -> Self {
        self.io.connack_timeout = Some(timeout);
        self
    }

    /// Calls `f` once for each connection refused by the
    /// [`connack_timeout`](Self::connack_timeout) as `connack_timeout` (nothing by
    /// default): to count a stalled broker as a failure, for example with
    /// `aegis_layers::circuit_breaker::CircuitHandle::record_failure`. Not for an
    /// `auth_timeout`: a broker that sent AUTH is up, and the client may be the one
    /// stalling (otherwise a few unauthenticated clients that never answer the challenge
    /// could open the circuit at will).
    pub fn on_connack_timeout(mut self, f: impl Fn() + Send + Sync + 'static) -> Self {
        self.io.on_connack_timeout = Some(OnConnackTimeout::new(move |()| f()));
        self
    }

    /// How long a client has to finish a packet it has begun after the CONNECT, from the
    /// packet's first byte (60 s by default,
    /// [`DEFAULT_PACKET_TIMEOUT`](super::DEFAULT_PACKET_TIMEOUT)); bytes trickling in do
    /// not extend it. A client that has not is refused as `packet_timeout` (MQTT 5:
    /// DISCONNECT 0x8D, as for the keep-alive; 3.x: closed), which also lets go of the
    /// bytes held for the packet. Holds whatever the keep-alive (0 included) and whether
    /// it is enforced. `Duration::MAX` means, in practice, never; `Duration::ZERO`
    /// refuses any packet that does not arrive in one read (a large one seldom does).
    /// The clock starts when a read finds the packet incomplete: a partial packet behind
    /// packets the rate limit holds starts its clock once those are read. See the
    /// [module docs](super).
    pub const fn packet_timeout(mut self, timeout: Duration) -> Self {
        self.io.packet_timeout = timeout;
        self
    }

    /// How long a client has to send a complete CONNECT (and to take the answer to a
    /// refused one). A client that has not sent it by then is refused as
    /// `connect_timeout` ([`MqttError::ConnectTimeout`](crate::MqttError::ConnectTimeout)),
    /// closed without an answer; one that has not taken the answer to a refusal is
    /// counted under that refusal's reason.
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Applies `policy` (rate tiers per client address and client id) to every
    /// connection; the stream then needs the [`ClientAddr`](aegis_core::ClientAddr)
    /// param. See the [`policy` module](super::policy).
    #[cfg(feature = "policy")]
    #[cfg_attr(docsrs, doc(cfg(feature = "policy")))]
    pub fn policy(self, policy: super::Policy) -> MqttLayer<super::Policy> {
        MqttLayer {
            config: self.config,
            connect_timeout: self.connect_timeout,
            io: self.io,
            policy,
        }
    }
}

impl Default for MqttLayer {
    fn default() -> Self {
        Self::new(Config::new())
    }
}

impl<S, P: Clone> Layer<S> for MqttLayer<P> {
    type Service = Mqtt<S, P>;

    fn layer(&self, inner: S) -> Self::Service {
        Mqtt {
            inner,
            layer: self.clone(),
        }
    }
}
