//! `coord-bench replay`: events per second of full replays of the reference
//! bank projector as Rust (batch-folding), per-event config SQL and
//! set-based config SQL, beside the raw client read speed (binary `COPY ...
//! TO STDOUT`) of the same events in the same run; the peak memory of the
//! replays; with `--fail-every N`, the same replays under `on_error = "park"`
//! with one event in N failing; and a check that every projector's balances
//! equal a from-scratch SQL computation.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use coord::replay::{ReplayOptions, DEFAULT_BATCH_BYTES};
use coord::{OnError, ProjectorName};
use futures_util::{pin_mut, StreamExt};

use crate::bank::{self, Kind};
use crate::reference::BalancesProjector;
use crate::support::{peak_rss_mb, reset_peak_rss, BenchDb, Common};
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
    /// Bytes per replay batch (see `ReplayOptions::batch_bytes`).
    #[arg(long, default_value_t = DEFAULT_BATCH_BYTES)]
    batch_bytes: usize,
    /// Projector kinds to replay, comma-separated.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Kind::Rust, Kind::Sql, Kind::SqlBatch])]
    kinds: Vec<Kind>,
    /// Then make one event in N fail (no amount) and replay the Rust and
    /// set-based kinds again under `on_error = "park"`.
    #[arg(long)]
    fail_every: Option<i64>,
    #[command(flatten)]
    common: Common,
}

const RAW_READ: &str = "COPY (SELECT position, stream_id, stream_version, event_type, data, \
    metadata, recorded_at FROM coord.events ORDER BY position) TO STDOUT (FORMAT binary)";

/// Makes the amount of one event in `$1` (not the openings) a string: every
/// kind of the projector fails on it.
const BREAK_EVENTS: &str = "UPDATE coord.events SET data = jsonb_set(data, '{amount}', '\"n/a\"') \
    WHERE position % $1::bigint = 0 AND event_type <> 'AccountOpened'";

#[derive(Default, serde::Serialize)]
struct Figures {
    events: i64,
    streams: i64,
    batch_size: usize,
    batch_bytes: usize,
    generate_s: f64,
    raw_read_s: f64,
    raw_read_bytes: u64,
    raw_read_events_per_s: f64,
    replay_s: Option<f64>,
    replay_events_per_s: Option<f64>,
    ratio: Option<f64>,
    sql_replay_s: Option<f64>,
    sql_replay_events_per_s: Option<f64>,
    sql_ratio: Option<f64>,
    sql_batch_replay_s: Option<f64>,
    sql_batch_events_per_s: Option<f64>,
    sql_batch_ratio: Option<f64>,
    results_equal: bool,
    /// Peak resident memory of coord-bench during the clean replays.
    peak_rss_mb: f64,
    fail_every: Option<i64>,
    failing_events: Option<u64>,
    park_events_per_s: Option<f64>,
    park_ratio: Option<f64>,
    sql_batch_park_events_per_s: Option<f64>,
    sql_batch_park_ratio: Option<f64>,
}

pub async fn run(args: Args) -> anyhow::Result<()> {
    if args.events < 1 {
        bail!("--events must be at least 1");
    }
    if args.fail_every.is_some_and(|n| n < 2) {
        bail!("--fail-every must be at least 2");
    }
    let db = BenchDb::create(&args.common.database_url, "replay").await?;
    let result = bench(&args, &db).await;
    db.drop_database().await?;
    let figures = result?;
    match args.common.output {
        OutputFormat::Json => println!("{}", serde_json::to_string(&figures)?),
        OutputFormat::Text => print_text(&figures),
    }
    if !figures.results_equal {
        bail!("the replayed balances differ from the from-scratch computation");
    }
    Ok(())
}

fn line(label: &str, secs: Option<f64>, rate: Option<f64>, ratio: Option<f64>) {
    if let (Some(secs), Some(rate), Some(ratio)) = (secs, rate, ratio) {
        println!("{label:<42}{secs:.2} s, {rate:.0} events/s, ratio {ratio:.2}");
    }
}

fn print_text(f: &Figures) {
    println!(
        "events: {} over {} streams (generated in {:.1} s), batch size {}, batch bytes {}",
        f.events, f.streams, f.generate_s, f.batch_size, f.batch_bytes
    );
    println!(
        "raw client read (binary COPY TO STDOUT): {:.2} s, {:.0} events/s ({} bytes)",
        f.raw_read_s, f.raw_read_events_per_s, f.raw_read_bytes
    );
    line(
        "replay, Rust batch-aware projector:",
        f.replay_s,
        f.replay_events_per_s,
        f.ratio,
    );
    line(
        "replay, config SQL projector:",
        f.sql_replay_s,
        f.sql_replay_events_per_s,
        f.sql_ratio,
    );
    line(
        "replay, set-based config SQL projector:",
        f.sql_batch_replay_s,
        f.sql_batch_events_per_s,
        f.sql_batch_ratio,
    );
    println!(
        "peak RSS of coord-bench during the replays: {:.0} MB",
        f.peak_rss_mb
    );
    if let (Some(n), Some(failing)) = (f.fail_every, f.failing_events) {
        println!("with one event in {n} failing ({failing} events), on_error = park:");
        if let (Some(rate), Some(ratio)) = (f.park_events_per_s, f.park_ratio) {
            println!("  Rust:      {rate:.0} events/s, {ratio:.2} of its clean run");
        }
        if let (Some(rate), Some(ratio)) = (f.sql_batch_park_events_per_s, f.sql_batch_park_ratio) {
            println!("  set-based: {rate:.0} events/s, {ratio:.2} of its clean run");
        }
    }
    println!(
        "results equal to a from-scratch SQL computation: {}",
        f.results_equal
    );
}

async fn bench(args: &Args, db: &BenchDb) -> anyhow::Result<Figures> {
    let mut client = db.client().await?;
    let streams = bank::STREAMS.min(args.events);
    let n = args.events as f64;
    let mut f = Figures {
        events: args.events,
        streams,
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        results_equal: true,
        ..Figures::default()
    };

    let started = Instant::now();
    bank::generate(&client, 0, args.events, streams).await?;
    client.batch_execute("VACUUM ANALYZE coord.events").await?;
    f.generate_s = started.elapsed().as_secs_f64();

    let started = Instant::now();
    let stream = client.copy_out(RAW_READ).await?;
    pin_mut!(stream);
    while let Some(chunk) = stream.next().await {
        f.raw_read_bytes += chunk?.len() as u64;
    }
    f.raw_read_s = started.elapsed().as_secs_f64();
    f.raw_read_events_per_s = n / f.raw_read_s;

    let pool = coord::pool(&db.url, 4)?;
    let options = ReplayOptions {
        batch_size: args.batch_size,
        batch_bytes: args.batch_bytes,
        ..ReplayOptions::default()
    };
    reset_peak_rss();
    for &kind in &args.kinds {
        let name = format!("bench_{}", kind_name(kind));
        let projector = bank::projector(kind, &name, OnError::Fail)?;
        let secs = bank::replay(&pool, &mut client, projector.as_ref(), &options).await?;
        f.results_equal &= bank::balances_equal(&client, projector.as_ref()).await?;
        let (s, rate, ratio) = (Some(secs), Some(n / secs), Some(f.raw_read_s / secs));
        match kind {
            Kind::Rust => (f.replay_s, f.replay_events_per_s, f.ratio) = (s, rate, ratio),
            Kind::Sql => {
                (f.sql_replay_s, f.sql_replay_events_per_s, f.sql_ratio) = (s, rate, ratio)
            }
            Kind::SqlBatch => {
                (
                    f.sql_batch_replay_s,
                    f.sql_batch_events_per_s,
                    f.sql_batch_ratio,
                ) = (s, rate, ratio)
            }
        }
    }
    f.peak_rss_mb = peak_rss_mb();

    if let Some(every) = args.fail_every {
        let failing = client.execute(BREAK_EVENTS, &[&every]).await?;
        client.batch_execute("VACUUM ANALYZE coord.events").await?;
        f.fail_every = Some(every);
        f.failing_events = Some(failing);
        for &kind in &args.kinds {
            let clean = match kind {
                Kind::Rust => f.replay_events_per_s,
                Kind::SqlBatch => f.sql_batch_events_per_s,
                Kind::Sql => continue,
            };
            let name = format!("park_{}", kind_name(kind));
            let projector = match kind {
                // Names every failing event of a call (decision 0070).
                Kind::Rust => Arc::new(
                    BalancesProjector::new(
                        ProjectorName::new(&name).map_err(anyhow::Error::msg)?,
                        semver::Version::new(1, 0, 0),
                    )
                    .with_on_error(OnError::Park)
                    .naming_every_failure(),
                ),
                _ => bank::projector(kind, &name, OnError::Park)?,
            };
            let secs = bank::replay(&pool, &mut client, projector.as_ref(), &options).await?;
            f.results_equal &= bank::balances_equal(&client, projector.as_ref()).await?;
            let rate = n / secs;
            let ratio = clean.map(|c| rate / c);
            match kind {
                Kind::Rust => (f.park_events_per_s, f.park_ratio) = (Some(rate), ratio),
                _ => (f.sql_batch_park_events_per_s, f.sql_batch_park_ratio) = (Some(rate), ratio),
            }
        }
    }
    Ok(f)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Rust => "rust",
        Kind::Sql => "sql",
        Kind::SqlBatch => "sql_batch",
    }
}
