//! The rotating latency histogram shared by the services and the controller.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// Latencies are recorded in microseconds, up to this (one minute); longer ones count as
/// one minute.
const MAX_MICROS: u64 = 60_000_000;
/// Two significant digits: each value is within 1 % of the recorded one, in about 10 KiB
/// per histogram.
const SIGFIG: u8 = 2;

struct Windows {
    current: Histogram<u64>,
    previous: Histogram<u64>,
}

/// The controller's side: its shutdown signal, alive as long as the task is.
#[derive(Debug, Default)]
pub(crate) struct Control {
    pub(crate) notify: Notify,
    pub(crate) stopped: AtomicBool,
}

pub(crate) struct Shared {
    windows: Mutex<Windows>,
    /// The current rate or limit, as `f64` bits.
    value: AtomicU64,
    pub(crate) control: Arc<Control>,
}

impl fmt::Debug for Shared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Shared")
            .field("value", &self.value())
            .finish_non_exhaustive()
    }
}

/// What one window of samples gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Measured {
    /// The quantile, over the last window or the last two.
    Latency(Duration),
    /// Fewer samples than the minimum, even over two windows.
    TooFew(u64),
}

impl Shared {
    pub(crate) fn new(initial: f64) -> Arc<Self> {
        let hist = Histogram::new_with_max(MAX_MICROS, SIGFIG).expect("valid histogram bounds");
        Arc::new(Self {
            windows: Mutex::new(Windows {
                previous: hist.clone(),
                current: hist,
            }),
            value: AtomicU64::new(initial.to_bits()),
            control: Arc::new(Control::default()),
        })
    }

    pub(crate) fn record(&self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.windows.lock().current.saturating_record(micros);
    }

    /// Closes the current window: the `quantile` of its samples, or of it and the
    /// previous window together when it alone has fewer than `min_samples`.
    pub(crate) fn rotate(&self, quantile: f64, min_samples: u64) -> Measured {
        let mut w = self.windows.lock();
        let w = &mut *w;
        let measured = if w.current.len() >= min_samples {
            Measured::Latency(Duration::from_micros(w.current.value_at_quantile(quantile)))
        } else if w.current.len() + w.previous.len() >= min_samples {
            let mut both = w.previous.clone();
            both.add(&w.current).expect("same bounds");
            Measured::Latency(Duration::from_micros(both.value_at_quantile(quantile)))
        } else {
            Measured::TooFew(w.current.len() + w.previous.len())
        };
        std::mem::swap(&mut w.current, &mut w.previous);
        w.current.reset();
        measured
    }

    /// Forgets every sample.
    pub(crate) fn clear(&self) {
        let mut w = self.windows.lock();
        w.current.reset();
        w.previous.reset();
    }

    pub(crate) fn value(&self) -> f64 {
        f64::from_bits(self.value.load(Ordering::Relaxed))
    }

    pub(crate) fn set_value(&self, v: f64) {
        self.value.store(v.to_bits(), Ordering::Relaxed);
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        // The last handle, layer or service is gone: end the controller now rather than
        // at its next tick.
        self.control.notify.notify_one();
    }
}
