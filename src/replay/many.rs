//! Replaying several projector versions at once, at most `jobs` at a time:
//! each is registered ([`crate::replay::start_replay`]) and caught up
//! ([`crate::replay::catch_up`]), never activated. One failing version does
//! not stop the others; each gets its own result.

use std::sync::Arc;

use deadpool_postgres::Pool;
use futures_util::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::names::RelationName;
use crate::projector::Projector;
use crate::projector::{ProjectorExt, ProjectorSet};
use crate::replay::catch_up::catch_up;
use crate::replay::options::{CatchUpReport, ReplayOptions};
use crate::replay::start::{start_replay, ReplayStart, StartOutcome};
use crate::store::{states, Actor};
use crate::Result;

/// What became of one projector version in [`replay_many`].
#[derive(Debug)]
pub struct ReplayOutcome {
    /// `name@version`.
    pub label: String,
    /// Registration and catch-up, or the error that stopped them.
    pub result: Result<ReplayDone>,
}

/// A replay that ran (or needed nothing).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReplayDone {
    /// What registration found.
    pub start: ReplayStart,
    /// The catch-up, unless the version was already active.
    pub catch_up: Option<CatchUpReport>,
}

/// Replays (or resumes) every projector of `projectors` that is not active,
/// at most `options.jobs` at a time, until each one's lag is below
/// `options.lag_threshold`. The pool needs two connections per job.
/// Results come back in the order of `projectors`.
pub async fn replay_many(
    pool: &Pool,
    projectors: &[Arc<dyn Projector>],
    event_store: &RelationName,
    options: &ReplayOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Vec<ReplayOutcome> {
    stream::iter(projectors.iter().cloned())
        .map(|projector| async move {
            let label = format!("{}@{}", projector.name(), projector.version());
            let result = replay_one(
                pool,
                projector.as_ref(),
                event_store,
                options,
                actor,
                cancel,
            )
            .await;
            ReplayOutcome { label, result }
        })
        .buffered(options.jobs.max(1))
        .collect()
        .await
}

async fn replay_one(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    options: &ReplayOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Result<ReplayDone> {
    let start = {
        let mut client = pool.get().await?;
        crate::migrate::ensure_writable(&**client).await?;
        crate::event_relation::check_event_store(&**client, event_store).await?;
        start_replay(&mut client, projector, actor).await?
    };
    if start.outcome == StartOutcome::AlreadyActive {
        return Ok(ReplayDone {
            start,
            catch_up: None,
        });
    }
    let report = catch_up(pool, projector, event_store, options, cancel).await?;
    Ok(ReplayDone {
        start,
        catch_up: Some(report),
    })
}

/// What became of one projector version in [`catch_up_configured`].
#[derive(Debug)]
pub struct CatchUpOutcome {
    /// `name@version`.
    pub label: String,
    /// The catch-up, or the error that stopped it.
    pub result: Result<CatchUpReport>,
}

/// Catches up every projector of `projectors` whose configured version is
/// replaying or active (inline versions included: they get the events that
/// bypassed their publishers), one after the other, until each one's lag is
/// below `options.lag_threshold`. One failing version does not stop the
/// others. Versions neither replaying nor active are left out.
///
/// # Errors
/// Database and pool errors while reading the states; each version's own
/// failure is in its [`CatchUpOutcome`].
pub async fn catch_up_configured(
    pool: &Pool,
    projectors: &ProjectorSet,
    event_store: &RelationName,
    options: &ReplayOptions,
    cancel: &CancellationToken,
) -> Result<Vec<CatchUpOutcome>> {
    let mut targets = Vec::new();
    {
        let client = pool.get().await?;
        crate::store::ensure_migrated(&**client).await?;
        for p in projectors.iter() {
            let version = p.version().to_string();
            let state = states::get(&**client, p.name().as_str(), false).await?;
            let followed = state.is_some_and(|s| {
                s.replaying_version.as_deref() == Some(version.as_str())
                    || s.active_version.as_deref() == Some(version.as_str())
            });
            if followed {
                targets.push(Arc::clone(p));
            }
        }
    }
    let mut outcomes = Vec::with_capacity(targets.len());
    for p in targets {
        let result = catch_up(pool, p.as_ref(), event_store, options, cancel).await;
        outcomes.push(CatchUpOutcome {
            label: p.label(),
            result,
        });
    }
    Ok(outcomes)
}
