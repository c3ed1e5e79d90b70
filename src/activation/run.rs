//! `activate-current-config` and `rollback`: plan, replay or catch up,
//! verify, flip, retire, under the activation lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::critical::back_to_replaying;
use super::lock::ActivationLock;
use super::plan::{plan, Action, Plan};
use super::switch::{activate_version_fenced, retire_fenced, SwitchReport};
use crate::config::DatabaseUrl;
use crate::gate::LockPolicy;
use crate::names::{quote_ident, RelationName};
use crate::projector::{Projector, ProjectorExt, ProjectorSet};
use crate::replay::{self, ReplayOptions};
use crate::store::versions::{self, VersionStatus};
use crate::store::{states, Actor};
use crate::{Error, Result};

/// How `activate-current-config` and `rollback` run.
#[derive(Clone, Debug)]
pub struct ActivateOptions {
    /// Replay and catch-up settings.
    pub replay: ReplayOptions,
    /// Refuse instead of replaying a version from the start.
    pub no_replay: bool,
    /// Bounded lock waits of the critical section.
    pub locks: LockPolicy,
    /// How long to wait for another activation to finish (0: fail at once with exit code 7).
    pub lock_wait: Duration,
    /// What dropping a version's schema does when objects outside it depend on it.
    pub dependents: crate::Dependents,
}

impl Default for ActivateOptions {
    fn default() -> Self {
        Self {
            replay: ReplayOptions::default(),
            no_replay: false,
            locks: LockPolicy::default(),
            lock_wait: Duration::ZERO,
            dependents: crate::Dependents::Refuse,
        }
    }
}

/// What happened to one projector.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct StepReport {
    /// Projector name.
    pub projector: String,
    /// Version now configured (`None` when retired).
    pub version: Option<String>,
    /// The planned action.
    pub action: String,
    /// Events applied by replay and catch-up before the critical section.
    pub replayed_events: u64,
    /// Seconds of replay and catch-up.
    pub replay_seconds: f64,
    /// The flip, when there was one.
    pub switch: Option<SwitchReport>,
}

/// What `activate-current-config` did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ActivationReport {
    /// The plan it carried out.
    pub plan: Plan,
    /// One entry per step that changed something.
    pub steps: Vec<StepReport>,
}

/// Carries out the plan for `projectors`: replays (resuming any replay in
/// progress) or catches up what must be, runs each version's `verify`
/// assertions, activates, and retires active projectors the configuration no
/// longer has. Unchanged active versions are caught up with the events
/// that bypassed their publishers (a `catch_up` step when there were any). Idempotent: a second run does nothing. Holds the activation
/// lock throughout, so a concurrent run fails with [`Error::Busy`] (or waits
/// `options.lock_wait`).
///
/// # Errors
/// [`Error::Refused`] (nothing changed) when the plan refuses a projector
/// (changed definition, downgrade) or `no_replay` forbids a replay;
/// [`Error::Busy`] for the lock; [`Error::Failed`] when a `verify` assertion
/// fails (the active version is untouched); handler and database errors.
#[tracing::instrument(skip_all, err(level = "debug"))]
pub async fn activate_current_config(
    pool: &Pool,
    url: &DatabaseUrl,
    projectors: &ProjectorSet,
    event_store: &RelationName,
    options: &ActivateOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Result<ActivationReport> {
    let lock = ActivationLock::acquire(url, actor, options.lock_wait).await?;
    // Losing the lock stops replays and catch-ups at their next batch.
    let cancel = &linked(cancel, lock.lost());
    let plan = {
        let client = pool.get().await?;
        crate::migrate::ensure_writable(&**client).await?;
        plan(&**client, projectors, event_store).await?
    };
    let refusals = plan.refusals();
    if !refusals.is_empty() {
        return Err(Error::Refused(refusals.join("; ")));
    }
    if options.no_replay {
        let needing: Vec<String> = plan
            .steps
            .iter()
            .filter(|s| s.action.needs_replay())
            .map(|s| format!("{}@{}", s.projector, s.version.as_deref().unwrap_or("-")))
            .collect();
        if !needing.is_empty() {
            return Err(Error::Refused(format!(
                "--no-replay: {} need a replay; run without --no-replay (or `coord replay` first)",
                needing.join(", ")
            )));
        }
    }

    let mut steps = Vec::new();
    for step in plan.steps.iter().filter(|s| s.abandons_replay_of.is_some()) {
        let mut pooled = pool.get().await?;
        let client: &mut tokio_postgres::Client = &mut pooled;
        let tx = client.transaction().await?;
        lock.fence(&tx, "abandoning a replay").await?;
        let report = replay::abort_in(&tx, &step.projector, actor, options.dependents).await?;
        tx.commit().await?;
        tracing::info!(projector = %step.projector, version = %report.version, "abandoned replay");
    }

    for step in &plan.steps {
        let report = match &step.action {
            Action::Refuse { .. } => continue,
            Action::NoChange => {
                // The active version may still lack events that bypassed
                // its publishers (SQL inserts, bulk imports): bring it up to date.
                let Some(projector) = projectors.get(&step.projector) else {
                    continue;
                };
                // Nothing pending: write nothing, so a second run stays a no-op.
                let pending = {
                    let client = pool.get().await?;
                    crate::store::checkpoint::pending(
                        &**client,
                        projector.name().as_str(),
                        &projector.version().to_string(),
                        &projector.event_types(),
                        event_store,
                    )
                    .await?
                };
                if pending == 0 {
                    continue;
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
                    continue;
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
                    retire_fenced(pool, &step.projector, options.locks, actor, Some(&lock)).await?,
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
                match action {
                    Action::Reactivate { .. } => {
                        mark_replaying(
                            pool,
                            projector.as_ref(),
                            actor,
                            "catching up to re-activate",
                            &lock,
                        )
                        .await?
                    }
                    Action::ResumeActivation => {
                        mark_replaying(
                            pool,
                            projector.as_ref(),
                            actor,
                            "resuming an interrupted activation",
                            &lock,
                        )
                        .await?
                    }
                    _ => {}
                }
                let replayed =
                    build(pool, projector, event_store, &options.replay, actor, cancel).await;
                if lock.lost().is_cancelled() {
                    return Err(lock.lost_error(&format!("the replay of {}", projector.label())));
                }
                let replayed = replayed?;
                if cancel.is_cancelled() {
                    return Err(Error::Failed(format!(
                        "cancelled during the replay of {}; its checkpoint is saved: run the command again to resume",
                        projector.label()
                    )));
                }
                verify(pool, projector.as_ref()).await?;
                // A last catch-up outside the critical section keeps what it
                // must apply, with publishers held back, small.
                let last = ReplayOptions {
                    lag_threshold: 1,
                    max_passes: 3,
                    count_total: false,
                    progress: None,
                    ..options.replay.clone()
                };
                let extra =
                    replay::catch_up(pool, projector.as_ref(), event_store, &last, cancel).await;
                if lock.lost().is_cancelled() {
                    return Err(lock.lost_error(&format!("the catch-up of {}", projector.label())));
                }
                let extra = extra?;
                let replay_seconds = started.elapsed().as_secs_f64();
                let switch = activate_version_fenced(
                    pool,
                    projector.as_ref(),
                    event_store,
                    options.locks,
                    actor,
                    Some(&lock),
                )
                .await?;
                StepReport {
                    projector: step.projector.clone(),
                    version: step.version.clone(),
                    action: action_name(action).into(),
                    replayed_events: replayed + extra.applied,
                    replay_seconds,
                    switch: Some(switch),
                }
            }
        };
        steps.push(report);
    }
    lock.release().await?;
    Ok(ActivationReport { plan, steps })
}

/// A token cancelled when `cancel` is or when `lost` is (the activation lock's connection ended).
fn linked(cancel: &CancellationToken, lost: &CancellationToken) -> CancellationToken {
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
/// it can be caught up and activated.
async fn mark_replaying(
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
    back_to_replaying(&tx, name, &version, record.status, actor, why).await?;
    tx.commit().await?;
    Ok(())
}

/// Runs `projector`'s `verify` assertions against its version's tables; each
/// must return true.
///
/// # Errors
/// [`Error::Failed`] naming the assertion and what it returned.
pub async fn verify(pool: &Pool, projector: &dyn Projector) -> Result<()> {
    let assertions = projector.verify();
    if assertions.is_empty() {
        return Ok(());
    }
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.build_transaction().read_only(true).start().await?;
    // `crate::replay::batch::set_search_path` once helper A's replay/mod.rs
    // makes `batch` pub(crate).
    tx.query_one(
        "SELECT set_config('search_path', $1, true)",
        &[&quote_ident(&projector.schema())],
    )
    .await?;
    for (i, sql) in assertions.iter().enumerate() {
        let outcome = match tx.query_opt(sql.as_str(), &[]).await {
            Ok(Some(row)) => match row.try_get::<_, Option<bool>>(0) {
                Ok(Some(true)) => continue,
                Ok(Some(false)) => "false".to_owned(),
                Ok(None) => "NULL".to_owned(),
                Err(e) => format!("no boolean ({e})"),
            },
            Ok(None) => "no row".to_owned(),
            Err(e) => match e.as_db_error() {
                Some(db) => format!("an error: {}", db.message()),
                None => format!("an error: {e}"),
            },
        };
        return Err(Error::Failed(format!(
            "verify of {} failed: assertion {} `{sql}` returned {outcome}; the active version is untouched",
            projector.label(),
            i + 1
        )));
    }
    tx.rollback().await?;
    Ok(())
}

/// Re-activates the most recently retired version of `projector`'s name,
/// which must be `projector`'s version (its definition is needed to catch it
/// up): catches it up from where it stopped, verifies, and flips, without a
/// replay from the start.
///
/// # Errors
/// [`Error::Refused`] when there is nothing to roll back to or the
/// configuration holds another version; as [`activate_current_config`].
#[tracing::instrument(skip_all, fields(projector.name = %projector.name()), err(level = "debug"))]
pub async fn rollback(
    pool: &Pool,
    url: &DatabaseUrl,
    projector: &Arc<dyn Projector>,
    event_store: &RelationName,
    options: &ActivateOptions,
    actor: &Actor,
    cancel: &CancellationToken,
) -> Result<StepReport> {
    let name = projector.name().as_str();
    let lock = ActivationLock::acquire(url, actor, options.lock_wait).await?;
    let cancel = &linked(cancel, lock.lost());
    let (active, target) = {
        let client = pool.get().await?;
        crate::migrate::ensure_writable(&**client).await?;
        crate::event_relation::check_event_store(&**client, event_store).await?;
        let state = states::get(&**client, name, false).await?;
        if let Some(activating) = state.as_ref().and_then(|s| s.activating_version.clone()) {
            return Err(Error::Refused(format!(
                "projector {name} is activating {activating} (an interrupted activation): finish it with \
                 `coord activate-current-config` (configuration of {activating}) or back it out with \
                 `coord abort --projector {name}`, then roll back"
            )));
        }
        let active = state.and_then(|s| s.active_version);
        let target = versions::list_of(&**client, name)
            .await?
            .into_iter()
            .filter(|v| v.status == VersionStatus::Retired)
            .max_by(|a, b| a.retired_at.cmp(&b.retired_at));
        (active, target)
    };
    let Some(target) = target else {
        return Err(Error::Refused(format!(
            "projector {name} has no retired version to roll back to"
        )));
    };
    let wanted = projector.version().to_string();
    if target.version != wanted {
        return Err(Error::Refused(format!(
            "the previous version of {name} is {}, but this configuration defines {wanted}: run `coord rollback {name}` \
             with the configuration of {name} {} (--config)",
            target.version, target.version
        )));
    }
    if target.fingerprint != projector.fingerprint() {
        return Err(Error::Refused(format!(
            "{} was built from a different definition than this configuration's; cannot roll back with it",
            projector.label()
        )));
    }
    let started = Instant::now();
    mark_replaying(
        pool,
        projector.as_ref(),
        actor,
        &format!("rollback from {}", active.as_deref().unwrap_or("-")),
        &lock,
    )
    .await?;
    let caught = replay::catch_up(
        pool,
        projector.as_ref(),
        event_store,
        &options.replay,
        cancel,
    )
    .await;
    if lock.lost().is_cancelled() {
        return Err(lock.lost_error(&format!("the catch-up of {}", projector.label())));
    }
    let caught = caught?;
    verify(pool, projector.as_ref()).await?;
    let replay_seconds = started.elapsed().as_secs_f64();
    let switch = activate_version_fenced(
        pool,
        projector.as_ref(),
        event_store,
        options.locks,
        actor,
        Some(&lock),
    )
    .await?;
    lock.release().await?;
    Ok(StepReport {
        projector: name.to_owned(),
        version: Some(wanted),
        action: "rollback".into(),
        replayed_events: caught.applied,
        replay_seconds,
        switch: Some(switch),
    })
}
