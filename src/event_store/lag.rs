//! What the event store holds beyond a checkpoint: the head position, the
//! handled events a version still has to apply (its lag), and each
//! version's progress for `coord status`. Reads only.

use tokio_postgres::GenericClient;

use crate::names::RelationName;
use crate::Result;

const HEAD_POSITION: &str = "SELECT coalesce(max(position), 0)::bigint FROM {events}";

/// The highest position in `event_store` (0 when it is empty).
///
/// # Errors
/// Database errors.
pub async fn head_position(client: &impl GenericClient, event_store: &RelationName) -> Result<i64> {
    let sql = HEAD_POSITION.replace("{events}", &event_store.quoted());
    Ok(client.query_one(&sql, &[]).await?.try_get(0)?)
}

const COUNT_HANDLED: &str = "SELECT count(*) FROM {events} WHERE event_type = ANY($1)";

/// The number of events of `event_types` in `event_store`: what a replay
/// from the beginning has to process.
///
/// # Errors
/// Database errors.
pub async fn count_handled(
    client: &impl GenericClient,
    event_store: &RelationName,
    event_types: &[String],
) -> Result<i64> {
    let sql = COUNT_HANDLED.replace("{events}", &event_store.quoted());
    Ok(client.query_one(&sql, &[&event_types]).await?.try_get(0)?)
}

const HORIZON: &str =
    "SELECT horizon::text FROM coord.projector_versions WHERE name = $1 AND version = $2";

const PENDING: &str = "SELECT count(*) FROM {events} e \
    WHERE e.xact_id >= $3::text::xid8 \
    AND e.event_type = ANY($4) AND NOT EXISTS (SELECT 1 FROM coord.applied_ahead a \
    WHERE a.name = $1 AND a.version = $2 AND a.position = e.position)";

/// The committed handled events `name@version` has not applied yet (its lag),
/// read through the `xact_id` index from the horizon up; 0 for a version
/// that is not registered.
///
/// The horizon is read first and given to the count as a value: as a
/// subquery, the planner could not see how few events lie above it and
/// planned for a third of the store (decision 0077).
///
/// # Errors
/// Database errors.
pub async fn pending(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    event_types: &[String],
    event_store: &RelationName,
) -> Result<i64> {
    let Some(row) = client.query_opt(HORIZON, &[&name, &version]).await? else {
        return Ok(0);
    };
    let horizon: String = row.try_get(0)?;
    let sql = PENDING.replace("{events}", &event_store.quoted());
    let row = client
        .query_one(&sql, &[&name, &version, &horizon, &event_types])
        .await?;
    Ok(row.try_get(0)?)
}

/// Where one version stands, for status: what it applied and what it has
/// not applied yet.
#[derive(Clone, Debug, PartialEq)]
pub struct VersionProgress {
    /// Projector name.
    pub name: String,
    /// Version.
    pub version: String,
    /// Highest position applied, by a pass or inline.
    pub position: i64,
    /// Events its publishers applied inline (recorded in `applied_ahead`).
    pub applied_inline: i64,
    /// Committed handled events not yet applied (0 for versions nobody follows).
    pub lag_events: i64,
    /// Age in seconds of the oldest of them (`None` when there are none).
    pub lag_seconds: Option<f64>,
}

const PROGRESS: &str = "SELECT v.name, v.version, \
    greatest(v.last_position, coalesce((SELECT max(a.position) FROM coord.applied_ahead a \
      WHERE a.name = v.name AND a.version = v.version AND a.inline), 0)) AS position, \
    v.events_inline + (SELECT count(*) FROM coord.applied_ahead a \
      WHERE a.name = v.name AND a.version = v.version AND a.inline) AS applied_inline, \
    p.lag_events, p.lag_seconds \
    FROM coord.projector_versions v LEFT JOIN LATERAL ( \
      SELECT count(*) AS lag_events, extract(epoch FROM now() - min(e.recorded_at))::float8 AS lag_seconds \
      FROM {events} e \
      WHERE v.status IN ('replaying', 'activating', 'active') \
        AND e.xact_id >= v.horizon AND e.event_type = ANY(v.event_types) \
        AND NOT EXISTS (SELECT 1 FROM coord.applied_ahead a \
          WHERE a.name = v.name AND a.version = v.version AND a.position = e.position) \
        AND NOT (v.pass_snapshot IS NOT NULL AND e.position <= v.pass_cursor \
          AND pg_visible_in_snapshot(e.xact_id, v.pass_snapshot))) p ON true \
    ORDER BY v.name, v.version";

/// The [`VersionProgress`] of every registered version: exact, from the
/// checkpoint (horizon, `applied_ahead`, the pass in progress), read through
/// the `xact_id` index from each horizon up.
///
/// # Errors
/// Database errors.
pub async fn progress(
    client: &impl GenericClient,
    event_store: &RelationName,
) -> Result<Vec<VersionProgress>> {
    let sql = PROGRESS.replace("{events}", &event_store.quoted());
    let rows = client.query(&sql, &[]).await?;
    rows.iter()
        .map(|row| {
            Ok(VersionProgress {
                name: row.try_get(0)?,
                version: row.try_get(1)?,
                position: row.try_get(2)?,
                applied_inline: row.try_get(3)?,
                lag_events: row.try_get(4)?,
                lag_seconds: row.try_get(5)?,
            })
        })
        .collect()
}
