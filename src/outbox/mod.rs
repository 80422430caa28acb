//! The outbox: the only owner of `messages`, `delivery_attempts` and `marketing_caps`.
//! Planning enqueues here, dispatch claims, renews and records here, and ops search and
//! requeue here; nothing here decides what to send.
//!
//! A claim carries an owner token (one per dispatcher) and a lease in database time. Only the
//! owner renews or settles its claims, so a dispatcher whose lease lapsed (it stalled, or its
//! process died) cannot overwrite the work of the dispatcher that took the message over. A
//! message claimed again after its lease lapsed may have been sent by the lost owner (its
//! result was never recorded): the new claim records that earlier attempt as `unsure`, so
//! every possible duplicate is on record.
//!
//! Statements are checked against the schema when lifecycle compiles (`sqlx::query!`, with the
//! offline data in `.sqlx/`), except the two over `Filter` (search and requeue), whose
//! `where` clause is shared text.

mod caps;
mod claim;
mod enqueue;
mod record;
mod retry;
pub(crate) mod search;
mod upkeep;

pub(crate) use caps::{release_cap, reserve_cap};
pub use claim::{CLAIM, claim, renew};
pub(crate) use claim::{Claimed, Unreadable};
pub(crate) use enqueue::{Planned, TestSend, enqueue, enqueue_tests, test_sends_last_hour};
pub(crate) use record::Attempt;
pub use record::{Settled, record};
pub use retry::{Requeue, retry_failed};
pub(crate) use search::{attempts_of, message, provider_calls, search};
pub(crate) use upkeep::{
    cancel_pending, counts, due, prune_attempts, prune_messages, recent_calls, set_coupon_codes,
    set_provider_status, unsubscribed_address,
};

/// Where a message stands, stored as its lower-case name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::Type, serde::Serialize, utoipa::ToSchema)]
#[sqlx(type_name = "text", rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting to be due, or to be tried again.
    Pending,
    /// Claimed by a dispatcher.
    Sending,
    /// Taken by a provider.
    Sent,
    /// Not to be sent: no consent, no address, suppressed.
    Suppressed,
    /// Withdrawn before it went (a cart that changed).
    Cancelled,
    /// Failed for good, until ops requeue it.
    Failed,
    /// The trigger's control group: not sent, on purpose.
    HeldOut,
}

impl Status {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sending => "sending",
            Status::Sent => "sent",
            Status::Suppressed => "suppressed",
            Status::Cancelled => "cancelled",
            Status::Failed => "failed",
            Status::HeldOut => "held_out",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
