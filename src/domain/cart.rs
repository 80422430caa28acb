//! A cart as the ledger keeps it, and the keys of its abandoned-cart messages. Applying a
//! cart event to it is the ledger's (`ledger::carts`).

use chrono::{DateTime, Utc};

use super::{Channel, MemberId, Trigger, dedupe_key};

/// A cart as the ledger keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct CartState {
    /// The platform's cart id.
    pub cart_id: String,
    /// Its owner.
    pub member_id: MemberId,
    /// Updates applied so far.
    pub version: i32,
    /// Not checked out.
    pub open: bool,
    /// The newest event time seen.
    pub changed_at: DateTime<Utc>,
    /// When an abandoned-cart message is due if nothing changes.
    pub due_at: Option<DateTime<Utc>>,
    /// The version a message was planned for.
    pub notified_version: Option<i32>,
    /// Lines, as `[{sku, name, quantity, unit_price}]`.
    pub items: serde_json::Value,
    /// Value in minor units of `currency`.
    pub total_minor: i64,
    /// ISO 4217 code.
    pub currency: String,
    /// Where the customer resumes checkout (checked to be http or https at ingest).
    pub checkout_url: String,
}

impl CartState {
    /// Open, its timer run out by `now`, and no message planned for this version yet.
    pub fn is_due(&self, now: DateTime<Utc>) -> bool {
        self.open
            && self.notified_version != Some(self.version)
            && self.due_at.is_some_and(|d| d <= now)
    }

    /// The cart's part of the abandoned-cart dedupe key at `version`: cart, version.
    pub fn dedupe_part(&self, version: i32) -> String {
        format!("{}:{version}", self.cart_id)
    }

    /// Outbox keys of the message planned for this cart's notified version: a change to the
    /// cart cancels it if it has not gone yet.
    pub fn planned_keys(&self) -> Vec<String> {
        let Some(version) = self.notified_version else {
            return Vec::new();
        };
        let key = self.dedupe_part(version);
        [Channel::Email, Channel::Sms]
            .into_iter()
            .map(|channel| dedupe_key(Trigger::AbandonedCart, &key, channel))
            .collect()
    }
}
