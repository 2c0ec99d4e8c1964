//! The accept loop over real loopback sockets.

use std::io;
use std::time::Duration;

use aegis_core::metrics::testing::run;
use aegis_core::metrics::{self as m, testing};
use aegis_core::{Conn, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// Echoes until the client closes its side.
async fn echo(conn: Conn<TcpStream>) -> io::Result<()> {
    let (mut r, mut w) = tokio::io::split(conn);
    tokio::io::copy(&mut r, &mut w).await?;
    w.shutdown().await
}

/// Serves one echoed connection while `server` is polled alongside; it must not stop.
async fn echo_while_polled(
    server: &mut aegis_core::serve::ServeFuture,
    addr: std::net::SocketAddr,
) {
    tokio::select! {
        _ = server => panic!("the server stopped by itself"),
        () = async {
            let mut s = TcpStream::connect(addr).await.unwrap();
            assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
        } => {}
    }
}

/// A multi-thread runtime with two workers, as on this project's machines.
fn two_workers() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `err` is a panic whose message is `msg`.
fn assert_panicked_with(err: tokio::task::JoinError, msg: &str) {
    assert!(err.is_panic(), "not a panic: {err}");
    let payload = err.into_panic();
    assert_eq!(payload.downcast_ref::<&str>(), Some(&msg), "another panic");
}

async fn roundtrip(s: &mut TcpStream, msg: &[u8]) -> Vec<u8> {
    s.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).await.unwrap();
    got
}

#[test]
fn connection_over_the_cap_is_closed_at_once_and_serving_goes_on() {
    let ((), snap) = run(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = tower::service_fn(echo);
        tokio::spawn(serve(listener, svc).max_connections(2).into_future());

        let mut first = TcpStream::connect(addr).await.unwrap();
        let mut second = TcpStream::connect(addr).await.unwrap();
        // Both are served (the round trip proves each holds a slot).
        assert_eq!(roundtrip(&mut first, b"a").await, b"a");
        assert_eq!(roundtrip(&mut second, b"b").await, b"b");

        // The third is over the cap: refused without being served.
        let mut third = TcpStream::connect(addr).await.unwrap();
        let _ = third.write_all(b"c").await;
        let mut buf = [0u8; 1];
        let n = third.read(&mut buf).await.unwrap_or(0);
        assert_eq!(
            n, 0,
            "the connection over the cap must be refused, not served"
        );

        // A slot frees up when a connection ends, and the loop keeps serving.
        first.shutdown().await.unwrap();
        let mut rest = Vec::new();
        first.read_to_end(&mut rest).await.unwrap();
        drop(first);
        let mut fourth = loop {
            // The finished task releases its slot asynchronously: retry until served.
            let mut fourth = TcpStream::connect(addr).await.unwrap();
            fourth.write_all(b"d").await.unwrap();
            let mut buf = [0u8; 1];
            if fourth.read(&mut buf).await.unwrap_or(0) == 1 {
                assert_eq!(&buf, b"d");
                break fourth;
            }
            tokio::task::yield_now().await;
        };
        assert_eq!(roundtrip(&mut fourth, b"again").await, b"again");
        assert_eq!(roundtrip(&mut second, b"still").await, b"still");
    });
    let got = testing::capture(&snap);
    assert!(got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "over_capacity")]) >= 1);
    assert_eq!(got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "ok")]), 1);
}

/// What a new client that writes nothing gets from its first read: a connection over
/// the cap is refused at once, so this never waits long.
async fn first_read(addr: std::net::SocketAddr) -> io::Result<usize> {
    // The reset can arrive before the client's connect has returned.
    let mut s = TcpStream::connect(addr).await?;
    tokio::time::timeout(Duration::from_secs(10), s.read(&mut [0u8; 8]))
        .await
        .expect("refused at once, not left waiting")
}

/// A connection over the cap is reset (`SO_LINGER` 0), as a refusal by `admit` is: no
/// FIN exchange, and no socket left behind in `FIN_WAIT2` or `TIME_WAIT` on the server.
#[test]
fn a_connection_over_the_cap_is_reset() {
    let ((), snap) = run(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = tower::service_fn(echo);
        tokio::spawn(serve(listener, svc).max_connections(1).into_future());

        // The first holds the only place (its round trip proves it is served).
        let mut held = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut held, b"a").await, b"a");
        // The second writes nothing: reset unread, where a FIN would read as Ok(0).
        for _ in 0..2 {
            let got = first_read(addr).await;
            assert!(
                matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "a connection over the cap must be reset, got {got:?}"
            );
        }
        assert_eq!(roundtrip(&mut held, b"still").await, b"still");
    });
    let got = testing::capture(&snap);
    assert_eq!(
        got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "over_capacity")]),
        2
    );
    assert_eq!(
        got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "rejected")]),
        0
    );
}

#[test]
fn shutdown_stops_accepting_and_waits_for_open_connections() {
    let ((report, refused), _snap) = run(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, tower::service_fn(echo))
                .drain_timeout(Duration::from_secs(30))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let mut open = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut open, b"x").await, b"x");

        stop_tx.send(()).unwrap();
        // The open connection is still served while the server drains.
        assert_eq!(roundtrip(&mut open, b"during drain").await, b"during drain");
        assert!(!server.is_finished());
        // New connections are refused: the listener is closed.
        let refused = loop {
            match TcpStream::connect(addr).await {
                Err(e) => break e.kind(),
                Ok(_) => tokio::task::yield_now().await,
            }
        };
        open.shutdown().await.unwrap();
        let mut rest = Vec::new();
        open.read_to_end(&mut rest).await.unwrap();
        (server.await.unwrap(), refused)
    });
    assert_eq!(refused, io::ErrorKind::ConnectionRefused);
    assert!(report.drained());
    assert_eq!(report.aborted(), 0);
}

#[test]
fn drain_deadline_aborts_connections_that_do_not_end() {
    let ((report, waited, eof), snap) = run(true, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, tower::service_fn(echo))
                .drain_timeout(Duration::from_secs(5))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let mut stuck = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut stuck, b"x").await, b"x");
        let start = tokio::time::Instant::now();
        stop_tx.send(()).unwrap();
        let report = server.await.unwrap();
        let waited = tokio::time::Instant::now().saturating_duration_since(start);
        // The aborted connection was closed by the server.
        let mut buf = [0u8; 1];
        let eof = stuck.read(&mut buf).await.map_or(true, |n| n == 0);
        (report, waited, eof)
    });
    assert!(!report.drained());
    assert_eq!(report.aborted(), 1);
    assert_eq!(
        waited,
        Duration::from_secs(5),
        "drain waits exactly its deadline"
    );
    assert!(eof);
    assert_eq!(
        testing::counter(&snap, m::CONNECTIONS_TOTAL, &[("outcome", "aborted")]),
        1
    );
}

/// A connection whose service panics is counted `panicked`, not `aborted` (which means
/// cut at the end of a drain), and its slot comes back: the server goes on serving.
#[test]
fn a_panicking_connection_is_counted_panicked_not_aborted() {
    let (report, snap) = run(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let svc = tower::service_fn(|conn: Conn<TcpStream>| async move {
            let mut conn = conn;
            let mut b = [0u8; 1];
            conn.read_exact(&mut b).await?;
            assert!(b[0] != b'!', "a bug in a layer");
            conn.write_all(&b).await
        });
        let server = tokio::spawn(
            serve(listener, svc)
                .max_connections(1)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let mut bad = TcpStream::connect(addr).await.unwrap();
        bad.write_all(b"!").await.unwrap();
        let mut rest = Vec::new();
        // The panicking task dropped the connection: EOF (or a reset).
        let _ = bad.read_to_end(&mut rest).await;
        // Its slot came back: the only slot serves the next connection.
        let mut good = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut good, b"k").await, b"k");
        drop(good);
        stop_tx.send(()).unwrap();
        server.await.unwrap()
    });
    assert!(report.drained());
    assert_eq!(report.aborted(), 0);
    // One snapshot: a debugging snapshot drains what it reads.
    let seen = testing::capture(&snap);
    let all = ["ok", "rejected", "error", "aborted", "panicked"]
        .map(|o| seen.counter(m::CONNECTIONS_TOTAL, &[("outcome", o)]));
    assert_eq!(
        all,
        [1, 0, 0, 0, 1],
        "ok, rejected, error, aborted, panicked"
    );
}

/// The gauge counts a connection while it is open and no longer once it has ended. A
/// debugging snapshot drains what it reads (a gauge to 0), so each reading is the change
/// since the previous one and the gauge's value is the sum of the readings.
#[test]
#[allow(clippy::float_cmp, reason = "sums of whole numbers, exact in an f64")]
fn active_connections_gauge_and_outcomes_are_recorded() {
    testing::run_watching(false, |snap| async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (entered_tx, mut entered) = tokio::sync::mpsc::unbounded_channel::<()>();
        let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
            let entered_tx = entered_tx.clone();
            async move {
                let _ = entered_tx.send(());
                let mut conn = conn;
                let mut b = [0u8; 1];
                conn.read_exact(&mut b).await?;
                if b[0] == b'!' {
                    return Err(io::Error::other("client asked for an error"));
                }
                Ok(())
            }
        });
        let server = tokio::spawn(
            serve(listener, svc)
                .nodelay(true)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        // Two connections, both held by the service until their byte below.
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(TcpStream::connect(addr).await.unwrap());
            entered.recv().await.unwrap();
        }
        let mut active = testing::capture(&snap)
            .gauge(m::ACTIVE_CONNECTIONS)
            .unwrap();
        assert_eq!(active, 2.0, "two connections open");
        for (mut s, msg) in clients.into_iter().zip([b"k", b"!"]) {
            s.write_all(msg).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        }
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
        // One snapshot for everything: it drains what it reads.
        let got = testing::capture(&snap);
        assert_eq!(got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "ok")]), 1);
        assert_eq!(
            got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "error")]),
            1
        );
        active += got.gauge(m::ACTIVE_CONNECTIONS).unwrap();
        assert_eq!(active, 0.0, "every connection ended");
    });
}

/// A served connection's duration goes into `aegis_connection_duration_seconds` under
/// its outcome: on the paused clock, a connection the client holds 2.5 s records 2.5.
#[test]
fn the_connection_duration_is_recorded_under_its_outcome() {
    let ((), snap) = run(true, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, tower::service_fn(echo))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        let mut s = TcpStream::connect(addr).await.unwrap();
        // Served from here (the echo proves it), and held 2.5 s before the client ends it.
        assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).await.unwrap();
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
    });
    // One snapshot: it drains what it reads.
    let got = testing::capture(&snap);
    let duration = |o| got.histogram(m::CONNECTION_DURATION_SECONDS, &[("outcome", o)]);
    assert_eq!(duration("ok"), Some(vec![2.5]));
    // Every outcome's series is there from the start, with nothing recorded.
    for o in ["rejected", "error", "aborted", "panicked"] {
        assert_eq!(duration(o), Some(vec![]), "{o}");
    }
}

/// The connection metrics are looked up in the recorder once per server, not once per
/// connection: each lookup is a hash and, with the Prometheus recorder, an allocation.
#[test]
fn connection_metrics_are_registered_once_per_server() {
    const CONNECTIONS: u64 = 6;
    let ((), snap, registered) = testing::run_counting(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, tower::service_fn(echo))
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        for _ in 0..CONNECTIONS {
            let mut s = TcpStream::connect(addr).await.unwrap();
            assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
        }
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
    });
    let got = testing::capture(&snap);
    assert_eq!(
        got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "ok")]),
        CONNECTIONS
    );
    assert_eq!(got.gauge(m::ACTIVE_CONNECTIONS), Some(0.0));
    // One handle per outcome label (`ok`, `rejected`, `error`, `aborted`, `panicked`,
    // `over_capacity`), one gauge, one histogram per outcome of a served connection
    // (all registered when the loop starts): whatever the count of connections.
    assert_eq!(registered.of(m::CONNECTIONS_TOTAL), 6);
    assert_eq!(registered.of(m::ACTIVE_CONNECTIONS), 1);
    assert_eq!(registered.of(m::CONNECTION_DURATION_SECONDS), 5);
}

/// A loopback listener; with `nodelay`, `TCP_NODELAY` is set on it before it listens.
fn listener(nodelay: bool) -> TcpListener {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_nodelay(nodelay).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(64).unwrap()
}

#[tokio::test]
async fn accepted_streams_have_tcp_nodelay_when_asked_or_passed_on_by_the_listener() {
    // (set on the listener before it listens, asked of serve): the accept loop sets it
    // per stream unless the listener passes it on (Linux). Not asked, it never clears
    // it: a listener that has it passes it on all the same.
    let inherits = cfg!(target_os = "linux");
    for (on_listener, asked) in [(false, true), (true, true), (false, false), (true, false)] {
        let listener = listener(on_listener);
        assert_eq!(
            aegis_core::serve::Listener::accepts_nodelay(&listener),
            on_listener && inherits
        );
        let expected = asked || (on_listener && inherits);
        if on_listener && !asked && !inherits {
            // What the stream inherits there is the system's business.
            continue;
        }
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
            let tx = tx.clone();
            async move {
                tx.send(conn.get_ref().nodelay()?).unwrap();
                Ok::<_, io::Error>(())
            }
        });
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, svc)
                .nodelay(asked)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        for _ in 0..3 {
            let _s = TcpStream::connect(addr).await.unwrap();
            assert_eq!(rx.recv().await.unwrap(), expected, "{on_listener} {asked}");
        }
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
    }
}

#[derive(Debug, thiserror::Error)]
#[error("refused source address")]
struct Refused;

impl aegis_core::error::Reject for Refused {
    fn layer(&self) -> &'static str {
        "test"
    }
    fn label(&self) -> &'static str {
        "refused_addr"
    }
}

/// A connection to `addr` from `source` (any port).
async fn connect_from(source: &str, addr: std::net::SocketAddr) -> TcpStream {
    try_connect_from(source, addr).await.unwrap()
}

/// [`connect_from`], with the connect's error.
async fn try_connect_from(source: &str, addr: std::net::SocketAddr) -> io::Result<TcpStream> {
    let s = tokio::net::TcpSocket::new_v4()?;
    s.bind(format!("{source}:0").parse().unwrap())?;
    s.connect(addr).await
}

#[test]
fn admit_refuses_before_the_service_and_counts_the_refusal() {
    let (calls, snap) = run(false, || async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let count = std::sync::Arc::clone(&calls);
        let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            echo(conn)
        });
        let refused: std::net::IpAddr = "127.0.0.2".parse().unwrap();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = tokio::spawn(
            serve(listener, svc)
                .admit(move |peer| {
                    if peer.ip() == refused {
                        return Err(aegis_core::error::reject(Refused).into());
                    }
                    Ok(())
                })
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .into_future(),
        );
        for _ in 0..3 {
            // Reset at once (`SO_LINGER` 0): no echo, no FIN exchange, no TIME_WAIT. The
            // reset can arrive before the client's connect has returned.
            let got = match try_connect_from("127.0.0.2", addr).await {
                Ok(mut s) => s.read(&mut [0u8; 8]).await,
                Err(e) => Err(e),
            };
            assert!(
                matches!(&got, Err(e) if e.kind() == io::ErrorKind::ConnectionReset),
                "a refused connection must be reset, got {got:?}"
            );

            let mut s = connect_from("127.0.0.1", addr).await;
            assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
        }
        stop_tx.send(()).unwrap();
        assert!(server.await.unwrap().drained());
        calls.load(std::sync::atomic::Ordering::Relaxed)
    });
    assert_eq!(calls, 3, "the service saw only the admitted connections");
    let got = testing::capture(&snap);
    assert_eq!(
        got.counter(m::CONNECTIONS_TOTAL, &[("outcome", "rejected")]),
        3
    );
    assert_eq!(
        got.counter(
            m::REJECTIONS_TOTAL,
            &[("layer", "test"), ("reason", "refused_addr")]
        ),
        3
    );
    assert_eq!(got.gauge(m::ACTIVE_CONNECTIONS), Some(0.0));
}

/// A multi-thread runtime's `block_on` future runs on the calling thread, which is not
/// a worker: the accept loop must not run there (each connection would cost two
/// cross-thread wake-ups). `admit` runs inside the loop, so it tells where the loop is.
#[test]
fn the_accept_loop_runs_on_a_worker_not_on_the_awaiting_thread() {
    let rt = two_workers();
    let caller = std::thread::current().id();
    let loop_thread = rt.block_on(async {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let server = serve(listener, tower::service_fn(echo))
            .admit(move |_| {
                let _ = seen_tx.send(std::thread::current().id());
                Ok(())
            })
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            });
        let client = async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
            stop_tx.send(()).unwrap();
        };
        // Awaited right here, in `block_on`, as a `#[tokio::main]` body would.
        let (report, ()) = tokio::join!(server, client);
        assert!(report.drained());
        seen_rx.recv().unwrap()
    });
    assert_ne!(
        loop_thread, caller,
        "the accept loop ran on the block_on thread"
    );
}

/// Dropping the server's future closes the listener at once and stops the loop,
/// although the loop runs as a task of its own.
#[tokio::test]
async fn dropping_the_server_future_closes_the_listener() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut server = serve(listener, tower::service_fn(echo)).into_future();
    // Serving: a connection is echoed while the future is polled alongside.
    echo_while_polled(&mut server, addr).await;
    drop(server);
    // Closed at once, though the loop's task has not run since: the address can be
    // bound again right away (a reload that rebinds, say).
    let again = TcpListener::bind(addr).await;
    assert!(again.is_ok(), "the listener is still open: {again:?}");
}

/// A panic inside the accept loop's task is not swallowed: it resumes where the server
/// is awaited.
#[tokio::test]
#[should_panic(expected = "admit exploded")]
async fn a_panic_in_the_accept_loop_reaches_the_caller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = serve(listener, tower::service_fn(echo)).admit(|_| panic!("admit exploded"));
    let _client = tokio::spawn(TcpStream::connect(addr));
    server.await;
}

/// The shutdown signal waits in a task of its own: the loop does not poll it again at
/// every connection it accepts (the mqtt-gateway's two `tokio::signal` streams cost
/// about 190 instructions a poll each).
#[tokio::test]
async fn the_shutdown_signal_is_not_polled_per_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let polls = Arc::new(AtomicUsize::new(0));
    let (stop_tx, mut stop_rx) = oneshot::channel::<()>();
    let signal = {
        let polls = Arc::clone(&polls);
        std::future::poll_fn(move |cx| {
            polls.fetch_add(1, Ordering::Relaxed);
            std::pin::Pin::new(&mut stop_rx).poll(cx).map(drop)
        })
    };
    let server = tokio::spawn(
        serve(listener, tower::service_fn(echo))
            .with_graceful_shutdown(signal)
            .into_future(),
    );
    let mut first = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut first, b"hi").await, b"hi");
    drop(first);
    // Polled when the server started (once to see whether it is ready at once, once
    // in its task), and not since: nothing woke it.
    let at_start = polls.load(Ordering::Relaxed);
    assert!(at_start <= 2, "polled {at_start} times to start");
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        assert_eq!(roundtrip(&mut s, b"hi").await, b"hi");
    }
    assert_eq!(
        polls.load(Ordering::Relaxed),
        at_start,
        "polled per connection"
    );
    stop_tx.send(()).unwrap();
    let report = server.await.unwrap();
    assert!(report.drained());
    assert_eq!(polls.load(Ordering::Relaxed), at_start + 1);
    // The loop stopped accepting when the signal fired.
    assert!(TcpStream::connect(addr).await.is_err());
}

/// A panic in the shutdown signal stops the loop as the signal would, and resumes where
/// the server is awaited once the open connections are drained.
#[tokio::test]
async fn a_panic_in_the_signal_drains_then_reaches_the_caller() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (go_tx, go_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        serve(listener, tower::service_fn(echo))
            .with_graceful_shutdown(async {
                let _ = go_rx.await;
                panic!("signal exploded");
            })
            .into_future(),
    );
    // A connection open when the signal panics is still served, then drained.
    let mut open = TcpStream::connect(addr).await.unwrap();
    assert_eq!(roundtrip(&mut open, b"hi").await, b"hi");
    go_tx.send(()).unwrap();
    // Refused once the loop has stopped; the open connection still echoes.
    while TcpStream::connect(addr).await.is_ok() {
        tokio::task::yield_now().await;
    }
    assert_eq!(roundtrip(&mut open, b"still").await, b"still");
    assert!(
        !server.is_finished(),
        "did not wait for the open connection"
    );
    drop(open);
    assert_panicked_with(server.await.unwrap_err(), "signal exploded");
}

/// On a multi-thread runtime the signal's task may still be unwinding when the loop sees
/// it gone and finishes (nothing to drain): its panic still reaches the caller, every
/// time.
#[test]
fn a_panic_in_the_signal_reaches_the_caller_on_a_multi_thread_runtime() {
    let rt = two_workers();
    for _ in 0..50 {
        let err = rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = serve(listener, tower::service_fn(echo))
                .with_graceful_shutdown(async {
                    // Not ready at once: the panic happens in the signal's own task.
                    tokio::task::yield_now().await;
                    panic!("signal exploded");
                })
                .into_future();
            tokio::spawn(server).await.unwrap_err()
        });
        assert_panicked_with(err, "signal exploded");
    }
}

/// A signal that is ready at once stops the loop before it accepts anything, even a
/// connection already waiting in the listener's backlog, on a multi-thread runtime too.
#[test]
fn a_signal_ready_at_once_stops_the_loop_before_any_accept() {
    let rt = two_workers();
    for _ in 0..20 {
        rt.block_on(async {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            // In the backlog before the server runs (the kernel completes the handshake).
            let mut waiting = TcpStream::connect(addr).await.unwrap();
            let served = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let seen = std::sync::Arc::clone(&served);
            let report = serve(
                listener,
                tower::service_fn(move |conn: Conn<TcpStream>| {
                    seen.store(true, std::sync::atomic::Ordering::SeqCst);
                    echo(conn)
                }),
            )
            .with_graceful_shutdown(std::future::ready(()))
            .await;
            assert!(report.drained());
            assert!(!served.load(std::sync::atomic::Ordering::SeqCst));
            // The listener is closed with the connection unaccepted: no echo comes back.
            let _ = waiting.write_all(b"hi").await;
            let mut buf = [0u8; 2];
            assert!(!matches!(waiting.read(&mut buf).await, Ok(n) if n > 0));
        });
    }
}

/// Dropping the server's future aborts the signal's task too: the signal future is
/// dropped, with whatever it holds.
#[tokio::test]
async fn dropping_the_server_future_drops_the_signal() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (guard, dropped) = oneshot::channel::<()>();
    let mut server = serve(listener, tower::service_fn(echo))
        .with_graceful_shutdown(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        })
        .into_future();
    echo_while_polled(&mut server, addr).await;
    drop(server);
    // The aborted task drops its future, and the guard in it, when the runtime next
    // gets to it; a bound so that a task left running fails the test instead of hanging.
    let gone = tokio::time::timeout(Duration::from_secs(10), dropped).await;
    assert!(
        matches!(gone, Ok(Err(_))),
        "the signal outlived the server: {gone:?}"
    );
}

/// Each connection's local address is the one its client dialled, whether the listener
/// is bound to that address (the loop then takes it from the listener, without asking
/// each socket) or to the wildcard address (it asks each socket).
#[tokio::test]
async fn each_connection_carries_the_local_address_its_client_dialled() {
    use aegis_core::{LocalAddr, Param, PeerAddr};

    for bind in ["127.0.0.1:0", "0.0.0.0:0"] {
        let listener = TcpListener::bind(bind).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let svc = tower::service_fn(move |conn: Conn<TcpStream>| {
            let tx = tx.clone();
            async move {
                let local = Param::<LocalAddr>::param(&conn).0;
                let peer = Param::<PeerAddr>::param(&conn).0;
                tx.send((local, peer)).unwrap();
                Ok::<_, io::Error>(())
            }
        });
        let server = tokio::spawn(serve(listener, svc).into_future());
        let dialled: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
        let client = TcpStream::connect(dialled).await.unwrap();
        let (local, peer) = rx.recv().await.unwrap();
        assert_eq!(local, dialled, "bound to {bind}");
        assert_eq!(local, client.peer_addr().unwrap(), "bound to {bind}");
        assert_eq!(peer, client.local_addr().unwrap(), "bound to {bind}");
        server.abort();
    }
}
