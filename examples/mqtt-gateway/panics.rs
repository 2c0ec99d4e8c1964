//! The gateway's panic hook: every panic reported through `tracing` (so that
//! `log.format = "json"` stays JSON lines), and the embedded broker marked failed when
//! it is the one that panicked.
//!
//! rumqttd 0.20 runs each connection in a task of its own threads, and some of its
//! failures are panics there: one that leaves its table of will handlers poisoned makes
//! every later CONNECT of every client panic as well (see `broker.rs`). Each panic of a
//! task went to the default hook: lines of plain text on stderr for every connection
//! (in the middle of JSON logs), while `/readyz` still said ready and the
//! circuit breaker stayed closed (rumqttd's close before its CONNACK counts for
//! nothing). With this hook a panic of rumqttd's (its location in rumqttd's sources, or
//! on one of the broker's threads, [`crate::broker::THREADS`]):
//!
//! - is counted in `aegis_embedded_broker_panics_total` (no labels);
//! - marks the embedded broker failed, for good: `/readyz` answers 503 naming it until
//!   the gateway is restarted (rumqttd cannot be restarted in the process);
//! - is logged at error level at most once a second, the line saying how many were left
//!   out since the last one (`suppressed`).
//!
//! A panic of the gateway's own (its runtimes, the metrics endpoint) is logged every
//! time, never left out: it is a bug, and it may be the one that ends the process. Its
//! line keeps the default hook's words (`thread '...' panicked at file:line:col:
//! message`), and the backtrace when `RUST_BACKTRACE` asks for one. When the log filter
//! leaves the line out (`log.level = "off"`), or the panic comes from the logging itself
//! (`tracing`'s own crates, which may hold the lock the line would need), the default
//! hook reports it instead.

use std::backtrace::{Backtrace, BacktraceStatus};
use std::panic::PanicHookInfo;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::time::Instant;

/// Panics of the embedded broker's since start-up.
pub(crate) const EMBEDDED_BROKER_PANICS_TOTAL: &str = "aegis_embedded_broker_panics_total";

/// How often a panic of the embedded broker's is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// The logging crates, as their sources' paths name them (`tracing-subscriber-0.3.20/`):
/// a panic there may come while the subscriber holds a lock that logging the panic
/// would wait for.
const LOGGING_CRATES: [&str; 3] = ["tracing-0.", "tracing-core-", "tracing-subscriber-"];

/// The embedded broker's panics so far.
static BROKER_PANICS: AtomicU64 = AtomicU64::new(0);

/// When the last panic of the broker's was logged, and how many were not since.
static THROTTLE: Mutex<(Option<Instant>, u64)> = parking_lot::const_mutex((None, 0));

/// How many times the embedded broker has panicked (0: it has not failed).
pub(crate) fn broker_panics() -> u64 {
    BROKER_PANICS.load(Ordering::Relaxed)
}

/// Registers the counter (so that it reads 0 until a panic), for the embedded broker.
pub(crate) fn register_broker_counter() {
    let _ = metrics::counter!(EMBEDDED_BROKER_PANICS_TOTAL);
}

/// Installs the hook; the default one stays behind it for what it does not log (see the
/// module docs). Call it once the `tracing` subscriber is installed.
pub(crate) fn install() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !report(info) {
            default(info);
        }
    }));
}

/// The panic's message, as the default hook shows it.
fn message<'a>(info: &'a PanicHookInfo<'_>) -> &'a str {
    let payload = info.payload();
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("Box<dyn Any>")
}

/// Reports one panic; `false` when the default hook is to report it instead.
fn report(info: &PanicHookInfo<'_>) -> bool {
    let location = info.location();
    let file = location.map_or("", |l| l.file());
    if LOGGING_CRATES.iter().any(|krate| file.contains(krate)) {
        return false;
    }
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("<unnamed>");
    let at = location.map_or_else(|| "<unknown>".to_owned(), ToString::to_string);
    let message = message(info);
    let broker = file.contains("rumqttd") || crate::broker::THREADS.contains(&name);
    if broker {
        BROKER_PANICS.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(EMBEDDED_BROKER_PANICS_TOTAL).increment(1);
        let suppressed = {
            let mut throttle = THROTTLE.lock();
            let now = Instant::now();
            if throttle
                .0
                .is_some_and(|last| now.saturating_duration_since(last) < LOG_EVERY)
            {
                throttle.1 += 1;
                return true;
            }
            throttle.0 = Some(now);
            std::mem::take(&mut throttle.1)
        };
        if !tracing::enabled!(tracing::Level::ERROR) {
            return false;
        }
        tracing::error!(
            thread = name,
            location = %at,
            panic = message,
            suppressed,
            "the embedded broker (rumqttd) panicked: it may fail every client from now on, \
             and /readyz answers 503 until the gateway is restarted (one such line a second \
             at most: `suppressed` counts those left out since the last one, \
             {EMBEDDED_BROKER_PANICS_TOTAL} all of them)"
        );
        return true;
    }
    if !tracing::enabled!(tracing::Level::ERROR) {
        return false;
    }
    let backtrace = Backtrace::capture();
    if backtrace.status() == BacktraceStatus::Captured {
        tracing::error!(
            thread = name,
            location = %at,
            panic = message,
            %backtrace,
            "thread '{name}' panicked at {at}: {message}"
        );
    } else {
        tracing::error!(
            thread = name,
            location = %at,
            panic = message,
            "thread '{name}' panicked at {at}: {message}"
        );
    }
    true
}
