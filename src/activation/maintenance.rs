//! `coord prune` (drop the schemas of retired and aborted versions) and
//! `coord wait` (block until this configuration's versions are active).

use std::time::{Duration, Instant};

use deadpool_postgres::Pool;
use tokio_postgres::GenericClient;

use crate::projector::ProjectorSet;
use crate::schema_drop::{drop_schemas, Dependents};
use crate::store::versions::{self, VersionRecord, VersionStatus};
use crate::store::{history, states, Actor};
use crate::{Error, Result};

/// The versions whose schemas [`prune`] would drop: retired and aborted ones.
///
/// # Errors
/// Database errors.
pub async fn prunable(client: &impl GenericClient) -> Result<Vec<VersionRecord>> {
    crate::store::ensure_migrated(client).await?;
    Ok(versions::list(client)
        .await?
        .into_iter()
        .filter(|v| matches!(v.status, VersionStatus::Retired | VersionStatus::Aborted))
        .collect())
}

/// Drops the schemas of retired and aborted versions (after which they can
/// no longer be rolled back to) and marks them pruned, in one transaction.
/// Returns what it dropped.
///
/// When objects outside those schemas depend on them (a user's view over a
/// retired version's table), it refuses, listing them, and changes nothing,
/// unless `dependents` is [`Dependents::Cascade`].
///
/// # Errors
/// [`Error::Refused`] (exit code 2) listing the dependents; database errors.
pub async fn prune(
    pool: &Pool,
    actor: &Actor,
    dependents: Dependents,
) -> Result<Vec<VersionRecord>> {
    let mut pooled = pool.get().await?;
    let client: &mut tokio_postgres::Client = &mut pooled;
    let tx = client.transaction().await?;
    crate::migrate::ensure_writable(&tx).await?;
    let victims = prunable(&tx).await?;
    let schemas: Vec<&str> = victims.iter().map(|v| v.schema_name.as_str()).collect();
    drop_schemas(&tx, &schemas, dependents, "coord prune").await?;
    for v in &victims {
        versions::set_status(&tx, &v.name, &v.version, VersionStatus::Pruned).await?;
        history::record(
            &tx,
            actor,
            &v.name,
            Some(&v.version),
            Some(v.status),
            VersionStatus::Pruned,
            None,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(victims)
}

/// Waits until every projector of `projectors` is active at its configured
/// version, polling every `poll`. A newer version activating meanwhile ends
/// the wait at once: this configuration can then never become active.
///
/// # Errors
/// [`Error::NewerProjectorIsActive`] (exit code 3) as soon as a projector is
/// active at a version newer than this configuration's;
/// [`Error::Timeout`] (exit code 8) naming what is not active yet;
/// [`Error::ProjectorDefinitionMismatch`] (exit code 9) when a version is
/// active with another definition than this configuration's; database errors.
pub async fn wait_until_active(
    client: &impl GenericClient,
    projectors: &ProjectorSet,
    timeout: Duration,
    poll: Duration,
) -> Result<()> {
    crate::store::ensure_migrated(client).await?;
    let started = Instant::now();
    loop {
        let all = states::list(client).await?;
        let mut pending = Vec::new();
        for p in projectors.iter() {
            let want = p.version().to_string();
            let active = all
                .iter()
                .find(|s| s.name == p.name().as_str())
                .and_then(|s| s.active_version.clone());
            if active.as_deref() == Some(want.as_str()) {
                continue;
            }
            if let Some(active) = active.as_deref() {
                if semver::Version::parse(active).is_ok_and(|a| a > *p.version()) {
                    return Err(Error::NewerProjectorIsActive {
                        projector: p.name().to_string(),
                        running: want,
                        active: active.to_owned(),
                    });
                }
            }
            pending.push(format!(
                "{}@{want} (active: {})",
                p.name(),
                active.as_deref().unwrap_or("none")
            ));
        }
        if pending.is_empty() {
            return crate::gate::ensure_same_definitions(client, projectors).await;
        }
        if started.elapsed() >= timeout {
            return Err(Error::Timeout(format!(
                "timed out after {timeout:?} waiting for {} to be active",
                pending.join(", ")
            )));
        }
        tokio::time::sleep(poll).await;
    }
}
