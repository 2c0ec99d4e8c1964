//! The state machine shared by every clone of one breaker.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

use super::classify::Outcome;
use crate::time::deadline;

/// `aegis_circuit_state{name}`: 0 closed, 1 half-open, 2 open.
pub const CIRCUIT_STATE: &str = "aegis_circuit_state";
/// `aegis_circuit_transitions_total{name, to}`.
pub const CIRCUIT_TRANSITIONS_TOTAL: &str = "aegis_circuit_transitions_total";

/// The state of a circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CircuitState {
    /// Calls flow to the inner service and their outcomes are counted.
    Closed,
    /// A few probe calls are let through to test the inner service.
    HalfOpen,
    /// Calls fail fast with [`CircuitOpen`](super::error::CircuitOpen).
    Open,
}

impl CircuitState {
    /// The stable label of the state: `closed`, `half_open` or `open`.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::HalfOpen => "half_open",
            Self::Open => "open",
        }
    }

    const fn gauge(self) -> f64 {
        match self {
            Self::Closed => 0.0,
            Self::HalfOpen => 1.0,
            Self::Open => 2.0,
        }
    }
}

/// Trip on a failure rate over the last `window` classified calls (a count-based
/// sliding window), once at least `min_calls` of them were seen.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RateTrip {
    pub(crate) ratio: f64,
    pub(crate) window: usize,
    pub(crate) min_calls: usize,
}

#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) name: &'static str,
    pub(crate) consecutive: Option<u32>,
    pub(crate) rate: Option<RateTrip>,
    pub(crate) open_for: Duration,
    pub(crate) probe_timeout: Duration,
    pub(crate) permits: u32,
    pub(crate) success_threshold: u32,
}

// The fast-path word: `generation << 2 | code`.
const CODE_CLOSED: u64 = 0; // closed and counting: admit without the lock
const CODE_FORCED_CLOSED: u64 = 1; // forced closed: admit, count nothing
const CODE_LOCKED: u64 = 2; // open or half-open: take the lock to decide

#[derive(Debug)]
enum Phase {
    Closed,
    Open {
        until: Instant,
    },
    HalfOpen {
        /// The deadlines of the probes in flight, oldest first (pushed in order: the
        /// clock is monotonic and `probe_timeout` fixed). At most `permits` of them.
        probes: VecDeque<Instant>,
        successes: u32,
    },
}

#[derive(Debug)]
struct Machine {
    phase: Phase,
    forced: Option<CircuitState>,
    generation: u64,
    consecutive: u32,
    // true = failure, newest at the back
    window: VecDeque<bool>,
    window_failures: usize,
}

pub(crate) struct Shared {
    cfg: Config,
    word: AtomicU64,
    /// Set (under the lock) while a success in the closed state would change nothing:
    /// no failure run to reset and no failure-rate window to feed. Successes then skip
    /// the lock, the common case of a healthy backend.
    success_is_noop: AtomicBool,
    /// The start number of the last call started (or [`Mark`] taken): calls are numbered
    /// in the order they start, from 1.
    starts: AtomicU64,
    /// The start number of the latest-started call that succeeded (0: none yet). A
    /// failure of a call started before it does not count towards
    /// `consecutive_failures`: a call started later has shown the backend up since.
    latest_success: AtomicU64,
    machine: Mutex<Machine>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("name", &self.cfg.name)
            .field("state", &self.machine.lock().phase)
            .finish_non_exhaustive()
    }
}

/// What `poll_ready` decided for the next call.
#[derive(Debug)]
pub(crate) enum Ticket {
    Admit(Guard),
    Reject,
}

/// Travels with one admitted call; records its outcome, or returns its probe permit
/// when dropped unrecorded (the call was cancelled).
pub(crate) struct Guard {
    shared: Arc<Shared>,
    generation: u64,
    /// The call's start number, from [`start`](Self::start); 0 until then.
    start: u64,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counted,
    /// A half-open probe, failed if it has not ended by `deadline`.
    Probe {
        deadline: Instant,
    },
    Uncounted,
    Done,
}

impl fmt::Debug for Guard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Guard")
            .field("generation", &self.generation)
            .field("start", &self.start)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(cfg: Config) -> Arc<Self> {
        metrics::gauge!(CIRCUIT_STATE, "name" => cfg.name).set(CircuitState::Closed.gauge());
        let window = VecDeque::with_capacity(cfg.rate.map_or(0, |r| r.window));
        let no_window = cfg.rate.is_none();
        Arc::new(Self {
            cfg,
            word: AtomicU64::new(CODE_CLOSED),
            success_is_noop: AtomicBool::new(no_window),
            starts: AtomicU64::new(0),
            latest_success: AtomicU64::new(0),
            machine: Mutex::new(Machine {
                phase: Phase::Closed,
                forced: None,
                generation: 0,
                consecutive: 0,
                window,
                window_failures: 0,
            }),
        })
    }

    pub(crate) fn name(&self) -> &'static str {
        self.cfg.name
    }

    /// Decides whether the next call may go to the inner service.
    pub(crate) fn admit(self: &Arc<Self>) -> Ticket {
        let word = self.word.load(Ordering::Acquire);
        let kind = match word & 0b11 {
            CODE_CLOSED => Kind::Counted,
            CODE_FORCED_CLOSED => Kind::Uncounted,
            _ => return self.admit_locked(),
        };
        Ticket::Admit(Guard {
            shared: Arc::clone(self),
            generation: word >> 2,
            start: 0,
            kind,
        })
    }

    fn admit_locked(self: &Arc<Self>) -> Ticket {
        let mut guard = self.machine.lock();
        let m = &mut *guard;
        self.poll_timer(m);
        let kind = match (&mut m.phase, m.forced) {
            (_, Some(CircuitState::Open)) | (Phase::Open { .. }, _) => return Ticket::Reject,
            (_, Some(_)) => Kind::Uncounted,
            (Phase::Closed, None) => Kind::Counted,
            (Phase::HalfOpen { probes, .. }, None) => {
                let in_flight = u32::try_from(probes.len()).unwrap_or(u32::MAX);
                if in_flight >= self.cfg.permits {
                    return Ticket::Reject;
                }
                let until = deadline(Instant::now(), self.cfg.probe_timeout);
                probes.push_back(until);
                Kind::Probe { deadline: until }
            }
        };
        Ticket::Admit(Guard {
            shared: Arc::clone(self),
            generation: m.generation,
            start: 0,
            kind,
        })
    }

    /// Moves the circuit on with the clock, lazily (whoever looks first): a half-open
    /// probe still in flight at its deadline has failed, and re-opens the circuit from
    /// that deadline; an open circuit whose time is up goes half-open.
    fn poll_timer(&self, m: &mut Machine) {
        if m.forced.is_some() {
            return;
        }
        let now = Instant::now();
        let timed_out = match &m.phase {
            Phase::HalfOpen { probes, .. } => probes.front().copied().filter(|&d| now >= d),
            _ => None,
        };
        if let Some(at) = timed_out {
            tracing::warn!(
                circuit = self.cfg.name,
                probe_timeout = ?self.cfg.probe_timeout,
                "circuit breaker probe did not finish in time: a failure"
            );
            self.open_from(m, at);
        }
        // Also right after the re-opening above, if its open period is over already.
        if matches!(m.phase, Phase::Open { until } if now >= until) {
            self.transition(
                m,
                Phase::HalfOpen {
                    probes: VecDeque::new(),
                    successes: 0,
                },
            );
        }
    }

    fn transition(&self, m: &mut Machine, phase: Phase) {
        let from = state_of(&m.phase);
        m.phase = phase;
        m.generation += 1;
        m.consecutive = 0;
        self.success_is_noop
            .store(self.cfg.rate.is_none(), Ordering::Relaxed);
        m.window.clear();
        m.window_failures = 0;
        let to = match m.forced {
            Some(forced) => forced,
            None => state_of(&m.phase),
        };
        let code = match (m.forced, &m.phase) {
            (Some(CircuitState::Closed), _) => CODE_FORCED_CLOSED,
            (None, Phase::Closed) => CODE_CLOSED,
            _ => CODE_LOCKED,
        };
        self.word
            .store((m.generation << 2) | code, Ordering::Release);
        let name = self.cfg.name;
        metrics::gauge!(CIRCUIT_STATE, "name" => name).set(to.gauge());
        metrics::counter!(CIRCUIT_TRANSITIONS_TOTAL, "name" => name, "to" => to.label())
            .increment(1);
        if to == CircuitState::Open {
            tracing::warn!(
                circuit = name,
                from = from.label(),
                to = to.label(),
                forced = m.forced.is_some(),
                "circuit breaker state changed"
            );
        } else {
            tracing::info!(
                circuit = name,
                from = from.label(),
                to = to.label(),
                forced = m.forced.is_some(),
                "circuit breaker state changed"
            );
        }
    }

    fn open(&self, m: &mut Machine) {
        self.open_from(m, Instant::now());
    }

    /// Opens the circuit for `open_for` from `from` (now, or when a probe timed out).
    fn open_from(&self, m: &mut Machine, from: Instant) {
        // `open_for(Duration::MAX)` ("until forced or released") must not panic here,
        // inside the poll of the response future that tripped the circuit.
        let until = deadline(from, self.cfg.open_for);
        self.transition(m, Phase::Open { until });
    }

    /// The number of a call starting now, or of a [`Mark`] taken now: larger than that
    /// of every call started before.
    fn next_start(&self) -> u64 {
        self.starts.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// A call (or marked work) with start number `start` succeeded.
    fn succeeded_from(&self, start: u64) {
        self.latest_success.fetch_max(start, Ordering::Relaxed);
    }

    /// Whether a call started after the one numbered `start` has succeeded already: a
    /// failure of this one then says nothing of the backend now.
    fn overtaken(&self, start: u64) -> bool {
        start < self.latest_success.load(Ordering::Relaxed)
    }

    fn record(&self, generation: u64, start: u64, kind: Kind, outcome: Option<Outcome>) {
        let mut m = self.machine.lock();
        if m.generation != generation || m.forced.is_some() {
            return; // a call from an earlier state, or the circuit is forced
        }
        match (kind, outcome) {
            (Kind::Counted, Some(Outcome::Failure)) if matches!(m.phase, Phase::Closed) => {
                self.fail_closed(&mut m, !self.overtaken(start));
            }
            (Kind::Counted, Some(Outcome::Success)) if matches!(m.phase, Phase::Closed) => {
                self.succeed_closed(&mut m);
            }
            (Kind::Probe { deadline }, outcome) => {
                // A probe ending after its deadline failed at the deadline, even if
                // nobody noticed until now: that re-opens the circuit and makes this
                // outcome one of an earlier state.
                self.poll_timer(&mut m);
                if m.generation != generation {
                    return;
                }
                let Phase::HalfOpen { probes, .. } = &mut m.phase else {
                    return;
                };
                // A probe that succeeds, is ignored or is cancelled returns its permit.
                if let Some(i) = probes.iter().position(|&d| d == deadline) {
                    probes.remove(i);
                }
                match outcome {
                    Some(Outcome::Failure) => self.open(&mut m),
                    Some(Outcome::Success) => self.probe_succeeded(&mut m),
                    Some(Outcome::Ignore) | None => {}
                }
            }
            _ => {}
        }
    }

    /// A success while closed: resets the consecutive count and enters the failure-rate
    /// window.
    fn succeed_closed(&self, m: &mut Machine) {
        m.consecutive = 0;
        self.success_is_noop
            .store(self.cfg.rate.is_none(), Ordering::Relaxed);
        self.push(m, false);
    }

    /// A success while half-open: counts towards the success threshold, and closes the
    /// circuit when it is reached.
    fn probe_succeeded(&self, m: &mut Machine) {
        let Phase::HalfOpen { successes, .. } = &mut m.phase else {
            return;
        };
        *successes += 1;
        if *successes >= self.cfg.success_threshold {
            self.transition(m, Phase::Closed);
        }
    }

    /// A failure while closed: counts towards the failure rate, and towards
    /// `consecutive_failures` only if `in_run` (no call started later has succeeded
    /// already: such a success broke the run before this failure ended it); trips if
    /// one is reached.
    fn fail_closed(&self, m: &mut Machine, in_run: bool) {
        if in_run {
            m.consecutive += 1;
        }
        self.success_is_noop.store(false, Ordering::Relaxed);
        self.push(m, true);
        if self.should_trip(m) {
            self.open(m);
        }
    }

    /// An outcome reported outside any call (`failed`, or a success): counted as a call
    /// of the current state that failed (closed: towards the trips; half-open: as a
    /// failed probe, re-opening) or succeeded (closed: resets the consecutive count and
    /// enters the failure-rate window; half-open: towards the success threshold, closing
    /// the circuit when reached); ignored while open or forced.
    ///
    /// With `since`, a [`Mark`]'s generation, only if the circuit is still in the state it
    /// was in then: the clock is looked at first (a half-open probe past its deadline
    /// re-opens the circuit, an open circuit whose time is up goes half-open), as for the
    /// outcome of an admitted call.
    ///
    /// A mark's start number orders its work among the calls, as a call's own does: a
    /// success records it as the latest-started success, and a failure does not count
    /// towards `consecutive_failures` if a call or marked work started later has
    /// succeeded. Without a mark, a failure always counts, and a success orders nothing.
    fn record_reported(&self, failed: bool, since: Option<Mark>) {
        if let Some(mark) = since
            && !failed
        {
            self.succeeded_from(mark.start);
        }
        let mut guard = self.machine.lock();
        let m = &mut *guard;
        if m.forced.is_some() {
            return;
        }
        if let Some(mark) = since {
            self.poll_timer(m);
            if m.generation != mark.generation {
                return; // an outcome of an earlier state
            }
        }
        let in_run = since.is_none_or(|mark| !self.overtaken(mark.start));
        match (&m.phase, failed) {
            (Phase::Closed, true) => self.fail_closed(m, in_run),
            (Phase::Closed, false) => self.succeed_closed(m),
            (Phase::HalfOpen { .. }, true) => self.open(m),
            (Phase::HalfOpen { .. }, false) => self.probe_succeeded(m),
            (Phase::Open { .. }, _) => {}
        }
    }

    /// The generation of the circuit now: it changes with every change of state.
    fn generation(&self) -> u64 {
        self.word.load(Ordering::Acquire) >> 2
    }

    fn push(&self, m: &mut Machine, failed: bool) {
        let Some(rate) = self.cfg.rate else { return };
        if m.window.len() == rate.window {
            let old = m.window.pop_front().unwrap_or(false);
            m.window_failures -= usize::from(old);
        }
        m.window.push_back(failed);
        m.window_failures += usize::from(failed);
    }

    fn should_trip(&self, m: &Machine) -> bool {
        if self.cfg.consecutive.is_some_and(|n| m.consecutive >= n) {
            return true;
        }
        self.cfg.rate.is_some_and(|r| {
            let n = m.window.len();
            #[allow(clippy::cast_precision_loss)] // window sizes are small
            let failed = m.window_failures as f64 / n as f64;
            n >= r.min_calls && n > 0 && failed >= r.ratio
        })
    }

    /// Whether [`admit`](Self::admit) would admit a call now; takes nothing.
    pub(crate) fn would_admit(&self) -> bool {
        let word = self.word.load(Ordering::Acquire);
        if matches!(word & 0b11, CODE_CLOSED | CODE_FORCED_CLOSED) {
            return true;
        }
        let mut guard = self.machine.lock();
        let m = &mut *guard;
        self.poll_timer(m);
        // The decisions of `admit_locked`, without reserving a permit.
        match (&m.phase, m.forced) {
            (_, Some(CircuitState::Open)) | (Phase::Open { .. }, _) => false,
            (_, Some(_)) | (Phase::Closed, None) => true,
            (Phase::HalfOpen { probes, .. }, None) => {
                u32::try_from(probes.len()).unwrap_or(u32::MAX) < self.cfg.permits
            }
        }
    }

    pub(crate) fn state(&self) -> CircuitState {
        // Closed or forced closed: no timer to poll, and the word says which, so no lock
        // on the path every call of a healthy service takes.
        if matches!(
            self.word.load(Ordering::Acquire) & 0b11,
            CODE_CLOSED | CODE_FORCED_CLOSED
        ) {
            return CircuitState::Closed;
        }
        let mut m = self.machine.lock();
        self.poll_timer(&mut m);
        m.forced.unwrap_or_else(|| state_of(&m.phase))
    }

    fn force(&self, forced: Option<CircuitState>) {
        let mut m = self.machine.lock();
        if forced.is_none() && m.forced.is_none() {
            return; // nothing to release
        }
        m.forced = forced;
        self.transition(&mut m, Phase::Closed);
    }
}

fn state_of(phase: &Phase) -> CircuitState {
    match phase {
        Phase::Closed => CircuitState::Closed,
        Phase::Open { .. } => CircuitState::Open,
        Phase::HalfOpen { .. } => CircuitState::HalfOpen,
    }
}

impl Guard {
    /// Whether the circuit changed state since this admission was made.
    pub(crate) fn is_stale(&self) -> bool {
        self.shared.generation() != self.generation
    }

    /// The admitted call starts now: numbers it among the calls, in the order they start.
    pub(crate) fn start(&mut self) {
        self.start = self.shared.next_start();
    }

    /// Records the outcome of the completed call.
    pub(crate) fn record(mut self, outcome: Outcome) {
        let kind = std::mem::replace(&mut self.kind, Kind::Done);
        if outcome == Outcome::Success && matches!(kind, Kind::Counted | Kind::Probe { .. }) {
            self.shared.succeeded_from(self.start);
        }
        let noop = kind == Kind::Counted
            && outcome == Outcome::Success
            && self.shared.success_is_noop.load(Ordering::Relaxed);
        if matches!(kind, Kind::Counted | Kind::Probe { .. }) && !noop {
            self.shared
                .record(self.generation, self.start, kind, Some(outcome));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        // Only a probe holds something to give back; a cancelled counted call is simply
        // not counted.
        if let Kind::Probe { .. } = self.kind {
            self.shared
                .record(self.generation, self.start, self.kind, None);
        }
    }
}

/// A handle to one circuit: read its state, force it open or closed.
///
/// Get it from [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle) or
/// [`CircuitBreaker::handle`](super::CircuitBreaker::handle). Cheap to clone.
#[derive(Clone)]
pub struct CircuitHandle {
    pub(crate) shared: Arc<Shared>,
}

impl fmt::Debug for CircuitHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitHandle")
            .field("name", &self.shared.name())
            .field("state", &self.state())
            .finish()
    }
}

impl CircuitHandle {
    /// The current state; a forced state reads as the state it forces.
    pub fn state(&self) -> CircuitState {
        self.shared.state()
    }

    /// Whether a call made now would be let through: the circuit is closed (or forced
    /// closed), or half-open with a probe permit free. It reserves nothing, and like
    /// [`state`](Self::state) it is a reading that another caller can make out of date
    /// at once (by taking the last permit before your `poll_ready`); like `state`, it
    /// moves an open circuit whose time is up to half-open.
    ///
    /// For a balancer choosing among backends: a half-open backend whose probe permits
    /// are all in flight would fail the call fast with
    /// [`CircuitOpen`](super::error::CircuitOpen), so pass it over while another
    /// backend can take the call.
    pub fn would_admit(&self) -> bool {
        self.shared.would_admit()
    }

    /// The forced state, if the circuit is forced.
    pub fn forced(&self) -> Option<CircuitState> {
        self.shared.machine.lock().forced
    }

    /// The breaker's name, its metric label.
    pub fn name(&self) -> &'static str {
        self.shared.name()
    }

    /// Forces the circuit open: every call fails fast until [`release`](Self::release)
    /// or [`force_closed`](Self::force_closed). For maintenance or a known-bad backend.
    pub fn force_open(&self) {
        self.shared.force(Some(CircuitState::Open));
    }

    /// Forces the circuit closed: every call goes through and nothing is counted until
    /// [`release`](Self::release). To override a breaker that trips wrongly.
    pub fn force_closed(&self) {
        self.shared.force(Some(CircuitState::Closed));
    }

    /// Releases a forced state: the circuit is closed again with fresh counts.
    pub fn release(&self) {
        self.shared.force(None);
    }

    /// Records a failure of the inner service seen outside a call: a call that succeeded
    /// but whose result proved bad later, such as an upstream connection to a broker that
    /// never answers (`aegis_mqtt`'s `MqttLayer::on_connack_timeout`).
    ///
    /// It takes the path of a failed call: while closed it counts towards
    /// [`consecutive_failures`](super::Builder::consecutive_failures) and
    /// [`failure_rate`](super::Builder::failure_rate), and trips the circuit (with its
    /// metrics and log line) when one is reached; while half-open it re-opens the circuit,
    /// as a failed probe does. While open or forced it is ignored.
    ///
    /// A success still resets the consecutive count: if successful calls keep coming
    /// between these failures (connects that succeed, each followed later by a failure),
    /// only the failure rate can trip.
    pub fn record_failure(&self) {
        self.shared.record_reported(true, None);
    }

    /// Records a success of the inner service seen outside a call: the counterpart of
    /// [`record_failure`](Self::record_failure), for a breaker whose calls prove nothing
    /// when they succeed ([`FailuresOnly`](super::FailuresOnly)), such as the connect to
    /// a broker whose CONNACK is the real sign of health (`aegis_mqtt`'s
    /// `MqttLayer::connack_latency` reports each one). For a call that returns a stream,
    /// [`CircuitBreakerLayer::judge_by_first_read`](super::CircuitBreakerLayer::judge_by_first_read)
    /// does this per call, and holds a half-open probe's permit until then.
    ///
    /// While closed it resets the consecutive-failure count and enters the failure-rate
    /// window as a success; while half-open it counts towards
    /// [`success_threshold`](super::Builder::success_threshold) and closes the circuit
    /// when that is reached. While open or forced it is ignored.
    pub fn record_success(&self) {
        self.shared.record_reported(false, None);
    }

    /// The circuit's state now, as a [`Mark`] to record an outcome against later with
    /// [`record_success_since`](Self::record_success_since) or
    /// [`record_failure_since`](Self::record_failure_since).
    ///
    /// It also numbers the work among the calls, as a call's start does: a success
    /// recorded against it makes failures of calls started before it not count towards
    /// [`consecutive_failures`](super::Builder::consecutive_failures) (see [Failures in a
    /// row](super#failures-in-a-row)).
    ///
    /// Take it when the work whose outcome comes later begins: right after the breaker
    /// admitted the call (in the inner service's `call`, say), for a response whose
    /// body, read long after, is the real verdict.
    ///
    /// ```
    /// use std::time::Duration;
    /// use aegis_layers::circuit_breaker::{CircuitBreakerLayer, CircuitState};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let breaker = CircuitBreakerLayer::builder("upstream")
    ///     .consecutive_failures(Some(1))
    ///     .open_for(Duration::from_secs(10))
    ///     .build();
    /// let circuit = breaker.handle();
    ///
    /// // A download starts while the circuit is closed...
    /// let download = circuit.mark();
    /// // ...other calls fail meanwhile, the circuit opens, and after `open_for` it is
    /// // half-open, waiting for a probe to succeed.
    /// circuit.record_failure();
    /// tokio::time::sleep(Duration::from_secs(10)).await;
    /// assert_eq!(circuit.state(), CircuitState::HalfOpen);
    ///
    /// // The old download's end says nothing of the backend now: ignored.
    /// circuit.record_success_since(download);
    /// assert_eq!(circuit.state(), CircuitState::HalfOpen);
    ///
    /// // A probe's download, marked now, decides.
    /// let probe = circuit.mark();
    /// circuit.record_success_since(probe);
    /// assert_eq!(circuit.state(), CircuitState::Closed);
    /// # }
    /// ```
    pub fn mark(&self) -> Mark {
        Mark {
            generation: self.shared.generation(),
            start: self.shared.next_start(),
        }
    }

    /// [`record_success`](Self::record_success), only if the circuit has not changed
    /// state since `mark` was taken ([`mark`](Self::mark)): a success of work begun in
    /// an earlier state (closed before the circuit opened, or an earlier half-open
    /// period) says nothing of the state now, and is ignored, as the outcome of a call
    /// admitted in an earlier state is. Ignored too while open or forced.
    ///
    /// Without the mark, a download begun while the backend was healthy and ended after
    /// its circuit went half-open closed the circuit with no probe ever sent.
    pub fn record_success_since(&self, mark: Mark) {
        self.shared.record_reported(false, Some(mark));
    }

    /// [`record_failure`](Self::record_failure), only if the circuit has not changed
    /// state since `mark` was taken ([`mark`](Self::mark)); ignored otherwise, and while
    /// open or forced, as [`record_success_since`](Self::record_success_since) is.
    pub fn record_failure_since(&self, mark: Mark) {
        self.shared.record_reported(true, Some(mark));
    }
}

/// The state of one circuit at a moment ([`CircuitHandle::mark`]): an outcome recorded
/// against it ([`CircuitHandle::record_success_since`],
/// [`CircuitHandle::record_failure_since`]) counts only if the circuit has not changed
/// state since. Opaque and `Copy`; meaningful only to the circuit that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    generation: u64,
    start: u64,
}
