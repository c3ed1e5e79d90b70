//! `coord.transitions`: the append-only audit trail of state changes.

use tokio_postgres::types::Type;
use tokio_postgres::{GenericClient, Row};

use super::versions::VersionStatus;
use super::Actor;
use crate::Result;

/// One recorded transition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Transition {
    /// Sequence number.
    pub id: i64,
    /// Projector name.
    pub name: String,
    /// Projector version, if the transition concerns one.
    pub version: Option<String>,
    /// Status before.
    pub from_status: Option<VersionStatus>,
    /// Status after.
    pub to_status: VersionStatus,
    /// When, ISO 8601 UTC.
    pub at: String,
    /// Host that made it.
    pub host: String,
    /// Command that made it.
    pub command: String,
    /// Free-form detail.
    pub detail: Option<String>,
}

impl TryFrom<&Row> for Transition {
    type Error = crate::Error;
    fn try_from(row: &Row) -> Result<Self> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            version: row.try_get("version")?,
            from_status: row
                .try_get::<_, Option<&str>>("from_status")?
                .map(VersionStatus::parse)
                .transpose()?,
            to_status: VersionStatus::parse(row.try_get("to_status")?)?,
            at: row.try_get("at")?,
            host: row.try_get("host")?,
            command: row.try_get("command")?,
            detail: row.try_get("detail")?,
        })
    }
}

const INSERT: &str = "INSERT INTO coord.transitions \
    (name, version, from_status, to_status, host, command, detail) VALUES ($1, $2, $3, $4, $5, $6, $7)";

const COLUMNS: &str =
    "id, name, version, from_status, to_status, coord.iso(at) AS at, host, command, detail";

/// Records a transition.
///
/// # Errors
/// Database errors.
pub async fn record(
    client: &impl GenericClient,
    actor: &Actor,
    name: &str,
    version: Option<&str>,
    from: Option<VersionStatus>,
    to: VersionStatus,
    detail: Option<&str>,
) -> Result<()> {
    let (from, to) = (from.map(VersionStatus::as_str), to.as_str());
    client
        .execute_typed(
            INSERT,
            &[
                (&name, Type::TEXT),
                (&version, Type::TEXT),
                (&from, Type::TEXT),
                (&to, Type::TEXT),
                (&actor.host, Type::TEXT),
                (&actor.command, Type::TEXT),
                (&detail, Type::TEXT),
            ],
        )
        .await?;
    Ok(())
}

/// The latest transition of every projector.
///
/// # Errors
/// Database errors.
pub async fn latest_per_projector(client: &impl GenericClient) -> Result<Vec<Transition>> {
    let sql = format!(
        "SELECT DISTINCT ON (name) {COLUMNS} FROM coord.transitions ORDER BY name, id DESC"
    );
    let rows = client.query(&sql, &[]).await?;
    rows.iter().map(Transition::try_from).collect()
}

/// Every transition of `name` (or of all projectors), oldest first.
///
/// # Errors
/// Database errors.
pub async fn list(client: &impl GenericClient, name: Option<&str>) -> Result<Vec<Transition>> {
    let sql = format!(
        "SELECT {COLUMNS} FROM coord.transitions WHERE $1::text IS NULL OR name = $1 ORDER BY id"
    );
    let rows = client.query(&sql, &[&name]).await?;
    rows.iter().map(Transition::try_from).collect()
}
