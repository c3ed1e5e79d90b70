//! Checks that the configured event store (`event_store.relation`) exists
//! and has the event columns with the right types, before a command writes
//! anything: a view that lacks a column would otherwise fail only after a
//! version was registered. Reads the catalog only.

use tokio_postgres::GenericClient;

use crate::names::RelationName;
use crate::{Error, Result};

/// The columns an event store must have, with their types as PostgreSQL's
/// `format_type` names them (DESIGN.md, "Database contract").
pub const EVENT_COLUMNS: [(&str, &str); 8] = [
    ("position", "bigint"),
    ("xact_id", "xid8"),
    ("stream_id", "text"),
    ("stream_version", "bigint"),
    ("event_type", "text"),
    ("data", "jsonb"),
    ("metadata", "jsonb"),
    ("recorded_at", "timestamp with time zone"),
];

const FIND_RELATION: &str =
    "SELECT c.oid, c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)";
const COLUMNS: &str = "SELECT attname::text, format_type(atttypid, NULL) FROM pg_attribute \
    WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped";

/// Fails unless `relation` is a table, view, materialized view or foreign
/// table that has every column of [`EVENT_COLUMNS`] with its type (other
/// columns are allowed).
///
/// # Errors
/// [`Error::InvalidInput`] (exit code 2) naming `event_store.relation`, the
/// relation and what is missing or mistyped; database errors.
pub async fn check_event_store(client: &impl GenericClient, relation: &RelationName) -> Result<()> {
    let invalid = |problem: String| {
        Error::InvalidInput(format!(
            "field `event_store.relation`: {relation} {problem}; the event store must be a table or \
             view with the columns {}",
            EVENT_COLUMNS
                .iter()
                .map(|(name, ty)| format!("{name} {ty}"))
                .collect::<Vec<_>>()
                .join(", ")
        ))
    };
    let Some(row) = client
        .query_opt(FIND_RELATION, &[&relation.quoted()])
        .await?
    else {
        return Err(invalid("does not exist in this database".into()));
    };
    let oid: u32 = row.try_get(0)?;
    let kind: String = row.try_get(1)?;
    if !matches!(kind.as_str(), "r" | "p" | "v" | "m" | "f") {
        return Err(invalid("is not a table or view".into()));
    }
    let found: Vec<(String, String)> = client
        .query(COLUMNS, &[&oid])
        .await?
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
        .collect::<Result<_>>()?;
    let mut problems = Vec::new();
    for (name, ty) in EVENT_COLUMNS {
        match found.iter().find(|(n, _)| n == name) {
            None => problems.push(format!("lacks column {name} ({ty})")),
            Some((_, actual)) if actual != ty => {
                problems.push(format!("has column {name} of type {actual}, not {ty}"));
            }
            Some(_) => {}
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(invalid(problems.join(", ")))
    }
}

/// Rows changed since the last `ANALYZE` of the event store above which a
/// pass refreshes its statistics: at least this many, and at least 1% of
/// the table. Autovacuum waits for 10% and may be too busy to honour even
/// that; a pass over the events published during the previous one is
/// planned on the statistics of its newest transaction ids.
const STALE_ROWS: i64 = 10_000;

const STALE: &str = "SELECT s.n_mod_since_analyze \
    FROM pg_class c JOIN pg_stat_all_tables s ON s.relid = c.oid \
    WHERE c.oid = to_regclass($1) AND c.relkind IN ('r', 'p') \
    AND pg_has_role(c.relowner, 'USAGE') \
    AND s.n_mod_since_analyze >= greatest($2::bigint, 0.01 * greatest(c.reltuples, 0))";

/// Runs `ANALYZE` on the event store when its planner statistics are stale:
/// many more events than the statistics know of make the planner read a
/// large delta through the `xact_id` index and sort it again for every
/// batch (a pass that cannot keep up with publishers). Only for a table
/// that the current role owns; a view, or a table of another owner, is left
/// alone, and so is a table whose `ANALYZE` would wait for a lock (a vacuum
/// or another pass analyzing it). Returns whether it analyzed. Run it
/// outside a transaction.
///
/// # Errors
/// Database errors other than the lock timeout.
pub async fn refresh_statistics(
    client: &tokio_postgres::Client,
    relation: &RelationName,
) -> Result<bool> {
    let name = relation.quoted();
    let stale = client
        .query_typed_opt(
            STALE,
            &[
                (&name, tokio_postgres::types::Type::TEXT),
                (&STALE_ROWS, tokio_postgres::types::Type::INT8),
            ],
        )
        .await?;
    let Some(row) = stale else {
        return Ok(false);
    };
    let changed: i64 = row.try_get(0)?;
    let analyze = format!(
        "BEGIN; SET LOCAL lock_timeout = '{}ms'; ANALYZE {name}; COMMIT",
        ANALYZE_WAIT.as_millis()
    );
    match client.batch_execute(&analyze).await {
        Ok(()) => {
            tracing::info!(
                relation = %relation,
                changed,
                "analyzed the event store: its statistics were stale"
            );
            Ok(true)
        }
        Err(e) => {
            client.batch_execute("ROLLBACK").await?;
            if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) {
                tracing::debug!(relation = %relation, "event store busy; not analyzed");
                Ok(false)
            } else {
                Err(e.into())
            }
        }
    }
}

/// How long [`refresh_statistics`] waits for the lock of `ANALYZE`.
const ANALYZE_WAIT: std::time::Duration = std::time::Duration::from_millis(200);
