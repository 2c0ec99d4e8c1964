//! The `mqtt_io` fuzz target: one connection through the whole layer ([`MqttLayer`], its
//! service and [`MqttIo`]) to a broker, over in-memory pipes, with the client's and the
//! broker's bytes, their chunking and the time between them chosen by the input.
//!
//! Compiled for tests and for the fuzzer only: it runs tokio's clock paused, which needs
//! tokio's `test-util`, and that must not reach a normal build (see the root
//! `Cargo.toml`). `cargo test` has `test-util` through the dev-dependencies; the fuzz
//! crate turns on this crate's feature `fuzz-io`, which turns it on.
//!
//! # Input
//!
//! Two bytes of setup, then a script of operations.
//!
//! - Byte 0, one flag a bit: 0 a per-packet [`Policy`] with small limits (and the
//!   gateway's own MQTT 5 PUBACK / PUBREC); 1 [`MqttLayer::enforce_keep_alive`]; 2 small
//!   packet size caps (128 bytes before the CONNACK, 512 after); 3
//!   [`MqttLayer::connack_timeout`]; 4 a [`PacketRate`] of 5 packets a second, bursts of
//!   3; 5 that rate refuses instead of throttling; 6 the inner service copies with
//!   `tokio::io::copy_bidirectional_with_sizes` and small buffers (reads under the
//!   layer's direct-read size go through its own buffer) instead of
//!   [`aegis_core::proxy::Transfer`]; 7 payload inspection in the policy (a pattern, a
//!   payload size and topic rules, which track MQTT 5 topic aliases).
//! - Byte 1: bits 0-1 the client pipe's capacity and bits 2-3 the broker pipe's (8, 64,
//!   512 or 4096 bytes each way: small pipes push back); bits 4-6 the copy buffers of
//!   flag 6 (1, 2, 16, 100, 1023, 1024, 4096 or 8192 bytes); bit 7 a CONNACK timeout of
//!   50 ms instead of 3 s.
//! - Then operations, one byte each (`op & 7` the kind, `op >> 3` its argument `a`),
//!   some followed by a length byte `n` and data:
//!
//! | kind | operation |
//! |---|---|
//! | 0 | the client writes the next `n` bytes |
//! | 1 | the broker writes the next `n` bytes |
//! | 2 | the client writes the next `16 n` bytes |
//! | 3 | the broker writes the next `16 n` bytes |
//! | 4 | sleep `(a % 4 + 1) * 10^(a / 4)` ms (1 ms to 11 h): timers fire in order; two hours of sleep in all per input, the rest is skipped |
//! | 5 | read what is there: the client's side unless `a & 1`, the broker's unless `a & 2` |
//! | 6 | close a side: `a % 4` 0 half-closes the client's (it still reads), 1 the broker's; 2 drops the client's end (the layer's writes to it fail from then on), 3 the broker's |
//! | 7 | jump the clock as kind 4 (`tokio::time::advance`): every timer due fires at once |
//!
//! A write takes what the pipe has room for and drops the rest (the script does not
//! wait), so what each side sent is what its pipe took. After each operation the
//! connection runs until it waits. Sleeping costs a wake-up of the policy's eviction
//! task every 30 s: hence the two-hour budget (jumps cost one wake-up each).
//!
//! # Properties
//!
//! Beyond "no panic":
//!
//! - **No hang.** After the script both sides half-close and keep reading (those not
//!   dropped): the connection must end within a day of (paused, auto-advancing) time. A connection
//!   still open then has lost a wake-up or misses a deadline.
//! - **The layer releases the client's packets, byte for byte.** What the proxy reads
//!   from the [`MqttIo`] is nothing at all unless the client's first packet is a valid
//!   CONNECT; then whole packets of the client's, in order and unaltered: exactly a
//!   prefix of what the client sent, or, with a policy, that with some whole packets
//!   left out (dropped). Nothing is re-encoded. The last packet may be cut short only
//!   when the proxy stopped reading before EOF or an error (a copier that fails one way
//!   drops what it holds for the other). The broker gets a prefix of what the proxy
//!   read.
//! - **Only valid packets pass.** Each whole packet the proxy read, replayed through a
//!   [`Session`] of the layer's configuration (told of a CONNACK right after the
//!   CONNECT, with no MQTT 5 limits: it accepts all that the layer's session may),
//!   is accepted, across throttling, drops, the CONNACK gate and partial reads.
//! - **Inspection decisions hold** (policy and inspection on: flags 0 and 7). No whole
//!   PUBLISH the proxy read breaks a blocking rule of the setup's inspector, judged on
//!   its topic as the broker knows it: an empty topic name stands for the topic that the
//!   last PUBLISH the proxy read with that MQTT 5 Topic Alias set (the broker's alias
//!   map, rebuilt from the forwarded packets alone). The topic is neither under
//!   `deny/#` nor a `$` topic (`allow("#")` does not cover those), the alias is one the
//!   broker knows, the payload has no `evil` in any case and is at most 256 bytes. The
//!   same for the will of the CONNECT. The rules are restated here, not asked of the
//!   [`Inspector`]: a policy that looked up the wrong topic (an alias's old one, or none)
//!   for a forwarded PUBLISH fails this check.
//! - **The client gets the broker's bytes, and the gateway's answers between two of its
//!   packets.** What the client reads is a prefix of what the broker wrote, with whole
//!   packets of the gateway's own inserted at the broker's packet boundaries (the last
//!   may be cut short when the connection ends): its CONNACK (only while no CONNACK went
//!   out, and then nothing more), an MQTT 5 DISCONNECT (only after a CONNACK, and then
//!   nothing more), and with a policy SUBACK, or for MQTT 5 PUBACK and PUBREC (only
//!   after a CONNACK).
//! - The layer calls its inner service at most once, and the CONNACK timeout and
//!   latency hooks each fire at most once.
//! - Once the connection has ended, both pipes are closed: the layer kept no end open.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use aegis_core::proxy::Transfer;
use aegis_core::{BoxError, Conn};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};
use tower_layer::Layer;
use tower_service::Service;

use crate::inspect::{Action, ClientMatch, Inspector, Severity, TopicRule};
use crate::layer::policy::{Policy, Quota};
use crate::layer::{ConnackLatency, MqttIo, MqttLayer, PacketRate};
use crate::{Config, Next, Packet, Session, Version, connect_version};

/// Pipe capacities, each way (byte 1, bits 0-1 and 2-3).
const CAPACITIES: [usize; 4] = [8, 64, 512, 4096];

/// Copy buffer sizes of the small copier (byte 1, bits 4-6).
const COPY_SIZES: [usize; 8] = [1, 2, 16, 100, 1023, 1024, 4096, 8192];

/// The most the script sleeps in all (jumps are not counted).
const SLEEP_BUDGET: Duration = Duration::from_secs(2 * 60 * 60);

/// How long the connection has to end once both sides have closed.
const DAY: Duration = Duration::from_secs(24 * 60 * 60);

/// The connection's future, whatever the layer's policy type.
type ConnFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

/// The stream the layer serves.
type Io = Conn<DuplexStream>;

/// The layer's configuration, from the first two bytes.
#[derive(Debug)]
#[allow(clippy::struct_excessive_bools)] // independent switches, one input bit each
struct Setup {
    config: Config,
    policy: bool,
    inspect: bool,
    keep_alive: bool,
    rate: Option<PacketRate>,
    connack_timeout: Option<Duration>,
    /// The small copier's buffer size; `None`: `Transfer`.
    copy: Option<usize>,
    client_capacity: usize,
    broker_capacity: usize,
}

impl Setup {
    fn decode(data: &[u8]) -> Option<(Self, &[u8])> {
        let (&[a, b], script) = data.split_first_chunk::<2>()?;
        let bit = |n: u8| a & (1 << n) != 0;
        let config = if bit(2) {
            Config::new().max_connect_size(128).max_packet_size(512)
        } else {
            Config::new()
        };
        let rate = bit(4).then(|| {
            let rate = PacketRate::new(5, 3);
            if bit(5) { rate.disconnect() } else { rate }
        });
        let connack_timeout =
            bit(3).then(|| Duration::from_millis(if b & 0x80 == 0 { 3000 } else { 50 }));
        let setup = Self {
            config,
            policy: bit(0),
            inspect: bit(7),
            keep_alive: bit(1),
            rate,
            connack_timeout,
            copy: bit(6).then(|| COPY_SIZES[usize::from((b >> 4) & 7)]),
            client_capacity: CAPACITIES[usize::from(b & 3)],
            broker_capacity: CAPACITIES[usize::from((b >> 2) & 3)],
        };
        Some((setup, script))
    }

    /// The per-packet policy, if any: small limits, so that a short script crosses them.
    fn policy(&self) -> Option<Policy> {
        let nz = |n| NonZeroU32::new(n).expect("a positive quota");
        let policy = Policy::builder()
            .connect_per_addr(Quota::per_minute(nz(10)))
            .publish_per_client(Quota::per_second(nz(2)))
            .subscribe_per_client(Quota::per_minute(nz(2)))
            .packets_per_client(Quota::per_second(nz(8)))
            .bytes_per_client(Quota::per_second(nz(1024)))
            .v5_publish_answer(true);
        let policy = if self.inspect {
            policy.inspect(inspector().clone())
        } else {
            policy
        };
        self.policy.then(|| policy.build())
    }
}

/// The inspection rules, compiled once for every input. [`kept_the_rules`] restates the
/// blocking ones: change both together.
fn inspector() -> &'static Inspector {
    static INSPECTOR: OnceLock<Inspector> = OnceLock::new();
    INSPECTOR.get_or_init(|| {
        Inspector::builder()
            .pattern("evil", "(?i)evil", Action::Block, Severity::High)
            .pattern("odd", "xx+", Action::Flag, Severity::Low)
            .max_payload(MAX_PAYLOAD, Action::Block, Severity::Low)
            .topics(TopicRule::new(ClientMatch::Any).allow("#").deny("deny/#"))
            .build()
            .expect("the fuzz rules compile")
    })
}

/// The inner service: a proxy to the broker, copying between the layer's [`MqttIo`]
/// (tapped) and the near end of the broker's pipe.
#[derive(Clone)]
struct Broker {
    near: Arc<Mutex<Option<DuplexStream>>>,
    copy: Option<usize>,
    reads: Arc<Mutex<Reads>>,
}

impl Service<MqttIo<Io>> for Broker {
    type Response = ();
    type Error = BoxError;
    type Future = ConnFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, io: MqttIo<Io>) -> ConnFuture {
        let mut io = Tap {
            io,
            reads: Arc::clone(&self.reads),
        };
        let near = self.near.lock().take();
        let mut near = near.expect("the layer calls its inner service once per connection");
        match self.copy {
            None => Box::pin(async move {
                Transfer::new(io, near, 0).await?;
                Ok(())
            }),
            Some(size) => Box::pin(async move {
                tokio::io::copy_bidirectional_with_sizes(&mut io, &mut near, size, size).await?;
                Ok(())
            }),
        }
    }
}

/// What the inner service read from the layer's [`MqttIo`]. A copier that fails in one
/// direction drops what it holds for the other: the broker may get less.
#[derive(Debug, Default)]
struct Reads {
    bytes: Vec<u8>,
    /// A read returned EOF or failed: the layer gave all it had.
    ended: bool,
}

/// The layer's [`MqttIo`], with its reads logged.
struct Tap {
    io: MqttIo<Io>,
    reads: Arc<Mutex<Reads>>,
}

impl AsyncRead for Tap {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        let mut reads = this.reads.lock();
        match &res {
            Poll::Ready(Ok(())) if buf.filled().len() == start => reads.ended = true,
            Poll::Ready(Ok(())) => reads.bytes.extend_from_slice(&buf.filled()[start..]),
            Poll::Ready(Err(_)) => reads.ended = true,
            Poll::Pending => {}
        }
        res
    }
}

impl AsyncWrite for Tap {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Calls the layer's service with the connection's stream.
fn serve<S>(mut svc: S, io: Io) -> ConnFuture
where
    S: Service<Io, Response = (), Error = BoxError>,
    S::Future: Send + 'static,
{
    let mut cx = Context::from_waker(Waker::noop());
    let ready = svc.poll_ready(&mut cx);
    assert!(
        matches!(ready, Poll::Ready(Ok(()))),
        "the broker is always ready"
    );
    Box::pin(svc.call(io))
}

/// The bytes each side sent and read.
#[derive(Debug, Default)]
struct Log {
    /// What the client's pipe took.
    sent: Vec<u8>,
    /// What the broker read.
    to_broker: Vec<u8>,
    /// What the broker's pipe took.
    from_broker: Vec<u8>,
    /// What the client read.
    to_client: Vec<u8>,
}

/// How many times each hook fired.
#[derive(Debug, Default)]
struct Hooks {
    connack_timeout: AtomicUsize,
    connack_latency: AtomicUsize,
}

/// Runs one input. See the docs of this module (`fuzz_io`, private).
///
/// # Panics
///
/// When a property of the module docs does not hold.
pub fn io(data: &[u8]) {
    let _ = logged(data);
}

/// Runs one input, and returns what each side sent and read (`None`: no setup bytes).
fn logged(data: &[u8]) -> Option<Log> {
    let (setup, script) = Setup::decode(data)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    Some(rt.block_on(run(&setup, script)))
}

async fn run(setup: &Setup, script: &[u8]) -> Log {
    let (client, client_near) = tokio::io::duplex(setup.client_capacity);
    let (broker, broker_near) = tokio::io::duplex(setup.broker_capacity);
    let hooks = Arc::new(Hooks::default());
    let reads = Arc::new(Mutex::new(Reads::default()));
    let conn = connection(setup, client_near, broker_near, &hooks, &reads);
    let task = tokio::spawn(conn);
    let mut ends = Ends {
        client: Some(client),
        broker: Some(broker),
        log: Log::default(),
    };
    ends.play(script).await;
    ends.finish(task).await;
    assert!(hooks.connack_timeout.load(Ordering::Relaxed) <= 1);
    assert!(hooks.connack_latency.load(Ordering::Relaxed) <= 1);
    let reads = std::mem::take(&mut *reads.lock());
    check(setup, &ends.log, &reads);
    ends.log
}

/// The connection through the layer configured by `setup`, from the near ends of the
/// pipes.
fn connection(
    setup: &Setup,
    client: DuplexStream,
    broker: DuplexStream,
    hooks: &Arc<Hooks>,
    reads: &Arc<Mutex<Reads>>,
) -> ConnFuture {
    let inner = Broker {
        near: Arc::new(Mutex::new(Some(broker))),
        copy: setup.copy,
        reads: Arc::clone(reads),
    };
    let (h1, h2) = (Arc::clone(hooks), Arc::clone(hooks));
    let mut layer = MqttLayer::new(setup.config)
        .on_connack_timeout(move || {
            h1.connack_timeout.fetch_add(1, Ordering::Relaxed);
        })
        .connack_latency(ConnackLatency::new(move |_| {
            h2.connack_latency.fetch_add(1, Ordering::Relaxed);
        }));
    if setup.keep_alive {
        layer = layer.enforce_keep_alive();
    }
    if let Some(rate) = setup.rate {
        layer = layer.packet_rate(rate);
    }
    if let Some(timeout) = setup.connack_timeout {
        layer = layer.connack_timeout(timeout);
    }
    let io = Conn::new(
        client,
        "192.0.2.1:4000".parse().expect("an address"),
        "127.0.0.1:1883".parse().expect("an address"),
    );
    match setup.policy() {
        Some(policy) => serve(layer.policy(policy).layer(inner), io),
        None => serve(layer.layer(inner), io),
    }
}

/// The far ends of both pipes, and what went through them.
struct Ends {
    /// `None` once dropped: then the layer's writes to it fail.
    client: Option<DuplexStream>,
    broker: Option<DuplexStream>,
    log: Log,
}

impl Ends {
    /// Runs the script.
    async fn play(&mut self, mut script: &[u8]) {
        let log = &mut self.log;
        let mut slept = Duration::ZERO;
        while let Some((&op, rest)) = script.split_first() {
            script = rest;
            let arg = op >> 3;
            match op & 7 {
                kind @ 0..=3 => {
                    let Some((&n, rest)) = script.split_first() else {
                        break;
                    };
                    let len = usize::from(n) * if kind < 2 { 1 } else { 16 };
                    let (chunk, rest) = rest.split_at(len.min(rest.len()));
                    script = rest;
                    if kind % 2 == 0 {
                        write(&mut self.client, chunk, &mut log.sent);
                    } else {
                        write(&mut self.broker, chunk, &mut log.from_broker);
                    }
                }
                4 => {
                    let d = duration(arg).min(SLEEP_BUDGET.saturating_sub(slept));
                    slept += d;
                    tokio::time::sleep(d).await;
                }
                5 => {
                    let mut cx = Context::from_waker(Waker::noop());
                    if arg & 1 == 0 {
                        read(&mut self.client, &mut cx, &mut log.to_client);
                    }
                    if arg & 2 == 0 {
                        read(&mut self.broker, &mut cx, &mut log.to_broker);
                    }
                }
                6 => match arg % 4 {
                    0 => shutdown(&mut self.client),
                    1 => shutdown(&mut self.broker),
                    2 => self.client = None,
                    _ => self.broker = None,
                },
                _ => tokio::time::advance(duration(arg)).await,
            }
            // The connection runs until it waits.
            tokio::task::yield_now().await;
        }
    }

    /// Closes both sides and reads to the end: the connection must end within a day.
    async fn finish(&mut self, mut task: tokio::task::JoinHandle<Result<(), BoxError>>) {
        let Self {
            client,
            broker,
            log,
        } = self;
        shutdown(client);
        shutdown(broker);
        let ended = tokio::time::timeout(
            DAY,
            std::future::poll_fn(|cx| {
                read(client, cx, &mut log.to_client);
                read(broker, cx, &mut log.to_broker);
                Pin::new(&mut task).poll(cx)
            }),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the connection is still open a day after both sides closed: \
                 a lost wake-up or a missing deadline"
            )
        });
        if let Err(e) = ended {
            if e.is_panic() {
                std::panic::resume_unwind(e.into_panic());
            }
            panic!("the connection's task failed: {e}");
        }
        // The rest of what is in the pipes, then EOF: the layer let go of its ends.
        let mut cx = Context::from_waker(Waker::noop());
        assert!(
            read(client, &mut cx, &mut log.to_client),
            "the client's pipe is still open after the connection ended"
        );
        assert!(
            read(broker, &mut cx, &mut log.to_broker),
            "the broker's pipe is still open after the connection ended"
        );
    }
}

/// `(a % 4 + 1) * 10^(a / 4)` milliseconds.
fn duration(arg: u8) -> Duration {
    let ms = u64::from(arg % 4 + 1) * 10u64.pow(u32::from(arg / 4));
    Duration::from_millis(ms)
}

/// Writes what `pipe` takes of `data` now, and logs it.
fn write(pipe: &mut Option<DuplexStream>, mut data: &[u8], log: &mut Vec<u8>) {
    let Some(pipe) = pipe else {
        return;
    };
    let mut cx = Context::from_waker(Waker::noop());
    while !data.is_empty() {
        match Pin::new(&mut *pipe).poll_write(&mut cx, data) {
            Poll::Ready(Ok(n)) if n > 0 => {
                log.extend_from_slice(&data[..n]);
                data = &data[n..];
            }
            _ => break,
        }
    }
}

/// Reads what is in `pipe` now into `log`: whether it reached the end.
fn read(pipe: &mut Option<DuplexStream>, cx: &mut Context<'_>, log: &mut Vec<u8>) -> bool {
    let Some(pipe) = pipe else {
        return true;
    };
    let mut buf = [0; 1024];
    loop {
        let mut rb = ReadBuf::new(&mut buf);
        match Pin::new(&mut *pipe).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => return true,
            Poll::Ready(Ok(())) => log.extend_from_slice(rb.filled()),
            Poll::Ready(Err(_)) => return true,
            Poll::Pending => return false,
        }
    }
}

/// Closes the sending half of `pipe` (at once: a pipe's shutdown never waits).
fn shutdown(pipe: &mut Option<DuplexStream>) {
    let mut cx = Context::from_waker(Waker::noop());
    if let Some(pipe) = pipe {
        let _ = Pin::new(pipe).poll_shutdown(&mut cx);
    }
}

/// The length of the packet at the start of `bytes` as the layer follows packets: a
/// first byte, a Remaining Length of at most four bytes (the fourth ends it whatever
/// its top bit), and that many bytes; `None` if it is not all there.
fn frame_len(bytes: &[u8]) -> Option<usize> {
    let mut value = 0;
    for i in 1..=4 {
        let b = *bytes.get(i)?;
        value |= usize::from(b & 0x7F) << (7 * (i - 1));
        if b & 0x80 == 0 || i == 4 {
            let len = i + 1 + value;
            return (len <= bytes.len()).then_some(len);
        }
    }
    None
}

/// Checks the properties on what both sides sent and read, and what the inner service
/// read.
fn check(setup: &Setup, log: &Log, reads: &Reads) {
    let connect = frame_len(&log.sent).map(|n| &log.sent[..n]);
    if !reads.bytes.is_empty() {
        let connect = connect.expect("the layer released bytes before a whole first packet");
        let mut session = Session::new(setup.config);
        assert!(
            matches!(
                session.next(connect),
                Ok(Next::Packet {
                    packet: Packet::Connect(_),
                    ..
                })
            ),
            "the layer released a connection whose first packet is not a valid CONNECT"
        );
    }
    forwarded(&log.sent, &reads.bytes, setup.policy, reads.ended);
    validated(setup.config, &reads.bytes, setup.policy && setup.inspect);
    assert!(
        reads.bytes.starts_with(&log.to_broker),
        "the broker got bytes the proxy never read from the layer"
    );
    let version = connect.and_then(connect_version);
    delivered(&log.from_broker, &log.to_client, version, setup.policy);
}

/// Checks that `forwarded` is made of whole packets of `sent`, in order and unaltered:
/// a prefix of `sent`, or with `may_drop` (a policy), that with some packets left out.
/// The first packet, the CONNECT, is never left out. Unless `ended` (the reads ended at
/// EOF or an error), the last may be cut short: the proxy stopped reading in a packet.
fn forwarded(sent: &[u8], forwarded: &[u8], may_drop: bool, ended: bool) {
    let mut rest = forwarded;
    let mut sent = sent;
    let mut first = true;
    while !rest.is_empty() {
        let Some(len) = frame_len(sent) else {
            panic!(
                "the layer released {} bytes that are not whole packets of the client's",
                rest.len()
            );
        };
        let (packet, tail) = sent.split_at(len);
        sent = tail;
        if rest.starts_with(packet) {
            rest = &rest[len..];
        } else if !ended && packet.starts_with(rest) {
            return;
        } else {
            assert!(
                may_drop && !first,
                "the layer released {:02x?} where the client's next packet is {packet:02x?}",
                &rest[..rest.len().min(16)]
            );
        }
        first = false;
    }
}

/// Checks that every whole packet of `forwarded` (what the layer released) passes a
/// [`Session`] of the layer's `config` told of a CONNACK right after the CONNECT: the
/// layer releases only packets its own session validated, whatever the throttling,
/// drops, gates and buffering in between. This session accepts all that the layer's
/// does, so the check holds whatever the broker's CONNACK said:
///
/// - a CONNACK's MQTT 5 limits (Maximum `QoS`, Retain, Topic Alias Maximum, Maximum
///   Packet Size, Wildcard, Subscription Identifier and Shared Subscription
///   availability) only ever refuse more, and this session has none;
/// - before the CONNACK the layer's session frames with the CONNECT size cap, here the
///   packet size cap, which is at least as large in every fuzz configuration
///   (`Config::new()` and the small caps);
/// - the layer's session refuses all but AUTH and DISCONNECT before the CONNACK to a
///   client with an Authentication Method; this one has had its CONNACK;
/// - the packets a policy drops (PUBLISH and SUBSCRIBE, after the layer's session
///   accepted them) are not here, but they change nothing in a session: only the
///   CONNECT, a DISCONNECT and an error do.
///
/// With `inspected` (the policy inspects with [`inspector`]), each packet must also keep
/// the inspection rules ([`kept_the_rules`]).
///
/// A last packet cut short (see [`forwarded`]) is not judged.
fn validated(config: Config, forwarded: &[u8], inspected: bool) {
    let mut session = Session::new(config);
    let mut aliases = inspected.then(HashMap::new);
    let mut rest = forwarded;
    while !rest.is_empty() {
        match session.next(rest) {
            Ok(Next::Packet { len, packet }) => {
                if let Some(aliases) = &mut aliases {
                    kept_the_rules(&packet, aliases);
                }
                if matches!(packet, Packet::Connect(_)) {
                    session.connack_sent();
                }
                rest = &rest[len..];
            }
            Ok(Next::NeedMore(_)) => return,
            Err(e) => panic!(
                "the layer released a packet a session refuses ({e}): {:02x?}",
                &rest[..rest.len().min(16)]
            ),
        }
    }
}

/// The payload size cap of [`inspector`], a blocking rule.
const MAX_PAYLOAD: usize = 256;

/// Checks that `packet`, released by a layer whose policy inspects with [`inspector`],
/// breaks none of its blocking rules, restated here: a PUBLISH's topic as the broker
/// knows it (`aliases`: each MQTT 5 Topic Alias set by a PUBLISH released before, to its
/// topic, as the broker records it) is known, not under `deny/#` and not a `$` topic
/// (`allow("#")` leaves those out); its payload does not match `(?i)evil` and is at
/// most [`MAX_PAYLOAD`] bytes. The same for a CONNECT's will.
///
/// `(?i)evil` is matched as ASCII letters in any case: in the simple case folding that
/// `regex` uses, no other character folds to `e`, `v`, `i` or `l` (`ı` and `İ` do not;
/// a test holds the two readings together).
fn kept_the_rules(packet: &Packet<'_>, aliases: &mut HashMap<u16, String>) {
    let (what, topic, payload) = match packet {
        Packet::Connect(c) => match &c.will {
            Some(will) => ("the will of a CONNECT", will.topic, will.payload),
            None => return,
        },
        Packet::Publish(p) => {
            let topic = match p.topic_alias {
                Some(alias) if p.topic.is_empty() => {
                    let Some(topic) = aliases.get(&alias) else {
                        panic!(
                            "the layer released a PUBLISH on topic alias {alias}, which no \
                             PUBLISH released before set: the broker does not know it"
                        );
                    };
                    topic.as_str()
                }
                Some(alias) => {
                    aliases.insert(alias, p.topic.to_owned());
                    p.topic
                }
                None => p.topic,
            };
            (
                if p.topic_alias.is_some() {
                    "a PUBLISH with a topic alias"
                } else {
                    "a PUBLISH"
                },
                topic,
                p.payload,
            )
        }
        _ => return,
    };
    assert!(
        topic != "deny" && !topic.starts_with("deny/"),
        "the layer released {what} to {topic:?}, which deny(\"deny/#\") blocks"
    );
    assert!(
        !topic.starts_with('$'),
        "the layer released {what} to {topic:?}, which allow(\"#\") does not cover"
    );
    assert!(
        !payload.windows(4).any(|w| w.eq_ignore_ascii_case(b"evil")),
        "the layer released {what} to {topic:?} whose payload matches the blocking \
         pattern (?i)evil"
    );
    assert!(
        payload.len() <= MAX_PAYLOAD,
        "the layer released {what} to {topic:?} with a payload of {} bytes, over the \
         blocking cap of {MAX_PAYLOAD}",
        payload.len()
    );
}

/// Checks that `delivered` is a prefix of `written` with whole packets of the gateway's
/// inserted at packet boundaries (the last may be cut short); see the module docs.
fn delivered(written: &[u8], delivered: &[u8], version: Option<Version>, policy: bool) {
    let v5 = version == Some(Version::V5);
    let mut broker = written;
    let mut rest = delivered;
    let mut connack = false;
    while !rest.is_empty() {
        // The broker's next packet, or what there is of it.
        let len = frame_len(broker).unwrap_or(broker.len());
        let packet = &broker[..len];
        let whole = frame_len(broker).is_some();
        if !packet.is_empty() && whole && rest.starts_with(packet) {
            connack |= packet[0] >> 4 == 2;
            broker = &broker[len..];
            rest = &rest[len..];
            continue;
        }
        if !packet.is_empty() && packet.starts_with(rest) {
            // The client got part of the broker's packet, and the connection ended.
            return;
        }
        let first = rest[0];
        let allowed = match first {
            0x20 => !connack,
            0xE0 => connack && v5,
            0x90 => connack && policy,
            0x40 | 0x50 => connack && policy && v5,
            _ => false,
        };
        assert!(
            allowed,
            "the client got {:02x?} where the broker's next bytes are {:02x?} (CONNACK out: {connack}, {version:?}, policy: {policy})",
            &rest[..rest.len().min(16)],
            &packet[..packet.len().min(16)]
        );
        let Some(len) = frame_len(rest) else {
            // The gateway's last answer, cut short when the connection ended.
            return;
        };
        rest = &rest[len..];
        if first == 0x20 || first == 0xE0 {
            assert!(
                rest.is_empty(),
                "the client got {:02x?} after the gateway's {first:#04x} ended the connection",
                &rest[..rest.len().min(16)]
            );
        }
    }
}

#[cfg(test)]
mod tests;
