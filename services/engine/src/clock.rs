//! The engine's wall clock, one seam for every "now" the engine, the API
//! and the workers read (clippy's `disallowed-methods` keeps them here).
//! It is the system's clock, except on a thread where the simulator
//! (`services/sim`) installed a simulated one: that clock starts at a fixed
//! instant and follows tokio's (paused) time, so that a seed's run depends
//! neither on the machine's speed nor on the date.

use chrono::{DateTime, Utc};
use std::cell::Cell;

thread_local! {
    /// The simulated clock of this thread: its start, and tokio's instant then.
    static SIMULATED: Cell<Option<(DateTime<Utc>, tokio::time::Instant)>> = const { Cell::new(None) };
}

/// Now, on the system's clock or this thread's simulated one.
pub fn now() -> DateTime<Utc> {
    match SIMULATED.with(Cell::get) {
        Some((epoch, started)) => {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(started);
            epoch + chrono::Duration::from_std(elapsed).unwrap_or_default()
        }
        #[allow(clippy::disallowed_methods)]
        None => Utc::now(),
    }
}

/// Seconds since the Unix epoch, now.
pub fn unix_seconds() -> u64 {
    u64::try_from(now().timestamp()).unwrap_or(0)
}

/// From now on, this thread's clock starts at `epoch` and follows tokio's
/// time (the simulator's, on its current-thread runtime); `None` gives the
/// thread the system's clock back.
pub fn simulate(epoch: Option<DateTime<Utc>>) {
    SIMULATED.with(|s| s.set(epoch.map(|e| (e, tokio::time::Instant::now()))));
}

/// Moves this thread's simulated clock by `by` (either way), as an NTP
/// step or an operator would move a machine's; the system's clock is not
/// touched.
pub fn jump(by: chrono::Duration) {
    SIMULATED.with(|s| {
        if let Some((epoch, started)) = s.get() {
            s.set(Some((epoch + by, started)));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_simulated_clock_follows_tokio_time_from_its_epoch() {
        let epoch = DateTime::from_timestamp(1_000_000, 0).unwrap_or_default();
        simulate(Some(epoch));
        assert_eq!(now(), epoch);
        tokio::time::sleep(std::time::Duration::from_secs(90)).await;
        assert_eq!(now(), epoch + chrono::Duration::seconds(90));
        jump(chrono::Duration::seconds(-30));
        assert_eq!(now(), epoch + chrono::Duration::seconds(60));
        simulate(None);
        assert!(now() > epoch + chrono::Duration::days(365));
    }
}
