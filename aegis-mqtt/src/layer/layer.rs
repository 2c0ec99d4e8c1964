use std::time::Duration;

use tower_layer::Layer;

use super::{DEFAULT_CONNECT_TIMEOUT, Mqtt};
use crate::Config;

/// Applies [`Mqtt`] to a byte-stream service: validates the CONNECT and every later
/// client packet. See the [module docs](super) for an example.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub struct MqttLayer {
    pub(super) config: Config,
    pub(super) connect_timeout: Duration,
}

impl MqttLayer {
    /// Validates with `config`, and gives a client 10 s to send its CONNECT.
    pub const fn new(config: Config) -> Self {
        Self {
            config,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// How long a client has to send a complete CONNECT (and to take the answer to a
    /// refused one).
    pub const fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }
}

impl Default for MqttLayer {
    fn default() -> Self {
        Self::new(Config::new())
    }
}

impl<S> Layer<S> for MqttLayer {
    type Service = Mqtt<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Mqtt {
            inner,
            layer: *self,
        }
    }
}
