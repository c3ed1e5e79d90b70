//! `coord status`: a read-only report of every projector's state, versions,
//! progress and last transition.

use tokio_postgres::GenericClient;

use crate::event_store::{self, VersionProgress};
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
    /// Highest position this version applied, by replay, catch-up or inline.
    pub position: i64,
    /// Committed events of its types it has not applied yet (exact, from its
    /// checkpoint); `None` for versions nobody follows (retired, aborted,
    /// pruned). An active inline version lags when events bypassed its
    /// publishers and no `coord run` or catch-up applied them yet.
    pub lag: Option<i64>,
    /// Age in seconds of the oldest event it has not applied (`None` when
    /// it lags by nothing or is not followed).
    pub lag_seconds: Option<f64>,
    /// Events its publishers applied inline, in their own transactions.
    pub applied_inline: i64,
    /// Events applied by replay and catch-up passes (`events_processed`).
    pub applied_by_catch_up: i64,
}

impl VersionStatusReport {
    /// Whether the version is followed and has events left to apply.
    pub fn is_behind(&self) -> bool {
        self.lag.is_some_and(|l| l > 0)
    }
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
    let head_position = event_store::head_position(client, event_store).await?;
    let states = states::list(client).await?;
    let all_versions = versions::list(client).await?;
    let transitions = history::latest_per_projector(client).await?;
    let progress = event_store::progress(client, event_store).await?;

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
                .map(|v| report(v, &progress))
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

fn report(v: &VersionRecord, progress: &[VersionProgress]) -> VersionStatusReport {
    let p = progress
        .iter()
        .find(|p| p.name == v.name && p.version == v.version);
    let followed = matches!(
        v.status,
        VersionStatus::Replaying | VersionStatus::Activating | VersionStatus::Active
    );
    let lag = p.map(|p| p.lag_events).filter(|_| followed);
    VersionStatusReport {
        position: p.map_or(v.last_position, |p| p.position),
        lag,
        lag_seconds: p
            .and_then(|p| p.lag_seconds)
            .filter(|_| lag.is_some_and(|l| l > 0)),
        applied_inline: p.map_or(0, |p| p.applied_inline),
        applied_by_catch_up: v.events_processed,
        record: v.clone(),
    }
}
