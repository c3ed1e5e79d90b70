//! `coord.projector_states`: the public one-row-per-projector table.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

use crate::Result;

/// One row of `coord.projector_states`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProjectorState {
    /// Projector name.
    pub name: String,
    /// The version publishers run inline and readers read.
    pub active_version: Option<String>,
    /// The version being activated, if any.
    pub activating_version: Option<String>,
    /// The version being replayed, if any.
    pub replaying_version: Option<String>,
    /// Last change, ISO 8601 UTC.
    pub updated_at: String,
}

impl TryFrom<&Row> for ProjectorState {
    type Error = tokio_postgres::Error;
    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Self {
            name: row.try_get("name")?,
            active_version: row.try_get("active_version")?,
            activating_version: row.try_get("activating_version")?,
            replaying_version: row.try_get("replaying_version")?,
            updated_at: row.try_get("updated_at")?,
        })
    }
}

const SELECT: &str = "SELECT name, active_version, activating_version, replaying_version, \
    coord.iso(updated_at) AS updated_at FROM coord.projector_states";

/// Every row, by name.
///
/// # Errors
/// Database errors.
pub async fn list(client: &impl GenericClient) -> Result<Vec<ProjectorState>> {
    let rows = client
        .query(&format!("{SELECT} ORDER BY name"), &[])
        .await?;
    Ok(rows
        .iter()
        .map(ProjectorState::try_from)
        .collect::<Result<_, _>>()?)
}

/// The row of `name`, if any; `for_update` locks it until the transaction ends.
///
/// # Errors
/// Database errors.
pub async fn get(
    client: &impl GenericClient,
    name: &str,
    for_update: bool,
) -> Result<Option<ProjectorState>> {
    let lock = if for_update { " FOR UPDATE" } else { "" };
    // Unprepared and typed: one round trip (the activation's hot path).
    let row = client
        .query_typed_opt(
            &format!("{SELECT} WHERE name = $1{lock}"),
            &[(&name, Type::TEXT)],
        )
        .await?;
    Ok(row.as_ref().map(ProjectorState::try_from).transpose()?)
}

// The transitions of `coord.projector_states`: each writes only the
// columns it changes (unprepared and typed: one round trip each, so the
// critical section can pipeline them), inserting the row when the projector has none yet.
// The table's check keeps `replaying_version` and `activating_version`
// from both being set.
const START_REPLAYING: &str = "INSERT INTO coord.projector_states AS s \
    (name, replaying_version, updated_at) VALUES ($1, $2, now()) \
    ON CONFLICT (name) DO UPDATE SET activating_version = NULL, \
    replaying_version = EXCLUDED.replaying_version, updated_at = now()";
const STOP_REPLAYING: &str = "UPDATE coord.projector_states SET replaying_version = NULL, \
    updated_at = now() WHERE name = $1";
const MARK_ACTIVATING: &str = "INSERT INTO coord.projector_states AS s \
    (name, activating_version, updated_at) VALUES ($1, $2, now()) \
    ON CONFLICT (name) DO UPDATE SET activating_version = EXCLUDED.activating_version, \
    replaying_version = NULL, updated_at = now()";
const ACTIVATE: &str = "INSERT INTO coord.projector_states AS s \
    (name, active_version, updated_at) VALUES ($1, $2, now()) \
    ON CONFLICT (name) DO UPDATE SET active_version = EXCLUDED.active_version, \
    activating_version = NULL, replaying_version = NULL, updated_at = now()";
const RETIRE: &str = "UPDATE coord.projector_states SET active_version = NULL, \
    activating_version = NULL, updated_at = now() WHERE name = $1";

/// `version` of `name` is replaying (started, resumed, or back from
/// activating or retired); the active version is kept, no version is activating.
///
/// # Errors
/// Database errors.
pub async fn start_replaying(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    client
        .execute_typed(
            START_REPLAYING,
            &[(&name, Type::TEXT), (&version, Type::TEXT)],
        )
        .await?;
    Ok(())
}

/// No version of `name` is replaying any more (its replay was aborted).
///
/// # Errors
/// Database errors.
pub async fn stop_replaying(client: &impl GenericClient, name: &str) -> Result<()> {
    client
        .execute_typed(STOP_REPLAYING, &[(&name, Type::TEXT)])
        .await?;
    Ok(())
}

/// The replaying `version` of `name` is activating: publishers of its event
/// types are refused (retryably) until it is active or back to replaying.
///
/// # Errors
/// Database errors.
pub async fn mark_activating(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    client
        .execute_typed(
            MARK_ACTIVATING,
            &[(&name, Type::TEXT), (&version, Type::TEXT)],
        )
        .await?;
    Ok(())
}

/// `version` of `name` is active; nothing is replaying or activating.
///
/// # Errors
/// Database errors.
pub async fn activate(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    client
        .execute_typed(ACTIVATE, &[(&name, Type::TEXT), (&version, Type::TEXT)])
        .await?;
    Ok(())
}

/// No version of `name` is active or activating (a replay in progress is kept).
///
/// # Errors
/// Database errors.
pub async fn retire(client: &impl GenericClient, name: &str) -> Result<()> {
    client.execute_typed(RETIRE, &[(&name, Type::TEXT)]).await?;
    Ok(())
}
