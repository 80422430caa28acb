//! The one clock of business time: the system's, or fixed by `LIFECYCLE_NOW`.
//!
//! Everything that decides *when* (due times, quiet hours, birthdays, scans) asks this clock,
//! never `Utc::now()` or PostgreSQL's `now()`, so tests and demos can fix time. Leases and
//! timeouts are about real elapsed time and do not use it.

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// Source of "now" for business decisions. Clones share one fixed instant, so a demo or test
/// that moves it moves it for every part of the worker.
#[derive(Debug, Clone)]
pub enum Clock {
    /// The system clock.
    System,
    /// A fixed instant, moved only by `set`.
    Fixed(Arc<Mutex<DateTime<Utc>>>),
}

impl Clock {
    /// The clock of these settings: fixed when `now` is set.
    pub fn from_setting(now: Option<crate::domain::Instant>) -> Clock {
        now.map_or(Clock::System, |t| Clock::fixed(t.0))
    }

    /// A clock fixed at `t`.
    pub fn fixed(t: DateTime<Utc>) -> Clock {
        Clock::Fixed(Arc::new(Mutex::new(t)))
    }

    /// The current business time.
    pub fn now(&self) -> DateTime<Utc> {
        match self {
            Clock::System => Utc::now(),
            Clock::Fixed(t) => *t.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Moves a fixed clock to `t` (demos and tests: "an hour later…").
    ///
    /// # Panics
    /// On the system clock, which cannot be moved.
    pub fn set(&self, to: DateTime<Utc>) {
        match self {
            Clock::System => panic!("only a fixed clock (LIFECYCLE_NOW) can be moved"),
            Clock::Fixed(t) => *t.lock().unwrap_or_else(|e| e.into_inner()) = to,
        }
    }

    /// Whether time stands still unless moved.
    pub fn is_fixed(&self) -> bool {
        matches!(self, Clock::Fixed(_))
    }
}
