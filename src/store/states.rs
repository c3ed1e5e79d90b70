//! `coord.projector_states`: the public one-row-per-projector table.

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
    let row = client
        .query_opt(&format!("{SELECT} WHERE name = $1{lock}"), &[&name])
        .await?;
    Ok(row.as_ref().map(ProjectorState::try_from).transpose()?)
}

const UPSERT: &str = "INSERT INTO coord.projector_states AS s \
    (name, active_version, activating_version, replaying_version, updated_at) \
    VALUES ($1, $2, $3, $4, now()) \
    ON CONFLICT (name) DO UPDATE SET active_version = EXCLUDED.active_version, \
    activating_version = EXCLUDED.activating_version, replaying_version = EXCLUDED.replaying_version, \
    updated_at = now()";

/// Writes the whole row of `state.name` (inserting it if missing).
///
/// # Errors
/// Database errors, including the check that replaying and activating are
/// never both set.
pub async fn put(
    client: &impl GenericClient,
    name: &str,
    active: Option<&str>,
    activating: Option<&str>,
    replaying: Option<&str>,
) -> Result<()> {
    client
        .execute(UPSERT, &[&name, &active, &activating, &replaying])
        .await?;
    Ok(())
}

/// Deletes the row of `name` (a projector no longer used anywhere).
///
/// # Errors
/// Database errors.
pub async fn delete(client: &impl GenericClient, name: &str) -> Result<()> {
    client
        .execute(
            "DELETE FROM coord.projector_states WHERE name = $1",
            &[&name],
        )
        .await?;
    Ok(())
}
