//! Activating a version and retiring a projector: the reads and the
//! "activating" step around the [`super::critical`] section, which makes
//! the change. Callers hold the [`super::ActivationLock`].

use std::time::Instant;

use deadpool_postgres::Pool;

use super::critical::{back_to_replaying, critical_section, Change};
use super::lock::{fence, ActivationLock};
use crate::gate::LockPolicy;
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt};
use crate::store::versions::{self, VersionStatus};
use crate::store::{history, states, Actor};
use crate::{Error, Result};

/// What one flip did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SwitchReport {
    /// Projector name.
    pub projector: String,
    /// The version that was active before, if any.
    pub from: Option<String>,
    /// The version active now (`None` when retired).
    pub to: Option<String>,
    /// Events applied by the final catch-up inside the critical section.
    pub final_events: u64,
    /// Milliseconds publishers of the projector's event types were held back
    /// (from marking it activating to the commit of the flip).
    pub held_back_ms: f64,
    /// Milliseconds of the critical-section transaction itself.
    pub critical_ms: f64,
}

/// Activates `projector`'s version, which must be replaying (and caught up)
/// or activating: marks it activating, then in one transaction holds back
/// publishers of the old and new versions' event types, applies the last
/// events, waits out in-flight publishers, sets
/// `active_version` and records the transitions. On failure the version is
/// returned to replaying and the active version is untouched.
///
/// The critical section is a series of short attempts
/// (docs/decisions/0034-critical-section-attempts.md): each waits at most
/// `policy.attempt_timeout` for each lock and, when one is not granted in
/// time, rolls back and releases everything before the next attempt, so no
/// publisher queues behind it for longer than one attempt.
///
/// # Errors
/// [`Error::LockDeadline`] when publishers could not be held back within the lock
/// policy's deadline; [`Error::Refused`] when the version is not replaying
/// or activating; handler and database errors.
pub async fn activate_version(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
) -> Result<SwitchReport> {
    activate_version_fenced(pool, projector, event_store, policy, actor, None).await
}

/// [`activate_version`] under the activation lock `lock`: every transaction
/// proves it still holds it (docs/decisions/0033-activation-fencing.md).
#[tracing::instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub(crate) async fn activate_version_fenced(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
    lock: Option<&ActivationLock>,
) -> Result<SwitchReport> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();

    // Step 1, committed on its own: publishers of this projector's events
    // now get the retryable ProjectorIsActivating instead of queueing.
    let held_since = Instant::now();
    let (from, old) = {
        let mut pooled = pool.get().await?;
        let client: &mut tokio_postgres::Client = &mut pooled;
        let tx = client.transaction().await?;
        // Publishers of this projector's types wait from here on: every
        // statement is one round trip, independent ones pipelined.
        let (_, state) = futures_util::try_join!(
            fence(lock, &tx, "the activation"),
            states::get(&tx, name, true)
        )?;
        let state = state.unwrap_or_else(|| empty_state(name));
        if state.activating_version.as_deref() != Some(version.as_str()) {
            if state.replaying_version.as_deref() != Some(version.as_str()) {
                return Err(Error::Refused(format!(
                    "{} is not replaying: replay it before activating it",
                    projector.label()
                )));
            }
            futures_util::try_join!(
                states::mark_activating(&tx, name, &version),
                versions::set_status(&tx, name, &version, VersionStatus::Activating),
                history::record(
                    &tx,
                    actor,
                    name,
                    Some(&version),
                    Some(VersionStatus::Replaying),
                    VersionStatus::Activating,
                    None,
                ),
            )?;
        }
        let old = match &state.active_version {
            Some(old) => versions::get(&tx, name, old).await?,
            None => None,
        };
        tx.commit().await?;
        (state.active_version, old)
    };
    let critical = Instant::now();
    let change = Change::Activate {
        projector,
        old: old.as_ref(),
    };
    let result = critical_section(pool, &change, event_store, policy, actor, lock).await;
    match result {
        Ok((final_events, critical_ms)) => {
            let report = SwitchReport {
                projector: name.to_owned(),
                from,
                to: Some(version),
                final_events,
                held_back_ms: held_since.elapsed().as_secs_f64() * 1e3,
                critical_ms,
            };
            tracing::info!(
                held_back_ms = report.held_back_ms,
                critical_ms,
                waited_ms = critical.elapsed().as_secs_f64() * 1e3,
                final_events,
                "activated"
            );
            Ok(report)
        }
        Err(e) => {
            // Back to replaying so publishers are not refused while nobody
            // activates: in a transaction of its own, on a fresh connection
            // (the critical section's may be the one that died).
            if let Err(revert) = revert_activation(pool, name, &version, actor, &e, lock).await {
                tracing::warn!(error = %revert, "could not return the version to replaying");
                return Err(Error::Failed(format!(
                    "{e}; and {} stays activating ({revert}): run `coord activate-current-config` again to finish \
                     it, or `coord abort --projector {name}` to back it out",
                    projector.label()
                )));
            }
            Err(e)
        }
    }
}

/// Returns an activating version to replaying after a failed critical section.
async fn revert_activation(
    pool: &Pool,
    name: &str,
    version: &str,
    actor: &Actor,
    why: &Error,
    lock: Option<&ActivationLock>,
) -> Result<()> {
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.transaction().await?;
    fence(lock, &tx, "returning the version to replaying").await?;
    let Some(state) = states::get(&tx, name, true).await? else {
        return Ok(());
    };
    if state.activating_version.as_deref() != Some(version) {
        return Ok(());
    }
    let why = why.to_string();
    back_to_replaying(&tx, name, version, VersionStatus::Activating, actor, &why).await?;
    tx.commit().await?;
    Ok(())
}

/// Retires the active version of projector `name` (no longer configured):
/// holds back its publishers and clears `active_version`; the version keeps
/// its checkpoint, so `coord rollback` catches it up from there.
/// `event_store` is unused since every version's checkpoint is exact. An interrupted activation of it is abandoned.
///
/// # Errors
/// [`Error::LockDeadline`] when publishers could not be held back in time; database errors.
#[tracing::instrument(skip_all, fields(projector.name = %name), err(level = "debug"))]
pub async fn retire(
    pool: &Pool,
    name: &str,
    _event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
) -> Result<SwitchReport> {
    retire_fenced(pool, name, policy, actor, None).await
}

/// [`retire`] under the activation lock `lock`, fenced.
pub(crate) async fn retire_fenced(
    pool: &Pool,
    name: &str,
    policy: LockPolicy,
    actor: &Actor,
    lock: Option<&ActivationLock>,
) -> Result<SwitchReport> {
    let (state, records) = {
        let client = pool.get().await?;
        let state = states::get(&**client, name, false)
            .await?
            .unwrap_or_else(|| empty_state(name));
        let mut records = Vec::new();
        for v in [&state.active_version, &state.activating_version]
            .into_iter()
            .flatten()
        {
            if let Some(record) = versions::get(&**client, name, v).await? {
                records.push(record);
            }
        }
        (state, records)
    };
    // An inline version's checkpoint is exact (docs/decisions/0009): nothing
    // to reconstruct here.
    let started = Instant::now();
    let change = Change::Retire {
        name,
        records: &records,
    };
    let (_, critical_ms) =
        critical_section(pool, &change, &RelationName::default(), policy, actor, lock).await?;
    Ok(SwitchReport {
        projector: name.to_owned(),
        from: state.active_version,
        to: None,
        final_events: 0,
        held_back_ms: started.elapsed().as_secs_f64() * 1e3,
        critical_ms,
    })
}

fn empty_state(name: &str) -> states::ProjectorState {
    states::ProjectorState {
        name: name.to_owned(),
        active_version: None,
        activating_version: None,
        replaying_version: None,
        updated_at: String::new(),
    }
}
