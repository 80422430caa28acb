//! Process counters: what ingest and dispatch did since start.

use std::sync::atomic::{AtomicU64, Ordering};

/// Counters shared by every task of a process.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Events that changed state.
    pub events_applied: AtomicU64,
    /// Redelivered or republished events whose id was already applied.
    pub events_duplicate: AtomicU64,
    /// Early events sent to wait in the retry queue.
    pub events_deferred: AtomicU64,
    /// Events refused to the dead-letter queue.
    pub events_dead_lettered: AtomicU64,
    /// Messages a provider accepted.
    pub messages_sent: AtomicU64,
    /// Messages recorded as suppressed (no consent, no address).
    pub messages_suppressed: AtomicU64,
    /// Messages that ended failed.
    pub messages_failed: AtomicU64,
    /// Transient failures that will be retried.
    pub messages_retried: AtomicU64,
    /// Scheduled scans this process ran (under the lease).
    pub scans_run: AtomicU64,
    /// Messages those scans planned (before outbox dedupe).
    pub scan_messages: AtomicU64,
}

impl Metrics {
    /// Adds one.
    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads a counter.
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// Events handled in any way (applied, duplicate, deferred or dead-lettered).
    pub fn events_handled(&self) -> u64 {
        Self::get(&self.events_applied)
            + Self::get(&self.events_duplicate)
            + Self::get(&self.events_deferred)
            + Self::get(&self.events_dead_lettered)
    }

    /// Messages that reached an end state.
    pub fn messages_finished(&self) -> u64 {
        Self::get(&self.messages_sent)
            + Self::get(&self.messages_suppressed)
            + Self::get(&self.messages_failed)
    }
}
