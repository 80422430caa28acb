//! What the integration tests and the fuzz targets use from the library. Every module is
//! private to the crate; beside `lifecycle::main` (the binary's), this is the one public path:
//! a test's view of the worker (starting it, its roles, its stores and scans, the values its
//! inputs parse into), not an API for other programs.

/// The broker's connection and topology.
pub mod amqp {
    pub use crate::amqp::{connect, declare_topology};
}

/// The shared handle and the roles a worker runs.
pub mod app {
    pub use crate::app::{App, Roles};
}

/// Settings.
pub mod config {
    pub use crate::config::{DatabaseUrl, Settings};
}

/// Coupon pools' counters.
pub mod coupons {
    pub use crate::coupons::POOL_EMPTY;
}

/// The pool, keyed transactions and test databases.
pub mod db {
    pub use crate::db::{begin_keyed, drop_database, pool};
}

/// One dispatcher step at a time, and its retry arithmetic.
pub mod dispatch {
    pub use crate::dispatch::{Dispatcher, Failure, Step, later};

    /// Providers' replies.
    pub mod providers {
        pub use crate::dispatch::providers::{MAX_RETRY_AFTER, parse_retry_after};
    }
}

/// Values parsed once.
pub mod domain {
    pub use crate::domain::{Email, Locale, MemberId, Phone, Trigger};
}

/// Where notifications go.
pub mod notifications {
    pub use crate::notifications::Sinks;
}

/// The event decoder, and the schemas of what it accepts.
pub mod event {
    pub use crate::event::{parse, schemas};
}

/// Twilio's signature, as the webhook checks it.
pub mod http {
    pub use crate::http::twilio_signature;
}

/// Applying what a scan decided.
pub mod ledger {
    pub use crate::ledger::{CartState, abandon_carts};
}

/// Masking for logs.
pub mod mask {
    pub use crate::mask::text;
}

/// The process's counters.
pub mod metrics {
    pub use crate::metrics::Metrics;
}

/// Claims, records and requeues.
pub mod outbox {
    pub use crate::outbox::{CLAIM, Requeue, Settled, Status, claim, record, renew, retry_failed};
}

/// Publishing events from a file.
pub mod publish {
    pub use crate::publish::events;
}

/// The queue snapshot ops read.
pub mod queues {
    pub use crate::queues::snapshot;
}

/// Templates and their sample contexts.
pub mod render {
    pub use crate::render::{Templates, sample_context};
}

/// The scheduled scans.
pub mod scheduler {
    pub use crate::scheduler::{Job, Scheduler, run_scan};
}

/// The worker process.
pub mod worker {
    pub use crate::worker::Worker;
}
