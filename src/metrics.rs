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

/// The Prometheus exposition: the process's labelled metrics (the `metrics` crate's global
/// recorder, rendered by `metrics-exporter-prometheus` at `/metrics`). Installed once per
/// process; every worker and task in it reports into the same registry.
pub(crate) fn prometheus() -> &'static metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
        let latency = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let end_to_end = [
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0,
        ];
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("lifecycle_provider_latency_seconds".into()),
                &latency,
            )
            .and_then(|b| {
                b.set_buckets_for_metric(
                    Matcher::Full("lifecycle_event_to_send_seconds".into()),
                    &end_to_end,
                )
            })
            .expect("static buckets")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder installed first (a test harness's) keeps its place; this handle
        // then renders an empty page rather than failing the process.
        metrics::set_global_recorder(recorder).ok();
        describe();
        handle
    })
}

/// Help texts and units.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "lifecycle_events_total",
        "Events consumed, by type (invalid when unparsable) and outcome (applied, duplicate, deferred, dead_lettered)."
    );
    describe_counter!(
        "lifecycle_dead_letters_total",
        "Events dead-lettered, by reason class (malformed, refused, gave_up)."
    );
    describe_counter!(
        "lifecycle_messages_planned_total",
        "Messages planned, by trigger and channel."
    );
    describe_counter!(
        "lifecycle_messages_total",
        "Messages settled, by status (sent, failed, suppressed, deferred, retried), provider and trigger."
    );
    describe_histogram!(
        "lifecycle_provider_latency_seconds",
        Unit::Seconds,
        "How long each provider call took, by provider and outcome."
    );
    describe_histogram!(
        "lifecycle_event_to_send_seconds",
        Unit::Seconds,
        "From a message being planned (its event applied, or its scan) to a provider accepting it, by trigger and channel."
    );
    describe_gauge!(
        "lifecycle_outbox_messages",
        "Messages in the outbox, by status."
    );
    describe_gauge!(
        "lifecycle_outbox_due_messages",
        "Pending messages due now (not those waiting for quiet hours or a retry's backoff)."
    );
    describe_gauge!(
        "lifecycle_queue_messages",
        "Messages ready in the broker's queues (events, retry, dead)."
    );
    describe_gauge!(
        "lifecycle_queue_consumers",
        "Consumers on the broker's queues (events, retry, dead)."
    );
    describe_counter!(
        "lifecycle_reconnects_total",
        "Sessions to the broker that ended and were made anew, by component."
    );
    describe_gauge!(
        "lifecycle_provider_circuit_open",
        "1 while a provider's circuit breaker is open (it is skipped), else 0."
    );
    describe_gauge!(
        "lifecycle_coupons_remaining",
        "Coupon codes not yet drawn, by pool."
    );
    describe_counter!(
        "lifecycle_coupon_pool_low_total",
        "Coupon draws that left their pool at or below program.coupon_low_water, by pool."
    );
    describe_counter!(
        "lifecycle_coupon_pool_empty_total",
        "Messages planned without a code because their pool was empty, by pool."
    );
    describe_counter!(
        "lifecycle_scans_total",
        "Scheduled scans run, by scan and result (ok, failed)."
    );
    describe_gauge!(
        "lifecycle_results_writer_stuck",
        "1 while the dispatcher's results writer has failed for longer than dispatch.writer_stuck_ms, else 0."
    );
    describe_gauge!(
        "lifecycle_notifications_unpublished",
        "Notifications recorded but not yet published to the notifications exchange."
    );
    describe_gauge!(
        "lifecycle_notifications_oldest_unpublished_seconds",
        "How long the oldest unpublished notification has waited (0 when none)."
    );
    describe_gauge!(
        "lifecycle_notifications_posts_pending",
        "Notifications waiting for a successful POST to LIFECYCLE_NOTIFY_URL."
    );
    describe_gauge!(
        "lifecycle_notifications_oldest_post_seconds",
        "How long the oldest notification waiting for its POST has waited (0 when none)."
    );
    describe_gauge!(
        "lifecycle_notifications_posts_dead",
        "Notifications whose POSTs were given up on after notifications.dead_after_hours."
    );
    describe_counter!(
        "lifecycle_notifications_published_total",
        "Notifications the broker confirmed, by type."
    );
    describe_counter!(
        "lifecycle_notifications_posts_total",
        "POSTs of notifications, by outcome (delivered, failed, dead)."
    );
    describe_counter!(
        "lifecycle_results_dropped_total",
        "Results the database refused even without their texts: their claims lapse and the messages go again."
    );
}

#[cfg(test)]
mod tests {
    /// Every metric the alert rules and the dashboard use is one this process describes (and
    /// so records): a renamed metric cannot leave an alert silently watching nothing.
    #[test]
    fn the_alerts_and_the_dashboard_use_only_metrics_that_exist() {
        let source = include_str!("metrics.rs");
        for (file, text) in [
            (
                "alerts.yml",
                include_str!("../deploy/prometheus/alerts.yml"),
            ),
            (
                "lifecycle.json",
                include_str!("../deploy/grafana/lifecycle.json"),
            ),
        ] {
            let mut found = 0;
            for (at, _) in text.match_indices("lifecycle_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                let name = ["_bucket", "_count", "_sum"]
                    .iter()
                    .fold(name.as_str(), |n, suffix| {
                        n.strip_suffix(suffix).unwrap_or(n)
                    });
                if name == "lifecycle_" {
                    continue;
                }
                found += 1;
                assert!(
                    source.contains(&format!("\"{name}\"")),
                    "{file} uses {name}, which lifecycle does not record"
                );
            }
            assert!(found > 5, "{file} names the metrics");
        }
    }
}
