//! Deadlines that cannot overflow: `aegis_core::time`'s, and a timeout clamped for code
//! that adds it to an `Instant` itself.

pub(crate) use aegis_core::time::deadline;

/// `timeout`, or some thirty years when adding it to now would pass what an
/// [`Instant`](tokio::time::Instant) holds: for a timeout handed to code that adds it to
/// an `Instant` itself (hyper's header read timeout).
#[cfg(feature = "sniff")]
pub(crate) fn clamp_timeout(timeout: std::time::Duration) -> std::time::Duration {
    if tokio::time::Instant::now().checked_add(timeout).is_some() {
        timeout
    } else {
        aegis_core::time::FAR_FUTURE
    }
}

#[cfg(all(test, feature = "sniff"))]
mod tests {
    use std::time::Duration;

    use aegis_core::time::FAR_FUTURE;

    use super::clamp_timeout;

    #[tokio::test(start_paused = true)]
    async fn a_timeout_past_any_instant_is_clamped() {
        assert_eq!(
            clamp_timeout(Duration::from_secs(5)),
            Duration::from_secs(5)
        );
        assert_eq!(clamp_timeout(Duration::MAX), FAR_FUTURE);
    }
}
