//! `lifecycle bench` end to end at a small size: every phase runs against the real broker,
//! database, smtp-sink and worker processes, and its JSON holds what the README says. Speed is
//! not asserted here; only that each figure was measured.

mod common;

use common::{TestEnv, cli};

#[test]
fn a_small_bench_runs_every_phase_and_reports_each_figure() {
    let env = TestEnv::new(&[]);
    let out = cli(
        &env,
        &[
            "bench",
            "--events",
            "3000",
            "--messages",
            "400",
            "--latency-seconds",
            "2",
            "--scale-out-events",
            "1000",
            "--json",
        ],
    );
    let report: serde_json::Value = serde_json::from_str(&out).expect("one JSON object");
    let number = |path: &str| {
        report
            .pointer(path)
            .and_then(|v| v.as_f64())
            .unwrap_or_else(|| panic!("{path} missing from {report}"))
    };
    assert_eq!(number("/events"), 3000.0);
    for rate in [
        "/publish_per_s",
        "/ceiling_per_s",
        "/ingest_per_s",
        "/end_to_end/events_per_s",
        "/scale_out/one_per_s",
        "/scale_out/two_per_s",
        "/dispatch_http/per_s",
    ] {
        assert!(number(rate) > 0.0, "{rate} in {report}");
    }
    let ratio = number("/ingest_ratio");
    assert!(
        (ratio - number("/ingest_per_s") / number("/ceiling_per_s")).abs() < 1e-9,
        "{report}"
    );
    // Ingest planned a welcome per enrolment at least, and each dispatch phase sent its share.
    assert!(number("/planned_messages") >= 1000.0, "{report}");
    assert_eq!(number("/dispatch_http/messages"), 400.0, "{report}");
    // smtp-sink is installed wherever the tests run (scripts/services).
    assert_eq!(number("/dispatch_smtp/messages"), 400.0, "{report}");
    // Latency was measured on real messages, in order.
    assert!(number("/latency/messages") > 0.0, "{report}");
    let (p50, p95, p99, max) = (
        number("/latency/p50_ms"),
        number("/latency/p95_ms"),
        number("/latency/p99_ms"),
        number("/latency/max_ms"),
    );
    assert!(
        0.0 < p50 && p50 <= p95 && p95 <= p99 && p99 <= max,
        "{report}"
    );
    assert!(number("/peak_rss_mib") > 0.0 && number("/machine/cores") >= 1.0);
}
