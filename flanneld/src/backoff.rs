//! Retry delays: backon's exponential backoff, as a resettable iterator the
//! agent's loop and the Node watch poll.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// Doubles from `min` up to `max`, forever; `reset` starts again at `min`.
pub struct Backoff {
    builder: ExponentialBuilder,
    cur: ExponentialBackoff,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        let builder = ExponentialBuilder::default().with_min_delay(min).with_max_delay(max).without_max_times();
        Backoff { builder, cur: builder.build(), max }
    }

    pub fn delay(&mut self) -> Duration {
        self.cur.next().unwrap_or(self.max)
    }

    pub fn reset(&mut self) {
        self.cur = self.builder.build();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_its_cap() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let seq: Vec<u64> = (0..5).map(|_| b.delay().as_secs()).collect();
        assert_eq!(seq, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.delay().as_secs(), 1);
    }
}
