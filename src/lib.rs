//! lifecycle: loyalty lifecycle messaging. Events in from RabbitMQ, a points ledger in
//! PostgreSQL, templated email and SMS out through providers.
//!
//! # Layout
//!
//! In the order data moves:
//!
//! - [`config`]: typed settings, a file overlaid by `LIFECYCLE_` variables; [`program`], the
//!   loyalty programme's rules.
//! - [`event`]: the wire format (CloudEvents JSON) parsed into domain events ([`domain`]).
//! - [`ingest`]: AMQP topology, the batched consume loop, ack after commit, dead letters.
//! - [`ledger`]: member state; a batch of events applied in one transaction.
//! - [`triggers`]: pure functions from (before, event, after) to planned messages.
//! - [`render`]: Handlebars registries with locale fallback.
//! - [`dispatch`]: per message, consent, rendering, policy, providers; [`outbox`], its SQL
//!   (claim, renew, record, retry).
//! - [`report`]: the loyalty report (retention, repeat purchase, upsell, NPS, points, each
//!   trigger's conversions against its holdout), read from the ledger and the outbox.
//! - [`app`]: the shared handles and the worker's roles; [`demo`] and [`bench`] drive them.

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
pub mod demo;
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
