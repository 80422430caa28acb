//! lifecycle: loyalty lifecycle messaging. Events in from RabbitMQ, a points ledger in
//! PostgreSQL, templated email and SMS out through providers.
//!
//! # Layout
//!
//! In layers, lowest first (`docs/architecture.md`; `tests/layers.rs` checks that no module
//! imports a layer above its own):
//!
//! - vocabulary: `domain` values parsed once, `mask`, `shutdown`, `metrics`;
//! - settings, events and rules: `config`, `program`, `event`, `clock`;
//! - connections: `db`, `amqp`;
//! - pure decisions: `triggers`, `render`;
//! - stores, each owning its tables: `ledger`, `outbox`, `template_store`, `users`,
//!   `suppress`, `coupons`, `publish`;
//! - the shared handle: `app`;
//! - roles and what ops read: `ingest`, `dispatch`, `scheduler`, `dead_letters`,
//!   `queues`, `deliveries`, `report`;
//! - the process: `worker`, `http`, `bench`;
//! - the command line: `cli`, one file per group of verbs.
//!
//! Every module is private, and `pub(crate)` is the default: `unreachable_pub` (an error in
//! CI's clippy) refuses a `pub` that nothing outside can reach. `testkit` is what the tests and
//! fuzz targets may use, and `main` is the binary's.

#![warn(unreachable_pub)]

mod amqp;
mod app;
mod backoff;
mod bench;
mod cli;
mod clock;
mod config;
mod coupons;
mod db;
mod dead_letters;
mod deliveries;
mod dispatch;
mod domain;
mod event;
mod http;
mod ingest;
mod ledger;
mod mask;
mod metrics;
mod notifications;
mod notifier;
mod outbox;
mod program;
mod publish;
mod queues;
mod render;
mod report;
mod scheduler;
mod shutdown;
mod suppress;
mod template_store;
pub mod testkit;
mod triggers;
mod users;
mod worker;

pub use cli::main;
