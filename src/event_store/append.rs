//! The publisher's append to the bundled store `coord.events`: the gate,
//! the insert with optimistic concurrency and the record of inline
//! application, in one statement of the caller's transaction. The
//! publisher (`crate::publisher`) decides what to append and runs the
//! handlers; this module owns the SQL and the decoding of its answer.

use std::time::SystemTime;

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::{Error, Result};

/// The gate, the append and the record of inline application in one
/// statement. The materialised `gate` CTE runs first (its locks are held
/// until commit, and it reads the states with a snapshot taken after them)
/// and returns the inline versions that may apply these events now (the
/// stream's last handled event is applied, see `coord.inline_runnable`);
/// the rows are inserted, and one `coord.applied_ahead` row per event and
/// version that handles it (`$9`, `name/type` pairs of this configuration)
/// records the inline application in the same transaction, so a follower
/// never applies it again. A refusal aborts the statement. It also returns
/// the versions to run and the caller's `search_path`, so a publish costs
/// one statement before the handlers. The lookups live in plpgsql, whose
/// plans are cached: this statement is planned on every call.
const APPEND: &str = "WITH gate AS MATERIALIZED ( \
        SELECT CASE WHEN $6::bool THEN coord.gate_run($7::jsonb, $8::text[], $1) END AS run), \
    cur AS (SELECT coalesce(max(stream_version), 0) AS v FROM coord.events WHERE stream_id = $1), \
    ins AS (INSERT INTO coord.events (stream_id, stream_version, event_type, data, metadata) \
        SELECT $1, cur.v + e.ord, e.t, e.d, e.m \
        FROM gate, cur, unnest($2::text[], $3::jsonb[], $4::jsonb[]) WITH ORDINALITY AS e(t, d, m, ord) \
        WHERE $5::bigint IS NULL OR cur.v = $5 \
        ORDER BY e.ord \
        RETURNING position, stream_version, recorded_at, event_type, xact_id), \
    ahead AS (INSERT INTO coord.applied_ahead (name, version, position, xact_id, inline) \
        SELECT r.name, $7::jsonb -> r.name ->> 'version', ins.position, ins.xact_id, true \
        FROM gate, unnest(gate.run) AS r(name), ins \
        WHERE r.name || '/' || ins.event_type = ANY($9::text[])) \
    SELECT ins.position, ins.stream_version, ins.recorded_at, (SELECT run FROM gate), \
        current_setting('search_path') FROM ins ORDER BY ins.position";

const STREAM_VERSION: &str =
    "SELECT coalesce(max(stream_version), 0) FROM coord.events WHERE stream_id = $1";

/// The parameters of one append.
pub(crate) struct Append<'a> {
    /// The stream appended to.
    pub stream_id: &'a str,
    /// The events' types, data and metadata, in order.
    pub event_types: &'a [&'a str],
    pub data: &'a [&'a serde_json::Value],
    pub metadata: &'a [&'a serde_json::Value],
    /// The stream version the append requires (`None`: any).
    pub expected: Option<i64>,
    /// Whether the gate runs.
    pub gate: bool,
    /// The gate's `projectors` argument (`crate::publisher::gate_json`).
    pub versions: &'a serde_json::Value,
    /// The distinct event types appended.
    pub types: &'a [String],
    /// `name/type` for every projector of the configuration and type it handles.
    pub handled: &'a [String],
}

/// One appended event, as stored.
pub(crate) struct AppendedRow {
    pub position: i64,
    pub stream_version: i64,
    pub recorded_at: SystemTime,
}

/// What an append returned.
pub(crate) struct Appended {
    /// One row per appended event, in order; none when the stream was not
    /// at the expected version.
    pub rows: Vec<AppendedRow>,
    /// The inline versions the gate let run on these events (`None`
    /// without the gate or without rows).
    pub inline: Option<Vec<String>>,
    /// The caller's `search_path`, to restore after running handlers.
    pub search_path: Option<String>,
}

/// Runs the append of `a` in `client` (the publisher's transaction).
///
/// # Errors
/// The gate's refusals; [`Error::StreamVersionConflict`] when a concurrent
/// publisher appended to the stream first; database errors.
pub(crate) async fn append(client: &impl GenericClient, a: &Append<'_>) -> Result<Appended> {
    let params: [(&(dyn ToSql + Sync), Type); 9] = [
        (&a.stream_id, Type::TEXT),
        (&a.event_types, Type::TEXT_ARRAY),
        (&a.data, Type::JSONB_ARRAY),
        (&a.metadata, Type::JSONB_ARRAY),
        (&a.expected, Type::INT8),
        (&a.gate, Type::BOOL),
        (&a.versions, Type::JSONB),
        (&a.types, Type::TEXT_ARRAY),
        (&a.handled, Type::TEXT_ARRAY),
    ];
    let rows = client
        .query_typed(APPEND, &params)
        .await
        .map_err(|e| append_error(e, a))?;
    let (inline, search_path) = match rows.first() {
        Some(row) => (row.try_get(3)?, Some(row.try_get(4)?)),
        None => (None, None),
    };
    let rows = rows
        .iter()
        .map(|row| {
            Ok(AppendedRow {
                position: row.try_get(0)?,
                stream_version: row.try_get(1)?,
                recorded_at: row.try_get(2)?,
            })
        })
        .collect::<Result<_>>()?;
    Ok(Appended {
        rows,
        inline,
        search_path,
    })
}

/// The current version of `stream_id` (0 when it has no events).
///
/// # Errors
/// Database errors.
pub(crate) async fn stream_version(client: &impl GenericClient, stream_id: &str) -> Result<i64> {
    Ok(client
        .query_one(STREAM_VERSION, &[&stream_id])
        .await?
        .try_get(0)?)
}

fn append_error(e: tokio_postgres::Error, a: &Append<'_>) -> Error {
    let unique = e.as_db_error().is_some_and(|d| {
        d.code().code() == "23505" && d.constraint() == Some("events_stream_version")
    });
    if unique {
        // A concurrent publisher appended to the same stream first.
        return Error::StreamVersionConflict {
            stream: a.stream_id.to_owned(),
            expected: a.expected.unwrap_or_default(),
            actual: -1,
        };
    }
    Error::from(e)
}
