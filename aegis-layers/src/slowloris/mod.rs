//! Deadlines against slow clients (slowloris), after Apache's `mod_reqtimeout` and
//! Kestrel's limits.
//!
//! A slowloris client opens a connection and then sends its handshake as slowly as the
//! server allows: one byte every few seconds, or nothing at all. Each such connection
//! costs a descriptor, a task and buffers, and a few thousand of them fill a server.
//! [`SlowlorisLayer`] wraps a byte-stream service and gives every connection a set of
//! separate clocks while its handshake is in progress, and an optional idle clock
//! afterwards. When a clock runs out, the connection is cut: the response future
//! resolves with an [`error::Elapsed`] rejection and drops the inner future and the
//! stream, which closes the socket.
//!
//! # The clocks
//!
//! Every clock is off until set, and only bytes read from the client count as progress
//! (writes to it do not, unless [`writes_are_activity`](SlowlorisLayer::writes_are_activity)
//! is on, and then only after the handshake). During the handshake:
//!
//! | clock | setter | runs from | label | `mod_reqtimeout` / Kestrel |
//! |---|---|---|---|---|
//! | first byte | [`first_byte_timeout`](SlowlorisLayer::first_byte_timeout) | the call, until the first byte | `first_byte` | - |
//! | idle | [`idle_timeout`](SlowlorisLayer::idle_timeout) | the last byte received | `idle` | the socket timeout between reads |
//! | total | [`handshake_timeout`](SlowlorisLayer::handshake_timeout) | the call, until the handshake completes | `total` | `header=20` / `RequestHeadersTimeout` |
//! | minimum rate | [`min_rate`](SlowlorisLayer::min_rate) | the call, growing with the bytes | `min_rate` | `header=20-40,MinRate=500` / `MinRequestBodyDataRate` |
//!
//! After the handshake only one clock runs, and it is off by default:
//!
//! | clock | setter | runs from | label | Kestrel |
//! |---|---|---|---|---|
//! | idle after handshake | [`idle_timeout_after_handshake`](SlowlorisLayer::idle_timeout_after_handshake) | the end of the handshake, then the last byte received | `idle` | `KeepAliveTimeout` |
//!
//! With [`writes_are_activity`](SlowlorisLayer::writes_are_activity) on, a write of at
//! least one byte to the client after the handshake resets this clock too, as nginx's
//! `send_timeout` times a response's writes: a server writing a long response (a
//! download, a stream of events) to a client that rightly sends nothing meanwhile is not
//! cut while the client takes the bytes, and is cut once neither side has made
//! progress for the timeout (a client that stops reading stalls the writes as soon as
//! the socket buffers are full). Off by default: a protocol whose server pushes on its
//! own (MQTT's publishes to a subscriber) would otherwise keep a silent client alive.
//!
//! # Which clock to use, and how they compose
//!
//! As with tower-http's `TimeoutBody` (reset after every frame) and `DeadlineBody` (never
//! reset), the clocks fall into two kinds that stack:
//!
//! - The **idle** clocks (first byte, idle) are reset by progress. They catch a client
//!   that stops, and cost a healthy client nothing however long its handshake is, but
//!   **one byte every few seconds keeps them happy forever**. Use them alone only where
//!   the handshake is not delimited (a plain TCP proxy, see below).
//! - The **total** clock never resets: one byte every few seconds cannot keep a
//!   connection alive past it. It is the clock that actually stops slowloris, and it
//!   needs the inner service to say when the handshake is over.
//! - The **minimum rate** moves the total deadline later as bytes arrive, so that a
//!   large but steady handshake is not cut while a trickle is: `mod_reqtimeout`'s
//!   `MinRate`. With a total deadline set, that deadline is its cap.
//!
//! All clocks that are set run at once and the earliest deadline cuts, so a typical
//! setting uses one of each kind: a first-byte or idle timeout of a few seconds to shed
//! silent connections early, and a total deadline (with or without a minimum rate) to
//! bound the whole handshake. `mod_reqtimeout`'s default, `header=20-40,MinRate=500`, is
//!
//! ```
//! # use std::time::Duration;
//! # use aegis_layers::slowloris::{MinRate, SlowlorisLayer};
//! let layer = SlowlorisLayer::new()
//!     .handshake_timeout(Duration::from_secs(40))
//!     .min_rate(MinRate::new(500, Duration::from_secs(20)));
//! ```
//!
//! # The minimum-rate formula
//!
//! With `MinRate::new(N, grace)` and `received` bytes read from the client so far, the
//! connection is cut at
//!
//! ```text
//! rate_deadline = start + grace + received / N seconds   (to the nanosecond)
//! deadline      = min(rate_deadline, start + total)      (when a total deadline is set)
//! ```
//!
//! which is `mod_reqtimeout`'s rule: the deadline starts `grace` after the connection and
//! grows by one second per `N` bytes received (in `1/N` s steps per byte, as
//! `mod_reqtimeout` extends its timeout by `len × 1 s / MinRate` on every read), up to the
//! cap. Put differently, at every moment `t` a client must have sent at least
//! `N × (t − grace)` bytes: `N` bytes per second for all the time past the grace
//! period. A cut before the cap is labelled
//! `min_rate`; a cut at the cap is labelled `total`. Example: with
//! `MinRate::new(500, 20 s)` and a 40 s total, a client trickling 1 byte per second is
//! cut after about 20.04 s (`min_rate`); one sending 1 kB/s but never finishing is cut
//! at 40 s (`total`).
//!
//! # Spreading the cuts
//!
//! Connections opened together, as an attacker opens them, reach their deadlines
//! together: the layer cuts them in one burst, and an attacker that reconnects when cut
//! comes back in one burst of connects, deadline after deadline, which every client of
//! the server meets. With [`jitter`](SlowlorisLayer::jitter) each connection draws an
//! amount between zero and the jitter, once, and its handshake deadlines (first byte,
//! idle, total, minimum rate) all come that much early: the cuts, and the reconnections
//! that follow them, spread over the jitter. A connection is never cut later than its
//! configured deadline. The draw is capped at half the shortest handshake clock set;
//! the idle clock after the handshake is not jittered. [`Elapsed::elapsed`](error::Elapsed::elapsed)
//! gives the time the connection actually had.
//!
//! ```
//! # use std::time::Duration;
//! # use aegis_layers::slowloris::SlowlorisLayer;
//! // Cut between 2.9 s and 3 s after the connection, by each connection's own draw.
//! let layer = SlowlorisLayer::new()
//!     .handshake_timeout(Duration::from_secs(3))
//!     .jitter(Duration::from_millis(100));
//! ```
//!
//! # Ending the handshake
//!
//! The layer does not understand any protocol: the inner service tells it when the
//! handshake is done. The stream it receives, a [`SlowlorisIo`], answers
//! `Param<Handshake>` with a tracked [`aegis_core::Handshake`] that the layer watches;
//! the inner layer calls [`complete`](aegis_core::Handshake::complete) on it (the MQTT
//! layer once CONNECT is complete, an HTTP server once the request headers are read)
//! with `Param::<Handshake>::param(&io).complete()`, as in the [example](#example).
//!
//! From then on only the idle-after-handshake clock runs. If a deadline layer further
//! out already tracks the handshake, the same handle is shared, so one `complete()` ends
//! both phases. With an inner service that never completes the handshake (a plain
//! `aegis_core::proxy::Proxy`, say), use only the first-byte and idle clocks:
//! the total and minimum-rate clocks would cut every connection.
//!
//! # Where to put it
//!
//! Put the layer near the top of the stack, outside protocol sniffing and the protocol's
//! own layer, so that sniffing and the handshake itself run under its clocks and every
//! byte the client sends counts. Only the PROXY protocol layer
//! (`aegis_layers::proxy_protocol`), when one is used, goes outside it, outermost, with
//! whatever keys on the client address (address bans, rate limits) between the two, as
//! in the mqtt-gateway:
//!
//! ```text
//! serve -> PROXY protocol -> bans, rate limits -> slowloris -> sniff -> MQTT -> proxy
//! ```
//!
//! That order costs a little time: a trusted proxy's PROXY header is read before these
//! clocks start, under the PROXY layer's own deadline (`ProxyProtocolLayer::timeout`, 3
//! s by default), so its connection can last up to that much longer than these clocks
//! alone allow, and the header's bytes do not count towards the minimum rate (a peer
//! outside the trusted networks is passed on unread, at once, and is under these clocks
//! from its start). It buys the cut's attribution: a cut is an
//! [`error::Elapsed`] that the layers between the two see, with the real client's
//! address (aegis-mqtt's security layer logs it and counts it towards a ban of that
//! client). The other order, this layer outside the PROXY layer, runs the header under
//! these clocks too, but a cut then drops the PROXY layer's future and everything inside
//! it without an error they could see: nothing keyed on the client address learns of
//! the cut, and all that is known of the cut connection is the TCP peer's address, the
//! load balancer's.
//!
//! # Metrics
//!
//! Every cut is counted once, through [`aegis_core::error::reject`]:
//!
//! | name | labels | meaning |
//! |---|---|---|
//! | `aegis_rejections_total` | `layer="slowloris"`, `reason="first_byte"` | no byte within the first-byte timeout |
//! | `aegis_rejections_total` | `layer="slowloris"`, `reason="idle"` | silent for the idle timeout, during or after the handshake ([`Elapsed::after_handshake`](error::Elapsed::after_handshake) tells which) |
//! | `aegis_rejections_total` | `layer="slowloris"`, `reason="total"` | handshake not complete by the total deadline (or the minimum-rate cap) |
//! | `aegis_rejections_total` | `layer="slowloris"`, `reason="min_rate"` | fewer bytes than the minimum rate allows for the time taken |
//!
//! # Cost
//!
//! Memory, per connection (`x86_64`):
//!
//! - the response future adds one pointer (8 bytes) to the inner future: everything
//!   that watches the clocks is boxed behind it (the `response_future_stays_small` test
//!   holds the addition to 16 bytes at most);
//! - while a clock can still fire, two heap blocks: that box, the watch (112 bytes: a
//!   copy of the clocks, 48, each limit in 8 bytes; the progress seen so far, 48:
//!   start, last read, byte count, the jitter's draw; a pointer to the timer and one to
//!   the shared state),
//!   and the timer, a boxed `tokio::time::Sleep` of 112 bytes, made when the first
//!   deadline is armed.
//!   The timer is freed whenever no clock is running (after the first byte, when only
//!   the first-byte clock is set, say) and made again if one starts; both are freed
//!   once no clock can apply any more (the handshake is over and no idle clock is set
//!   after it), and when the future ends;
//! - for the whole connection, two small heap blocks: the state shared with the stream
//!   (an `Arc` of 40 bytes: the byte count, the handshake handle and the mark of a
//!   write for [`writes_are_activity`](SlowlorisLayer::writes_are_activity)) and the tracked
//!   handshake flag (an `Arc<AtomicBool>`, 24 bytes), unless an outer layer already
//!   tracks the handshake. The stream, a [`SlowlorisIo`], adds a pointer to the shared
//!   state to the stream it wraps.
//!
//! A connection past its handshake with no idle clock after it thus keeps 8 bytes in
//! its future and the two small blocks; with that idle clock it also keeps the watch
//! and its timer.
//!
//! CPU: a read costs one relaxed load and store; a write, a test of a flag (and a
//! relaxed store with `writes_are_activity` on). A poll of the future that saw new
//! bytes reads the clock once if an idle clock is on. The timer is created when the
//! first deadline is armed and then reset in place: reads only move deadlines later, so
//! it is left where it is and re-armed when it fires early; it moves earlier only at
//! the first byte and at the end of the handshake, and is dropped when no clock is left.
//! `benches/slowloris.rs` measures a whole connection over an in-memory pipe (read a
//! 16-byte greeting, complete the handshake, end), with every clock on. Counted with
//! callgrind (glibc's allocator), the layer adds about 1,800 instructions per
//! connection when the service has to wait for the greeting (a plain
//! `tokio::time::timeout` adds 990 there: most of the cost is registering and removing
//! a tokio timer) and 730 when the greeting is already there (no timer is registered;
//! three small allocations: the watch and the two shared blocks). Criterion medians on
//! a shared 2-core machine at a quiet moment, measured before the watch and its timer
//! were boxed: +0.63 µs per connection when waiting (a plain tokio timeout:
//! +0.52 µs), +0.12 µs when the greeting is already there; runs under heavy load from
//! other processes varied up to +1.7 µs.
//!
//! The clocks are re-armed whenever the response future is polled, which includes each
//! time the inner future is, so they are exact when the inner future drives the stream
//! (as byte-stream services do). An inner service that moves the stream to another
//! task escapes the cut, and its reads are only seen when the timer fires.
//!
//! # Example
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), aegis_core::BoxError> {
//! use std::time::Duration;
//! use aegis_core::{Conn, Handshake, Param};
//! use aegis_layers::slowloris::{MinRate, SlowlorisIo, SlowlorisLayer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! let layer = SlowlorisLayer::new()
//!     .first_byte_timeout(Duration::from_secs(5))
//!     .idle_timeout(Duration::from_secs(10))
//!     .handshake_timeout(Duration::from_secs(40))
//!     .min_rate(MinRate::new(500, Duration::from_secs(20)));
//!
//! // The inner service reads a 5-byte greeting, ends the handshake, then echoes.
//! let svc = layer.layer(service_fn(
//!     |mut io: SlowlorisIo<Conn<DuplexStream>>| async move {
//!         let mut hello = [0; 5];
//!         io.read_exact(&mut hello).await?;
//!         Param::<Handshake>::param(&io).complete();
//!         let (mut rd, mut wr) = tokio::io::split(io);
//!         tokio::io::copy(&mut rd, &mut wr).await?;
//!         Ok::<_, std::io::Error>(())
//!     },
//! ));
//!
//! let (mut client, server) = tokio::io::duplex(64);
//! let conn = Conn::new(server, "192.0.2.7:40000".parse()?, "127.0.0.1:1883".parse()?);
//! let served = tokio::spawn(svc.oneshot(conn));
//! client.write_all(b"hello ping").await?;
//! let mut pong = [0; 5];
//! client.read_exact(&mut pong).await?;
//! assert_eq!(&pong, b" ping");
//! drop(client);
//! served.await??;
//! # Ok(())
//! # }
//! ```

mod clock;
pub mod error;
pub mod future;
mod io;
mod layer;
mod service;

pub use self::clock::MinRate;
pub use self::io::SlowlorisIo;
pub use self::layer::SlowlorisLayer;
pub use self::service::Slowloris;

/// The `layer` label of this module's rejections.
const LAYER: &str = "slowloris";
