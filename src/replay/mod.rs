//! Replay: building a projector version's tables from the event store in its
//! own schema, in batches with a durable checkpoint
//! (docs/decisions/0002-checkpoint-horizon.md and 0005-replay-batches.md).
//!
//! * [`start_replay`] registers a version (row, schema, tables,
//!   `replaying_version`); [`abort`] drops it.
//! * [`run_pass`] applies the events visible in one snapshot, batch by
//!   batch; [`catch_up`] runs passes until the lag is small;
//!   [`replay_many`] does both for several versions, `jobs` at a time;
//!   [`catch_up_configured`] catches up a configuration's replaying and
//!   active versions (inline ones get what bypassed their publishers).
//! * For activation: [`pass_in_transaction`] runs a final pass inside the
//!   caller's transaction, and [`checkpoint_through_current_snapshot`] marks
//!   a version as up to date (no longer needed by activation: every version
//!   keeps an exact checkpoint, docs/decisions/0009-inline-checkpoints.md).
//!
//! This module never activates a version and never changes `active_version`.
//!
//! ```no_run
//! # async fn demo(pool: deadpool_postgres::Pool, mut client: tokio_postgres::Client,
//! #               projector: std::sync::Arc<dyn coord::Projector>) -> coord::Result<()> {
//! use coord::replay::{catch_up, start_replay, ReplayOptions};
//! let actor = coord::Actor::new("host", "deploy");
//! start_replay(&mut client, projector.as_ref(), &actor).await?;
//! let cancel = tokio_util::sync::CancellationToken::new();
//! let report = catch_up(&pool, projector.as_ref(), &coord::RelationName::default(),
//!                       &ReplayOptions::default(), &cancel).await?;
//! println!("applied {} events", report.applied);
//! # Ok(()) }
//! ```

mod apply;
mod batch;
mod catch_up;
mod in_transaction;
mod many;
mod options;
mod pass;
mod pipeline;
mod retry;
mod start;

pub use catch_up::catch_up;
pub use in_transaction::{checkpoint_through_current_snapshot, pass_in_transaction};
pub use many::{catch_up_configured, replay_many, CatchUpOutcome, ReplayDone, ReplayOutcome};
pub use options::{
    CatchUpReport, PassReport, Progress, ProgressFn, ReplayOptions, DEFAULT_BATCH_BYTES,
};
pub use pass::run_pass;
pub use start::{
    abort, abort_in, abort_with, start_replay, start_replay_in, AbortReport, ReplayStart,
    StartOutcome,
};
pub use tokio_util::sync::CancellationToken;
