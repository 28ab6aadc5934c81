//! Time as the worker uses it. Everything that waits (probe intervals, heartbeats, backoff,
//! connection_lifetime, schedule checks) runs on the monotonic clock, which no change of the
//! wall clock moves; only what is recorded (sample timestamps, stats.json) reads the wall clock.
//!
//! One recorded time is also checked: the PEM server refuses a heartbeat whose `sent_at` is
//! more than a few minutes from its own clock, or not newer than the last one it accepted (so a
//! captured heartbeat cannot be replayed). Read from the wall clock alone, a step back (an NTP
//! correction, a manual change) would make every heartbeat look like a replay until the clock
//! caught up again, and the agent would show as down. [`SentAt`] therefore carries on from the
//! last heartbeat the server accepted, on the monotonic clock; it reads the wall clock again
//! only when none was accepted yet, or the server refused one (its clock and ours disagree: the
//! wall clock is then the better guess).

use std::time::Instant;

use chrono::{DateTime, Utc};

/// Timestamps for heartbeats: see the module documentation.
#[derive(Debug, Default, Clone)]
pub struct SentAt {
    /// The last timestamp the server accepted, and when (monotonic) it was made.
    anchor: Option<(DateTime<Utc>, Instant)>,
}

impl SentAt {
    /// The timestamp for a heartbeat sent now, and the monotonic instant it stands for (to pass
    /// to [`SentAt::accepted`]).
    pub fn next(&self) -> (DateTime<Utc>, Instant) {
        let now = Instant::now();
        (self.at(Utc::now(), now), now)
    }

    fn at(&self, wall: DateTime<Utc>, now: Instant) -> DateTime<Utc> {
        match self.anchor {
            Some((sent, made)) => {
                let elapsed = now.saturating_duration_since(made);
                sent + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::zero())
            }
            None => wall,
        }
    }

    /// The server accepted the heartbeat stamped `sent` (made at `made`).
    pub fn accepted(&mut self, sent: DateTime<Utc>, made: Instant) {
        self.anchor = Some((sent, made));
    }

    /// The server refused a heartbeat: the next one reads the wall clock.
    pub fn refused(&mut self) {
        self.anchor = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn after_an_accepted_heartbeat_steps_of_the_wall_clock_do_not_move_the_stamps() {
        let mut clock = SentAt::default();
        let t0 = Instant::now();
        let wall = DateTime::parse_from_rfc3339("2026-03-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let first = clock.at(wall, t0);
        assert_eq!(first, wall, "nothing accepted yet: the wall clock");
        clock.accepted(first, t0);
        for (step, later) in [(-3600, 5), (3600, 10), (-30, 15)] {
            let stepped = wall + chrono::Duration::seconds(step + later);
            let stamp = clock.at(stepped, t0 + Duration::from_secs(later as u64));
            assert_eq!(
                stamp,
                wall + chrono::Duration::seconds(later),
                "a step of {step} s"
            );
        }
        // Each stamp is newer than the one before, whatever the wall clock did.
        let a = clock.at(wall, t0 + Duration::from_millis(1));
        let b = clock.at(
            wall - chrono::Duration::hours(1),
            t0 + Duration::from_millis(2),
        );
        assert!(b > a && a > first);
    }

    #[test]
    fn a_refusal_goes_back_to_the_wall_clock() {
        let mut clock = SentAt::default();
        let t0 = Instant::now();
        let wall = Utc::now();
        clock.accepted(wall - chrono::Duration::hours(2), t0);
        clock.refused();
        assert_eq!(clock.at(wall, t0 + Duration::from_secs(1)), wall);
    }
}
