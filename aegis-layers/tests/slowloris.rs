//! Behaviour of the slowloris layer: each clock and its label, trickling clients, the
//! handshake switch, healthy clients, params, and cuts over real loopback sockets.
#![cfg(feature = "slowloris")]

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use aegis_core::error::{find, label_of};
use aegis_core::metrics::REJECTIONS_TOTAL;
use aegis_core::metrics::testing::{Captured, capture, run};
use aegis_core::{BoxError, ClientAddr, Conn, Handshake, LocalAddr, Param, PeerAddr};
use aegis_layers::slowloris::error::{Clock, Elapsed};
use aegis_layers::slowloris::{MinRate, SlowlorisIo, SlowlorisLayer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{Instant, sleep, timeout};
use tower::{Layer, Service, ServiceExt, service_fn};

const S: Duration = Duration::from_secs(1);

fn peer() -> SocketAddr {
    "192.0.2.7:40000".parse().unwrap()
}

fn local() -> SocketAddr {
    "127.0.0.1:1883".parse().unwrap()
}

fn conn<I>(io: I) -> Conn<I> {
    Conn::new(io, peer(), local())
}

/// Reads until EOF and never ends the handshake.
async fn drain<I: AsyncRead + Unpin>(mut io: I) -> io::Result<()> {
    let mut buf = [0; 256];
    while io.read(&mut buf).await? > 0 {}
    Ok(())
}

/// Reads an `n`-byte handshake, completes it, then reads until EOF.
fn handshake_after<I>(
    n: usize,
) -> impl Fn(I) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Clone
where
    I: AsyncRead + Param<Handshake> + Unpin + Send + 'static,
{
    move |mut io: I| {
        Box::pin(async move {
            let mut hello = vec![0; n];
            io.read_exact(&mut hello).await?;
            Param::<Handshake>::param(&io).complete();
            drain(io).await
        })
    }
}

/// The `Elapsed` inside a rejection, with its labels checked to be the layer's.
fn elapsed(err: &BoxError) -> &Elapsed {
    let e = find::<Elapsed>(&**err).unwrap_or_else(|| panic!("not a slowloris cut: {err}"));
    assert_eq!(label_of(&**err), ("slowloris", e.clock().label()), "{err}");
    e
}

/// Writes one byte every `every` until the server end is gone; returns bytes written.
async fn trickle(mut client: DuplexStream, every: Duration, bytes: usize) -> usize {
    let mut sent = 0;
    let chunk = vec![b'x'; bytes];
    while client.write_all(&chunk).await.is_ok() {
        sent += bytes;
        sleep(every).await;
    }
    sent
}

/// Asserts that the server end of `client` is gone: a read sees EOF or an error within a
/// second (on the paused clock, a stream still open fails here instead of hanging).
///
/// Only meaningful while something could still hold the server end: after `oneshot` (or a
/// spawned task) returned, the service's future and the stream are dropped anyway.
async fn assert_closed(client: &mut DuplexStream) {
    let mut b = [0; 1];
    let read = timeout(S, client.read(&mut b))
        .await
        .expect("the server end is still open after a second");
    assert_eq!(read.unwrap_or(0), 0, "the server end sent data");
}

/// The cut and its error. That the stream is dropped at the cut, while the layer's
/// future is still alive:
/// `a_cut_drops_the_inner_future_before_the_caller_drops_the_layer_future`. That a real
/// socket closes then: `over_loopback_a_silent_client_is_closed_at_the_first_byte_deadline`.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn silent_client_is_cut_at_the_first_byte_deadline() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .handshake_timeout(30 * S)
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let (_client, server) = tokio::io::duplex(64); // held open: silent, not closed
    let start = Instant::now();
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 5 * S);
    let e = elapsed(&err);
    assert_eq!(e.clock(), Clock::FirstByte);
    assert_eq!(
        (e.elapsed(), e.received(), e.after_handshake()),
        (5 * S, 0, false)
    );
    assert_eq!(
        err.to_string(),
        "first-byte timeout after 5s (0 bytes received)"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_that_stops_after_one_byte_is_cut_by_the_idle_clock() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .idle_timeout(3 * S)
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let (mut client, server) = tokio::io::duplex(64);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(conn(server)));
    sleep(S).await;
    client.write_all(b"x").await.unwrap();
    let err = task.await.unwrap().unwrap_err();
    // The idle clock runs from the byte at 1 s, and it replaced the first-byte clock.
    assert_eq!(Instant::now().saturating_duration_since(start), 4 * S);
    assert_eq!(elapsed(&err).clock(), Clock::Idle);
    assert_eq!(elapsed(&err).received(), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn one_byte_every_few_seconds_does_not_outlive_the_total_deadline() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .idle_timeout(5 * S)
        .handshake_timeout(10 * S)
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let (client, server) = tokio::io::duplex(64);
    let start = Instant::now();
    let writer = tokio::spawn(trickle(client, 3 * S, 1));
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 10 * S);
    let e = elapsed(&err);
    assert_eq!((e.clock(), e.received()), (Clock::Total, 4)); // bytes at 0, 3, 6, 9 s
    assert_eq!(
        writer.await.unwrap(),
        4,
        "the writer saw the connection close"
    );
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_trickling_one_byte_per_second_is_cut_by_the_rate_rule() {
    // mod_reqtimeout's `header=20-40,MinRate=500`.
    let svc = SlowlorisLayer::new()
        .idle_timeout(5 * S)
        .handshake_timeout(40 * S)
        .min_rate(MinRate::new(500, 20 * S))
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let (client, server) = tokio::io::duplex(64);
    let start = Instant::now();
    let writer = tokio::spawn(trickle(client, S, 1));
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    // Bytes at 0..=20 s: 21 bytes, so the deadline is 20 s + 21/500 s = 20.042 s.
    let took = Instant::now().saturating_duration_since(start);
    assert_eq!(took, Duration::from_millis(20_042));
    let e = elapsed(&err);
    assert_eq!((e.clock(), e.received()), (Clock::MinRate, 21));
    assert_eq!(writer.await.unwrap(), 21);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_client_above_the_minimum_rate_is_cut_only_at_the_cap() {
    let svc = SlowlorisLayer::new()
        .handshake_timeout(40 * S)
        .min_rate(MinRate::new(500, 20 * S))
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let (client, server) = tokio::io::duplex(1024);
    let start = Instant::now();
    // 600 B/s: the rate deadline (20 s + 1.2 s per second) always stays ahead.
    let writer = tokio::spawn(trickle(client, S / 10, 60));
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 40 * S);
    assert_eq!(elapsed(&err).clock(), Clock::Total);
    writer.await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_total_deadline_fires_even_when_nobody_reads_the_stream() {
    // The inner future reads one byte, then waits forever without touching the stream.
    let svc = SlowlorisLayer::new()
        .handshake_timeout(10 * S)
        .layer(service_fn(
            |mut io: SlowlorisIo<Conn<DuplexStream>>| async move {
                let mut b = [0; 1];
                io.read_exact(&mut b).await?;
                std::future::pending::<()>().await;
                Ok::<_, io::Error>(())
            },
        ));
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(b"x").await.unwrap();
    let start = Instant::now();
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 10 * S);
    assert_eq!(elapsed(&err).clock(), Clock::Total);
}

/// Sets its flag when dropped.
struct DropFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_cut_drops_the_inner_future_before_the_caller_drops_the_layer_future() {
    let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = dropped.clone();
    let mut svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .layer(service_fn(move |io: SlowlorisIo<Conn<DuplexStream>>| {
            let guard = DropFlag(flag.clone());
            async move {
                let _guard = guard;
                drain(io).await
            }
        }));
    let (mut client, server) = tokio::io::duplex(64);
    let mut fut = std::pin::pin!(svc.ready().await.unwrap().call(conn(server)));
    let err = std::future::poll_fn(|cx| fut.as_mut().poll(cx))
        .await
        .unwrap_err();
    assert_eq!(elapsed(&err).clock(), Clock::FirstByte);
    // The layer's future is still alive here, but the inner one and the stream are gone.
    assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    assert_closed(&mut client).await;
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn after_the_handshake_no_clock_runs_by_default() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .idle_timeout(3 * S)
        .handshake_timeout(10 * S)
        .min_rate(MinRate::new(500, 5 * S))
        .layer(service_fn(
            handshake_after::<SlowlorisIo<Conn<DuplexStream>>>(5),
        ));
    let (mut client, server) = tokio::io::duplex(64);
    let task = tokio::spawn(svc.oneshot(conn(server)));
    client.write_all(b"hel").await.unwrap();
    sleep(2 * S).await;
    client.write_all(b"lo").await.unwrap();
    // An hour of silence, far past every handshake clock: still served.
    sleep(3600 * S).await;
    assert!(!task.is_finished(), "cut after the handshake was complete");
    client.write_all(b"bye").await.unwrap();
    drop(client);
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn after_the_handshake_only_the_idle_clock_runs_when_set() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .handshake_timeout(10 * S)
        .idle_timeout_after_handshake(60 * S)
        .layer(service_fn(
            handshake_after::<SlowlorisIo<Conn<DuplexStream>>>(5),
        ));
    let (mut client, server) = tokio::io::duplex(64);
    let start = Instant::now();
    let task = tokio::spawn(svc.oneshot(conn(server)));
    sleep(S).await;
    client.write_all(b"hello").await.unwrap();
    // Past the total deadline, data keeps the connection alive...
    for _ in 0..3 {
        sleep(50 * S).await;
        client.write_all(b"ping").await.unwrap();
    }
    // ...and 60 s of silence after the last byte (at 151 s) cuts it.
    let err = task.await.unwrap().unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 211 * S);
    let e = elapsed(&err);
    assert_eq!(
        (e.clock(), e.after_handshake(), e.received()),
        (Clock::Idle, true, 17)
    );
}

/// With no clock during the handshake, the layer still starts the idle clock at its
/// end (the future must not give up its clocks while one may apply later).
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn an_idle_clock_after_the_handshake_alone_starts_at_its_end() {
    let svc = SlowlorisLayer::new()
        .idle_timeout_after_handshake(60 * S)
        .layer(service_fn(
            handshake_after::<SlowlorisIo<Conn<DuplexStream>>>(5),
        ));
    let (mut client, server) = tokio::io::duplex(64);
    let start = Instant::now();
    let mut task = tokio::spawn(svc.oneshot(conn(server)));
    // No clock before the handshake ends: an hour before the first byte is allowed.
    assert!(
        timeout(3600 * S, &mut task).await.is_err(),
        "cut during the handshake"
    );
    client.write_all(b"hel").await.unwrap();
    sleep(S).await;
    client.write_all(b"lo").await.unwrap();
    // The handshake ended at 3601 s; 60 s of silence after it cut.
    let err = timeout(3600 * S, task)
        .await
        .expect("the idle clock after the handshake never fired")
        .unwrap()
        .unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 3661 * S);
    let e = elapsed(&err);
    assert_eq!(
        (e.clock(), e.after_handshake(), e.received()),
        (Clock::Idle, true, 5)
    );
}

/// Reads a 5-byte handshake, completes it, writes `count` chunks of `chunk` bytes to
/// the client `every` apart (a long response to a client that sends nothing), then
/// reads until EOF.
fn respond_slowly<I>(
    every: Duration,
    count: usize,
    chunk: usize,
) -> impl Fn(I) -> Pin<Box<dyn Future<Output = io::Result<()>> + Send>> + Clone
where
    I: AsyncRead + AsyncWrite + Param<Handshake> + Unpin + Send + 'static,
{
    move |mut io: I| {
        Box::pin(async move {
            let mut hello = [0; 5];
            io.read_exact(&mut hello).await?;
            Param::<Handshake>::param(&io).complete();
            for _ in 0..count {
                sleep(every).await;
                io.write_all(&vec![b'x'; chunk]).await?;
            }
            drain(io).await
        })
    }
}

/// Reads `client` to its end in a task: the bytes.
fn read_all(mut client: DuplexStream) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut buf = [0; 256];
        let mut n = 0;
        while let Ok(k @ 1..) = client.read(&mut buf).await {
            n += k;
        }
        n
    })
}

/// After the handshake, a server writing a long response to a client that reads it and
/// sends nothing was cut at the idle timeout: only reads counted. With
/// `writes_are_activity` each write resets the idle clock, and the clock cuts 60 s after
/// the last one; without it (the default) the first 60 s cut, as before.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn with_writes_as_activity_a_long_response_keeps_the_connection_after_the_handshake() {
    for on in [true, false] {
        let svc = SlowlorisLayer::new()
            .first_byte_timeout(5 * S)
            .handshake_timeout(10 * S)
            .idle_timeout_after_handshake(60 * S)
            .writes_are_activity(on)
            .layer(service_fn(
                respond_slowly::<SlowlorisIo<Conn<DuplexStream>>>(25 * S, 10, 1),
            ));
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"hello").await.unwrap();
        let start = Instant::now();
        let task = tokio::spawn(svc.oneshot(conn(server)));
        let read = read_all(client);
        let err = task.await.unwrap().unwrap_err();
        let took = Instant::now().saturating_duration_since(start);
        let e = elapsed(&err);
        assert_eq!(
            (e.clock(), e.after_handshake(), e.received()),
            (Clock::Idle, true, 5),
            "writes_are_activity({on})"
        );
        if on {
            // Ten writes 25 s apart kept it; 60 s after the last (at 250 s) cut.
            assert_eq!(took, 310 * S, "writes_are_activity(true)");
            assert_eq!(read.await.unwrap(), 10);
        } else {
            // Cut 60 s after the handshake, after the writes at 25 s and 50 s.
            assert_eq!(took, 60 * S, "writes_are_activity(false)");
            assert_eq!(read.await.unwrap(), 2);
        }
    }
}

/// Writes count only when they make progress: a client that stops reading stalls them
/// once the pipe is full, and is cut 60 s after the last write that took bytes. And
/// during the handshake writes do not count: the handshake's idle clock cuts a client
/// that sends nothing, however much the server writes to it.
#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn writes_as_activity_need_progress_and_do_not_count_during_the_handshake() {
    let svc = SlowlorisLayer::new()
        .idle_timeout_after_handshake(60 * S)
        .writes_are_activity(true)
        .layer(service_fn(
            respond_slowly::<SlowlorisIo<Conn<DuplexStream>>>(10 * S, 10, 32),
        ));
    let (mut client, server) = tokio::io::duplex(64);
    client.write_all(b"hello").await.unwrap();
    let start = Instant::now();
    // The client never reads: the writes at 10 s and 20 s fill the pipe, the third stalls.
    let err = svc.oneshot(conn(server)).await.unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), 80 * S);
    assert_eq!(
        (elapsed(&err).clock(), elapsed(&err).after_handshake()),
        (Clock::Idle, true)
    );
    drop(client);

    let svc = SlowlorisLayer::new()
        .idle_timeout(S * 7 / 2)
        .idle_timeout_after_handshake(60 * S)
        .writes_are_activity(true)
        .layer(service_fn(
            |mut io: SlowlorisIo<Conn<DuplexStream>>| async move {
                // Writes every second and never reads the handshake.
                loop {
                    sleep(S).await;
                    io.write_all(b"x").await?;
                }
                #[allow(unreachable_code)]
                Ok::<_, io::Error>(())
            },
        ));
    let (client, server) = tokio::io::duplex(64);
    let read = read_all(client);
    let start = Instant::now();
    let err = timeout(3600 * S, svc.oneshot(conn(server)))
        .await
        .expect("the server's writes kept the handshake alive")
        .unwrap_err();
    assert_eq!(Instant::now().saturating_duration_since(start), S * 7 / 2);
    assert_eq!(
        (elapsed(&err).clock(), elapsed(&err).after_handshake()),
        (Clock::Idle, false)
    );
    assert_eq!(read.await.unwrap(), 3, "the writes before the cut went out");
}

/// Starts `n` connections at once, each a held-open silent client of `svc`, and
/// returns when each was cut (from the start) with the cut's error.
async fn cut_together<S>(svc: S, n: usize) -> Vec<(Duration, BoxError)>
where
    S: Service<Conn<DuplexStream>, Response = (), Error = BoxError> + Clone + Send + 'static,
    S::Future: Send,
{
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..n {
        let (client, server) = tokio::io::duplex(64);
        clients.push(client); // held open: silent, not closed
        let svc = svc.clone();
        tasks.push(tokio::spawn(async move {
            let err = svc.oneshot(conn(server)).await.unwrap_err();
            (Instant::now().saturating_duration_since(start), err)
        }));
    }
    let mut cuts = Vec::new();
    for t in tasks {
        cuts.push(t.await.unwrap());
    }
    cuts
}

/// Distinct milliseconds among the cut times.
fn distinct_ms(cuts: &[(Duration, BoxError)]) -> usize {
    let mut ms: Vec<u128> = cuts.iter().map(|c| c.0.as_millis()).collect();
    ms.sort_unstable();
    ms.dedup();
    ms.len()
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_jitter_spreads_the_cuts_of_connections_opened_together() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(10 * S)
        .handshake_timeout(20 * S)
        .jitter(S)
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let cuts = cut_together(svc, 64).await;
    for (at, err) in &cuts {
        // Never after the deadline, at most the jitter before it.
        assert!(*at >= 9 * S && *at <= 10 * S, "cut at {at:?}");
        let e = elapsed(err);
        assert_eq!(e.clock(), Clock::FirstByte);
        // The error tells the time the connection actually had.
        assert_eq!(e.elapsed(), *at);
    }
    // 64 draws over 1,000 ms; without the jitter all 64 fall on 10 s.
    let distinct = distinct_ms(&cuts);
    assert!(distinct >= 32, "{distinct} distinct cut times");
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_jitter_takes_at_most_half_the_shortest_clock() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(2 * S)
        .handshake_timeout(30 * S)
        .jitter(60 * S)
        .layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
    let cuts = cut_together(svc, 32).await;
    assert!(
        cuts.iter().all(|c| c.0 >= S && c.0 <= 2 * S),
        "{:?}",
        cuts.iter().map(|c| c.0).collect::<Vec<_>>()
    );
    // Capped, but still spread over the second it was capped to.
    assert!(cuts.iter().any(|c| c.0 < Duration::from_millis(1900)));
    assert!(distinct_ms(&cuts) >= 16);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_idle_clock_after_the_handshake_is_not_jittered() {
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(10 * S)
        .idle_timeout_after_handshake(5 * S)
        .jitter(2 * S)
        .layer(service_fn(
            handshake_after::<SlowlorisIo<Conn<DuplexStream>>>(5),
        ));
    let start = Instant::now();
    let mut tasks = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..16 {
        let (mut client, server) = tokio::io::duplex(64);
        client.write_all(b"hello").await.unwrap();
        clients.push(client);
        tasks.push(tokio::spawn(svc.clone().oneshot(conn(server))));
    }
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert_eq!(Instant::now().saturating_duration_since(start), 5 * S);
        let e = elapsed(&err);
        assert_eq!((e.clock(), e.after_handshake()), (Clock::Idle, true));
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn a_healthy_client_split_anywhere_is_never_cut() {
    const MSG: &[u8] = b"CONNECT mqtt 5.0";
    let layer = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .idle_timeout(3 * S)
        .handshake_timeout(10 * S)
        .min_rate(MinRate::new(1, 8 * S));
    for i in 1..MSG.len() {
        let io = tokio_test::io::Builder::new()
            .wait(4 * S)
            .read(&MSG[..i])
            .wait(Duration::from_millis(2900))
            .read(&MSG[i..])
            .wait(3600 * S) // silent after the handshake, then EOF
            .build();
        let svc = layer.layer(service_fn(handshake_after::<
            SlowlorisIo<Conn<tokio_test::io::Mock>>,
        >(MSG.len())));
        let start = Instant::now();
        svc.oneshot(conn(io))
            .await
            .unwrap_or_else(|e| panic!("split at {i}: {e}"));
        assert_eq!(
            Instant::now().saturating_duration_since(start),
            Duration::from_millis(3_606_900)
        );
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn the_inner_service_sees_the_addresses_and_a_tracked_handshake() {
    let svc = SlowlorisLayer::new().layer(service_fn(
        |io: SlowlorisIo<Conn<DuplexStream>>| async move {
            assert_eq!(Param::<PeerAddr>::param(&io), PeerAddr(peer()));
            assert_eq!(Param::<LocalAddr>::param(&io), LocalAddr(local()));
            assert_eq!(Param::<ClientAddr>::param(&io), ClientAddr(peer()));
            let hs = Param::<Handshake>::param(&io);
            assert!(hs.is_tracked() && !hs.is_complete());
            hs.complete();
            assert!(Param::<Handshake>::param(&io).is_complete());
            Ok::<_, io::Error>(())
        },
    ));
    let (_client, server) = tokio::io::duplex(64);
    svc.oneshot(conn(server)).await.unwrap();
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn nested_layers_share_one_handshake() {
    // The outer layer's total clock would cut at 10 s unless the inner layer's handle is
    // the outer one's.
    let inner = SlowlorisLayer::new()
        .handshake_timeout(20 * S)
        .layer(service_fn(handshake_after::<
            SlowlorisIo<SlowlorisIo<Conn<DuplexStream>>>,
        >(2)));
    let svc = SlowlorisLayer::new().handshake_timeout(10 * S).layer(inner);
    let (mut client, server) = tokio::io::duplex(64);
    let task = tokio::spawn(svc.oneshot(conn(server)));
    client.write_all(b"hi").await.unwrap();
    sleep(60 * S).await;
    assert!(!task.is_finished());
    drop(client);
    task.await.unwrap().unwrap();
}

/// A stream that supports vectored writes, to check the wrapper forwards them.
struct Vectored(Vec<u8>);

impl AsyncRead for Vectored {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Vectored {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, _: &[u8]) -> Poll<io::Result<usize>> {
        unreachable!("vectored writes must be forwarded as such")
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        for b in bufs {
            self.0.extend_from_slice(b);
        }
        Poll::Ready(Ok(n))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn vectored_writes_reach_the_inner_stream() {
    let svc = SlowlorisLayer::new().layer(service_fn(
        |mut io: SlowlorisIo<Conn<Vectored>>| async move {
            assert!(io.is_write_vectored());
            let bufs = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
            assert_eq!(io.write_vectored(&bufs).await?, 4);
            assert_eq!(io.get_ref().get_ref().0, b"abcd");
            Ok::<_, io::Error>(())
        },
    ));
    svc.oneshot(conn(Vectored(Vec::new()))).await.unwrap();
}

/// Runs `fut` on a paused current-thread runtime with a local metrics recorder.
fn with_metrics<T>(fut: impl Future<Output = T>) -> (T, Captured) {
    let (out, snap) = run(true, || fut);
    (out, capture(&snap))
}

fn cuts(m: &Captured, reason: &str) -> u64 {
    m.counter(
        REJECTIONS_TOTAL,
        &[("layer", "slowloris"), ("reason", reason)],
    )
}

#[test]
fn each_clock_counts_its_own_label_and_healthy_clients_count_none() {
    let layer = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .idle_timeout(3 * S)
        .handshake_timeout(40 * S)
        .min_rate(MinRate::new(500, 20 * S))
        .idle_timeout_after_handshake(60 * S);
    let ((), m) = with_metrics(async move {
        let svc = layer.layer(service_fn(
            handshake_after::<SlowlorisIo<Conn<DuplexStream>>>(5),
        ));
        let mut tasks = Vec::new();
        let mut clients = Vec::new();
        // first_byte: silent.
        let (c, s) = tokio::io::duplex(64);
        tasks.push(tokio::spawn(svc.clone().oneshot(conn(s))));
        clients.push(c);
        // idle: one byte, then silence.
        let (mut c, s) = tokio::io::duplex(64);
        c.write_all(b"h").await.unwrap();
        tasks.push(tokio::spawn(svc.clone().oneshot(conn(s))));
        clients.push(c);
        // min_rate: one byte per second, to a service that never ends the handshake.
        let never = layer.layer(service_fn(drain::<SlowlorisIo<Conn<DuplexStream>>>));
        let (c, s) = tokio::io::duplex(64);
        tasks.push(tokio::spawn(never.clone().oneshot(conn(s))));
        tokio::spawn(trickle(c, S, 1));
        // total: 600 B/s of handshake that never ends.
        let (c, s) = tokio::io::duplex(1024);
        let total = tokio::spawn(never.oneshot(conn(s)));
        tokio::spawn(trickle(c, S / 10, 60));
        // idle after the handshake: complete, then silence.
        let (mut c, s) = tokio::io::duplex(64);
        c.write_all(b"hello").await.unwrap();
        tasks.push(tokio::spawn(svc.clone().oneshot(conn(s))));
        clients.push(c);
        // healthy: completes, then closes.
        let (mut c, s) = tokio::io::duplex(64);
        c.write_all(b"hello").await.unwrap();
        drop(c);
        svc.clone().oneshot(conn(s)).await.unwrap();

        let labels: Vec<_> = labels_of(tasks).await;
        assert_eq!(labels, ["first_byte", "idle", "min_rate", "idle"]);
        assert_eq!(
            elapsed(&total.await.unwrap().unwrap_err()).clock(),
            Clock::Total
        );
    });
    assert_eq!(cuts(&m, "first_byte"), 1);
    assert_eq!(cuts(&m, "idle"), 2);
    assert_eq!(cuts(&m, "min_rate"), 1);
    assert_eq!(cuts(&m, "total"), 1);
    assert_eq!(
        m.counter(REJECTIONS_TOTAL, &[]),
        5,
        "the healthy client was counted"
    );
}

async fn labels_of(tasks: Vec<tokio::task::JoinHandle<Result<(), BoxError>>>) -> Vec<&'static str> {
    let mut labels = Vec::new();
    for t in tasks {
        labels.push(elapsed(&t.await.unwrap().unwrap_err()).clock().label());
    }
    labels
}

// Real sockets with paused time: the clock only auto-advances when the runtime has
// nothing to do, and loopback delivers a write or a close into the peer's socket during
// the syscall, so every socket event below is seen before time moves.

#[test]
fn over_loopback_a_silent_client_is_closed_at_the_first_byte_deadline() {
    let layer = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .handshake_timeout(30 * S);
    let (took, m) = with_metrics(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = layer.layer(service_fn(drain::<SlowlorisIo<Conn<TcpStream>>>));
        tokio::spawn(async move { aegis_core::serve(listener, svc).await });
        let mut client = TcpStream::connect(addr).await.unwrap();
        let start = Instant::now();
        let mut b = [0; 1];
        assert_eq!(
            client.read(&mut b).await.unwrap(),
            0,
            "expected the server to close"
        );
        Instant::now().saturating_duration_since(start)
    });
    assert!(took >= 5 * S && took < 6 * S, "closed after {took:?}");
    assert_eq!(cuts(&m, "first_byte"), 1);
}

#[tokio::test(flavor = "current_thread", start_paused = true)]
async fn over_loopback_one_byte_then_silence_is_closed_at_the_total_deadline() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_byte, mut byte_seen) = tokio::sync::mpsc::channel(1);
    let svc = SlowlorisLayer::new()
        .first_byte_timeout(5 * S)
        .handshake_timeout(10 * S)
        .layer(service_fn(move |mut io: SlowlorisIo<Conn<TcpStream>>| {
            let got_byte = got_byte.clone();
            async move {
                assert!(
                    io.is_write_vectored(),
                    "TcpStream's vectored writes are forwarded"
                );
                let mut b = [0; 1];
                io.read_exact(&mut b).await?;
                got_byte.send(()).await.unwrap();
                drain(io).await
            }
        }));
    let server = tokio::spawn(async move {
        let (stream, peer) = listener.accept().await.unwrap();
        svc.oneshot(Conn::new(stream, peer, addr)).await
    });
    let mut client = TcpStream::connect(addr).await.unwrap();
    let start = Instant::now();
    client.write_all(b"x").await.unwrap();
    byte_seen.recv().await.unwrap();
    let mut b = [0; 1];
    assert_eq!(
        client.read(&mut b).await.unwrap(),
        0,
        "expected the server to close"
    );
    let took = Instant::now().saturating_duration_since(start);
    assert!(took >= 10 * S && took < 11 * S, "closed after {took:?}");
    let err = server.await.unwrap().unwrap_err();
    let e = elapsed(&err);
    assert_eq!((e.clock(), e.received()), (Clock::Total, 1));
}
