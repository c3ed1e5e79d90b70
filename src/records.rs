//! Read-only access to coord's own records for applications, the `coord`
//! binary and tests: projector states, versions, transitions, parked
//! events. Writing them is the business of replay and activation only, so
//! nothing here writes; `store` (private) holds the SQL.

use tokio_postgres::GenericClient;

use crate::store::{history, parked, states, versions};
use crate::Result;

pub use crate::store::history::Transition;
pub use crate::store::parked::ParkedEvent;
pub use crate::store::states::ProjectorState;
pub use crate::store::versions::{VersionRecord, VersionStatus};

/// Every row of `coord.projector_states`, by name.
///
/// # Errors
/// Database errors.
pub async fn projector_states(client: &impl GenericClient) -> Result<Vec<ProjectorState>> {
    states::list(client).await
}

/// The row of projector `name`, if it has one.
///
/// # Errors
/// Database errors.
pub async fn projector_state(
    client: &impl GenericClient,
    name: &str,
) -> Result<Option<ProjectorState>> {
    states::get(client, name, false).await
}

/// The projectors with a version replaying or activating (what `coord
/// abort` backs out), by name.
///
/// # Errors
/// Database errors.
pub async fn in_progress(client: &impl GenericClient) -> Result<Vec<ProjectorState>> {
    Ok(states::list(client)
        .await?
        .into_iter()
        .filter(|s| s.replaying_version.is_some() || s.activating_version.is_some())
        .collect())
}

/// What coord knows about `name@version`, if it is registered.
///
/// # Errors
/// Database errors.
pub async fn version(
    client: &impl GenericClient,
    name: &str,
    version: &str,
) -> Result<Option<VersionRecord>> {
    versions::get(client, name, version).await
}

/// Every transition of projector `name` (or of all projectors), oldest first.
///
/// # Errors
/// Database errors.
pub async fn transitions(
    client: &impl GenericClient,
    name: Option<&str>,
) -> Result<Vec<Transition>> {
    history::list(client, name).await
}

/// The events parked by `name@version`'s handlers, by position.
///
/// # Errors
/// Database errors.
pub async fn parked_events(
    client: &impl GenericClient,
    name: &str,
    version: &str,
) -> Result<Vec<ParkedEvent>> {
    parked::list(client, name, version).await
}
