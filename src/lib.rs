//! # coord
//!
//! Run version N and N+1 of an event-sourced application side by side on one
//! PostgreSQL database during a rolling or blue-green upgrade.
//!
//! * [`migrate()`] creates the `coord` schema: `coord.projector_states` (which
//!   version of each projector is replaying, activating, active), the
//!   per-version table, the transition history, the bundled event store
//!   `coord.events` and the gate function `coord.check_publish`.
//! * A [`Projector`] (written in Rust, or a [`SqlProjector`] defined in
//!   `coord.toml`) builds read-model tables in its version's own schema
//!   ([`schema_name`]), so N and N+1 live side by side.
//! * [`replay`] builds a projector version's tables from the event store in
//!   batches with a durable checkpoint, and drops a replay ([`abort()`]).
//! * [`status()`] reports what every projector is doing; [`records`] reads
//!   coord's own tables (states, versions, transitions, parked events).
//! * [`activation`] activates, retires, rolls back and rebuilds versions,
//!   recording each change with the [`Actor`] that made it.
//!
//! ```no_run
//! # async fn demo() -> coord::Result<()> {
//! let config = coord::Config::load("coord.toml".as_ref())?;
//! let url = coord::resolve_database_url(None, Some(&config))?;
//! let mut client = coord::connect(&url, std::time::Duration::from_secs(10)).await?;
//! coord::migrate(&mut client).await?;
//! let report = coord::status(&client, &config.event_store).await?;
//! println!("{} projectors", report.projectors.len());
//! # Ok(()) }
//! ```

extern crate self as coord;

// The README's Rust examples compile as doc tests, exactly as printed.
#[cfg(all(doctest, feature = "cli"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub mod activation;
#[cfg(feature = "cli")]
pub mod cli;
// The CLI's modules name each other `crate::context`, `crate::output`, ...
// (they were the `coord` binary's modules); keep those paths working.
#[cfg(feature = "cli")]
use cli::{commands, context, output, progress};
pub mod config;
mod db;
mod error;
mod event_relation;
mod event_store;
pub mod gate;
#[doc(hidden)]
pub mod locks;
mod migrate;
pub mod names;
pub mod privileges;
pub mod projector;
mod publisher;
pub mod records;
pub mod replay;
mod runner;
pub mod schema_drop;
#[cfg(feature = "serve")]
pub mod serve;
mod sql_check;
mod status;
// Private: everything outside the crate goes through [`records`],
// [`Actor`], [`ensure_migrated`] and the operations.
pub(crate) mod store;
mod tls;
mod url_redact;

pub use config::{resolve_database_url, Config, DatabaseUrl, Mode, OnError, ProjectorConfig};
pub use db::{connect, pool, with_connect_timeout};
pub use error::{ConfigError, Error, Result, Steps};
pub use event_relation::{check_event_store, refresh_statistics, EVENT_COLUMNS};
/// A pass's query, for tests that inspect its plan (tests/it/replay.rs).
#[doc(hidden)]
pub use event_store::PassQuery;
pub use migrate::{ensure_writable, known_schema_version, migrate, MigrationReport};
pub use names::{
    check_event_type, quote_ident, quote_literal, schema_name, ProjectorName, RelationName,
};
pub use projector::{
    ApplyContext, Event, HandlerError, Phase, Projector, ProjectorExt, ProjectorSet, SqlProjector,
};
pub use publisher::{wait_out_activation, ExpectedVersion, NewEvent, Publisher, RetryPolicy};
pub use replay::{
    abort, abort_with, catch_up, checkpoint_through_current_snapshot, pass_in_transaction,
    replay_many, run_pass, start_replay, ReplayOptions,
};
/// The former name of [`run_projectors`], which now follows inline versions
/// too (for what bypassed their publishers).
pub use runner::run_projectors as run_async_projectors;
pub use runner::{run_projectors, RunOptions, RunnerExit};
pub use schema_drop::Dependents;
pub use status::{status, ProjectorStatus, StatusReport, VersionStatusReport};
pub use store::{ensure_migrated, Actor};
