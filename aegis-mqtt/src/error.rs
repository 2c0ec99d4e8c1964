//! Typed rejections and the answer each one calls for.

use crate::Version;
use crate::encode;

/// Why a packet or a connection was refused.
///
/// The `&'static str` fields name the rule that was broken; they never hold client input,
/// so `Display` is safe to log and [`label`](aegis_core::error::Reject::label) is a fixed
/// string. Use [`MqttError::answer`] (or [`Session::answer`](crate::Session::answer)) for
/// the bytes the gateway must send before closing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MqttError {
    /// The bytes do not form a valid packet (v5 reason 0x81).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A well-formed packet that breaks the protocol (v5 reason 0x82).
    #[error("protocol error: {0}")]
    ProtocolError(&'static str),
    /// A known protocol name with a level that does not go with it.
    #[error("unsupported protocol level {level}")]
    UnsupportedVersion {
        /// The protocol level the client sent.
        level: u8,
    },
    /// A protocol name that is neither `MQTT` nor `MQIsdp`.
    #[error("unknown protocol name")]
    UnknownProtocol,
    /// The client identifier is refused.
    #[error("client identifier rejected: {0}")]
    ClientId(&'static str),
    /// A packet over the size limit, refused from its fixed header alone.
    #[error("packet of at least {size} bytes is over the limit of {max}")]
    PacketTooLarge {
        /// The packet's size, as its fixed header declares it.
        size: usize,
        /// The limit in force.
        max: usize,
    },
    /// The requested keep-alive is outside the configured limit (0 means "none").
    #[error("keep-alive of {requested} s is outside the limit of {max} s")]
    KeepAlive {
        /// The keep-alive the client asked for, in seconds.
        requested: u16,
        /// The configured maximum, in seconds.
        max: u16,
    },
    /// A Topic Name that is empty or holds a wildcard (v5 reason 0x90).
    #[error("invalid topic name: {0}")]
    TopicName(&'static str),
    /// A Topic Filter that breaks the wildcard rules (v5 reason 0x8F).
    #[error("invalid topic filter: {0}")]
    TopicFilter(&'static str),
    /// A packet beyond what the broker's CONNACK announced (MQTT 5).
    #[error("beyond the server's announced limits: {0}")]
    ServerLimit(Limit),
    /// Refused by policy (authentication or authorization).
    #[error("not authorized")]
    NotAuthorized,
    /// The authenticator could not decide (it failed, timed out or is unreachable): the
    /// gateway fails closed, answering as [`NotAuthorized`](Self::NotAuthorized).
    #[error("authentication unavailable")]
    AuthError,
    /// The client address, client id or username is banned (v5 reason 0x8A; 3.x gets
    /// 0x05 "not authorized").
    #[error("banned")]
    Banned,
    /// A message blocked by payload inspection where the gateway cannot just drop it (a
    /// CONNECT's will message): answered as [`NotAuthorized`](Self::NotAuthorized).
    #[error("message blocked by inspection")]
    PayloadBlocked,
    /// The broker behind the gateway cannot be reached.
    #[error("server unavailable")]
    ServerUnavailable,
    /// The broker took the connection but sent no CONNACK in time (with
    /// `MqttLayer::connack_timeout`): answered as [`ServerUnavailable`](Self::ServerUnavailable).
    #[error("no CONNACK from the server in time")]
    ConnackTimeout,
    /// The broker took the connection, then closed it before any CONNACK (a TCP load
    /// balancer with no healthy backend, a broker restarting, a broker that drops the
    /// connection): answered as [`ServerUnavailable`](Self::ServerUnavailable).
    #[error("the server closed the connection before its CONNACK")]
    UpstreamClosed,
    /// An MQTT 5 enhanced authentication (a CONNECT with an Authentication Method) that
    /// did not end with a CONNACK in time: the broker answered with AUTH, so it is up,
    /// and either side may have stalled the exchange (with `MqttLayer::connack_timeout`,
    /// which then bounds each round). Answered as [`NotAuthorized`](Self::NotAuthorized);
    /// never a broker failure.
    #[error("enhanced authentication not completed in time")]
    AuthTimeout,
    /// The gateway is shedding load.
    #[error("server busy")]
    ServerBusy,
    /// A quota (connections, subscriptions, bytes) is exhausted.
    #[error("quota exceeded")]
    QuotaExceeded,
    /// Too many connection attempts.
    #[error("connection rate exceeded")]
    ConnectionRate,
    /// Too many CONNECTs from this client address under the layer's
    /// `Policy` (`layer::Policy`, a brute-force brake): MQTT 3.x gets CONNACK 0x05
    /// "not authorized", which a client does not retry blindly, MQTT 5 gets 0x9F.
    #[error("CONNECT rate of this client address exceeded")]
    ConnectRate,
    /// A CONNECT from a client address the `Policy`'s `connect` tier does not track,
    /// refused by the tier's shared overflow bucket: the tier tracks its `max_keys`
    /// addresses already, and every other address shares one address's budget, which
    /// others' CONNECTs may have drained. Answered as [`ConnectRate`](Self::ConnectRate);
    /// not the client's own rate, so `aegis_mqtt::security` counts it toward no ban.
    #[error(
        "CONNECT rate exceeded in the shared overflow bucket (too many client addresses tracked)"
    )]
    ConnectOverflow,
    /// Too many packets or bytes per second from this client.
    #[error("message rate too high")]
    MessageRate,
    /// A packet of a client id the `Policy`'s tier does not track, over the tier's
    /// shared overflow bucket where the packet cannot just be dropped (as for
    /// [`MessageRate`](Self::MessageRate)): the tier tracks its `max_keys` ids already,
    /// and every other id shares one id's budget. Answered as
    /// [`MessageRate`](Self::MessageRate); not the client's own rate, so
    /// `aegis_mqtt::security` counts it toward no ban.
    #[error("message rate exceeded in the shared overflow bucket (too many client ids tracked)")]
    MessageOverflow,
    /// Nothing arrived within 1.5 times the keep-alive.
    #[error("keep-alive timeout")]
    KeepAliveTimeout,
    /// A packet begun after the CONNECT was not complete within the layer's
    /// `MqttLayer::packet_timeout` of its first byte: answered as
    /// [`KeepAliveTimeout`](Self::KeepAliveTimeout) (MQTT 5: DISCONNECT 0x8D; 3.x:
    /// close).
    #[error("packet not completed in time")]
    PacketTimeout,
    /// No complete CONNECT within the layer's `MqttLayer::connect_timeout`: closed
    /// without an answer (the CONNECT's version may not be known yet).
    #[error("no complete CONNECT in time")]
    ConnectTimeout,
}

impl aegis_core::error::Reject for MqttError {
    fn layer(&self) -> &'static str {
        "mqtt"
    }

    fn label(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::ProtocolError(_) => "protocol_error",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::UnknownProtocol => "unknown_protocol",
            Self::ClientId(_) => "client_id",
            Self::PacketTooLarge { .. } => "packet_too_large",
            Self::KeepAlive { .. } => "keep_alive",
            Self::TopicName(_) => "topic_name",
            Self::TopicFilter(_) => "topic_filter",
            Self::ServerLimit(_) => "server_limit",
            Self::NotAuthorized => "not_authorized",
            Self::AuthError => "auth_error",
            Self::Banned => "banned",
            Self::PayloadBlocked => "payload_blocked",
            Self::ServerUnavailable => "server_unavailable",
            Self::ConnackTimeout => "connack_timeout",
            Self::UpstreamClosed => "upstream_closed",
            Self::AuthTimeout => "auth_timeout",
            Self::ServerBusy => "server_busy",
            Self::QuotaExceeded => "quota_exceeded",
            Self::ConnectionRate => "connection_rate",
            Self::ConnectRate => "connect_rate",
            Self::ConnectOverflow => "connect_overflow",
            Self::MessageRate => "message_rate",
            Self::MessageOverflow => "message_overflow",
            Self::KeepAliveTimeout => "keep_alive_timeout",
            Self::PacketTimeout => "packet_timeout",
            Self::ConnectTimeout => "connect_timeout",
        }
    }
}

/// A capability or limit the broker announced in its MQTT 5 CONNACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Limit {
    /// PUBLISH above Maximum `QoS` ([MQTT-3.2.2-11]; reason 0x9B).
    #[error("QoS above the server's maximum")]
    QoS,
    /// RETAIN while Retain Available is 0 ([MQTT-3.2.2-14]; reason 0x9A).
    #[error("retain not available")]
    Retain,
    /// A Topic Alias above Topic Alias Maximum ([MQTT-3.2.2-17], [MQTT-3.2.2-18]; 0x94).
    #[error("topic alias above the server's maximum")]
    TopicAlias,
    /// A wildcard filter while Wildcard Subscription Available is 0 (reason 0xA2).
    #[error("wildcard subscriptions not available")]
    Wildcard,
    /// A Subscription Identifier while they are not available (reason 0xA1).
    #[error("subscription identifiers not available")]
    SubscriptionId,
    /// A shared subscription while they are not available (reason 0x9E).
    #[error("shared subscriptions not available")]
    Shared,
}

impl Limit {
    const fn reason(self) -> u8 {
        match self {
            Self::QoS => 0x9B,
            Self::Retain => 0x9A,
            Self::TopicAlias => 0x94,
            Self::Wildcard => 0xA2,
            Self::SubscriptionId => 0xA1,
            Self::Shared => 0x9E,
        }
    }
}

/// Where in the connection a rejection happens, which decides the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Until the broker's CONNACK went out: while reading the CONNECT, or after it and
    /// before the CONNACK; the version, if the CONNECT got that far.
    Connect(Option<Version>),
    /// After the broker's CONNACK went out.
    Connected(Version),
}

/// What the gateway sends before it closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Close without sending anything.
    Close,
    /// An MQTT 3.1 / 3.1.1 CONNACK with this return code, then close.
    ConnackV3(u8),
    /// An MQTT 5 CONNACK with this reason code, then close.
    ConnackV5(u8),
    /// An MQTT 5 DISCONNECT with this reason code, then close.
    DisconnectV5(u8),
}

impl Answer {
    /// The bytes to send, empty for [`Answer::Close`].
    pub fn bytes(&self) -> Vec<u8> {
        match *self {
            Self::Close => Vec::new(),
            Self::ConnackV3(rc) => encode::connack_v3(rc).to_vec(),
            Self::ConnackV5(rc) => encode::connack_v5(rc).to_vec(),
            Self::DisconnectV5(rc) => encode::disconnect_v5(rc).to_vec(),
        }
    }
}

impl MqttError {
    /// The version-correct answer to this rejection.
    ///
    /// MQTT 3.1 and 3.1.1 only know CONNACK return codes 1 to 5: a malformed CONNECT or
    /// one that no return code fits closes without a CONNACK ([MQTT-3.1.4-1],
    /// [MQTT-3.2.2-6]), and every rejection after the CONNECT just closes. MQTT 5 answers
    /// a CONNECT with a CONNACK reason code and later packets with a DISCONNECT.
    pub fn answer(&self, phase: Phase) -> Answer {
        use crate::encode::reason as r;
        match phase {
            Phase::Connect(version) => {
                if let Self::UnsupportedVersion { .. } = self {
                    // A level this crate does not know gets the 3.1.1 answer
                    // [MQTT-3.1.2-2]; an MQTT 5 client refused by `Config::versions` gets
                    // its own version's CONNACK.
                    return match version {
                        Some(Version::V5) => Answer::ConnackV5(r::UNSUPPORTED_PROTOCOL_VERSION),
                        _ => Answer::ConnackV3(r::V3_UNACCEPTABLE_VERSION),
                    };
                }
                match version {
                    None => Answer::Close,
                    Some(Version::V5) => match self.v5_connack_code() {
                        Some(rc) => Answer::ConnackV5(rc),
                        None => Answer::Close,
                    },
                    Some(_) => match self {
                        Self::ClientId(_) => Answer::ConnackV3(r::V3_IDENTIFIER_REJECTED),
                        Self::NotAuthorized
                        | Self::AuthError
                        | Self::AuthTimeout
                        | Self::Banned
                        | Self::PayloadBlocked
                        | Self::ConnectRate
                        | Self::ConnectOverflow => Answer::ConnackV3(r::V3_NOT_AUTHORIZED),
                        Self::ServerUnavailable
                        | Self::ConnackTimeout
                        | Self::UpstreamClosed
                        | Self::ServerBusy
                        | Self::QuotaExceeded
                        | Self::ConnectionRate => Answer::ConnackV3(r::V3_SERVER_UNAVAILABLE),
                        _ => Answer::Close,
                    },
                }
            }
            Phase::Connected(Version::V5) => Answer::DisconnectV5(self.v5_disconnect_code()),
            Phase::Connected(_) => Answer::Close,
        }
    }

    fn v5_connack_code(&self) -> Option<u8> {
        use crate::encode::reason as r;
        Some(match self {
            Self::Malformed(_) => r::MALFORMED_PACKET,
            Self::ProtocolError(_) | Self::TopicFilter(_) | Self::ServerLimit(_) => {
                r::PROTOCOL_ERROR
            }
            Self::UnsupportedVersion { .. } => r::UNSUPPORTED_PROTOCOL_VERSION,
            Self::ClientId(_) => r::CLIENT_IDENTIFIER_NOT_VALID,
            Self::PacketTooLarge { .. } => r::PACKET_TOO_LARGE,
            // "The CONNECT packet is valid but is not accepted by this Server."
            Self::KeepAlive { .. } => r::IMPLEMENTATION_SPECIFIC_ERROR,
            Self::TopicName(_) => r::TOPIC_NAME_INVALID,
            Self::NotAuthorized | Self::AuthError | Self::AuthTimeout | Self::PayloadBlocked => {
                r::NOT_AUTHORIZED
            }
            Self::Banned => r::BANNED,
            Self::ServerUnavailable | Self::ConnackTimeout | Self::UpstreamClosed => {
                r::SERVER_UNAVAILABLE
            }
            Self::ServerBusy | Self::MessageRate | Self::MessageOverflow => r::SERVER_BUSY,
            Self::QuotaExceeded => r::QUOTA_EXCEEDED,
            Self::ConnectionRate | Self::ConnectRate | Self::ConnectOverflow => {
                r::CONNECTION_RATE_EXCEEDED
            }
            Self::UnknownProtocol
            | Self::KeepAliveTimeout
            | Self::PacketTimeout
            | Self::ConnectTimeout => return None,
        })
    }

    fn v5_disconnect_code(&self) -> u8 {
        use crate::encode::reason as r;
        match self {
            Self::Malformed(_) => r::MALFORMED_PACKET,
            Self::ProtocolError(_)
            | Self::UnsupportedVersion { .. }
            | Self::UnknownProtocol
            | Self::ClientId(_)
            | Self::KeepAlive { .. } => r::PROTOCOL_ERROR,
            Self::PacketTooLarge { .. } => r::PACKET_TOO_LARGE,
            Self::TopicName(_) => r::TOPIC_NAME_INVALID,
            Self::TopicFilter(_) => r::TOPIC_FILTER_INVALID,
            Self::ServerLimit(limit) => limit.reason(),
            Self::NotAuthorized | Self::AuthError | Self::AuthTimeout | Self::PayloadBlocked => {
                r::NOT_AUTHORIZED
            }
            Self::Banned => r::ADMINISTRATIVE_ACTION,
            // 0x88 (server unavailable) is not a DISCONNECT reason code.
            Self::ServerUnavailable
            | Self::ConnackTimeout
            | Self::UpstreamClosed
            | Self::ServerBusy => r::SERVER_BUSY,
            Self::QuotaExceeded => r::QUOTA_EXCEEDED,
            Self::ConnectionRate | Self::ConnectRate | Self::ConnectOverflow => {
                r::CONNECTION_RATE_EXCEEDED
            }
            Self::MessageRate | Self::MessageOverflow => r::MESSAGE_RATE_TOO_HIGH,
            // A connect timeout comes before any CONNACK: never a DISCONNECT.
            Self::KeepAliveTimeout | Self::PacketTimeout | Self::ConnectTimeout => {
                r::KEEP_ALIVE_TIMEOUT
            }
        }
    }
}
