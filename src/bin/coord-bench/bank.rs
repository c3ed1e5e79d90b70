//! The bank the replay and catch-up benchmarks run on: a store generated on
//! the server, the reference projector in its three forms (Rust, per-event
//! config SQL, set-based config SQL), one full or incremental replay, and
//! the check of a projector's balances against a from-scratch computation.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;
use coord::replay::{catch_up, start_replay, ReplayOptions};
use coord::Actor;
use coord::{Config, OnError, Projector, ProjectorName, RelationName, SqlProjector};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::reference::BalancesProjector;

/// Accounts (streams) of a generated store.
pub const STREAMS: i64 = 10_000;

/// Appends events `$1 .. $1 + $2` of a bank of `$3` accounts (the first
/// `$3` events open them), each with ~150 bytes of payload besides the
/// amount, generated on the server in one statement.
const GENERATE: &str = "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
    SELECT 'acct-' || (i % $3::bigint), i / $3::bigint + 1, \
      CASE WHEN i < $3::bigint THEN 'AccountOpened' WHEN i % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
      CASE WHEN i < $3::bigint THEN jsonb_build_object('owner', 'owner ' || i, 'note', repeat('x', 150)) \
           ELSE jsonb_build_object('amount', i % 97 + 1, 'currency', 'EUR', 'note', repeat('x', 150)) END \
    FROM generate_series($1::bigint, $1::bigint + $2::bigint - 1) AS i ORDER BY i";

/// Rows generated per statement, so no transaction grows unbounded.
const GENERATE_CHUNK: i64 = 2_000_000;

/// Appends events `from .. from + count` of the bank, in chunks.
pub async fn generate(client: &Client, from: i64, count: i64, streams: i64) -> anyhow::Result<()> {
    let mut at = from;
    while at < from + count {
        let n = GENERATE_CHUNK.min(from + count - at);
        client
            .execute(GENERATE, &[&at, &n, &streams])
            .await
            .context("cannot generate events")?;
        at += n;
    }
    Ok(())
}

const EXPECTED: &str = "SELECT stream_id AS account, sum(CASE \
      WHEN jsonb_typeof(data->'amount') IS DISTINCT FROM 'number' THEN 0 \
      WHEN event_type = 'MoneyDeposited' THEN (data->>'amount')::bigint \
      WHEN event_type = 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint AS amount \
    FROM coord.events GROUP BY stream_id";

/// Whether `projector`'s balances equal a from-scratch computation over
/// every event (events whose amount is not a number count as nothing, as
/// parked ones).
pub async fn balances_equal(client: &Client, projector: &dyn Projector) -> anyhow::Result<bool> {
    let table = format!(
        "{}.balances",
        coord::quote_ident(&coord::schema_name(projector.name(), projector.version()))
    );
    let row = client
        .query_one(
            &format!(
                "SELECT count(*) FROM ({EXPECTED}) e FULL JOIN {table} r USING (account) \
                 WHERE e.amount IS DISTINCT FROM r.amount"
            ),
            &[],
        )
        .await?;
    Ok(row.get::<_, i64>(0) == 0)
}

/// The three forms of the reference projector.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Rust, folding each batch in memory (`BalancesProjector`).
    Rust,
    /// Config SQL, one statement per event.
    Sql,
    /// Config SQL, one set-based statement per event type and batch.
    SqlBatch,
}

const PER_EVENT_HANDLERS: &str = r#"
[projector.handlers]
AccountOpened  = "INSERT INTO balances (account) VALUES ($1)"
MoneyDeposited = "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1"
MoneyWithdrawn = "UPDATE balances SET amount = amount - ($5->>'amount')::bigint WHERE account = $1"
"#;

const BATCH_HANDLERS: &str = r#"
[projector.batch_handlers]
AccountOpened  = "INSERT INTO balances (account) SELECT stream_id FROM batch_events"
MoneyDeposited = """
UPDATE balances b SET amount = b.amount + d.delta
FROM (SELECT stream_id, sum((data->>'amount')::bigint) AS delta FROM batch_events GROUP BY stream_id) d
WHERE b.account = d.stream_id
"""
MoneyWithdrawn = """
UPDATE balances b SET amount = b.amount - d.delta
FROM (SELECT stream_id, sum((data->>'amount')::bigint) AS delta FROM batch_events GROUP BY stream_id) d
WHERE b.account = d.stream_id
"""
"#;

/// Checks for the set-based kind: they name the events whose amount is not
/// a number (those `replay --fail-every` breaks), so a park replay parks
/// them without searching its batches (decision 0089).
const BATCH_CHECKS: &str = r#"
[projector.batch_checks]
MoneyDeposited = "SELECT position, 'amount is not a number' FROM batch_events WHERE jsonb_typeof(data->'amount') <> 'number'"
MoneyWithdrawn = "SELECT position, 'amount is not a number' FROM batch_events WHERE jsonb_typeof(data->'amount') <> 'number'"
"#;

/// The set-based reference projector with [`BATCH_CHECKS`].
pub fn checked_projector(name: &str, on_error: OnError) -> anyhow::Result<Arc<dyn Projector>> {
    sql_projector(name, on_error, &format!("{BATCH_CHECKS}{BATCH_HANDLERS}"))
}

/// The reference projector of `kind`, called `name`, with `on_error`.
pub fn projector(kind: Kind, name: &str, on_error: OnError) -> anyhow::Result<Arc<dyn Projector>> {
    let handlers = match kind {
        Kind::Rust => {
            let name = ProjectorName::new(name).map_err(anyhow::Error::msg)?;
            return Ok(Arc::new(
                BalancesProjector::new(name, semver::Version::new(1, 0, 0)).with_on_error(on_error),
            ));
        }
        Kind::Sql => PER_EVENT_HANDLERS,
        Kind::SqlBatch => BATCH_HANDLERS,
    };
    sql_projector(name, on_error, handlers)
}

fn sql_projector(
    name: &str,
    on_error: OnError,
    handlers: &str,
) -> anyhow::Result<Arc<dyn Projector>> {
    let text = format!(
        r#"
[[projector]]
name = "{name}"
version = "1.0.0"
on_error = "{}"
tables = """
CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0)
  WITH (fillfactor = 50);
"""
{handlers}"#,
        on_error.as_str()
    );
    let config = Config::parse(&text, "bench").map_err(coord::Error::from)?;
    Ok(Arc::new(SqlProjector::new(config.projectors[0].clone())))
}

/// Registers `projector` and replays it to the end of the store; returns
/// the seconds it took.
pub async fn replay(
    pool: &deadpool_postgres::Pool,
    client: &mut Client,
    projector: &dyn Projector,
    options: &ReplayOptions,
) -> anyhow::Result<f64> {
    settle(client).await?;
    let started = Instant::now();
    start_replay(client, projector, &Actor::new("bench", "coord-bench")).await?;
    let (_, applied) = catch_up_once(pool, projector, options).await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "replayed {}@{}: {applied} events in {secs:.2} s",
        projector.name(),
        projector.version()
    );
    Ok(secs)
}

/// Writes out what earlier steps left dirty (`CHECKPOINT`), untimed, so
/// that a timed step does not share the machine with the checkpointer
/// flushing another step's writes.
pub async fn settle(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute("CHECKPOINT")
        .await
        .context("CHECKPOINT (the benchmark's role needs superuser or pg_checkpoint)")
}

/// Catches `projector` (registered) up with the store; returns the seconds
/// it took and the events it applied.
pub async fn catch_up_once(
    pool: &deadpool_postgres::Pool,
    projector: &dyn Projector,
    options: &ReplayOptions,
) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let report = catch_up(
        pool,
        projector,
        &RelationName::default(),
        options,
        &CancellationToken::new(),
    )
    .await?;
    Ok((started.elapsed().as_secs_f64(), report.applied))
}
