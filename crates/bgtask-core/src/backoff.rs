//! The one reconnection backoff of every backend: exponential, capped, jittered.
//!
//! A backend that lost its connection waits [`reconnect_delay`] before each new attempt. The
//! wait doubles from [`INITIAL_BACKOFF`] with every failure, up to the backend's `max_backoff`,
//! and is then drawn between half and all of that step ("equal jitter"), so that the many
//! clients one outage cut off do not all come back in the same millisecond.

use std::time::Duration;

/// The step after the first failed attempt; it doubles with each further failure.
pub const INITIAL_BACKOFF: Duration = Duration::from_millis(50);

/// The step after `failures` failed attempts: none before the first failure, then
/// [`INITIAL_BACKOFF`] doubling up to `max`. Without jitter (see [`reconnect_delay`]).
pub fn backoff_step(failures: u32, max: Duration) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    let factor = 1u32 << (failures - 1).min(16);
    INITIAL_BACKOFF.saturating_mul(factor).min(max)
}

/// How long to wait before the next attempt after `failures` failed ones: a random duration
/// between half of [`backoff_step`] and all of it (zero before the first failure).
pub fn reconnect_delay(failures: u32, max: Duration) -> Duration {
    let step = backoff_step(failures, max);
    let half = step / 2;
    let spread = u64::try_from((step - half).as_micros()).unwrap_or(u64::MAX);
    half + Duration::from_micros(rand::random_range(0..=spread))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_cap() {
        let max = Duration::from_secs(2);
        assert_eq!(backoff_step(0, max), Duration::ZERO);
        assert_eq!(backoff_step(1, max), Duration::from_millis(50));
        assert_eq!(backoff_step(2, max), Duration::from_millis(100));
        assert_eq!(backoff_step(3, max), Duration::from_millis(200));
        assert_eq!(backoff_step(10, max), max);
        assert_eq!(backoff_step(u32::MAX, max), max);
    }

    #[test]
    fn delays_lie_between_half_and_all_of_the_step() {
        let max = Duration::from_secs(2);
        assert_eq!(reconnect_delay(0, max), Duration::ZERO);
        for failures in [1, 2, 5, 40] {
            let step = backoff_step(failures, max);
            let delays: Vec<Duration> = (0..200).map(|_| reconnect_delay(failures, max)).collect();
            assert!(
                delays.iter().all(|d| *d >= step / 2 && *d <= step),
                "{failures}"
            );
            assert!(delays.iter().any(|d| *d != delays[0]), "jittered");
        }
    }
}
