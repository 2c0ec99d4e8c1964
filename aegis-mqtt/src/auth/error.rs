//! Why an authenticator could not decide.

use std::error::Error;
use std::sync::Arc;
use std::time::Duration;

/// A shared, clonable error source (one callout's error goes to every check sharing it).
pub type SharedError = Arc<dyn Error + Send + Sync + 'static>;

/// Why an authenticator could not decide. The gateway fails closed on each of them: the
/// client is refused with [`MqttError::AuthError`](crate::MqttError::AuthError)
/// (CONNACK 0x05 / 0x87). Never cached.
///
/// Cheap to clone: the checks that shared one callout all get its error.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// The authenticator did not answer within the layer's
    /// [`timeout`](super::AuthLayer::timeout).
    #[error("authenticator timed out after {0:?}")]
    Timeout(Duration),
    /// The authentication service could not be reached.
    #[error("authentication service unreachable")]
    Unavailable(#[source] SharedError),
    /// The HTTP service answered with a status that is neither 2xx, 401 nor 403.
    #[error("authentication service answered status {0}")]
    Status(u16),
    /// The credentials or the configuration cannot be sent as asked.
    #[error("invalid authentication request: {0}")]
    Invalid(&'static str),
    /// Any other failure of the authenticator.
    #[error("authenticator failed")]
    Failed(#[source] SharedError),
    /// The client's address had the most checks in flight already (the layer's
    /// [`max_checks_per_addr`](super::AuthLayer::max_checks_per_addr), the number given
    /// here): the check was refused at once, without reaching the authenticator. Unlike
    /// the other errors this is the client's doing (a flood of new credentials), and it is
    /// reported with severity `medium`, counted toward a ban.
    #[error("too many checks in flight from the client's address (at most {0})")]
    TooManyChecks(usize),
}

impl AuthError {
    /// A stable, low-cardinality label: `timeout`, `unavailable`, `status`, `invalid`,
    /// `failed` or `too_many_checks`.
    pub const fn label(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Status(_) => "status",
            Self::Invalid(_) => "invalid",
            Self::Failed(_) => "failed",
            Self::TooManyChecks(_) => "too_many_checks",
        }
    }

    /// Whether this is a [`Timeout`](Self::Timeout).
    pub const fn is_timeout(&self) -> bool {
        matches!(self, Self::Timeout(_))
    }

    /// Whether this is [`TooManyChecks`](Self::TooManyChecks): the client's doing, not
    /// the authenticator's.
    pub const fn is_too_many_checks(&self) -> bool {
        matches!(self, Self::TooManyChecks(_))
    }

    /// An authenticator's error as an `AuthError`: itself if it is one, else
    /// [`Failed`](Self::Failed).
    pub(crate) fn from_boxed(e: aegis_core::BoxError) -> Self {
        match e.downcast::<Self>() {
            Ok(e) => *e,
            Err(e) => Self::Failed(Arc::from(e)),
        }
    }
}
