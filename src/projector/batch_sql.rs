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
//!
//! A `[projector.batch_checks]` query runs the same way, before the
//! handlers, in a statement that raises `CO007` naming the events it
//! returns ([`PreparedChecks`], [`handler_error`]).

use futures_util::future::{try_join_all, BoxFuture, FutureExt};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::Transaction;

use crate::config::BatchHandler;
use crate::names::RelationName;
use crate::projector::{ApplyContext, Event, EventError, EventErrors, HandlerError, Phase};

/// The name under which a batch statement reads its events.
pub const BATCH_RELATION: &str = "batch_events";

/// `batch_events` over the events as seven array parameters, the first
/// being `$offset + 1` (inline).
fn relation(offset: usize) -> String {
    let p = |i: usize| offset + i;
    format!(
        "batch_events AS (SELECT * FROM unnest(${}::text[], ${}::bigint[], ${}::bigint[], \
         ${}::text[], ${}::jsonb[], ${}::jsonb[], ${}::timestamptz[]) \
         AS e(stream_id, stream_version, position, event_type, data, metadata, recorded_at))",
        p(1),
        p(2),
        p(3),
        p(4),
        p(5),
        p(6),
        p(7)
    )
}

/// `batch_events` read back from `events` by position: positions, first
/// and last as parameters from `$offset + 1` (replay). The store's range
/// (`BETWEEN` first and last, in a subquery fenced by `OFFSET 0`) semi-joined
/// with the `unnest` of the positions. Not `position = ANY(...)`: the
/// planner estimates an `ANY` of a batch's 25,000 positions element by
/// element (7-12 ms of planning per statement) and then chose a parallel
/// scan of the whole store (decision 0089). Not a plain join of the
/// `unnest` with the store: its estimate was a row per distinct
/// `position` of the whole store, so it fell as the store grew (1,696 of
/// 33,333 rows at 1M, 172 at 10M) and the plans turned to sorts that
/// spilled to disk. The semi-join's estimate is half the range, or the
/// positions when they are fewer than 200, at any store size (decision
/// 0094).
fn by_position(events: &str, offset: usize) -> String {
    format!(
        "batch_events AS (SELECT e.stream_id, e.stream_version, e.position, \
         e.event_type, e.data, e.metadata, e.recorded_at \
         FROM (SELECT * FROM {events} r \
         WHERE r.position BETWEEN ${}::bigint AND ${}::bigint OFFSET 0) e \
         WHERE e.position IN (SELECT unnest(${}::bigint[])))",
        offset + 2,
        offset + 3,
        offset + 1
    )
}

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
        Self {
            event_type: handler.event_type.clone(),
            sql: with_relation(&relation(0), &handler.sql),
            sql_by_position: with_relation(&by_position(&event_store.quoted(), 0), &handler.sql),
        }
    }
}

/// A projector's `[projector.batch_checks]`, ready to run: [`run`] puts the
/// checks of a call into one statement ([`checks_statement`]) that passes
/// the rows `(position, message)` they return to `coord.event_errors`
/// (migration V9), which raises `CO007` naming them when there are any
/// (docs/decisions/0089-set-based-checks-name-failing-events.md).
#[derive(Clone, Debug, Default)]
pub(crate) struct PreparedChecks {
    /// Event type and query (without a trailing `;`), by event type.
    checks: Vec<(String, String)>,
    /// The quoted event store a replay reads batches back from.
    store: String,
    /// Whether every check judges each event on its own
    /// ([`crate::sql_check::judges_each_event_alone`]).
    each_alone: bool,
}

impl PreparedChecks {
    pub(crate) fn new(checks: &[BatchHandler], event_store: &RelationName) -> Self {
        Self {
            checks: checks
                .iter()
                .map(|c| {
                    let query = crate::sql_check::without_trailing_semicolon(&c.sql);
                    (c.event_type.clone(), query.to_owned())
                })
                .collect(),
            store: event_store.quoted(),
            each_alone: checks
                .iter()
                .all(|c| crate::sql_check::judges_each_event_alone(&c.sql)),
        }
    }

    /// The checks a call with `ctx` runs: none when `ctx` has the rest of
    /// a batch whose failing events an earlier call named and every check
    /// judges each event on its own (the rest passed them then), all
    /// otherwise.
    pub(crate) fn for_call(&self, ctx: &ApplyContext) -> Option<&Self> {
        (!(ctx.named_failures_removed && self.each_alone)).then_some(self)
    }

    /// Each check as a statement of its own over `$1..$7` as arrays, in the
    /// form of [`PreparedBatchHandler::stored`]: `coord.publish` runs them
    /// before the handlers, the first that raises refusing the publish.
    pub(crate) fn stored(&self) -> impl Iterator<Item = serde_json::Value> + '_ {
        self.checks.iter().map(|(event_type, query)| {
            let sql = checks_statement(&[with_relation(&relation(0), query)]);
            serde_json::json!({ "event_type": event_type, "sql": sql })
        })
    }
}

/// One statement raising `CO007` for the rows of every query of `checks`
/// (each a whole query, `batch_events` included).
fn checks_statement(checks: &[String]) -> String {
    // The newline ends a trailing `--` comment of a query.
    let rows: Vec<String> = checks
        .iter()
        .map(|query| {
            format!(
                "SELECT c.position::bigint AS position, c.message::text AS message \
                 FROM ({query}\n) AS c(position, message)"
            )
        })
        .collect();
    format!(
        "SELECT coord.event_errors(array_agg(f.position ORDER BY f.position), \
         array_agg(f.message ORDER BY f.position)) FROM ({}) AS f HAVING count(*) > 0",
        rows.join(" UNION ALL ")
    )
}

/// SQLSTATE of `coord.event_errors`.
const EVENT_ERRORS: &str = "CO007";

/// `e` as a handler error: [`EventErrors`] naming the events when a check
/// raised it through `coord.event_errors`, otherwise `e` itself.
pub(crate) fn handler_error(e: tokio_postgres::Error) -> HandlerError {
    #[derive(serde::Deserialize)]
    struct Named {
        positions: Vec<i64>,
        messages: Vec<Option<String>>,
    }
    let named = e
        .as_db_error()
        .filter(|db| db.code().code() == EVENT_ERRORS)
        .and_then(|db| db.detail())
        .and_then(|detail| serde_json::from_str::<Named>(detail).ok());
    match named {
        Some(named) => Box::new(EventErrors::new(
            named
                .positions
                .into_iter()
                .zip(named.messages)
                .map(|(position, message)| {
                    EventError::new(
                        position,
                        message.unwrap_or_else(|| "rejected by its batch check".into()),
                    )
                })
                .collect(),
        )),
        None => Box::new(e),
    }
}

impl PreparedBatchHandler {
    /// `{"event_type": ..., "sql": ...}` with the inline statement, as the
    /// version's stored definition holds it for `coord.publish`.
    pub(crate) fn stored(&self) -> serde_json::Value {
        serde_json::json!({ "event_type": self.event_type, "sql": self.sql })
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

/// Runs the `checks` of the types in `events`, all in one statement, so
/// that one failing call names the failing events of every checked type;
/// then `handlers`, in order, each over the events of `events` of its type
/// (skipping handlers with none). The statements are pipelined; the server
/// runs them in order.
pub(crate) async fn run(
    tx: &Transaction<'_>,
    checks: Option<&PreparedChecks>,
    handlers: &[PreparedBatchHandler],
    events: &[&Event],
    phase: Phase,
) -> Result<(), tokio_postgres::Error> {
    let of_type = |event_type: &str| -> Vec<&Event> {
        events
            .iter()
            .copied()
            .filter(|e| e.event_type == event_type)
            .collect()
    };
    let checked: Vec<(&str, Vec<&Event>)> = checks
        .iter()
        .flat_map(|c| &c.checks)
        .map(|(event_type, query)| (query.as_str(), of_type(event_type)))
        .filter(|(_, events)| !events.is_empty())
        .collect();
    // Owned by this frame while the calls run (declared before them).
    let columns: Vec<Columns> = match phase {
        Phase::Inline => checked.iter().map(|(_, e)| Columns::new(e)).collect(),
        Phase::Replay | Phase::Rebuild => Vec::new(),
    };
    let ranges: Vec<Positions> = match phase {
        Phase::Inline => Vec::new(),
        Phase::Replay | Phase::Rebuild => checked.iter().map(|(_, e)| Positions::new(e)).collect(),
    };
    let mut calls: Vec<BoxFuture<'_, Result<u64, tokio_postgres::Error>>> = Vec::new();
    let store = checks.map(|c| c.store.as_str()).unwrap_or_default();
    if !checked.is_empty() {
        let (queries, params): (Vec<String>, Vec<Vec<Param<'_>>>) = match phase {
            Phase::Inline => checked
                .iter()
                .zip(&columns)
                .enumerate()
                .map(|(i, ((query, _), c))| {
                    (with_relation(&relation(7 * i), query), c.params().to_vec())
                })
                .unzip(),
            Phase::Replay | Phase::Rebuild => checked
                .iter()
                .zip(&ranges)
                .enumerate()
                .map(|(i, ((query, _), r))| {
                    (
                        with_relation(&by_position(store, 3 * i), query),
                        r.params().to_vec(),
                    )
                })
                .unzip(),
        };
        let sql = checks_statement(&queries);
        let params: Vec<Param<'_>> = params.into_iter().flatten().collect();
        calls.push(async move { tx.execute_typed(&sql, &params).await }.boxed());
    }
    for handler in handlers {
        let of_type = of_type(&handler.event_type);
        if of_type.is_empty() {
            continue;
        }
        calls.push(
            async move {
                match phase {
                    Phase::Inline => {
                        let columns = Columns::new(&of_type);
                        tx.execute_typed(&handler.sql, &columns.params()).await
                    }
                    Phase::Replay | Phase::Rebuild => {
                        let positions = Positions::new(&of_type);
                        tx.execute_typed(&handler.sql_by_position, &positions.params())
                            .await
                    }
                }
            }
            .boxed(),
        );
    }
    try_join_all(calls).await?;
    Ok(())
}

/// A typed parameter of a statement.
type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// The three parameters `batch_events` is read back by.
struct Positions {
    positions: Vec<i64>,
    first: i64,
    last: i64,
}

impl Positions {
    fn new(events: &[&Event]) -> Self {
        let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
        let (first, last) = (positions[0], positions[positions.len() - 1]);
        Self {
            positions,
            first,
            last,
        }
    }

    fn params(&self) -> [Param<'_>; 3] {
        [
            (&self.positions, Type::INT8_ARRAY),
            (&self.first, Type::INT8),
            (&self.last, Type::INT8),
        ]
    }
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

    fn params(&self) -> [Param<'_>; 7] {
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
            &relation(0),
            "  INSERT INTO t SELECT stream_id FROM batch_events",
        );
        assert!(plain.starts_with("WITH batch_events AS (SELECT * FROM unnest("));
        assert!(plain.ends_with(") INSERT INTO t SELECT stream_id FROM batch_events"));

        let with = with_relation(
            &relation(0),
            "-- fold\n/* a /* nested */ comment */ with s AS (SELECT 1) SELECT * FROM s",
        );
        assert!(with.starts_with("WITH batch_events AS ("), "{with}");
        assert!(
            with.ends_with(", s AS (SELECT 1) SELECT * FROM s"),
            "{with}"
        );

        let recursive = with_relation(
            &relation(0),
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
        let table = with_relation(&relation(0), "withdrawals_insert");
        assert!(table.ends_with(") withdrawals_insert"), "{table}");
    }

    /// The planner's estimate of a replay batch's `batch_events` follows
    /// the batch, not the store (decision 0094): on a store of 200,000
    /// events, 1,000 positions out of a range of 1,500 were estimated at
    /// 7 rows (1,000 x 1,500 / 200,000) when the relation joined the store
    /// directly. Needs `DATABASE_URL` (a database is created and dropped).
    #[tokio::test]
    async fn the_estimate_of_a_replay_batch_follows_the_batch_not_the_store() {
        use crate::config::DatabaseUrl;
        let server = std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let deadline = std::time::Duration::from_secs(30);
        let admin = crate::db::connect(&DatabaseUrl::parse(&server).unwrap(), deadline)
            .await
            .unwrap();
        let name = format!("coord_unit_batch_estimate_{}", std::process::id());
        for statement in [
            format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            format!("CREATE DATABASE {name}"),
        ] {
            admin.batch_execute(&statement).await.unwrap();
        }
        let url = match server.rfind('/') {
            Some(slash) if !server[..slash].ends_with('/') => {
                format!("{}/{name}", &server[..slash])
            }
            _ => panic!("DATABASE_URL names no database: {server}"),
        };
        let client = crate::db::connect(&DatabaseUrl::parse(&url).unwrap(), deadline)
            .await
            .unwrap();
        client
            .batch_execute(
                "CREATE TABLE events (position bigint PRIMARY KEY, stream_id text, \
                 stream_version bigint, event_type text, data jsonb, metadata jsonb, \
                 recorded_at timestamptz); \
                 INSERT INTO events SELECT i, 's-' || i % 100, 1, 'T', '{}', '{}', now() \
                 FROM generate_series(1, 200000) i; \
                 ANALYZE events;",
            )
            .await
            .unwrap();
        let sql = format!(
            "EXPLAIN (FORMAT JSON) {}",
            with_relation(
                &by_position("events", 0),
                "SELECT stream_id, count(*) FROM batch_events GROUP BY stream_id"
            )
        );
        let positions: Vec<i64> = (100_001..=101_500).filter(|p| p % 3 != 0).collect();
        let (first, last) = (100_001_i64, 101_500_i64);
        let row = client
            .query_one(&sql, &[&positions, &first, &last])
            .await
            .unwrap();
        let plan: serde_json::Value = row.get(0);
        drop(client);
        admin
            .batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .await
            .unwrap();
        // The first node with a join under the aggregate.
        let mut node = &plan[0]["Plan"];
        while !node["Node Type"].as_str().unwrap_or("").contains("Join")
            && !node["Node Type"]
                .as_str()
                .unwrap_or("")
                .contains("Nested Loop")
        {
            node = &node["Plans"][0];
            assert!(!node.is_null(), "no join in {plan}");
        }
        let estimate = node["Plan Rows"].as_f64().unwrap();
        assert!(
            estimate >= positions.len() as f64 / 2.0,
            "{estimate} rows estimated for a batch of {}: {plan}",
            positions.len()
        );
    }
}
