use tower_layer::Layer;

use super::{Security, SecurityService};

/// Applies [`SecurityService`] to a byte-stream service: refuses banned client addresses
/// before reading a byte, counts connects toward the detector, and gives the connection a
/// security context (for the MQTT layer's client id and username bans, and for the events
/// of the layers inside). See the [module docs](super) for an example and for where it
/// goes in a stack.
///
/// Every service built from one layer shares its [`Security`]. A layer is cheap to clone.
#[derive(Debug, Clone)]
#[must_use]
pub struct SecurityLayer {
    security: Security,
}

impl SecurityLayer {
    /// A layer over `security` (keep a clone of it as the handle).
    pub const fn new(security: Security) -> Self {
        Self { security }
    }
}

impl<S> Layer<S> for SecurityLayer {
    type Service = SecurityService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SecurityService::new(inner, self.security.clone())
    }
}
