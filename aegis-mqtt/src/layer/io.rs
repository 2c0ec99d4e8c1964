use std::borrow::Cow;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::error::{Rejected, reject};
use aegis_core::{ClientAddr, Handshake, LocalAddr, PeerAddr, Rewind};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::policy::{self, ConnPolicy};
use super::rate::Bucket;
use super::{ConnackLatency, IoOptions, OnConnackTimeout, Verdict, poll_write_answer};
use crate::{Connect, Decoded, MqttError, Next, Packet, Phase, Session, Version};

/// Each read from the client asks for this much room: a few small packets.
const READ_CHUNK: usize = 4096;

/// How long a refusal waits for the broker's packet in flight to reach the client (and
/// then for its DISCONNECT to go out) before the connection is cut without one: a client
/// that is reading takes the rest of a packet in far less, and one that is not must not
/// hold a refused connection open for long.
const REFUSAL_DEADLINE: Duration = Duration::from_secs(5);

/// A client connection whose reads only ever return whole, validated MQTT packets.
///
/// The inner service reads the client's original bytes: first the CONNECT, then every
/// later packet once it is complete and valid. Bytes of a packet still arriving are held
/// (at most that packet, whose size the framer holds to the configured packet size, or
/// one read of 4 KiB while its fixed header is incomplete), and the whole packet must
/// arrive within the layer's [`packet_timeout`](super::MqttLayer::packet_timeout) of its
/// first byte: past it the read fails with [`MqttError::PacketTimeout`], answered as the
/// keep-alive timeout.
///
/// Nothing the client sends after its CONNECT is read before the broker's CONNACK has
/// accepted the connection (3.1.1 [MQTT-3.1.4-5], 5.0 [MQTT-3.1.4-6]): a read after the
/// CONNECT waits (the bytes stay in the client's socket, and in order) and is woken when
/// the broker's whole CONNACK has been written. So a packet pipelined behind the CONNECT
/// is never validated, charged to a [policy](super#per-packet-policy) or forwarded for a
/// CONNECT the broker refuses. After a refusing CONNACK (3.x return code other than 0,
/// MQTT 5 reason code 0x80 or above) the read ends (EOF) and the gateway writes nothing
/// more: no answer to a packet, no DISCONNECT (3.1.1 [MQTT-3.2.2-5], 5.0
/// [MQTT-3.2.2-7]). The one exception is an MQTT 5 client that chose an Authentication
/// Method: its AUTH packets (and DISCONNECT) are read before the CONNACK, under the small
/// CONNECT size cap, and any other packet there is refused as a protocol error
/// [MQTT-3.1.2-30]. Its AUTH packets are read one per AUTH the broker has written, besides
/// one ahead of the broker's first: the broker leads the exchange (5.0 §4.12), and an AUTH
/// beyond that waits in the client's socket, with everything behind it (a DISCONNECT
/// too), the read held as before the CONNACK; a client flooding AUTH at a stalled broker
/// then fills neither the broker's socket nor the proxy's copy, and the CONNACK timeout
/// still fires. Its EOF before the CONNACK (a half-close, after a DISCONNECT or not) is
/// held too while a CONNACK timer runs: the read stays pending until the broker's CONNACK
/// (EOF then) or a refusal (the CONNACK timeout's, say), as it does for a client without
/// an Authentication Method, whose EOF is not read before the CONNACK; returned at once,
/// it would end a proxy's reads of the client and with them the CONNACK timer. With no
/// CONNACK timeout, nothing would ever end a held EOF (a broker that sent its challenge
/// waits for the client's answer): it is returned at once, and the broker gets the FIN.
/// Refused before any CONNACK, such a client gets a CONNACK with the reason code; if the
/// broker's accepting CONNACK goes out before the refusal's answer does, it gets the
/// DISCONNECT instead (never a second CONNACK). The first invalid packet is never
/// returned: the read fails with [`io::ErrorKind::InvalidData`]
/// wrapping the [`MqttError`] in an [`aegis_core::error::Rejected`] (counted once in
/// `aegis_rejections_total{layer="mqtt"}`), and so does every read after it: a proxy's
/// connection error then carries the rejection, which
/// [`label_of`](aegis_core::error::label_of) names and
/// [`find`](aegis_core::error::find) reaches.
///
/// Writes (broker to client) pass through untouched, but their packet boundaries are
/// followed, so that the client only ever sees whole packets. When the read reaches a
/// refusal while the broker is inside a packet (the client is slow to read, say), the
/// read stays pending and reads nothing more from the client; writes go on, but each
/// takes only the bytes up to the end of that packet (a write crossing it is cut short
/// there) and then waits. Once the packet is whole, the read writes, for MQTT 5, a server
/// DISCONNECT with the reason code ([`MqttError::answer`]) unless that packet was the
/// broker's own DISCONNECT, then fails; from then on
/// writes fail with [`io::ErrorKind::BrokenPipe`], so nothing follows the DISCONNECT.
/// MQTT 3.x has no such packet: the read fails once the packet is whole. The client
/// thus gets whole packets, the DISCONNECT (5.0), then EOF. If the packet cannot be
/// finished and the DISCONNECT written within 5 seconds (the client is not reading), the
/// read fails at once without a DISCONNECT, and writes fail after it all the same.
///
/// With a [CONNACK timeout](super::MqttLayer::connack_timeout), a broker whose CONNACK
/// has not started going out in time is refused the same way, from a read (a silent
/// client's too): the gateway's own "server unavailable" CONNACK takes the place of the
/// DISCONNECT, for every version, and the read then fails with
/// [`MqttError::ConnackTimeout`]; the broker's writes fail after it. Once the broker has
/// answered an MQTT 5 CONNECT with an Authentication Method with AUTH, the clock starts
/// again at each of its AUTH packets, and its expiry answers "not authorized" (CONNACK
/// 0x87) and fails the read with [`MqttError::AuthTimeout`] instead: the broker is up,
/// and the exchange may be stalled by the client.
///
/// A broker that closes its stream before any CONNACK (the proxy forwards its EOF as
/// [`poll_shutdown`](AsyncWrite::poll_shutdown), and `aegis_core`'s proxy a reset
/// before the broker's first byte: a TCP load balancer with no healthy backend, a
/// broker restarting) is answered the same way, with or without a CONNACK
/// timeout: if no byte of a CONNACK has gone out and the broker's stream ended between
/// two packets (an MQTT 5 broker may have sent whole AUTH packets first), the shutdown
/// first writes the gateway's own "server unavailable" CONNACK (`20 02 00 03`, or
/// `20 03 00 88 00` for 5.0; the client had a silent EOF before), within the same 5
/// seconds (a client that does not read is shut down without it), and the read then fails
/// with [`MqttError::UpstreamClosed`]. Nothing is added to half a packet, nor when a
/// refusal is under way (a CONNACK timeout's CONNACK went out, say), nor once the client
/// has ended its side before the CONNACK (its DISCONNECT or its EOF, read under enhanced
/// authentication: the broker then closes as it should, and nothing is counted): the read
/// then ends as before, EOF or that refusal. This is no broker failure for a circuit
/// breaker (its stream ended before its first byte) and, for the security layer, not the
/// client's doing.
///
/// With a [policy](super#per-packet-policy), a packet over one of its limits is never
/// returned, and the gateway's own SUBACK, PUBACK or PUBREC for it goes to the client
/// between two of the broker's packets, at the next read or write; the broker's next
/// bytes wait until it is written. Nothing from the gateway follows the broker's
/// DISCONNECT [MQTT-3.14.4-1]: its queued answers, and a refusal's DISCONNECT, are
/// dropped.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // independent facts about the connection
pub struct MqttIo<I> {
    io: Rewind<I>,
    /// Validated bytes not yet read by the inner service.
    ready: Bytes,
    /// Bytes read from the client and not validated yet.
    buf: BytesMut,
    session: Session,
    /// The refusal that ends the client's stream, once there is one (boxed: only a
    /// refused connection has one, and an idle session should not carry its room).
    refusal: Option<Box<Refusal>>,
    /// Where the broker-to-client stream is, to answer only between two packets.
    out: OutBoundary,
    /// What the broker may still write.
    writes: Writes,
    /// The packet rate limit, if any (boxed: most connections have none).
    bucket: Option<Box<Bucket>>,
    /// Whether the keep-alive is enforced.
    enforce_keep_alive: bool,
    /// When the last packet was released.
    last_packet: Instant,
    /// The keep-alive timer: created on the first wait, reset in place after that.
    idle: Option<Pin<Box<Sleep>>>,
    /// How long a packet begun after the CONNECT has to be complete.
    packet_timeout: Duration,
    /// The deadline of the packet begun in `buf`: created for the first packet that does
    /// not come whole, reset in place for each later one (while `packet_armed`).
    packet_timer: Option<Pin<Box<Sleep>>>,
    /// Whether `packet_timer` runs for the packet at the start of `buf`.
    packet_armed: bool,
    /// What waits for the broker's CONNACK, if anything; boxed and dropped once the
    /// CONNACK is out, since the connection may then stay open for hours.
    connack: Option<Box<ConnackWatch>>,
    /// The per-packet policy, if the layer has one; it also queues the gateway's own
    /// answers (SUBACK, PUBACK, PUBREC), written only between two broker packets.
    policy: Option<ConnPolicy>,
    /// Whether `ready` still holds the whole CONNECT (nothing read yet).
    connect_unread: bool,
    /// Whether the client's EOF came under [`Gate::Auth`], before the broker's CONNACK:
    /// the client ended its side, so the broker's end after it is no outage
    /// ([`poll_shutdown`](AsyncWrite::poll_shutdown) adds no CONNACK). While a CONNACK
    /// timer runs, the EOF is held, as the client's bytes are under [`Gate::Held`], until
    /// the broker's CONNACK or a refusal, so that the read stays pending and keeps the
    /// timer running; with none, it is returned at once (nothing would end the wait: a
    /// broker that sent its AUTH challenge waits for the client, and must get the FIN).
    client_eof: bool,
    /// Whether the client's packets after its CONNECT may be read yet.
    gate: Gate,
    /// Under [`Gate::Auth`], how many more AUTH packets of the client's may be read: one
    /// ahead of the broker's first AUTH, and one more at each AUTH of the broker's
    /// (saturating: a `u16` fits in the padding, and no exchange has 65 535 rounds).
    auth_credit: u16,
    /// The read waiting for the broker's CONNACK to open the [`Gate`] (or, under
    /// [`Gate::Auth`], for the broker's next AUTH).
    held: Option<Waker>,
}

/// Whether [`MqttIo`] reads the client's packets after its CONNECT. A server that
/// refuses a CONNECT must not process anything the client sent after it (3.1.1
/// [MQTT-3.1.4-5], 5.0 [MQTT-3.1.4-6]), so nothing after the CONNECT is validated,
/// charged to the policy's tiers or forwarded before the broker has accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Until the broker's whole CONNACK: nothing is read from the client (its bytes wait
    /// in its socket, or in the `Rewind` prefix).
    Held,
    /// An MQTT 5 client with an Authentication Method, until the broker's whole CONNACK:
    /// its AUTH and DISCONNECT packets are read (under the CONNECT size cap), and the
    /// session refuses any other [MQTT-3.1.2-30]. The broker leads the exchange (5.0
    /// §4.12: the client's AUTH answers the server's), so the client's AUTHs are read one
    /// per AUTH of the broker's, besides one ahead of the broker's first
    /// ([`MqttIo::auth_credit`]); an AUTH beyond that waits, with everything behind it, as
    /// under [`Gate::Held`]: a client flooding AUTH at a stalled broker holds neither more
    /// than a few packets of the broker's socket nor the proxy's copy, whose held read keeps
    /// the CONNACK timer running. The client's EOF waits too while a CONNACK timer runs
    /// ([`MqttIo::client_eof`]): the read that finds it is held until the CONNACK, or a
    /// refusal.
    Auth,
    /// The broker's CONNACK accepted the connection.
    Open,
    /// The broker's CONNACK refused it, or the broker's stream ended before a CONNACK:
    /// reads end (EOF, or the refusal `upstream_closed` whose CONNACK the shutdown
    /// wrote) without reading anything more, and the gateway writes nothing after that
    /// CONNACK (3.1.1 [MQTT-3.2.2-5], 5.0 [MQTT-3.2.2-7]).
    Refused,
}

/// A refusal of [`MqttIo`] and what ending the connection for it needs.
#[derive(Debug)]
struct Refusal {
    error: MqttError,
    /// A DISCONNECT or CONNACK being written and how much of it is out; `None` once done
    /// or skipped.
    answer: Option<(Vec<u8>, usize)>,
    /// The refusal's deadline: created when the read reaches the refusal.
    deadline: Option<Pin<Box<Sleep>>>,
    /// The read waiting for the broker's packet to be whole.
    read_waker: Option<Waker>,
    /// A write waiting for the refusal to end the connection.
    write_waker: Option<Waker>,
}

/// What [`MqttIo`] keeps until the broker's CONNACK goes out.
#[derive(Debug)]
struct ConnackWatch {
    /// Where the CONNECT to CONNACK round trip goes, and when the CONNECT went in.
    latency: Option<(ConnackLatency, Instant)>,
    /// When the broker's CONNACK is due, with the layer's `connack_timeout`; `None` once
    /// it went out or the timeout fired.
    due: Option<Instant>,
    /// The layer's `connack_timeout`, for a clock started again.
    timeout: Option<Duration>,
    /// The CONNACK timer: created on the first read, dropped with `due`, and reset in
    /// place for a clock started again ([`MqttIo::restart_connack_clock`]). Polled on
    /// every read: a poll that tokio's cooperative budget turns away registers nothing,
    /// so "polled once, it will wake us" does not hold.
    timer: Option<Pin<Box<Sleep>>>,
    /// Told once if the CONNACK timeout fires; dropped at the broker's first AUTH.
    on_timeout: Option<OnConnackTimeout>,
    /// Whether the broker has answered with AUTH (MQTT 5 enhanced authentication): it is
    /// up, so the clock now bounds each round of the exchange, its expiry is
    /// [`MqttError::AuthTimeout`], and the latency reported is the round trip to that
    /// first AUTH.
    authenticating: bool,
}

/// What the broker may still write to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Writes {
    /// Anything.
    Open,
    /// A refusal is due: only the rest of the packet in flight, then nothing.
    ToBoundary,
    /// Nothing: the refusal was returned (after its DISCONNECT, if any).
    Closed,
}

/// Stores `cx`'s waker in `slot`, unless it is already there.
fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    match slot {
        Some(w) if w.will_wake(cx.waker()) => {}
        _ => *slot = Some(cx.waker().clone()),
    }
}

/// Wakes the task parked in `slot`, if any.
fn unpark(slot: &mut Option<Waker>) {
    if let Some(w) = slot.take() {
        w.wake();
    }
}

/// The largest CONNACK kept to read its properties; a longer one announces nothing.
const MAX_CONNACK: usize = 4096;

/// Follows packet boundaries in the bytes written to the client, and keeps a copy of the
/// first CONNACK.
#[derive(Debug, Default)]
#[allow(clippy::struct_excessive_bools)] // independent facts about the broker's stream
struct OutBoundary {
    /// Bytes of the current packet's body still to come.
    remaining: usize,
    /// Fixed-header bytes seen of the next packet (0 = at a boundary).
    header_len: u8,
    /// The Remaining Length decoded so far.
    value: usize,
    /// The CONNACK being written, until it is complete; of one too long to keep, only
    /// the first two bytes of its body (its flags and its return or reason code).
    // Boxed: 8 bytes instead of 24 for the connection's whole life, for one CONNACK.
    #[allow(clippy::box_collection)]
    connack: Option<Box<Vec<u8>>>,
    /// Whether the CONNACK being written is too long to keep.
    connack_long: bool,
    /// Whether the first CONNACK has been seen.
    connack_seen: bool,
    /// How many AUTH packets started going out before the first CONNACK, since
    /// [`MqttIo`] last looked (counted at each one's first byte, however the writes split
    /// or join them; saturating): the broker's challenges in an MQTT 5 enhanced
    /// authentication.
    auths_seen: u16,
    /// Whether a DISCONNECT from the broker has started going out: the last packet the
    /// client may get [MQTT-3.14.4-1], so the gateway writes nothing after it (no
    /// queued answer, no refusal's DISCONNECT).
    disconnect_seen: bool,
    /// Whether the CONNACK to come is the gateway's own (such as
    /// [`Unavailable`](super::Unavailable)'s) written through the stream, not the
    /// broker's: its refusal is no broker refusal.
    own_connack: bool,
}

/// What following a write found.
enum Seen<'a> {
    Nothing,
    /// A whole CONNACK, for its properties: borrowed from the write that held all of it
    /// (the usual case), or the copy kept while it came in pieces.
    Connack(Cow<'a, [u8]>),
    /// A CONNACK too long to keep, with its return or reason code if it has one.
    LongConnack(Option<u8>),
}

impl Seen<'_> {
    /// The return or reason code of the whole CONNACK seen, if this is one and it has
    /// one.
    fn connack_code(&self) -> Option<u8> {
        match self {
            Seen::Nothing => None,
            Seen::Connack(c) => crate::split_frame(c)
                .ok()
                .and_then(|(_, body)| body.get(1).copied()),
            Seen::LongConnack(code) => *code,
        }
    }
}

/// Whether a CONNACK with `code` accepts the connection: MQTT 3.x return code 0, MQTT 5
/// reason code below 0x80 [MQTT-3.2.2-7]; a CONNACK without a code refuses.
fn connack_code_accepts(code: Option<u8>, version: Option<Version>) -> bool {
    match (code, version) {
        (None, _) => false,
        (Some(code), Some(Version::V5)) => code < 0x80,
        (Some(code), _) => code == 0,
    }
}

/// Why the broker's CONNACK refused the client, as the `reason` label of
/// `aegis_mqtt_broker_refusals_total`: its credentials (3.x return code 4, 5.0 reason
/// code 0x86: `bad_credentials`), the client itself (3.x 5, 5.0 0x87:
/// `not_authorized`), its authentication method (5.0 0x8C: `bad_auth_method`), or
/// anything else (`other`: the broker unavailable or busy, a client id refused, a
/// client it banned, a quota...). The first three are authentication failures.
fn broker_refusal(code: Option<u8>, version: Option<Version>) -> (&'static str, bool) {
    match (code, version) {
        (Some(0x86), Some(Version::V5)) | (Some(4), Some(Version::V3_1 | Version::V3_1_1)) => {
            ("bad_credentials", true)
        }
        (Some(0x87), Some(Version::V5)) | (Some(5), Some(Version::V3_1 | Version::V3_1_1)) => {
            ("not_authorized", true)
        }
        (Some(0x8C), Some(Version::V5)) => ("bad_auth_method", true),
        _ => ("other", false),
    }
}

impl OutBoundary {
    const fn at_boundary(&self) -> bool {
        self.remaining == 0 && self.header_len == 0
    }

    /// How many bytes of `data` end the packet in progress: 0 at a boundary, all of
    /// `data` if the packet goes on after it. Follows the same steps as
    /// [`advance`](Self::advance), without moving.
    fn to_boundary(&self, data: &[u8]) -> usize {
        let (mut remaining, mut header_len, mut value) =
            (self.remaining, self.header_len, self.value);
        let mut i = 0;
        while i < data.len() {
            if remaining > 0 {
                let n = remaining.min(data.len() - i);
                remaining -= n;
                i += n;
            } else if header_len == 0 {
                break;
            } else {
                let b = data[i];
                i += 1;
                if length_byte(&mut value, &mut header_len, b) {
                    remaining = value;
                    header_len = 0;
                }
            }
            if remaining == 0 && header_len == 0 {
                break;
            }
        }
        i
    }

    /// Follows `data` as written, adding to `acks` (the policy's acknowledgement credit,
    /// if it keeps one) one per packet the client answers: a `QoS` 1 or 2 PUBLISH (with
    /// PUBACK or PUBREC), a PUBREC (PUBREL) and a PUBREL (PUBCOMP), counted at its first
    /// byte.
    fn advance<'a>(&mut self, mut data: &'a [u8], mut acks: Option<&mut u16>) -> Seen<'a> {
        let mut seen = Seen::Nothing;
        while !data.is_empty() {
            if self.at_boundary()
                && !self.connack_seen
                && data[0] >> 4 == 2
                && let Some(len) = whole_packet(data, MAX_CONNACK)
            {
                // The first CONNACK, whole in this write: read where it is.
                self.connack_seen = true;
                seen = Seen::Connack(Cow::Borrowed(&data[..len]));
                data = &data[len..];
                continue;
            }
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                if let Some(c) = &mut self.connack {
                    // Of a long CONNACK, only its flags and code.
                    let keep = if self.connack_long {
                        n.min(2usize.saturating_sub(c.len()))
                    } else {
                        n
                    };
                    c.extend_from_slice(&data[..keep]);
                }
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    seen = self.connack_done().unwrap_or(seen);
                }
                continue;
            }
            let b = data[0];
            data = &data[1..];
            if let Some(c) = self.connack.as_mut().filter(|_| !self.connack_long) {
                c.push(b);
            }
            if self.header_len == 0 {
                // The packet type byte.
                if b >> 4 == 2 && !self.connack_seen {
                    self.connack_seen = true;
                    self.connack = Some(Box::new(vec![b]));
                } else if b >> 4 == 15 && !self.connack_seen {
                    self.auths_seen = self.auths_seen.saturating_add(1);
                } else if b >> 4 == 14 {
                    self.disconnect_seen = true;
                } else if let Some(credit) = acks.as_deref_mut()
                    && answered(b)
                {
                    *credit = credit.saturating_add(1);
                }
                self.header_len = 1;
                self.value = 0;
                continue;
            }
            if length_byte(&mut self.value, &mut self.header_len, b) {
                self.remaining = self.value;
                self.header_len = 0;
                if let Some(c) = self.connack.as_mut().filter(|_| self.value > MAX_CONNACK) {
                    // Too long to keep: only its code is read, from the body to come.
                    c.clear();
                    self.connack_long = true;
                }
                if self.remaining == 0 {
                    seen = self.connack_done().unwrap_or(seen);
                }
            }
        }
        seen
    }

    /// The CONNACK kept, if the packet that just ended is one. (Any other packet leaves
    /// what an earlier packet of the same write found: a CONNACK followed by a PUBLISH
    /// in one write is still seen.)
    fn connack_done(&mut self) -> Option<Seen<'static>> {
        let c = self.connack.take()?;
        Some(if std::mem::take(&mut self.connack_long) {
            Seen::LongConnack(c.get(1).copied())
        } else {
            Seen::Connack(Cow::Owned(*c))
        })
    }
}

/// Whether the client answers a packet of the broker's whose first byte is `b`: a
/// PUBLISH with `QoS` 1 or 2 (the flags' bits 1 and 2), a PUBREC or a PUBREL.
const fn answered(b: u8) -> bool {
    match b >> 4 {
        3 => b & 0b0110 != 0,
        5 | 6 => true,
        _ => false,
    }
}

/// The broker's CONNACK refused the client with `code`: counted in
/// `aegis_mqtt_broker_refusals_total{reason}` and, for a refusal of its credentials,
/// reported as an authentication failure to the `SecurityLayer` around the stack, if any
/// (kind `auth_failure`, layer `mqtt`, rule `denied`: counted toward
/// `max_auth_failures` as the auth layer's denials are). The gateway with no
/// authenticator of its own leaves the check to the broker: a brute force through it
/// is still seen.
fn broker_refused(code: Option<u8>, version: Option<Version>) {
    let (reason, credentials) = broker_refusal(code, version);
    super::metrics::broker_refusal(reason);
    #[cfg(feature = "security")]
    if credentials {
        use crate::security::{self, EventKind, Report, Severity};
        let code = code.unwrap_or_default();
        let what = match version {
            Some(Version::V5) => "reason code",
            _ => "return code",
        };
        let details =
            format!("the broker refused the login: CONNACK {what} {code:#04x} ({reason})");
        security::report(Report {
            layer: "mqtt",
            kind: EventKind::AuthFailure,
            severity: Severity::Medium,
            rule: Some("denied"),
            details,
        });
    }
    #[cfg(not(feature = "security"))]
    let _ = credentials;
}

/// The gateway's own answer to the CONNECT, refused with `e` in the broker's place (no
/// CONNACK went out, and from now on the broker's never will): the CONNACK for the
/// client's version, if `e` has one there. The gateway's queued answers to later
/// packets are dropped: the server's first packet is its CONNACK [MQTT-3.2.0-1], and
/// nothing follows a refusal.
fn own_connack(
    out: &mut OutBoundary,
    policy: &mut Option<ConnPolicy>,
    version: Option<Version>,
    e: MqttError,
) -> Vec<u8> {
    out.connack_seen = true;
    if let Some(policy) = policy {
        *policy.answers() = None;
    }
    e.answer(Phase::Connect(version)).bytes()
}

/// The length of the packet at the start of `data`, fixed header included, if all of it
/// is there and its body is at most `max_body` bytes; `None` otherwise (the step by step
/// path of [`OutBoundary::advance`] deals with it).
fn whole_packet(data: &[u8], max_body: usize) -> Option<usize> {
    let (mut value, mut header_len) = (0, 1);
    for &b in data.iter().skip(1).take(4) {
        if length_byte(&mut value, &mut header_len, b) {
            let len = usize::from(header_len) + value;
            return (value <= max_body && len <= data.len()).then_some(len);
        }
    }
    None
}

/// How many more bytes the packet at the start of `buf` needs: the rest of its declared
/// length once its fixed header is whole, else [`READ_CHUNK`] (the rest of the header
/// and a first piece of the body).
fn rest_of_packet(buf: &[u8]) -> usize {
    let (mut value, mut header_len) = (0, 1);
    for &b in buf.iter().skip(1).take(4) {
        if length_byte(&mut value, &mut header_len, b) {
            let len = usize::from(header_len).saturating_add(value);
            return len.saturating_sub(buf.len()).max(1);
        }
    }
    READ_CHUNK
}

/// Takes `b`, the next Remaining Length byte of a fixed header of which `header_len`
/// bytes were seen, into `value`: whether the length is complete (its last byte, or its
/// fourth, the most the encoding has).
fn length_byte(value: &mut usize, header_len: &mut u8, b: u8) -> bool {
    *value |= usize::from(b & 0x7F) << (7 * u32::from(*header_len - 1));
    *header_len += 1;
    b & 0x80 == 0 || *header_len > 4
}

aegis_core::forward_params!(MqttIo<I>.io: PeerAddr, LocalAddr, ClientAddr, Handshake);

impl ConnackWatch {
    /// The watch the layer's options ask for, `None` if they ask for none.
    fn new(
        latency: Option<ConnackLatency>,
        timeout: Option<Duration>,
        on_timeout: Option<OnConnackTimeout>,
    ) -> Option<Box<Self>> {
        let now = Instant::now();
        let w = Self {
            latency: latency.map(|l| (l, now)),
            due: Self::due(timeout, now),
            timeout,
            timer: None,
            on_timeout,
            authenticating: false,
        };
        (w.latency.is_some() || w.due.is_some()).then(|| Box::new(w))
    }

    /// When a CONNACK is due after `timeout` from `now`. A timeout too long to add is no
    /// timeout.
    fn due(timeout: Option<Duration>, now: Instant) -> Option<Instant> {
        timeout.and_then(|t| now.checked_add(t))
    }
}

impl<I> MqttIo<I> {
    pub(super) fn new(
        io: I,
        session: Session,
        connect: Bytes,
        rest: Bytes,
        opts: IoOptions,
        policy: Option<ConnPolicy>,
    ) -> Self {
        Self {
            policy,
            bucket: opts.rate.map(|r| Box::new(Bucket::new(r))),
            enforce_keep_alive: opts.enforce_keep_alive,
            last_packet: Instant::now(),
            connack: ConnackWatch::new(
                opts.connack_latency,
                opts.connack_timeout,
                opts.on_connack_timeout,
            ),
            idle: None,
            packet_timeout: opts.packet_timeout,
            packet_timer: None,
            packet_armed: false,
            io: Rewind::new(rest, io),
            ready: connect,
            buf: BytesMut::new(),
            refusal: None,
            out: OutBoundary::default(),
            writes: Writes::Open,
            connect_unread: true,
            client_eof: false,
            gate: if session.auth_method() {
                Gate::Auth
            } else {
                Gate::Held
            },
            // Lenient: the spec's flow has no AUTH of the client's before the broker's
            // first (its first Authentication Data travels in its CONNECT); one is
            // bounded, and goes on to the broker as before, which may want it.
            auth_credit: 1,
            held: None,
            session,
        }
    }

    /// The client's CONNECT, until the inner service starts reading it: for a service
    /// inside the layer that decides on it first, such as an authenticator.
    pub fn connect(&self) -> Option<Connect<'_>> {
        if !self.connect_unread {
            return None;
        }
        // Validated when the layer accepted it; parsing it again cannot fail.
        crate::validate_connect(&self.ready, self.session.config()).ok()
    }

    /// Starts the CONNECT to CONNACK clock again from now: the layer's `connack_timeout`
    /// and the round trip its `connack_latency` reports. For a service inside the layer
    /// that decides on the CONNECT before handing it on, such as this crate's
    /// authenticator, whose time is its own and not the broker's. Does nothing once the
    /// CONNECT has been read or a CONNACK has gone out.
    pub fn restart_connack_clock(&mut self) {
        if !self.connect_unread || self.out.connack_seen {
            return;
        }
        let Some(w) = &mut self.connack else {
            return;
        };
        let now = Instant::now();
        if let Some((_, since)) = &mut w.latency {
            *since = now;
        }
        if w.due.is_some() {
            // The timer is reset to the new deadline on the next read.
            w.due = ConnackWatch::due(w.timeout, now);
        }
    }

    /// Records a refusal: counts it and prepares the MQTT 5 DISCONNECT (sent once the
    /// broker's stream is between two packets, within [`REFUSAL_DEADLINE`]).
    fn fail(&mut self, e: MqttError) {
        let answer = self.session.answer(&e).bytes();
        self.refuse(e, answer);
    }

    /// Records the refusal `e` with `answer` (none if empty) as the bytes the refusal
    /// writes to the client.
    fn refuse(&mut self, e: MqttError, answer: Vec<u8>) {
        drop(reject(e));
        // A read held for the CONNACK returns the refusal instead.
        unpark(&mut self.held);
        let r = self.refusal.get_or_insert_with(|| {
            Box::new(Refusal {
                error: e,
                answer: None,
                deadline: None,
                read_waker: None,
                write_waker: None,
            })
        });
        r.error = e;
        if !answer.is_empty() {
            r.answer = Some((answer, 0));
        }
    }

    /// Tells the session what the broker's writes showed.
    fn on_written(&mut self, seen: Seen<'_>) {
        let auths = std::mem::take(&mut self.out.auths_seen);
        if auths > 0 {
            self.on_broker_auth(auths);
        }
        if matches!(seen, Seen::Nothing) {
            return;
        }
        // A whole CONNACK from here on.
        if let Some((latency, since)) = self.connack.as_mut().and_then(|w| w.latency.take()) {
            latency.report(Instant::now().saturating_duration_since(since));
            self.drop_connack_watch_if_done();
        }
        let code = seen.connack_code();
        let version = self.session.version();
        let accepts = connack_code_accepts(code, version);
        if !accepts && !self.out.own_connack {
            broker_refused(code, version);
        }
        self.on_broker_connack(accepts);
        match seen {
            Seen::Nothing => {}
            Seen::Connack(connack) => self.session.on_connack(&connack),
            Seen::LongConnack(_) => self.session.connack_sent(),
        }
    }

    /// The broker's whole CONNACK went out, accepting the connection or not: the packets
    /// held since the CONNECT are read from now on, or never.
    fn on_broker_connack(&mut self, accepts: bool) {
        // Its timer is done only now: a broker that stalls in the middle of its CONNACK
        // holds the client's read as one that sends none does.
        self.disarm_connack_timer();
        if accepts {
            self.gate = Gate::Open;
            // The client could not be heard while it was held.
            self.heard();
        } else {
            self.gate = Gate::Refused;
            // Nothing more from the gateway: no answer to a packet, no DISCONNECT.
            if let Some(policy) = &mut self.policy {
                *policy.answers() = None;
            }
            if let Some(r) = self.refusal.as_deref_mut() {
                r.answer = None;
            }
            self.buf = BytesMut::new();
        }
        unpark(&mut self.held);
    }

    /// The broker sent `auths` AUTH packets before its CONNACK, to a client that chose an
    /// Authentication Method: it is up, and the exchange is the client's as much as the
    /// broker's. The CONNACK clock starts again (each round of the exchange has the
    /// whole `connack_timeout`), its expiry becomes [`MqttError::AuthTimeout`] and no
    /// broker failure (`on_connack_timeout` is not called), and the connection gives no
    /// CONNACK latency: the round trip now holds the client's own answers.
    fn on_broker_auth(&mut self, auths: u16) {
        if !self.session.auth_method() {
            // Not an exchange the client asked for: the session refuses the client's
            // AUTH, and the broker's proves nothing.
            return;
        }
        // The client may answer each: one more of its AUTH packets is read per AUTH.
        self.auth_credit = self.auth_credit.saturating_add(auths);
        unpark(&mut self.held);
        if let Some(w) = &mut self.connack {
            w.authenticating = true;
            w.on_timeout = None;
            // The broker's first answer to the CONNECT: a round trip through it, and the
            // sign it is up (a breaker told of successes by this report hears of it).
            // Later rounds hold the client's own answers: not the broker's time.
            if let Some((latency, since)) = w.latency.take() {
                latency.report(Instant::now().saturating_duration_since(since));
            }
            if w.due.is_some() {
                // The timer is reset to the new deadline on the next read.
                w.due = ConnackWatch::due(w.timeout, Instant::now());
            }
        }
        self.drop_connack_watch_if_done();
    }

    fn disarm_connack_timer(&mut self) {
        if let Some(w) = &mut self.connack {
            w.due = None;
            w.timer = None;
            w.on_timeout = None;
        }
        self.drop_connack_watch_if_done();
    }

    /// Whether a CONNACK timer runs: the layer's `connack_timeout`, until the broker's
    /// CONNACK or a refusal. Only then is the client's EOF held before the CONNACK, to
    /// keep polling it; without one, nothing would ever end the wait.
    fn connack_timer_armed(&self) -> bool {
        self.connack.as_ref().is_some_and(|w| w.due.is_some())
    }

    /// Frees the CONNACK watch once it has neither a timeout nor a latency to report.
    fn drop_connack_watch_if_done(&mut self) {
        if self
            .connack
            .as_ref()
            .is_some_and(|w| w.due.is_none() && w.latency.is_none())
        {
            self.connack = None;
        }
    }

    /// Whether the broker's CONNACK is late (arms the timer on the first call). When it
    /// is, the gateway's own CONNACK is due instead ("server unavailable", or "not
    /// authorized" for an enhanced authentication the broker answered with AUTH):
    /// counted, prepared (written by the refusal, the broker's stream being between two
    /// packets), and the broker may write nothing more (only the rest of a packet in
    /// flight, if any).
    fn connack_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(due) = self.connack.as_ref().and_then(|w| w.due) else {
            return false;
        };
        if matches!(self.gate, Gate::Open | Gate::Refused) || self.refusal.is_some() {
            // The broker's whole CONNACK is out, or another refusal ends the connection.
            self.disarm_connack_timer();
            return false;
        }
        let Some(watch) = &mut self.connack else {
            return false;
        };
        let timer = match &mut watch.timer {
            Some(timer) => {
                if timer.deadline() != due {
                    timer.as_mut().reset(due);
                }
                timer
            }
            None => watch.timer.insert(Box::pin(tokio::time::sleep_until(due))),
        };
        // Polled every time, as the keep-alive timer is: a `Sleep` polled while the
        // task's cooperative budget is spent returns `Pending` without registering its
        // timer, and one that is never polled again never fires.
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        // Once the broker has sent AUTH, the hook is gone: not a broker failure.
        let on_timeout = watch.on_timeout.take();
        let e = if watch.authenticating {
            MqttError::AuthTimeout
        } else {
            MqttError::ConnackTimeout
        };
        self.refuse_connect(e);
        self.writes = Writes::ToBoundary;
        if let Some(f) = on_timeout {
            f.call(());
        }
        true
    }

    /// Records the refusal `e` of the CONNECT, answered by the gateway's own CONNACK for
    /// the client's version (none if a CONNACK already went out). A CONNECT the inner
    /// service has not read yet never reaches it; the CONNACK going out is not a round
    /// trip through the broker, the broker's may not follow, and a responder such as
    /// `Unavailable` must not answer again.
    fn refuse_connect(&mut self, e: MqttError) {
        let answer = if self.out.connack_seen {
            Vec::new()
        } else {
            own_connack(&mut self.out, &mut self.policy, self.session.version(), e)
        };
        self.refuse(e, answer);
        if self.connect_unread {
            self.ready = Bytes::new();
            self.connect_unread = false;
        }
        self.out.connack_seen = true;
        self.skip_connack_latency();
        self.disarm_connack_timer();
    }

    /// Forgets the round-trip report: the CONNACK about to be written is the gateway's
    /// own, not the broker's (nor, if it refuses, a broker refusal).
    pub(super) fn skip_connack_latency(&mut self) {
        self.out.own_connack = true;
        if let Some(w) = &mut self.connack {
            w.latency = None;
        }
        self.drop_connack_watch_if_done();
    }

    /// Whether the keep-alive ran out while waiting for the client (arms the timer).
    fn keep_alive_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let seconds = self.session.keep_alive();
        if !self.enforce_keep_alive || seconds == 0 {
            return false;
        }
        // One and a half times the keep-alive in force.
        let keep_alive = Duration::from_millis(u64::from(seconds) * 1500);
        let deadline = self.last_packet + keep_alive;
        let idle = match &mut self.idle {
            Some(idle) => {
                if idle.deadline() != deadline {
                    idle.as_mut().reset(deadline);
                }
                idle
            }
            None => self
                .idle
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        idle.as_mut().poll(cx).is_ready()
    }

    /// Whether the packet begun in `buf` is still not whole at its deadline (arms the
    /// deadline, from now, for a packet just begun: the read that brought its first
    /// bytes is the one that finds it incomplete).
    fn packet_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let timer = match &mut self.packet_timer {
            Some(timer) if self.packet_armed => timer,
            slot => {
                let due = aegis_core::time::deadline(Instant::now(), self.packet_timeout);
                self.packet_armed = true;
                match slot {
                    Some(timer) => {
                        timer.as_mut().reset(due);
                        timer
                    }
                    None => slot.insert(Box::pin(tokio::time::sleep_until(due))),
                }
            }
        };
        timer.as_mut().poll(cx).is_ready()
    }

    /// Whole packets came from the client: its keep-alive starts again.
    fn heard(&mut self) {
        if self.enforce_keep_alive {
            self.last_packet = Instant::now();
        }
    }

    /// The client has nothing more for now. If its keep-alive ran out, or the packet it
    /// has begun is not whole by its deadline, fails the session (`true`: the read goes
    /// on to return the refusal); otherwise frees the read buffer if nothing partial is
    /// in it, so that an idle connection holds none (the next read allocates one again),
    /// and the read is `Pending` (`false`).
    fn quiet(&mut self, cx: &mut Context<'_>) -> bool {
        if self.keep_alive_expired(cx) {
            self.fail(MqttError::KeepAliveTimeout);
            return true;
        }
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.packet_armed = false;
        } else if self.packet_expired(cx) {
            // Whatever was held for the packet goes: it never will be whole.
            self.buf = BytesMut::new();
            self.fail(MqttError::PacketTimeout);
            return true;
        }
        false
    }

    /// The session: the client's protocol version and state.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The rejection that ended the client's stream, if any.
    pub fn error(&self) -> Option<MqttError> {
        self.refusal.as_ref().map(|r| r.error)
    }

    /// Whether a CONNACK has started going out to the client (from the broker or the
    /// gateway): after it, the gateway may no longer answer the CONNECT itself.
    pub fn connack_sent(&self) -> bool {
        self.out.connack_seen
    }

    /// The inner stream.
    pub fn get_ref(&self) -> &I {
        self.io.get_ref()
    }

    /// The inner stream, mutably.
    pub fn get_mut(&mut self) -> &mut I {
        self.io.get_mut()
    }
}

impl<I: AsyncWrite + Unpin> MqttIo<I> {
    /// Refuses the CONNECT with `e` instead of handing it on: for a service inside the
    /// layer (an authenticator, say) that decides before the broker hears of the client.
    ///
    /// The first call counts the refusal (`aegis_rejections_total{layer="mqtt"}`) and
    /// drops everything the client sent; each call then goes on writing the CONNACK its
    /// version expects for `e` ([`MqttError::answer`] at [`Phase::Connect`]: `20 02 00 05`
    /// for a 3.x client refused as [`MqttError::NotAuthorized`], `20 03 00 87 00` for
    /// 5.0), flushes it and shuts the client's stream down. `Ready` once that is done or
    /// has failed (the client is gone); from then on reads fail with `e` and writes with
    /// [`io::ErrorKind::BrokenPipe`]. Nothing is written if a CONNACK already went out.
    pub fn poll_refuse_connect(&mut self, cx: &mut Context<'_>, e: MqttError) -> Poll<()> {
        if self.refusal.is_none() {
            self.refuse_connect(e);
            self.ready = Bytes::new();
            self.buf = BytesMut::new();
            self.writes = Writes::Closed;
            if let Some(policy) = &mut self.policy {
                *policy.answers() = None;
            }
        }
        if let Some(r) = self.refusal.as_deref_mut()
            && let Some((answer, written)) = &mut r.answer
        {
            std::task::ready!(poll_write_answer(&mut self.io, cx, answer, written));
            r.answer = None;
        }
        Pin::new(&mut self.io).poll_shutdown(cx).map(drop)
    }

    /// Writes the gateway's queued answers, if the broker's stream is between two
    /// packets. `Pending` only while answers are going out: the broker's bytes and a
    /// DISCONNECT must wait for them; a failed write drops them, and so does the
    /// broker's DISCONNECT.
    fn poll_answers(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(policy) = &mut self.policy else {
            return Poll::Ready(());
        };
        let answers = policy.answers();
        if self.out.disconnect_seen {
            // Nothing goes out after the broker's DISCONNECT [MQTT-3.14.4-1].
            *answers = None;
            return Poll::Ready(());
        }
        // Answers start only at a boundary, and the broker writes nothing until they
        // are out, so a started answer is never cut by the broker's bytes.
        // Nor before the CONNACK: the server's first packet is its CONNACK
        // [MQTT-3.2.0-1]; they follow the broker's, and only one that accepted the
        // connection (nothing follows a refusing one).
        if answers.is_none()
            || !self.out.at_boundary()
            || self.gate != Gate::Open
            || self.writes == Writes::Closed
        {
            return Poll::Ready(());
        }
        while let Some(queued) = answers.as_deref() {
            match Pin::new(&mut self.io).poll_write(cx, queued) {
                Poll::Ready(Ok(n)) if n > 0 => policy::written(answers, n),
                Poll::Ready(_) => {
                    // The client is gone or not taking anything: its reads will say.
                    *answers = None;
                    break;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(())
    }

    /// Ends the connection for the refusal `e` once the broker's stream is between two
    /// packets: writes the gateway's queued answers, then the MQTT 5 DISCONNECT, then
    /// fails the read with `e`. Pending (and reading nothing from the client) until then,
    /// or until [`REFUSAL_DEADLINE`], when it fails at once.
    fn poll_refusal(
        &mut self,
        cx: &mut Context<'_>,
        e: MqttError,
        answers: Poll<()>,
    ) -> Poll<io::Result<()>> {
        if self.writes != Writes::Closed {
            // From now on the broker may only finish the packet it is in.
            self.writes = Writes::ToBoundary;
            if let Some(r) = self.refusal.as_deref_mut() {
                // Created once, when the refusal is reached.
                let deadline = r
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(REFUSAL_DEADLINE)));
                if deadline.as_mut().poll(cx).is_pending() {
                    if !self.out.at_boundary() {
                        // The writes wake this read once the broker's packet is whole.
                        park(&mut r.read_waker, cx);
                        return Poll::Pending;
                    }
                    // Between two packets the read waits for the client only (to take
                    // the answers), not for the writes: parked for them, each write of
                    // the broker's next bytes would wake it, and it would park again, for
                    // as long as the client does not read.
                    r.read_waker = None;
                    if answers.is_pending() {
                        return Poll::Pending;
                    }
                    if !self.out.connack_seen {
                        // Nothing of the broker's CONNACK went out, and now none will: the
                        // client gets the answer to a CONNECT refused with `e`, in place
                        // of an MQTT 5 DISCONNECT, which may not come before a CONNACK
                        // [MQTT-3.14.0-1].
                        let version = self.session.version();
                        let answer = own_connack(&mut self.out, &mut self.policy, version, e);
                        r.answer = (!answer.is_empty()).then_some((answer, 0));
                    } else if matches!(self.session.phase(), Phase::Connected(_))
                        && r.answer.as_ref().is_some_and(|(answer, written)| {
                            *written == 0 && answer.first().is_some_and(|b| b >> 4 == 2)
                        })
                    {
                        // The refusal came before the broker's CONNACK (an MQTT 5 client
                        // with an Authentication Method), and its answer then was a
                        // CONNACK; but the broker's accepting CONNACK went out since (the
                        // gateway's own does not count: after it the broker writes
                        // nothing). A second CONNACK may not follow it: the answer of
                        // the connected phase instead, a DISCONNECT (nothing for 3.x).
                        let answer = self.session.answer(&e).bytes();
                        r.answer = (!answer.is_empty()).then_some((answer, 0));
                    }
                    if self.out.disconnect_seen {
                        // The broker's DISCONNECT went out: nothing may follow it
                        // [MQTT-3.14.4-1], a second DISCONNECT least of all.
                        r.answer = None;
                    }
                    if let Some((answer, written)) = &mut r.answer {
                        std::task::ready!(poll_write_answer(&mut self.io, cx, answer, written));
                    }
                }
                // Done, or out of time (the client is not reading): whatever is left of
                // the packet, the answers and the DISCONNECT never goes out.
                r.answer = None;
                r.deadline = None;
                r.read_waker = None;
                unpark(&mut r.write_waker);
            }
            self.writes = Writes::Closed;
        }
        // Counted once, by `refuse`; the same rejection on every read after it.
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::InvalidData,
            Rejected::uncounted(e),
        )))
    }

    /// Where a write may go while a refusal is due: `Some(n)` for the bytes up to the end
    /// of the broker's packet, `None` once it is whole (the write must wait for the read
    /// to end the connection).
    fn writable(&mut self, cx: &Context<'_>, buf: &[u8]) -> Option<usize> {
        if self.out.at_boundary() {
            // A refusal is due whenever the writes stop at a boundary.
            if let Some(r) = self.refusal.as_deref_mut() {
                park(&mut r.write_waker, cx);
                unpark(&mut r.read_waker);
            }
            None
        } else {
            Some(self.out.to_boundary(buf))
        }
    }

    /// After a write: wakes the read waiting for the broker's packet to be whole.
    fn after_write(&mut self) {
        if self.writes == Writes::ToBoundary
            && self.out.at_boundary()
            && let Some(r) = self.refusal.as_deref_mut()
        {
            unpark(&mut r.read_waker);
        }
    }
}

impl<I: AsyncRead + Unpin> MqttIo<I> {
    /// Reads more of the client's bytes into `buf`; `Ok(0)` is EOF.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buf.is_empty() {
            // Nothing partial is buffered (the usual case: a client sends whole packets).
            // Read through the stack and keep only what arrived: a 30-byte CONNECT holds
            // 30 bytes, not READ_CHUNK, while thousands of clients connect at once.
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut rb = ReadBuf::uninit(&mut chunk);
            std::task::ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            self.buf.extend_from_slice(rb.filled());
            return Poll::Ready(Ok(rb.filled().len()));
        }
        // The rest of a packet, and no more: its declared size (which the framer has
        // held to the size cap), or a first piece while its fixed header is incomplete.
        // A buffer grown by `reserve` would double, and a read fill all its spare room:
        // a client trickling a packet near the cap would hold twice the cap.
        let want = rest_of_packet(&self.buf).min(self.session.framer().max_packet_size().max(1));
        if self.buf.capacity() - self.buf.len() < want {
            // Exactly the room the packet needs: one copy of what is buffered.
            let mut room = BytesMut::with_capacity(self.buf.len() + want);
            room.extend_from_slice(&self.buf);
            self.buf = room;
        }
        // Into the spare capacity, without zero-filling it first (tokio-util does the
        // bookkeeping of the uninitialised part, so this crate stays free of unsafe).
        let mut limited = (&mut self.buf).limit(want);
        tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut limited)
    }

    /// A read straight into `out`, with nothing partial buffered (the usual case): the
    /// whole, valid packets at the start of what arrived stay there; only what follows
    /// them (the start of a packet, packets behind a throttle or a dropped one) is
    /// copied aside, into `buf`. `None` when the read loop must go on (nothing to
    /// release yet, or a refusal to return).
    fn poll_read_direct(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Option<Poll<io::Result<()>>> {
        let start = out.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, out) {
            Poll::Ready(Ok(())) if out.filled().len() == start => {
                if self.gate == Gate::Auth {
                    // EOF before the CONNACK: the read loop holds it, or returns it.
                    self.client_eof = true;
                    return None;
                }
                Some(Poll::Ready(Ok(()))) // EOF
            }
            Poll::Ready(Ok(())) => {
                let read = &out.filled()[start..];
                let found = scan_packets(
                    &mut self.session,
                    &mut self.bucket,
                    &mut self.policy,
                    (self.gate == Gate::Auth).then_some(&mut self.auth_credit),
                    cx,
                    read,
                );
                let kept = found.valid + found.dropped;
                if found.refused.is_none() && kept < read.len() {
                    // (After a refusal nothing more is released: not kept.)
                    self.buf.extend_from_slice(&read[kept..]);
                }
                out.set_filled(start + found.valid);
                if let Some(e) = found.refused {
                    self.fail(e);
                }
                if kept > 0 {
                    self.heard();
                    self.packet_armed = false;
                }
                (found.valid > 0).then_some(Poll::Ready(Ok(())))
            }
            Poll::Ready(Err(e)) => Some(Poll::Ready(Err(e))),
            Poll::Pending if self.quiet(cx) => None,
            Poll::Pending => Some(Poll::Pending),
        }
    }
}

/// The smallest room in a read's buffer for [`MqttIo`] to read the client straight into
/// it (a copy loop's buffer is 8 KiB): below it, reads go through `buf`.
const DIRECT_READ: usize = 1024;

/// What [`scan_packets`] found at the start of a run of the client's bytes.
struct Scan {
    /// Bytes of whole, valid packets (within the packet rate) to release.
    valid: usize,
    /// The length of a packet the policy drops, right after the `valid` bytes; 0 if
    /// none.
    dropped: usize,
    /// The packet after the `valid` bytes breaks a rule, or is over the packet rate.
    refused: Option<MqttError>,
    /// No packet is released: the first waits for a token of the packet rate (the
    /// bucket wakes the task).
    throttled: bool,
    /// The packet after the `valid` bytes is an AUTH the client may not send yet (under
    /// [`Gate::Auth`], ahead of the broker's): it waits, not validated, for the broker's
    /// next AUTH (which wakes the read held for it) or its CONNACK.
    held: bool,
}

/// Validates the whole packets at the start of `data` in turn, up to the first that is
/// incomplete, refused, dropped, throttled or held. Under [`Gate::Auth`], `auth_credit`
/// is the client's allowance of AUTH packets: each one validated takes one, and an AUTH
/// beyond it is held (from its first byte: nothing of it is validated).
fn scan_packets(
    session: &mut Session,
    bucket: &mut Option<Box<Bucket>>,
    policy: &mut Option<ConnPolicy>,
    mut auth_credit: Option<&mut u16>,
    cx: &mut Context<'_>,
    data: &[u8],
) -> Scan {
    let mut scan = Scan {
        valid: 0,
        dropped: 0,
        refused: None,
        throttled: false,
        held: false,
    };
    while scan.valid < data.len() {
        let rest = &data[scan.valid..];
        if rest[0] >> 4 == 15 && auth_credit.as_deref() == Some(&0) {
            // An AUTH ahead of the broker's: it waits, and so does everything after it.
            scan.held = true;
            break;
        }
        if let Some(bucket) = bucket {
            // Only a whole packet takes a token; framing errors fall through to the
            // session below.
            if let Ok(Decoded::Frame(_)) = session.framer().decode(rest) {
                match bucket.poll_take(cx) {
                    Poll::Ready(true) => {}
                    Poll::Ready(false) => {
                        scan.refused = Some(MqttError::MessageRate);
                        break;
                    }
                    // Throttled: release what is ready, or wait for a token.
                    Poll::Pending => {
                        scan.throttled = scan.valid == 0;
                        break;
                    }
                }
            }
        }
        match session.next(rest) {
            Ok(Next::Packet { len, packet }) => {
                if let (Packet::Auth(_), Some(credit)) = (&packet, auth_credit.as_deref_mut()) {
                    *credit = credit.saturating_sub(1);
                }
                match policy.as_mut().map(|p| p.check(&packet, len)) {
                    None | Some(Verdict::Forward) => scan.valid += len,
                    Some(Verdict::Drop) => {
                        scan.dropped = len;
                        break;
                    }
                    Some(Verdict::Refuse(e)) => {
                        scan.refused = Some(e);
                        break;
                    }
                }
            }
            Ok(Next::NeedMore(_)) => break,
            Err(e) => {
                // Counted now; answered and returned once the valid packets before it
                // are read.
                scan.refused = Some(e);
                break;
            }
        }
    }
    scan
}

// Reads may write: the MQTT 5 DISCONNECT goes out from the read that refuses a packet.
impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for MqttIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Polled on every read, so that it fires while the client is silent too.
        this.connack_expired(cx);
        loop {
            // Gateway answers first; a pending write does not hold up the reads.
            let answers = this.poll_answers(cx);
            if !this.ready.is_empty() {
                this.connect_unread = false;
                let n = this.ready.len().min(out.remaining());
                out.put_slice(&this.ready[..n]);
                this.ready.advance(n);
                if this.ready.is_empty() {
                    // Let go of the shared allocation so `buf` can reuse it.
                    this.ready = Bytes::new();
                }
                return Poll::Ready(Ok(()));
            }
            if let Some(e) = this.refusal.as_ref().map(|r| r.error) {
                // A DISCONNECT may not cut into an answer being written.
                return this.poll_refusal(cx, e, answers);
            }
            match this.gate {
                Gate::Open | Gate::Auth if !this.client_eof => {}
                Gate::Held => {
                    // Woken when the broker's CONNACK goes out (or a refusal comes).
                    park(&mut this.held, cx);
                    return Poll::Pending;
                }
                Gate::Auth if this.connack_timer_armed() => {
                    // The client's EOF waits as its packets do while a CONNACK timer
                    // runs: returned now, it would end a proxy's reads of the client, and
                    // with them the timer, polled only here (a stalled broker writes
                    // nothing). Woken as under `Gate::Held`.
                    park(&mut this.held, cx);
                    return Poll::Pending;
                }
                // The broker refused the CONNECT: nothing sent after it is read. Or it
                // accepted it, and the client's EOF was held until then. Or the client's
                // EOF came before the CONNACK with no CONNACK timer to keep running:
                // held, it would wait for ever for a broker that waits for the client
                // (its AUTH challenge sent); the broker gets the FIN, and its close after
                // it adds nothing (`client_eof`).
                Gate::Open | Gate::Refused | Gate::Auth => return Poll::Ready(Ok(())),
            }
            // Release every whole, valid packet buffered (and within the rate), in one
            // piece.
            let scan = scan_packets(
                &mut this.session,
                &mut this.bucket,
                &mut this.policy,
                (this.gate == Gate::Auth).then_some(&mut this.auth_credit),
                cx,
                &this.buf,
            );
            if let Some(e) = scan.refused {
                this.fail(e);
            }
            if scan.throttled {
                return Poll::Pending;
            }
            if scan.held && scan.valid == 0 {
                // As under `Gate::Held`: nothing more is read from the client until the
                // broker's next AUTH or its CONNACK (each wakes this read), or a refusal
                // (the CONNACK timer, polled above, is one).
                park(&mut this.held, cx);
                return Poll::Pending;
            }
            let Scan { valid, dropped, .. } = scan;
            if valid > 0 || dropped > 0 {
                if valid > 0 {
                    this.ready = this.buf.split_to(valid).freeze();
                }
                // The dropped packet's bytes go nowhere.
                this.buf.advance(dropped);
                this.heard();
                // What is left in `buf` is a packet begun later: a deadline of its own.
                this.packet_armed = false;
                continue;
            }
            if this.refusal.is_some() {
                continue;
            }
            if this.buf.is_empty() && out.remaining() >= DIRECT_READ {
                match this.poll_read_direct(cx, out) {
                    Some(done) => return done,
                    None => continue,
                }
            }
            match this.poll_fill(cx) {
                Poll::Ready(Ok(0)) if this.gate == Gate::Auth => {
                    // EOF before the CONNACK: held or returned above. A packet begun will
                    // never be whole.
                    this.client_eof = true;
                    this.buf = BytesMut::new();
                }
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())), // EOF
                Poll::Ready(Ok(_)) => {}
                Poll::Pending if this.quiet(cx) => {}
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for MqttIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.writes {
            Writes::Open => {}
            Writes::ToBoundary => match this.writable(cx, buf) {
                // A write crossing the end of the packet is cut short there.
                Some(n) => buf = &buf[..n],
                None => return Poll::Pending,
            },
            Writes::Closed => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
        std::task::ready!(this.poll_answers(cx));
        let res = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            let acks = this.policy.as_mut().and_then(ConnPolicy::ack_credit);
            let seen = this.out.advance(&buf[..n.min(buf.len())], acks);
            this.on_written(seen);
            this.after_write();
            // At a boundary now: answers waiting for it go out if the client takes them.
            let _ = this.poll_answers(cx);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.writes != Writes::Open {
            // One slice at a time, each cut at the packet's end.
            let buf = bufs
                .iter()
                .find(|b| !b.is_empty())
                .map_or(&[][..], |b| &**b);
            return Pin::new(this).poll_write(cx, buf);
        }
        std::task::ready!(this.poll_answers(cx));
        let res = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(mut n)) = res {
            for b in bufs {
                let k = n.min(b.len());
                let acks = this.policy.as_mut().and_then(ConnPolicy::ack_credit);
                let seen = this.out.advance(&b[..k], acks);
                this.on_written(seen);
                n -= k;
                if n == 0 {
                    break;
                }
            }
            let _ = this.poll_answers(cx);
        }
        res
    }

    #[inline]
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_answers(cx));
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if matches!(this.gate, Gate::Held | Gate::Auth) {
            // The broker's stream ended before its CONNACK (a proxy forwards its EOF
            // here): none will come, so nothing the client sent after its CONNECT will be
            // read. Without this, a read held for the CONNACK would wait for ever (with
            // no CONNACK timeout set), and with it the connection.
            if this.refusal.is_none()
                && !this.out.connack_seen
                && !this.out.disconnect_seen
                && this.out.at_boundary()
                && !this.client_eof
                && !this.session.disconnected()
            {
                // Nothing of a CONNACK went out, and the broker's last packet (an MQTT 5
                // AUTH, if any) is whole: the client gets the gateway's own "server
                // unavailable" instead of a silent EOF, as for a CONNACK timeout. Not
                // after part of a packet (nothing is appended to half of one), nor
                // when a refusal is under way (its own answer, if any, stands), nor
                // once the client has ended its side (its DISCONNECT or its EOF, read
                // before the CONNACK under enhanced authentication): the broker then
                // closes as it should, and a CONNACK would answer nothing (nor is it
                // counted: no client may raise `upstream_closed` at will).
                this.refuse_connect(MqttError::UpstreamClosed);
            }
            this.gate = Gate::Refused;
            this.buf = BytesMut::new();
            unpark(&mut this.held);
        }
        if this.writes != Writes::Closed
            && let Some(e) = this
                .refusal
                .as_ref()
                .map(|r| r.error)
                .filter(|e| *e == MqttError::UpstreamClosed)
        {
            // The CONNACK goes out before the shutdown, within the refusal's deadline
            // (a client that does not read is shut down without it); the refusal is the
            // read's to return, after it.
            let _ = std::task::ready!(this.poll_refusal(cx, e, Poll::Ready(())));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::Config;

    /// An `MqttIo` lives as long as its connection, thousands at once: what only a
    /// refused connection needs (the error, its answer, its deadline, two wakers) is one
    /// pointer until a refusal. (The waker of a read held until the broker's CONNACK is
    /// inline: every connection needs it once, and boxing it would cost an allocation;
    /// so is the packet timeout, with a pointer to its timer, made only for a packet
    /// that does not come whole.)
    #[test]
    fn an_mqtt_io_stays_small() {
        let size = std::mem::size_of::<MqttIo<tokio::io::DuplexStream>>();
        let io = std::mem::size_of::<tokio::io::DuplexStream>();
        println!("MqttIo adds {} bytes", size - io);
        assert!(size - io <= 408, "MqttIo adds {} bytes", size - io);
        assert_eq!(std::mem::size_of::<Option<Box<Refusal>>>(), 8);
    }

    /// What following `writes` in turn finds: the first CONNACK (and whether it was read
    /// in place), whether it was too long, whether the stream ends at a boundary, and
    /// whether the first CONNACK is marked as seen.
    fn follow(writes: &[&[u8]]) -> (Option<(Vec<u8>, bool)>, bool, bool, bool) {
        let mut out = OutBoundary::default();
        let (mut connack, mut long) = (None, false);
        for w in writes {
            match out.advance(w, None) {
                Seen::Nothing => {}
                Seen::Connack(c) => {
                    connack = Some((c.to_vec(), matches!(c, Cow::Borrowed(_))));
                }
                Seen::LongConnack(_) => long = true,
            }
        }
        (connack, long, out.at_boundary(), out.connack_seen)
    }

    /// Following the broker's stream adds one acknowledgement credit per packet the
    /// client answers (a `QoS` 1 or 2 PUBLISH, a PUBREC, a PUBREL), at its first byte,
    /// however the writes cut or join the packets, and none for the others; the credit
    /// saturates at `u16::MAX`, and nothing is counted without one.
    #[test]
    fn the_broker_packets_the_client_answers_add_ack_credit() {
        let connack: &[u8] = &[0x20, 0x02, 0x00, 0x00];
        let qos0: &[u8] = &[0x30, 0x04, 0x00, 0x01, b't', b'x'];
        let qos1: &[u8] = &[0x32, 0x06, 0x00, 0x01, b't', 0x00, 0x01, b'x'];
        let qos2_dup: &[u8] = &[0x3d, 0x06, 0x00, 0x01, b't', 0x00, 0x02, b'x'];
        let acked: &[u8] = &[0x40, 0x02, 0x00, 0x01];
        let received: &[u8] = &[0x50, 0x02, 0x00, 0x02];
        let released: &[u8] = &[0x62, 0x02, 0x00, 0x03];
        let completed: &[u8] = &[0x70, 0x02, 0x00, 0x04];
        let suback: &[u8] = &[0x90, 0x03, 0x00, 0x01, 0x00];
        let pingresp: &[u8] = &[0xd0, 0x00];
        let stream = [
            connack, qos0, qos1, qos2_dup, acked, received, released, completed, suback, pingresp,
        ]
        .concat();
        for size in [1, 2, 3, 5, 7, stream.len()] {
            let mut out = OutBoundary::default();
            let mut credit = 0u16;
            for piece in stream.chunks(size) {
                out.advance(piece, Some(&mut credit));
            }
            assert!(out.at_boundary());
            assert_eq!(credit, 4, "writes of {size} bytes");
        }
        // Only the packets' first bytes count: a payload of PUBREL-like bytes does not.
        let mut payload = vec![0x30, 0x7f, 0x00, 0x01, b't'];
        payload.resize(2 + 0x7f, 0x62);
        let mut out = OutBoundary::default();
        let mut credit = u16::MAX - 1;
        out.advance(
            &[&payload[..], qos1, received, released].concat(),
            Some(&mut credit),
        );
        assert_eq!(credit, u16::MAX);
        // No credit kept: nothing counted, the boundaries followed as before.
        let mut out = OutBoundary::default();
        out.advance(&stream, None);
        assert!(out.at_boundary());
    }

    /// The broker's CONNACK is read where it is written when one write holds all of it,
    /// with no copy, and kept piece by piece otherwise; both ways find the same bytes and
    /// the same packet boundaries, the packets after it included.
    #[test]
    fn a_whole_connack_is_read_in_place_and_a_split_one_is_kept() {
        let v311: &[u8] = &[0x20, 0x02, 0x00, 0x00];
        let v5: &[u8] = &[0x20, 0x06, 0x00, 0x00, 0x03, 0x21, 0x00, 0x0a];
        let suback: &[u8] = &[0x90, 0x03, 0x00, 0x01, 0x00];
        for connack in [v311, v5] {
            // Alone, and followed by another packet in the same write.
            for after in [&[][..], suback] {
                let whole = [connack, after].concat();
                let (got, long, boundary, _) = follow(&[&whole]);
                assert_eq!(got, Some((connack.to_vec(), true)), "{whole:02x?}");
                assert!(!long && boundary);
                let bytes: Vec<&[u8]> = whole.chunks(1).collect();
                let (got, long, boundary, _) = follow(&bytes);
                assert_eq!(got, Some((connack.to_vec(), false)), "{whole:02x?}");
                assert!(!long && boundary);
            }
            // Cut inside the fixed header and inside the body.
            for cut in 1..connack.len() {
                let (head, tail) = connack.split_at(cut);
                let (got, _, boundary, _) = follow(&[head, tail]);
                assert_eq!(got, Some((connack.to_vec(), false)), "cut at {cut}");
                assert!(boundary);
            }
        }
        // Only the first CONNACK is the broker's answer.
        let (got, _, _, _) = follow(&[v311, v5]);
        assert_eq!(got, Some((v311.to_vec(), true)));
        // A packet before it does not hide it.
        let (got, _, boundary, _) = follow(&[&[suback, v5].concat()]);
        assert_eq!(got, Some((v5.to_vec(), true)));
        assert!(boundary);
        // Too long to keep, whole or not.
        let mut long = vec![0x20, 0xff, 0x7f];
        long.resize(3 + 0x3fff, 0);
        const { assert!(0x3fff > MAX_CONNACK) };
        let (got, was_long, boundary, _) = follow(&[&long]);
        assert!(got.is_none() && was_long && boundary);
        let (got, was_long, boundary, _) = follow(&[&long[..10], &long[10..]]);
        assert!(got.is_none() && was_long && boundary);
    }

    /// A CONNACK too long to keep still tells whether it accepts the connection: the
    /// first two bytes of its body are kept, however the writes cut it.
    #[test]
    fn a_long_connack_keeps_its_code() {
        let accepts = |seen: Seen<'_>, v| connack_code_accepts(seen.connack_code(), v);
        for code in [0x00, 0x87] {
            let mut long = vec![0x20, 0xff, 0x7f, 0x00, code];
            long.resize(3 + 0x3fff, 0);
            let mut codes = Vec::new();
            for cut in [1, 2, 3, 4, 5, 100, long.len()] {
                let mut out = OutBoundary::default();
                let mut seen = Vec::new();
                for piece in [&long[..cut], &long[cut..]] {
                    match out.advance(piece, None) {
                        Seen::LongConnack(c) => seen.push(c),
                        Seen::Nothing => {}
                        Seen::Connack(_) => panic!("kept whole"),
                    }
                }
                assert!(out.at_boundary() && out.connack.is_none());
                codes.extend(seen);
            }
            assert_eq!(codes, [Some(code); 7]);
            assert_eq!(
                accepts(Seen::LongConnack(Some(code)), Some(Version::V5)),
                code == 0
            );
        }
        // A CONNACK with no code refuses.
        assert!(!accepts(Seen::LongConnack(None), None));
        let short = Seen::Connack(Cow::Borrowed(&[0x20, 0x01, 0x00]));
        assert!(!accepts(short, Some(Version::V3_1_1)));
        let v5 = Seen::Connack(Cow::Borrowed(&[0x20, 0x03, 0x00, 0x80, 0x00]));
        assert!(!accepts(v5, Some(Version::V5)));
        let v3 = Seen::Connack(Cow::Borrowed(&[0x20, 0x02, 0x00, 0x01]));
        assert!(!accepts(v3, Some(Version::V3_1_1)));
        // Nothing seen has no code (`on_written` returns before asking).
        assert_eq!(Seen::Nothing.connack_code(), None);
    }

    /// Encodes `len` as an MQTT Remaining Length.
    fn remaining_length(mut len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut b = u8::try_from(len % 128).unwrap();
            len /= 128;
            if len > 0 {
                b |= 0x80;
            }
            out.push(b);
            if len == 0 {
                return out;
            }
        }
    }

    proptest::proptest! {
        /// Whatever the broker writes and however the writes cut it, reading a whole
        /// CONNACK in place finds what following byte by byte finds: the same first
        /// CONNACK (or the same "too long"), and the same packet boundary at the end.
        #[test]
        fn following_writes_in_any_pieces_finds_what_bytes_one_by_one_find(
            packets in proptest::collection::vec(
                (proptest::prop_oneof![proptest::strategy::Just(0x20u8), proptest::prelude::any::<u8>()],
                 proptest::prop_oneof![0usize..16, 0usize..300, 4090usize..4110]),
                0..6,
            ),
            tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..6),
        ) {
            let mut stream = Vec::new();
            for (first, len) in &packets {
                stream.push(*first);
                stream.extend_from_slice(&remaining_length(*len));
                stream.extend((0..*len).map(|i| u8::try_from(i % 251).unwrap()));
            }
            // Then anything: a partial or malformed header included.
            stream.extend_from_slice(&tail);
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.sort_unstable();
            let mut pieces = Vec::new();
            let mut from = 0;
            for to in at.into_iter().chain([stream.len()]) {
                pieces.push(&stream[from..to]);
                from = to;
            }
            let bytes: Vec<&[u8]> = stream.chunks(1).collect();
            let (a, a_long, a_boundary, a_seen) = follow(&pieces);
            let (b, b_long, b_boundary, b_seen) = follow(&bytes);
            proptest::prop_assert_eq!(a.map(|(c, _)| c), b.map(|(c, _)| c));
            proptest::prop_assert_eq!(a_long, b_long);
            proptest::prop_assert_eq!(a_boundary, b_boundary);
            proptest::prop_assert_eq!(a_seen, b_seen);
        }
    }

    /// A 3.1.1 CONNECT of client id "a".
    const CONNECT: [u8; 15] = [
        0x10, 0x0d, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 1, b'a',
    ];

    /// A client's side of a duplex of `capacity` bytes, and an `MqttIo` on the other side
    /// whose session accepted [`CONNECT`] under `config` (its first reads return it).
    fn connected(
        config: Config,
        capacity: usize,
    ) -> (tokio::io::DuplexStream, MqttIo<tokio::io::DuplexStream>) {
        connected_with(config, capacity, IoOptions::default())
    }

    /// [`connected`], with the layer's options `opts`.
    fn connected_with(
        config: Config,
        capacity: usize,
        opts: IoOptions,
    ) -> (tokio::io::DuplexStream, MqttIo<tokio::io::DuplexStream>) {
        connected_as(&CONNECT, config, capacity, opts)
    }

    /// [`connected_with`], for the client's `connect` instead of [`CONNECT`].
    fn connected_as(
        connect: &[u8],
        config: Config,
        capacity: usize,
        opts: IoOptions,
    ) -> (tokio::io::DuplexStream, MqttIo<tokio::io::DuplexStream>) {
        let mut session = Session::new(config);
        assert!(matches!(session.next(connect), Ok(Next::Packet { .. })));
        let (client, server) = tokio::io::duplex(capacity);
        let io = MqttIo::new(
            server,
            session,
            Bytes::copy_from_slice(connect),
            Bytes::new(),
            opts,
            None,
        );
        (client, io)
    }

    /// The first read of a connection can come from a task that has spent its
    /// cooperative budget (a proxy task busy with other work): tokio's `Sleep` then
    /// returns `Pending` without registering its timer. The CONNACK timer must be polled
    /// again by the later reads, or it never fires.
    #[tokio::test(start_paused = true)]
    async fn the_connack_timeout_fires_when_the_first_read_finds_the_coop_budget_spent() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let opts = IoOptions {
            connack_timeout: Some(TIMEOUT),
            ..IoOptions::default()
        };
        let (mut client, mut io) = connected_with(Config::new(), 1024, opts);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..200 {
            tx.send(i).unwrap();
        }
        let mut connect = [0; 15];
        let first = std::future::poll_fn(|cx| {
            // Spend the task's budget (128 operations), as other work in it would.
            let mut received = 0;
            while let Poll::Ready(Some(_)) = rx.poll_recv(cx) {
                received += 1;
            }
            assert!(received < 200, "the budget never ran out");
            // Then the first read: it arms the CONNACK timer, and returns the CONNECT.
            let mut rb = ReadBuf::new(&mut connect);
            let read = Pin::new(&mut io).poll_read(cx, &mut rb);
            Poll::Ready(read.map(|r| r.map(|()| rb.filled().len())))
        })
        .await;
        assert!(matches!(first, Poll::Ready(Ok(15))), "{first:?}");
        assert_eq!(connect, CONNECT);
        // The broker never answers; the client is silent.
        let start = Instant::now();
        let mut more = [0; 16];
        let read = tokio::time::timeout(TIMEOUT * 2, io.read(&mut more)).await;
        let err = read.expect("the CONNACK timeout never fired").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
        assert_eq!(Instant::now().saturating_duration_since(start), TIMEOUT);
        let mut answer = [0; 4];
        client.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [0x20, 0x02, 0x00, 0x03]);
    }

    /// The broker's CONNACK accepting [`CONNECT`], written through `io` (the client's
    /// side of the duplex keeps it): the client's packets after the CONNECT are read from
    /// then on.
    fn accept(io: &mut MqttIo<tokio::io::DuplexStream>) {
        let mut cx = Context::from_waker(Waker::noop());
        let connack = [0x20, 0x02, 0x00, 0x00];
        let n = Pin::new(io).poll_write(&mut cx, &connack);
        assert!(matches!(n, Poll::Ready(Ok(4))), "{n:?}");
    }

    /// A broker that stalls in the middle of its CONNACK is cut by the CONNACK timeout as
    /// one that sends none is: the timer ran only until the CONNACK's first byte, and the
    /// client's read, held until the whole CONNACK, waited for ever.
    #[tokio::test(start_paused = true)]
    async fn a_broker_stalled_in_its_connack_is_cut_by_the_connack_timeout() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let opts = IoOptions {
            connack_timeout: Some(TIMEOUT),
            ..IoOptions::default()
        };
        let (_client, mut io) = connected_with(Config::new(), 1024, opts);
        let mut got = [0; 15];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT);
        // The first byte of the broker's CONNACK, then nothing.
        let mut cx = Context::from_waker(Waker::noop());
        let n = Pin::new(&mut io).poll_write(&mut cx, &[0x20]);
        assert!(matches!(n, Poll::Ready(Ok(1))), "{n:?}");
        let mut more = [0; 2];
        let read = tokio::time::timeout(Duration::from_secs(60), io.read(&mut more)).await;
        let err = read.expect("the held read never ended").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
    }

    /// A 5.0 CONNECT of client id "a".
    const CONNECT_V5: [u8; 16] = [
        0x10, 0x0e, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 1, b'a',
    ];

    /// A 5.0 CONNECT of client id "a" with the Authentication Method "SCRM": the
    /// broker may answer with AUTH packets before its CONNACK.
    const CONNECT_V5_AUTH: [u8; 23] = [
        0x10, 0x15, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 7, 0x15, 0, 4, b'S', b'C', b'R',
        b'M', 0, 1, b'a',
    ];

    /// The broker's AUTH "continue authentication" (0x18) for [`CONNECT_V5_AUTH`].
    const AUTH_CONTINUE: [u8; 11] = [0xF0, 0x09, 0x18, 0x07, 0x15, 0, 4, b'S', b'C', b'R', b'M'];

    /// The gateway's own "server unavailable" CONNACKs: 3.x, and 5.0.
    const V3_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
    const V5_UNAVAILABLE: [u8; 5] = [0x20, 0x03, 0x00, 0x88, 0x00];

    /// `bytes` from the broker, written through `io` at once (the duplex has room).
    fn broker_writes(io: &mut MqttIo<tokio::io::DuplexStream>, bytes: &[u8]) {
        let mut cx = Context::from_waker(Waker::noop());
        let n = Pin::new(io).poll_write(&mut cx, bytes);
        assert!(matches!(n, Poll::Ready(Ok(k)) if k == bytes.len()), "{n:?}");
    }

    /// A client connected with an Authentication Method ([`CONNECT_AUTH`]), its CONNECT
    /// read (whole: it goes to the broker first).
    async fn authenticating() -> (tokio::io::DuplexStream, MqttIo<tokio::io::DuplexStream>) {
        let (client, mut io) = connected_as(
            &CONNECT_AUTH,
            Config::new(),
            64 * 1024,
            IoOptions::default(),
        );
        let mut got = [0; CONNECT_AUTH.len()];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT_AUTH);
        (client, io)
    }

    /// The broker's stream ends: `io` is shut down, as a proxy forwards the broker's EOF
    /// (within 60 s).
    async fn broker_closes(io: &mut MqttIo<tokio::io::DuplexStream>) {
        let shutdown = tokio::time::timeout(Duration::from_secs(60), io.shutdown());
        shutdown.await.expect("the shutdown never ended").unwrap();
    }

    /// After the broker closed: the client's held read ends (within 60 s) at EOF, with no
    /// refusal; returns all the client was sent.
    async fn ends_in_silence(
        io: &mut MqttIo<tokio::io::DuplexStream>,
        client: &mut tokio::io::DuplexStream,
    ) -> Vec<u8> {
        let mut more = [0; 2];
        let read = tokio::time::timeout(Duration::from_secs(60), io.read(&mut more)).await;
        assert_eq!(read.expect("the held read never ended").unwrap(), 0);
        assert_eq!(io.error(), None);
        let mut seen = Vec::new();
        client.read_to_end(&mut seen).await.unwrap();
        seen
    }

    /// How many rejections `snap` counted as `upstream_closed`.
    fn upstream_closed(snap: &metrics_util::debugging::Snapshotter) -> u64 {
        aegis_core::metrics::testing::capture(snap).counter(
            aegis_core::metrics::REJECTIONS_TOTAL,
            &[("layer", "mqtt"), ("reason", "upstream_closed")],
        )
    }

    /// A broker that closes between two packets before any CONNACK went out (the proxy
    /// forwards its EOF as a write shutdown: a TCP load balancer with no healthy
    /// backend, a broker restarting): the client gets the gateway's own "server
    /// unavailable" CONNACK for its version, then EOF, as for a CONNACK timeout; the
    /// refusal is `upstream_closed`, counted once, and ends the held read (nothing sent
    /// after the CONNECT is read: without it and a CONNACK timeout the read waited for
    /// ever, found by the `mqtt_io` fuzz target). The client got a silent EOF before.
    #[test]
    fn a_broker_gone_before_its_connack_gets_the_client_server_unavailable() {
        // The client's CONNECT, the broker's packets before its EOF, the client's answer.
        type Case<'a> = (&'a [u8], &'a [&'a [u8]], &'a [u8]);
        let cases: [Case<'_>; 3] = [
            (&CONNECT, &[], &V3_UNAVAILABLE),
            (&CONNECT_V5, &[], &V5_UNAVAILABLE),
            // An enhanced authentication: whole AUTH packets first, then the CONNACK.
            (
                &CONNECT_V5_AUTH,
                &[&AUTH_CONTINUE, &AUTH_CONTINUE],
                &V5_UNAVAILABLE,
            ),
        ];
        for (connect, before, answer) in cases {
            let ((), snap) = aegis_core::metrics::testing::run(true, || async {
                let (mut client, mut io) =
                    connected_as(connect, Config::new(), 1024, IoOptions::default());
                let mut got = vec![0; connect.len()];
                io.read_exact(&mut got).await.unwrap();
                assert_eq!(got, connect);
                for packet in before {
                    broker_writes(&mut io, packet);
                }
                if connect != CONNECT_V5_AUTH {
                    // A pipelined PINGREQ. (The enhanced authentication's client is read
                    // before the CONNACK, and would be refused for it.)
                    client.write_all(&[0xC0, 0x00]).await.unwrap();
                }
                let mut more = [0; 2];
                assert!(futures_poll_once(io.read(&mut more)).await, "held");
                broker_closes(&mut io).await;
                let read = tokio::time::timeout(Duration::from_secs(60), io.read(&mut more)).await;
                let err = read.expect("the held read never ended").unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                assert_eq!(
                    aegis_core::error::label_of(&err),
                    ("mqtt", "upstream_closed")
                );
                assert_eq!(io.error(), Some(MqttError::UpstreamClosed));
                let mut seen = Vec::new();
                client.read_to_end(&mut seen).await.unwrap();
                assert_eq!(
                    seen,
                    [&before.concat()[..], answer].concat(),
                    "{connect:02x?}"
                );
                // Nothing of the broker's goes out after the gateway's CONNACK.
                let mut cx = Context::from_waker(Waker::noop());
                let late = Pin::new(&mut io).poll_write(&mut cx, &V3_UNAVAILABLE);
                assert!(matches!(late, Poll::Ready(Err(_))), "{late:?}");
            });
            assert_eq!(upstream_closed(&snap), 1, "{connect:02x?}");
        }
    }

    /// No answer is added where the client already has part of a packet of the broker's:
    /// a broker that closed inside a packet (half an AUTH), or after any byte of a
    /// CONNACK, leaves the client that and EOF, as before; nothing counted.
    #[test]
    fn a_broker_gone_inside_a_packet_or_its_connack_gets_no_answer_added() {
        let cases: [(&[u8], &[u8]); 5] = [
            (&CONNECT, &[0x20]),
            (&CONNECT, &[0x20, 0x02, 0x00]),
            (&CONNECT_V5, &[0x20, 0x03]),
            (&CONNECT_V5_AUTH, &AUTH_CONTINUE[..3]),
            (
                &CONNECT_V5_AUTH,
                &[&AUTH_CONTINUE[..], &[0x20][..]].concat(),
            ),
        ];
        for (connect, written) in cases {
            let ((), snap) = aegis_core::metrics::testing::run(true, || async {
                let (mut client, mut io) =
                    connected_as(connect, Config::new(), 1024, IoOptions::default());
                let mut got = vec![0; connect.len()];
                io.read_exact(&mut got).await.unwrap();
                broker_writes(&mut io, written);
                broker_closes(&mut io).await;
                let seen = ends_in_silence(&mut io, &mut client).await;
                assert_eq!(seen, written, "{connect:02x?}");
            });
            assert_eq!(upstream_closed(&snap), 0, "{connect:02x?} {written:02x?}");
        }
    }

    /// A refusal under way keeps its answer: after the CONNACK timeout's own CONNACK
    /// went out, the broker's EOF adds no second CONNACK, and the refusal stays
    /// `connack_timeout`; nor does it take the place of a refusal not answered yet.
    #[test]
    fn a_broker_gone_after_the_gateways_own_connack_gets_no_second_one() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        for (connect, answer) in [
            (&CONNECT[..], &V3_UNAVAILABLE[..]),
            (&CONNECT_V5, &V5_UNAVAILABLE),
        ] {
            let ((), snap) = aegis_core::metrics::testing::run(true, || async {
                let opts = IoOptions {
                    connack_timeout: Some(TIMEOUT),
                    ..IoOptions::default()
                };
                let (mut client, mut io) = connected_as(connect, Config::new(), 1024, opts);
                let mut got = vec![0; connect.len()];
                io.read_exact(&mut got).await.unwrap();
                let mut more = [0; 2];
                let err = io.read(&mut more).await.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::InvalidData);
                assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
                io.shutdown().await.unwrap();
                assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
                let mut seen = Vec::new();
                client.read_to_end(&mut seen).await.unwrap();
                assert_eq!(seen, answer);
            });
            assert_eq!(upstream_closed(&snap), 0);
        }
        // A refusal recorded before any CONNACK went out and not yet answered (an MQTT
        // 5 client of an enhanced authentication sent a packet other than AUTH): it
        // stays the connection's refusal.
        let ((), snap) = aegis_core::metrics::testing::run(true, || async {
            let (_client, mut io) =
                connected_as(&CONNECT_V5_AUTH, Config::new(), 1024, IoOptions::default());
            let mut got = [0; CONNECT_V5_AUTH.len()];
            io.read_exact(&mut got).await.unwrap();
            io.fail(MqttError::ProtocolError("not AUTH before the CONNACK"));
            broker_closes(&mut io).await;
            assert_eq!(
                io.error(),
                Some(MqttError::ProtocolError("not AUTH before the CONNACK"))
            );
        });
        assert_eq!(upstream_closed(&snap), 0);
    }

    /// A client that does not read cannot hold the shutdown for ever: the gateway's
    /// CONNACK has the refusal's deadline to go out, then the stream is shut down
    /// without the rest of it (here the pipe takes two bytes).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_does_not_read_holds_the_upstream_closed_answer_only_so_long() {
        for (connect, answer) in [
            (&CONNECT[..], &V3_UNAVAILABLE[..]),
            (&CONNECT_V5, &V5_UNAVAILABLE),
        ] {
            let (mut client, mut io) =
                connected_as(connect, Config::new(), 2, IoOptions::default());
            let mut got = vec![0; connect.len()];
            io.read_exact(&mut got).await.unwrap();
            let start = Instant::now();
            broker_closes(&mut io).await;
            assert_eq!(
                Instant::now().saturating_duration_since(start),
                REFUSAL_DEADLINE
            );
            let mut more = [0; 2];
            let err = io.read(&mut more).await.unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidData);
            assert_eq!(io.error(), Some(MqttError::UpstreamClosed));
            let mut seen = Vec::new();
            client.read_to_end(&mut seen).await.unwrap();
            assert_eq!(seen, answer[..2]);
        }
    }

    /// Through the proxy's copy: the upstream takes the CONNECT and closes; the client
    /// gets "server unavailable" and the connection's error is the rejection
    /// `upstream_closed` (what the security layer and the logs see).
    #[tokio::test(start_paused = true)]
    async fn through_a_proxy_an_upstream_that_closes_ends_the_connection_with_upstream_closed() {
        let (mut client, io) = connected(Config::new(), 1024);
        let (gateway_side, mut upstream) = tokio::io::duplex(1024);
        let transfer = tokio::spawn(aegis_core::proxy::Transfer::new(io, gateway_side, 8192));
        let mut connect = [0; 15];
        upstream.read_exact(&mut connect).await.unwrap();
        assert_eq!(connect, CONNECT);
        drop(upstream);
        let mut seen = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut seen));
        read.await.expect("no EOF").unwrap();
        assert_eq!(seen, V3_UNAVAILABLE);
        let err = transfer.await.unwrap().unwrap_err();
        assert_eq!(
            aegis_core::error::label_of(&err),
            ("mqtt", "upstream_closed")
        );
    }

    /// A broker that closes before its CONNACK after the client has ended its side (its
    /// DISCONNECT, read before the CONNACK under enhanced authentication, or its EOF)
    /// does what it should: the client gets no CONNACK of the gateway's (one after its
    /// DISCONNECT answers nothing), the connection ends with EOF, and nothing is counted.
    /// It got "server unavailable", counted as `upstream_closed`: any client could raise
    /// the operators' outage signal at will.
    #[test]
    fn a_broker_that_closes_after_the_clients_disconnect_or_eof_gets_it_no_connack() {
        // What the client sends after its CONNECT, and whether it half-closes then.
        let cases: [(&[u8], bool); 3] =
            [(&[0xE0, 0x00], false), (&[0xE0, 0x00], true), (&[], true)];
        for (after, fin) in cases {
            let ((), snap) = aegis_core::metrics::testing::run(true, || async {
                let (mut client, mut io) =
                    connected_as(&CONNECT_AUTH, Config::new(), 1024, IoOptions::default());
                let mut got = [0; CONNECT_AUTH.len()];
                io.read_exact(&mut got).await.unwrap();
                client.write_all(after).await.unwrap();
                if fin {
                    client.shutdown().await.unwrap();
                }
                // The DISCONNECT goes on to the broker.
                let mut forwarded = Vec::new();
                while let Some(read) = read_once(&mut io, 8192) {
                    let read = read.unwrap();
                    if read.is_empty() {
                        break;
                    }
                    forwarded.extend_from_slice(&read);
                }
                assert_eq!(forwarded, after);
                // The broker closes.
                broker_closes(&mut io).await;
                let seen = ends_in_silence(&mut io, &mut client).await;
                assert_eq!(seen, b"", "{after:02x?} fin {fin}");
            });
            assert_eq!(upstream_closed(&snap), 0, "{after:02x?} fin {fin}");
        }

        // Through the proxy's copy: the broker reads the CONNECT and the DISCONNECT (the
        // client half-closes after it), and closes.
        let ((), snap) = aegis_core::metrics::testing::run(true, || async {
            let (mut client, io) =
                connected_as(&CONNECT_AUTH, Config::new(), 1024, IoOptions::default());
            let (gateway_side, mut broker) = tokio::io::duplex(1024);
            let transfer = tokio::spawn(aegis_core::proxy::Transfer::new(io, gateway_side, 8192));
            client.write_all(&[0xE0, 0x00]).await.unwrap();
            client.shutdown().await.unwrap();
            let mut forwarded = [0; CONNECT_AUTH.len() + 2];
            broker.read_exact(&mut forwarded).await.unwrap();
            assert_eq!(forwarded, [&CONNECT_AUTH[..], &[0xE0, 0x00]].concat()[..]);
            drop(broker);
            let mut seen = Vec::new();
            let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut seen));
            read.await.expect("no EOF").unwrap();
            assert_eq!(seen, b"");
            let done = tokio::time::timeout(Duration::from_secs(60), transfer).await;
            done.expect("the transfer never ended").unwrap().unwrap();
        });
        assert_eq!(upstream_closed(&snap), 0, "through the proxy");
    }

    /// An idle connection holds no read buffer: the 4 KiB chunk is let go as soon as a
    /// read finds nothing to do, and taken again for the next packet.
    #[tokio::test]
    async fn an_idle_connection_holds_no_read_buffer() {
        let (mut client, mut io) = connected(Config::new(), 1024);
        let mut got = [0; 15];
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(got, CONNECT);
        accept(&mut io);
        for _ in 0..3 {
            client.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ
            let mut ping = [0; 2];
            io.read_exact(&mut ping).await.unwrap();
            assert_eq!(ping, [0xC0, 0x00]);
            // The next read finds the client quiet.
            let mut more = [0; 1];
            let pending = futures_poll_once(io.read(&mut more)).await;
            assert!(pending, "a read with nothing sent must wait");
            assert_eq!(
                io.buf.capacity(),
                0,
                "an idle connection keeps its read buffer"
            );
            assert!(io.ready.is_empty());
        }
    }

    /// A client that sends a large packet a piece at a time makes the layer hold that
    /// packet and no more: the read buffer never grows past the packet's declared size
    /// (a buffer grown by `reserve` doubles, and would hold up to twice the size cap),
    /// and the packet comes out whole, as sent.
    #[tokio::test]
    async fn a_packet_arriving_in_pieces_holds_no_more_than_its_size() {
        let (mut client, mut io) = connected(Config::new(), 1 << 20);
        let mut got = [0; 15];
        io.read_exact(&mut got).await.unwrap();
        accept(&mut io);
        // A QoS 0 PUBLISH to "t" of 200 KiB, under the 256 KiB cap.
        let payload: Vec<u8> = (0..200 * 1024_u32)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        let mut publish = vec![0x30];
        publish.extend_from_slice(&remaining_length(3 + payload.len()));
        publish.extend_from_slice(&[0x00, 0x01, b't']);
        publish.extend_from_slice(&payload);
        let mut released = Vec::new();
        for room in [16, DIRECT_READ, 64 * 1024] {
            for piece in publish.chunks(10_000) {
                client.write_all(piece).await.unwrap();
                // A fresh cooperative budget for the reads below (they take no waker).
                tokio::task::yield_now().await;
                while let Some(read) = read_once(&mut io, room) {
                    released.extend_from_slice(&read.unwrap());
                }
                assert!(
                    io.buf.capacity() <= publish.len(),
                    "{} bytes held for a packet of {} (reads of {room})",
                    io.buf.capacity(),
                    publish.len()
                );
            }
            assert!(
                released == publish,
                "reads of {room}: not the packet as sent"
            );
            released.clear();
        }
    }

    /// A 3.1.1 `QoS` 0 PUBLISH to "t" with `len` bytes of payload.
    fn publish(len: usize) -> Vec<u8> {
        let mut p = vec![0x30];
        p.extend_from_slice(&remaining_length(3 + len));
        p.extend_from_slice(&[0x00, 0x01, b't']);
        p.extend((0..len).map(|i| u8::try_from(i % 251).unwrap()));
        p
    }

    /// A packet begun after the CONNECT must be whole within the packet timeout of its
    /// first byte (60 s by default, whatever the keep-alive): a client that stops inside
    /// one, sending a byte every 10 s, is cut at 60 s all the same, and the bytes held
    /// for the packet go.
    #[tokio::test(start_paused = true)]
    async fn a_stalled_packet_is_cut_at_its_deadline_however_its_bytes_trickle() {
        let (mut client, mut io) = connected(Config::new(), 1 << 20);
        let mut connect = [0; 15];
        io.read_exact(&mut connect).await.unwrap();
        accept(&mut io);
        let publish = publish(100 * 1024);
        let start = Instant::now();
        client.write_all(&publish[..50 * 1024]).await.unwrap();
        let read = async {
            let mut buf = [0; 1024];
            let read = tokio::time::timeout(Duration::from_secs(3600), io.read(&mut buf));
            let err = read.await.expect("never cut").unwrap_err();
            (err, Instant::now().saturating_duration_since(start))
        };
        let trickle = async {
            for b in &publish[50 * 1024..50 * 1024 + 20] {
                tokio::time::sleep(Duration::from_secs(10)).await;
                client.write_all(&[*b]).await.unwrap();
            }
        };
        let ((err, took), ()) = tokio::join!(read, trickle);
        assert_eq!(took, super::super::DEFAULT_PACKET_TIMEOUT);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.error(), Some(MqttError::PacketTimeout));
        assert_eq!(io.buf.capacity(), 0, "the partial packet is still held");
        // MQTT 3.1.1: no DISCONNECT, the connection just closes.
        drop(io);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, [0x20, 0x02, 0x00, 0x00], "only the broker's CONNACK");
    }

    /// A packet whole before its deadline passes; the packet begun behind it has a
    /// deadline of its own, from when it began.
    #[tokio::test(start_paused = true)]
    async fn a_packet_whole_in_time_passes_and_the_next_one_has_its_own_deadline() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        const JUST_IN_TIME: Duration = Duration::from_millis(4999);
        let opts = IoOptions {
            packet_timeout: TIMEOUT,
            ..IoOptions::default()
        };
        let (mut client, mut io) = connected_with(Config::new(), 1 << 20, opts);
        let mut connect = [0; 15];
        io.read_exact(&mut connect).await.unwrap();
        accept(&mut io);
        let (first, second) = (publish(3000), publish(10));
        let start = Instant::now();
        client.write_all(&first[..1000]).await.unwrap();
        let read = async {
            let mut got = vec![0; first.len()];
            io.read_exact(&mut got).await.unwrap();
            let whole_at = Instant::now().saturating_duration_since(start);
            let read = tokio::time::timeout(Duration::from_secs(3600), io.read_u8());
            let err = read.await.expect("never cut").unwrap_err();
            (
                got,
                whole_at,
                err,
                Instant::now().saturating_duration_since(start),
            )
        };
        let write = async {
            // Just in time: the rest of the first packet, and the start of the second.
            tokio::time::sleep(JUST_IN_TIME).await;
            client
                .write_all(&[&first[1000..], &second[..5]].concat())
                .await
                .unwrap();
        };
        let ((got, whole_at, err, cut_at), ()) = tokio::join!(read, write);
        assert!(got == first, "the first packet, as sent");
        assert_eq!(whole_at, JUST_IN_TIME);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.error(), Some(MqttError::PacketTimeout));
        assert_eq!(
            cut_at,
            JUST_IN_TIME + TIMEOUT,
            "the second packet's own deadline"
        );
    }

    /// `Duration::MAX` as the packet timeout means, in practice, never: no panic, and a
    /// partial packet waits.
    #[tokio::test(start_paused = true)]
    async fn a_packet_timeout_of_duration_max_never_fires() {
        let opts = IoOptions {
            packet_timeout: Duration::MAX,
            ..IoOptions::default()
        };
        let (mut client, mut io) = connected_with(Config::new(), 1 << 20, opts);
        let mut connect = [0; 15];
        io.read_exact(&mut connect).await.unwrap();
        accept(&mut io);
        client.write_all(&publish(100)[..50]).await.unwrap();
        let mut buf = [0; 64];
        let year = Duration::from_secs(365 * 86_400);
        let read = tokio::time::timeout(year, io.read(&mut buf)).await;
        assert!(read.is_err(), "{read:?}");
        assert_eq!(io.error(), None);
    }

    /// A broker's CONNACK followed by a queued PUBLISH in one write (a persistent
    /// session's messages, read from the broker in one piece) still ends the CONNECT
    /// phase: the client's packets are then held to the packet size cap, not to the
    /// small CONNECT cap. (The CONNACK was missed when another packet followed it in the
    /// same write.)
    #[tokio::test]
    async fn a_connack_followed_by_a_publish_in_one_write_ends_the_connect_phase() {
        let (mut client, mut io) = connected(Config::new().max_connect_size(64), 4096);
        let mut got = [0; 15];
        io.read_exact(&mut got).await.unwrap();
        // The broker's CONNACK and a queued QoS 0 PUBLISH "t" = "hi", in one write.
        let from_broker = [
            0x20, 0x02, 0x00, 0x00, 0x30, 0x05, 0x00, 0x01, b't', b'h', b'i',
        ];
        io.write_all(&from_broker).await.unwrap();
        let mut echoed = [0; 11];
        client.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, from_broker);
        // A 200-byte PUBLISH: over the 64-byte CONNECT cap, well under the packet cap.
        // Remaining Length 197 (0xC5 0x01): topic "t" (3 bytes) and 194 bytes of payload.
        let mut publish = vec![0x30, 0xC5, 0x01, 0x00, 0x01, b't'];
        publish.extend_from_slice(&[7u8; 194]);
        assert_eq!(publish.len(), 200);
        client.write_all(&publish).await.unwrap();
        let mut forwarded = vec![0; 200];
        io.read_exact(&mut forwarded).await.unwrap();
        assert_eq!(forwarded, publish);
    }

    /// One poll of a read into `room` bytes: `None` if it is pending.
    fn read_once(
        io: &mut MqttIo<tokio::io::DuplexStream>,
        room: usize,
    ) -> Option<io::Result<Vec<u8>>> {
        let mut buf = vec![0; room];
        let mut rb = ReadBuf::new(&mut buf);
        let mut cx = Context::from_waker(Waker::noop());
        match Pin::new(io).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) => Some(Ok(rb.filled().to_vec())),
            Poll::Ready(Err(e)) => Some(Err(e)),
            Poll::Pending => None,
        }
    }

    proptest::proptest! {
        /// However the client's packets are cut, and whether the reads go straight into
        /// a large buffer or through the layer's own (a small one), the reads return
        /// exactly the valid packets, in order; into a buffer that holds a packet, only
        /// whole packets; then the refusal of an invalid packet, or EOF.
        #[test]
        fn reads_return_the_valid_packets_whatever_the_cuts_and_the_buffer(
            payloads in proptest::collection::vec(
                proptest::option::of(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                0..8,
            ),
            invalid in proptest::prelude::any::<bool>(),
            cuts in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 0..8),
            room in proptest::prop_oneof![1usize..16, proptest::strategy::Just(DIRECT_READ), proptest::strategy::Just(8192)],
        ) {
            let connect = CONNECT;
            // PINGREQs and QoS 0 PUBLISHes to "t".
            let mut stream = Vec::new();
            let mut ends = Vec::new();
            for p in &payloads {
                match p {
                    None => stream.extend_from_slice(&[0xC0, 0x00]),
                    Some(payload) => {
                        stream.push(0x30);
                        stream.extend_from_slice(&remaining_length(3 + payload.len()));
                        stream.extend_from_slice(&[0x00, 0x01, b't']);
                        stream.extend_from_slice(payload);
                    }
                }
                ends.push(stream.len());
            }
            let valid = stream.len();
            if invalid {
                // A PINGREQ with its reserved flags set: malformed.
                stream.extend_from_slice(&[0xC1, 0x00]);
            }
            let mut at: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
            at.sort_unstable();

            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
            let _guard = rt.enter();
            let (mut client, mut io) = connected(Config::new(), 1 << 20);
            accept(&mut io);
            let mut got = Vec::new();
            let mut error = None;
            let mut eof = false;
            let mut read_all = |io: &mut MqttIo<_>, got: &mut Vec<u8>| {
                while error.is_none() && !eof {
                    match read_once(io, room) {
                        None => break,
                        Some(Ok(b)) if b.is_empty() => eof = true,
                        Some(Ok(b)) => {
                            got.extend_from_slice(&b);
                            let whole = room >= 8192 && got.len() > connect.len();
                            if whole {
                                let at = got.len() - connect.len();
                                proptest::prop_assert!(ends.contains(&at), "a read ends at {at}, inside a packet");
                            }
                        }
                        Some(Err(e)) => error = Some(e),
                    }
                }
                Ok(())
            };
            let mut from = 0;
            for to in at.into_iter().chain([stream.len()]) {
                let mut cx = Context::from_waker(Waker::noop());
                let piece = &stream[from..to];
                if !piece.is_empty() {
                    let n = Pin::new(&mut client).poll_write(&mut cx, piece);
                    proptest::prop_assert!(matches!(n, Poll::Ready(Ok(k)) if k == piece.len()));
                }
                from = to;
                read_all(&mut io, &mut got)?;
            }
            drop(client);
            read_all(&mut io, &mut got)?;
            proptest::prop_assert_eq!(&got[..connect.len()], &connect[..]);
            proptest::prop_assert_eq!(&got[connect.len()..], &stream[..valid]);
            if invalid {
                let e = error.expect("the invalid packet is refused");
                proptest::prop_assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            } else {
                proptest::prop_assert!(error.is_none(), "{error:?}");
                proptest::prop_assert!(eof);
            }
        }
    }

    /// An MQTT 5 CONNECT (client id "a") with the Authentication Method "m": enhanced
    /// authentication, its AUTH packets are read before the broker's CONNACK.
    const CONNECT_AUTH: [u8; 20] = [
        0x10, 0x12, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 4, 0x15, 0, 1, b'm', 0, 1, b'a',
    ];

    /// The client's AUTH "continue authentication" (0x18) with method "m" and `data` bytes
    /// of Authentication Data (at most 16 KiB: a two-byte Remaining Length).
    fn auth(data: usize) -> Vec<u8> {
        let len = u16::try_from(data).unwrap();
        let mut props = vec![0x15, 0, 1, b'm', 0x16];
        props.extend_from_slice(&len.to_be_bytes());
        props.resize(props.len() + data, b'x');
        let mut body = vec![0x18];
        body.extend_from_slice(&remaining_length(props.len()));
        body.extend_from_slice(&props);
        let mut packet = vec![0xF0];
        packet.extend_from_slice(&remaining_length(body.len()));
        packet.extend_from_slice(&body);
        packet
    }

    /// Copies `from` to `to` as a proxy does (aegis-core's copy): reads, writes all it
    /// read, then reads again; so the client is not read while the broker's socket is
    /// full. (tokio's `copy` goes on reading into its buffer while a write waits.) Ends
    /// at EOF or the first error.
    async fn proxy_copy<R, W>(from: &mut R, to: &mut W) -> io::Result<()>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut buf = vec![0; 8192];
        loop {
            let n = from.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            to.write_all(&buf[..n]).await?;
        }
    }

    /// A client of an enhanced authentication that floods AUTH packets at a stalled
    /// broker (one that reads nothing) is still cut by the CONNACK timeout. Its AUTHs
    /// were forwarded as fast as they came, until the broker's socket was full; a proxy
    /// then waits to write them and reads the client no more, and the CONNACK timer,
    /// polled only by the reads, never fired: no CONNACK 0x88, no `on_connack_timeout`,
    /// and the connection stayed open for as long as the broker was stalled. Now the
    /// client gets one AUTH ahead of the broker's (it has sent none): the rest wait in
    /// its socket, the held read keeps the timer running.
    #[tokio::test(start_paused = true)]
    async fn an_auth_flood_at_a_stalled_broker_is_cut_by_the_connack_timeout() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        let (calls, hook) = {
            let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let c = std::sync::Arc::clone(&calls);
            let hook = super::super::Hook::new(move |()| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            (calls, hook)
        };
        let opts = IoOptions {
            connack_timeout: Some(TIMEOUT),
            on_connack_timeout: Some(hook),
            ..IoOptions::default()
        };
        let (client, mut io) = connected_as(&CONNECT_AUTH, Config::new(), 4096, opts);
        let (mut from_gateway, mut to_gateway) = tokio::io::split(client);
        let one = auth(1000);
        let flood = tokio::spawn(async move {
            let mut sent = 0;
            // 4 MB of AUTH, or until the gateway is gone.
            while sent < 4 << 20 && to_gateway.write_all(&one).await.is_ok() {
                sent += one.len();
            }
            sent
        });
        // The broker's socket: it takes 64 KiB, and the broker reads none of it.
        let (mut broker, mut upstream) = tokio::io::duplex(64 * 1024);
        let start = Instant::now();
        let copy = tokio::time::timeout(TIMEOUT * 4, proxy_copy(&mut io, &mut upstream));
        let err = copy
            .await
            .expect("the CONNACK timeout never fired")
            .unwrap_err();
        assert_eq!(Instant::now().saturating_duration_since(start), TIMEOUT);
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
        let mut answer = [0; 5];
        from_gateway.read_exact(&mut answer).await.unwrap();
        assert_eq!(answer, [0x20, 0x03, 0x00, 0x88, 0x00]);
        // The broker got the CONNECT and one AUTH, no more.
        drop(upstream);
        let mut forwarded = Vec::new();
        broker.read_to_end(&mut forwarded).await.unwrap();
        drop(io);
        // It sent more than its socket holds: the rest waited there.
        let sent = flood.await.unwrap();
        assert!(
            sent > 4096 + auth(1000).len(),
            "the client sent {sent} bytes"
        );
        let expected = [&CONNECT_AUTH[..], &auth(1000)].concat();
        assert!(
            forwarded == expected,
            "forwarded {} bytes of the client's {sent}, expected {}",
            forwarded.len(),
            expected.len()
        );
    }

    /// A client that ends its side before the broker's CONNACK (a FIN after its CONNECT,
    /// or after a DISCONNECT or an AUTH), in front of a stalled broker (its socket takes
    /// what comes, and it reads nothing, answers nothing, never closes), still gets the
    /// CONNACK timeout's answer through the proxy's copy, and the timeout is reported.
    /// The client of an enhanced authentication got nothing: its EOF was returned at
    /// once before the CONNACK, the copy marked that direction done and read the client
    /// no more, the CONNACK timer, polled only by the reads, never fired, and the
    /// connection was held (no CONNACK 0x88, no `on_connack_timeout`) for as long as the
    /// broker stalled. Now its EOF waits for the CONNACK as the packets of a client
    /// without one do, and the held read keeps the timer running; after a broker's AUTH,
    /// the same holds for `auth_timeout` (not reported: the broker is up).
    #[tokio::test(start_paused = true)]
    async fn a_client_that_half_closes_before_the_connack_still_gets_the_connack_timeout() {
        const TIMEOUT: Duration = Duration::from_secs(5);
        const V5_NOT_AUTHORIZED: [u8; 5] = [0x20, 0x03, 0x00, 0x87, 0x00];
        // The client's CONNECT, what it sends after it before its FIN, the broker's one
        // AUTH before it stalls (if any), the client's answer, the refusal, and how many
        // times `on_connack_timeout` is called.
        type Case<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8], &'a str, usize);
        let (client_auth, challenge) = (auth(1), auth(5));
        let cases: [Case<'_>; 6] = [
            (&CONNECT, &[], &[], &V3_UNAVAILABLE, "connack_timeout", 1),
            (&CONNECT_V5, &[], &[], &V5_UNAVAILABLE, "connack_timeout", 1),
            (
                &CONNECT_AUTH,
                &[],
                &[],
                &V5_UNAVAILABLE,
                "connack_timeout",
                1,
            ),
            (
                &CONNECT_AUTH,
                &[0xE0, 0x00],
                &[],
                &V5_UNAVAILABLE,
                "connack_timeout",
                1,
            ),
            (
                &CONNECT_AUTH,
                &client_auth,
                &[],
                &V5_UNAVAILABLE,
                "connack_timeout",
                1,
            ),
            (
                &CONNECT_AUTH,
                &[],
                &challenge,
                &V5_NOT_AUTHORIZED,
                "auth_timeout",
                0,
            ),
        ];
        for (connect, after, broker_auth, answer, reason, told) in cases {
            let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let c = std::sync::Arc::clone(&calls);
            let hook = super::super::Hook::new(move |()| {
                c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            });
            let opts = IoOptions {
                connack_timeout: Some(TIMEOUT),
                on_connack_timeout: Some(hook),
                ..IoOptions::default()
            };
            let (client, io) = connected_as(connect, Config::new(), 4096, opts);
            let (mut from_gateway, mut to_gateway) = tokio::io::split(client);
            let (gateway_side, mut broker) = tokio::io::duplex(64 * 1024);
            let start = Instant::now();
            let transfer = tokio::spawn(aegis_core::proxy::Transfer::new(io, gateway_side, 8192));
            let mut seen = vec![0; broker_auth.len()];
            if !broker_auth.is_empty() {
                broker.write_all(broker_auth).await.unwrap();
                from_gateway.read_exact(&mut seen).await.unwrap();
            }
            to_gateway.write_all(after).await.unwrap();
            to_gateway.shutdown().await.unwrap();
            let read = tokio::time::timeout(TIMEOUT * 12, from_gateway.read_to_end(&mut seen));
            read.await
                .unwrap_or_else(|_| panic!("no answer, no EOF: {connect:02x?} {after:02x?}"))
                .unwrap();
            assert_eq!(Instant::now().saturating_duration_since(start), TIMEOUT);
            assert_eq!(seen, [broker_auth, answer].concat(), "{connect:02x?}");
            let err = transfer.await.unwrap().unwrap_err();
            assert_eq!(aegis_core::error::label_of(&err), ("mqtt", reason));
            assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), told);
            // The broker got the CONNECT and what the client sent before its FIN.
            let mut forwarded = Vec::new();
            broker.read_to_end(&mut forwarded).await.unwrap();
            assert_eq!(forwarded, [connect, after].concat());
        }
    }

    /// Without a CONNACK timeout (the layer's default; `connack_timeout = "0s"` in the
    /// gateway), a client that ends its side of an enhanced authentication before the
    /// CONNACK (a FIN after its CONNECT, after the broker's challenge, after its own AUTH
    /// or DISCONNECT) is let go: the broker gets its FIN, closes as a healthy broker does,
    /// and the connection ends, with no CONNACK of the gateway's and nothing counted (the
    /// client left: no `upstream_closed`). Its EOF was held for a CONNACK timer that did
    /// not run: a broker that had sent its AUTH challenge waited for the client's answer,
    /// never got the FIN, and the connection, its upstream socket and the client's slot
    /// were held for ever. (With a CONNACK timeout the EOF is still held, and the timeout
    /// answers: [`a_client_that_half_closes_before_the_connack_still_gets_the_connack_timeout`].)
    /// The same holds with only a CONNACK latency to report (no timer either).
    #[test]
    fn without_a_connack_timeout_a_client_that_leaves_an_enhanced_authentication_is_let_go() {
        let challenge = auth(5);
        let client_auth = auth(1);
        // What the broker sends first (its challenge, or nothing), and what the client
        // sends after its CONNECT before its FIN.
        let cases: [(&[u8], &[u8]); 5] = [
            (&challenge, &[]),
            (&[], &[]),
            (&challenge, &client_auth),
            (&[], &[0xE0, 0x00]),
            (&challenge, &[0xE0, 0x00]),
        ];
        for latency in [false, true] {
            for (broker_auth, after) in cases {
                let what =
                    format!("broker {broker_auth:02x?}, client {after:02x?}, latency {latency}");
                let ((), snap) = aegis_core::metrics::testing::run(true, || async {
                    let opts = IoOptions {
                        connack_latency: latency.then(|| super::super::ConnackLatency::new(|_| {})),
                        ..IoOptions::default()
                    };
                    let (client, io) = connected_as(&CONNECT_AUTH, Config::new(), 4096, opts);
                    let (mut from_gateway, mut to_gateway) = tokio::io::split(client);
                    let (gateway_side, mut broker) = tokio::io::duplex(64 * 1024);
                    let transfer =
                        tokio::spawn(aegis_core::proxy::Transfer::new(io, gateway_side, 8192));
                    let mut seen = vec![0; broker_auth.len()];
                    let mut forwarded = vec![0; CONNECT_AUTH.len()];
                    broker.read_exact(&mut forwarded).await.unwrap();
                    if !broker_auth.is_empty() {
                        broker.write_all(broker_auth).await.unwrap();
                        from_gateway.read_exact(&mut seen).await.unwrap();
                    }
                    to_gateway.write_all(after).await.unwrap();
                    to_gateway.shutdown().await.unwrap();
                    // The broker gets what the client sent, then its FIN.
                    let read = tokio::time::timeout(
                        Duration::from_secs(600),
                        broker.read_to_end(&mut forwarded),
                    );
                    read.await
                        .unwrap_or_else(|_| panic!("the broker never got the client's FIN: {what}"))
                        .unwrap();
                    assert_eq!(forwarded, [&CONNECT_AUTH[..], after].concat(), "{what}");
                    // It closes: the client gets nothing more, and the connection ends.
                    drop(broker);
                    let read = tokio::time::timeout(
                        Duration::from_secs(60),
                        from_gateway.read_to_end(&mut seen),
                    );
                    read.await.expect("no EOF").unwrap();
                    assert_eq!(seen, broker_auth, "{what}");
                    let done = tokio::time::timeout(Duration::from_secs(60), transfer).await;
                    done.expect("the transfer never ended").unwrap().unwrap();
                });
                assert_eq!(upstream_closed(&snap), 0, "{what}");
            }
        }
    }

    /// Under enhanced authentication the broker leads (§4.12): each of its AUTH packets
    /// lets one more of the client's through, besides one the client may send ahead of
    /// the broker's first; the others wait in its socket. A DISCONNECT is read when no
    /// held AUTH is in front of it; the client's EOF waits for the broker's CONNACK while
    /// a CONNACK timer runs, and is read at once without one.
    #[tokio::test(start_paused = true)]
    async fn a_client_gets_one_auth_through_per_auth_of_the_broker() {
        let (mut client, mut io) = authenticating().await;
        // Three AUTHs, then a DISCONNECT (normal disconnection).
        let auths: Vec<Vec<u8>> = (1..=3).map(|n| auth(n * 10)).collect();
        client.write_all(&auths.concat()).await.unwrap();
        client.write_all(&[0xE0, 0x00]).await.unwrap();
        // The one AUTH ahead of the broker; then the read is held.
        let first = read_once(&mut io, 8192).unwrap().unwrap();
        assert!(
            first == auths[0],
            "read {} bytes, not one AUTH",
            first.len()
        );
        assert!(read_once(&mut io, 8192).is_none(), "held");
        assert!(read_once(&mut io, 16).is_none(), "held");
        // The broker's challenge: the next AUTH goes, and no more.
        let challenge = auth(5);
        let mut cx = Context::from_waker(Waker::noop());
        let n = Pin::new(&mut io).poll_write(&mut cx, &challenge);
        assert!(
            matches!(n, Poll::Ready(Ok(k)) if k == challenge.len()),
            "{n:?}"
        );
        assert_eq!(read_once(&mut io, 8192).unwrap().unwrap(), auths[1]);
        assert!(read_once(&mut io, 8192).is_none(), "held");
        // Another one: the last AUTH, then the DISCONNECT behind it.
        let n = Pin::new(&mut io).poll_write(&mut cx, &challenge);
        assert!(
            matches!(n, Poll::Ready(Ok(k)) if k == challenge.len()),
            "{n:?}"
        );
        let mut rest = Vec::new();
        while let Some(read) = read_once(&mut io, 8192) {
            let read = read.unwrap();
            if read.is_empty() {
                break;
            }
            rest.extend_from_slice(&read);
        }
        assert_eq!(rest, [&auths[2][..], &[0xE0, 0x00]].concat());

        // With no AUTH held, a DISCONNECT is read at once, however far ahead the client is.
        // With a CONNACK timeout, its EOF waits for the broker's CONNACK, as a client's
        // packets do before it (a proxy that got it would read the client no more, nor
        // poll the CONNACK timer); without one, nothing would end that wait, and the EOF
        // follows at once.
        for timeout in [Some(Duration::from_secs(5)), None] {
            let opts = IoOptions {
                connack_timeout: timeout,
                ..IoOptions::default()
            };
            let (mut client, mut io) = connected_as(&CONNECT_AUTH, Config::new(), 64 * 1024, opts);
            let mut got = [0; CONNECT_AUTH.len()];
            io.read_exact(&mut got).await.unwrap();
            client
                .write_all(&[&auths[0][..], &[0xE0, 0x00]].concat())
                .await
                .unwrap();
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let mut eof = false;
            while let Some(read) = read_once(&mut io, 8192) {
                let read = read.unwrap();
                if read.is_empty() {
                    eof = true;
                    break;
                }
                rest.extend_from_slice(&read);
            }
            assert_eq!(rest, [&auths[0][..], &[0xE0, 0x00]].concat());
            assert_eq!(
                eof,
                timeout.is_none(),
                "EOF before the CONNACK, timeout {timeout:?}"
            );
            if !eof {
                broker_writes(&mut io, &[0x20, 0x03, 0x00, 0x00, 0x00]);
                assert_eq!(read_once(&mut io, 8192).unwrap().unwrap(), b"");
            }
        }
    }

    /// How many of the client's AUTH packets are read, under enhanced authentication,
    /// after the one it sent ahead of the broker and the broker's `writes` (three are
    /// sent; the others wait, held).
    async fn client_auths_read_after(writes: &[&[u8]]) -> usize {
        let (mut client, mut io) = authenticating().await;
        let ahead = auth(1);
        client.write_all(&ahead).await.unwrap();
        assert_eq!(read_once(&mut io, 8192).unwrap().unwrap(), ahead);
        for w in writes {
            broker_writes(&mut io, w);
        }
        let answers: Vec<Vec<u8>> = (2..=4).map(auth).collect();
        client.write_all(&answers.concat()).await.unwrap();
        let mut read = Vec::new();
        while let Some(r) = read_once(&mut io, 8192) {
            read.extend_from_slice(&r.unwrap());
        }
        (0..=answers.len())
            .find(|&n| read == answers[..n].concat())
            .unwrap_or_else(|| panic!("read {} bytes, not whole AUTHs", read.len()))
    }

    /// Each AUTH of the broker's lets one more of the client's through, however the
    /// broker's writes split or join them. Two AUTHs in one write let only one through:
    /// the allowance grew once per write that started an AUTH, not once per AUTH. One
    /// AUTH in two writes is still one.
    #[tokio::test(start_paused = true)]
    async fn each_auth_of_the_broker_lets_one_of_the_clients_through_however_written() {
        let challenge = auth(5);
        let two = [&challenge[..], &challenge[..]].concat();
        let len = challenge.len();
        for (what, writes) in [
            ("in two writes", vec![&challenge[..], &challenge[..]]),
            ("in one write", vec![&two[..]]),
            (
                "both started in the first write",
                vec![&two[..=len], &two[len + 1..]],
            ),
            (
                "the first ended in the second write",
                vec![&two[..len - 3], &two[len - 3..]],
            ),
        ] {
            assert_eq!(
                client_auths_read_after(&writes).await,
                2,
                "two AUTHs {what}"
            );
        }
        for cut in 1..len {
            let writes = [&challenge[..cut], &challenge[cut..]];
            assert_eq!(
                client_auths_read_after(&writes).await,
                1,
                "one AUTH cut after {cut} bytes"
            );
        }
    }

    /// Polls `f` once: `true` if it is pending.
    async fn futures_poll_once<F: Future>(f: F) -> bool {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_pending())).await
    }
}
