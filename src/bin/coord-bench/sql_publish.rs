//! `coord-bench sql-publish`: publishing throughput through the SQL function
//! `coord.publish` (what a publisher in any language calls) beside the Rust
//! `Publisher`, in the same run, both with one inline config projector
//! active, one event per transaction.

use std::sync::Arc;
use std::time::{Duration, Instant};

use coord::Publisher;
use serde::Serialize;

pub use crate::gate::Args;
use crate::gate::{activate_balances, publish_for, sum_of};
use crate::support::BenchDb;
use crate::OutputFormat;

/// The figures.
#[derive(Debug, Serialize)]
pub struct Report {
    bench: &'static str,
    publishers: usize,
    seconds_per_path: f64,
    sql_events: u64,
    rust_events: u64,
    sql_events_per_s: f64,
    rust_events_per_s: f64,
    ratio: f64,
}

/// One publish through `coord.publish`: gate, append with the expected
/// version, the stored handlers, `applied_ahead`.
const PUBLISH: &str =
    "SELECT coord.publish('{\"balances\": \"1.0.0\"}', $1, $2, jsonb_build_array(jsonb_build_object('type', $3::text, 'data', $4::jsonb)))";

pub async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(args.publishers > 0, "--publishers must be at least 1");
    anyhow::ensure!(args.seconds > 0.0, "--seconds must be positive");
    let db = BenchDb::create(&args.database_url, "sql_publish").await?;
    let projectors = activate_balances(&db, "coord-bench sql-publish").await?;
    let publisher = Arc::new(Publisher::new(projectors));

    let round = Duration::from_secs_f64(args.seconds / 2.0);
    let (mut sql, mut rust) = (0, 0);
    // Alternate rust, sql, sql, rust so drift weighs on both paths alike.
    for (round_no, via_sql) in [false, true, true, false].into_iter().enumerate() {
        if via_sql {
            sql += publish_sql_for(&db, args.publishers, round, round_no).await?;
        } else {
            rust += publish_for(&db, &publisher, args.publishers, round, round_no).await?;
        }
    }
    db.drop_database().await?;

    let per_path = round.as_secs_f64() * 2.0;
    let report = Report {
        bench: "sql-publish",
        publishers: args.publishers,
        seconds_per_path: per_path,
        sql_events: sql,
        rust_events: rust,
        sql_events_per_s: sql as f64 / per_path,
        rust_events_per_s: rust as f64 / per_path,
        ratio: sql as f64 / rust.max(1) as f64,
    };
    if args.output == OutputFormat::Json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!(
        "sql-publish: {} publishers, {:.1} s per path\n  coord.publish   : {:>8.0} events/s\n  Rust Publisher  : {:>8.0} events/s\n  ratio sql/rust: {:.3}",
        report.publishers,
        per_path,
        report.sql_events_per_s,
        report.rust_events_per_s,
        report.ratio
    );
    Ok(())
}

/// Like [`publish_for`], through `coord.publish`.
async fn publish_sql_for(
    db: &BenchDb,
    publishers: usize,
    duration: Duration,
    round_no: usize,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for i in 0..publishers {
        let mut client = db.client().await?;
        tasks.push(tokio::spawn(async move {
            let statement = client.prepare(PUBLISH).await?;
            let mut n: i64 = 0;
            let stream = format!("sql-{round_no}-{i}");
            let deposit = serde_json::json!({"amount": 1});
            let empty = serde_json::json!({});
            while Instant::now() < deadline {
                let (event_type, data) = if n == 0 {
                    ("AccountOpened", &empty)
                } else {
                    ("MoneyDeposited", &deposit)
                };
                let tx = client.transaction().await?;
                tx.execute(&statement, &[&stream, &n, &event_type, data])
                    .await?;
                tx.commit().await?;
                n += 1;
            }
            anyhow::Ok(n as u64)
        }));
    }
    sum_of(tasks).await
}
