//! Deadlines that cannot overflow, for every crate of Aegis.
//!
//! A user's `Duration::MAX` means "never"; added to an [`Instant`] it would panic. Here
//! it becomes some thirty years from now, as `tokio::time::sleep` does.
//!
//! ```
//! use std::time::Duration;
//! use aegis_core::time::{FAR_FUTURE, deadline};
//! use tokio::time::Instant;
//!
//! let now = Instant::now();
//! assert_eq!(deadline(now, Duration::from_secs(5)), now + Duration::from_secs(5));
//! assert!(deadline(now, Duration::MAX) >= now + FAR_FUTURE);
//! ```

use std::time::Duration;

use tokio::time::Instant;

/// What a deadline past the range of an `Instant` becomes: some thirty years from now.
pub const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `from + after`, or some thirty years from now when that is past what an [`Instant`]
/// holds (a user's `Duration::MAX` for "never"): never a panic.
pub fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(after)
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_duration_past_any_instant_is_thirty_years() {
        let now = Instant::now();
        assert_eq!(
            deadline(now, Duration::from_secs(5)),
            now + Duration::from_secs(5)
        );
        assert_eq!(deadline(now, Duration::MAX), now + FAR_FUTURE);
    }
}
