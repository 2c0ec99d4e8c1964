//! Typed rejections with stable, low-cardinality labels.
//!
//! Each layer rejects with its own small error type (a `thiserror` enum or struct) that
//! implements [`Reject`]: a constant layer name and a `label()` drawn from a fixed set of
//! strings. The layer wraps it with [`reject`], which counts it in
//! `aegis_rejections_total{layer, reason}` and returns a [`Rejected`] to use as the
//! service error.
//!
//! [`label_of`] maps *any* boxed error to its labels by walking the `source()` chain, so
//! the accept loop, the gateway and the tests agree on what to call an error, and an
//! attacker's input never becomes a metric label.
//!
//! # Example
//!
//! ```
//! use aegis_core::error::{Reject, label_of, reject, BoxError};
//!
//! #[derive(Debug, thiserror::Error)]
//! #[error("too many connections from this client")]
//! struct TooMany;
//!
//! impl Reject for TooMany {
//!     fn layer(&self) -> &'static str { "my_limit" }
//!     fn label(&self) -> &'static str { "too_many" }
//! }
//!
//! let err: BoxError = reject(TooMany).into();
//! assert_eq!(label_of(&*err), ("my_limit", "too_many"));
//! assert!(aegis_core::error::find::<TooMany>(&*err).is_some());
//! ```

use std::error::Error;
use std::fmt;

/// The error type of services that wrap other services, as in tower.
pub type BoxError = Box<dyn Error + Send + Sync + 'static>;

/// A typed rejection from one layer.
///
/// `layer()` and `label()` must return one of a small, fixed set of strings: they become
/// metric labels. Never put a client address, a client id or any other input in them;
/// put those in the error's fields and `Display` instead.
pub trait Reject: Error + Send + Sync + 'static {
    /// The layer that rejected, for example `"rate_limit"`.
    fn layer(&self) -> &'static str;
    /// Why, for example `"per_client"`.
    fn label(&self) -> &'static str;
}

/// A counted rejection: the error a layer returns when it refuses a connection.
///
/// `Display` and `source()` are those of the typed error inside, so
/// `err.to_string()` reads naturally and [`find`] reaches the typed error.
pub struct Rejected {
    inner: Box<dyn Reject>,
}

impl Rejected {
    /// Wraps a rejection that [`reject`] has counted already, without counting or logging
    /// it again: for an error returned more than once, such as every read of an IO
    /// wrapper after it refused the connection.
    pub fn uncounted<E: Reject>(err: E) -> Self {
        Self {
            inner: Box::new(err),
        }
    }

    /// The layer that rejected.
    pub fn layer(&self) -> &'static str {
        self.inner.layer()
    }

    /// The stable reason label.
    pub fn label(&self) -> &'static str {
        self.inner.label()
    }

    /// The typed error inside, if it is a `T`.
    pub fn downcast_ref<T: Reject>(&self) -> Option<&T> {
        let e: &(dyn Error + 'static) = &*self.inner;
        e.downcast_ref::<T>()
    }

    /// Whether the typed error inside is a `T`.
    pub fn is<T: Reject>(&self) -> bool {
        self.downcast_ref::<T>().is_some()
    }
}

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected")
            .field("layer", &self.layer())
            .field("reason", &self.label())
            .field("error", &self.inner)
            .finish()
    }
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.inner, f)
    }
}

impl Error for Rejected {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        Some(&*self.inner)
    }
}

/// Counts a rejection in `aegis_rejections_total{layer, reason}`, logs it at debug level
/// and wraps it for return from a service.
pub fn reject<E: Reject>(err: E) -> Rejected {
    let (layer, reason) = (err.layer(), err.label());
    metrics::counter!(crate::metrics::REJECTIONS_TOTAL, "layer" => layer, "reason" => reason)
        .increment(1);
    tracing::debug!(layer, reason, error = %err, "connection rejected");
    Rejected {
        inner: Box::new(err),
    }
}

/// The first error of type `T` in `err`'s chain, `err` included.
///
/// The chain is `source()`, except that an [`std::io::Error`] that wraps another error
/// (as IO wrappers do to report a rejection from `poll_read`) leads to that error:
/// `io::Error::source()` would skip it.
pub fn find<'a, T: Error + 'static>(err: &'a (dyn Error + 'static)) -> Option<&'a T> {
    chain(err).find_map(|e| e.downcast_ref::<T>())
}

/// `err`, then its causes, as [`find`] walks them: an [`std::io::Error`] that wraps
/// another error leads to that error, where `io::Error::source()` would skip it.
///
/// ```
/// use aegis_core::error::chain;
/// use std::io;
///
/// let inner = io::Error::from(io::ErrorKind::TimedOut);
/// let outer = io::Error::other(inner);
/// let kinds: Vec<_> = chain(&outer)
///     .filter_map(|e| e.downcast_ref::<io::Error>().map(io::Error::kind))
///     .collect();
/// assert_eq!(kinds, [io::ErrorKind::Other, io::ErrorKind::TimedOut]);
/// ```
pub fn chain<'a>(
    err: &'a (dyn Error + 'static),
) -> impl Iterator<Item = &'a (dyn Error + 'static)> {
    std::iter::successors(Some(err), |&e| match e.downcast_ref::<std::io::Error>() {
        Some(io) => match io.get_ref() {
            Some(inner) => Some(inner as &(dyn Error + 'static)),
            None => io.source(),
        },
        None => e.source(),
    })
}

/// Maps any error to its `(layer, reason)` labels.
///
/// Walks `err`'s `source()` chain and returns the labels of the first [`Rejected`] found
/// anywhere in it, else of the first known Aegis error (a proxy error). Other errors map to `("io", kind)` for an [`std::io::Error`]
/// (a fixed set of kinds), `("timeout", "elapsed")` for a tokio timeout, and
/// `("unknown", "unexpected")` otherwise.
pub fn label_of(err: &(dyn Error + 'static)) -> (&'static str, &'static str) {
    // A rejection anywhere in the chain wins over the proxy error or IO error that
    // carries it (a proxy's client-side read failing with an IO wrapper's refusal is
    // that refusal); then any other typed error.
    if let Some(r) = find::<Rejected>(err) {
        return (r.layer(), r.label());
    }
    #[cfg(feature = "proxy")]
    if let Some(p) = find::<crate::proxy::ProxyError>(err) {
        return ("proxy", p.label());
    }
    for e in chain(err) {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return ("io", io_kind_label(io.kind()));
        }
        if e.is::<tokio::time::error::Elapsed>() {
            return ("timeout", "elapsed");
        }
    }
    ("unknown", "unexpected")
}

/// A fixed label for an IO error kind.
pub fn io_kind_label(kind: std::io::ErrorKind) -> &'static str {
    use std::io::ErrorKind as K;
    match kind {
        K::ConnectionRefused => "connection_refused",
        K::ConnectionReset => "connection_reset",
        K::ConnectionAborted => "connection_aborted",
        K::BrokenPipe => "broken_pipe",
        K::TimedOut => "timed_out",
        K::UnexpectedEof => "unexpected_eof",
        K::InvalidData => "invalid_data",
        K::NotConnected => "not_connected",
        K::AddrInUse => "addr_in_use",
        K::AddrNotAvailable => "addr_not_available",
        K::PermissionDenied => "permission_denied",
        K::OutOfMemory => "out_of_memory",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Demo {
        #[error("client {0} is over its limit")]
        Over(String),
    }
    impl Reject for Demo {
        fn layer(&self) -> &'static str {
            "demo"
        }
        fn label(&self) -> &'static str {
            "over"
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Outer(#[source] BoxError);

    #[test]
    fn label_of_finds_rejections_anywhere_in_the_chain() {
        let e: BoxError = reject(Demo::Over("203.0.113.9".into())).into();
        assert_eq!(label_of(&*e), ("demo", "over"));
        // The input stays in the message, never in a label.
        assert_eq!(e.to_string(), "client 203.0.113.9 is over its limit");
        let outer: BoxError = Box::new(Outer(e));
        assert_eq!(label_of(&*outer), ("demo", "over"));
        assert!(find::<Demo>(&*outer).is_some());
    }

    #[test]
    fn label_of_sees_through_io_errors_that_carry_a_rejection() {
        // What an IO wrapper returns from poll_read when it rejects mid-stream.
        let io = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            reject(Demo::Over("x".into())),
        );
        assert_eq!(label_of(&io), ("demo", "over"));
        assert!(find::<Demo>(&io).is_some());
        let boxed: BoxError = Box::new(Outer(Box::new(io)));
        assert_eq!(label_of(&*boxed), ("demo", "over"));
        assert!(find::<Rejected>(&*boxed).is_some());
    }

    #[test]
    fn label_of_maps_io_and_unknown_errors() {
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert_eq!(label_of(&io), ("io", "connection_reset"));
        let other: BoxError = "boom".into();
        assert_eq!(label_of(&*other), ("unknown", "unexpected"));
    }

    #[test]
    fn reject_counts_by_layer_and_reason() {
        let rec = metrics_util::debugging::DebuggingRecorder::new();
        let snap = rec.snapshotter();
        metrics::with_local_recorder(&rec, || {
            let r = reject(Demo::Over("x".into()));
            assert!(r.is::<Demo>());
            let _ = reject(Demo::Over("y".into()));
        });
        let total: u64 = snap
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(k, ..)| k.key().name() == crate::metrics::REJECTIONS_TOTAL)
            .map(|(k, _, _, v)| {
                let labels: Vec<_> = k
                    .key()
                    .labels()
                    .map(|l| (l.key().to_owned(), l.value().to_owned()))
                    .collect();
                assert_eq!(
                    labels,
                    vec![
                        ("layer".into(), "demo".into()),
                        ("reason".into(), "over".into())
                    ]
                );
                match v {
                    metrics_util::debugging::DebugValue::Counter(c) => c,
                    _ => 0,
                }
            })
            .sum();
        assert_eq!(total, 2);
    }
}
