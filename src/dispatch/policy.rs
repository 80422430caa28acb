//! When a message may go: quiet hours for SMS and the frequency cap of marketing messages.
//! Pure functions of the member's zone, the last send and the time; a message they hold back
//! is deferred (its due time moved), never dropped. Quiet hours themselves are a
//! `domain::QuietHours`.

use chrono::{DateTime, Duration, Utc};

use crate::domain::Trigger;

/// Marketing messages (birthday, abandoned-cart) count against the frequency cap.
pub fn is_marketing(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Birthday | Trigger::AbandonedCart)
}

/// When a marketing message may go, if not now: `cap` after the last one sent to the member on
/// the channel.
pub fn cap_until(
    last_sent: Option<DateTime<Utc>>,
    cap: Duration,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let next = last_sent? + cap;
    (next > now).then_some(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(d: u32, h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, d, h, m, 0).unwrap()
    }

    #[test]
    fn the_cap_counts_from_the_last_marketing_send() {
        let cap = Duration::hours(16);
        assert_eq!(cap_until(None, cap, at(22, 10, 0)), None);
        assert_eq!(
            cap_until(Some(at(22, 9, 0)), cap, at(22, 10, 0)),
            Some(at(23, 1, 0))
        );
        assert_eq!(cap_until(Some(at(21, 18, 0)), cap, at(22, 10, 0)), None);
        assert!(is_marketing(Trigger::Birthday) && is_marketing(Trigger::AbandonedCart));
        assert!(!is_marketing(Trigger::Welcome) && !is_marketing(Trigger::PointsExpiring));
    }
}
