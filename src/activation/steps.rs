//! One step of `activate-current-config` (replay or catch up, verify,
//! activate; or retire), and what rollback shares with it.

use std::sync::Arc;
use std::time::Instant;

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::critical::back_to_replaying;
use super::lock::ActivationLock;
use super::plan::{Action, Step};
use super::run::{verify, ActivateOptions, StepReport};
use super::switch::{activate_version_fenced, retire_fenced, SwitchReport};
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt, ProjectorSet};
use crate::replay::{self, ReplayOptions};
use crate::store::versions::{self, VersionStatus};
use crate::store::{states, Actor};
use crate::{Error, Result};

/// What every step of one run shares.
pub(super) struct StepContext<'a> {
    pub pool: &'a Pool,
    pub projectors: &'a ProjectorSet,
    pub event_store: &'a RelationName,
    pub options: &'a ActivateOptions,
    pub actor: &'a Actor,
    pub cancel: &'a CancellationToken,
    pub lock: &'a ActivationLock,
}

/// Carries out `step`; `None` when it changed nothing.
pub(super) async fn run_step(ctx: &StepContext<'_>, step: &Step) -> Result<Option<StepReport>> {
    let StepContext {
        pool,
        projectors,
        event_store,
        options,
        actor,
        cancel,
        lock,
    } = *ctx;
    let report = match &step.action {
        Action::Refuse { .. } => return Ok(None),
        Action::NoChange => {
            // The active version may still lack events that bypassed
            // its publishers (SQL inserts, bulk imports): bring it up to date.
            let Some(projector) = projectors.get(&step.projector) else {
                return Ok(None);
            };
            // Nothing pending: write nothing, so a second run stays a no-op.
            let pending = {
                let client = pool.get().await?;
                crate::event_store::pending(
                    &**client,
                    projector.name().as_str(),
                    &projector.version().to_string(),
                    &projector.event_types(),
                    event_store,
                )
                .await?
            };
            if pending == 0 {
                return Ok(None);
            }
            let started = Instant::now();
            let caught = replay::catch_up(
                pool,
                projector.as_ref(),
                event_store,
                &options.replay,
                cancel,
            )
            .await?;
            if caught.applied == 0 && caught.parked == 0 {
                return Ok(None);
            }
            StepReport {
                projector: step.projector.clone(),
                version: step.version.clone(),
                action: "catch_up".into(),
                replayed_events: caught.applied,
                replay_seconds: started.elapsed().as_secs_f64(),
                switch: None,
            }
        }
        Action::Retire { .. } => StepReport {
            projector: step.projector.clone(),
            version: None,
            action: "retire".into(),
            replayed_events: 0,
            replay_seconds: 0.0,
            switch: Some(
                retire_fenced(pool, &step.projector, options.locks, actor, Some(lock)).await?,
            ),
        },
        action => {
            let projector = projectors.get(&step.projector).ok_or_else(|| {
                Error::Failed(format!(
                    "projector {} vanished from the set",
                    step.projector
                ))
            })?;
            let started = Instant::now();
            let why = match action {
                Action::Reactivate { .. } => Some("catching up to re-activate"),
                Action::ResumeActivation => Some("resuming an interrupted activation"),
                _ => None,
            };
            if let Some(why) = why {
                mark_replaying(pool, projector.as_ref(), actor, why, lock).await?;
            }
            let replayed =
                build(pool, projector, event_store, &options.replay, actor, cancel).await;
            if lock.lost().is_cancelled() {
                return Err(lock.lost_error(&format!("the replay of {}", projector.label())));
            }
            let replayed = replayed?;
            if cancel.is_cancelled() {
                return Err(Error::Cancelled {
                    during: format!("the replay of {}", projector.label()),
                });
            }
            let (extra, replay_seconds, switch) =
                verify_and_activate(ctx, projector.as_ref(), started).await?;
            StepReport {
                projector: step.projector.clone(),
                version: step.version.clone(),
                action: action_name(action).into(),
                replayed_events: replayed + extra,
                replay_seconds,
                switch: Some(switch),
            }
        }
    };
    Ok(Some(report))
}

/// What rollback and rebuild start with: the activation lock, then a
/// connection on which coord may write and the event store is usable.
///
/// # Errors
/// [`Error::Busy`] for the lock; as `ensure_writable` and `check_event_store`.
pub(super) async fn lock_and_check(
    pool: &Pool,
    url: &crate::config::DatabaseUrl,
    event_store: &RelationName,
    options: &ActivateOptions,
    actor: &Actor,
) -> Result<(ActivationLock, deadpool_postgres::Object)> {
    let lock = ActivationLock::acquire(url, actor, options.lock_wait).await?;
    let client = pool.get().await?;
    crate::migrate::ensure_writable(&**client).await?;
    crate::event_relation::check_event_store(&**client, event_store).await?;
    Ok((lock, client))
}

/// Verifies `projector`'s version, catches it up a last time outside the
/// critical section (so that what the critical section applies, with
/// publishers held back, stays small), and activates it. Returns the
/// events of the last catch-up, the seconds since `started` before the
/// flip, and the flip.
pub(super) async fn verify_and_activate(
    ctx: &StepContext<'_>,
    projector: &dyn Projector,
    started: Instant,
) -> Result<(u64, f64, SwitchReport)> {
    verify(ctx.pool, projector).await?;
    let last = ReplayOptions {
        lag_threshold: 1,
        max_passes: 3,
        count_total: false,
        progress: None,
        ..ctx.options.replay.clone()
    };
    let extra = replay::catch_up(ctx.pool, projector, ctx.event_store, &last, ctx.cancel).await;
    if ctx.lock.lost().is_cancelled() {
        return Err(ctx
            .lock
            .lost_error(&format!("the catch-up of {}", projector.label())));
    }
    let extra = extra?;
    let replay_seconds = started.elapsed().as_secs_f64();
    let switch = activate_version_fenced(
        ctx.pool,
        projector,
        ctx.event_store,
        ctx.options.locks,
        ctx.actor,
        Some(ctx.lock),
    )
    .await?;
    Ok((extra.applied, replay_seconds, switch))
}

/// A token cancelled when `cancel` is or when `lost` is (the activation lock's connection ended).
pub(super) fn linked(cancel: &CancellationToken, lost: &CancellationToken) -> CancellationToken {
    let linked = cancel.child_token();
    let (lost, trigger) = (lost.clone(), linked.clone());
    tokio::spawn(async move {
        tokio::select! {
            () = lost.cancelled() => trigger.cancel(),
            () = trigger.cancelled() => {}
        }
    });
    linked
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::NoChange => "no_change",
        Action::Bootstrap => "bootstrap",
        Action::Replay { .. } => "replay",
        Action::ResumeReplay => "resume_replay",
        Action::ResumeActivation => "resume_activation",
        Action::Reactivate { .. } => "reactivate",
        Action::Retire { .. } => "retire",
        Action::Refuse { .. } => "refuse",
    }
}

/// Registers (or resumes) the replay and catches it up; returns events applied.
async fn build(
    pool: &Pool,
    projector: &Arc<dyn Projector>,
    event_store: &RelationName,
    options: &ReplayOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Result<u64> {
    let outcomes = replay::replay_many(
        pool,
        std::slice::from_ref(projector),
        event_store,
        options,
        actor,
        cancel,
    )
    .await;
    let mut applied = 0;
    for outcome in outcomes {
        let done = outcome.result?;
        applied += done.catch_up.map_or(0, |c| c.applied);
    }
    Ok(applied)
}

/// Puts a retired (or interrupted activating) version back to replaying so
/// it can be caught up and activated; a version already replaying is left
/// as it is.
pub(super) async fn mark_replaying(
    pool: &Pool,
    projector: &dyn Projector,
    actor: &Actor,
    why: &str,
    lock: &ActivationLock,
) -> Result<()> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.transaction().await?;
    lock.fence(&tx, why).await?;
    states::get(&tx, name, true).await?;
    let record = versions::get(&tx, name, &version)
        .await?
        .ok_or_else(|| Error::Refused(format!("{} was never built", projector.label())))?;
    if record.status == VersionStatus::Replaying {
        return Ok(()); // already (an interrupted rollback's target)
    }
    back_to_replaying(&tx, name, &version, record.status, actor, why).await?;
    tx.commit().await?;
    Ok(())
}
