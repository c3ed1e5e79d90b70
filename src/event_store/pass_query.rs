//! [`PassQuery`]: which events a pass reads and how (a batch query, a
//! binary `COPY`, a count). Builds SQL over the event relation; never
//! writes.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{GenericClient, Row};

use crate::event_store::copy::{cut_copy, EventBatch};
use crate::names::{quote_literal, RelationName};
use crate::{Error, Result};

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
    /// Whether to exclude `applied_ahead` rows (see [`has_ahead_after`](crate::store::checkpoint::has_ahead_after)).
    pub exclude_ahead: bool,
    /// A batch read ends before the event that would take the batch's size
    /// past this many bytes; it always holds at least one event. The size
    /// is, for [`PassQuery::read`], `stream_id`, `event_type`, `data` and
    /// `metadata` as stored plus 64 bytes per event; for
    /// [`PassQuery::read_copy`], the events' binary `COPY` tuples (decision
    /// 0071). `i64::MAX`: no byte budget.
    pub max_bytes: i64,
    /// Whether [`PassQuery::read_copy`] returns the events' `data` and
    /// `metadata`; false (for projectors that do not read them, see
    /// [`Projector::replay_reads_payload`](crate::Projector::replay_reads_payload))
    /// returns nulls instead, so the server does not render them.
    /// [`PassQuery::read`] always returns them.
    pub payload: bool,
    /// With `payload`, whether [`PassQuery::read_copy`] returns the events'
    /// `metadata` too (false: null, see
    /// [`Projector::replay_reads_metadata`](crate::Projector::replay_reads_metadata)).
    pub metadata: bool,
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

    /// The batch read of [`PassQuery::read_copy`], a binary `COPY` of at
    /// most `limit` events after `cursor`, values inlined as quoted literals
    /// (`COPY` takes no parameters). Unlike [`PassQuery::read_sql`] it does
    /// not apply the byte budget: the window that sums the sizes cost the
    /// server more than the scan (decision 0071); [`PassQuery::read_copy`]
    /// applies it to the data as it arrives.
    ///
    /// # Errors
    /// [`Error::Failed`] when the snapshot or horizon is not what PostgreSQL
    /// produces for them.
    pub fn copy_sql(&self, cursor: i64, limit: i64) -> Result<String> {
        let payload = match (self.payload, self.metadata) {
            (true, true) => "e.data, e.metadata",
            (true, false) => "e.data, NULL::jsonb",
            (false, _) => "NULL::jsonb, NULL::jsonb",
        };
        let sql = self.inline(
            &format!(
                "SELECT e.position, e.stream_id, e.stream_version, e.event_type, {payload}, \
                 e.recorded_at, CASE WHEN e.xact_id >= pg_snapshot_xmin($1::text::pg_snapshot) \
                 THEN e.xact_id::text END AS xact {} ORDER BY e.position LIMIT $4",
                self.filter()
            ),
            cursor,
            limit,
        )?;
        Ok(format!("COPY ({sql}) TO STDOUT (FORMAT binary)"))
    }

    /// `sql` (over the parameters of [`PassQuery::read`]) with the values
    /// inlined as literals, checked first.
    fn inline(&self, sql: &str, cursor: i64, limit: i64) -> Result<String> {
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
        Ok(sql
            .replace("$7", &quote_literal(&self.version))
            .replace("$6", &quote_literal(&self.name))
            .replace("$5", &quote_literal(&self.horizon))
            .replace("$4", &limit.to_string())
            .replace("$3", &format!("ARRAY[{}]::text[]", types.join(", ")))
            .replace("$2", &cursor.to_string())
            .replace("$1", &quote_literal(&self.snapshot)))
    }

    /// Reads a batch like [`PassQuery::read`] through a binary `COPY`, the
    /// fastest way rows leave PostgreSQL; decode with
    /// [`EventBatch::decode_copy`]. The byte budget is applied as the data
    /// arrives: once it is passed, the rest of the `COPY` is read and
    /// dropped, so memory holds the budget and one event more. Returns the
    /// data, its row count and the last position.
    ///
    /// # Errors
    /// Database errors; malformed `COPY` data.
    pub async fn read_copy(
        &self,
        client: &tokio_postgres::Client,
        cursor: i64,
        limit: i64,
    ) -> Result<(Vec<u8>, usize, Option<i64>)> {
        let mut data = Vec::new();
        let (rows, last) = self
            .read_copy_into(client, cursor, limit, &mut data)
            .await?;
        Ok((data, rows, last))
    }

    /// Like [`PassQuery::read_copy`], into `data` (cleared first): a reader
    /// that gives each batch a buffer it used before allocates its buffers
    /// once per pass, not once per batch. Returns the row count and the
    /// last position.
    ///
    /// # Errors
    /// Database errors; malformed `COPY` data.
    pub async fn read_copy_into(
        &self,
        client: &tokio_postgres::Client,
        cursor: i64,
        limit: i64,
        data: &mut Vec<u8>,
    ) -> Result<(usize, Option<i64>)> {
        data.clear();
        let max_bytes = usize::try_from(self.max_bytes.max(1)).unwrap_or(usize::MAX);
        let stream = client.copy_out(&self.copy_sql(cursor, limit)?).await?;
        futures_util::pin_mut!(stream);
        let mut kept = None;
        let mut dropped = 0_usize;
        while let Some(chunk) = futures_util::StreamExt::next(&mut stream).await {
            let chunk = chunk?;
            if kept.is_some() {
                dropped += chunk.len();
                continue;
            }
            data.extend_from_slice(&chunk);
            // 64: more than the header.
            if data.len() > max_bytes.saturating_add(64) {
                kept = cut_copy(data, max_bytes, false)?;
            }
        }
        match kept {
            Some(kept) => {
                tracing::debug!(dropped, "batch read cut by its byte budget");
                Ok(kept)
            }
            None => cut_copy(data, max_bytes, true)?
                .ok_or_else(|| Error::Failed("truncated COPY data".into())),
        }
    }

    /// The events the pass still has to apply after `cursor`, for progress:
    /// counted when the planner expects at most `exact_max` of them,
    /// otherwise the planner's estimate (from the statistics of position,
    /// event type and `xact_id`; it leaves out the snapshot and
    /// `applied_ahead`, which exclude few events). Counting a large store
    /// took a parallel scan of all of it at the start of every replay,
    /// about a CPU-second per million events taken from the replay itself
    /// (decision 0075).
    ///
    /// # Errors
    /// Database errors.
    pub async fn count_or_estimate(
        &self,
        client: &impl GenericClient,
        cursor: i64,
        exact_max: i64,
    ) -> Result<i64> {
        let mut sql = format!(
            "EXPLAIN (FORMAT JSON) SELECT 1 FROM {} e WHERE e.position > $2 \
             AND e.event_type = ANY($3)",
            self.event_store.quoted()
        );
        if self.horizon != "0" {
            sql.push_str(" AND e.xact_id >= $5::text::xid8");
        }
        let sql = self.inline(&sql, cursor, 0)?;
        let row = client.query_one(&sql, &[]).await?;
        let plan: serde_json::Value = row.try_get(0)?;
        let estimate = plan[0]["Plan"]["Plan Rows"].as_f64();
        match estimate {
            Some(rows) if rows > exact_max as f64 => Ok(rows as i64),
            _ => self.count(client, cursor).await,
        }
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
