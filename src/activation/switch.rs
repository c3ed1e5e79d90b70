//! The critical section: flipping `active_version` (activate, retire) with
//! publishers of the affected event types held back for milliseconds
//! (docs/decisions/0003-gate-locks.md). The only code that changes which
//! version is active. Callers hold the [`super::ActivationLock`].

use std::time::Instant;

use deadpool_postgres::Pool;
use tokio_postgres::Transaction;

use crate::gate::{self, LockPolicy};
use crate::names::RelationName;
use crate::projector::{Projector, ProjectorExt};
use crate::replay;
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
/// # Errors
/// [`Error::Busy`] when publishers could not be held back within the lock
/// policy's deadline; [`Error::Refused`] when the version is not replaying
/// or activating; handler and database errors.
#[tracing::instrument(skip_all, fields(projector.name = %projector.name(), projector.version = %projector.version()), err(level = "debug"))]
pub async fn activate_version(
    pool: &Pool,
    projector: &dyn Projector,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
) -> Result<SwitchReport> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;

    // Step 1, committed on its own: publishers of this projector's events
    // now get the retryable ProjectorIsActivating instead of queueing.
    let held_since = Instant::now();
    let (from, old) = {
        let tx = client.transaction().await?;
        let state = states::get(&tx, name, true)
            .await?
            .unwrap_or_else(|| empty_state(name));
        if state.activating_version.as_deref() != Some(version.as_str()) {
            if state.replaying_version.as_deref() != Some(version.as_str()) {
                return Err(Error::Refused(format!(
                    "{} is not replaying: replay it before activating it",
                    projector.label()
                )));
            }
            states::put(
                &tx,
                name,
                state.active_version.as_deref(),
                Some(&version),
                None,
            )
            .await?;
            versions::set_status(&tx, name, &version, VersionStatus::Activating).await?;
            history::record(
                &tx,
                actor,
                name,
                Some(&version),
                Some("replaying"),
                "activating",
                None,
            )
            .await?;
        }
        let old = match &state.active_version {
            Some(old) => versions::get(&tx, name, old).await?,
            None => None,
        };
        tx.commit().await?;
        (state.active_version, old)
    };
    let critical = Instant::now();
    let result = {
        let mut tx = client.transaction().await?;
        match flip(&mut tx, projector, old.as_ref(), event_store, policy, actor).await {
            Ok(final_events) => tx
                .commit()
                .await
                .map(|()| final_events)
                .map_err(Error::from),
            Err(e) => {
                let _ = tx.rollback().await;
                Err(e)
            }
        }
    };
    match result {
        Ok(final_events) => {
            let report = SwitchReport {
                projector: name.to_owned(),
                from,
                to: Some(version),
                final_events,
                held_back_ms: held_since.elapsed().as_secs_f64() * 1e3,
                critical_ms: critical.elapsed().as_secs_f64() * 1e3,
            };
            tracing::info!(
                held_back_ms = report.held_back_ms,
                final_events,
                "activated"
            );
            Ok(report)
        }
        Err(e) => {
            // Back to replaying so publishers are not refused while nobody activates.
            let tx = client.transaction().await?;
            states::put(&tx, name, from.as_deref(), None, Some(&version)).await?;
            versions::set_status(&tx, name, &version, VersionStatus::Replaying).await?;
            history::record(
                &tx,
                actor,
                name,
                Some(&version),
                Some("activating"),
                "replaying",
                Some(&e.to_string()),
            )
            .await?;
            tx.commit().await?;
            Err(e)
        }
    }
}

async fn flip(
    tx: &mut Transaction<'_>,
    projector: &dyn Projector,
    old: Option<&VersionRecord>,
    event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
) -> Result<u64> {
    let name = projector.name().as_str();
    let version = projector.version().to_string();
    let mut types = projector.event_types();
    if let Some(old) = old {
        types.extend(old.event_types.iter().cloned());
    }
    types.sort();
    types.dedup();
    gate::hold_back_publishers(tx, &types, policy).await?;
    let final_events = replay::pass_in_transaction(tx, projector, event_store).await?;
    // The old version keeps its own exact checkpoint (its publishers recorded
    // what they applied inline), so a later rollback catches it up from there.
    gate::drain_all_publishers(tx, policy).await?;
    states::put(tx, name, Some(&version), None, None).await?;
    versions::set_status(tx, name, &version, VersionStatus::Active).await?;
    history::record(
        tx,
        actor,
        name,
        Some(&version),
        Some("activating"),
        "active",
        None,
    )
    .await?;
    if let Some(old) = old {
        versions::set_status(tx, name, &old.version, VersionStatus::Retired).await?;
        history::record(
            tx,
            actor,
            name,
            Some(&old.version),
            Some("active"),
            "retired",
            Some(&format!("{version} is active")),
        )
        .await?;
    }
    Ok(final_events)
}

/// Retires the active version of projector `name` (no longer configured):
/// holds back its publishers and clears `active_version`; the version keeps
/// its checkpoint, so `coord rollback` catches it up from there.
/// `event_store` is unused since every version's checkpoint is exact. An interrupted activation of it is abandoned.
///
/// # Errors
/// [`Error::Busy`] when publishers could not be held back in time; database errors.
#[tracing::instrument(skip_all, fields(projector.name = %name), err(level = "debug"))]
pub async fn retire(
    pool: &Pool,
    name: &str,
    _event_store: &RelationName,
    policy: LockPolicy,
    actor: &Actor,
) -> Result<SwitchReport> {
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let started = Instant::now();
    let mut tx = client.transaction().await?;
    let state = states::get(&tx, name, false)
        .await?
        .unwrap_or_else(|| empty_state(name));
    let mut records = Vec::new();
    for v in [&state.active_version, &state.activating_version]
        .into_iter()
        .flatten()
    {
        if let Some(record) = versions::get(&tx, name, v).await? {
            records.push(record);
        }
    }
    let mut types: Vec<String> = records
        .iter()
        .flat_map(|r| r.event_types.iter().cloned())
        .collect();
    types.sort();
    types.dedup();
    gate::hold_back_publishers(&mut tx, &types, policy).await?;
    // An inline version's checkpoint is exact (docs/decisions/0009): nothing
    // to reconstruct here.
    gate::drain_all_publishers(&mut tx, policy).await?;
    states::put(&tx, name, None, None, state.replaying_version.as_deref()).await?;
    for record in &records {
        let to = if record.status == VersionStatus::Active {
            VersionStatus::Retired
        } else {
            VersionStatus::Aborted
        };
        versions::set_status(&tx, name, &record.version, to).await?;
        history::record(
            &tx,
            actor,
            name,
            Some(&record.version),
            Some(record.status.as_str()),
            to.as_str(),
            Some("no longer configured"),
        )
        .await?;
    }
    tx.commit().await?;
    let elapsed = started.elapsed().as_secs_f64() * 1e3;
    Ok(SwitchReport {
        projector: name.to_owned(),
        from: state.active_version,
        to: None,
        final_events: 0,
        held_back_ms: elapsed,
        critical_ms: elapsed,
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
