//! A projector version's checkpoint (docs/decisions/0002-checkpoint-horizon.md):
//! the `horizon`, the `pass_snapshot` / `pass_cursor` of a pass in progress,
//! the `coord.applied_ahead` rows and the progress counters: the writes of
//! a pass. Transaction ids and snapshots travel as text (`xid8` and
//! `pg_snapshot` have no Rust type) and are cast back in SQL. This module
//! never applies events, and never reads the event store: which events a
//! pass reads, and a version's lag, are `crate::event_store`'s (re-exported
//! here under their former paths).

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::GenericClient;

use crate::names::RelationName;
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
        .query_typed_opt(LOCK, &[(&name, Type::TEXT), (&version, Type::TEXT)])
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
        .query_typed_opt("SELECT pg_current_snapshot()::text", &[])
        .await?
        .ok_or_else(|| Error::Failed("pg_current_snapshot() returned no row".into()))?;
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
    // Unprepared and typed: one round trip each, pipelined.
    let update_params: [(&(dyn ToSql + Sync), Type); 10] = [
        (&name, Type::TEXT),
        (&version, Type::TEXT),
        (&b.cursor, Type::INT8),
        (&b.last_position, Type::INT8),
        (&b.applied, Type::INT8),
        (&b.parked, Type::INT8),
        (&b.events_total, Type::INT8),
        (&b.rate_per_s, Type::FLOAT8),
        (&b.eta_s, Type::FLOAT8),
        (&b.last_error, Type::TEXT),
    ];
    let update = client.query_typed(RECORD_BATCH, &update_params);
    if b.ahead_positions.is_empty() {
        update.await?;
    } else {
        let insert_params: [(&(dyn ToSql + Sync), Type); 4] = [
            (&name, Type::TEXT),
            (&version, Type::TEXT),
            (&b.ahead_positions, Type::INT8_ARRAY),
            (&b.ahead_xacts, Type::TEXT_ARRAY),
        ];
        let insert = client.query_typed(INSERT_AHEAD, &insert_params);
        futures_util::future::try_join(update, insert).await?;
    }
    Ok(())
}

const FINISH_PASS: &str = "UPDATE coord.projector_versions SET \
    horizon = greatest(horizon, pg_snapshot_xmin($3::text::pg_snapshot)), \
    pass_snapshot = NULL, pass_cursor = NULL, eta_s = 0, replay_finished_at = now(), updated_at = now() \
    WHERE name = $1 AND version = $2 RETURNING horizon::text";

/// Deletes the rows below the horizon (as [`FINISH_PASS`] just set it) and
/// adds those that publishers wrote (inline applications) to
/// `events_inline`, so the count survives.
const PRUNE_AHEAD: &str = "WITH pruned AS (DELETE FROM coord.applied_ahead \
    WHERE name = $1 AND version = $2 AND xact_id < (SELECT horizon FROM coord.projector_versions \
    WHERE name = $1 AND version = $2) RETURNING inline) \
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
    // Pipelined: the prune reads the horizon the update just wrote.
    let (rows, _) = futures_util::future::try_join(
        client.query_typed(
            FINISH_PASS,
            &[
                (&name, Type::TEXT),
                (&version, Type::TEXT),
                (&snapshot, Type::TEXT),
            ],
        ),
        client.query_typed(PRUNE_AHEAD, &[(&name, Type::TEXT), (&version, Type::TEXT)]),
    )
    .await?;
    let row = rows.first().ok_or_else(|| {
        Error::Failed(format!(
            "projector version {name}@{version} is not registered"
        ))
    })?;
    Ok(row.try_get(0)?)
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
        .query_typed_opt(
            AHEAD_AFTER,
            &[
                (&name, Type::TEXT),
                (&version, Type::TEXT),
                (&cursor, Type::INT8),
            ],
        )
        .await?;
    Ok(row.map(|r| r.try_get(0)).transpose()?.unwrap_or(false))
}

const CLEAR_AHEAD: &str = "DELETE FROM coord.applied_ahead WHERE name = $1 AND version = $2";

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
    client.execute(CLEAR_AHEAD, &[&name, &version]).await?;
    let n =
        crate::event_store::mark_visible(client, name, version, event_types, event_store, snapshot)
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
