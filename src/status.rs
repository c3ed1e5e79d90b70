//! `coord status`: a read-only report of every projector's state, versions,
//! progress and last transition.

use tokio_postgres::GenericClient;

use crate::names::RelationName;
use crate::store::history::{self, Transition};
use crate::store::versions::{self, VersionRecord, VersionStatus};
use crate::store::{self, states};
use crate::Result;

/// The report of [`status`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct StatusReport {
    /// Highest position in the event store.
    pub head_position: i64,
    /// Every projector coord knows, by name.
    pub projectors: Vec<ProjectorStatus>,
}

/// One projector in a [`StatusReport`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct ProjectorStatus {
    /// Name.
    pub name: String,
    /// Active version.
    pub active_version: Option<String>,
    /// Version being activated.
    pub activating_version: Option<String>,
    /// Version being replayed.
    pub replaying_version: Option<String>,
    /// Last change of the state row.
    pub updated_at: Option<String>,
    /// Every version coord built, oldest first.
    pub versions: Vec<VersionStatusReport>,
    /// The latest transition.
    pub last_transition: Option<Transition>,
}

/// One version in a [`ProjectorStatus`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct VersionStatusReport {
    /// What the table knows.
    #[serde(flatten)]
    pub record: VersionRecord,
    /// Positions between the store's head and what this version applied;
    /// `None` where it does not apply (inline active versions are applied in
    /// the publishing transaction, retired and aborted ones are not followed).
    pub lag: Option<i64>,
}

/// Reads the report. Writes nothing.
///
/// # Errors
/// [`crate::Error::Failed`] when the schema is not migrated; database errors.
pub async fn status(
    client: &impl GenericClient,
    event_store: &RelationName,
) -> Result<StatusReport> {
    store::ensure_migrated(client).await?;
    crate::event_relation::check_event_store(client, event_store).await?;
    let head_position: i64 = client
        .query_one(
            &format!(
                "SELECT coalesce(max(position), 0)::bigint FROM {}",
                event_store.quoted()
            ),
            &[],
        )
        .await?
        .try_get(0)?;
    let states = states::list(client).await?;
    let all_versions = versions::list(client).await?;
    let transitions = history::latest_per_projector(client).await?;

    let mut names: Vec<String> = states.iter().map(|s| s.name.clone()).collect();
    names.extend(all_versions.iter().map(|v| v.name.clone()));
    names.sort();
    names.dedup();

    let projectors = names
        .into_iter()
        .map(|name| {
            let state = states.iter().find(|s| s.name == name);
            let versions = all_versions
                .iter()
                .filter(|v| v.name == name)
                .map(|v| VersionStatusReport {
                    lag: lag(v, head_position),
                    record: v.clone(),
                })
                .collect();
            ProjectorStatus {
                active_version: state.and_then(|s| s.active_version.clone()),
                activating_version: state.and_then(|s| s.activating_version.clone()),
                replaying_version: state.and_then(|s| s.replaying_version.clone()),
                updated_at: state.map(|s| s.updated_at.clone()),
                versions,
                last_transition: transitions.iter().find(|t| t.name == name).cloned(),
                name,
            }
        })
        .collect();
    Ok(StatusReport {
        head_position,
        projectors,
    })
}

fn lag(v: &VersionRecord, head: i64) -> Option<i64> {
    match v.status {
        VersionStatus::Retired | VersionStatus::Aborted | VersionStatus::Pruned => None,
        VersionStatus::Active if v.mode == "inline" => None,
        _ => Some((head - v.last_position).max(0)),
    }
}
