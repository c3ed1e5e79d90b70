//! A projector version's checkpoint (docs/decisions/0002-checkpoint-horizon.md):
//! the `horizon`, the `pass_snapshot` / `pass_cursor` of a pass in progress,
//! the `coord.applied_ahead` rows, the progress counters, and the queries
//! that read the events a pass still has to apply. Transaction ids and
//! snapshots travel as text (`xid8` and `pg_snapshot` have no Rust type) and
//! are cast back in SQL. This module never applies events.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::names::{quote_literal, RelationName};
use crate::store::events::field;
use crate::store::events::{walk_copy, EventBatch};
use crate::store::versions::VersionStatus;
use crate::{Error, Result};

/// The checkpoint of one projector version, as locked by [`lock`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    /// Every handled event with `xact_id` below this (an `xid8`, as text) is applied.
    pub horizon: String,
    /// The snapshot of the pass in progress (a `pg_snapshot`, as text).
    pub pass_snapshot: Option<String>,
    /// The last position the pass in progress applied.
    pub pass_cursor: Option<i64>,
    /// The version's status.
    pub status: VersionStatus,
    /// Its schema.
    pub schema_name: String,
    /// Events applied so far.
    pub events_processed: i64,
}

const LOCK: &str = "SELECT horizon::text, pass_snapshot::text, pass_cursor, status, schema_name, \
    events_processed FROM coord.projector_versions WHERE name = $1 AND version = $2 \
    FOR NO KEY UPDATE";

/// Locks the row of `name@version` until the transaction ends and returns its checkpoint.
///
/// The lock is `FOR NO KEY UPDATE`: it excludes other passes but not the
/// `FOR KEY SHARE` lock that publishers' `coord.applied_ahead` rows take on
/// the row through their foreign key, so a batch never blocks publishing.
///
/// # Errors
/// [`Error::Failed`] when the version is not registered; database errors.
pub async fn lock(client: &impl GenericClient, name: &str, version: &str) -> Result<Checkpoint> {
    let row = client
        .query_opt(LOCK, &[&name, &version])
        .await?
        .ok_or_else(|| {
            Error::Failed(format!(
                "projector version {name}@{version} is not registered: run `coord replay` first"
            ))
        })?;
    let status: String = row.try_get(3)?;
    Ok(Checkpoint {
        horizon: row.try_get(0)?,
        pass_snapshot: row.try_get(1)?,
        pass_cursor: row.try_get(2)?,
        status: VersionStatus::parse(&status)?,
        schema_name: row.try_get(4)?,
        events_processed: row.try_get(5)?,
    })
}

/// The current snapshot of the calling transaction (`pg_current_snapshot()`), as text.
///
/// # Errors
/// Database errors.
pub async fn current_snapshot(client: &impl GenericClient) -> Result<String> {
    let row = client
        .query_one("SELECT pg_current_snapshot()::text", &[])
        .await?;
    Ok(row.try_get(0)?)
}

const BEGIN_PASS: &str =
    "UPDATE coord.projector_versions SET pass_snapshot = $3::text::pg_snapshot, \
    pass_cursor = 0, last_error = NULL, updated_at = now() WHERE name = $1 AND version = $2";

/// Starts a pass of `name@version` over `snapshot` from the first position.
///
/// # Errors
/// Database errors.
pub async fn begin_pass(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    snapshot: &str,
) -> Result<()> {
    client
        .execute(BEGIN_PASS, &[&name, &version, &snapshot])
        .await?;
    Ok(())
}

/// What one batch changed, recorded with its projection writes.
#[derive(Clone, Debug, Default)]
pub struct BatchProgress<'a> {
    /// The pass cursor after the batch.
    pub cursor: i64,
    /// The highest position applied (or parked) by the batch, if any.
    pub last_position: Option<i64>,
    /// Events applied.
    pub applied: i64,
    /// Events parked.
    pub parked: i64,
    /// Estimated total of events of the version (set at pass start).
    pub events_total: Option<i64>,
    /// Current rate, events per second.
    pub rate_per_s: Option<f64>,
    /// Seconds left.
    pub eta_s: Option<f64>,
    /// The failure that stopped the pass, if any.
    pub last_error: Option<&'a str>,
    /// Positions applied although their `xact_id` is at or above the pass
    /// snapshot's xmin: rows of `coord.applied_ahead`.
    pub ahead_positions: &'a [i64],
    /// Their `xact_id`s, as text.
    pub ahead_xacts: &'a [String],
}

const RECORD_BATCH: &str = "UPDATE coord.projector_versions SET pass_cursor = $3::bigint, \
    last_position = greatest(last_position, coalesce($4::bigint, 0)), \
    events_processed = events_processed + $5::bigint, events_parked = events_parked + $6::bigint, \
    events_total = coalesce($7::bigint, events_total), rate_per_s = coalesce($8::float8, rate_per_s), \
    eta_s = coalesce($9::float8, eta_s), last_error = coalesce($10::text, last_error), updated_at = now() \
    WHERE name = $1 AND version = $2";

const INSERT_AHEAD: &str = "INSERT INTO coord.applied_ahead (name, version, position, xact_id) \
    SELECT $1, $2, p, x::xid8 FROM unnest($3::bigint[], $4::text[]) AS u(p, x)";

/// Records a batch: cursor, counters, progress and `applied_ahead` rows.
///
/// # Errors
/// Database errors.
pub async fn record_batch(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    b: &BatchProgress<'_>,
) -> Result<()> {
    let update_params: [&(dyn ToSql + Sync); 10] = [
        &name,
        &version,
        &b.cursor,
        &b.last_position,
        &b.applied,
        &b.parked,
        &b.events_total,
        &b.rate_per_s,
        &b.eta_s,
        &b.last_error,
    ];
    let update = client.execute(RECORD_BATCH, &update_params);
    if b.ahead_positions.is_empty() {
        update.await?;
    } else {
        let insert_params: [&(dyn ToSql + Sync); 4] =
            [&name, &version, &b.ahead_positions, &b.ahead_xacts];
        let insert = client.execute(INSERT_AHEAD, &insert_params);
        futures_util::future::try_join(update, insert).await?;
    }
    Ok(())
}

const FINISH_PASS: &str = "UPDATE coord.projector_versions SET \
    horizon = greatest(horizon, pg_snapshot_xmin($3::text::pg_snapshot)), \
    pass_snapshot = NULL, pass_cursor = NULL, eta_s = 0, replay_finished_at = now(), updated_at = now() \
    WHERE name = $1 AND version = $2 RETURNING horizon::text";

/// Deletes the rows below the new horizon and adds those that publishers
/// wrote (inline applications) to `events_inline`, so the count survives.
const PRUNE_AHEAD: &str = "WITH pruned AS (DELETE FROM coord.applied_ahead \
    WHERE name = $1 AND version = $2 AND xact_id < $3::text::xid8 RETURNING inline) \
    UPDATE coord.projector_versions SET \
    events_inline = events_inline + (SELECT count(*) FROM pruned WHERE inline) \
    WHERE name = $1 AND version = $2";

/// Ends the pass over `snapshot`: the horizon moves to its xmin, the pass
/// fields are cleared and `applied_ahead` rows below the new horizon go.
/// Returns the new horizon.
///
/// # Errors
/// Database errors.
pub async fn finish_pass(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    snapshot: &str,
) -> Result<String> {
    let row = client
        .query_one(FINISH_PASS, &[&name, &version, &snapshot])
        .await?;
    let horizon: String = row.try_get(0)?;
    client
        .execute(PRUNE_AHEAD, &[&name, &version, &horizon])
        .await?;
    Ok(horizon)
}

const AHEAD_AFTER: &str = "SELECT EXISTS (SELECT 1 FROM coord.applied_ahead \
    WHERE name = $1 AND version = $2 AND position > $3)";

/// Whether `applied_ahead` has rows of `name@version` after `cursor`: only
/// then must a pass's reads exclude them (rows a pass adds are at or below
/// its cursor).
///
/// # Errors
/// Database errors.
pub async fn has_ahead_after(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    cursor: i64,
) -> Result<bool> {
    let row = client
        .query_one(AHEAD_AFTER, &[&name, &version, &cursor])
        .await?;
    Ok(row.try_get(0)?)
}

/// Which events a pass reads: those of `event_types` after `cursor` whose
/// transaction is at or above `horizon` and visible in `snapshot`, not yet
/// in `applied_ahead`.
#[derive(Clone, Debug)]
pub struct PassQuery {
    /// Projector name.
    pub name: String,
    /// Projector version.
    pub version: String,
    /// The event store relation.
    pub event_store: RelationName,
    /// Handled event types.
    pub event_types: Vec<String>,
    /// The version's horizon (`xid8` as text); `"0"` reads by position only.
    pub horizon: String,
    /// The pass snapshot (`pg_snapshot` as text).
    pub snapshot: String,
    /// Whether to exclude `applied_ahead` rows (see [`has_ahead_after`]).
    pub exclude_ahead: bool,
    /// A batch read ends before the event that would take the batch's size
    /// (`stream_id`, `event_type`, `data`, `metadata` as stored, plus 64
    /// bytes per event) to this many bytes; it always holds at least one
    /// event. `i64::MAX`: no byte budget.
    pub max_bytes: i64,
}

impl PassQuery {
    fn filter(&self) -> String {
        let mut sql = format!(
            "FROM {} e WHERE e.position > $2 AND e.event_type = ANY($3) \
             AND pg_visible_in_snapshot(e.xact_id, $1::text::pg_snapshot)",
            self.event_store.quoted()
        );
        // A full replay reads by position (the primary key); a catch-up by
        // the `xact_id` index, so its cost follows the delta.
        if self.horizon != "0" {
            sql.push_str(" AND e.xact_id >= $5::text::xid8");
        }
        if self.exclude_ahead {
            sql.push_str(
                " AND NOT EXISTS (SELECT 1 FROM coord.applied_ahead a \
                 WHERE a.name = $6 AND a.version = $7 AND a.position = e.position)",
            );
        }
        sql
    }

    /// The SQL of one batch read (parameters as in [`PassQuery::read`]):
    /// at most `$4` events, cut where their running size passes `$8` bytes.
    pub fn read_sql(&self) -> String {
        format!(
            "SELECT position, stream_id, stream_version, event_type, data, metadata, recorded_at, xact \
             FROM (SELECT l.*, sum(l.size) OVER (ORDER BY l.position) - l.size AS before FROM (\
             SELECT e.position, e.stream_id, e.stream_version, e.event_type, e.data, e.metadata, \
             e.recorded_at, CASE WHEN e.xact_id >= pg_snapshot_xmin($1::text::pg_snapshot) \
             THEN e.xact_id::text END AS xact, 64 + octet_length(e.stream_id) + octet_length(e.event_type) \
             + pg_column_size(e.data) + pg_column_size(e.metadata) AS size \
             {} ORDER BY e.position LIMIT $4) l) w WHERE w.before < $8::bigint ORDER BY position",
            self.filter()
        )
    }

    fn params<'a>(
        &'a self,
        cursor: &'a i64,
        limit: &'a i64,
    ) -> [(&'a (dyn ToSql + Sync), Type); 8] {
        [
            (&self.snapshot, Type::TEXT),
            (cursor, Type::INT8),
            (&self.event_types, Type::TEXT_ARRAY),
            (limit, Type::INT8),
            (&self.horizon, Type::TEXT),
            (&self.name, Type::TEXT),
            (&self.version, Type::TEXT),
            (&self.max_bytes, Type::INT8),
        ]
    }

    /// Reads up to `limit` events after `cursor`, in position order, each
    /// with its `xact_id` when it must be recorded in `applied_ahead`.
    ///
    /// # Errors
    /// Database errors; decoding errors.
    pub async fn read(
        &self,
        client: &impl GenericClient,
        cursor: i64,
        limit: i64,
    ) -> Result<EventBatch> {
        EventBatch::decode(&self.read_rows(client, cursor, limit).await?)
    }

    /// Like [`PassQuery::read`], undecoded: decode with [`EventBatch::decode`]
    /// (CPU work a caller may move to another thread).
    ///
    /// # Errors
    /// Database errors.
    pub async fn read_rows(
        &self,
        client: &impl GenericClient,
        cursor: i64,
        limit: i64,
    ) -> Result<Vec<Row>> {
        Ok(client
            .query_typed(&self.read_sql(), &self.params(&cursor, &limit))
            .await?)
    }

    /// The batch read of [`PassQuery::read_sql`] as a binary `COPY`, values
    /// inlined as quoted literals (`COPY` takes no parameters).
    ///
    /// # Errors
    /// [`Error::Failed`] when the snapshot or horizon is not what PostgreSQL
    /// produces for them.
    pub fn copy_sql(&self, cursor: i64, limit: i64) -> Result<String> {
        let numeric = |text: &str| {
            text.chars()
                .all(|c| c.is_ascii_digit() || c == ':' || c == ',')
        };
        if !numeric(&self.snapshot) || !numeric(&self.horizon) {
            return Err(Error::Failed(format!(
                "invalid checkpoint of {}@{}: snapshot {:?}, horizon {:?}",
                self.name, self.version, self.snapshot, self.horizon
            )));
        }
        let types: Vec<String> = self.event_types.iter().map(|t| quote_literal(t)).collect();
        let sql = self
            .read_sql()
            .replace("$8", &self.max_bytes.to_string())
            .replace("$7", &quote_literal(&self.version))
            .replace("$6", &quote_literal(&self.name))
            .replace("$5", &quote_literal(&self.horizon))
            .replace("$4", &limit.to_string())
            .replace("$3", &format!("ARRAY[{}]::text[]", types.join(", ")))
            .replace("$2", &cursor.to_string())
            .replace("$1", &quote_literal(&self.snapshot));
        Ok(format!("COPY ({sql}) TO STDOUT (FORMAT binary)"))
    }

    /// Reads a batch like [`PassQuery::read`] through a binary `COPY`, the
    /// fastest way rows leave PostgreSQL; decode with
    /// [`EventBatch::decode_copy`]. Returns the data, its row count and the
    /// last position.
    ///
    /// # Errors
    /// Database errors; malformed `COPY` data.
    pub async fn read_copy(
        &self,
        client: &tokio_postgres::Client,
        cursor: i64,
        limit: i64,
    ) -> Result<(Vec<u8>, usize, Option<i64>)> {
        let stream = client.copy_out(&self.copy_sql(cursor, limit)?).await?;
        futures_util::pin_mut!(stream);
        let mut data = Vec::new();
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            data.extend_from_slice(&chunk?);
        }
        let mut last = None;
        let rows = walk_copy(&data, |fields| {
            last = Some(field::<i64>(fields, 0, &Type::INT8)?);
            Ok(())
        })?;
        Ok((data, rows, last))
    }

    /// Counts the events the pass still has to apply after `cursor`.
    ///
    /// # Errors
    /// Database errors.
    pub async fn count(&self, client: &impl GenericClient, cursor: i64) -> Result<i64> {
        let limit = 0_i64;
        let sql = format!("SELECT count(*) {}", self.filter());
        let row = client
            .query_typed(&sql, &self.params(&cursor, &limit))
            .await?;
        Ok(row.first().map(|r| r.try_get(0)).transpose()?.unwrap_or(0))
    }
}

const PENDING: &str = "SELECT count(*) FROM {events} e \
    WHERE e.xact_id >= (SELECT horizon FROM coord.projector_versions WHERE name = $1 AND version = $2) \
    AND e.event_type = ANY($3) AND NOT EXISTS (SELECT 1 FROM coord.applied_ahead a \
    WHERE a.name = $1 AND a.version = $2 AND a.position = e.position)";

/// The committed handled events `name@version` has not applied yet (its lag),
/// read through the `xact_id` index from the horizon up.
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
    let sql = PENDING.replace("{events}", &event_store.quoted());
    let row = client
        .query_one(&sql, &[&name, &version, &event_types])
        .await?;
    Ok(row.try_get(0)?)
}

const CLEAR_AHEAD: &str = "DELETE FROM coord.applied_ahead WHERE name = $1 AND version = $2";

const MARK_AHEAD: &str = "INSERT INTO coord.applied_ahead (name, version, position, xact_id) \
    SELECT $1, $2, e.position, e.xact_id FROM {events} e \
    WHERE e.xact_id >= pg_snapshot_xmin($3::text::pg_snapshot) \
    AND pg_visible_in_snapshot(e.xact_id, $3::text::pg_snapshot) AND e.event_type = ANY($4)";

const MARK_THROUGH: &str = "UPDATE coord.projector_versions SET \
    horizon = pg_snapshot_xmin($3::text::pg_snapshot), pass_snapshot = NULL, pass_cursor = NULL, \
    last_position = greatest(last_position, coalesce((SELECT e.position FROM {events} e \
      WHERE e.event_type = ANY($4) AND pg_visible_in_snapshot(e.xact_id, $3::text::pg_snapshot) \
      ORDER BY e.position DESC LIMIT 1), 0)), \
    updated_at = now() WHERE name = $1 AND version = $2";

/// Marks `name@version` as having applied every handled event visible in
/// `snapshot`: horizon = xmin(`snapshot`), `applied_ahead` = the visible
/// handled events at or above it, no pass in progress.
///
/// # Errors
/// [`Error::Failed`] when the version is not registered; database errors.
pub async fn mark_through_snapshot(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    event_types: &[String],
    event_store: &RelationName,
    snapshot: &str,
) -> Result<()> {
    let events = event_store.quoted();
    client.execute(CLEAR_AHEAD, &[&name, &version]).await?;
    client
        .execute(
            &MARK_AHEAD.replace("{events}", &events),
            &[&name, &version, &snapshot, &event_types],
        )
        .await?;
    let n = client
        .execute(
            &MARK_THROUGH.replace("{events}", &events),
            &[&name, &version, &snapshot, &event_types],
        )
        .await?;
    if n == 0 {
        return Err(Error::Failed(format!(
            "projector version {name}@{version} is not registered"
        )));
    }
    Ok(())
}

const RESET: &str = "UPDATE coord.projector_versions SET status = 'replaying', fingerprint = $3, \
    event_types = $4, mode = $5, horizon = '0', pass_snapshot = NULL, pass_cursor = NULL, \
    last_position = 0, events_processed = 0, events_skipped = 0, events_parked = 0, \
    events_total = NULL, rate_per_s = NULL, eta_s = NULL, last_error = NULL, \
    replay_started_at = now(), replay_finished_at = NULL, updated_at = now() \
    WHERE name = $1 AND version = $2";

/// Resets `name@version` to a fresh replay from horizon 0 (after an abort),
/// with a possibly new definition; its `applied_ahead` and parked rows go.
///
/// # Errors
/// Database errors.
pub async fn reset(
    client: &impl GenericClient,
    name: &str,
    version: &str,
    fingerprint: &str,
    event_types: &[String],
    mode: &str,
) -> Result<()> {
    client
        .execute(RESET, &[&name, &version, &fingerprint, &event_types, &mode])
        .await?;
    client.execute(CLEAR_AHEAD, &[&name, &version]).await?;
    crate::store::parked::delete_all(client, name, version).await?;
    Ok(())
}

const ABORT: &str =
    "UPDATE coord.projector_versions SET status = 'aborted', pass_snapshot = NULL, \
    pass_cursor = NULL, rate_per_s = NULL, eta_s = NULL, updated_at = now() \
    WHERE name = $1 AND version = $2";

/// Marks `name@version` aborted and clears its pass in progress.
///
/// # Errors
/// Database errors.
pub async fn mark_aborted(client: &impl GenericClient, name: &str, version: &str) -> Result<()> {
    client.execute(ABORT, &[&name, &version]).await?;
    Ok(())
}

const ADOPT: &str = "UPDATE coord.projector_versions AS t SET horizon = f.horizon, \
    pass_snapshot = f.pass_snapshot, pass_cursor = f.pass_cursor, last_position = f.last_position, \
    events_processed = f.events_processed, events_skipped = f.events_skipped, \
    events_parked = f.events_parked, events_total = f.events_total, rate_per_s = f.rate_per_s, \
    eta_s = f.eta_s, last_error = NULL, replay_started_at = f.replay_started_at, \
    replay_finished_at = f.replay_finished_at, updated_at = now() \
    FROM coord.projector_versions AS f \
    WHERE t.name = $1 AND t.version = $3 AND f.name = $1 AND f.version = $2";

/// Gives `name@to` the checkpoint, counters and parked events of
/// `name@from` (a rebuilt shadow of it), replacing its own.
///
/// # Errors
/// [`Error::Failed`] when either version is not registered; database errors.
pub async fn adopt(client: &impl GenericClient, name: &str, from: &str, to: &str) -> Result<()> {
    let n = client.execute(ADOPT, &[&name, &from, &to]).await?;
    if n == 0 {
        return Err(Error::Failed(format!(
            "cannot move the checkpoint of {name}@{from} to {name}@{to}: not registered"
        )));
    }
    for table in ["coord.applied_ahead", "coord.parked_events"] {
        client
            .execute(
                &format!("DELETE FROM {table} WHERE name = $1 AND version = $2"),
                &[&name, &to],
            )
            .await?;
        client
            .execute(
                &format!("UPDATE {table} SET version = $3 WHERE name = $1 AND version = $2"),
                &[&name, &from, &to],
            )
            .await?;
    }
    Ok(())
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
