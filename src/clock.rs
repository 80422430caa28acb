//! The one clock of business time: the system's, or fixed by `LIFECYCLE_NOW`.
//!
//! Everything that decides *when* (due times, quiet hours, birthdays) asks this clock, never
//! `Utc::now()` or PostgreSQL's `now()`, so tests and demos can fix time. Leases and timeouts are
//! about real elapsed time and do not use it.

use chrono::{DateTime, Utc};

/// Source of "now" for business decisions.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock.
    System,
    /// A fixed instant.
    Fixed(DateTime<Utc>),
}

impl Clock {
    /// The clock of these settings: fixed when `now` is set.
    pub fn from_setting(now: Option<crate::config::Instant>) -> Clock {
        now.map_or(Clock::System, |t| Clock::Fixed(t.0))
    }

    /// The current business time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => *t,
        }
    }
}
