//! Activating a version and retiring a projector: the reads and the
//! "activating" step around the [`super::critical`] section, which makes
//! the change. Callers hold the [`super::ActivationLock`].

use std::time::Instant;

use deadpool_postgres::Pool;

use super::critical::{back_to_replaying, critical_section, critical_section_on, Change};
use super::lock::{fence, ActivationLock};
use super::marker::ActivatingMarker;
use crate::gate::LockPolicy;
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt};
use crate::store::versions::{self, VersionRecord, VersionStatus};
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

    // Refused publishers of this projector sleep on the marker until the
    // activation ends (docs/decisions/0067).
    let mut marker = ActivatingMarker::take(pool, name).await?;
    // Step 1, committed on its own: publishers of this projector's events
    // now get the retryable ProjectorIsActivating instead of queueing.
    let held_since = Instant::now();
    let (from, old) = match mark(marker.client(), projector, actor, lock).await {
        Ok(marked) => marked,
        Err(e) => {
            marker.release().await;
            return Err(e);
        }
    };
    let critical = Instant::now();
    let change = Change::Activate {
        projector,
        old: old.as_ref(),
    };
    // On the marker's connection: an activation needs one connection only.
    // The marker is released in the flip's own message, right after its
    // COMMIT: refused publishers wake without waiting for a round trip.
    let release = marker.release_sql();
    let result = critical_section_on(
        marker.client(),
        &change,
        event_store,
        policy,
        actor,
        lock,
        release.as_deref(),
    )
    .await;
    match result {
        Ok((final_events, critical_ms)) => {
            let held_back_ms = held_since.elapsed().as_secs_f64() * 1e3;
            marker.released();
            let report = SwitchReport {
                projector: name.to_owned(),
                from,
                to: Some(version),
                final_events,
                held_back_ms,
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
            // activates, in a transaction of its own; on a fresh connection
            // when the critical section's died (its marker went with it).
            // The marker is released after, so waiting publishers wake to
            // the outcome.
            let reverted = if marker.client().is_closed() {
                drop(marker);
                match pool.get().await {
                    Ok(mut fresh) => {
                        revert_activation(&mut fresh, name, &version, actor, &e, lock).await
                    }
                    Err(pool_error) => Err(pool_error.into()),
                }
            } else {
                let reverted =
                    revert_activation(marker.client(), name, &version, actor, &e, lock).await;
                marker.release().await;
                reverted
            };
            if let Err(revert) = reverted {
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

/// Step 1 of an activation, in a transaction of its own: marks the
/// replaying version of `projector` activating (unless it already is).
/// Returns the active version and its record.
///
/// Publishers of the projector's types are refused from the commit on, and
/// on a busy server every round trip counts: the transaction is two of them,
/// `BEGIN` pipelined with the reads and `COMMIT` with the writes (a failed
/// write turns the pipelined `COMMIT` into a rollback).
async fn mark(
    client: &tokio_postgres::Client,
    projector: &dyn Projector,
    actor: &Actor,
    lock: Option<&ActivationLock>,
) -> Result<(Option<String>, Option<VersionRecord>)> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let read = async {
        let (_, _, state, old) = futures_util::try_join!(
            async { Ok(client.batch_execute("BEGIN").await?) },
            fence(lock, client, "the activation"),
            states::get(client, name, true),
            versions::get_active(client, name),
        )?;
        Ok::<_, Error>((state.unwrap_or_else(|| empty_state(name)), old))
    };
    let (state, old) = match read.await {
        Ok(read) => read,
        Err(e) => {
            let _ = client.batch_execute("ROLLBACK").await;
            return Err(e);
        }
    };
    if state.activating_version.as_deref() == Some(version.as_str()) {
        client.batch_execute("COMMIT").await?;
    } else if state.replaying_version.as_deref() == Some(version.as_str()) {
        futures_util::try_join!(
            states::mark_activating(client, name, &version),
            versions::set_status(client, name, &version, VersionStatus::Activating),
            history::record(
                client,
                actor,
                name,
                Some(&version),
                Some(VersionStatus::Replaying),
                VersionStatus::Activating,
                None,
            ),
            async { Ok(client.batch_execute("COMMIT").await?) },
        )?;
    } else {
        client.batch_execute("ROLLBACK").await?;
        return Err(Error::Refused(format!(
            "{} is not replaying: replay it before activating it",
            projector.label()
        )));
    }
    Ok((state.active_version, old))
}

/// Returns an activating version to replaying after a failed critical section.
async fn revert_activation(
    client: &mut tokio_postgres::Client,
    name: &str,
    version: &str,
    actor: &Actor,
    why: &Error,
    lock: Option<&ActivationLock>,
) -> Result<()> {
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
