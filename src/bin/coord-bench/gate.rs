//! `coord-bench gate`: publishing throughput through the library with the
//! gate on versus off, in the same run, with an inline projector active.
//! "Gate on" includes recording each inline application in
//! `coord.applied_ahead` (one more row per event, in the same statement).

use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::{Config, ExpectedVersion, NewEvent, ProjectorSet, Publisher};
use serde::Serialize;

use crate::support::BenchDb;
use crate::OutputFormat;

/// Arguments of `coord-bench gate` (and `sql-publish`, which compares two
/// publishing paths the same way).
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent publishers, each on its own connection.
    #[arg(long, default_value_t = 16)]
    pub publishers: usize,
    /// Seconds of publishing per mode (split into two rounds each, alternating).
    #[arg(long, default_value_t = 10.0)]
    pub seconds: f64,
    /// Server to create the benchmark database on.
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

/// The figures.
#[derive(Debug, Serialize)]
pub struct Report {
    bench: &'static str,
    publishers: usize,
    seconds_per_mode: f64,
    gate_on_events: u64,
    gate_off_events: u64,
    gate_on_events_per_s: f64,
    gate_off_events_per_s: f64,
    ratio: f64,
}

const CONFIG: &str = r#"
[[projector]]
name = "balances"
version = "1.0.0"
tables = "CREATE TABLE balances (account text PRIMARY KEY, amount bigint NOT NULL DEFAULT 0);"
[projector.handlers]
AccountOpened  = "INSERT INTO balances (account) VALUES ($1)"
MoneyDeposited = "UPDATE balances SET amount = amount + ($5->>'amount')::bigint WHERE account = $1"
"#;

/// Activates the one inline config projector both publishing benchmarks use.
pub async fn activate_balances(db: &BenchDb, command: &str) -> anyhow::Result<ProjectorSet> {
    let config = Config::parse(CONFIG, command)?;
    let projectors = ProjectorSet::from_config(&config);
    let pool = coord::pool(&db.url, 4)?;
    coord::activation::activate_current_config(
        &pool,
        &db.url,
        &projectors,
        &coord::RelationName::default(),
        &coord::activation::ActivateOptions::default(),
        &coord::Actor::new("coord-bench", command),
        &tokio_util::sync::CancellationToken::new(),
    )
    .await?;
    Ok(projectors)
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    let server_url = args.database_url.as_str();
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let db = BenchDb::create(server_url, "gate").await?;
    let projectors = activate_balances(&db, "coord-bench gate").await?;

    let round = Duration::from_secs_f64(args.seconds / 2.0);
    let mut on = 0;
    let mut off = 0;
    // Alternate off, on, on, off so drift (autovacuum, checkpoints, table
    // growth) weighs on both modes alike.
    for (round_no, gate) in [false, true, true, false].into_iter().enumerate() {
        let publisher = Arc::new(Publisher::new(projectors.clone()).with_gate(gate));
        let n = publish_for(&db, &publisher, args.publishers, round, round_no).await?;
        if gate {
            on += n;
        } else {
            off += n;
        }
    }
    db.drop_database().await?;

    let per_mode = round.as_secs_f64() * 2.0;
    let on_rate = on as f64 / per_mode;
    let off_rate = off as f64 / per_mode;
    let report = Report {
        bench: "gate",
        publishers: args.publishers,
        seconds_per_mode: per_mode,
        gate_on_events: on,
        gate_off_events: off,
        gate_on_events_per_s: on_rate,
        gate_off_events_per_s: off_rate,
        ratio: on_rate / off_rate,
    };
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "gate: {} publishers, {:.1} s per mode\n  gate on : {:>8.0} events/s\n  gate off: {:>8.0} events/s\n  ratio on/off: {:.3}",
        report.publishers, per_mode, on_rate, off_rate, report.ratio
    );
    Ok(())
}

/// Every publisher opens accounts and deposits into them, one event per
/// transaction, until `duration` passes. Returns the events committed.
pub async fn publish_for(
    db: &BenchDb,
    publisher: &Arc<Publisher>,
    publishers: usize,
    duration: Duration,
    round_no: usize,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let mut client = db.client().await?;
        let publisher = publisher.clone();
        tasks.push(tokio::spawn(async move {
            let mut n: u64 = 0;
            let stream = format!("acct-{round_no}-{i}");
            while Instant::now() < deadline {
                let event = if n == 0 {
                    NewEvent::new("AccountOpened", serde_json::json!({}))
                } else {
                    NewEvent::new("MoneyDeposited", serde_json::json!({"amount": 1}))
                };
                let tx = client.transaction().await?;
                publisher
                    .publish(&tx, &stream, ExpectedVersion::Exact(n as i64), &[event])
                    .await?;
                tx.commit().await?;
                n += 1;
            }
            anyhow::Ok(n)
        }));
    }
    sum_of(tasks).await
}

/// The events the publisher tasks committed, or the first task's error.
pub async fn sum_of(
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<u64>>>,
) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in tasks {
        total += task.await??;
    }
    Ok(total)
}
