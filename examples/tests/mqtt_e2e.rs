//! End-to-end tests of `MqttLayer` over real loopback sockets: a real mosquitto behind
//! the gateway and a real client (rumqttc) or hand-built bytes in front of it, for MQTT
//! 3.1.1 and 5.0.
//!
//! The stack is `serve(listener, MqttLayer -> Proxy -> mosquitto)`. Every test starts
//! its own broker on a free loopback port (so the broker's log, which the tests read to
//! prove what reached the broker, holds only that test's clients) and its own gateway.
//! Needs `mosquitto` on the PATH or in /usr/sbin (`.ci/run` installs it).
//!
//! Every wait is bounded; the tests assert events (packets, EOF, broker log lines), and
//! durations only where the duration is the point (the keep-alive cut).

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use aegis_core::{proxy::Proxy, serve};
use aegis_mqtt::Config;
use aegis_mqtt::layer::policy::Quota;
use aegis_mqtt::layer::{MqttLayer, Policy};
use common::{Mosquitto, packet, string};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tower::ServiceBuilder;

/// The bound on every single wait for an event.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------
// The broker and the gateway
// ---------------------------------------------------------------------------------

/// The gateway under test on a free loopback port: strict validation with keep-alive
/// enforcement, in front of the broker.
async fn gateway(broker: SocketAddr) -> SocketAddr {
    let svc = ServiceBuilder::new()
        .layer(MqttLayer::new(Config::new()).enforce_keep_alive())
        .service(Proxy::new(broker));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, svc).into_future());
    addr
}

/// A broker of this test's own that logs everything, and the gateway in front of it.
async fn broker_and_gateway() -> (Mosquitto, SocketAddr) {
    let broker = Mosquitto::start_logging_everything().await;
    let gw = gateway(broker.addr()).await;
    (broker, gw)
}

/// For each `body => v311_test, v5_test;`, the two tests `body(V::V311)` and
/// `body(V::V5)`.
macro_rules! both_versions {
    ($($body:ident => $v311:ident, $v5:ident;)+) => {$(
        #[tokio::test]
        async fn $v311() {
            $body(V::V311).await;
        }

        #[tokio::test]
        async fn $v5() {
            $body(V::V5).await;
        }
    )+};
}

// ---------------------------------------------------------------------------------
// A real client: rumqttc, both APIs behind one small interface
// ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum V {
    V311,
    V5,
}

impl V {
    /// The protocol level byte of its CONNECT.
    fn level(self) -> u8 {
        match self {
            V::V311 => 4,
            V::V5 => 5,
        }
    }
}

/// A received PUBLISH.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Msg {
    topic: Vec<u8>,
    qos: u8,
    payload: Vec<u8>,
}

/// What a rumqttc event loop reported, the same for both protocol versions.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Ev {
    ConnAck(String),
    SubAck(Vec<String>),
    Publish(Msg),
    /// An outgoing PUBLISH left with this packet id (0 for `QoS` 0).
    Sent(u16),
    PubAck(u16),
    PubRec(u16),
    PubComp(u16),
    PingResp,
    Disconnect(String),
    /// The event loop failed (connection closed or refused); it is not polled again.
    Closed(String),
}

enum Handle {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
}

#[derive(Default)]
struct Opts {
    keep_alive: Option<u64>,
    will: Option<(&'static str, Vec<u8>)>,
}

/// A rumqttc client connected through the gateway, its event loop driven by a task that
/// forwards every event. Dropping it aborts the task, which drops the socket.
struct Client {
    handle: Handle,
    events: mpsc::UnboundedReceiver<Ev>,
    task: JoinHandle<()>,
    /// Events received but not yet picked by [`Client::expect`].
    backlog: VecDeque<Ev>,
    name: String,
}

const MAX_PACKET: usize = 256 * 1024;

/// Drives a rumqttc event loop `el` (of either API: the two share no trait) on a task
/// that sends each event `to_ev` maps to `tx`, then the error that ends the loop.
macro_rules! forward_events {
    ($el:expr, $tx:expr, $to_ev:path) => {{
        let (mut el, tx) = ($el, $tx);
        tokio::spawn(async move {
            loop {
                match el.poll().await {
                    Ok(e) => {
                        if let Some(e) = $to_ev(e) {
                            if tx.send(e).is_err() {
                                break;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Ev::Closed(e.to_string()));
                        break;
                    }
                }
            }
        })
    }};
}

fn v4_event(e: rumqttc::Event) -> Option<Ev> {
    use rumqttc::{Event, Outgoing, Packet};
    Some(match e {
        Event::Incoming(Packet::ConnAck(c)) => Ev::ConnAck(format!("{:?}", c.code)),
        Event::Incoming(Packet::SubAck(s)) => {
            Ev::SubAck(s.return_codes.iter().map(|c| format!("{c:?}")).collect())
        }
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Msg {
            topic: p.topic.into_bytes(),
            qos: p.qos as u8,
            payload: p.payload.to_vec(),
        }),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
        Event::Incoming(Packet::PubRec(a)) => Ev::PubRec(a.pkid),
        Event::Incoming(Packet::PubComp(a)) => Ev::PubComp(a.pkid),
        Event::Incoming(Packet::PingResp) => Ev::PingResp,
        Event::Incoming(Packet::Disconnect) => Ev::Disconnect(String::new()),
        Event::Outgoing(Outgoing::Publish(id)) => Ev::Sent(id),
        _ => return None,
    })
}

fn v5_event(e: rumqttc::v5::Event) -> Option<Ev> {
    use rumqttc::Outgoing;
    use rumqttc::v5::Event;
    use rumqttc::v5::mqttbytes::v5::Packet;
    Some(match e {
        Event::Incoming(Packet::ConnAck(c)) => Ev::ConnAck(format!("{:?}", c.code)),
        Event::Incoming(Packet::SubAck(s)) => {
            Ev::SubAck(s.return_codes.iter().map(|c| format!("{c:?}")).collect())
        }
        Event::Incoming(Packet::Publish(p)) => Ev::Publish(Msg {
            topic: p.topic.to_vec(),
            qos: p.qos as u8,
            payload: p.payload.to_vec(),
        }),
        Event::Incoming(Packet::PubAck(a)) => Ev::PubAck(a.pkid),
        Event::Incoming(Packet::PubRec(a)) => Ev::PubRec(a.pkid),
        Event::Incoming(Packet::PubComp(a)) => Ev::PubComp(a.pkid),
        Event::Incoming(Packet::PingResp(_)) => Ev::PingResp,
        Event::Incoming(Packet::Disconnect(d)) => Ev::Disconnect(format!("{:?}", d.reason_code)),
        Event::Outgoing(Outgoing::Publish(id)) => Ev::Sent(id),
        _ => return None,
    })
}

fn qos4(qos: u8) -> rumqttc::QoS {
    rumqttc::qos(qos).unwrap()
}

fn qos5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    rumqttc::v5::mqttbytes::qos(qos).unwrap()
}

impl Client {
    /// Connects through the gateway and waits for a successful CONNACK.
    async fn connect(v: V, gw: SocketAddr, id: &str, opts: Opts) -> Self {
        let (tx, events) = mpsc::unbounded_channel();
        let keep_alive = Duration::from_secs(opts.keep_alive.unwrap_or(60));
        let (handle, task) = match v {
            V::V311 => {
                let mut o = rumqttc::MqttOptions::new(id, gw.ip().to_string(), gw.port());
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(MAX_PACKET, MAX_PACKET);
                if let Some((topic, payload)) = opts.will {
                    o.set_last_will(rumqttc::LastWill::new(topic, payload, qos4(1), false));
                }
                let (client, el) = rumqttc::AsyncClient::new(o, 16);
                let task = forward_events!(el, tx, v4_event);
                (Handle::V4(client), task)
            }
            V::V5 => {
                let mut o = rumqttc::v5::MqttOptions::new(id, gw.ip().to_string(), gw.port());
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(Some(u32::try_from(MAX_PACKET).unwrap()));
                if let Some((topic, payload)) = opts.will {
                    o.set_last_will(rumqttc::v5::mqttbytes::v5::LastWill::new(
                        topic,
                        payload,
                        qos5(1),
                        false,
                        None,
                    ));
                }
                let (client, el) = rumqttc::v5::AsyncClient::new(o, 16);
                let task = forward_events!(el, tx, v5_event);
                (Handle::V5(client), task)
            }
        };
        let mut c = Self {
            handle,
            events,
            task,
            backlog: VecDeque::new(),
            name: id.to_owned(),
        };
        let code = c
            .expect("CONNACK", |e| match e {
                Ev::ConnAck(code) => Some(code.clone()),
                _ => None,
            })
            .await;
        assert_eq!(code, "Success", "{id}: CONNACK");
        c
    }

    /// The first event, in arrival order, that `f` picks, within [`WAIT`]. Events it
    /// does not pick stay queued for later calls; a closed connection fails the wait.
    async fn expect<T>(&mut self, what: &str, mut f: impl FnMut(&Ev) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        let mut seen = 0;
        loop {
            if let Some(i) = self.backlog.iter().skip(seen).position(|e| f(e).is_some()) {
                let e = self.backlog.remove(seen + i).unwrap();
                return f(&e).unwrap();
            }
            seen = self.backlog.len();
            if let Some(Ev::Closed(why)) = self.backlog.back() {
                panic!("{}: closed ({why}) while waiting for {what}", self.name);
            }
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(e)) => self.backlog.push_back(e),
                Ok(None) => panic!("{}: event loop gone while waiting for {what}", self.name),
                Err(_) => panic!(
                    "{}: no {what} within {WAIT:?}; other events: {:?}",
                    self.name, self.backlog
                ),
            }
        }
    }

    /// The next PUBLISH this client receives.
    async fn expect_publish(&mut self) -> Msg {
        self.expect("PUBLISH", |e| match e {
            Ev::Publish(m) => Some(m.clone()),
            _ => None,
        })
        .await
    }

    /// Subscribes and returns the SUBACK's return codes.
    async fn subscribe(&mut self, filter: &str, qos: u8) -> Vec<String> {
        match &self.handle {
            Handle::V4(c) => c.subscribe(filter, qos4(qos)).await.unwrap(),
            Handle::V5(c) => c.subscribe(filter, qos5(qos)).await.unwrap(),
        }
        self.expect("SUBACK", |e| match e {
            Ev::SubAck(codes) => Some(codes.clone()),
            _ => None,
        })
        .await
    }

    /// Publishes and waits until it has gone out and is acknowledged as its `QoS` asks
    /// (nothing for 0, PUBACK for 1, PUBREC then PUBCOMP for 2); returns the packet id.
    async fn publish(&mut self, topic: &str, qos: u8, payload: Vec<u8>) -> u16 {
        match &self.handle {
            Handle::V4(c) => c.publish(topic, qos4(qos), false, payload).await.unwrap(),
            Handle::V5(c) => c.publish(topic, qos5(qos), false, payload).await.unwrap(),
        }
        let id = self
            .expect("the outgoing PUBLISH", |e| match e {
                Ev::Sent(id) => Some(*id),
                _ => None,
            })
            .await;
        match qos {
            0 => assert_eq!(id, 0, "a QoS 0 PUBLISH has no packet id"),
            1 => {
                self.expect("PUBACK", |e| (*e == Ev::PubAck(id)).then_some(()))
                    .await;
            }
            _ => {
                self.expect("PUBREC", |e| (*e == Ev::PubRec(id)).then_some(()))
                    .await;
                self.expect("PUBCOMP", |e| (*e == Ev::PubComp(id)).then_some(()))
                    .await;
            }
        }
        id
    }

    /// Sends DISCONNECT and waits until the event loop reports the connection over.
    async fn disconnect(&mut self) {
        match &self.handle {
            Handle::V4(c) => c.disconnect().await.unwrap(),
            Handle::V5(c) => c.disconnect().await.unwrap(),
        }
        self.expect("the end of the connection", |e| {
            matches!(e, Ev::Closed(_)).then_some(())
        })
        .await;
    }

    /// Drops the connection without a DISCONNECT: the event loop (and with it the
    /// socket) is dropped mid-session, as when a device loses power.
    async fn vanish(&mut self) {
        self.task.abort();
        let ended = timeout(WAIT, &mut self.task).await.expect("the task ends");
        assert!(ended.unwrap_err().is_cancelled());
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A real client `id` subscribed to `filter` at `QoS` 1, which the broker granted.
async fn watcher(v: V, gw: SocketAddr, id: &str, filter: &str) -> Client {
    let mut c = Client::connect(v, gw, id, Opts::default()).await;
    assert_eq!(c.subscribe(filter, 1).await, ["Success(AtLeastOnce)"]);
    c
}

// ---------------------------------------------------------------------------------
// Hand-built packets for the raw-socket clients
// ---------------------------------------------------------------------------------

/// A clean-session CONNECT with this client id and keep-alive.
fn connect(v: V, id: &str, keep_alive: u16) -> Vec<u8> {
    common::connect(v.level(), id, keep_alive)
}

/// A SUBSCRIBE of one filter.
fn subscribe(v: V, packet_id: u16, filter: &str, qos: u8) -> Vec<u8> {
    let mut body = packet_id.to_be_bytes().to_vec();
    if v == V::V5 {
        body.push(0x00);
    }
    body.extend_from_slice(&string(filter));
    body.push(qos);
    packet(0x82, &body)
}

/// A `QoS` 0 PUBLISH.
fn publish0(v: V, topic: &str, payload: &[u8]) -> Vec<u8> {
    let mut body = string(topic);
    if v == V::V5 {
        body.push(0x00);
    }
    body.extend_from_slice(payload);
    packet(0x30, &body)
}

/// Reads one MQTT packet, within [`WAIT`]: (first byte, body).
async fn read_packet(s: &mut TcpStream) -> (u8, Vec<u8>) {
    match timeout(WAIT, common::read_packet(s)).await {
        Ok(Ok(p)) => p,
        Ok(Err(e)) => panic!("connection ended while a packet was expected: {e}"),
        Err(_) => panic!("no packet within {WAIT:?}"),
    }
}

/// Asserts that the peer closes the connection (EOF or reset) without sending anything
/// more, within [`WAIT`].
async fn expect_closed(s: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    match timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(0) | Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: expected the close, got {:02x?}", &buf[..n]),
        Err(_) => panic!("{what}: still open after {WAIT:?}"),
    }
}

/// The end of a session the gateway refused: in 5.0 a server DISCONNECT with `reason`
/// first, then (both versions) the close, within [`WAIT`].
async fn expect_refused(v: V, s: &mut TcpStream, reason: u8, what: &str) {
    if v == V::V5 {
        assert_eq!(
            read_packet(s).await,
            (0xE0, vec![reason, 0x00]),
            "{what}: server DISCONNECT"
        );
    }
    expect_closed(s, what).await;
}

/// Opens a raw connection through the gateway and completes the CONNECT / CONNACK.
async fn raw_session(v: V, gw: SocketAddr, id: &str, keep_alive: u16) -> TcpStream {
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&connect(v, id, keep_alive)).await.unwrap();
    let (first, body) = read_packet(&mut s).await;
    assert_eq!(first, 0x20, "{id}: a CONNACK");
    assert_eq!(body[1], 0x00, "{id}: CONNACK success");
    s
}

/// Payload bytes no text encoding would preserve: every byte value, NUL and invalid
/// UTF-8 included, then `tag`.
fn binary_payload(tag: &str, len: usize) -> Vec<u8> {
    let mut p: Vec<u8> = (0..=255u8).cycle().take(len).collect();
    p.extend_from_slice(tag.as_bytes());
    p
}

// ---------------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------------

/// Connect, subscribe, and publish at `QoS` 0, 1 and 2 through the gateway, both clients
/// real: the subscriber gets each payload byte-exact at the `QoS` asked for, and the
/// publisher gets PUBACK (`QoS` 1) and PUBREC / PUBCOMP (`QoS` 2). One message is
/// 100 KB, so it crosses the gateway in many reads; the last one is empty.
async fn publish_at_each_qos(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let mut sub = Client::connect(v, gw, "qossub", Opts::default()).await;
    assert_eq!(
        sub.subscribe("e2e/qos/#", 2).await,
        ["Success(ExactlyOnce)"]
    );
    let mut publ = Client::connect(v, gw, "qospub", Opts::default()).await;

    let messages = [
        (0, binary_payload("qos0", 256)),
        (1, binary_payload("qos1", 300)),
        (2, binary_payload("qos2", 1000)),
        (1, binary_payload("large", 100_000)),
        (0, Vec::new()),
    ];
    for (i, (qos, payload)) in messages.into_iter().enumerate() {
        let topic = format!("e2e/qos/{i}");
        let id = publ.publish(&topic, qos, payload.clone()).await;
        assert_eq!(id == 0, qos == 0, "packet id {id} for QoS {qos}");
        let got = sub.expect_publish().await;
        assert_eq!(got.topic, topic.as_bytes(), "message {i}");
        assert_eq!(
            got.qos, qos,
            "message {i}: delivered at the QoS it was sent with"
        );
        assert!(
            got.payload == payload,
            "message {i}: payload of {} bytes differs from the {} sent",
            got.payload.len(),
            payload.len()
        );
    }
    // Both sessions went through intact; the broker saw one connection from each.
    assert_eq!(broker.count("New client connected from"), 2);
}

/// Will messages: a client that vanishes (TCP dropped, no DISCONNECT) has its will
/// published to a subscriber through the gateway; one that sends DISCONNECT does not.
async fn will_message(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let mut watcher = watcher(v, gw, "willwatcher", "e2e/will/#").await;

    // A clean DISCONNECT discards the will ([MQTT-3.1.2-10], v5 [MQTT-3.1.2-10]).
    let will = |tag: &str| binary_payload(tag, 64);
    let mut polite = Client::connect(
        v,
        gw,
        "willpolite",
        Opts {
            will: Some(("e2e/will/polite", will("polite"))),
            ..Opts::default()
        },
    )
    .await;
    polite.disconnect().await;
    broker.wait_for_log("Client willpolite disconnected").await;

    // An abrupt drop publishes it.
    let mut gone = Client::connect(
        v,
        gw,
        "willgone",
        Opts {
            will: Some(("e2e/will/gone", will("gone"))),
            ..Opts::default()
        },
    )
    .await;
    gone.vanish().await;

    let got = watcher.expect_publish().await;
    assert_eq!(
        (got.topic.as_slice(), got.qos),
        (&b"e2e/will/gone"[..], 1),
        "the first will is the vanished client's: the polite one's was discarded"
    );
    assert!(got.payload == will("gone"), "the will payload, byte-exact");
    // The broker saw the TCP close, not a DISCONNECT.
    broker
        .wait_for_log("Client willgone closed its connection")
        .await;
    assert_eq!(broker.count("Received DISCONNECT from willgone"), 0);
}

/// With `enforce_keep_alive` on, a real client with a 5 s keep-alive stays connected
/// well past 1.5 x its keep-alive: its PINGREQs pass the gateway and PINGRESPs come
/// back, and the session still works afterwards.
async fn pings_keep_a_session_alive(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let mut c = Client::connect(
        v,
        gw,
        "pinger",
        Opts {
            keep_alive: Some(5),
            ..Opts::default()
        },
    )
    .await;
    let start = Instant::now();
    let mut pongs = 0;
    while Instant::now().saturating_duration_since(start) < Duration::from_secs(8) {
        c.expect("PINGRESP", |e| (*e == Ev::PingResp).then_some(()))
            .await;
        pongs += 1;
    }
    assert!(pongs >= 1);
    assert_eq!(c.subscribe("e2e/ka", 1).await, ["Success(AtLeastOnce)"]);
    c.publish("e2e/ka", 1, b"still here".to_vec()).await;
    assert_eq!(c.expect_publish().await.payload, b"still here");
    assert_eq!(broker.count("has exceeded timeout"), 0);
}

/// A client that sends a valid CONNECT with a keep-alive of 1 s and then stays silent is
/// cut by the gateway after 1.5 s (5.0: DISCONNECT 0x8D first). The broker's log shows
/// the gateway closed it, not mosquitto's own keep-alive check (which, in mosquitto 2.0,
/// fires seconds later).
async fn silent_client_is_cut(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let start = Instant::now();
    let mut s = raw_session(v, gw, "silent", 1).await;
    expect_refused(v, &mut s, 0x8D, "silent client (Keep Alive timeout)").await;
    // The gateway's clock starts when it reads the CONNECT, after `start`, and a timer
    // never fires early: a cut at one keep-alive (1 s) fails here.
    let after = Instant::now().saturating_duration_since(start);
    assert!(
        after >= Duration::from_millis(1500) && after <= Duration::from_secs(5),
        "cut after {after:?}, expected about 1.5 s"
    );
    broker
        .wait_for_log("Client silent closed its connection")
        .await;
    assert_eq!(broker.count("has exceeded timeout"), 0);
}

/// A raw client connects, subscribes and publishes a valid message that a real
/// subscriber receives; then it sends an invalid packet followed by a valid PUBLISH in
/// the same write. The gateway forwards neither: 3.1.1 closes, 5.0 sends DISCONNECT with
/// the reason the layer documents for the violation, then closes. The broker's log
/// shows one SUBSCRIBE and one PUBLISH from the client and a plain close (mosquitto
/// would have logged a protocol error had it seen the packet). A real session on
/// another connection is unaffected throughout.
async fn rejected_packet_mid_session(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let mut watcher = watcher(v, gw, "watcher", "e2e/#").await;

    let qos3 = {
        let mut body = string("e2e/raw/qos3");
        body.extend_from_slice(&[0x00, 0x09]);
        if v == V::V5 {
            body.push(0x00);
        }
        body.extend_from_slice(b"never");
        packet(0x36, &body)
    };
    // (client id, the invalid packet, the MQTT 5 DISCONNECT reason the layer documents)
    let cases = [
        // [MQTT-3.3.2-2]: no wildcard in a Topic Name; TopicName -> 0x90.
        ("rawwildcard", publish0(v, "e2e/+/never", b"never"), 0x90),
        // [MQTT-2.3.1-1] / [MQTT-2.2.1-3]: SUBSCRIBE needs a packet id; -> 0x82.
        ("rawsubid0", subscribe(v, 0, "e2e/never", 0), 0x82),
        // [MQTT-3.3.1-4]: PUBLISH QoS 3 is malformed; -> 0x81.
        ("rawqos3", qos3, 0x81),
    ];
    for (id, invalid, reason) in cases {
        let topic = format!("e2e/raw/{id}");
        let mut s = raw_session(v, gw, id, 60).await;
        s.write_all(&subscribe(v, 1, &topic, 0)).await.unwrap();
        let (first, body) = read_packet(&mut s).await;
        assert_eq!((first, body.last()), (0x90, Some(&0x00)), "{id}: SUBACK");

        s.write_all(&publish0(v, &topic, b"valid")).await.unwrap();
        let (first, _) = read_packet(&mut s).await;
        assert_eq!(first, 0x30, "{id}: its own message comes back");
        let got = watcher.expect_publish().await;
        assert_eq!(
            (got.topic, got.payload),
            (topic.clone().into_bytes(), b"valid".to_vec())
        );

        let trailing = publish0(v, &topic, b"after");
        s.write_all(&[invalid, trailing].concat()).await.unwrap();
        expect_refused(v, &mut s, reason, id).await;

        broker
            .wait_for_log(&format!("Client {id} closed its connection"))
            .await;
        assert_eq!(broker.count(&format!("Received SUBSCRIBE from {id}\n")), 1);
        assert_eq!(broker.count(&format!("Received PUBLISH from {id} ")), 1);
    }

    // The watcher's session went on: the next message it gets is its own, sent now,
    // after every raw client is gone; nothing rejected or after it arrived in between.
    watcher
        .publish("e2e/sentinel", 1, b"sentinel".to_vec())
        .await;
    let got = watcher.expect_publish().await;
    assert_eq!(
        (got.topic, got.payload),
        (b"e2e/sentinel".to_vec(), b"sentinel".to_vec())
    );
    assert_eq!(broker.count("Received PUBLISH from watcher "), 1);
}

/// Refused CONNECTs get the spec's answer from the gateway and never reach the broker:
/// a malformed one (reserved flag set) closes without CONNACK in 3.1.1 and gets CONNACK
/// 0x81 in 5.0; an unsupported protocol level gets CONNACK `20 02 00 01` ([MQTT-3.1.2-2]:
/// 0x01 "unacceptable protocol level", in the 3.1.1 format, since a client of an unknown
/// version cannot be assumed to read a 5.0 CONNACK). Then a real client connects, and it
/// is the only connection the broker ever saw.
async fn connect_refusals(v: V) {
    let (broker, gw) = broker_and_gateway().await;

    let mut malformed = connect(v, "badflags", 60);
    malformed[9] |= 0x01; // the reserved connect flag ([MQTT-3.1.2-3])
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&malformed).await.unwrap();
    if v == V::V5 {
        assert_eq!(
            read_packet(&mut s).await,
            (0x20, vec![0x00, 0x81, 0x00]),
            "CONNACK Malformed Packet"
        );
    }
    expect_closed(&mut s, "malformed CONNECT").await;

    // "MQTT" with level 3 (3.1's level under 3.1.1's name) or 6 (no such version yet).
    let mut unsupported = connect(v, "badlevel", 60);
    unsupported[8] = if v == V::V5 { 6 } else { 3 };
    let mut s = TcpStream::connect(gw).await.unwrap();
    s.write_all(&unsupported).await.unwrap();
    assert_eq!(
        read_packet(&mut s).await,
        (0x20, vec![0x00, 0x01]),
        "CONNACK unacceptable protocol version"
    );
    expect_closed(&mut s, "unsupported version").await;

    let _ok = Client::connect(v, gw, "afterwards", Opts::default()).await;
    assert_eq!(
        broker.count("New connection from"),
        1,
        "only the real client"
    );
    assert_eq!(broker.count("New client connected from"), 1);
    assert!(broker.log().contains(" as afterwards "));
}

/// What a raw client that stopped reading got from the gateway after a refusal.
struct Flooded {
    /// Whole PUBLISH packets of the flood, each checked intact.
    delivered: usize,
    /// The bytes after them, up to the close.
    rest: Vec<u8>,
    /// The bytes of one PUBLISH of the flood.
    publish: Vec<u8>,
}

/// A raw client subscribes and stops reading while a real publisher floods its topic
/// with far more than the loopback socket buffers hold (2000 x 10 KB), so that the
/// gateway's broker-to-client direction is stuck inside a packet; then the client sends
/// an invalid SUBSCRIBE (packet id 0) and reads everything until the gateway closes.
async fn flood_then_refuse(v: V) -> Flooded {
    const MESSAGES: usize = 2000;
    let (broker, gw) = broker_and_gateway().await;
    let mut s = raw_session(v, gw, "flooded", 60).await;
    s.write_all(&subscribe(v, 1, "e2e/flood", 0)).await.unwrap();
    let (first, body) = read_packet(&mut s).await;
    assert_eq!((first, body.last()), (0x90, Some(&0x00)), "SUBACK");

    let payload = binary_payload("flood", 10_000);
    let mut publ = Client::connect(v, gw, "flooder", Opts::default()).await;
    for _ in 0..MESSAGES {
        publ.publish("e2e/flood", 0, payload.clone()).await;
    }
    // In order on one connection: once this is acknowledged, the broker has taken
    // the whole flood (and queued for the client what its limits let it queue).
    publ.publish("e2e/flood-done", 1, Vec::new()).await;

    s.write_all(&subscribe(v, 0, "e2e/never", 0)).await.unwrap();
    let mut stream = Vec::new();
    let read = timeout(WAIT, s.read_to_end(&mut stream)).await;
    assert!(read.is_ok(), "the gateway did not close within {WAIT:?}");
    let publish = publish0(v, "e2e/flood", &payload);
    let mut rest = stream.as_slice();
    let mut delivered = 0;
    while rest.len() >= publish.len() && rest[0] == 0x30 {
        assert!(
            rest[..publish.len()] == publish[..],
            "message {delivered} arrived damaged"
        );
        rest = &rest[publish.len()..];
        delivered += 1;
    }
    broker
        .wait_for_log("Client flooded closed its connection")
        .await;
    assert_eq!(broker.count("Received SUBSCRIBE from flooded\n"), 1);
    // The flooder is unaffected.
    publ.publish("e2e/flood-done", 1, Vec::new()).await;
    Flooded {
        delivered,
        rest: rest.to_vec(),
        publish,
    }
}

/// A refusal while the broker's stream to the client is backed up never corrupts that
/// stream: the client gets whole, intact PUBLISH packets, then either (5.0 only) the
/// DISCONNECT `E0 02 82 00`, or, when the broker was inside a packet, the start of that
/// packet; then EOF. Never a DISCONNECT spliced into a packet, never bytes after it.
async fn refusal_under_backpressure(v: V) {
    let Flooded {
        delivered,
        rest,
        publish,
    } = flood_then_refuse(v).await;
    assert!(delivered > 0, "the client got part of the flood");
    let disconnect = [0xE0, 0x02, 0x82, 0x00];
    let ok = (v == V::V5 && rest == disconnect)
        || (rest.len() < publish.len() && publish.starts_with(&rest))
            && !(v == V::V5 && rest.is_empty());
    assert!(
        ok,
        "after {delivered} whole messages, {} bytes that are neither a DISCONNECT nor \
         the start of the next message: {:02x?}...",
        rest.len(),
        &rest[..rest.len().min(16)]
    );
}

/// What the layer's docs promise an MQTT 5 client ("first gets a server DISCONNECT with
/// the reason code, written between two of the broker's packets"), under backpressure:
/// the gateway finishes the broker's packet in flight (the client reads it), then sends
/// the DISCONNECT ([MQTT-4.13.1-1] says SHOULD).
#[tokio::test]
async fn v5_refusal_under_backpressure_still_sends_the_disconnect() {
    let Flooded {
        delivered, rest, ..
    } = flood_then_refuse(V::V5).await;
    assert!(
        rest == [0xE0, 0x02, 0x82, 0x00],
        "after {delivered} whole messages, {} bytes instead of the DISCONNECT: {:02x?}...",
        rest.len(),
        &rest[..rest.len().min(16)]
    );
}

/// Writes `bytes` one at a time, each in its own TCP segment (`TCP_NODELAY`, a pause
/// between), so the gateway sees every split point of every packet.
async fn write_byte_by_byte(s: &mut TcpStream, bytes: &[u8]) {
    for b in bytes {
        s.write_all(&[*b]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Every packet sent one byte per TCP segment: the CONNECT, a SUBSCRIBE and a PUBLISH
/// reach the broker whole (its answers and the real subscriber's copy come back), and a
/// refused packet sent the same way is still refused as the spec says (3.1.1: closed;
/// 5.0: DISCONNECT 0x90, then EOF) without reaching the broker.
async fn packets_split_byte_by_byte(v: V) {
    let (broker, gw) = broker_and_gateway().await;
    let mut watcher = watcher(v, gw, "watcher", "e2e/#").await;

    let mut s = TcpStream::connect(gw).await.unwrap();
    s.set_nodelay(true).unwrap();
    write_byte_by_byte(&mut s, &connect(v, "trickle", 60)).await;
    let (first, body) = read_packet(&mut s).await;
    assert_eq!((first, body[1]), (0x20, 0x00), "CONNACK success");
    write_byte_by_byte(&mut s, &subscribe(v, 7, "e2e/trickle", 0)).await;
    let (first, body) = read_packet(&mut s).await;
    assert_eq!(
        (first, &body[..2], body.last()),
        (0x90, &[0, 7][..], Some(&0))
    );
    let payload = binary_payload("trickle", 40);
    write_byte_by_byte(&mut s, &publish0(v, "e2e/trickle", &payload)).await;
    assert_eq!(
        read_packet(&mut s).await,
        (0x30, publish0(v, "e2e/trickle", &payload)[2..].to_vec()),
        "its own message, whole"
    );
    let got = watcher.expect_publish().await;
    assert_eq!((got.topic, got.payload), (b"e2e/trickle".to_vec(), payload));

    write_byte_by_byte(&mut s, &publish0(v, "e2e/+/never", b"never")).await;
    expect_refused(v, &mut s, 0x90, "the refused PUBLISH (Topic Name invalid)").await;
    broker
        .wait_for_log("Client trickle closed its connection")
        .await;
    assert_eq!(broker.count("Received PUBLISH from trickle "), 1);
}

/// The gateway with a per-packet policy: `packets_per_client` with a burst of `burst`
/// (refilled at one an hour: never within a test).
async fn policy_gateway(broker: SocketAddr, burst: u32) -> SocketAddr {
    let nz = |n| std::num::NonZeroU32::new(n).unwrap();
    let policy = Policy::builder()
        .packets_per_client(Quota::per_hour(nz(1)).allow_burst(nz(burst)))
        .build();
    let svc = ServiceBuilder::new()
        .layer(MqttLayer::new(Config::new()).policy(policy))
        .service(Proxy::new(broker));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, svc).into_future());
    addr
}

/// Waits (bounded) until the broker has logged `needle` `n` times.
async fn wait_for_count(broker: &Mosquitto, needle: &str, n: usize) {
    let deadline = Instant::now() + WAIT;
    while broker.count(needle) < n {
        assert!(
            Instant::now() < deadline,
            "the broker logged {needle:?} {} times, not {n}, within {WAIT:?}",
            broker.count(needle)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client that sends acknowledgements the broker never asked for (10,000 PUBRECs for
/// identifiers it never used, in one write) is charged for them as for any packet:
/// past its `packets` burst of 5 it is refused as a PINGREQ would be (3.1.1: closed;
/// 5.0: DISCONNECT 0x96 first), and the broker gets the first 5 at most. Before, each
/// cost the broker a lookup, a PUBREL and a warning line, without limit.
async fn unsolicited_acks_are_charged(v: V) {
    const BURST: usize = 5;
    let broker = Mosquitto::start_logging_everything().await;
    let gw = policy_gateway(broker.addr(), 5).await;
    let mut s = raw_session(v, gw, "ackflood", 60).await;
    let mut flood = Vec::new();
    for id in 1..=10_000u16 {
        flood.extend_from_slice(&packet(0x50, &id.to_be_bytes()));
    }
    s.write_all(&flood).await.unwrap();
    // The broker answers the PUBRECs it gets with PUBRELs: at most the burst's.
    let mut pubrels = 0;
    let ended = loop {
        match timeout(WAIT, common::read_packet(&mut s)).await {
            Ok(Ok((0x62, _))) => {
                pubrels += 1;
                assert!(
                    pubrels <= BURST,
                    "more than {BURST} PUBRECs reached the broker: it answered {pubrels}"
                );
            }
            Ok(Ok(p)) => break Some(p),
            Ok(Err(_)) => break None,
            Err(_) => panic!("still open after {WAIT:?}, {pubrels} PUBRELs read"),
        }
    };
    match v {
        V::V5 => {
            assert_eq!(ended, Some((0xE0, vec![0x96, 0x00])), "DISCONNECT 0x96");
            expect_closed(&mut s, "after the DISCONNECT").await;
        }
        V::V311 => assert_eq!(ended, None, "closed without a packet"),
    }
    // "closed its connection", or "disconnected: Broken pipe" if a PUBREL was on its way.
    broker.wait_for_log("Client ackflood ").await;
    // The gateway forwarded the first 5; the broker may not have read them all before
    // the close (its PUBREL to a closed socket ends its session first).
    let received = broker.count("Received PUBREC from ackflood (Mid");
    assert!(received <= BURST, "{received} PUBRECs reached the broker");
}

/// A real subscriber at `QoS` 1 and 2 that gets far more messages than its `packets`
/// burst (3, all taken by its two SUBSCRIBEs and one `QoS` 2 PUBLISH of its own) answers
/// every one (PUBACK; PUBREC, then PUBCOMP for the broker's PUBREL), and its PUBREL for
/// its own PUBLISH's PUBREC, all free: none is refused, and all reach the broker.
async fn acks_the_broker_asked_for_are_free(v: V) {
    const N: usize = 40;
    let broker = Mosquitto::start_logging_everything().await;
    let gw = policy_gateway(broker.addr(), 3).await;
    let mut sub = Client::connect(v, gw, "acker", Opts::default()).await;
    assert_eq!(
        sub.subscribe("e2e/acks/1", 1).await,
        ["Success(AtLeastOnce)"]
    );
    assert_eq!(
        sub.subscribe("e2e/acks/2", 2).await,
        ["Success(ExactlyOnce)"]
    );
    sub.publish("e2e/elsewhere", 2, b"own".to_vec()).await;
    for qos in [1u8, 2] {
        let status = tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.addr().port().to_string()])
            .args(["-i", "ackpub", "-t", &format!("e2e/acks/{qos}")])
            .args(["-q", &qos.to_string(), "-m", "payload", "--repeat"])
            .arg(N.to_string())
            .stdin(std::process::Stdio::null())
            .status()
            .await
            .expect("mosquitto_pub runs");
        assert!(status.success(), "mosquitto_pub: {status}");
    }
    for i in 0..2 * N {
        let m = sub.expect_publish().await;
        assert_eq!(m.payload, b"payload", "message {i}");
    }
    // In order on one connection: a refused acknowledgement would have kept the later
    // ones from the broker.
    wait_for_count(&broker, "Received PUBCOMP from acker (Mid", N).await;
    assert_eq!(broker.count("Received PUBACK from acker (Mid"), N);
    assert_eq!(broker.count("Received PUBREC from acker (Mid"), N);
    assert_eq!(broker.count("Received PUBREL from acker (Mid"), 1);
    assert_eq!(
        broker.count("Client acker "),
        0,
        "the subscriber is still connected"
    );
}

// Each test body above, once per protocol version.
both_versions! {
    unsolicited_acks_are_charged =>
        v311_unsolicited_acks_are_charged_to_the_packets_tier,
        v5_unsolicited_acks_are_charged_to_the_packets_tier;
    acks_the_broker_asked_for_are_free =>
        v311_acks_the_broker_asked_for_are_free,
        v5_acks_the_broker_asked_for_are_free;
    publish_at_each_qos => v311_publish_at_each_qos, v5_publish_at_each_qos;
    will_message => v311_will_message, v5_will_message;
    pings_keep_a_session_alive => v311_pings_keep_a_session_alive, v5_pings_keep_a_session_alive;
    silent_client_is_cut =>
        v311_silent_client_is_cut_after_one_and_a_half_keep_alives,
        v5_silent_client_is_cut_after_one_and_a_half_keep_alives;
    rejected_packet_mid_session => v311_rejected_packet_mid_session, v5_rejected_packet_mid_session;
    connect_refusals => v311_connect_refusals, v5_connect_refusals;
    refusal_under_backpressure =>
        v311_refusal_under_backpressure_keeps_the_brokers_stream_whole,
        v5_refusal_under_backpressure_keeps_the_brokers_stream_whole;
    packets_split_byte_by_byte => v311_packets_split_byte_by_byte, v5_packets_split_byte_by_byte;
}
