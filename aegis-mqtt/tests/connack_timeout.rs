//! `MqttLayer::connack_timeout`: a broker that takes the connection but sends no CONNACK
//! in time (stalled) gets the client a "server unavailable" CONNACK from the gateway,
//! then EOF; a broker that answers in time is left alone; a late CONNACK never reaches
//! the client. Paused time, duplex streams.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aegis_core::error::find;
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{capture, run};
use aegis_core::{BoxError, Conn};
use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
use aegis_mqtt::MqttError;
use aegis_mqtt::layer::{ConnackLatency, MqttIo, MqttLayer};
use common::{connect_v4, connect_v5, duplex_conn};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tower::{Layer, ServiceExt, service_fn};

const TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client waits for anything before the test fails.
const GIVE_UP: Duration = Duration::from_secs(60);
const V3_UNAVAILABLE: [u8; 4] = [0x20, 0x02, 0x00, 0x03];
const V5_UNAVAILABLE: [u8; 5] = [0x20, 0x03, 0x00, 0x88, 0x00];
const V3_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];
const V5_ACCEPTED: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];
const PINGRESP: [u8; 2] = [0xD0, 0x00];
/// What a broker writes once it answers: its CONNACK, then two PINGRESPs.
const V3_ANSWERS: &[&[u8]] = &[&V3_ACCEPTED, &PINGRESP, &PINGRESP];
const V5_ANSWERS: &[&[u8]] = &[&V5_ACCEPTED, &PINGRESP, &PINGRESP];

type Io = MqttIo<Conn<DuplexStream>>;

/// What the broker's writes got, in order.
type Writes = Vec<std::io::Result<()>>;

/// What a broker read and what its writes got.
type Seen = (std::io::Result<Vec<u8>>, Writes);

/// A broker as a proxy drives it: reads the client all along while, after `delay`, it
/// writes each of `writes` in turn (if `delay` is `None`, it never writes). Returns the
/// read's end and each write's result.
async fn broker(
    io: Io,
    delay: Option<Duration>,
    writes: &'static [&'static [u8]],
) -> Result<Seen, BoxError> {
    let (mut r, mut w) = tokio::io::split(io);
    let read = async move {
        let mut seen = Vec::new();
        r.read_to_end(&mut seen).await.map(|_| seen)
    };
    let write = async move {
        let mut results = Vec::new();
        let Some(delay) = delay else {
            return std::future::pending().await;
        };
        tokio::time::sleep(delay).await;
        for bytes in writes {
            results.push(w.write_all(bytes).await);
        }
        results
    };
    tokio::pin!(read, write);
    // The read ends the connection, as in a proxy; the writes go on until it does.
    let mut results = None;
    let seen = loop {
        tokio::select! {
            seen = &mut read => break seen,
            r = &mut write, if results.is_none() => results = Some(r),
        }
    };
    let results = match results {
        Some(r) => r,
        // A late broker still writes (a proxy copies what it sends until the connection
        // ends); a stalled one never does.
        None if delay.is_some() => write.await,
        None => Vec::new(),
    };
    Ok((seen, results))
}

/// One connection through the layer: the client sends `connect` and reads to EOF.
/// Returns what it read, when its first byte arrived (from the CONNECT) and the
/// service's result.
async fn connection(
    layer: MqttLayer,
    connect: Vec<u8>,
    delay: Option<Duration>,
    writes: &'static [&'static [u8]],
) -> (Vec<u8>, Duration, Result<Seen, BoxError>) {
    let svc = layer.layer(service_fn(move |io: Io| broker(io, delay, writes)));
    let (mut client, server) = tokio::io::duplex(1024);
    let io = duplex_conn(server);
    let conn: JoinHandle<_> = tokio::spawn(svc.oneshot(io));
    let start = Instant::now();
    client.write_all(&connect).await.unwrap();
    let mut got = vec![0; 1];
    let mut first = Duration::MAX;
    // Bounded: without the timeout, a stalled broker leaves the client waiting forever.
    let read = tokio::time::timeout(GIVE_UP, client.read(&mut got));
    if read.await.expect("no answer at all").unwrap() == 1 {
        first = Instant::now().saturating_duration_since(start);
        let rest = tokio::time::timeout(GIVE_UP, client.read_to_end(&mut got));
        rest.await.expect("no EOF").unwrap();
    } else {
        got.clear();
    }
    // The client is silent after its CONNECT, and keeps its end open until EOF.
    drop(client);
    (got, first, conn.await.unwrap())
}

fn counter() -> (Arc<AtomicUsize>, impl Fn() + Send + Sync + 'static) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&calls);
    (calls, move || {
        c.fetch_add(1, Ordering::SeqCst);
    })
}

fn timeouts(snap: &metrics_util::debugging::Snapshotter) -> u64 {
    capture(snap).counter(
        REJECTIONS_TOTAL,
        &[("layer", "mqtt"), ("reason", "connack_timeout")],
    )
}

#[test]
fn a_stalled_broker_gets_the_client_server_unavailable_after_exactly_the_timeout() {
    let (results, snap) = run(true, || async {
        let mut results = Vec::new();
        for (connect, answer) in [
            (connect_v4(), &V3_UNAVAILABLE[..]),
            (connect_v5(), &V5_UNAVAILABLE[..]),
        ] {
            let (calls, hook) = counter();
            let rtts = Arc::new(AtomicUsize::new(0));
            let r = Arc::clone(&rtts);
            let layer = MqttLayer::default()
                .connack_timeout(TIMEOUT)
                .on_connack_timeout(hook)
                .connack_latency(ConnackLatency::new(move |_| {
                    r.fetch_add(1, Ordering::SeqCst);
                }));
            // A broker that reads the CONNECT and never answers.
            let (got, first, res) = connection(layer, connect, None, &[]).await;
            assert_eq!(got, answer, "the gateway's CONNACK, then EOF");
            assert_eq!(first, TIMEOUT, "answered after exactly the timeout");
            let err = res.unwrap().0.unwrap_err();
            assert_eq!(find::<MqttError>(&err), Some(&MqttError::ConnackTimeout));
            assert_eq!(calls.load(Ordering::SeqCst), 1, "the hook, once");
            assert_eq!(rtts.load(Ordering::SeqCst), 0, "not a round trip");
            results.push(());
        }
        results
    });
    assert_eq!(results.len(), 2);
    assert_eq!(timeouts(&snap), 2, "each refusal counted once");
}

#[test]
fn a_broker_that_answers_in_time_is_left_alone() {
    let ((), snap) = run(true, || async {
        for (connect, connack) in [
            (connect_v4(), &V3_ACCEPTED[..]),
            (connect_v5(), &V5_ACCEPTED[..]),
        ] {
            let (calls, hook) = counter();
            let layer = MqttLayer::default()
                .connack_timeout(TIMEOUT)
                .on_connack_timeout(hook);
            let writes = if connack.len() == 4 {
                V3_ANSWERS
            } else {
                V5_ANSWERS
            };
            // The CONNACK just in time; the client stays on well past the timeout.
            let delay = TIMEOUT.saturating_sub(Duration::from_millis(1));
            let svc = layer.layer(service_fn(move |io: Io| broker(io, Some(delay), writes)));
            let (mut client, server) = tokio::io::duplex(1024);
            let io = duplex_conn(server);
            let conn = tokio::spawn(svc.oneshot(io));
            client.write_all(&connect).await.unwrap();
            let mut got = vec![0; connack.len() + 4];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [connack, &PINGRESP, &PINGRESP].concat());
            tokio::time::sleep(TIMEOUT * 3).await;
            client.write_all(&[0xC0, 0x00]).await.unwrap(); // PINGREQ: still open
            drop(client);
            let (seen, results) = conn.await.unwrap().unwrap();
            assert_eq!(seen.unwrap(), [&connect[..], &[0xC0, 0x00]].concat());
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert_eq!(calls.load(Ordering::SeqCst), 0, "no hook call");
        }
    });
    assert_eq!(timeouts(&snap), 0);
}

#[test]
fn a_late_connack_never_reaches_the_client() {
    let ((), snap) = run(true, || async {
        for (connect, answer, writes) in [
            (connect_v4(), &V3_UNAVAILABLE[..], V3_ANSWERS),
            (connect_v5(), &V5_UNAVAILABLE[..], V5_ANSWERS),
        ] {
            let (calls, hook) = counter();
            let layer = MqttLayer::default()
                .connack_timeout(TIMEOUT)
                .on_connack_timeout(hook);
            let delay = TIMEOUT + Duration::from_millis(1);
            let (got, first, res) = connection(layer, connect, Some(delay), writes).await;
            assert_eq!(got, answer, "only the gateway's CONNACK");
            assert_eq!(first, TIMEOUT);
            let (seen, results) = res.unwrap();
            let err = seen.unwrap_err();
            assert_eq!(find::<MqttError>(&err), Some(&MqttError::ConnackTimeout));
            assert_eq!(results.len(), writes.len());
            for r in results {
                assert_eq!(r.unwrap_err().kind(), std::io::ErrorKind::BrokenPipe);
            }
            assert_eq!(calls.load(Ordering::SeqCst), 1);
        }
    });
    assert_eq!(timeouts(&snap), 2);
}

#[tokio::test(start_paused = true)]
async fn late_broker_writes_fail_with_broken_pipe() {
    let svc = MqttLayer::default()
        .connack_timeout(TIMEOUT)
        .layer(service_fn(|mut io: Io| async move {
            let mut buf = vec![0; connect_v4().len()];
            io.read_exact(&mut buf).await?;
            // The client is silent: this read ends with the refusal.
            let err = io.read(&mut buf).await.unwrap_err();
            assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
            assert!(io.connack_sent(), "the gateway's CONNACK went out");
            let late = io.write_all(&V3_ACCEPTED).await.unwrap_err();
            assert_eq!(late.kind(), std::io::ErrorKind::BrokenPipe);
            Err::<(), _>(err)
        }));
    let (mut client, server) = tokio::io::duplex(1024);
    let io = duplex_conn(server);
    let conn = tokio::spawn(svc.oneshot(io));
    client.write_all(&connect_v4()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(GIVE_UP, client.read_to_end(&mut got));
    read.await.expect("no answer at all").unwrap();
    assert_eq!(got, V3_UNAVAILABLE);
    conn.await.unwrap().unwrap_err();
}

#[tokio::test(start_paused = true)]
async fn off_by_default() {
    let delay = TIMEOUT * 4;
    let svc = MqttLayer::default().layer(service_fn(move |io: Io| {
        broker(io, Some(delay), V3_ANSWERS)
    }));
    let (mut client, server) = tokio::io::duplex(1024);
    let io = duplex_conn(server);
    let conn = tokio::spawn(svc.oneshot(io));
    let start = Instant::now();
    client.write_all(&connect_v4()).await.unwrap();
    let mut got = [0; 4];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(got, V3_ACCEPTED, "the broker's CONNACK, however late");
    assert_eq!(Instant::now().saturating_duration_since(start), delay);
    drop(client);
    let (_, results) = conn.await.unwrap().unwrap();
    assert!(results.iter().all(Result::is_ok), "{results:?}");
}

#[tokio::test(start_paused = true)]
async fn timeouts_reported_to_a_breaker_open_it() {
    let breaker = CircuitBreakerLayer::builder("upstream")
        .consecutive_failures(Some(3))
        .build();
    let handle = breaker.handle();
    let h = handle.clone();
    let layer = MqttLayer::default()
        .connack_timeout(TIMEOUT)
        .on_connack_timeout(move || h.record_failure());
    for i in 0..3 {
        assert_eq!(handle.state(), CircuitState::Closed, "after {i}");
        let (got, _, _) = connection(layer.clone(), connect_v4(), None, &[]).await;
        assert_eq!(got, V3_UNAVAILABLE);
    }
    assert_eq!(handle.state(), CircuitState::Open);
}

/// An inner service slower than the timeout to start reading (a slow upstream connect):
/// the timeout fires at its first read, and the CONNECT the gateway has refused never
/// reaches it (a broker would otherwise take it, and evict a live session of that
/// client id).
#[tokio::test(start_paused = true)]
async fn a_connect_refused_by_the_timeout_never_reaches_a_late_reader() {
    let svc = MqttLayer::default()
        .connack_timeout(TIMEOUT)
        .layer(service_fn(|mut io: Io| async move {
            tokio::time::sleep(TIMEOUT * 2).await;
            let mut seen = Vec::new();
            let err = io.read_to_end(&mut seen).await.unwrap_err();
            assert!(seen.is_empty(), "the refused CONNECT was read: {seen:?}");
            assert_eq!(io.error(), Some(MqttError::ConnackTimeout));
            Err::<(), _>(err)
        }));
    let (mut client, server) = tokio::io::duplex(1024);
    let conn = tokio::spawn(svc.oneshot(duplex_conn(server)));
    client.write_all(&connect_v4()).await.unwrap();
    let mut got = Vec::new();
    let read = tokio::time::timeout(GIVE_UP, client.read_to_end(&mut got));
    read.await.expect("no answer at all").unwrap();
    assert_eq!(got, V3_UNAVAILABLE);
    let err = conn.await.unwrap().unwrap_err();
    assert_eq!(find::<MqttError>(&*err), Some(&MqttError::ConnackTimeout));
}

/// An authenticator's time is its own, not the broker's: a check that takes twice the
/// CONNACK timeout, then a broker that answers in half of it, gets the client in, and
/// the round trip reported is the broker's alone.
#[cfg(feature = "auth")]
#[tokio::test(start_paused = true)]
async fn an_authenticators_time_is_not_on_the_connack_clock() {
    use aegis_mqtt::auth::{AuthLayer, Credentials, Decision};
    let slow_allow = service_fn(|_: Credentials| async {
        tokio::time::sleep(TIMEOUT * 2).await;
        Ok::<_, std::convert::Infallible>(Decision::Allow)
    });
    let auth = AuthLayer::new(slow_allow).timeout(TIMEOUT * 3);
    let rtts = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let seen = Arc::clone(&rtts);
    let layer = MqttLayer::default()
        .connack_timeout(TIMEOUT)
        .connack_latency(ConnackLatency::new(move |d| seen.lock().push(d)));
    let broker = service_fn(|io: Io| broker(io, Some(TIMEOUT / 2), V3_ANSWERS));
    let svc = layer.layer(auth.layer(broker));
    let (mut client, server) = tokio::io::duplex(1024);
    let conn: JoinHandle<_> = tokio::spawn(svc.oneshot(duplex_conn(server)));
    client.write_all(&connect_v4()).await.unwrap();
    let mut got = vec![0; V3_ACCEPTED.len()];
    let read = tokio::time::timeout(GIVE_UP, client.read_exact(&mut got));
    read.await.expect("no answer at all").unwrap();
    assert_eq!(
        got, V3_ACCEPTED,
        "the gateway answered instead of the broker"
    );
    drop(client);
    let _ = conn.await.unwrap();
    assert_eq!(*rtts.lock(), [TIMEOUT / 2]);
}

/// An MQTT 5 CONNECT with an Authentication Method ("m"): enhanced authentication.
fn connect_v5_auth() -> Vec<u8> {
    common::head("MQTT", 5, 0x02)
        .props(&[0x15, 0, 1, b'm'])
        .s("c1")
        .frame(0x10)
}

/// An AUTH "continue authentication" (0x18) with method "m" and one byte of data, as
/// either side writes it in an enhanced authentication.
fn auth_continue(data: u8) -> Vec<u8> {
    common::B::new()
        .u8(0x18)
        .props(&[0x15, 0, 1, b'm', 0x16, 0, 1, data])
        .frame(0xF0)
}

const V5_NOT_AUTHORIZED: [u8; 5] = [0x20, 0x03, 0x00, 0x87, 0x00];

/// A broker that reads the client all along while it writes each of `script`'s packets
/// after its pause (from the previous write), then writes nothing more. Returns what it
/// read and how its reading ended.
async fn scripted_broker(io: Io, script: Vec<(Duration, Vec<u8>)>) -> Result<Seen, BoxError> {
    let (mut r, mut w) = tokio::io::split(io);
    let read = async move {
        let mut seen = Vec::new();
        r.read_to_end(&mut seen).await.map(|_| seen)
    };
    let write = async move {
        let mut results = Vec::new();
        for (pause, bytes) in script {
            tokio::time::sleep(pause).await;
            results.push(w.write_all(&bytes).await);
        }
        results
    };
    let (seen, results) = tokio::join!(read, write);
    Ok((seen, results))
}

/// The client of an enhanced authentication: sends its CONNECT, then, after each of the
/// broker's AUTH challenges, its answer if `answers`; reads up to a CONNACK (checking
/// that EOF follows a refusing one), then closes. Returns each packet it got with the
/// time it arrived (from the CONNECT).
async fn auth_client(mut client: DuplexStream, answers: bool) -> Vec<(Duration, Vec<u8>)> {
    let start = Instant::now();
    client.write_all(&connect_v5_auth()).await.unwrap();
    let mut got = Vec::new();
    loop {
        let mut head = [0; 2];
        let read = tokio::time::timeout(GIVE_UP, client.read_exact(&mut head));
        read.await
            .expect("no answer at all")
            .expect("EOF before a CONNACK");
        let mut body = vec![0; usize::from(head[1])];
        client.read_exact(&mut body).await.unwrap();
        let packet = [&head[..], &body].concat();
        let at = Instant::now().saturating_duration_since(start);
        if answers && packet[0] == 0xF0 {
            client.write_all(&auth_continue(b'c')).await.unwrap();
        }
        let connack = packet[0] == 0x20;
        got.push((at, packet));
        if connack {
            if got.last().is_some_and(|(_, p)| p[3] != 0) {
                let mut rest = Vec::new();
                client.read_to_end(&mut rest).await.unwrap();
                assert!(rest.is_empty(), "after a refusing CONNACK: {rest:?}");
            }
            return got;
        }
    }
}

/// A broker that answers an enhanced authentication with AUTH is up: a CONNACK timeout
/// after it is `auth_timeout` (CONNACK 0x87), never reported to `on_connack_timeout`;
/// its latency sample is the round trip to the broker's first AUTH. A few clients that
/// never answer the challenge (or a broker that stalls once a client has answered)
/// cannot open the circuit against it.
#[test]
fn an_auth_exchange_that_times_out_is_no_broker_failure() {
    let ((), snap) = run(true, || async {
        let breaker = CircuitBreakerLayer::builder("upstream")
            .consecutive_failures(Some(3))
            .build();
        let handle = breaker.handle();
        let (calls, hook) = counter();
        let rtts = Arc::new(AtomicUsize::new(0));
        let r = Arc::clone(&rtts);
        let h = handle.clone();
        let layer = MqttLayer::default()
            .connack_timeout(TIMEOUT)
            .on_connack_timeout(move || {
                hook();
                h.record_failure();
            })
            .connack_latency(ConnackLatency::new(move |_| {
                r.fetch_add(1, Ordering::SeqCst);
            }));
        // The broker challenges after 1 s and then waits for ever; the client is silent,
        // or answers at once.
        let challenge = Duration::from_secs(1);
        for answers in [false, true, false, true, false] {
            let script = vec![(challenge, auth_continue(b's'))];
            let svc = layer.clone().layer(service_fn(move |io: Io| {
                scripted_broker(io, script.clone())
            }));
            let (client, server) = tokio::io::duplex(1024);
            let conn = tokio::spawn(svc.oneshot(duplex_conn(server)));
            let got = auth_client(client, answers).await;
            // The challenge, then the gateway's "not authorized" a whole timeout after
            // it: the clock started again at the broker's AUTH.
            assert_eq!(
                got,
                [
                    (challenge, auth_continue(b's')),
                    (challenge + TIMEOUT, V5_NOT_AUTHORIZED.to_vec()),
                ],
                "answers: {answers}"
            );
            let (seen, _) = conn.await.unwrap().unwrap();
            let err = seen.unwrap_err();
            assert_eq!(find::<MqttError>(&err), Some(&MqttError::AuthTimeout));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the hook was called");
        assert_eq!(handle.state(), CircuitState::Closed);
        assert_eq!(rtts.load(Ordering::SeqCst), 5, "one sample a connection");
    });
    let captured = capture(&snap);
    let rejections =
        |reason| captured.counter(REJECTIONS_TOTAL, &[("layer", "mqtt"), ("reason", reason)]);
    assert_eq!(rejections("auth_timeout"), 5);
    assert_eq!(rejections("connack_timeout"), 0);
}

/// Each round of an enhanced authentication has the whole CONNACK timeout: the clock
/// starts again at each of the broker's AUTH packets, so an exchange longer than the
/// timeout in all ends in the broker's CONNACK. Its latency sample is the round trip to
/// the broker's first AUTH, not the whole exchange, which holds the client's answers.
#[tokio::test(start_paused = true)]
async fn each_auth_round_has_the_whole_connack_timeout() {
    let (calls, hook) = counter();
    let rtts = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let r = Arc::clone(&rtts);
    let layer = MqttLayer::default()
        .connack_timeout(TIMEOUT)
        .on_connack_timeout(hook)
        .connack_latency(ConnackLatency::new(move |d| r.lock().push(d)));
    // Each broker packet comes just inside the timeout after the one before it: three
    // rounds take nearly three timeouts.
    let pause = TIMEOUT.saturating_sub(Duration::from_millis(1));
    let script = vec![
        (pause, auth_continue(1)),
        (pause, auth_continue(2)),
        (pause, V5_ACCEPTED.to_vec()),
    ];
    let svc = layer.layer(service_fn(move |io: Io| {
        scripted_broker(io, script.clone())
    }));
    let (client, server) = tokio::io::duplex(1024);
    let conn = tokio::spawn(svc.oneshot(duplex_conn(server)));
    let got = auth_client(client, true).await;
    assert_eq!(
        got,
        [
            (pause, auth_continue(1)),
            (pause * 2, auth_continue(2)),
            (pause * 3, V5_ACCEPTED.to_vec()),
        ]
    );
    let (seen, results) = conn.await.unwrap().unwrap();
    let answer = auth_continue(b'c');
    assert_eq!(
        seen.unwrap(),
        [connect_v5_auth(), answer.clone(), answer].concat()
    );
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(*rtts.lock(), [pause], "the round trip to the first AUTH");
}
