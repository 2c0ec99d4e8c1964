//! Deadlines that cannot overflow.

use std::time::Duration;

use tokio::time::Instant;

/// What a deadline past the range of an `Instant` becomes: some thirty years from now,
/// as `tokio::time::sleep` does.
const FAR_FUTURE: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `from + after`, or some thirty years from now when that is past what an [`Instant`]
/// holds (a user's `Duration::MAX` for "never"): never a panic.
pub(crate) fn deadline(from: Instant, after: Duration) -> Instant {
    from.checked_add(after)
        .unwrap_or_else(|| Instant::now() + FAR_FUTURE)
}

/// `timeout`, or some thirty years when adding it to now would pass what an
/// [`Instant`] holds: for a timeout handed to code that adds it to an `Instant` itself
/// (hyper's header read timeout).
#[cfg(feature = "sniff")]
pub(crate) fn clamp_timeout(timeout: Duration) -> Duration {
    if Instant::now().checked_add(timeout).is_some() {
        timeout
    } else {
        FAR_FUTURE
    }
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

    #[cfg(feature = "sniff")]
    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_any_instant_is_clamped() {
        assert_eq!(
            clamp_timeout(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(clamp_timeout(Duration::MAX), FAR_FUTURE);
    }
}
