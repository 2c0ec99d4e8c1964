use std::time::Duration;

use tower_layer::Layer;

use super::{Protocols, Sniff};

/// Applies [`Sniff`]: detect the protocol, pass allowed ones to the inner service,
/// reject the rest. See the [module docs](super) for an example.
#[derive(Debug, Clone, Copy)]
pub struct SniffLayer {
    pub(super) config: Config,
}

/// What detection reads and how long it waits; shared by the filter and the router.
#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    pub(super) allowed: Protocols,
    pub(super) timeout: Duration,
    pub(super) max_prefix: usize,
}

impl Config {
    pub(super) const fn new(allowed: Protocols) -> Self {
        Self {
            allowed,
            timeout: super::DEFAULT_TIMEOUT,
            max_prefix: super::DEFAULT_MAX_PREFIX,
        }
    }
}

impl SniffLayer {
    /// Allows `allowed` and rejects every other detection. Include
    /// [`Protocols::TIMEOUT`] or [`Protocols::UNKNOWN`] to let silent or unrecognised
    /// clients through (for a server-speaks-first protocol, say).
    pub const fn new(allowed: Protocols) -> Self {
        Self {
            config: Config::new(allowed),
        }
    }

    /// How long detection waits for enough bytes, in total (default 5 s). A client
    /// still undecided then is detected as [`Protocol::Timeout`](super::Protocol::Timeout).
    #[must_use]
    pub const fn timeout(mut self, timeout: Duration) -> Self {
        self.config.timeout = timeout;
        self
    }

    /// The most bytes detection reads (default 1024; raised to
    /// [`MAX_DECISION_LEN`](super::MAX_DECISION_LEN) if lower, by
    /// [`Detect::new`](super::future::Detect::new)). Bytes past the decision that arrived in the
    /// same read are replayed too, so a larger value saves the inner protocol a read;
    /// memory per sniffing connection is this many bytes.
    #[must_use]
    pub const fn max_prefix(mut self, bytes: usize) -> Self {
        self.config.max_prefix = bytes;
        self
    }
}

impl<S> Layer<S> for SniffLayer {
    type Service = Sniff<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Sniff::with_config(inner, self.config)
    }
}
