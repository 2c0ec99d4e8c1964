//! A broker that goes away and comes back, behind the circuit breaker: real loopback
//! sockets, a real mosquitto.
//!
//! `serve` -> strict MQTT validation -> the upstream proxy, whose connector is wrapped in
//! a circuit breaker and which answers failed connects with `Unavailable` -> mosquitto.
//! While mosquitto is down, clients get the "server unavailable" CONNACK at once (first
//! from refused connects, then from the open circuit without any connect); once it is
//! back and the circuit lets a probe through, they connect normally.
//! Needs `mosquitto` on the PATH or in /usr/sbin (`.ci/run` installs it).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::label_of;
use aegis_core::proxy::{ConnectFuture, Proxy, ProxyError, TcpConnect};
use aegis_core::{Conn, Param, PeerAddr, serve};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use aegis_mqtt::layer::{MqttLayer, Unavailable};
use common::{Mosquitto, connect, connect_scram, read_packet};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tower::{Layer, Service, ServiceExt};

/// Generous: a real broker and a real scheduler are involved.
const WAIT: Duration = Duration::from_secs(5);
const V3_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
const V5_UNAVAILABLE: [u8; 5] = [0x20, 0x03, 0x00, 0x88, 0x00];

/// Counts the connects that reach the TCP connector (inside the breaker).
#[derive(Clone)]
struct Counting {
    inner: TcpConnect,
    connects: Arc<AtomicUsize>,
}

impl Service<()> for Counting {
    type Response = TcpStream;
    type Error = ProxyError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, (): ()) -> ConnectFuture {
        self.connects.fetch_add(1, Ordering::SeqCst);
        self.inner.call(())
    }
}

/// The outcome of each connection the gateway served: the client's address and the
/// labels of its error, if it failed.
type Outcomes = mpsc::UnboundedReceiver<(SocketAddr, Option<(&'static str, &'static str)>)>;

/// Serves `gateway` on a free loopback port; reports each connection's outcome, keyed
/// by the client's address.
async fn start<S>(gateway: S) -> (SocketAddr, Outcomes)
where
    S: Service<Conn<TcpStream>, Error = aegis_core::BoxError> + Clone + Send + 'static,
    S::Response: Send + 'static,
    S::Future: Send + 'static,
{
    let (tx, outcomes) = mpsc::unbounded_channel();
    let stack = tower::service_fn(move |conn: Conn<TcpStream>| {
        let (gateway, tx) = (gateway.clone(), tx.clone());
        async move {
            let peer = Param::<PeerAddr>::param(&conn).0;
            let res = gateway.oneshot(conn).await;
            let _ = tx.send((peer, res.as_ref().err().map(|e| label_of(&**e))));
            res
        }
    });
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, stack).into_future());
    (addr, outcomes)
}

/// Waits for the outcome of the connection from `client` (others are skipped).
async fn outcome_of(
    outcomes: &mut Outcomes,
    client: SocketAddr,
) -> Option<(&'static str, &'static str)> {
    timeout(WAIT, async {
        loop {
            let (peer, labels) = outcomes.recv().await.expect("the gateway is running");
            if peer == client {
                return labels;
            }
        }
    })
    .await
    .expect("the gateway finished the connection")
}

/// One client that the gateway must refuse: sends `connect`, reads everything until
/// EOF. Returns the bytes and the labels of the connection's error.
async fn refused_client(
    gateway: SocketAddr,
    outcomes: &mut Outcomes,
    connect: &[u8],
) -> (Vec<u8>, (&'static str, &'static str)) {
    let mut s = TcpStream::connect(gateway).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(connect).await.unwrap();
    let mut answer = Vec::new();
    timeout(WAIT, s.read_to_end(&mut answer))
        .await
        .expect("the answer comes at once, then EOF")
        .unwrap();
    let labels = outcome_of(outcomes, me)
        .await
        .expect("a refused connection ends with an error");
    (answer, labels)
}

#[tokio::test]
async fn clients_get_server_unavailable_while_the_broker_is_down_and_connect_after_recovery() {
    let mut broker = Mosquitto::start().await;
    let connects = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::builder("mosquitto")
        .consecutive_failures(Some(2))
        .open_for(Duration::from_millis(200))
        .build();
    let circuit = breaker.handle();
    let connector = breaker.layer(Counting {
        inner: TcpConnect::new(broker.addr()).timeout(Duration::from_secs(2)),
        connects: Arc::clone(&connects),
    });
    let gateway = MqttLayer::new(aegis_mqtt::Config::new())
        .layer(Proxy::with_connector(connector).on_connect_error(Unavailable::new()));
    let (addr, mut outcomes) = start(gateway).await;

    // Broker up: a client connects through the gateway and gets mosquitto's CONNACK 0.
    let mut live = TcpStream::connect(addr).await.unwrap();
    live.write_all(&connect(4, "live", 60)).await.unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut live))
            .await
            .unwrap()
            .unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    assert_eq!(connects.load(Ordering::SeqCst), 1);

    // The broker dies: the live session ends.
    broker.stop();
    let mut rest = Vec::new();
    let ended = timeout(WAIT, live.read_to_end(&mut rest)).await.unwrap();
    assert!(ended.is_err() || rest.is_empty(), "{ended:?} {rest:?}");
    drop(live);

    // Refused connects: each client gets the CONNACK at once; two in a row trip the
    // circuit.
    for n in 1..=2 {
        assert_eq!(circuit.state(), CircuitState::Closed);
        let (answer, labels) = refused_client(addr, &mut outcomes, &connect(4, "down", 60)).await;
        assert_eq!(answer, V3_UNAVAILABLE);
        assert_eq!(labels, ("proxy", "connect_refused"));
        assert_eq!(connects.load(Ordering::SeqCst), 1 + n);
    }
    assert_eq!(circuit.state(), CircuitState::Open);

    // Open circuit: each version gets its CONNACK from the gateway without a connect
    // attempt (the breaker's `open` rejection, and the connect count stands still). The
    // circuit is open for only 200 ms: if a slow machine let it go half-open before the
    // client arrived, that client was a refused probe (answered all the same, and the
    // circuit re-opened); try again, a bounded number of times.
    for (level, expected) in [(4, &V3_UNAVAILABLE[..]), (5, &V5_UNAVAILABLE[..])] {
        let mut answered_open = false;
        for _ in 0..20 {
            let before = connects.load(Ordering::SeqCst);
            let open_before = circuit.state() == CircuitState::Open;
            let (answer, labels) =
                refused_client(addr, &mut outcomes, &connect(level, "open", 60)).await;
            assert_eq!(answer, expected, "MQTT level {level}");
            match labels {
                ("circuit_breaker", "open") => {
                    assert!(open_before, "the circuit was open");
                    assert_eq!(connects.load(Ordering::SeqCst), before, "no connect");
                    answered_open = true;
                    break;
                }
                ("proxy", "connect_refused") => {
                    assert_eq!(connects.load(Ordering::SeqCst), before + 1, "one probe");
                    // The failed probe re-opened it (and it may be half-open again).
                    assert_ne!(circuit.state(), CircuitState::Closed);
                }
                other => panic!("unexpected outcome {other:?}"),
            }
        }
        assert!(answered_open, "no client was answered by the open circuit");
    }

    // The broker comes back on the same port. Once the open period is over the circuit
    // lets a probe through (half-open), and clients reach the broker again.
    broker.restart().await;
    let mut half_open = false;
    for _ in 0..500 {
        if circuit.state() == CircuitState::HalfOpen {
            half_open = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(half_open, "the circuit never went half-open");
    let before = connects.load(Ordering::SeqCst);
    for (level, client_id) in [(5, "back5"), (4, "back4")] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(&connect(level, client_id, 60)).await.unwrap();
        let (first, body) = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
        assert_eq!(first, 0x20, "a CONNACK from the broker (level {level})");
        assert_eq!(
            body[1], 0x00,
            "CONNACK 0: accepted (level {level}) {body:?}"
        );
        if level == 4 {
            assert_eq!(body, [0x00, 0x00]);
        }
        // PINGREQ / PINGRESP through the proxy, then a clean DISCONNECT.
        s.write_all(&[0xC0, 0x00]).await.unwrap();
        assert_eq!(
            timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
            (0xD0, vec![])
        );
        s.write_all(&[0xE0, 0x00]).await.unwrap();
        assert_eq!(circuit.state(), CircuitState::Closed, "the probe closed it");
    }
    assert_eq!(connects.load(Ordering::SeqCst), before + 2);
}

/// A broker that is stalled (SIGSTOP) rather than gone: the kernel still completes the
/// TCP handshakes, so only the CONNACK can tell. With `FailuresOnly` around the
/// connector, the CONNACK timeout reports each stalled connection as a failure and the
/// broker's CONNACKs report the successes: the circuit opens after two timeouts, clients
/// then get "server unavailable" at once, and after SIGCONT a probe's CONNACK closes it.
#[tokio::test]
async fn a_stalled_broker_opens_the_circuit_through_connack_timeouts_and_recovers() {
    use aegis_layers::circuit_breaker::FailuresOnly;
    use aegis_mqtt::layer::ConnackLatency;

    let broker = Mosquitto::start().await;
    let connects = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::builder("mosquitto")
        .consecutive_failures(Some(2))
        .open_for(Duration::from_millis(300))
        .success_threshold(1)
        .classifier(FailuresOnly)
        .build();
    let circuit = breaker.handle();
    let connector = breaker.layer(Counting {
        inner: TcpConnect::new(broker.addr()).timeout(Duration::from_secs(2)),
        connects: Arc::clone(&connects),
    });
    let (on_timeout, on_connack) = (circuit.clone(), circuit.clone());
    let gateway = MqttLayer::new(aegis_mqtt::Config::new())
        .connack_timeout(Duration::from_millis(300))
        .on_connack_timeout(move || on_timeout.record_failure())
        .connack_latency(ConnackLatency::new(move |_| on_connack.record_success()))
        .layer(Proxy::with_connector(connector).on_connect_error(Unavailable::new()));
    let (addr, mut outcomes) = start(gateway).await;

    // Healthy: the broker's CONNACK is a reported success.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect(4, "before", 60)).await.unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    s.write_all(&[0xE0, 0x00]).await.unwrap();
    drop(s);

    // Stalled: each connect succeeds (the kernel answers the handshake), and the client
    // gets the gateway's CONNACK 0x03 once the 300 ms CONNACK timeout fires. Two of
    // those open the circuit although every connect succeeded.
    broker.signal("STOP");
    for n in 1..=2 {
        assert_eq!(circuit.state(), CircuitState::Closed, "stalled client {n}");
        let before = connects.load(Ordering::SeqCst);
        let (answer, labels) = refused_client(addr, &mut outcomes, &connect(4, "stall", 60)).await;
        assert_eq!(answer, V3_UNAVAILABLE);
        assert_eq!(labels, ("mqtt", "connack_timeout"));
        assert_eq!(
            connects.load(Ordering::SeqCst),
            before + 1,
            "the connect went through"
        );
    }
    assert_eq!(circuit.state(), CircuitState::Open);

    // Open: the next client is answered without a connect and without waiting for any
    // timeout (300 ms open period: a slow machine may have let it go half-open, in which
    // case that client was a probe that timed out and re-opened it; try again).
    let mut fast = false;
    for _ in 0..10 {
        let before = connects.load(Ordering::SeqCst);
        let (answer, labels) = refused_client(addr, &mut outcomes, &connect(5, "open", 60)).await;
        assert_eq!(answer, V5_UNAVAILABLE);
        if labels == ("circuit_breaker", "open") {
            assert_eq!(connects.load(Ordering::SeqCst), before, "no connect");
            fast = true;
            break;
        }
        assert_eq!(
            labels,
            ("mqtt", "connack_timeout"),
            "a probe into the stall"
        );
    }
    assert!(fast, "no client was answered by the open circuit");

    // Resumed: once half-open, a probe's connect succeeds (decides nothing), the broker's
    // CONNACK is a reported success, and the circuit closes.
    broker.signal("CONT");
    let mut closed = false;
    for _ in 0..50 {
        if circuit.state() != CircuitState::Open {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(&connect(4, "after", 60)).await.unwrap();
            let answer = timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap();
            if answer == (0x20, vec![0x00, 0x00]) {
                assert_eq!(
                    circuit.state(),
                    CircuitState::Closed,
                    "the CONNACK closed it"
                );
                closed = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(closed, "the circuit never closed after SIGCONT");
}

/// The CONNACK timeout of the enhanced-authentication tests below.
const CONNACK_TIMEOUT: Duration = Duration::from_millis(300);

/// A SIGSTOPped mosquitto behind an MQTT gateway with [`CONNACK_TIMEOUT`]: the broker
/// (SIGCONT it at the end), the gateway's address, its outcomes, and how many CONNACK
/// timeouts it reported.
async fn stalled_broker_behind_a_gateway() -> (Mosquitto, SocketAddr, Outcomes, Arc<AtomicUsize>) {
    let broker = Mosquitto::start().await;
    let timeouts = Arc::new(AtomicUsize::new(0));
    let t = Arc::clone(&timeouts);
    let gateway = MqttLayer::new(aegis_mqtt::Config::new())
        .connack_timeout(CONNACK_TIMEOUT)
        .on_connack_timeout(move || {
            t.fetch_add(1, Ordering::SeqCst);
        })
        .layer(Proxy::new(broker.addr()).on_connect_error(Unavailable::new()));
    let (addr, outcomes) = start(gateway).await;
    broker.signal("STOP");
    (broker, addr, outcomes, timeouts)
}

/// An MQTT 5 client with an Authentication Method that floods AUTH packets at a stalled
/// broker still gets the gateway's CONNACK 0x88 when the CONNACK timeout fires, and the
/// timeout is reported (a breaker failure). Its AUTHs used to be forwarded as fast as
/// they came: once the broker's socket was full (a few MB), the proxy waited to write
/// them and read the client no more, the CONNACK timer (polled by the reads) never
/// fired, and the connection stayed open, answerless, for as long as the broker was
/// stalled. Now the client gets one AUTH ahead of the broker's (which sends none): the
/// rest wait in its socket.
#[tokio::test]
async fn a_client_flooding_auth_at_a_stalled_broker_gets_connack_0x88_at_the_timeout() {
    let (broker, addr, mut outcomes, timeouts) = stalled_broker_behind_a_gateway().await;

    // CONNECT with the Authentication Method "SCRAM-X", then AUTH packets with 4000
    // bytes of Authentication Data each, as fast as the gateway takes them (64 MB at
    // most: the broker's socket and the gateway's take a few).
    let connect = connect_scram("flood");
    let data = vec![b'A'; 4000];
    let mut props = [&[0x15][..], &common::string("SCRAM-X"), &[0x16]].concat();
    props.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
    props.extend_from_slice(&data);
    let auth = common::packet(
        0xF0,
        &[&[0x18][..], &common::packet(0, &props)[1..]].concat(),
    );
    let flood = auth.repeat(16);

    let s = TcpStream::connect(addr).await.unwrap();
    let me = s.local_addr().unwrap();
    let (mut from_gateway, mut to_gateway) = s.into_split();
    to_gateway.write_all(&connect).await.unwrap();
    let flooding = tokio::spawn(async move {
        let mut sent = 0;
        while sent < 64 << 20 && to_gateway.write_all(&flood).await.is_ok() {
            sent += flood.len();
        }
        sent
    });
    let start = tokio::time::Instant::now();
    let mut answer = [0; 5];
    timeout(CONNACK_TIMEOUT + WAIT, from_gateway.read_exact(&mut answer))
        .await
        .expect("no answer: the flood held the gateway past its CONNACK timeout")
        .unwrap();
    let waited = tokio::time::Instant::now().saturating_duration_since(start);
    assert_eq!(answer, V5_UNAVAILABLE);
    assert!(waited >= CONNACK_TIMEOUT, "answered after {waited:?}");
    assert_eq!(
        outcome_of(&mut outcomes, me).await,
        Some(("mqtt", "connack_timeout"))
    );
    assert_eq!(timeouts.load(Ordering::SeqCst), 1, "reported once");
    // The gateway closed: the flood ends (its writes fail).
    let sent = timeout(WAIT, flooding)
        .await
        .expect("the flood did not end")
        .unwrap();
    assert!(sent < 64 << 20, "the gateway took all of {sent} bytes");
    broker.signal("CONT");
}

/// An MQTT 5 client with an Authentication Method that half-closes before the broker's
/// CONNACK (its FIN right after its CONNECT, or after a DISCONNECT) still gets the
/// gateway's CONNACK 0x88 from a stalled broker when the CONNACK timeout fires, then EOF,
/// and the timeout is reported (a breaker failure). Its EOF used to be passed on at once:
/// the proxy's copy then read the client no more, the CONNACK timer (polled by the
/// reads) never fired, and the connection stayed open, answerless, for as long as the
/// broker was stalled. Now the EOF waits for the CONNACK, as the client's packets do.
#[tokio::test]
async fn a_client_half_closing_in_an_enhanced_authentication_gets_connack_0x88_at_the_timeout() {
    let (broker, addr, mut outcomes, timeouts) = stalled_broker_behind_a_gateway().await;

    let connect = connect_scram("halfclose");
    for (n, after) in [&[][..], &[0xE0, 0x00]].into_iter().enumerate() {
        let start = tokio::time::Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(&[&connect[..], after].concat()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut answer = Vec::new();
        timeout(CONNACK_TIMEOUT + WAIT, s.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("no answer, no EOF after {after:02x?} and FIN"))
            .unwrap();
        let waited = tokio::time::Instant::now().saturating_duration_since(start);
        assert_eq!(answer, V5_UNAVAILABLE, "after {after:02x?} and FIN");
        assert!(waited >= CONNACK_TIMEOUT, "answered after {waited:?}");
        assert_eq!(
            outcome_of(&mut outcomes, me).await,
            Some(("mqtt", "connack_timeout"))
        );
        assert_eq!(timeouts.load(Ordering::SeqCst), n + 1, "reported once");
    }
    broker.signal("CONT");
}

/// Judged by the broker's first byte (`judge_by_first_read`), a half-open probe into a
/// stalled broker holds its permit until the broker answers. While it waits, the other
/// clients are answered at once by the circuit and none of them reaches the stall
/// (judged by the connect, as with `FailuresOnly`, each would have been let through to
/// wait out its CONNACK timeout). After SIGCONT the probe's CONNACK closes the circuit.
#[tokio::test]
async fn a_half_open_probe_into_a_stalled_broker_holds_its_permit_until_the_connack() {
    let broker = Mosquitto::start().await;
    let connects = Arc::new(AtomicUsize::new(0));
    let breaker = CircuitBreakerLayer::builder("mosquitto")
        .consecutive_failures(Some(1))
        .open_for(Duration::from_millis(300))
        .probe_timeout(Duration::from_secs(30))
        .build();
    let circuit = breaker.handle();
    let connector = breaker.judge_by_first_read().layer(Counting {
        inner: TcpConnect::new(broker.addr()).timeout(Duration::from_secs(2)),
        connects: Arc::clone(&connects),
    });
    let on_timeout = circuit.clone();
    let gateway = MqttLayer::new(aegis_mqtt::Config::new())
        .connack_timeout(Duration::from_secs(30))
        .on_connack_timeout(move || on_timeout.record_failure())
        .layer(Proxy::with_connector(connector).on_connect_error(Unavailable::new()));
    let (addr, mut outcomes) = start(gateway).await;

    // Healthy: the CONNACK reaches the client through the judged stream.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&connect(4, "before", 60)).await.unwrap();
    assert_eq!(
        timeout(WAIT, read_packet(&mut s)).await.unwrap().unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    drop(s);

    // Stalled, and the circuit opened (as a CONNACK timeout would), then half-open.
    broker.signal("STOP");
    circuit.record_failure();
    assert_eq!(circuit.state(), CircuitState::Open);
    timeout(WAIT, async {
        while circuit.state() != CircuitState::HalfOpen {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("half-open after open_for");

    // The probe: its connect succeeds (the kernel answers), its CONNACK does not come.
    let before = connects.load(Ordering::SeqCst);
    let mut probe = TcpStream::connect(addr).await.unwrap();
    probe.write_all(&connect(4, "probe", 60)).await.unwrap();
    timeout(WAIT, async {
        while connects.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the probe's connect");

    // Every other client is refused at once, without a connect.
    for n in 0..3 {
        let (answer, labels) =
            refused_client(addr, &mut outcomes, &connect(4, &format!("c{n}"), 60)).await;
        assert_eq!(answer, V3_UNAVAILABLE, "client {n}");
        assert_eq!(labels, ("circuit_breaker", "open"), "client {n}");
    }
    assert_eq!(
        connects.load(Ordering::SeqCst),
        before + 1,
        "only the probe"
    );
    assert_eq!(circuit.state(), CircuitState::HalfOpen);

    // Resumed: the probe's CONNACK is the success that closes the circuit.
    broker.signal("CONT");
    assert_eq!(
        timeout(WAIT, read_packet(&mut probe))
            .await
            .unwrap()
            .unwrap(),
        (0x20, vec![0x00, 0x00])
    );
    assert_eq!(circuit.state(), CircuitState::Closed);
}
