//! `activate-current-config` and `rollback`: plan, replay or catch up,
//! verify, flip, retire, under the activation lock.

use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_util::sync::CancellationToken;

use super::lock::ActivationLock;
use super::plan::{plan, reactivation_in_progress, Plan};
use super::steps::{
    linked, lock_and_check, mark_replaying, run_step, verify_and_activate, StepContext,
};
use super::switch::SwitchReport;
use crate::config::DatabaseUrl;
use crate::gate::LockPolicy;
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt, ProjectorSet};
use crate::replay::{self, ReplayOptions};
use crate::store::states;
use crate::store::versions::{self, VersionStatus};
use crate::store::Actor;
use crate::{Error, Result, Steps};

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
/// [`Error::Busy`] for the lock; [`Error::LockDeadline`] when publishers
/// could not be held back in time; [`Error::VerifyFailed`] when a `verify` assertion
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

    let mut progress = Steps::new("completed", "steps", plan.steps.len());
    for step in &plan.steps {
        let label = format!(
            "{}@{}",
            step.projector,
            step.version.as_deref().unwrap_or("-")
        );
        let context = StepContext {
            pool,
            projectors,
            event_store,
            options,
            actor,
            cancel,
            lock: &lock,
        };
        match run_step(&context, step).await {
            Ok(Some(report)) => {
                progress.done(format!("{label}: {}", report.action));
                steps.push(report);
            }
            Ok(None) => {}
            // What completed before stays done: say so (refinery's report).
            Err(e) => return Err(progress.failed(label, e, true)),
        }
    }
    lock.release().await?;
    Ok(ActivationReport { plan, steps })
}

/// Runs `projector`'s `verify` assertions against its version's tables; each
/// must return true.
///
/// # Errors
/// [`Error::VerifyFailed`] naming the assertion and what it returned.
pub async fn verify(pool: &Pool, projector: &dyn Projector) -> Result<()> {
    let assertions = projector.verify();
    if assertions.is_empty() {
        return Ok(());
    }
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.build_transaction().read_only(true).start().await?;
    crate::projector::set_search_path(&tx, &projector.schema()).await?;
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
        return Err(Error::VerifyFailed {
            projector: projector.label(),
            number: i + 1,
            sql: sql.clone(),
            outcome,
        });
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
    let (lock, client) = lock_and_check(pool, url, event_store, options, actor).await?;
    let cancel = &linked(cancel, lock.lost());
    let (active, target, resuming) = {
        let state = states::get(&**client, name, false).await?;
        let activating = state.as_ref().and_then(|s| s.activating_version.clone());
        let replaying = state.as_ref().and_then(|s| s.replaying_version.clone());
        let active = state.and_then(|s| s.active_version);
        // A retired version an interrupted rollback (or re-activation) put
        // back to replaying, or left activating when its critical section
        // was cut short, is the one to finish, not the one retired before.
        let unfinished = match activating.clone().or(replaying) {
            Some(v) if reactivation_in_progress(&**client, name, &v).await? => Some(v),
            _ => None,
        };
        if let Some(activating) = activating.filter(|a| unfinished.as_ref() != Some(a)) {
            return Err(Error::Refused(format!(
                "projector {name} is activating {activating} (an interrupted activation): finish it with \
                 `coord activate-current-config` (configuration of {activating}) or back it out with \
                 `coord abort --projector {name}`, then roll back"
            )));
        }
        let all = versions::list_of(&**client, name).await?;
        let resumed = unfinished.and_then(|u| all.iter().find(|v| v.version == u).cloned());
        let resuming = resumed.is_some();
        let target = resumed.or_else(|| {
            all.into_iter()
                .filter(|v| v.status == VersionStatus::Retired)
                .max_by(|a, b| a.retired_at.cmp(&b.retired_at))
        });
        (active, target, resuming)
    };
    drop(client); // back to the pool for the catch-up
    let Some(target) = target else {
        return Err(Error::Refused(format!(
            "projector {name} has no retired version to roll back to"
        )));
    };
    let wanted = projector.version().to_string();
    if target.version != wanted {
        let which = if resuming {
            "an interrupted rollback left"
        } else {
            "the previous version of"
        };
        return Err(Error::Refused(format!(
            "{which} {name} is {}, but this configuration defines {wanted}: run `coord rollback {name}` \
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
    let why = if resuming {
        tracing::info!(version = %wanted, "resuming an interrupted rollback");
        "resuming an interrupted rollback".to_owned()
    } else {
        format!("rollback from {}", active.as_deref().unwrap_or("-"))
    };
    // A resumed target still replaying stays so (nothing written).
    mark_replaying(pool, projector.as_ref(), actor, &why, &lock).await?;
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
    let context = StepContext {
        pool,
        projectors: &ProjectorSet::default(),
        event_store,
        options,
        actor,
        cancel,
        lock: &lock,
    };
    let (extra, replay_seconds, switch) =
        verify_and_activate(&context, projector.as_ref(), started).await?;
    lock.release().await?;
    Ok(StepReport {
        projector: name.to_owned(),
        version: Some(wanted),
        action: "rollback".into(),
        replayed_events: caught.applied + extra,
        replay_seconds,
        switch: Some(switch),
    })
}
