//! `coord-bench replay`: events per second of full replays of a Rust
//! batch-aware reference projector and of the same projector in config SQL,
//! beside the raw client read speed (binary `COPY ... TO STDOUT`) of the same
//! events in the same run, and a check that both equal a from-scratch SQL
//! computation.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use coord::replay::{run_pass, start_replay, BalancesProjector, ReplayOptions};
use coord::store::Actor;
use coord::{Config, DatabaseUrl, Projector, ProjectorName, RelationName, SqlProjector};
use futures_util::{pin_mut, StreamExt};
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;

use crate::OutputFormat;

/// Arguments of `coord-bench replay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Events in the store.
    #[arg(long, default_value_t = 1_000_000)]
    events: i64,
    /// Events per replay batch.
    #[arg(long, default_value_t = 50_000)]
    batch_size: usize,
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres",
        hide_env_values = true
    )]
    database_url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

const STREAMS: i64 = 10_000;

const GENERATE: &str = "INSERT INTO coord.events (stream_id, stream_version, event_type, data) \
    SELECT 'acct-' || (i % $2::bigint), i / $2::bigint + 1, \
      CASE WHEN i < $2::bigint THEN 'AccountOpened' WHEN i % 3 = 0 THEN 'MoneyWithdrawn' ELSE 'MoneyDeposited' END, \
      CASE WHEN i < $2::bigint THEN jsonb_build_object('owner', 'owner ' || i, 'note', repeat('x', 150)) \
           ELSE jsonb_build_object('amount', i % 97 + 1, 'currency', 'EUR', 'note', repeat('x', 150)) END \
    FROM generate_series(0::bigint, $1::bigint - 1) AS i ORDER BY i";

const RAW_READ: &str = "COPY (SELECT position, stream_id, stream_version, event_type, data, \
    metadata, recorded_at FROM coord.events ORDER BY position) TO STDOUT (FORMAT binary)";

const EXPECTED: &str = "SELECT stream_id AS account, sum(CASE event_type \
      WHEN 'MoneyDeposited' THEN (data->>'amount')::bigint \
      WHEN 'MoneyWithdrawn' THEN -(data->>'amount')::bigint ELSE 0 END)::bigint AS amount \
    FROM coord.events GROUP BY stream_id";

/// The bank projector as set-based config SQL: one statement per event type
/// and batch.
fn sql_batch_config(name: &str) -> String {
    format!(
        r#"
[[projector]]
name = "{name}"
version = "1.0.0"
tables = """
CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0)
  WITH (fillfactor = 50);
"""

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
"#
    )
}

fn sql_config(name: &str) -> String {
    format!(
        r#"
[[projector]]
name = "{name}"
version = "1.0.0"
tables = """
CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0)
  WITH (fillfactor = 50);
"""

[projector.handlers]
AccountOpened  = "INSERT INTO balances (account) VALUES ($1)"
MoneyDeposited = "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1"
MoneyWithdrawn = "UPDATE balances SET amount = amount - ($5->>'amount')::bigint WHERE account = $1"
"#
    )
}

async fn connect(url: &str) -> anyhow::Result<Client> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .context("cannot connect")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced by `db`.
fn with_database(url: &DatabaseUrl, db: &str) -> anyhow::Result<DatabaseUrl> {
    let mut config = url.pg_config();
    config.dbname(db);
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => "127.0.0.1".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config.get_user().unwrap_or("postgres").to_owned();
    let password = config
        .get_password()
        .map(|p| {
            format!(
                " password='{}'",
                String::from_utf8_lossy(p).replace('\'', "\\'")
            )
        })
        .unwrap_or_default();
    DatabaseUrl::parse(&format!(
        "host={host} port={port} user={user} dbname={db}{password}"
    ))
    .map_err(anyhow::Error::msg)
}

#[derive(serde::Serialize)]
struct Figures {
    events: i64,
    streams: i64,
    batch_size: usize,
    generate_s: f64,
    raw_read_s: f64,
    raw_read_bytes: u64,
    raw_read_events_per_s: f64,
    replay_s: f64,
    replay_events_per_s: f64,
    sql_replay_s: f64,
    sql_replay_events_per_s: f64,
    sql_batch_replay_s: f64,
    sql_batch_events_per_s: f64,
    ratio: f64,
    sql_ratio: f64,
    sql_batch_ratio: f64,
    results_equal: bool,
    peak_rss_mb: f64,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.events < 1 {
        bail!("--events must be at least 1");
    }
    let admin_url = DatabaseUrl::parse(&args.database_url).map_err(anyhow::Error::msg)?;
    let admin = connect(admin_url.expose()).await?;
    let db = format!("coord_bench_replay_{}", std::process::id());
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .context("cannot create the benchmark database")?;
    let url = with_database(&admin_url, &db)?;
    let result = bench(&args, &url).await;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .context("cannot drop the benchmark database")?;
    let figures = result?;
    match args.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&figures)?),
        OutputFormat::Text => print_text(&figures),
    }
    if !figures.results_equal {
        bail!("the replayed balances differ from the from-scratch computation");
    }
    Ok(())
}

fn print_text(f: &Figures) {
    println!(
        "events: {} over {} streams (generated in {:.1} s), batch size {}",
        f.events, f.streams, f.generate_s, f.batch_size
    );
    println!(
        "raw client read (binary COPY TO STDOUT): {:.2} s, {:.0} events/s ({} bytes)",
        f.raw_read_s, f.raw_read_events_per_s, f.raw_read_bytes
    );
    println!(
        "replay, Rust batch-aware projector:      {:.2} s, {:.0} events/s, ratio {:.2}",
        f.replay_s, f.replay_events_per_s, f.ratio
    );
    println!(
        "replay, config SQL projector:            {:.2} s, {:.0} events/s, ratio {:.2}",
        f.sql_replay_s, f.sql_replay_events_per_s, f.sql_ratio
    );
    println!(
        "replay, set-based config SQL projector:  {:.2} s, {:.0} events/s, ratio {:.2}",
        f.sql_batch_replay_s, f.sql_batch_events_per_s, f.sql_batch_ratio
    );
    println!(
        "results equal to a from-scratch SQL computation: {}",
        f.results_equal
    );
    println!("peak RSS of coord-bench: {:.0} MB", f.peak_rss_mb);
}

async fn bench(args: &Args, url: &DatabaseUrl) -> anyhow::Result<Figures> {
    let mut client = coord::connect(url, Duration::from_secs(10)).await?;
    coord::migrate(&mut client).await?;
    let streams = STREAMS.min(args.events);

    let started = Instant::now();
    client
        .execute(GENERATE, &[&args.events, &streams])
        .await
        .context("cannot generate events")?;
    client.batch_execute("VACUUM ANALYZE coord.events").await?;
    let generate_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let stream = client.copy_out(RAW_READ).await?;
    pin_mut!(stream);
    let mut raw_read_bytes = 0_u64;
    while let Some(chunk) = stream.next().await {
        raw_read_bytes += chunk?.len() as u64;
    }
    let raw_read_s = started.elapsed().as_secs_f64();

    let pool = coord::pool(url, 4)?;
    let actor = Actor::new("bench", "coord-bench replay");
    let options = ReplayOptions {
        batch_size: args.batch_size,
        ..ReplayOptions::default()
    };
    let relation = RelationName::default();

    let rust: Arc<dyn Projector> = Arc::new(BalancesProjector::new(
        ProjectorName::new("bench_rust").map_err(anyhow::Error::msg)?,
        semver::Version::new(1, 0, 0),
    ));
    let replay_s = replay(
        &pool,
        &mut client,
        rust.as_ref(),
        &relation,
        &options,
        &actor,
    )
    .await?;

    let config = Config::parse(&sql_config("bench_sql"), "bench").map_err(coord::Error::from)?;
    let sql: Arc<dyn Projector> = Arc::new(SqlProjector::new(config.projectors[0].clone()));
    let sql_replay_s = replay(
        &pool,
        &mut client,
        sql.as_ref(),
        &relation,
        &options,
        &actor,
    )
    .await?;

    let config =
        Config::parse(&sql_batch_config("bench_sql_batch"), "bench").map_err(coord::Error::from)?;
    let sql_batch: Arc<dyn Projector> = Arc::new(SqlProjector::new(config.projectors[0].clone()));
    let sql_batch_replay_s = replay(
        &pool,
        &mut client,
        sql_batch.as_ref(),
        &relation,
        &options,
        &actor,
    )
    .await?;

    let mut results_equal = true;
    for projector in [&rust, &sql, &sql_batch] {
        let table = format!(
            "{}.balances",
            coord::quote_ident(&projector_schema(projector))
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
        let differing: i64 = row.get(0);
        results_equal &= differing == 0;
    }

    let n = args.events as f64;
    Ok(Figures {
        events: args.events,
        streams,
        batch_size: args.batch_size,
        generate_s,
        raw_read_s,
        raw_read_bytes,
        raw_read_events_per_s: n / raw_read_s,
        replay_s,
        replay_events_per_s: n / replay_s,
        sql_replay_s,
        sql_replay_events_per_s: n / sql_replay_s,
        sql_batch_replay_s,
        sql_batch_events_per_s: n / sql_batch_replay_s,
        ratio: raw_read_s / replay_s,
        sql_ratio: raw_read_s / sql_replay_s,
        sql_batch_ratio: raw_read_s / sql_batch_replay_s,
        results_equal,
        peak_rss_mb: crate::support::peak_rss_mb(),
    })
}

fn projector_schema(projector: &Arc<dyn Projector>) -> String {
    coord::schema_name(projector.name(), projector.version())
}

/// Registers `projector` and runs one full pass; returns its duration.
async fn replay(
    pool: &deadpool_postgres::Pool,
    client: &mut Client,
    projector: &dyn Projector,
    relation: &RelationName,
    options: &ReplayOptions,
    actor: &Actor,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    start_replay(client, projector, actor).await?;
    let report = run_pass(
        pool,
        projector,
        relation,
        options,
        &CancellationToken::new(),
    )
    .await?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "replayed {}@{}: {} events in {} batches, {:.2} s",
        projector.name(),
        projector.version(),
        report.applied,
        report.batches,
        secs
    );
    Ok(secs)
}
