//! The per-connection validator a layer feeds frames to.

use crate::error::{Answer, Phase};
use crate::framer::{Decoded, Framer};
use crate::packet::{self, AuthMethod, Ctx5, Packet};
use crate::properties::{ServerLimits, connack_limits};
use crate::{Config, MqttError, Version, connect, split_frame};

/// Validates the client-to-broker direction of one connection.
///
/// Feed it the bytes read from the client: [`Session::next`] frames the next packet with
/// the size cap of the current phase (small until [`Session::connack_sent`]) and validates
/// it. The first packet must be a valid CONNECT ([MQTT-3.1.0-1]); every later packet is
/// checked against the version the CONNECT chose. After the first error the session is
/// closed and every further call fails with the same error: the caller must send
/// [`Session::answer`] and close.
///
/// ```
/// use aegis_mqtt::{Config, Next, Packet, Session};
///
/// let mut session = Session::new(Config::new());
/// let bytes = [
///     0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a', // CONNECT
///     0x30, 0x05, 0, 1, b't', b'h', b'i', // PUBLISH "t" "hi"
/// ];
/// let Next::Packet { len, packet: Packet::Connect(c) } = session.next(&bytes).unwrap() else {
///     panic!()
/// };
/// assert_eq!(c.client_id, "a");
/// let Next::Packet { packet: Packet::Publish(p), .. } = session.next(&bytes[len..]).unwrap()
/// else {
///     panic!()
/// };
/// assert_eq!((p.topic, p.payload), ("t", &b"hi"[..]));
/// ```
#[derive(Debug, Clone)]
#[allow(clippy::struct_excessive_bools)] // independent facts about the connection
pub struct Session {
    config: Config,
    state: State,
    version: Option<Version>,
    expiry_zero: bool,
    /// The CONNECT's MQTT 5 Authentication Method, which every AUTH must repeat.
    auth_method: Option<AuthMethod>,
    connected: bool,
    /// Whether the broker's CONNACK went out ([`Session::connack_sent`]).
    connack_sent: bool,
    keep_alive: u16,
    /// What the broker's MQTT 5 CONNACK announced ([`Session::on_connack`]).
    limits: Option<ServerLimits>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    Connected,
    Disconnected,
    Failed(MqttError),
}

/// The result of [`Session::next`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next<'a> {
    /// At least this many more bytes are needed.
    NeedMore(usize),
    /// A valid packet of `len` bytes at the start of the buffer.
    Packet {
        /// The packet's total length: forward exactly these bytes.
        len: usize,
        /// The validated view.
        packet: Packet<'a>,
    },
}

impl Session {
    /// A session waiting for its CONNECT.
    pub const fn new(config: Config) -> Self {
        Self {
            config,
            state: State::AwaitingConnect,
            version: None,
            expiry_zero: true,
            auth_method: None,
            connected: false,
            connack_sent: false,
            keep_alive: 0,
            limits: None,
        }
    }

    /// The protocol version, once the CONNECT has shown it (even a refused one).
    pub const fn version(&self) -> Option<Version> {
        self.version
    }

    /// Whether the client's DISCONNECT has been read: it sends nothing more.
    #[cfg_attr(not(feature = "layer"), allow(dead_code))] // only the layer asks
    pub(crate) const fn disconnected(&self) -> bool {
        matches!(self.state, State::Disconnected)
    }

    /// The keep-alive in force, in seconds (0: none): the MQTT 5 Server Keep Alive of the
    /// broker's CONNACK if it sent one ([MQTT-3.2.2-21]), else the CONNECT's.
    pub const fn keep_alive(&self) -> u16 {
        match self.limits {
            Some(ServerLimits {
                keep_alive: Some(k),
                ..
            }) => k,
            _ => self.keep_alive,
        }
    }

    /// Whether a CONNECT has been accepted.
    pub const fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether the accepted CONNECT chose an MQTT 5 Authentication Method (enhanced
    /// authentication: AUTH packets may come before the CONNACK).
    #[cfg_attr(not(feature = "layer"), allow(dead_code))] // only the layer asks
    pub(crate) const fn auth_method(&self) -> bool {
        self.auth_method.is_some()
    }

    /// The configuration the session validates with.
    pub const fn config(&self) -> &Config {
        &self.config
    }

    /// Tells the session that the broker's CONNACK went to the client (the layer's
    /// `MqttIo` calls it when it sees the CONNACK written).
    ///
    /// Until then the client is not known to the broker, so its packets stay under the
    /// small CONNECT size cap; and an MQTT 5 client that chose an Authentication Method
    /// may send nothing but AUTH and DISCONNECT ([MQTT-3.1.2-30]).
    pub fn connack_sent(&mut self) {
        self.connack_sent = true;
    }

    /// Like [`Session::connack_sent`], given the broker's whole CONNACK packet: for an
    /// MQTT 5 session, its limits then bind the client (Maximum `QoS`, Retain Available,
    /// Topic Alias Maximum, Maximum Packet Size, Server Keep Alive, and Wildcard,
    /// Subscription Identifier and Shared Subscription availability). A CONNACK that
    /// cannot be read announces nothing.
    pub fn on_connack(&mut self, connack: &[u8]) {
        self.connack_sent = true;
        if self.version == Some(Version::V5) {
            self.limits = split_frame(connack)
                .ok()
                .filter(|&(first, _)| first == 0x20)
                .and_then(|(_, body)| connack_limits(body));
        }
    }

    /// The framer for the current phase: the CONNECT size cap until the CONNACK went out
    /// ([`Session::connack_sent`]), the packet size cap after (or the broker's Maximum
    /// Packet Size, if smaller).
    pub fn framer(&self) -> Framer {
        if !self.connack_sent {
            return Framer::new(self.config.max_connect_size);
        }
        let broker = self
            .limits
            .and_then(|l| l.max_packet_size)
            .map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        Framer::new(self.config.max_packet_size.min(broker))
    }

    /// Frames and validates the next packet at the start of `buf`.
    ///
    /// # Errors
    ///
    /// The first rule broken; the session is then closed.
    pub fn next<'a>(&mut self, buf: &'a [u8]) -> Result<Next<'a>, MqttError> {
        if let State::Failed(e) = self.state {
            return Err(e);
        }
        let frame = match self.framer().decode(buf) {
            Ok(Decoded::NeedMore(n)) => return Ok(Next::NeedMore(n)),
            Ok(Decoded::Frame(f)) => f,
            Err(e) => return Err(self.fail(e)),
        };
        let len = frame.len();
        let packet = self.validate(&buf[..len])?;
        Ok(Next::Packet { len, packet })
    }

    /// Validates one whole packet (as framed by [`Session::framer`]).
    ///
    /// # Errors
    ///
    /// The first rule broken; the session is then closed.
    pub fn validate<'a>(&mut self, frame: &'a [u8]) -> Result<Packet<'a>, MqttError> {
        let result = match self.state {
            State::Failed(e) => return Err(e),
            State::AwaitingConnect => {
                let r = connect::validate_connect(frame, &self.config);
                match r {
                    Ok(c) => {
                        self.version = Some(c.version);
                        self.expiry_zero = c.session_expiry == 0;
                        self.keep_alive = c.keep_alive;
                        self.auth_method = c.auth_method.map(AuthMethod::of);
                        self.state = State::Connected;
                        self.connected = true;
                        Ok(Packet::Connect(c))
                    }
                    Err(e) => {
                        self.version = connect::connect_version(frame);
                        Err(e)
                    }
                }
            }
            State::Disconnected => Err(MqttError::ProtocolError("packet after DISCONNECT")),
            State::Connected => {
                let ctx = Ctx5 {
                    version: self.version.unwrap_or(Version::V3_1_1),
                    session_expiry_zero: self.expiry_zero,
                    auth_method: self.auth_method,
                    limits: self.limits,
                    connack_sent: self.connack_sent,
                };
                let r =
                    split_frame(frame).and_then(|(first, body)| packet::validate(first, body, ctx));
                match r {
                    Ok(Packet::Disconnect(_)) => self.state = State::Disconnected,
                    Ok(Packet::Auth(_)) | Err(_) => {}
                    Ok(_) if self.auth_method.is_some() && !self.connack_sent => {
                        return Err(self.fail(MqttError::ProtocolError(
                            "packet other than AUTH or DISCONNECT before CONNACK",
                        )));
                    }
                    Ok(_) => {}
                }
                r
            }
        };
        result.map_err(|e| self.fail(e))
    }

    fn fail(&mut self, e: MqttError) -> MqttError {
        if !matches!(self.state, State::Failed(_)) {
            self.state = State::Failed(e);
        }
        e
    }

    /// The version-correct answer to `err` in this session's phase.
    pub fn answer(&self, err: &MqttError) -> Answer {
        err.answer(self.phase())
    }

    /// The phase for [`MqttError::answer`]: [`Phase::Connected`] once the broker's
    /// CONNACK went out ([`Session::connack_sent`]); until then, the CONNECT accepted or
    /// not, [`Phase::Connect`], so that an MQTT 5 client refused before any CONNACK gets
    /// a CONNACK, not a DISCONNECT, which may not come first [MQTT-3.14.0-1].
    pub fn phase(&self) -> Phase {
        match (self.is_connected() && self.connack_sent, self.version) {
            (true, Some(v)) => Phase::Connected(v),
            (_, v) => Phase::Connect(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Session;

    /// Every connection's `MqttIo` holds a session: the CONNECT's Authentication Method
    /// is kept as a four-byte hash in what was padding, so it costs no byte.
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn a_session_stays_small() {
        assert!(
            std::mem::size_of::<Session>() <= 104,
            "{}",
            std::mem::size_of::<Session>()
        );
    }
}
