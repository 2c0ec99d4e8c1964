use std::time::Duration;

use tower_layer::Layer;

use super::Slowloris;
use super::clock::{Clocks, Limit, MinRate};

/// Applies the [`Slowloris`] deadlines to a byte-stream service.
///
/// Every clock is off until set; the layer is a few `Duration`s and cheap to copy.
/// See the [module docs](super) for how the clocks compose and an example.
#[derive(Debug, Clone, Copy, Default)]
#[must_use = "a layer does nothing until it wraps a service"]
pub struct SlowlorisLayer {
    clocks: Clocks,
    jitter: Duration,
    writes_are_activity: bool,
}

impl SlowlorisLayer {
    /// A layer with every clock off.
    pub const fn new() -> Self {
        Self {
            clocks: Clocks {
                first_byte: Limit::OFF,
                idle: Limit::OFF,
                total: Limit::OFF,
                min_rate: None,
                idle_after_handshake: Limit::OFF,
            },
            jitter: Duration::ZERO,
            writes_are_activity: false,
        }
    }

    /// Cuts a connection whose first byte has not arrived `timeout` after the layer was
    /// called (label `first_byte`).
    pub const fn first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.clocks.first_byte = Limit::new(timeout);
        self
    }

    /// During the handshake, cuts a connection that sends nothing for `timeout` (label
    /// `idle`). Before the first byte this clock runs from the start, unless the
    /// first-byte timeout is set, which then applies instead.
    pub const fn idle_timeout(mut self, timeout: Duration) -> Self {
        self.clocks.idle = Limit::new(timeout);
        self
    }

    /// Cuts a connection whose handshake has not completed `timeout` after the layer was
    /// called (label `total`). With [`min_rate`](Self::min_rate), this is the cap of the
    /// growing deadline.
    ///
    /// Only set it if the inner service completes the [`Handshake`](aegis_core::Handshake)
    /// (see the [module docs](super#ending-the-handshake)); otherwise every connection
    /// is cut at this deadline.
    pub const fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.clocks.total = Limit::new(timeout);
        self
    }

    /// During the handshake, cuts a client that sends too slowly (label `min_rate`): see
    /// [the formula](super#the-minimum-rate-formula).
    pub const fn min_rate(mut self, rate: MinRate) -> Self {
        self.clocks.min_rate = Some(rate);
        self
    }

    /// After the handshake, cuts a connection that sends nothing for `timeout` (label
    /// `idle`). Off by default: once a client has completed its handshake, its protocol
    /// (an MQTT keep-alive, for example) usually decides when it is dead.
    pub const fn idle_timeout_after_handshake(mut self, timeout: Duration) -> Self {
        self.clocks.idle_after_handshake = Limit::new(timeout);
        self
    }

    /// After the handshake, counts a write to the client as activity too: a write that
    /// takes at least one byte resets the [idle clock after the
    /// handshake](Self::idle_timeout_after_handshake), as a read does. Off by default,
    /// where only reads count.
    ///
    /// Turn it on where the server may write for long while the client, rightly, sends
    /// nothing: an HTTP download or a stream of server-sent events is all writes, and
    /// with reads alone every response was cut at the idle timeout, however fast the
    /// client took it. The idle clock then cuts a connection on which neither side made
    /// progress for the timeout: a client that stops reading stalls the writes once the
    /// socket buffers are full (nginx's `send_timeout` times writes so). The handshake
    /// clocks still count only reads: a server writing during the handshake gives the
    /// client no more time. Does nothing without an idle clock after the handshake.
    pub const fn writes_are_activity(mut self, on: bool) -> Self {
        self.writes_are_activity = on;
        self
    }

    /// Spreads the handshake cuts: each connection's handshake deadlines (first byte,
    /// idle, total, minimum rate) come a random amount between zero and `jitter`
    /// early, drawn once per connection. Off (zero) by default.
    ///
    /// Connections opened together, as an attacker opens them, are otherwise cut
    /// together, and an attacker that reconnects when cut comes back in the same
    /// burst, deadline after deadline; spread cuts come back spread (gRPC's
    /// `MAX_CONNECTION_AGE` adds its ±10 % for the same reason). A connection is never
    /// cut later than its deadline: the jitter only takes time off. The draw is capped
    /// at half the shortest handshake clock set, and at `u32::MAX` ns (about 4.29 s).
    pub const fn jitter(mut self, jitter: Duration) -> Self {
        self.jitter = jitter;
        self
    }
}

impl<S> Layer<S> for SlowlorisLayer {
    type Service = Slowloris<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Slowloris::new(
            inner,
            self.clocks,
            self.clocks.jitter_cap(self.jitter),
            self.writes_are_activity,
        )
    }
}
