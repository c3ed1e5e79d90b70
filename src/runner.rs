//! `coord run`: keeps every active version of the configuration up to date
//! by tailing the event store: async versions fully, inline versions for the
//! events that bypassed their publishers (SQL inserts after
//! `coord.check_publish`, bulk imports, publishers of other configurations;
//! docs/decisions/0009-inline-checkpoints.md). One leader per projector
//! version across processes (a session advisory lock on a dedicated
//! connection; a standby takes over when the leader's connection goes away).
//! A runner stops by itself once a newer version of its projector is active.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures_util::future::join_all;
use semver::Version;
use tokio_util::sync::CancellationToken;

use crate::config::DatabaseUrl;
use crate::locks::key;
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt, ProjectorSet};
use crate::replay::{catch_up, ReplayOptions};
use crate::store::states;
use crate::{Error, Result};

const TRY_LEAD: &str = concat!(
    "SELECT pg_try_advisory_lock(",
    key!(runner_leader),
    ", hashtext($1))"
);

/// How [`run_projectors`] runs.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Pause between polls of the store when idle, and between leadership attempts.
    pub poll: Duration,
    /// Batch settings of the catch-up passes.
    pub replay: ReplayOptions,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            poll: Duration::from_millis(200),
            replay: ReplayOptions {
                lag_threshold: 1,
                ..ReplayOptions::default()
            },
        }
    }
}

/// How one projector's runner ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RunnerExit {
    /// `name@version`.
    pub projector: String,
    /// Events it applied while leading.
    pub applied: u64,
    /// Why it stopped: `cancelled` or `superseded by X`.
    pub reason: String,
}

/// Follows every projector of `projectors` while its configured version is
/// active, until `cancel` fires or a newer version of it is active: an async
/// version gets every event, an inline one the events its publishers did not
/// apply (a pass skips what they recorded in `coord.applied_ahead`). Each
/// pass also moves the version's horizon and prunes `applied_ahead`.
///
/// # Errors
/// [`Error::InvalidInput`] when `projectors` is empty; the first error of a
/// runner (handler failures, database errors).
pub async fn run_projectors(
    pool: &Pool,
    url: &DatabaseUrl,
    projectors: &ProjectorSet,
    event_store: &RelationName,
    options: &RunOptions,
    cancel: &CancellationToken,
) -> Result<Vec<RunnerExit>> {
    let all: Vec<Arc<dyn Projector>> = projectors.iter().cloned().collect();
    if all.is_empty() {
        return Err(Error::InvalidInput(
            "this configuration has no projector: nothing for coord run to do".into(),
        ));
    }
    {
        let client = pool.get().await?;
        crate::migrate::ensure_writable(&**client).await?;
        crate::event_relation::check_event_store(&**client, event_store).await?;
    }
    let runs = all
        .iter()
        .map(|p| run_one(pool, url, p.as_ref(), event_store, options, cancel));
    join_all(runs).await.into_iter().collect()
}

async fn run_one(
    pool: &Pool,
    url: &DatabaseUrl,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &RunOptions,
    cancel: &CancellationToken,
) -> Result<RunnerExit> {
    let label = projector.label();
    let mut exit = RunnerExit {
        projector: label.clone(),
        applied: 0,
        reason: "cancelled".into(),
    };
    // Dedicated connection: the leader lock lives as long as it does.
    let leader = crate::db::connect(url, Duration::from_secs(10)).await?;
    let mut leading = false;
    while !cancel.is_cancelled() {
        let active = {
            let client = pool.get().await?;
            states::get(&**client, projector.name().as_str(), false)
                .await?
                .and_then(|s| s.active_version)
        };
        match active.as_deref().map(Version::parse) {
            Some(Ok(active)) if &active > projector.version() => {
                exit.reason = format!("superseded by {active}");
                break;
            }
            Some(Ok(active)) if &active == projector.version() => {
                if !leading {
                    leading = leader.query_one(TRY_LEAD, &[&label]).await?.try_get(0)?;
                    if leading {
                        tracing::info!(projector = %label, "leading");
                    }
                }
                if leading {
                    match catch_up(pool, projector, event_store, &options.replay, cancel).await {
                        Ok(report) => {
                            exit.applied += report.applied;
                            if report.applied > 0 {
                                continue;
                            }
                        }
                        // A `coord catch-up` or an activation is passing over
                        // this version right now: try again at the next poll.
                        Err(Error::Busy(e)) => {
                            tracing::debug!(projector = %label, error = %e, "pass busy")
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            _ => {} // not active yet (or unreadable): wait for its activation
        }
        tokio::select! {
            () = cancel.cancelled() => {}
            () = tokio::time::sleep(options.poll) => {}
        }
    }
    Ok(exit)
}
