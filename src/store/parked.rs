//! `coord.parked_events`: events whose handler failed during a replay of a
//! projector with `on_error = "park"`. Only records them; deciding to park
//! is the replay's job.

use tokio_postgres::{GenericClient, Row};

use crate::event_store::Event;
use crate::Result;

/// One parked event.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ParkedEvent {
    /// Projector name.
    pub name: String,
    /// Projector version.
    pub version: String,
    /// The event's position.
    pub position: i64,
    /// Its stream.
    pub stream_id: String,
    /// Its version within the stream.
    pub stream_version: i64,
    /// Its type.
    pub event_type: String,
    /// What the handler failed with.
    pub error: String,
}

impl TryFrom<&Row> for ParkedEvent {
    type Error = tokio_postgres::Error;
    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Self {
            name: row.try_get("name")?,
            version: row.try_get("version")?,
            position: row.try_get("position")?,
            stream_id: row.try_get("stream_id")?,
            stream_version: row.try_get("stream_version")?,
            event_type: row.try_get("event_type")?,
            error: row.try_get("error")?,
        })
    }
}

const INSERT: &str = "INSERT INTO coord.parked_events \
    (name, version, position, stream_id, stream_version, event_type, error) \
    VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (name, version, position) DO UPDATE SET error = EXCLUDED.error, parked_at = now()";

/// Parks `event` of `name@version` with the handler's `error`.
///
/// # Errors
/// Database errors.
pub async fn insert(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    event: &Event,
    error: &str,
) -> Result<()> {
    client
        .execute(
            INSERT,
            &[
                &name,
                &version,
                &event.position,
                &event.stream_id,
                &event.stream_version,
                &event.event_type,
                &error,
            ],
        )
        .await?;
    Ok(())
}

/// The parked events of `name@version`, by position.
///
/// # Errors
/// Database errors.
pub async fn list(
    client: &impl GenericClient,
    name: &str,
    version: &str,
) -> Result<Vec<ParkedEvent>> {
    let rows = client
        .query(
            "SELECT name, version, position, stream_id, stream_version, event_type, error \
             FROM coord.parked_events WHERE name = $1 AND version = $2 ORDER BY position",
            &[&name, &version],
        )
        .await?;
    Ok(rows
        .iter()
        .map(ParkedEvent::try_from)
        .collect::<Result<_, _>>()?)
}

/// Forgets the parked events of `name@version` (its replay restarts from scratch).
///
/// # Errors
/// Database errors.
pub async fn delete_all(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    client
        .execute(
            "DELETE FROM coord.parked_events WHERE name = $1 AND version = $2",
            &[&name, &version],
        )
        .await?;
    Ok(())
}
