//! Jittered exponential backoff between reconnection attempts.

use std::time::Duration;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid backoff bounds {min:?}..{max:?}: the minimum must be positive and not above the maximum"
)]
pub struct BoundsError {
    pub min: Duration,
    pub max: Duration,
}

/// Delays that double from `min` up to `max`, each drawn at random from its upper half, so that
/// hundreds of agents cut off together do not come back in lockstep.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Result<Backoff, BoundsError> {
        if min.is_zero() || min > max {
            return Err(BoundsError { min, max });
        }
        Ok(Backoff {
            min,
            max,
            current: min,
        })
    }

    /// The next delay, in `[current / 2, current]`, never above `max`.
    pub fn next_delay(&mut self) -> Duration {
        let upper = self.current;
        let lower = upper / 2;
        let span = (upper - lower).as_millis() as u64;
        let delay = lower + Duration::from_millis(fastrand::u64(0..=span));
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// After a success, start again from the minimum.
    pub fn reset(&mut self) {
        self.current = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_bad_bounds() {
        assert!(Backoff::new(Duration::ZERO, Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(2), Duration::from_secs(1)).is_err());
        assert!(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn delays_stay_within_bounds_and_grow_to_the_cap() {
        // Property over many random bounds and draws.
        for _ in 0..500 {
            let min = Duration::from_millis(fastrand::u64(1..5_000));
            let max = min + Duration::from_millis(fastrand::u64(0..60_000));
            let mut b = Backoff::new(min, max).unwrap();
            let mut ceiling = min;
            for _ in 0..40 {
                let d = b.next_delay();
                assert!(
                    d <= ceiling && d >= ceiling / 2,
                    "{d:?} outside [{:?}, {ceiling:?}]",
                    ceiling / 2
                );
                assert!(d <= max);
                ceiling = (ceiling * 2).min(max);
            }
            assert!(b.next_delay() >= max / 2, "reaches the cap");
            b.reset();
            assert!(b.next_delay() <= min);
        }
    }
}
