//! [`Event`]: one event of the event store, as a pass reads it and as
//! handlers receive it. A leaf: it imports nothing of coord, so the store,
//! the projectors and the publisher all use it without a cycle.

use std::time::SystemTime;

use tokio_postgres::Row;

/// One event of the event store, as handlers see it.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Global position (`$3` of config handlers).
    pub position: i64,
    /// Stream id (`$1`).
    pub stream_id: String,
    /// Version within the stream (`$2`).
    pub stream_version: i64,
    /// Event type (`$4`).
    pub event_type: String,
    /// Payload (`$5`).
    pub data: serde_json::Value,
    /// Metadata (`$6`).
    pub metadata: serde_json::Value,
    /// When it was recorded (`$7`).
    pub recorded_at: SystemTime,
}

impl Event {
    /// The columns, in this order, that [`Event::try_from`] decodes.
    pub const COLUMNS: &'static str =
        "position, stream_id, stream_version, event_type, data, metadata, recorded_at";
}

impl TryFrom<&Row> for Event {
    type Error = tokio_postgres::Error;

    fn try_from(row: &Row) -> Result<Self, Self::Error> {
        Ok(Event {
            position: row.try_get(0)?,
            stream_id: row.try_get(1)?,
            stream_version: row.try_get(2)?,
            event_type: row.try_get(3)?,
            data: row.try_get(4)?,
            metadata: row.try_get(5)?,
            recorded_at: row.try_get(6)?,
        })
    }
}
