//! Set-based config handlers (`[projector.batch_handlers]`,
//! docs/decisions/0015-set-based-batch-handlers.md): each statement runs
//! once per batch over the relation `batch_events`, which holds the batch's
//! events of its type. The relation is a CTE put in front of the user's
//! statement (merged into its own `WITH` when it has one), so a batch costs
//! one statement per event type and leaves nothing behind in the session.
//! In a replay the CTE reads the batch's events back from the event store
//! by position (they are committed; nothing is sent but positions); inline,
//! where they may live only in the publisher's transaction, it is an
//! `unnest` of seven array parameters. Never commits.

use futures_util::future::try_join_all;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::config::BatchHandler;
use crate::names::RelationName;
use crate::projector::{Event, Phase};

/// The name under which a batch statement reads its events.
pub const BATCH_RELATION: &str = "batch_events";

const RELATION: &str = "batch_events AS (SELECT * FROM unnest($1::text[], $2::bigint[], \
    $3::bigint[], $4::text[], $5::jsonb[], $6::jsonb[], $7::timestamptz[]) \
    AS e(stream_id, stream_version, position, event_type, data, metadata, recorded_at))";

const BY_POSITION: &str = "batch_events AS (SELECT e.stream_id, e.stream_version, e.position, \
    e.event_type, e.data, e.metadata, e.recorded_at FROM {events} e \
    WHERE e.position BETWEEN $2::bigint AND $3::bigint AND e.position = ANY($1::bigint[]))";

const PARAM_TYPES: [Type; 7] = [
    Type::TEXT_ARRAY,
    Type::INT8_ARRAY,
    Type::INT8_ARRAY,
    Type::TEXT_ARRAY,
    Type::JSONB_ARRAY,
    Type::JSONB_ARRAY,
    Type::TIMESTAMPTZ_ARRAY,
];

/// A batch handler ready to run: its event type and its statement with the
/// `batch_events` CTE in front.
#[derive(Clone, Debug)]
pub(crate) struct PreparedBatchHandler {
    event_type: String,
    /// Over the events as array parameters (inline).
    sql: String,
    /// Over the events read back from the event store by position (replay).
    sql_by_position: String,
}

impl PreparedBatchHandler {
    pub(crate) fn new(handler: &BatchHandler, event_store: &RelationName) -> Self {
        let by_position = BY_POSITION.replace("{events}", &event_store.quoted());
        Self {
            event_type: handler.event_type.clone(),
            sql: with_relation(RELATION, &handler.sql),
            sql_by_position: with_relation(&by_position, &handler.sql),
        }
    }
}

/// `sql` with the CTE `relation` in front; a statement that starts with
/// its own `WITH [RECURSIVE]` gets the CTE as its first entry.
pub(crate) fn with_relation(relation: &str, sql: &str) -> String {
    let rest = skip_space_and_comments(sql);
    if let Some(after_with) = keyword(rest, "with") {
        let after = skip_space_and_comments(after_with);
        if let Some(after_recursive) = keyword(after, "recursive") {
            let after_recursive = skip_space_and_comments(after_recursive);
            return format!("WITH RECURSIVE {relation}, {after_recursive}");
        }
        return format!("WITH {relation}, {after}");
    }
    format!("WITH {relation} {rest}")
}

fn skip_space_and_comments(mut sql: &str) -> &str {
    loop {
        let trimmed = sql.trim_start();
        if let Some(line) = trimmed.strip_prefix("--") {
            sql = line.find('\n').map_or("", |i| &line[i + 1..]);
        } else if let Some(block) = trimmed.strip_prefix("/*") {
            // Comments nest in PostgreSQL.
            let mut depth = 1;
            let mut i = 0;
            let bytes = block.as_bytes();
            while depth > 0 && i < bytes.len() {
                if bytes[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if bytes[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                } else {
                    i += 1;
                }
            }
            sql = &block[i.min(block.len())..];
        } else {
            return trimmed;
        }
    }
}

/// The text after `word` when `sql` starts with it as a whole word.
fn keyword<'a>(sql: &'a str, word: &str) -> Option<&'a str> {
    let head = sql.get(..word.len())?;
    let next = sql[word.len()..].chars().next();
    let boundary = !matches!(next, Some(c) if c.is_alphanumeric() || c == '_' || c == '$');
    (head.eq_ignore_ascii_case(word) && boundary).then(|| &sql[word.len()..])
}

/// Runs `handlers`, in order, each over the events of `events` of its type
/// (skipping handlers with none). The statements are pipelined; the server
/// runs them in order.
pub(crate) async fn run(
    tx: &Transaction<'_>,
    handlers: &[PreparedBatchHandler],
    events: &[&Event],
    phase: Phase,
) -> Result<(), tokio_postgres::Error> {
    let calls = handlers.iter().filter_map(|handler| {
        let of_type: Vec<&Event> = events
            .iter()
            .copied()
            .filter(|e| e.event_type == handler.event_type)
            .collect();
        if of_type.is_empty() {
            return None;
        }
        Some(async move {
            match phase {
                Phase::Inline => {
                    let columns = Columns::new(&of_type);
                    tx.execute_typed(&handler.sql, &columns.params()).await
                }
                Phase::Replay | Phase::Rebuild => {
                    let positions: Vec<i64> = of_type.iter().map(|e| e.position).collect();
                    let (first, last) = (positions[0], positions[positions.len() - 1]);
                    let params: [(&(dyn ToSql + Sync), Type); 3] = [
                        (&positions, Type::INT8_ARRAY),
                        (&first, Type::INT8),
                        (&last, Type::INT8),
                    ];
                    tx.execute_typed(&handler.sql_by_position, &params).await
                }
            }
        })
    });
    try_join_all(calls).await?;
    Ok(())
}

/// The seven arrays `batch_events` is made of.
struct Columns<'a> {
    stream_id: Vec<&'a str>,
    stream_version: Vec<i64>,
    position: Vec<i64>,
    event_type: Vec<&'a str>,
    data: Vec<&'a serde_json::Value>,
    metadata: Vec<&'a serde_json::Value>,
    recorded_at: Vec<std::time::SystemTime>,
}

impl<'a> Columns<'a> {
    fn new(events: &[&'a Event]) -> Self {
        Self {
            stream_id: events.iter().map(|e| e.stream_id.as_str()).collect(),
            stream_version: events.iter().map(|e| e.stream_version).collect(),
            position: events.iter().map(|e| e.position).collect(),
            event_type: events.iter().map(|e| e.event_type.as_str()).collect(),
            data: events.iter().map(|e| &e.data).collect(),
            metadata: events.iter().map(|e| &e.metadata).collect(),
            recorded_at: events.iter().map(|e| e.recorded_at).collect(),
        }
    }

    fn params(&self) -> [(&(dyn ToSql + Sync), Type); 7] {
        let values: [&(dyn ToSql + Sync); 7] = [
            &self.stream_id,
            &self.stream_version,
            &self.position,
            &self.event_type,
            &self.data,
            &self.metadata,
            &self.recorded_at,
        ];
        let mut i = 0;
        values.map(|v| {
            let typed = (v, PARAM_TYPES[i].clone());
            i += 1;
            typed
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relation_goes_in_front_or_into_the_statements_own_with() {
        let plain = with_relation(
            RELATION,
            "  INSERT INTO t SELECT stream_id FROM batch_events",
        );
        assert!(plain.starts_with("WITH batch_events AS (SELECT * FROM unnest("));
        assert!(plain.ends_with(") INSERT INTO t SELECT stream_id FROM batch_events"));

        let with = with_relation(
            RELATION,
            "-- fold\n/* a /* nested */ comment */ with s AS (SELECT 1) SELECT * FROM s",
        );
        assert!(with.starts_with("WITH batch_events AS ("), "{with}");
        assert!(
            with.ends_with(", s AS (SELECT 1) SELECT * FROM s"),
            "{with}"
        );

        let recursive = with_relation(
            RELATION,
            "WITH Recursive r(n) AS (SELECT 1) SELECT * FROM r",
        );
        assert!(
            recursive.starts_with("WITH RECURSIVE batch_events AS ("),
            "{recursive}"
        );
        assert!(
            recursive.ends_with(", r(n) AS (SELECT 1) SELECT * FROM r"),
            "{recursive}"
        );

        // A name that merely starts with "with" is not the keyword.
        let table = with_relation(RELATION, "withdrawals_insert");
        assert!(table.ends_with(") withdrawals_insert"), "{table}");
    }
}
