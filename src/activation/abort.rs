//! `coord abort` for a version that is replaying *or* activating: an
//! activation interrupted in its critical section (process killed, backend
//! terminated) leaves its version activating, and backing it out must not
//! need the activation command (docs/decisions/0035-stuck-activating.md).

use tokio_postgres::Client;

use super::critical::back_to_replaying;
use crate::locks::key;
use crate::replay::{abort_in, AbortReport};
use crate::schema_drop::Dependents;
use crate::store::versions::VersionStatus;
use crate::store::{states, Actor};
use crate::{Error, Result};

/// Held by a running `activate-current-config`, `rollback` or `rebuild`
/// (session level); a transaction-level try on the same key fails while one runs.
const TRY_ACTIVATION_LOCK: &str = concat!(
    "SELECT pg_try_advisory_xact_lock(",
    key!(activation),
    ", 0)"
);

/// Drops projector `name`'s version in progress, in one transaction: a
/// replay (as [`crate::abort_with`]) or an activation that was interrupted
/// (its version goes back to replaying, then is aborted; the active version
/// is untouched and publishers of it proceed again). Refuses to back out an
/// activation that a live process is still running.
///
/// # Errors
/// [`Error::Busy`] (exit code 7) while an activation holds the lock;
/// [`Error::Refused`] when nothing is replaying or activating, and as
/// [`crate::replay::abort_in`]; database errors.
pub async fn abort_projector(
    client: &mut Client,
    name: &str,
    actor: &Actor,
    dependents: Dependents,
) -> Result<AbortReport> {
    let tx = client.transaction().await?;
    crate::migrate::ensure_writable(&tx).await?;
    let state = match crate::names::ProjectorName::new(name) {
        Ok(valid) => states::get(&tx, valid.as_str(), true).await?,
        Err(_) => None, // abort_in names the problem
    };
    if let Some(state) = state.filter(|s| s.replaying_version.is_none()) {
        if let Some(version) = state.activating_version.as_deref() {
            let free: bool = tx.query_one(TRY_ACTIVATION_LOCK, &[]).await?.try_get(0)?;
            if !free {
                return Err(Error::Busy(format!(
                    "{name}@{version} is being activated by a running process (it holds the activation lock): \
                     wait for it to finish (`coord status`), or stop that process and run `coord abort --projector {name}` again"
                )));
            }
            back_to_replaying(
                &tx,
                name,
                version,
                VersionStatus::Activating,
                actor,
                "interrupted activation backed out by coord abort",
            )
            .await?;
        }
    }
    let report = abort_in(&tx, name, actor, dependents).await?;
    tx.commit().await?;
    Ok(report)
}
