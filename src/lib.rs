//! lifecycle: loyalty lifecycle messaging. Events in from RabbitMQ, a points ledger in
//! PostgreSQL, templated email and SMS out through providers.
//!
//! # Layout
//!
//! In layers, lowest first (`docs/architecture.md`; `tests/layers.rs` checks that no module
//! imports a layer above its own):
//!
//! - vocabulary: [`domain`] values parsed once, [`mask`], [`shutdown`], [`metrics`];
//! - settings, events and rules: [`config`], [`program`], [`event`], [`clock`];
//! - connections: [`db`], [`amqp`];
//! - pure decisions: [`triggers`], [`render`];
//! - stores, each owning its tables: [`ledger`], [`outbox`], [`template_store`], [`users`],
//!   [`suppress`], [`coupons`], [`publish`];
//! - the shared handle: [`app`];
//! - roles and what ops read: [`ingest`], [`dispatch`], [`scheduler`], [`dead_letters`],
//!   [`queues`], [`deliveries`], [`report`];
//! - the process: [`worker`], [`http`], [`bench`](mod@bench);
//! - the command line: [`cli`], one file per group of verbs.

pub mod amqp;
pub mod app;
pub(crate) mod backoff;
pub mod bench;
pub mod cli;
pub mod clock;
pub mod config;
pub mod coupons;
pub mod db;
pub mod dead_letters;
pub mod deliveries;
pub mod dispatch;
pub mod domain;
pub mod event;
pub mod http;
pub mod ingest;
pub mod ledger;
pub mod mask;
pub mod metrics;
pub mod outbox;
pub mod program;
pub mod publish;
pub mod queues;
pub mod render;
pub mod report;
pub mod scheduler;
pub mod shutdown;
pub mod suppress;
pub mod template_store;
pub mod triggers;
pub mod users;
pub mod worker;
