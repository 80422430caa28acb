//! When a message may go: quiet hours for SMS and the frequency cap of marketing messages.
//! A message they hold back is deferred (its due time moved), never dropped; the cap itself
//! is a reservation in `outbox::reserve_cap`. Quiet hours themselves are a
//! `domain::QuietHours`.

use crate::domain::Trigger;

/// Marketing messages (birthday, abandoned-cart) count against the frequency cap.
pub(crate) fn is_marketing(trigger: Trigger) -> bool {
    matches!(trigger, Trigger::Birthday | Trigger::AbandonedCart)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn birthday_and_abandoned_cart_are_marketing() {
        assert!(is_marketing(Trigger::Birthday) && is_marketing(Trigger::AbandonedCart));
        assert!(!is_marketing(Trigger::Welcome) && !is_marketing(Trigger::PointsExpiring));
    }
}
